"""InternViT-6B as a Megatron-Core layer spec: padded heads, TP-wide QK-norm, layer scale.

Megatron needs the head count divisible by the tensor-parallel size, so zero "dummy" heads are
appended to the real ones: H = ((real - 1) // TP + 1) * TP (25 real heads: 25 at TP=1, 26 at 2,
28 at 4, 32 at 8). Heads are laid out contiguously over the ranks, so the dummy heads sit on the
last ranks. Their q/k/v rows and proj columns are zero, so their attention output is zero.

QK-norm normalises the WHOLE Q (and K) vector of a token across all heads: each rank sums the
squares of its real heads, the sums are all-reduced over the TP group, and the mean is taken
over the real width (hidden_size). The all-reduce is autograd-aware, so training works too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from .args import padded_head_count  # noqa: F401  (re-exported: the rule lives with the args)


class _AllReduceSum(torch.autograd.Function):
    """Sum over a process group, forward and backward (every rank's output depends on every
    rank's input, so the gradients are summed too)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class InternViTRMSNorm(MegatronModule):
    """RMSNorm with float32 statistics.

    As a plain norm it normalises the last dimension. As QK-norm (`real_heads` given) it receives
    this rank's heads [s, b, heads, head_dim] and normalises their concatenation with the mean of
    squares over the real channels of ALL ranks (see the module docstring).
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-6,
        real_heads: int | None = None,
    ):
        super().__init__(config=config)
        self.eps = eps
        self.real_heads = real_heads
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = False
        if real_heads is not None:  # QK-norm weights cover this rank's heads only
            set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def _qk_variance(self, flat: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        real_here = max(0, min(heads, self.real_heads - tp_rank * heads))  # real heads on this rank
        sum_sq = flat[..., : real_here * head_dim].float().pow(2).sum(-1, keepdim=True)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            sum_sq = _AllReduceSum.apply(sum_sq, parallel_state.get_tensor_model_parallel_group())
        return sum_sq / (self.real_heads * head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.real_heads is None:
            variance = x.float().pow(2).mean(-1, keepdim=True)
            return (x.float() * torch.rsqrt(variance + self.eps)).type_as(x) * self.weight
        s, b, heads, head_dim = x.shape
        flat = x.reshape(s, b, heads * head_dim)
        variance = self._qk_variance(flat, heads, head_dim)
        out = (flat.float() * torch.rsqrt(variance + self.eps)).type_as(x) * self.weight
        return out.view(s, b, heads, head_dim)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        if self.real_heads is None:  # replicated
            return super().sharded_state_dict(prefix, sharded_offsets, metadata)
        # QK-norm weights cover this rank's heads: split over TP on dim 0.
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, {"weight": 0}, sharded_offsets)


class InternViTSelfAttention(SelfAttention):
    """SelfAttention with no QKV bias (the other linears have one) and QK-norm over all local heads."""

    def __init__(self, config: TransformerConfig, submodules: SelfAttentionSubmodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.linear_qkv = submodules.linear_qkv(
            config.hidden_size,
            self.query_projection_size + 2 * self.kv_projection_size,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
        )
        local_width = self.hidden_size_per_attention_head * self.num_attention_heads_per_partition
        self.q_layernorm = build_module(
            submodules.q_layernorm, config=config, hidden_size=local_width, eps=config.layernorm_epsilon
        )
        self.k_layernorm = build_module(
            submodules.k_layernorm, config=config, hidden_size=local_width, eps=config.layernorm_epsilon
        )


def _layer_scaled_bias_dropout_add(scale: torch.nn.Parameter):
    """TransformerLayer's bda hook, with the layer scale applied to the branch after its bias:
    out = residual + dropout(x + bias) * scale."""

    def build(training: bool, fused: bool):
        def bias_dropout_add(x_with_bias, residual, prob):
            x, bias = x_with_bias
            if bias is not None:
                x = x + bias
            x = torch.nn.functional.dropout(x, p=prob, training=training)
            return residual + x * scale

        return bias_dropout_add

    return build


class InternViTLayer(TransformerLayer):
    """TransformerLayer with InternViT's layer scale `ls1` / `ls2` on the two branches."""

    def __init__(self, config: TransformerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.ls1 = torch.nn.Parameter(torch.ones(config.hidden_size, dtype=config.params_dtype))
        self.ls2 = torch.nn.Parameter(torch.ones(config.hidden_size, dtype=config.params_dtype))
        self.self_attn_bda = _layer_scaled_bias_dropout_add(self.ls1)
        self.mlp_bda = _layer_scaled_bias_dropout_add(self.ls2)


def internvit_layer_spec(real_heads: int) -> ModuleSpec:
    """The InternViT layer with Megatron-Core's local (non-TE) modules."""
    qk_norm = ModuleSpec(module=InternViTRMSNorm, params={"real_heads": real_heads})
    return ModuleSpec(
        module=InternViTLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=InternViTRMSNorm,
            self_attention=ModuleSpec(
                module=InternViTSelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=DotProductAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=InternViTRMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
