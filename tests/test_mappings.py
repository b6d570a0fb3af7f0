"""Unit tests of mappings/: exact transforms, the NVLM_FACTS layout traps, and the NVLM-D table.

Expected layouts are built here independently (explicit loops and index arithmetic over
identifiable values), never by calling the module under test; each trap test also shows that the
naive approach gives a different answer. CPU only, no megatron-core, no subprocesses.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import reference_file

from mappings.nvlm_d import official_dtype, table_for
from mappings.transforms import (
    GQAQKV,
    Column,
    GatedMLP,
    LayoutError,
    PositionEmbedding,
    Replicated,
    Row,
    ViTProj,
    ViTQKNorm,
    ViTQKV,
    Vocab,
    megatron_vit_heads,
    megatron_vocab_rows,
)

MAPPINGS = Path(__file__).resolve().parents[1] / "mappings"


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-exact: same dtype, same shape, same values."""
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert tuple(a.shape) == tuple(b.shape), (tuple(a.shape), tuple(b.shape))
    assert torch.equal(a, b)


def same_list(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
    assert len(xs) == len(ys), (len(xs), len(ys))
    for x, y in zip(xs, ys):
        same(x, y)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return tuple(a.shape) != tuple(b.shape) or not torch.equal(a, b)


def ids(*shape: int, start: int = 0) -> torch.Tensor:
    """Distinct, exactly representable float32 values, so every row is identifiable."""
    n = 1
    for s in shape:
        n *= s
    return (torch.arange(n, dtype=torch.float32) + start).reshape(shape)


# ---------------------------------------------------------------------------------------------
# 1. Round trips of every transform, at TP 1, 2, 4 (and 8 where it is meaningful)
# ---------------------------------------------------------------------------------------------

# Small dimensions shared by the round-trip cases.
G, P, D, HID = 4, 2, 3, 5  # LLM GQA: KV groups, q heads per group, head dim, hidden
R, HF_H, HD = 5, 8, 4  # ViT: real heads, HF heads (real + dummy), head dim
C = R * HD  # ViT real width (20)
# Megatron-LM's padded ViT head count for 5 real heads, written out: ((5 - 1) // TP + 1) * TP.
VIT_HEADS = {1: 5, 2: 6, 4: 8, 8: 8}


def _rand(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype)


def _case(kind: str, tp: int, dtype: torch.dtype):
    """(transform, a valid Megatron global tensor, valid HF parts), drawn independently."""
    if kind == "column":
        return Column(), _rand((8, HID), dtype, 1), [_rand((8, HID), dtype, 2)]
    if kind == "row":
        return Row(), _rand((HID, 8), dtype, 1), [_rand((HID, 8), dtype, 2)]
    if kind == "replicated":
        return Replicated(), _rand((6,), dtype, 1), [_rand((6,), dtype, 2)]
    if kind in ("gqa_qkv_weight", "gqa_qkv_bias"):
        rest = (HID,) if kind.endswith("weight") else ()
        rows = G * (P + 2) * D
        parts = [_rand((G * P * D, *rest), dtype, 2), _rand((G * D, *rest), dtype, 3)]
        parts.append(_rand((G * D, *rest), dtype, 4))
        return GQAQKV(groups=G, heads_per_group=P, head_dim=D), _rand((rows, *rest), dtype, 1), parts
    if kind == "gated_mlp":
        return (
            GatedMLP(),
            _rand((2 * 8, HID), dtype, 1),
            [_rand((8, HID), dtype, 2), _rand((8, HID), dtype, 3)],
        )
    if kind == "vocab":  # 1000 HF rows; Megatron pads to 1024 at TP 1..8 (zero padding rows)
        whole = _rand((1024, HID), dtype, 1)
        whole[1000:] = 0
        return Vocab(rows=1000, divisible_by=128), whole, [_rand((1000, HID), dtype, 2)]
    if kind == "vocab48":  # 1024 HF rows, divisible_by 48: 1056 rows at TP 1/2, 1152 at TP 4/8
        padded = {1: 1056, 2: 1056, 4: 1152, 8: 1152}[tp]
        whole = _rand((padded, HID), dtype, 1)
        whole[1024:] = 0
        return Vocab(rows=1024, divisible_by=48), whole, [_rand((1024, HID), dtype, 2)]
    heads = dict(real_heads=R, hf_heads=HF_H, head_dim=HD)
    H = VIT_HEADS[tp]
    if kind == "vit_qkv":
        whole = _rand((H, 3, HD, C), dtype, 1)
        whole[R:] = 0
        hf = _rand((3, HF_H, HD, C), dtype, 2)
        hf[:, R:] = 0
        return ViTQKV(**heads), whole.reshape(-1, C), [hf.reshape(-1, C)]
    if kind == "vit_proj":
        whole = _rand((C, H, HD), dtype, 1)
        whole[:, R:] = 0
        hf = _rand((C, HF_H, HD), dtype, 2)
        hf[:, R:] = 0
        return ViTProj(**heads), whole.reshape(C, -1), [hf.reshape(C, -1)]
    if kind == "vit_qk_norm":
        whole = _rand((H * HD,), dtype, 1)
        whole[R * HD :] = 0
        hf = _rand((HF_H * HD,), dtype, 2)
        hf[R * HD :] = 0
        return ViTQKNorm(**heads), whole, [hf]
    if kind == "position_embedding":
        return PositionEmbedding(), _rand((9, HID), dtype, 1), [_rand((1, 9, HID), dtype, 2)]
    raise AssertionError(kind)


KINDS = [
    "column",
    "row",
    "replicated",
    "gqa_qkv_weight",
    "gqa_qkv_bias",
    "gated_mlp",
    "vocab",
    "vocab48",
    "vit_qkv",
    "vit_proj",
    "vit_qk_norm",
    "position_embedding",
]
# TP 8 splits 4 KV groups across ranks, which Megatron refuses: not meaningful for GQA.
CASES = [(kind, tp) for kind in KINDS for tp in (1, 2, 4, 8) if not (kind.startswith("gqa") and tp == 8)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("kind", "tp"), CASES)
def test_megatron_to_hf_and_back_is_exact(kind, tp, dtype):
    transform, whole, _ = _case(kind, tp, dtype)
    hf = transform.to_hf(whole)
    assert all(t.dtype == dtype for t in hf)
    same(transform.from_hf(hf, tp), whole)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("kind", "tp"), CASES)
