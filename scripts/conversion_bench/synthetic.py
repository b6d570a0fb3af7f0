"""Full-width NVLM-D-72B slices (real widths and vocab, K LLM and K ViT layers) filled with cheap
deterministic data and written as Megatron checkpoints through the project's own HF -> Megatron
writers, without building a Megatron model and without an HF folder on disk.

Each HF tensor is fresh seeded random bits (the seed from its name; numpy's SFC64, a fast
generator) with the second-highest bit of every value cleared, which keeps every float finite
(exponent below the bias: magnitudes under 2) and the data incompressible, so that no layer
below the converter (a compressing or deduplicating disk, the page cache's zero pages) can make a
copy cheaper than it is for a real checkpoint. The dummy ViT heads are exactly zero as in the
release (the converter checks that they are). Conversion cost does not depend on the values.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from converter.families import NVLMD
from converter.megatron_writers import hf_steps, megatron_tensor, write_legacy, write_torch_dist
from mappings.transforms import ViTProj, ViTQKV
from modeling.presets import get_config, tokenizer_size

PRESET = "nvlm-d-72b"


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
        tensor = random_floats(math.prod(shape), self.dtype, zlib.crc32(name.encode())).view(shape)
        transform = self._padded_heads.get(name)
        if isinstance(transform, ViTQKV):
            tensor.view(3, transform.hf_heads, transform.head_dim, -1)[:, transform.real_heads :] = 0
        elif isinstance(transform, ViTProj):
            tensor.view(shape[0], transform.hf_heads, transform.head_dim)[:, transform.real_heads :] = 0
        return tensor


_FINITE_MASKS = {2: np.uint16(0xBFFF), 4: np.uint32(0xBFFFFFFF), 8: np.uint64(0xBFFFFFFFFFFFFFFF)}


def random_floats(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """`numel` finite floats of `dtype` from random bits (see the module docstring)."""
    size = torch.empty((), dtype=dtype).element_size()
    words = np.random.SFC64(seed).random_raw((numel * size + 7) // 8)
    bits = words.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[size])[:numel]
    bits &= _FINITE_MASKS[size]  # in place: exponent's top bit 0, so neither inf nor NaN
    return torch.from_numpy(bits).view(dtype)


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
