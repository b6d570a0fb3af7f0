"""Named, exact, invertible transforms between Megatron and Hugging Face tensors.

Each transform answers four questions about one Megatron parameter:
- how tensor parallelism splits it (`tp_dim`: 0 column, 1 row, None replicated) and, through
  `merge` / `split`, how the LEGACY per-rank files hold it;
- how the merged ("global") Megatron tensor becomes the HF tensor(s): `to_hf` / `from_hf`.

The global layout is the one `torch_dist` stores (tensors there are already global), so a
torch_dist reader skips `merge` and a torch_dist writer skips `split`. The one transform where the
two formats differ is `GatedMLP`: a legacy rank holds [gate_r; up_r], the global tensor is
[gate; up].

No transform does arithmetic on values: only views, concatenation, slicing and zero padding, so a
round trip is bit-exact. Dropping padding (dummy ViT heads, padded vocab rows) checks that what is
dropped is exactly zero where a non-zero value would mean a wrong layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .megatron_args import padded_head_count, padded_vocab_size


class LayoutError(ValueError):
    """A tensor does not have the layout its transform expects (names the problem)."""


def _pad_to(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if tensor.shape[dim] >= size:
        return tensor.narrow(dim, 0, size)
    pad = list(tensor.shape)
    pad[dim] = size - tensor.shape[dim]
    return torch.cat([tensor, tensor.new_zeros(pad)], dim=dim)


def _require_zero(tensor: torch.Tensor, what: str) -> None:
    if tensor.device.type != "meta" and tensor.numel() and bool(tensor.any()):
        raise LayoutError(f"{what} is not zero (a dummy head must be exactly zero: wrong head layout?)")


# Megatron-LM's padding rules, under the names the transforms use; their one home is megatron_args.py.
megatron_vit_heads = padded_head_count
megatron_vocab_rows = padded_vocab_size


@dataclass(frozen=True)
class Transform:
    """Base: a column-parallel tensor that HF stores as it is."""

    tp_dim: int | None = 0
    name = "column"

    # -- tensor parallelism (legacy files) ----------------------------------------------------
    def merge(self, shards: list[torch.Tensor]) -> torch.Tensor:
        if self.tp_dim is None:
            first = shards[0]
            for rank, shard in enumerate(shards[1:], start=1):
                if shard.shape != first.shape or not torch.equal(shard, first):
                    raise LayoutError(f"replicated tensor differs between TP rank 0 and TP rank {rank}")
            return first
        if len({tuple(s.shape) for s in shards}) != 1:
            raise LayoutError(f"TP shards have different shapes: {[tuple(s.shape) for s in shards]}")
        return torch.cat(shards, dim=self.tp_dim) if len(shards) > 1 else shards[0]

    def split(self, whole: torch.Tensor, tp: int) -> list[torch.Tensor]:
        if self.tp_dim is None:
            return [whole] * tp
        if whole.shape[self.tp_dim] % tp:
            raise LayoutError(f"dim {self.tp_dim} of {tuple(whole.shape)} does not divide by TP={tp}")
        return [t.contiguous() for t in whole.chunk(tp, dim=self.tp_dim)]

    def dist_pieces(self, tp: int) -> int:
        """Equal chunks along `tp_dim` in which Megatron-Core's torch_dist format stores the global
        tensor (one per TP rank; a replicated tensor is stored once)."""
        return 1 if self.tp_dim is None else tp

    # -- Megatron global <-> HF ---------------------------------------------------------------
    def to_hf(self, whole: torch.Tensor) -> list[torch.Tensor]:
        return [whole]

    def from_hf(self, parts: list[torch.Tensor], tp: int) -> torch.Tensor:
        return parts[0]


@dataclass(frozen=True)
class Replicated(Transform):
    """The same tensor on every TP rank (norms, biases of row-parallel layers, ViT embeddings)."""

    tp_dim: int | None = None
    name = "replicated"


@dataclass(frozen=True)
class Column(Transform):
    tp_dim: int | None = 0
    name = "column"


@dataclass(frozen=True)
class Row(Transform):
    tp_dim: int | None = 1
    name = "row"


@dataclass(frozen=True)
class GQAQKV(Transform):
    """Fused QKV of grouped-query attention: Megatron rows are grouped per KV group,
    [q heads of group g | k_g | v_g] for g = 0..groups-1; HF has separate q, k, v.
    (A plain cat([q, k, v]) is the classic bug.) Works for the weight and the bias."""

    groups: int = 1
    heads_per_group: int = 1
    head_dim: int = 1
    name = "gqa_qkv"

    def to_hf(self, whole):
        rest = whole.shape[1:]
        grouped = whole.reshape(self.groups, (self.heads_per_group + 2) * self.head_dim, *rest)
        q, k, v = grouped.split([self.heads_per_group * self.head_dim, self.head_dim, self.head_dim], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]

    def from_hf(self, parts, tp):
        q, k, v = parts
        rest = q.shape[1:]
        q = q.reshape(self.groups, self.heads_per_group * self.head_dim, *rest)
        k = k.reshape(self.groups, self.head_dim, *rest)
        v = v.reshape(self.groups, self.head_dim, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


@dataclass(frozen=True)
class GatedMLP(Transform):
    """SwiGLU fc1. Global (torch_dist) layout [gate; up]; a LEGACY rank holds [gate_r; up_r], so
    each shard is halved before the gates and the ups are concatenated."""

    tp_dim: int | None = 0
    name = "gated_mlp"

    def merge(self, shards):
        if len({tuple(s.shape) for s in shards}) != 1 or shards[0].shape[0] % 2:
            raise LayoutError(f"SwiGLU fc1 shards must be equal and even: {[tuple(s.shape) for s in shards]}")
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)

    def dist_pieces(self, tp: int) -> int:
        """Megatron-Core saves each rank's gate and up rows as two chunks of [gate; up]."""
        return 2 * tp

    def split(self, whole, tp):
        if whole.shape[0] % (2 * tp):
            raise LayoutError(f"SwiGLU fc1 rows {whole.shape[0]} do not split into gate/up over TP={tp}")
        gate, up = whole.chunk(2, dim=0)
        return [torch.cat([g, u], dim=0) for g, u in zip(gate.chunk(tp), up.chunk(tp))]

    def to_hf(self, whole):
        return list(whole.chunk(2, dim=0))

    def from_hf(self, parts, tp):
        return torch.cat(parts, dim=0)