def test_hf_to_megatron_and_back_is_exact(kind, tp, dtype):
    transform, _, parts = _case(kind, tp, dtype)
    whole = transform.from_hf(parts, tp)
    assert whole.dtype == dtype
    same_list(transform.to_hf(whole), parts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("kind", "tp"), CASES)
def test_split_then_merge_is_identity(kind, tp, dtype):
    transform, whole, _ = _case(kind, tp, dtype)
    shards = transform.split(whole, tp)
    assert len(shards) == tp
    assert len({tuple(s.shape) for s in shards}) == 1
    if transform.tp_dim is not None:
        assert shards[0].shape[transform.tp_dim] * tp == whole.shape[transform.tp_dim]
    same(transform.merge(shards), whole)
    same_list(transform.split(transform.merge(shards), tp), shards)


def test_megatron_vit_heads_and_vocab_rows_formulas():
    for tp, heads in VIT_HEADS.items():
        assert megatron_vit_heads(R, tp) == heads
    assert [megatron_vit_heads(25, tp) for tp in (1, 2, 4, 8)] == [25, 26, 28, 32]  # NVLM_FACTS 3
    for rows, tp, divisible_by in [(152064, 8, 128), (152064, 1, 128), (1000, 1, 48), (1000, 2, 48)]:
        padded = divisible_by * tp
        while padded < rows:  # the smallest multiple of divisible_by * TP that holds every row
            padded += divisible_by * tp
        assert megatron_vocab_rows(rows, tp, divisible_by) == padded
    assert megatron_vocab_rows(152064, 8) == 152576


# ---------------------------------------------------------------------------------------------
# 2. The NVLM_FACTS traps
# ---------------------------------------------------------------------------------------------

# -- LLM GQA qkv ---------------------------------------------------------------------------------


def _gqa_hf(bias: bool):
    rest = () if bias else (HID,)
    q = ids(G * P * D, *rest)
    k = ids(G * D, *rest, start=1000)
    v = ids(G * D, *rest, start=2000)
    return q, k, v


def _gqa_megatron(q, k, v, groups=range(G)):
    """Megatron rows, per KV group g: [q heads of group g | k_g | v_g]."""
    rows = []
    for g in groups:
        for j in range(P):
            for d in range(D):
                rows.append(q[(g * P + j) * D + d])
        for d in range(D):
            rows.append(k[g * D + d])
        for d in range(D):
            rows.append(v[g * D + d])
    return torch.stack(rows)


