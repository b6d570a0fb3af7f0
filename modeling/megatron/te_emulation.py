"""Transformer Engine emulated on megatron-core's local modules, for Megatron-LM's own model code.

NVIDIA's NVLM recipes build their model with Transformer Engine (TE): `examples/multimodal`'s
`get_layer_spec_te`, `get_norm_mlp_module_spec_te` (the projector, always) and
`nvlm/internvit.py` with `--use-te` import `TEColumnParallelLinear`, `TERowParallelLinear`,
`TELayerNormColumnParallelLinear`, `TEDotProductAttention` and `TENorm` from
`megatron.core.extensions.transformer_engine`. Where TE is not installed (a CPU host, a GPU
machine without it) `install()` gives that module these five names as stand-ins built on
megatron-core's local modules, with TE's parameter names, so a TE checkpoint loads strictly:

- `TEColumnParallelLinear` / `TERowParallelLinear`: megatron-core's ColumnParallelLinear /
  RowParallelLinear (`weight`, `bias`), plus TE 1.x's `_extra_state` (a BytesIO of
  torch.save(None), what TE writes with FP8 off). A loaded extra state that holds anything but
  that (an FP8 recipe's scales) is refused: the emulation has no FP8.
- `TELayerNormColumnParallelLinear`: TE's LayerNormLinear, the norm of `config.normalization`
  (`layer_norm_weight`, and `layer_norm_bias` for LayerNorm; eps `config.layernorm_epsilon`)
  fused before the column-parallel linear.
- `TEDotProductAttention`: megatron-core's unfused DotProductAttention (softmax in float32 when
  the config says so); a TE checkpoint's `core_attention._extra_state` is accepted and ignored
  (FP8 off), one without it loads too.
- `TENorm`: torch's LayerNorm / RMSNorm by `config.normalization` (parameter `weight`).

Megatron-core generations differ in how the module looks without TE (read from its source, before
megatron is imported). Where it imports transformer_engine unguarded (NVLM-1.0's own megatron/core
0.10) importing it fails: a stand-in module takes its place in sys.modules, offering the five
classes and `fused_apply_rotary_pos_emb` (TE's fused RoPE, as megatron's unfused rotate-half
`_apply_rotary_pos_emb_bshd`; TransformerConfig refuses `apply_rope_fusion` when none exists);
every other name raises ImportError, so megatron takes its non-TE paths there (TE RNG tracker,
TEDelayedScaling, ...); megatron.core.utils' cached TE version is set to TE_STANDIN_VERSION so that
`is_te_min_version` answers without importing TE; the decoder's final norm
(`transformer_block.LayerNormImpl`, TENorm under TE) becomes the stand-in TENorm. Where it guards
that import (`HAVE_TE = False`: 0.16, 0.19) it imports without TE, with placeholder classes: it is
kept and only the five classes are replaced, so megatron-core itself still runs its own non-TE
code; a module that read `HAVE_TE` at import and bound the names only then (0.19's
`examples/multimodal/layer_specs.py`: None without TE) gets them with `bind(module)`.

`install()` does nothing where `transformer_engine` imports. Used by modeling/megatron/megatron_lm.py
(parity-check --megatron-lm) and by the NVLM-1.0 recipe fixture (scripts/fixtures/nvlm10_recipe/).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import io
import sys
import types
from pathlib import Path

import torch

TE_MODULE = "megatron.core.extensions.transformer_engine"
TE_STANDIN_VERSION = "1.12.0"
CLASS_NAMES = (
    "TEColumnParallelLinear",
    "TERowParallelLinear",
    "TELayerNormColumnParallelLinear",
    "TEDotProductAttention",
    "TENorm",
)
_state = {"installed": None}


def te_installed() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _accepted(cls, kwargs: dict) -> dict:
    """The keyword arguments `cls.__init__` takes (megatron-core generations add different ones)."""
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in parameters}


def _empty_extra_state(state) -> bool:
    """What TE keeps when FP8 is off: None, an empty tensor, or a BytesIO of torch.save(None)."""
    if state is None:
        return True
    if isinstance(state, torch.Tensor):
        return state.numel() == 0
    if isinstance(state, io.BytesIO):
        data = state.getvalue()
        if not data:
            return True
        from converter.formats import safe_pickle

        return safe_pickle.load(data, where="a Transformer Engine _extra_state") is None
    return False


class _TEExtraState:
    """TE 1.x modules save `_extra_state`: a BytesIO of torch.save(None) when FP8 is off."""

    def get_extra_state(self):
        buffer = io.BytesIO()
        torch.save(None, buffer)
        buffer.seek(0)
        return buffer

    def set_extra_state(self, state):
        if not _empty_extra_state(state):
            raise ValueError(
                f"{type(self).__name__}: the checkpoint's Transformer Engine extra state holds FP8 "
                "metadata; the TE emulation (modeling/megatron/te_emulation.py) has no FP8"
            )


def _build_classes() -> dict:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class TEColumnParallelLinear(_TEExtraState, ColumnParallelLinear):
        """TE's column-parallel linear: `weight` [out/TP, in], `bias`, `_extra_state`."""

        def __init__(self, input_size, output_size, *, config, init_method, gather_output, **kwargs):
            assert not gather_output, "TE column-parallel linears never gather their output"
            kwargs = _accepted(ColumnParallelLinear, dict(kwargs, gather_output=False))
            super().__init__(input_size, output_size, config=config, init_method=init_method, **kwargs)

    class TERowParallelLinear(_TEExtraState, RowParallelLinear):
        """TE's row-parallel linear: `weight` [out, in/TP], `bias` (replicated), `_extra_state`."""

        def __init__(self, input_size, output_size, *, config, init_method, input_is_parallel, **kwargs):
            assert input_is_parallel, "TE row-parallel linears expect a parallel input"
            kwargs = _accepted(RowParallelLinear, dict(kwargs, input_is_parallel=True))
            super().__init__(input_size, output_size, config=config, init_method=init_method, **kwargs)

    class TELayerNormColumnParallelLinear(TEColumnParallelLinear):
        """TE's LayerNormLinear: the norm of `config.normalization` fused before the column linear.

        Parameters `layer_norm_weight` (+ `layer_norm_bias` for LayerNorm), eps
        `config.layernorm_epsilon`, then the column-parallel `weight` / `bias`.
        """

        def __init__(self, input_size, output_size, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            assert not config.layernorm_zero_centered_gamma
            self.normalization = config.normalization
            self.eps = config.layernorm_epsilon
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
            if self.normalization == "LayerNorm":
                self.layer_norm_bias = torch.nn.Parameter(torch.zeros(input_size, dtype=config.params_dtype))
            elif self.normalization != "RMSNorm":
                raise ValueError(f"unsupported normalization {self.normalization}")

        def forward(self, x, *args, **kwargs):
            if self.normalization == "LayerNorm":
                normed = torch.nn.functional.layer_norm(
                    x, (x.shape[-1],), self.layer_norm_weight, self.layer_norm_bias, self.eps
                )
            else:
                normed = torch.nn.functional.rms_norm(x, (x.shape[-1],), self.layer_norm_weight, self.eps)
            return super().forward(normed, *args, **kwargs)

    class TEDotProductAttention(DotProductAttention):
        """TE's DotProductAttention -> megatron's unfused local attention (fp32 softmax per config)."""

        def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs):
            kwargs = _accepted(DotProductAttention, kwargs)
            super().__init__(
                config=config,
                layer_number=layer_number,
                attn_mask_type=attn_mask_type,
                attention_type=attention_type,
                **kwargs,
            )

        def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
            state = state_dict.pop(prefix + "_extra_state", None)  # TE's, absent in the emulation
            if not _empty_extra_state(state):
                raise ValueError(f"{prefix}_extra_state holds FP8 metadata; the TE emulation has no FP8")
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    class TENorm:
        """TE's LayerNorm / RMSNorm chosen by `config.normalization` -> torch's (parameter `weight`)."""

        def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
            assert not config.layernorm_zero_centered_gamma
            if config.normalization == "LayerNorm":
                return torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
            if config.normalization == "RMSNorm":
                return torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
            raise ValueError(f"unsupported normalization {config.normalization}")

    classes = {
        "TEColumnParallelLinear": TEColumnParallelLinear,
        "TERowParallelLinear": TERowParallelLinear,
        "TELayerNormColumnParallelLinear": TELayerNormColumnParallelLinear,
        "TEDotProductAttention": TEDotProductAttention,
        "TENorm": TENorm,
    }
    for cls in classes.values():
        cls.__module__ = TE_MODULE
    return classes


