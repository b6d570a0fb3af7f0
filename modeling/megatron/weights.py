"""Seeded, tensor-parallel-invariant weights for a Megatron NVLM-D model.

Every GLOBAL tensor is drawn from a generator seeded by (seed, its global name), then cut into
this rank's piece of Megatron's layout. Checkpoints of the same seed at different TP/PP sizes
therefore hold the same model, which is what lets tests compare TP=1 with TP=2, or PP=1 with
PP=2. Where the global tensor itself depends on TP (padded ViT heads, padded vocab rows), only the
real part is drawn and the padding is zero, as Megatron's dummy heads must be.

How a rank's piece is cut comes from the attributes Megatron's parallel layers put on their
parameters (`tensor_model_parallel`, `partition_dim`, `partition_stride`), so no name table is
needed except for the padded tensors.
"""

from __future__ import annotations

import re
import zlib

import torch
from megatron.core import parallel_state

_LLM_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.")
_VIT_QKV = re.compile(r"^vision_model\.decoder\.layers\.\d+\.self_attention\.linear_qkv\.weight$")
_VIT_QK_NORM = re.compile(r"^vision_model\.decoder\.layers\.\d+\.self_attention\.[qk]_layernorm\.weight$")
_VIT_PROJ = re.compile(r"^vision_model\.decoder\.layers\.\d+\.self_attention\.linear_proj\.weight$")
_VOCAB = re.compile(r"^language_model\.(embedding\.word_embeddings|output_layer)\.weight$")


def _draw(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A float32 tensor for `name`: norms near 1, layer scales near 0.5, the rest small."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=generator)
    if name.endswith(("layernorm.weight", "layer_norm_weight", "norm.weight")):
        return 1.0 + 0.1 * noise
    if name.endswith(("ls1", "ls2")):
        return 0.5 + 0.1 * noise
    return 0.02 * noise


def _pad(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    pad = list(tensor.shape)
    pad[dim] = size - tensor.shape[dim]
    return torch.cat([tensor, tensor.new_zeros(pad)], dim=dim)


def _shard(global_tensor: torch.Tensor, param: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This rank's piece, as Megatron lays it out: contiguous chunks along `partition_dim`, or,
    for a strided parameter (SwiGLU fc1 = [gate; up]), the rank's chunk of each stride block."""
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return global_tensor
    dim = param.partition_dim
    stride = getattr(param, "partition_stride", 1)
    blocks = global_tensor.chunk(stride, dim=dim)
    return torch.cat([block.chunk(tp, dim=dim)[rank] for block in blocks], dim=dim)


def _global_shape(param: torch.Tensor, tp: int) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp
    return shape


def global_name(model, local_name: str) -> str:
    """Pipeline stages number their LLM layers from 0; the seed uses the global layer number."""
    match = _LLM_LAYER.match(local_name)
    if not match:
        return local_name
    layer = model.language_model.decoder.layers[int(match.group(1))]
    return local_name.replace(match.group(0), f"language_model.decoder.layers.{layer.layer_number - 1}.", 1)


def global_tensor(name: str, param: torch.Tensor, config, vocab_real: int, seed: int) -> torch.Tensor:
    """The whole (all-TP-ranks) tensor for one parameter, in Megatron's layout."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    shape = _global_shape(param, tp)
    vit = config.vision_config
    real, head_dim = vit.num_attention_heads, vit.head_dim
    if _VIT_QKV.match(name):  # rows interleaved per head: [q_h; k_h; v_h] for h = 0..H-1
        heads = shape[0] // (3 * head_dim)
        per_head = _draw(name, (real, 3, head_dim, shape[1]), seed)
        return _pad(per_head, 0, heads).reshape(shape)
    if _VIT_QK_NORM.match(name):
        return _pad(_draw(name, (real * head_dim,), seed), 0, shape[0])
    if _VIT_PROJ.match(name):
        return _pad(_draw(name, (shape[0], real * head_dim), seed), 1, shape[1])
    if _VOCAB.match(name):  # rows past the tokenizer's vocabulary are Megatron's padding
        return _pad(_draw(name, (vocab_real, shape[1]), seed), 0, shape[0])
    return _draw(name, tuple(shape), seed)


@torch.no_grad()
def fill_seeded_weights(model, config, *, vocab_real: int, seed: int) -> None:
    """Overwrite every parameter of this rank's model with its piece of the seeded global tensor."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for local_name, param in model.named_parameters():
        name = global_name(model, local_name)
        whole = global_tensor(name, param, config, vocab_real, seed)
        param.copy_(_shard(whole, param, tp, rank).to(param.dtype))