@pytest.mark.parametrize("bias", [False, True], ids=["weight", "bias"])
def test_gqa_qkv_rows_are_grouped_per_kv_group(bias):
    q, k, v = _gqa_hf(bias)
    megatron = _gqa_megatron(q, k, v)
    transform = GQAQKV(groups=G, heads_per_group=P, head_dim=D)

    same_list(transform.to_hf(megatron), [q, k, v])
    for tp in (1, 2, 4):
        same(transform.from_hf([q, k, v], tp), megatron)

    # The classic bug: a plain cat([q, k, v]) (and its inverse, a plain split) is another layout.
    assert differs(torch.cat([q, k, v]), megatron)
    naive_q, naive_k, naive_v = megatron.split([G * P * D, G * D, G * D])
    assert differs(naive_q, q) and differs(naive_k, k) and differs(naive_v, v)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True], ids=["weight", "bias"])
def test_gqa_qkv_tp_shards_hold_whole_groups(tp, bias):
    q, k, v = _gqa_hf(bias)
    transform = GQAQKV(groups=G, heads_per_group=P, head_dim=D)
    per_rank = G // tp
    expected = [_gqa_megatron(q, k, v, range(r * per_rank, (r + 1) * per_rank)) for r in range(tp)]
    shards = transform.split(_gqa_megatron(q, k, v), tp)
    same_list(shards, expected)
    same_list(transform.to_hf(transform.merge(expected)), [q, k, v])


# -- SwiGLU fc1 -----------------------------------------------------------------------------------

FFN = 8


def _swiglu():
    return ids(FFN, HID), ids(FFN, HID, start=1000)


def _legacy_fc1_shards(gate, up, tp):
    """Legacy format: rank r holds [gate_r; up_r]."""
    n = FFN // tp
    shards = []
    for r in range(tp):
        rows = [gate[r * n + i] for i in range(n)] + [up[r * n + i] for i in range(n)]
        shards.append(torch.stack(rows))
    return shards


def _global_fc1(gate, up):
    """torch_dist's global tensor: [gate; up]."""
    return torch.stack([gate[i] for i in range(FFN)] + [up[i] for i in range(FFN)])


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_swiglu_legacy_shards_merge_to_gate_and_up(tp):
    gate, up = _swiglu()
    legacy = _legacy_fc1_shards(gate, up, tp)
    transform = GatedMLP()

    merged = transform.merge(legacy)
    same(merged, _global_fc1(gate, up))
    same_list(transform.to_hf(merged), [gate, up])
    same_list(transform.split(_global_fc1(gate, up), tp), legacy)  # what a legacy writer stores
    same(transform.from_hf([gate, up], tp), _global_fc1(gate, up))

    if tp > 1:  # naive: concatenate the shards, then halve -> gate and up scrambled
        naive_gate, naive_up = torch.cat(legacy).chunk(2)
        assert differs(naive_gate, gate) and differs(naive_up, up)


@pytest.mark.parametrize("tp", [2, 4])
def test_swiglu_torch_dist_global_is_already_gate_then_up(tp):
    gate, up = _swiglu()
    global_ = _global_fc1(gate, up)
    same_list(GatedMLP().to_hf(global_), [gate, up])  # torch_dist: no merge step
    # Treating the two formats alike scrambles the MLP: the global tensor's plain TP chunks are not
    # legacy shards, and halving-per-shard them is wrong.
    scrambled = GatedMLP().merge(Column().split(global_, tp))
    assert differs(scrambled, global_)
    assert differs(GatedMLP().to_hf(scrambled)[0], gate)


# -- ViT qkv ---------------------------------------------------------------------------------------


def _vit_sources():
    """Q, K, V of the 5 real heads, [R * HD, C] each, every value distinct."""
    return ids(R * HD, C), ids(R * HD, C, start=10000), ids(R * HD, C, start=20000)


def _vit_qkv_megatron(tp, heads_range=None):
    """Megatron interleaves per head [q_h; k_h; v_h]; heads past the real ones are zero."""
    q, k, v = _vit_sources()
    rows = []
    for h in heads_range if heads_range is not None else range(VIT_HEADS[tp]):
        for src in (q, k, v):
            for d in range(HD):
                rows.append(src[h * HD + d] if h < R else torch.zeros(C))
    return torch.stack(rows)


