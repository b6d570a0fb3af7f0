"""Full-width NVLM-D-72B slices (real widths and vocab, K LLM and K ViT layers) filled with cheap
deterministic data and written as Megatron checkpoints through the project's own HF -> Megatron
writers, without building a Megatron model and without an HF folder on disk.

Each HF tensor is a block of 2**20 seeded normal values (the seed from its name) repeated to its
size, in bfloat16, with the dummy ViT heads exactly zero as in the release (the converter checks
that they are). Conversion cost does not depend on the values, so repetition is fair.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from converter.families import NVLMD
from converter.megatron_writers import hf_steps, megatron_tensor, write_legacy, write_torch_dist
from mappings.transforms import ViTProj, ViTQKV
from modeling.presets import get_config, tokenizer_size

PRESET = "nvlm-d-72b"
BLOCK = 1 << 20


def slice_config(depth: int):
    """nvlm-d-72b with `depth` LLM layers and `depth` ViT layers."""
    return get_config(PRESET, llm_num_hidden_layers=depth, vision_num_hidden_layers=depth)


def full_config():
    """The whole nvlm-d-72b (80 LLM and 45 ViT layers), for the projection."""
    return get_config(PRESET)


class SyntheticSource:
    """HF-side tensors of a config, made on demand (`get`) or as shapes only (`meta`)."""

    def __init__(self, config, table, dtype: torch.dtype = torch.bfloat16):
        self.shapes = NVLMD.expected(config)
        self.dtype = dtype
        self._padded_heads = {}
        for name in self.shapes:
            for rule in table.rules:
                layer = rule.match_hf(name)
                if layer is not None and isinstance(rule.transform, ViTQKV | ViTProj):
                    self._padded_heads[name] = rule.transform

    def meta(self, name: str) -> torch.Tensor:
        return torch.empty(self.shapes[name], dtype=self.dtype, device="meta")

    def get(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        numel = math.prod(shape)
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        block = torch.randn(min(numel, BLOCK), generator=generator).to(self.dtype)
        flat = torch.empty(numel, dtype=self.dtype)
        flat[: block.numel()] = block
        filled = block.numel()
        while filled < numel:  # doubling copies: memcpy speed
            step = min(filled, numel - filled)
            flat[filled : filled + step] = flat[:step]
            filled += step
        tensor = flat.view(shape)
        transform = self._padded_heads.get(name)
        if isinstance(transform, ViTQKV):
            tensor.view(3, transform.hf_heads, transform.head_dim, -1)[:, transform.real_heads :] = 0
        elif isinstance(transform, ViTProj):
            tensor.view(shape[0], transform.hf_heads, transform.head_dim)[:, transform.real_heads :] = 0
        return tensor


def write_checkpoint(folder: Path, config, fmt: str, tp: int = 8, tokenizer_vocab: int | None = None) -> None:
    """A Megatron checkpoint of `config` (`fmt`: "torch" legacy or "torch_dist") at TP=tp, PP=1."""
    table = NVLMD.table(config)
    source = SyntheticSource(config, table)
    steps = hf_steps(table, list(source.shapes))
    args = NVLMD.megatron_args(
        config,
        tp,
        1,
        dtype=torch.bfloat16,
        divisible_by=128,
        tokenizer_vocab=tokenizer_vocab or tokenizer_size(PRESET),
    )
    writer = write_legacy if fmt == "torch" else write_torch_dist
    writer(Path(folder), args, steps, source)


@dataclass(frozen=True)
class Sizes:
    hf_bytes: int  # the HF tensors in bfloat16 (what megatron-to-hf writes)
    megatron_bytes: int  # the global Megatron tensors at TP (padded vocab and heads)
    largest: int  # the largest global Megatron tensor


def sizes(config, tp: int = 8) -> Sizes:
    """Byte counts of a configuration, from shapes only."""
    table = NVLMD.table(config)
    source = SyntheticSource(config, table)
    megatron = [
        megatron_tensor(source.meta, rule, layer, tp) for rule, layer in hf_steps(table, list(source.shapes))
    ]
    nbytes = [t.numel() * t.element_size() for t in megatron]
    return Sizes(sum(math.prod(s) * 2 for s in source.shapes.values()), sum(nbytes), max(nbytes))
