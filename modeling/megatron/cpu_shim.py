"""Run megatron-core 0.16 on a CPU-only host (tests and the CPU path only).

Megatron-Core assumes CUDA in a few places even when asked to initialise on the CPU. `install()`
redirects exactly those places, and does nothing when CUDA is available, so the GPU path runs
megatron-core untouched. What is redirected, and why:

- `torch.cuda.current_device()` -> "cpu": rotary embeddings move `inv_freq` to it, the global
  memory buffer used by the attention kernels allocates on it.
- `Tensor.cuda()` -> the tensor itself: CLIPViTModel puts its `position_ids` on the GPU.
- the CUDA RNG state getters/setters of `megatron.core.tensor_parallel.random` -> the CPU
  generator: the model-parallel RNG tracker forks them around initialisation and dropout.
- `torch.cuda.synchronize()` -> no-op: dist_checkpointing's torch_dist writer syncs the GPU
  before copying tensors to host memory.
- `get_default_causal_mask` -> allocated on the CPU (it hard-codes device="cuda"); it is imported
  by name in `megatron.core.transformer.utils` and `megatron.core.fusions.fused_softmax`.

Callers also turn the fusions off in their TransformerConfig (bias/activation, bias/dropout,
masked softmax, persistent layer norm, gradient-accumulation, RoPE): see `builder.py`.
"""

from __future__ import annotations

import torch

_installed = False


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _get_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def install() -> bool:
    """Apply the redirections once; returns True when the shim is active."""
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer import utils as transformer_utils

    torch.cuda.current_device = lambda: "cpu"
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.cuda.get_rng_state = _get_rng_state
    torch.cuda.manual_seed = torch.manual_seed
    torch.cuda.synchronize = lambda *args, **kwargs: None
    mp_random._get_cuda_rng_state = _get_rng_state
    mp_random._set_cuda_rng_state = _set_rng_state
    transformer_utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    _installed = True
    return True