def _vit_qkv_hf():
    """HF blocks [Q of all 8 heads; K; V], dummy heads (5..7) zero."""
    rows = []
    for src in _vit_sources():
        for h in range(HF_H):
            for d in range(HD):
                rows.append(src[h * HD + d] if h < R else torch.zeros(C))
    return torch.stack(rows)


VIT = dict(real_heads=R, hf_heads=HF_H, head_dim=HD)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_vit_qkv_per_head_interleave_to_hf_blocks(tp):
    megatron, hf = _vit_qkv_megatron(tp), _vit_qkv_hf()
    assert megatron.shape == (VIT_HEADS[tp] * 3 * HD, C)
    transform = ViTQKV(**VIT)
    same_list(transform.to_hf(megatron), [hf])  # the same HF tensor whatever the TP
    same(transform.from_hf([hf], tp), megatron)

    # Naive: no permute (pad the Megatron rows to the HF size and call it HF).
    pad = torch.zeros(3 * HF_H * HD - megatron.shape[0], C)
    assert differs(torch.cat([megatron, pad]), hf)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_vit_qkv_tp_shards_hold_whole_heads(tp):
    heads = VIT_HEADS[tp]
    n = heads // tp
    expected = [_vit_qkv_megatron(tp, range(r * n, (r + 1) * n)) for r in range(tp)]
    transform = ViTQKV(**VIT)
    same_list(transform.split(_vit_qkv_megatron(tp), tp), expected)
    same_list(transform.to_hf(transform.merge(expected)), [_vit_qkv_hf()])


def test_vit_qkv_padding_belongs_to_the_saving_tp():
    transform, hf = ViTQKV(**VIT), _vit_qkv_hf()
    tp2 = _vit_qkv_megatron(2)  # 6 heads
    # Treating a TP=2 tensor as if it had 8 heads: a view of the wrong shape, garbage.
    as_if_8 = tp2.reshape(HF_H, 3, HD, -1).permute(1, 0, 2, 3).reshape(3 * HF_H * HD, -1)
    assert differs(as_if_8, hf)
    # Handing the TP=2 Megatron tensor to the HF side: refused (its "dummy heads" are not zero).
    with pytest.raises(LayoutError):
        transform.from_hf([tp2], 2)
    # Writing for one TP is not writing for another.
    for a, b in [(1, 2), (2, 4), (1, 4)]:
        assert differs(transform.from_hf([hf], a), _vit_qkv_megatron(b))
    # Dropping the dummy heads wrong: the first 5 heads' worth of HF rows is not the real heads.
    wrong_drop = hf[: R * 3 * HD].reshape(R, 3, HD, C).reshape(-1, C)
    assert differs(wrong_drop, _vit_qkv_megatron(1))


@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("which", [0, 1, 2], ids=["q", "k", "v"])
def test_vit_qkv_nonzero_dummy_head_raises_megatron_to_hf(tp, which):
    megatron = _vit_qkv_megatron(tp).clone()
    last = VIT_HEADS[tp] - 1  # a dummy head at TP 2/4/8
    megatron[(last * 3 + which) * HD + 1, 3] = 1.0
    with pytest.raises(LayoutError):
        ViTQKV(**VIT).to_hf(megatron)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("which", [0, 1, 2], ids=["q", "k", "v"])
def test_vit_qkv_nonzero_dummy_head_raises_hf_to_megatron(tp, which):
    hf = _vit_qkv_hf().clone()
    hf[(which * HF_H + 6) * HD + 2, 0] = -1.0  # head 6 is a dummy head
    with pytest.raises(LayoutError):
        ViTQKV(**VIT).from_hf([hf], tp)


# -- ViT proj and QK-norm ---------------------------------------------------------------------------


def _vit_proj(heads, heads_range=None):
    """[C, heads * HD]: column h * HD + d holds real head h's column, zero for dummy heads."""
    source = ids(C, R * HD)
    columns = []
    for h in heads_range if heads_range is not None else range(heads):
        for d in range(HD):
            columns.append(source[:, h * HD + d] if h < R else torch.zeros(C))
    return torch.stack(columns, dim=1)


