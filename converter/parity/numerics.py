"""Megatron-Core's rounding order, applied to our Hugging Face class one source at a time.

In float32 the two codebases compute the same function (docs/PARITY.md). In bfloat16 they round at
different places, and on seeded random weights (nearly flat logits) that moves a few percent of the
argmaxes. This module names each place where Megatron-Core's local (non-Transformer-Engine) spec
rounds differently from our class, and can make our class round there as Megatron does, on a
loaded model, inside a `with` block that puts every module back as it was:

    attention     Megatron's DotProductAttention: scores = baddbmm(q, k^T, alpha=1/sqrt(d)) rounded
                  to bf16 once, softmax in float32 rounded to bf16, then probs @ v, in its own
                  [seq, batch, heads, dim] layout (LLM and ViT). Ours: SDPA (fused, online softmax).
    llm_norm      torch.nn.RMSNorm (Megatron's WrappedTorchNorm): x * rsqrt(mean(x^2) + eps) * w
                  rounded once. transformers' Qwen2RMSNorm rounds before the weight, then again.
    vit_norm      Megatron's InternViT RMSNorm and QK-norm statistics: x.float().pow(2).mean / sum
                  (ours: torch's fused rms_norm and vector_norm, the same formula summed in another
                  order).
    bias_add      Megatron's linear layers compute matmul(x, W^T), round, then add the bias and round
                  again (LLM q/k/v; ViT proj, fc1, fc2). nn.Linear adds the bias inside the GEMM.
    gemm_shapes   Megatron's GEMM shapes, per tensor-parallel rank: one QKV GEMM, one gate+up GEMM
                  (linear_fc1), and the output layer over Megatron's padded vocab rows. Separate
                  GEMMs of other widths may pick other kernels and summation orders.
    tp_reductions At TP > 1, Megatron's partial sums: each rank's row-parallel GEMM (LLM o_proj and
                  down_proj, ViT proj and fc2, projector fc2) over its slice of the input features
                  is rounded, then the partials are summed in the activation dtype (the all-reduce;
                  exact for TP=2, where a ring sum has one order), the bias after; the ViT QK-norm
                  sums of squares are taken per rank and then added. Nothing at TP=1.

It is a measuring instrument for the parity suite (scripts/parity_ablation.py); the shipped class
keeps transformers' Qwen2 and its own kernels. With all six sources, bf16 logits and every layer
output are bit-identical to Megatron's at TP=1 and TP=2 (CPU, and H200s at full width:
docs/PARITY.md). The patches assume what the parity cases are: one unpadded sequence per call
(the causal mask is rebuilt from the shapes).
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

SOURCES = ("attention", "llm_norm", "vit_norm", "bias_add", "gemm_shapes", "tp_reductions")
MEGATRON_ATTENTION = "megatron_unfused"


def megatron_core_attention(query, key, value, causal: bool) -> torch.Tensor:
    """Megatron-Core's unfused DotProductAttention, step by step, on [s, b, heads, dim] tensors
    (key/value may have fewer heads: GQA groups, repeated as Megatron repeats them).
    Returns the context [s, b, heads * dim]."""
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    sq, b, heads, dim = query.shape
    groups = key.shape[2]
    if heads // groups > 1:
        key = key.repeat_interleave(heads // groups, dim=2)
        value = value.repeat_interleave(heads // groups, dim=2)
    sk = key.shape[0]
    q = query.reshape(sq, b * heads, dim)
    k = key.view(sk, b * heads, dim)
    buffer = torch.empty((b * heads, sq, sk), dtype=query.dtype, device=query.device)
    # The scale rides in the GEMM epilogue (alpha): one rounding of the scaled scores.
    scores = torch.baddbmm(
        buffer, q.transpose(0, 1), k.transpose(0, 1).transpose(1, 2), beta=0.0, alpha=1.0 / math.sqrt(dim)
    )
    scores = scores.view(b, heads, sq, sk).float()  # attention_softmax_in_fp32
    if causal:
        future = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).triu(1 + sk - sq)
        scores = scores.masked_fill(future, -10000.0)  # Megatron's attention_mask_func
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    context = torch.bmm(probs.view(b * heads, sq, sk), value.view(sk, b * heads, dim).transpose(0, 1))
    context = context.view(b, heads, sq, dim).permute(2, 0, 1, 3).contiguous()
    return context.view(sq, b, heads * dim)


def _llm_attention(module, query, key, value, attention_mask, **_kwargs):
    """transformers' attention interface: [b, heads, s, d] in, [b, s, heads, d] out. The causal
    mask is rebuilt from the shapes (one unpadded sequence, as the parity cases are)."""
    b, heads, s, dim = query.shape
    context = megatron_core_attention(
        query.permute(2, 0, 1, 3), key.permute(2, 0, 1, 3), value.permute(2, 0, 1, 3), causal=True
    )
    return context.view(s, b, heads, dim).transpose(0, 1), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(MEGATRON_ATTENTION, _llm_attention)
    AttentionMaskInterface.register(MEGATRON_ATTENTION, sdpa_mask)  # unused: the mask is rebuilt


def _vit_attention_forward(self, hidden_states):
    """InternAttention.forward with Megatron's core attention (its [s, b, ...] layout)."""
    B, N, _ = hidden_states.shape
    q, k, v = self.qkv(hidden_states).split(self.padded_dim, dim=-1)
    if self.qk_normalization:
        q, k = self._qk_norm(q, self.q_norm), self._qk_norm(k, self.k_norm)
    q, k, v = (t.view(B, N, self.num_heads, self.head_dim).transpose(0, 1) for t in (q, k, v))
    context = megatron_core_attention(q, k, v, causal=False)  # [N, B, H*D]
    return self.proj(context.transpose(0, 1))