@dataclass(frozen=True)
class Vocab(Transform):
    """Embedding / output rows: Megatron pads the vocab to a multiple of divisible_by x TP; HF has
    `rows` rows. Slice to HF (the padding rows carry no token), or pad back with zeros."""

    rows: int = 0
    divisible_by: int = 128
    name = "vocab"

    def to_hf(self, whole):
        return [_pad_to(whole, 0, self.rows)]

    def from_hf(self, parts, tp):
        return _pad_to(parts[0], 0, megatron_vocab_rows(parts[0].shape[0], tp, self.divisible_by))


@dataclass(frozen=True)
class _PaddedHeads(Transform):
    real_heads: int = 1
    hf_heads: int = 1  # real + dummy heads in the HF layout (32 for InternViT-6B)
    head_dim: int = 1

    def _check_heads(self, heads: int) -> None:
        if heads < self.real_heads:
            raise LayoutError(f"{heads} ViT heads, fewer than the {self.real_heads} real ones")


@dataclass(frozen=True)
class ViTQKV(_PaddedHeads):
    """ViT fused QKV. Megatron interleaves per head, [q_h; k_h; v_h] for its H heads (H depends on
    the TP it was saved with); HF wants blocks [Q of all heads; K; V] with hf_heads heads. Heads
    past the real ones are zero padding on both sides."""

    name = "vit_qkv"

    def to_hf(self, whole):
        heads = whole.shape[0] // (3 * self.head_dim)
        self._check_heads(heads)
        per_head = whole.reshape(heads, 3, self.head_dim, -1)
        _require_zero(per_head[self.real_heads :], "ViT qkv dummy head rows")
        blocks = _pad_to(per_head[: self.real_heads], 0, self.hf_heads).permute(1, 0, 2, 3)
        return [blocks.reshape(3 * self.hf_heads * self.head_dim, -1)]

    def from_hf(self, parts, tp):
        blocks = parts[0].reshape(3, self.hf_heads, self.head_dim, -1)
        _require_zero(blocks[:, self.real_heads :], "ViT qkv dummy head rows")
        heads = megatron_vit_heads(self.real_heads, tp)
        per_head = _pad_to(blocks[:, : self.real_heads].permute(1, 0, 2, 3), 0, heads)
        return per_head.reshape(heads * 3 * self.head_dim, -1)


