"""Configuration of NVLM-D: InternViT vision tower + MLP projector + Qwen2 language model.

This file is copied verbatim next to converted weights as "remote code" (see `auto_map` in
config.json), so it imports only transformers and the standard library, and it runs on
transformers 4.56+ (what vLLM pins) as on 5.x: the classes take their fields in a plain
`__init__`, which both generations accept from remote code (5.x wraps configs as dataclasses
but keeps a subclass's own `__init__`).

The published `nvidia/NVLM-D-72B` config.json loads unchanged:
- `llm_config.model_type` says "llama" while `architectures` says Qwen2ForCausalLM: the language
  model is built from the architecture, as the release's own code does;
- configs written by transformers 4.x carry keys that transformers 5 renames or drops
  (`torch_dtype`, `rope_scaling` / `rope_theta`, generation defaults such as `top_k`). We keep
  what was loaded and write it back, so a load/save round trip loses no field.

Two optional fields are ours; their defaults reproduce the published behaviour when absent:
- `vision_config.num_dummy_heads` (7): zero heads appended to the 25 real ViT heads so that
  tensor parallelism of 8 divides the head count; the release hard-codes 7;
- `projector_layer_norm_eps` (1e-5, PyTorch's default used by the release): Megatron trains the
  projector LayerNorm with 1e-6, and a converter records that here.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig, Qwen2Config

SUPPORTED_LLM_ARCHITECTURES = ("Qwen2ForCausalLM",)
ARCHITECTURE = "NVLM_D"  # config.json's `architectures` in the release

# The release's auto_map: the file names below are the ones save_pretrained copies.
AUTO_MAP = {
    "AutoConfig": "configuration_nvlm_d.NVLM_D_Config",
    "AutoModel": "modeling_nvlm_d.NVLM_D_Model",
    "AutoModelForCausalLM": "modeling_nvlm_d.NVLM_D_Model",
}


def restore_legacy_keys(written: dict[str, Any], source: dict[str, Any] | None) -> dict[str, Any]:
    """Write back the keys of a transformers-4.x config that transformers 5 renamed or dropped.

    `written` is what `to_dict()` produced now, `source` what was loaded. Current values win;
    keys only the source had are kept as loaded; renamed keys are written under the old name
    from the current value (dtype -> torch_dtype, rope_parameters -> rope_theta + rope_scaling).
    """
    if not source:
        return written
    for key, value in source.items():
        written.setdefault(key, copy.deepcopy(value))
    if "model_type" in source:
        written["model_type"] = source["model_type"]
    if "torch_dtype" in source:
        written["torch_dtype"] = written.get("dtype", source["torch_dtype"])
    rope = written.get("rope_parameters")
    if isinstance(rope, dict) and ("rope_scaling" in source or "rope_theta" in source):
        written.pop("rope_parameters")
        rope = dict(rope)
        written["rope_theta"] = rope.pop("rope_theta", source.get("rope_theta"))
        rope_type = rope.pop("rope_type", rope.get("type", "default"))
        rope.pop("type", None)
        written["rope_scaling"] = None if rope_type == "default" else {**rope, "type": rope_type}
    # transformers 4.x adds `rope_type` beside the loaded `type`: write the file as it was.
    scaling, loaded = written.get("rope_scaling"), source.get("rope_scaling")
    added = isinstance(loaded, dict) and "rope_type" not in loaded and isinstance(scaling, dict)
    if added and scaling.get("rope_type") == scaling.get("type"):
        written["rope_scaling"] = {k: v for k, v in scaling.items() if k != "rope_type"}
    return written


class InternVisionConfig(PretrainedConfig):
    """InternViT-6B-448px-V1-5 as NVLM-D uses it (defaults: the published 72B model)."""

    model_type = "intern_vit_6b"

    def __init__(
        self,
        num_channels: int = 3,
        patch_size: int = 14,
        image_size: int = 448,
        qkv_bias: bool = False,
        hidden_size: int = 3200,
        num_attention_heads: int = 25,  # real heads; head_dim = hidden_size // num_attention_heads
        num_dummy_heads: int = 7,  # zero heads appended so that TP=8 divides the head count
        intermediate_size: int = 12800,
        qk_normalization: bool = True,
        num_hidden_layers: int = 45,
        use_flash_attn: bool = True,  # kept for compatibility; attention follows _attn_implementation
        hidden_act: str = "gelu",  # exact (erf) GELU
        norm_type: str = "rms_norm",
        layer_norm_eps: float = 1e-6,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        initializer_factor: float = 0.1,  # initial layer-scale value
        **kwargs,
    ):
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"vision hidden_size {hidden_size} is not a multiple of num_attention_heads "
                f"{num_attention_heads}"
            )
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.qkv_bias = qkv_bias
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_dummy_heads = num_dummy_heads
        self.intermediate_size = intermediate_size
        self.qk_normalization = qk_normalization
        self.num_hidden_layers = num_hidden_layers
        self.use_flash_attn = use_flash_attn
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.dropout = dropout
        self.drop_path_rate = drop_path_rate
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor
        self._legacy_source = {k: kwargs[k] for k in ("torch_dtype",) if k in kwargs}
        super().__init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_padded_heads(self) -> int:
        return self.num_attention_heads + self.num_dummy_heads

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("_legacy_source", None)
        return restore_legacy_keys(out, self._legacy_source)

    def to_diff_dict(self) -> dict[str, Any]:
        # The release writes full configs; so do we (a diff would drop the published defaults).
        return self.to_dict()


class NVLM_D_Config(PretrainedConfig):
    """NVLM-D: vision tower, pixel shuffle, `mlp1` projector and a Qwen2 language model."""

    model_type = "NVLM_D"
    # Tells transformers which attributes are sub-configs (attention implementation, serialisation).
    sub_configs = {"vision_config": InternVisionConfig, "llm_config": Qwen2Config}

    def __init__(
        self,
        vision_config: dict | PretrainedConfig | None = None,
        llm_config: dict | PretrainedConfig | None = None,
        use_backbone_lora: int = 0,
        use_llm_lora: int = 0,
        select_layer: int = -1,  # ViT layer whose output feeds the projector
        force_image_size: int | None = 448,
        downsample_ratio: float = 0.5,  # pixel shuffle: 2x2 patches -> one token of 4x the width
        template: str = "chatml",
        dynamic_image_size: bool = True,
        use_thumbnail: bool = True,
        ps_version: str = "v2",
        min_dynamic_patch: int = 1,
        max_dynamic_patch: int = 6,
        projector_layer_norm_eps: float = 1e-5,  # release: PyTorch default; Megatron trains with 1e-6
        img_context_token_id: int | None = None,  # id of <|vision_pad|>; chat() sets it from the tokenizer
        **kwargs,
    ):
        # The sub-configs exist before the base class initialises, which hands the attention
        # implementation down to them.
        if vision_config is None or isinstance(vision_config, dict):
            vision_config = InternVisionConfig(**(vision_config or {}))
        self._llm_source = None
        if llm_config is None or isinstance(llm_config, dict):
            # transformers edits the dict it is given (rope standardisation): work on a copy.
            llm_config = copy.deepcopy(llm_config or {})
            self._llm_source = copy.deepcopy(llm_config)
            architectures = llm_config.get("architectures") or ["Qwen2ForCausalLM"]
            if architectures[0] not in SUPPORTED_LLM_ARCHITECTURES:
                raise ValueError(
                    f"llm_config.architectures[0] is {architectures[0]!r}; NVLM-D supports "
                    f"{', '.join(SUPPORTED_LLM_ARCHITECTURES)}"
                )
            llm_config = Qwen2Config(**llm_config)
        self.vision_config = vision_config
        self.llm_config = llm_config
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        self.projector_layer_norm_eps = projector_layer_norm_eps
        self.img_context_token_id = img_context_token_id
        self._legacy_source = {k: kwargs[k] for k in ("torch_dtype",) if k in kwargs}
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(**kwargs)

    @property
    def image_size(self) -> int:
        return self.force_image_size or self.vision_config.image_size

    @property
    def num_image_token(self) -> int:
        """LLM tokens per 448x448 tile: (448/14)^2 patches, pixel-shuffled by 0.5 -> 256."""
        patches = (self.image_size // self.vision_config.patch_size) ** 2
        return int(patches * self.downsample_ratio**2)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("_legacy_source", None)
        out.pop("_llm_source", None)
        out["llm_config"] = restore_legacy_keys(out["llm_config"], self._llm_source)
        # save_pretrained records the class name; the release (and vLLM's registry) say "NVLM_D"
        if out.get("architectures") == ["NVLM_D_Model"]:
            out["architectures"] = [ARCHITECTURE]
        if out.get("dtype") is not None and "torch_dtype" not in out:
            out["torch_dtype"] = out["dtype"]  # the name transformers 4.x (and vLLM) read
        return restore_legacy_keys(out, self._legacy_source)

    def to_diff_dict(self) -> dict[str, Any]:
        # The release writes full configs; so do we (a diff would drop the published defaults).
        return self.to_dict()