def _torch_rms_norm_forward(self, hidden_states):
    """torch.nn.RMSNorm's formula (what Megatron's WrappedTorchNorm runs): one rounding at the end."""
    return F.rms_norm(hidden_states, hidden_states.shape[-1:], self.weight, self.variance_epsilon)


def _megatron_vit_norm_forward(self, hidden_states, variance=None):
    """modeling/megatron/internvit.py's InternViTRMSNorm, plain norm or with a given variance."""
    if variance is None:
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
    return (hidden_states.float() * torch.rsqrt(variance + self.variance_epsilon)).type_as(
        hidden_states
    ) * self.weight


def _megatron_qk_norm(bounds: list[tuple[int, int]]):
    """QK-norm statistics as Megatron sums them: x.float().pow(2).sum over each rank's real
    channels (`bounds`), the ranks' sums then added (the float32 all-reduce)."""

    def qk_norm(self, x, norm):
        sum_sq = None
        for start, stop in bounds:
            part = x[..., start:stop].float().pow(2).sum(-1, keepdim=True)
            sum_sq = part if sum_sq is None else sum_sq + part
        return norm(x, variance=sum_sq / self.embed_dim)

    return qk_norm


def _row_parallel_forward(linear: nn.Linear, bounds: list[tuple[int, int]]):
    """RowParallelLinear over len(bounds) ranks: each rank's GEMM over its input features, rounded;
    the partials summed in order (the all-reduce); then the bias."""
    weights = [linear.weight[:, start:stop].contiguous() for start, stop in bounds]

    def forward(self, x):
        out = None
        for (start, stop), weight in zip(bounds, weights):
            part = torch.matmul(x[..., start:stop].contiguous(), weight.t())
            out = part if out is None else out + part
        return out if self.bias is None else out + self.bias

    return forward


def _even(width: int, tp: int) -> list[tuple[int, int]]:
    step = width // tp
    return [(r * step, (r + 1) * step) for r in range(tp)]


def _gemm_then_bias(x, weight, bias):
    """matmul(x, W^T), rounded, then + bias (Megatron's linear layers)."""
    out = torch.matmul(x, weight.t())
    return out if bias is None else out + bias


def _bias_after_gemm_forward(self, x):
    return _gemm_then_bias(x, self.weight, self.bias)


