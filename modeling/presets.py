"""Named NVLM-D configurations: the published 72B model, a tiny one for CPU tests, and the small one
the shipped trained checkpoint uses.

`get_config(name, **overrides)` returns a fresh `NVLM_D_Config`. Overrides reach the
sub-configs through the `vision_` and `llm_` prefixes, e.g.
`get_config("nvlm-d-72b", llm_num_hidden_layers=2, vision_num_hidden_layers=2)`.
"""

from __future__ import annotations

import copy
from typing import Any

from .configuration_nvlm_d import NVLM_D_Config

_COMMON = dict(
    select_layer=-1,
    downsample_ratio=0.5,
    template="chatml",
    dynamic_image_size=True,
    use_thumbnail=True,
    ps_version="v2",
    min_dynamic_patch=1,
    max_dynamic_patch=6,
)

_QWEN2 = dict(
    architectures=["Qwen2ForCausalLM"],
    model_type="llama",  # as the release writes it; the architecture decides (see configuration_nvlm_d)
    hidden_act="silu",
    attention_bias=True,
    mlp_bias=False,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
    use_cache=True,
)

PRESETS: dict[str, dict[str, Any]] = {
    # The published nvidia/NVLM-D-72B numbers (NVLM_FACTS section 1).
    "nvlm-d-72b": dict(
        _COMMON,
        force_image_size=448,
        img_context_token_id=151654,  # <|vision_pad|>
        vision_config=dict(
            architectures=["InternVisionModel"],
            image_size=448,
            patch_size=14,
            hidden_size=3200,
            num_attention_heads=25,
            num_dummy_heads=7,
            intermediate_size=12800,
            num_hidden_layers=45,
            layer_norm_eps=1e-6,
            qkv_bias=False,
            qk_normalization=True,
            hidden_act="gelu",
            norm_type="rms_norm",
        ),
        llm_config=dict(
            _QWEN2,
            hidden_size=8192,
            intermediate_size=29568,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            max_position_embeddings=32768,
            rope_scaling={"factor": 3.0, "type": "dynamic"},
            vocab_size=152064,
            bos_token_id=151643,  # <|endoftext|>
            eos_token_id=151645,  # <|im_end|>
        ),
    ),
    # Small but structurally faithful: GQA (2 query heads per KV group, 4 groups so TP 1/2/4 shard),
    # 5 real + 7 dummy ViT heads (always 7, as the release, vLLM and the published code expect),
    # 64x64 tiles of 8x8 patches (16 LLM tokens per tile), and a
    # 1024-row vocab over the 1000-entry tokenizer of tests/fixtures/tiny-tokenizer.
    "tiny": dict(
        _COMMON,
        force_image_size=64,
        img_context_token_id=989,  # <|vision_pad|> in tests/fixtures/tiny-tokenizer
        vision_config=dict(
            architectures=["InternVisionModel"],
            image_size=64,
            patch_size=8,
            hidden_size=80,
            num_attention_heads=5,
            num_dummy_heads=7,
            intermediate_size=160,
            num_hidden_layers=2,
            layer_norm_eps=1e-6,
            qkv_bias=False,
            qk_normalization=True,
            hidden_act="gelu",
            norm_type="rms_norm",
            initializer_range=0.02,
            initializer_factor=0.5,
        ),
        llm_config=dict(
            _QWEN2,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            vocab_size=1024,
            bos_token_id=978,  # <|endoftext|>
            eos_token_id=980,  # <|im_end|>
        ),
    ),
}

# Trained by scripts/train_tiny_nvlm.py on the synthetic benchmark (scripts/synthetic_bench.py)
# and shipped in tests/fixtures/nvlm-d-small-trained: "tiny" made wider and deeper so that it
# learns to read, still 11 MB. 6 real + 7 dummy ViT heads (Megatron pads to 8 at TP 4/8); 2 KV groups.
PRESETS["small"] = copy.deepcopy(PRESETS["tiny"])
PRESETS["small"]["vision_config"].update(
    hidden_size=96, num_attention_heads=6, num_dummy_heads=7, intermediate_size=384, num_hidden_layers=4
)
PRESETS["small"]["llm_config"].update(
    hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2
)


def get_config(name: str, **overrides: Any) -> NVLM_D_Config:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    spec = copy.deepcopy(PRESETS[name])
    for key, value in overrides.items():
        for prefix, sub in (("vision_", "vision_config"), ("llm_", "llm_config")):
            if key.startswith(prefix) and key[len(prefix) :] != "config":
                spec[sub][key[len(prefix) :]] = value
                break
        else:
            spec[key] = value
    return NVLM_D_Config(**spec)


# Entries of each preset's tokenizer (the embedding has more rows: padding). Megatron pads its
# vocabulary from this number (make_vocab_size_divisible_by x TP), not from the HF row count.
TOKENIZER_SIZES = {"nvlm-d-72b": 151665, "tiny": 1000, "small": 1000}


def tokenizer_size(name: str) -> int:
    return TOKENIZER_SIZES[name]