def _vit_qk_norm(heads, heads_range=None):
    source = ids(R * HD, start=1)
    entries = []
    for h in heads_range if heads_range is not None else range(heads):
        for d in range(HD):
            entries.append(source[h * HD + d] if h < R else torch.tensor(0.0))
    return torch.stack(entries)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_vit_proj_dummy_columns_across_tp(tp):
    transform = ViTProj(**VIT)
    megatron, hf = _vit_proj(VIT_HEADS[tp]), _vit_proj(HF_H)
    same_list(transform.to_hf(megatron), [hf])
    same(transform.from_hf([hf], tp), megatron)
    n = VIT_HEADS[tp] // tp  # row-parallel: rank r holds the columns of heads r*n .. r*n+n-1
    expected = [_vit_proj(0, range(r * n, (r + 1) * n)) for r in range(tp)]
    same_list(transform.split(megatron, tp), expected)
    if VIT_HEADS[tp] != HF_H:
        # Naive: pad the flat weight to the HF element count -> every row after the first shifts.
        flat = torch.cat([megatron.flatten(), torch.zeros(hf.numel() - megatron.numel())])
        assert differs(flat.reshape(hf.shape), hf)
        # Naive: pad rows (dim 0) instead of columns.
        rows = torch.zeros(hf.shape[1] - megatron.shape[1], megatron.shape[1])
        assert differs(torch.cat([megatron, rows]), hf)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_vit_proj_nonzero_dummy_column_raises(tp):
    transform = ViTProj(**VIT)
    hf = _vit_proj(HF_H).clone()
    hf[7, 7 * HD + 1] = 2.0
    with pytest.raises(LayoutError):
        transform.from_hf([hf], tp)
    if VIT_HEADS[tp] > R:
        megatron = _vit_proj(VIT_HEADS[tp]).clone()
        megatron[0, R * HD] = 2.0
        with pytest.raises(LayoutError):
            transform.to_hf(megatron)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_vit_qk_norm_padding_across_tp(tp):
    transform = ViTQKNorm(**VIT)
    megatron, hf = _vit_qk_norm(VIT_HEADS[tp]), _vit_qk_norm(HF_H)
    same_list(transform.to_hf(megatron), [hf])
    same(transform.from_hf([hf], tp), megatron)
    n = VIT_HEADS[tp] // tp  # column-parallel: rank r holds heads r*n .. r*n+n-1
    expected = [_vit_qk_norm(0, range(r * n, (r + 1) * n)) for r in range(tp)]
    same_list(transform.split(megatron, tp), expected)
    # Naive: TP-split the HF weight as it is -> per-rank widths and contents are wrong.
    naive = list(hf.chunk(tp))
    if VIT_HEADS[tp] != HF_H:
        assert any(differs(a, b) for a, b in zip(naive, expected))


def test_vit_qk_norm_megatron_dummy_entries_are_carried():
    """A norm weight's dummy entries multiply zeros: carried as they are (Megatron inits them to 1)."""
    transform = ViTQKNorm(**VIT)
    for tp in (1, 2, 4, 8):
        ones = torch.ones(VIT_HEADS[tp] * HD, dtype=torch.bfloat16)
        (hf,) = transform.to_hf(ones)
        expected = torch.cat([ones, torch.zeros(HF_H * HD - ones.numel(), dtype=torch.bfloat16)])
        same(hf, expected)
        same(transform.from_hf([hf], tp), ones)


# -- Vocab padding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_vocab_rows_at_divisible_by_128(tp):
    transform = Vocab(rows=1024, divisible_by=128)
    hf = ids(1024, HID)
    same(transform.from_hf([hf], tp), hf)  # 1024 is a multiple of 128 * TP for TP <= 8
    same_list(transform.to_hf(hf), [hf])


def test_vocab_fewer_megatron_rows_are_padded_back_with_zeros():
    transform = Vocab(rows=1024, divisible_by=48)
    megatron = ids(1008, HID)  # a 1000-entry tokenizer padded to a multiple of 48 at TP=1
    (hf,) = transform.to_hf(megatron)
    expected = torch.stack([megatron[i] if i < 1008 else torch.zeros(HID) for i in range(1024)])
    same(hf, expected)
    assert differs(megatron, expected)  # naive: take the Megatron rows as they are


def test_vocab_more_megatron_rows_are_sliced():
    transform = Vocab(rows=1024, divisible_by=48)
    megatron = ids(1056, HID)  # the same tokenizer at TP=2 (multiple of 96)
    (hf,) = transform.to_hf(megatron)
    same(hf, torch.stack([megatron[i] for i in range(1024)]))