def _fused_apply_rotary_pos_emb(t, freqs, transpose_output_memory=False):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    return _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=False)


def _stand_in_module() -> types.ModuleType:
    """The module for megatron-core generations whose TE module cannot be imported without TE."""
    module = types.ModuleType(TE_MODULE)
    module.__doc__ = "Transformer Engine emulated (modeling/megatron/te_emulation.py)."
    cache: dict = {}

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if not cache:
            cache.update(_build_classes())
        if attr in cache:
            return cache[attr]
        raise AttributeError(f"{TE_MODULE} emulation has no {attr} (Transformer Engine is not installed)")

    module.fused_apply_rotary_pos_emb = _fused_apply_rotary_pos_emb
    module.__getattr__ = __getattr__
    return module


def _imports_without_te() -> bool:
    """Whether this megatron-core's TE module imports where TE is absent (it guards its own
    `import transformer_engine`), read from its source: importing a module that then fails would
    leave megatron modules behind that cached the failure (e.g. rope_utils' fused RoPE as None)."""
    spec = importlib.util.find_spec("megatron")  # finds, imports nothing (megatron.core would)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "core" / "extensions" / "transformer_engine.py"
        if path.exists():
            return "HAVE_TE = False" in path.read_text()
    return False


def install() -> str | None:
    """Emulate TE where it is absent (before NVIDIA's model code imports it). Returns None when TE
    is installed (nothing emulated), else how: 'stand-in module' or 'classes replaced'."""
    if _state["installed"] is not None or te_installed():
        return _state["installed"]
    if _imports_without_te():  # megatron-core >= 0.16: HAVE_TE False, placeholder classes
        module = importlib.import_module(TE_MODULE)
        for name, cls in _build_classes().items():
            setattr(module, name, cls)
        _state["installed"] = "classes replaced"
        return _state["installed"]
    module = _stand_in_module()
    sys.modules[TE_MODULE] = module
    import megatron.core.extensions as extensions
    import megatron.core.utils as core_utils
    from packaging.version import Version

    extensions.transformer_engine = module
    core_utils._te_version = Version(TE_STANDIN_VERSION)
    from megatron.core.transformer import transformer_block

    transformer_block.LayerNormImpl = module.TENorm
    _state["installed"] = "stand-in module"
    return _state["installed"]


def bind(module) -> bool:
    """Give a module that imported the TE names only `if HAVE_TE` (and so holds None) the stand-ins,
    and HAVE_TE True, so its TE specs build; megatron-core's own HAVE_TE stays as it is. Returns
    whether anything was bound (nothing where TE is installed or the names are already there)."""
    if _state["installed"] != "classes replaced":
        return False
    te_module = sys.modules[TE_MODULE]
    bound = False
    for name in CLASS_NAMES:
        if hasattr(module, name) and getattr(module, name) is not getattr(te_module, name):
            setattr(module, name, getattr(te_module, name))
            bound = True
    if getattr(module, "HAVE_TE", None) is False:
        module.HAVE_TE = True
        bound = True
    return bound
