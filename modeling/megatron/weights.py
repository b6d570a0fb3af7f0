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

import math
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
    return _scaled(name, torch.randn(shape, generator=_generator(name, seed)))


def _generator(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _scaled(name: str, noise: torch.Tensor) -> torch.Tensor:
    """Elementwise, so a tensor drawn in blocks gets the same values."""
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


BLOCK_VALUES = 1 << 22  # float32 values drawn at a time (16 MiB), a multiple of 16


@torch.no_grad()
def fill_seeded_weights(model, config, *, vocab_real: int, seed: int, block_values: int = BLOCK_VALUES):
    """Overwrite every parameter of this rank's model with its piece of the seeded global tensor
    (`global_tensor`), without the global tensor in memory: matrices are drawn in blocks of rows
    from the same generator and each rank keeps its piece of each block. torch's CPU randn of a
    tensor equals the concatenation of randn of consecutive row blocks when every block but the
    last holds a multiple of 16 values (its Box-Muller runs in blocks of 16), so the values are
    bit for bit those of cutting the whole tensor (tests/test_checkpoint_maker_memory.py); the
    72B embedding alone is 5 GB in float32. Vectors (norms, biases: small) are cut from it."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for local_name, param in model.named_parameters():
        name = global_name(model, local_name)
        drawn = _drawn_matrix(name, param, config, vocab_real, tp)
        if drawn is None:
            whole = global_tensor(name, param, config, vocab_real, seed)
            param.copy_(_shard(whole, param, tp, rank).to(param.dtype))
            continue
        _fill_blockwise(name, param, drawn, seed, tp, rank, block_values)


def _drawn_matrix(name: str, param, config, vocab_real: int, tp: int):
    """(drawn rows, drawn columns, global rows, global columns) of a 2-D parameter's global tensor
    as global_tensor makes it (drawn values, then zero padding after the drawn rows or
    columns), or None for anything else."""
    shape = _global_shape(param, tp)
    if len(shape) != 2:
        return None
    rows, cols = shape
    vit = config.vision_config
    if _VIT_QKV.match(name):  # (real heads, 3, head_dim, cols) padded with zero heads
        return vit.num_attention_heads * 3 * vit.head_dim, cols, rows, cols
    if _VIT_PROJ.match(name):
        return rows, vit.num_attention_heads * vit.head_dim, rows, cols
    if _VOCAB.match(name):
        return vocab_real, cols, rows, cols
    if _VIT_QK_NORM.match(name):
        return None
    return rows, cols, rows, cols


def _fill_blockwise(name, param, drawn, seed, tp, rank, block_values):
    drawn_rows, drawn_cols, rows, cols = drawn
    # The global indices along the partitioned dim that this rank holds, in its order: the same
    # cut as _shard, applied to an index tensor.
    dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) and tp > 1 else None
    if dim is not None:
        along = rows if dim == 0 else cols
        index_shape = [1, 1]
        index_shape[dim] = along
        held = _shard(torch.arange(along).reshape(index_shape), param, tp, rank).flatten()
    generator = _generator(name, seed)
    unit = 16 // math.gcd(drawn_cols, 16)  # rows: every block but the last holds a multiple of 16 values
    step = max(unit, block_values // drawn_cols // unit * unit)
    start = 0
    while start < drawn_rows:
        stop = min(start + step, drawn_rows)
        if (drawn_rows - stop) * drawn_cols < 16:  # a short last block would be drawn differently
            stop = drawn_rows
        block = _scaled(name, torch.randn((stop - start, drawn_cols), generator=generator))
        if drawn_cols < cols:
            block = torch.cat([block, block.new_zeros(stop - start, cols - drawn_cols)], dim=1)
        block = block.to(param.dtype)
        if dim is None:
            param[start:stop] = block
        elif dim == 1:
            param[start:stop] = block[:, held]
        else:
            inside = (held >= start) & (held < stop)
            param[inside.nonzero().flatten()] = block[held[inside] - start]
        start = stop
    if drawn_rows < rows:  # padding rows (dummy heads, padded vocabulary) are zero
        if dim == 0:
            param[(held >= drawn_rows).nonzero().flatten()] = 0
        else:
            param[drawn_rows:] = 0