@pytest.mark.parametrize(("tp", "padded"), [(1, 1056), (2, 1056), (4, 1152), (8, 1152)])
def test_vocab_from_hf_pads_to_megatron_rows(tp, padded):
    transform = Vocab(rows=1024, divisible_by=48)
    hf = ids(1024, HID)
    megatron = transform.from_hf([hf], tp)
    assert padded % (48 * tp) == 0 and padded - 48 * tp < 1024 <= padded
    expected = torch.stack([hf[i] if i < 1024 else torch.zeros(HID) for i in range(padded)])
    same(megatron, expected)
    assert megatron.shape[0] == megatron_vocab_rows(1024, tp, 48)
    same_list(transform.to_hf(megatron), [hf])


# -- merge checks -------------------------------------------------------------------------------------


def test_replicated_merge_refuses_differing_ranks():
    a = ids(6)
    b = a.clone()
    b[3] += 1
    same(Replicated().merge([a, a.clone(), a.clone()]), a)
    with pytest.raises(LayoutError):
        Replicated().merge([a, a.clone(), b])
    with pytest.raises(LayoutError):
        Replicated().merge([a, ids(7)])


@pytest.mark.parametrize("transform", [Column(), Row()], ids=["column", "row"])
def test_sharded_merge_refuses_shards_of_different_shapes(transform):
    with pytest.raises(LayoutError):
        transform.merge([ids(4, 4), ids(4, 6) if transform.tp_dim == 1 else ids(6, 4)])


def test_split_refuses_a_tp_that_does_not_divide():
    with pytest.raises(LayoutError):
        Column().split(ids(6, HID), 4)
    with pytest.raises(LayoutError):
        Row().split(ids(HID, 6), 4)


def test_gated_mlp_split_refuses_a_tp_that_does_not_divide():
    # gate has 6 rows; 6.chunk(4) gives 3 chunks, so a TP=4 split silently returns 3 shards.
    with pytest.raises(LayoutError):
        GatedMLP().split(ids(12, HID), 4)


def test_gated_mlp_merge_refuses_shards_of_different_shapes():
    with pytest.raises(LayoutError):
        GatedMLP().merge([ids(4, HID), ids(6, HID)])


# ---------------------------------------------------------------------------------------------
# 3. The NVLM-D table
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_table():
    from modeling import get_config

    return table_for(get_config("tiny"))


@pytest.fixture(scope="module")
def tiny_names():
    from modeling import NVLM_D_Model, get_config

    with torch.device("meta"):
        model = NVLM_D_Model(get_config("tiny"))
    return list(model.state_dict())


def _produced(table, names):
    """Every HF name the table's rows produce for the layers present in `names`, per rule."""
    produced = Counter()
    per_rule = []
    for rule in table.rules:
        layers = sorted({layer for name in names if (layer := rule.match_hf(name)) is not None})
        made = [hf for layer in layers for hf in rule.hf_names(layer)]
        per_rule.append(made)
        produced.update(made)
    return produced, per_rule


def test_table_produces_every_tiny_hf_name_exactly_once(tiny_table, tiny_names):
    produced, per_rule = _produced(tiny_table, tiny_names)
    assert all(per_rule), [r.hf for r, made in zip(tiny_table.rules, per_rule) if not made]
    twice = {name: n for name, n in produced.items() if n != 1}
    assert not twice, twice
    assert not set(tiny_names) - set(produced), sorted(set(tiny_names) - set(produced))
    assert not set(produced) - set(tiny_names), sorted(set(produced) - set(tiny_names))


def test_table_covers_the_published_72b_names():
    from modeling import get_config

    rows = [line.split("\t") for line in reference_file("tensors.tsv").read_text().splitlines()[1:]]
    names = [r[0] for r in rows]
    produced, per_rule = _produced(table_for(get_config("nvlm-d-72b")), names)
    assert all(per_rule)
    assert produced == Counter(names)


def test_table_megatron_names_match_exactly_one_row(tiny_table):
    for rule in tiny_table.rules:
        layers = ["0", "1", "17"] if "{i}" in rule.megatron[0] else [""]
        for layer in layers:
            for spelling in rule.megatron:
                name = spelling.format(i=layer)
                hits = [r for r in tiny_table.rules if r.match(name) is not None]
                assert hits == [rule], name
                assert rule.match(name) == layer
            assert rule.megatron_name(layer) == rule.megatron[0].format(i=layer)


