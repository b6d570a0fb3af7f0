"""modeling/megatron/weights.fill_seeded_weights fills each rank's weights block by block (no
global tensor in memory: scripts/make_megatron_checkpoint.py at 72B in 24 GiB) with the values of
cutting the whole seeded global tensor (weights.global_tensor), bit for bit, for every kind of
parameter: replicated, column- and row-parallel, strided (SwiGLU fc1), padded ViT heads (rows and
columns) and padded vocabulary rows; checkpoint.save_rank's meta-device build is materialised with
Megatron's attributes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("megatron.core")
from megatron.core import parallel_state  # noqa: E402

from modeling.megatron import checkpoint, weights  # noqa: E402

VIT = SimpleNamespace(num_attention_heads=3, head_dim=4)  # 3 real heads, padded to 4 at TP=2
CONFIG = SimpleNamespace(vision_config=VIT)
VOCAB_REAL, VOCAB_PADDED, HIDDEN, FFN = 37, 48, 20, 24


def _param(shape, dim=None, stride=1):
    param = nn.Parameter(torch.zeros(shape), requires_grad=False)
    if dim is not None:
        param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, stride
    return param


def _module(**children):
    module = nn.Module()
    for name, child in children.items():
        if isinstance(child, nn.Parameter):
            module.register_parameter(name, child)
        else:
            module.add_module(name, child)
    return module


def _model(tp: int, dtype: torch.dtype) -> nn.Module:
    """A rank's parameters under Megatron's names (the attributes its parallel layers set)."""
    layer = _module(
        input_layernorm=_module(weight=_param((HIDDEN,))),
        mlp=_module(
            linear_fc1=_module(weight=_param((2 * FFN // tp, HIDDEN), dim=0, stride=2)),
            linear_fc2=_module(weight=_param((HIDDEN, FFN // tp), dim=1)),
        ),
    )
    layer.layer_number = 1
    heads = 4 // tp
    vit_layer = _module(
        self_attention=_module(
            linear_qkv=_module(weight=_param((heads * 3 * VIT.head_dim, HIDDEN), dim=0)),
            linear_proj=_module(weight=_param((HIDDEN, heads * VIT.head_dim), dim=1)),
            q_layernorm=_module(weight=_param((heads * VIT.head_dim,), dim=0)),
        )
    )
    model = _module(
        language_model=_module(
            embedding=_module(word_embeddings=_module(weight=_param((VOCAB_PADDED // tp, HIDDEN), dim=0))),
            decoder=_module(layers=nn.ModuleList([layer])),
            output_layer=_module(weight=_param((VOCAB_PADDED // tp, HIDDEN), dim=0)),
        ),
        vision_model=_module(decoder=_module(layers=nn.ModuleList([vit_layer]))),
    )
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tp", [1, 2])
def test_blockwise_fill_is_the_whole_tensor_draw_bit_for_bit(monkeypatch, tp, dtype):
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: tp)
    for rank in range(tp):
        monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda rank=rank: rank)
        blocks = _model(tp, dtype)
        # 48 values a block: every matrix is drawn in several blocks, some with a short last one
        weights.fill_seeded_weights(blocks, CONFIG, vocab_real=VOCAB_REAL, seed=5, block_values=48)
        for name, param in blocks.named_parameters():
            whole = weights.global_tensor(name, param, CONFIG, VOCAB_REAL, seed=5)
            expected = weights._shard(whole, param, tp, rank).to(dtype)
            assert torch.equal(param.view(-1), expected.view(-1)), (tp, rank, name)
            assert param.abs().sum() > 0, name


def test_a_meta_model_is_materialised_with_megatrons_attributes():
    with torch.device("meta"):
        model = _model(2, torch.float32)
    checkpoint.materialise(model)
    fc1 = model.language_model.decoder.layers[0].mlp.linear_fc1.weight
    assert fc1.device.type == "cpu" and fc1.shape == (FFN, HIDDEN)
    assert (fc1.tensor_model_parallel, fc1.partition_dim, fc1.partition_stride) == (True, 0, 2)
    assert all(not p.is_meta for p in model.parameters())