@dataclass(frozen=True)
class ViTProj(_PaddedHeads):
    """ViT output projection [C, heads*head_dim], row-parallel: the dummy heads' columns are zero."""

    tp_dim: int | None = 1
    name = "vit_proj"

    def to_hf(self, whole):
        per_head = whole.reshape(whole.shape[0], -1, self.head_dim)
        self._check_heads(per_head.shape[1])
        _require_zero(per_head[:, self.real_heads :], "ViT proj dummy head columns")
        return [_pad_to(per_head[:, : self.real_heads], 1, self.hf_heads).reshape(whole.shape[0], -1)]

    def from_hf(self, parts, tp):
        per_head = parts[0].reshape(parts[0].shape[0], self.hf_heads, self.head_dim)
        _require_zero(per_head[:, self.real_heads :], "ViT proj dummy head columns")
        heads = megatron_vit_heads(self.real_heads, tp)
        return _pad_to(per_head[:, : self.real_heads], 1, heads).reshape(per_head.shape[0], -1)


@dataclass(frozen=True)
class ViTQKNorm(_PaddedHeads):
    """QK-norm weight over all heads [heads*head_dim], column-parallel. The dummy entries multiply
    zeros, so they are carried where both sides have the head and zero-padded where they do not."""

    name = "vit_qk_norm"

    def to_hf(self, whole):
        self._check_heads(whole.shape[0] // self.head_dim)
        return [_pad_to(whole, 0, self.hf_heads * self.head_dim)]

    def from_hf(self, parts, tp):
        return _pad_to(parts[0], 0, megatron_vit_heads(self.real_heads, tp) * self.head_dim)


@dataclass(frozen=True)
class PositionEmbedding(Transform):
    """Megatron's nn.Embedding [positions, C] <-> HF's parameter [1, positions, C]."""

    tp_dim: int | None = None
    name = "position_embedding"

    def to_hf(self, whole):
        return [whole.unsqueeze(0)]

    def from_hf(self, parts, tp):
        return parts[0].squeeze(0)


@dataclass(frozen=True)
class ClassToken(Transform):
    """A ViT class token: Megatron's CLIPViTModel parameter [1, 1, C] <-> HF's class_embedding [C]."""

    tp_dim: int | None = None
    name = "class_token"

    def to_hf(self, whole):
        if whole.dim() != 3 or tuple(whole.shape[:2]) != (1, 1):
            raise LayoutError(f"a class token of shape {tuple(whole.shape)}, not [1, 1, C] (one class token)")
        return [whole.reshape(whole.shape[2])]

    def from_hf(self, parts, tp):
        return parts[0].reshape(1, 1, -1)


@dataclass(frozen=True)
class WithUnused(Transform):
    """A replicated Megatron tensor <-> its HF tensor, plus one HF tensor of the same shape that the
    HF class holds but never reads (CLIP's post_layernorm: LLaVA takes hidden states, not the pooled
    output), which Megatron does not have. It is written as `fill`; on the way back it must still be
    `fill` (a LayoutError otherwise: a value there would be lost)."""

    tp_dim: int | None = None
    fill: float = 0.0
    name = "with_unused"

    def to_hf(self, whole):
        return [whole, torch.full_like(whole, self.fill)]

    def from_hf(self, parts, tp):
        kept, unused = parts
        if unused.device.type != "meta" and not bool((unused == self.fill).all()):
            raise LayoutError(
                f"the tensor paired with it is not {self.fill} everywhere; "
                "the Megatron model has no place for it"
            )
        return kept