@pytest.mark.parametrize(
    ("local", "te", "hf"),
    [
        (
            "language_model.decoder.layers.0.input_layernorm.weight",
            "language_model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
            "language_model.model.layers.0.input_layernorm.weight",
        ),
        (
            "language_model.decoder.layers.1.pre_mlp_layernorm.weight",
            "language_model.decoder.layers.1.mlp.linear_fc1.layer_norm_weight",
            "language_model.model.layers.1.post_attention_layernorm.weight",
        ),
    ],
)
def test_local_and_transformer_engine_norm_names_share_a_row(tiny_table, local, te, hf):
    local_hits = [r for r in tiny_table.rules if r.match(local) is not None]
    te_hits = [r for r in tiny_table.rules if r.match(te) is not None]
    assert len(local_hits) == 1 and local_hits == te_hits
    rule = local_hits[0]
    layer = rule.match(local)
    assert layer == rule.match(te) == local.split(".")[3]
    assert rule.hf_names(layer) == [hf]
    assert rule.megatron_name(layer) == local  # the local spelling is canonical (written)
    assert isinstance(rule.transform, Replicated)


def test_vit_norms_have_one_spelling(tiny_table):
    hits = [
        r
        for r in tiny_table.rules
        if r.match("vision_model.decoder.layers.0.input_layernorm.weight") is not None
    ]
    assert len(hits) == 1 and hits[0].hf_names("0") == ["vision_model.encoder.layers.0.norm1.weight"]
    te = "vision_model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"
    assert not [r for r in tiny_table.rules if r.match(te) is not None]


@pytest.mark.parametrize(
    "name",
    [
        "language_model.decoder.layers.0.self_attention.linear_qkv._extra_state",
        "vision_model.decoder.layers.1.mlp.linear_fc1._extra_state",
        "x._extra_state/shard_0_2",
        "language_model.decoder.layers.self_attention.linear_proj._extra_state/shard_3_8",
    ],
)
def test_extra_state_is_ignored(tiny_table, name):
    assert tiny_table.is_ignored(name)
    assert not [r for r in tiny_table.rules if r.match(name) is not None]


@pytest.mark.parametrize(
    "name",
    [
        "language_model.decoder.layers.0.self_attention.linear_qkv.weight",
        "language_model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
        "x._extra_state_foo",
        "x_extra_state",
    ],
)
def test_real_tensors_are_not_ignored(tiny_table, name):
    assert not tiny_table.is_ignored(name)


def test_official_dtype_is_float32_exactly_where_the_release_has_it(tiny_names):
    fp32 = set()
    for i in range(2):
        for p in "qkv":
            for kind in ("weight", "bias"):
                fp32.add(f"language_model.model.layers.{i}.self_attn.{p}_proj.{kind}")
        for tail in ("qkv.weight", "proj.weight", "q_norm.weight", "k_norm.weight"):
            fp32.add(f"vision_model.encoder.layers.{i}.attn.{tail}")
    assert fp32 <= set(tiny_names)
    for name in tiny_names:
        assert official_dtype(name) == (torch.float32 if name in fp32 else torch.bfloat16), name
    # Near misses stay bfloat16.
    for name in (
        "language_model.model.layers.0.self_attn.o_proj.weight",
        "vision_model.encoder.layers.0.attn.proj.bias",
        "language_model.model.layers.0.self_attn.q_proj.weight.extra",
    ):
        assert official_dtype(name) == torch.bfloat16


def test_official_dtype_matches_the_published_release():
    rows = [line.split("\t") for line in reference_file("tensors.tsv").read_text().splitlines()[1:]]
    published = {"BF16": torch.bfloat16, "F32": torch.float32}
    wrong = [(name, dtype) for name, _, dtype, _ in rows if official_dtype(name) != published[dtype]]
    assert not wrong, wrong[:5]
    assert len(rows) == 1556


_FORBIDDEN_IMPORT = re.compile(r"\b(import|from)\s+(modeling|converter)\b")


@pytest.mark.parametrize("path", sorted(MAPPINGS.glob("*.py")), ids=lambda p: p.name)
def test_mappings_import_neither_modeling_nor_converter(path):
    source = path.read_text()
    assert "import modeling" not in source and "from modeling" not in source
    assert not _FORBIDDEN_IMPORT.search(source)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            modules = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        else:
            continue
        for module in modules:
            assert module.split(".")[0] not in ("modeling", "converter"), (path.name, module)
