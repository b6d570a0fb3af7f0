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

`install_for_megatron_lm()` is the wider set that Megatron-LM's own training code needs
(`initialize_megatron`, `load_checkpoint`, `examples/multimodal`; megatron-core 0.10 to 0.19;
parity-check --megatron-lm and the NVLM-1.0 recipe fixture), also a no-op where CUDA is available:

- a TorchFunctionMode (`CudaToCpu`) that turns `device="cuda"` / `torch.device("cuda")` / a device
  index in any torch call into the CPU, and `Tensor.cuda()` / `.to("cuda")` into the CPU tensor
  (checkpoint metadata, CLIPViT's position ids and the causal mask are allocated on "cuda");
- `torch.cuda.current_device` -> "cpu"; the CUDA RNG state getters/setters and `manual_seed` ->
  the CPU generator (`manual_seed_all` -> no-op); `synchronize`, `empty_cache`, `set_device`,
  `nvtx.range_push/pop` -> no-ops; `memory_allocated` and the like -> 0; `get_device_properties` /
  `get_device_capability` -> a device of compute capability 0.0 (Megatron-LM 0.19's validate_args
  asks for the architecture when TP > 1);
- with `one_device_per_rank` (ranks of a model-parallel run): `torch.cuda.device_count` -> 1,
  because `initialize_megatron` builds the model-parallel groups only when it sees a device;
- after megatron is importable (`megatron_rng()`): the model-parallel RNG tracker's own
  `_get_cuda_rng_state` / `_set_cuda_rng_state` -> the CPU generator.
"""

from __future__ import annotations

import types

import torch
from torch.overrides import TorchFunctionMode

_installed = False
_megatron_lm_mode = None


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


def _to_cpu_device(device):
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class CudaToCpu(TorchFunctionMode):
    """Every torch call asked to put something on CUDA puts it on the CPU instead."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1 and not isinstance(args[1], (torch.dtype, torch.Tensor)):
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


def install_for_megatron_lm(one_device_per_rank: bool = False) -> bool:
    """The redirections Megatron-LM's training code needs on a CPU-only host (module docstring);
    returns True when they are active."""
    global _megatron_lm_mode
    if torch.cuda.is_available():
        return False
    if _megatron_lm_mode is None:
        _megatron_lm_mode = CudaToCpu()
        _megatron_lm_mode.__enter__()
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        torch.cuda.current_device = lambda: "cpu"
        torch.cuda.get_rng_state = _get_rng_state
        torch.cuda.set_rng_state = _set_rng_state
        torch.cuda.manual_seed = torch.manual_seed
        torch.cuda.manual_seed_all = lambda *args, **kwargs: None  # torch.manual_seed calls it
        for name in ("synchronize", "empty_cache", "set_device"):
            setattr(torch.cuda, name, lambda *args, **kwargs: None)
        for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
            setattr(torch.cuda, name, lambda *args, **kwargs: 0)
        torch.cuda.nvtx.range_push = lambda *args, **kwargs: None
        torch.cuda.nvtx.range_pop = lambda *args, **kwargs: None
        cpu_device = types.SimpleNamespace(
            name="cpu", major=0, minor=0, total_memory=0, multi_processor_count=1
        )
        torch.cuda.get_device_properties = lambda *args, **kwargs: cpu_device
        torch.cuda.get_device_capability = lambda *args, **kwargs: (0, 0)
    if one_device_per_rank:
        torch.cuda.device_count = lambda: 1
    return True


def megatron_rng() -> None:
    """The model-parallel RNG tracker's CUDA state helpers -> the CPU generator (CPU hosts only)."""
    if torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._set_cuda_rng_state = _set_rng_state
    if hasattr(mp_random, "_get_cuda_rng_state"):
        mp_random._get_cuda_rng_state = _get_rng_state
