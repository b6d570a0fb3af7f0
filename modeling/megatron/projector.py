"""The NVLM-D projector (`mlp1`) as Megatron modules: LayerNorm -> fc1 -> GELU -> fc2, no biases.

NVLM trained the projector with Transformer Engine, whose LayerNormColumnParallelLinear fuses the
LayerNorm into fc1 (`linear_fc1.layer_norm_weight` / `layer_norm_bias`). Megatron-Core's local
projector spec has no LayerNorm at all, so this module supplies one under TE's parameter names:
the same state dict with or without TE.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules


class LayerNormColumnParallelLinear(ColumnParallelLinear):
    """ColumnParallelLinear preceded by a (replicated) LayerNorm with weight and bias."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.layer_norm_eps = config.layernorm_epsilon
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
        self.layer_norm_bias = torch.nn.Parameter(torch.zeros(input_size, dtype=config.params_dtype))
        for param in (self.layer_norm_weight, self.layer_norm_bias):
            param.sequence_parallel = False

    def forward(self, input_: torch.Tensor, *args, **kwargs):
        normed = torch.nn.functional.layer_norm(
            input_, (input_.shape[-1],), self.layer_norm_weight, self.layer_norm_bias, self.layer_norm_eps
        )
        return super().forward(normed, *args, **kwargs)


def projector_submodules() -> MLPSubmodules:
    return MLPSubmodules(linear_fc1=LayerNormColumnParallelLinear, linear_fc2=RowParallelLinear)