class _FusedGemm:
    """Per tensor-parallel rank, one GEMM over that rank's rows of every part (Megatron's fused
    linear_qkv / linear_fc1 on each rank). The parts are called in order on the same input: the
    first call computes all outputs, the next ones return their share."""

    def __init__(self, parts: list[nn.Linear], bias_after: bool, tp: int):
        chunks = [
            list(zip(p.weight.chunk(tp), p.bias.chunk(tp) if p.bias is not None else [None] * tp))
            for p in parts
        ]
        self.ranks = []  # per rank: (weight, bias) over the rows of every part
        for r in range(tp):
            weight = torch.cat([c[r][0] for c in chunks])
            bias = None if chunks[0][r][1] is None else torch.cat([c[r][1] for c in chunks])
            self.ranks.append((weight, bias))
        self.widths = [p.weight.shape[0] // tp for p in parts]
        self.bias_after = bias_after
        self._pending: list[torch.Tensor] = []
        self._input = None

    def _gemm(self, x, weight, bias):
        return _gemm_then_bias(x, weight, bias) if self.bias_after else F.linear(x, weight, bias)

    def forward_of(self, index: int):
        def forward(_module, x):
            if index == 0:
                per_rank = [self._gemm(x, w, b).split(self.widths, dim=-1) for w, b in self.ranks]
                self._pending = [
                    torch.cat([rank[i] for rank in per_rank], -1) for i in range(len(self.widths))
                ]
                self._input = x
            elif x is not self._input:
                raise RuntimeError("fused GEMM parts called on different inputs")
            return self._pending[index]

        return forward


def _padded_output_forward(rows: int, tp: int):
    """The output layer as Megatron's GEMMs: each rank's rows/tp padded vocab rows; the HF width
    again after it (the columns past the true vocab are padding on both sides, never compared)."""

    def forward(self, x):
        have = self.weight.shape[0]
        weight = self.weight[:rows] if rows <= have else F.pad(self.weight, (0, 0, 0, rows - have))
        out = torch.cat([torch.matmul(x, w.t()) for w in weight.chunk(tp)], dim=-1)
        return out[..., :have] if rows >= have else F.pad(out, (0, have - rows))

    return forward


def _patch(stack: ExitStack, module: nn.Module, name: str, function) -> None:
    had = name in module.__dict__
    previous = module.__dict__.get(name)
    setattr(module, name, MethodType(function, module))

    def restore():
        if had:
            setattr(module, name, previous)
        else:
            delattr(module, name)

    stack.callback(restore)


@contextmanager
def megatron_numerics(model, sources, output_rows: int | None = None, tp: int = 1):
    """Inside the block, `model` (an NVLM_D_Model) rounds as Megatron-Core does at `sources`, for a
    Megatron model run at tensor-parallel size `tp`.

    `output_rows`: Megatron's padded vocab size (for `gemm_shapes`; None leaves the output layer)."""
    sources = set(sources)
    unknown = sources - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown numerics sources {sorted(unknown)}; known: {', '.join(SOURCES)}")
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2MLP, Qwen2RMSNorm

    from modeling.megatron.args import padded_head_count
    from modeling.modeling_intern_vit import InternAttention, InternMLP, InternRMSNorm

    llm, vit = model.language_model, model.vision_model
    reduce_tp = tp if "tp_reductions" in sources else 1
    # The ViT heads Megatron allocates at this TP, split over the ranks: each rank's real channels
    # (QK-norm statistics) and each rank's channels (its slice of proj's input).
    vit_config = vit.config
    per_rank = padded_head_count(vit_config.num_attention_heads, reduce_tp) // reduce_tp * vit_config.head_dim
    vit_ranks = [(r * per_rank, (r + 1) * per_rank) for r in range(reduce_tp)]
    vit_real = [(a, min(b, vit_config.hidden_size)) for a, b in vit_ranks if a < vit_config.hidden_size]
    with ExitStack() as stack:
        if "attention" in sources:
            _register_attention()
            config, before = llm.config, llm.config._attn_implementation
            config._attn_implementation = MEGATRON_ATTENTION
            stack.callback(setattr, config, "_attn_implementation", before)
            for module in vit.modules():
                if isinstance(module, InternAttention):
                    _patch(stack, module, "forward", _vit_attention_forward)
        if "llm_norm" in sources:
            for module in llm.modules():
                if isinstance(module, Qwen2RMSNorm):
                    _patch(stack, module, "forward", _torch_rms_norm_forward)
        if "vit_norm" in sources:
            for module in vit.modules():
                if isinstance(module, InternRMSNorm):
                    _patch(stack, module, "forward", _megatron_vit_norm_forward)
                elif isinstance(module, InternAttention):
                    _patch(stack, module, "_qk_norm", _megatron_qk_norm(vit_real))
        bias_after = "bias_add" in sources
        if bias_after:
            biased = [m for m in vit.modules() if isinstance(m, (InternAttention, InternMLP))]
            for parent in biased:
                for linear in parent.children():
                    if isinstance(linear, nn.Linear) and linear.bias is not None:
                        _patch(stack, linear, "forward", _bias_after_gemm_forward)
        for module in llm.modules():
            if isinstance(module, Qwen2Attention):
                parts = [module.q_proj, module.k_proj, module.v_proj]
            elif isinstance(module, Qwen2MLP):
                parts = [module.gate_proj, module.up_proj]
            else:
                continue
            if "gemm_shapes" in sources:
                fused = _FusedGemm(parts, bias_after, tp)
                for index, part in enumerate(parts):
                    _patch(stack, part, "forward", fused.forward_of(index))
            elif bias_after:
                for part in parts:
                    if part.bias is not None:
                        _patch(stack, part, "forward", _bias_after_gemm_forward)
        if "gemm_shapes" in sources and output_rows is not None:
            _patch(stack, llm.lm_head, "forward", _padded_output_forward(output_rows, tp))
        if reduce_tp > 1:
            rows = [(m.o_proj, m.o_proj.in_features) for m in llm.modules() if isinstance(m, Qwen2Attention)]
            rows += [(m.down_proj, m.down_proj.in_features) for m in llm.modules() if isinstance(m, Qwen2MLP)]
            rows += [(m.fc2, m.fc2.in_features) for m in vit.modules() if isinstance(m, InternMLP)]
            rows.append((model.mlp1[-1], model.mlp1[-1].in_features))  # projector fc2
            for linear, width in rows:
                _patch(stack, linear, "forward", _row_parallel_forward(linear, _even(width, reduce_tp)))
            for module in vit.modules():
                if isinstance(module, InternAttention):  # its dummy heads past Megatron's count: no rank
                    _patch(stack, module.proj, "forward", _row_parallel_forward(module.proj, vit_ranks))
        yield model
