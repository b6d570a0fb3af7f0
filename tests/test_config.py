"""NVLM_D_Config: the published config.json loads unchanged and is written back without losing fields."""

from __future__ import annotations

import json

import pytest
from conftest import reference_file
from transformers import AutoConfig, Qwen2Config

from modeling import NVLM_D_Config, get_config
from modeling.configuration_nvlm_d import AUTO_MAP

# Keys that are bookkeeping of whoever wrote the file, not model settings.
BOOKKEEPING = {"_commit_hash", "transformers_version"}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and key in ("llm_config", "vision_config"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


@pytest.fixture
def published() -> dict:
    return json.loads(reference_file("config.json").read_text())


def test_published_config_loads(published):
    config = NVLM_D_Config(**published)
    assert isinstance(config.llm_config, Qwen2Config)  # built from the architecture, not "llama"
    assert config.llm_config.num_key_value_heads == 8
    assert config.llm_config.rope_parameters["rope_type"] == "dynamic"
    assert config.llm_config.rope_parameters["factor"] == 3.0
    assert config.llm_config.rope_parameters["rope_theta"] == 1e6
    assert config.vision_config.num_attention_heads == 25
    assert config.vision_config.num_dummy_heads == 7  # absent from the file: the release's hard-coded 7
    assert config.vision_config.num_padded_heads == 32
    assert config.projector_layer_norm_eps == 1e-5  # absent: PyTorch's default, as the release uses
    assert config.num_image_token == 256
    assert config.auto_map == AUTO_MAP


def test_round_trip_loses_no_field(published, tmp_path):
    NVLM_D_Config(**published).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    source, out = flatten(published), flatten(written)
    lost = sorted(k for k in source if k.split(".")[-1] not in BOOKKEEPING and k not in out)
    assert not lost, f"fields lost on the round trip: {lost}"
    changed = {
        k: (source[k], out[k])
        for k in source
        if k.split(".")[-1] not in BOOKKEEPING and k in out and out[k] != source[k]
    }
    assert not changed, f"fields changed on the round trip: {changed}"
    # and it loads again to the same configuration
    again = NVLM_D_Config.from_pretrained(tmp_path)
    assert again.to_dict() == NVLM_D_Config(**published).to_dict()


def test_optional_fields_recorded(published, tmp_path):
    published = dict(published, projector_layer_norm_eps=1e-6)
    published["vision_config"] = dict(published["vision_config"], num_dummy_heads=3)
    NVLM_D_Config(**published).save_pretrained(tmp_path)
    again = NVLM_D_Config.from_pretrained(tmp_path)
    assert again.projector_layer_norm_eps == 1e-6
    assert again.vision_config.num_dummy_heads == 3


def test_unsupported_llm_is_refused(published):
    published["llm_config"] = dict(published["llm_config"], architectures=["MistralForCausalLM"])
    with pytest.raises(ValueError, match="MistralForCausalLM"):
        NVLM_D_Config(**published)


def test_auto_config_registration():
    config = AutoConfig.for_model("NVLM_D")
    assert isinstance(config, NVLM_D_Config)


@pytest.mark.parametrize("name", ["tiny", "nvlm-d-72b"])
def test_presets(name):
    config = get_config(name)
    vision, llm = config.vision_config, config.llm_config
    assert vision.hidden_size == vision.num_attention_heads * vision.head_dim
    assert vision.num_dummy_heads >= 1
    assert llm.num_attention_heads % llm.num_key_value_heads == 0
    assert llm.num_attention_heads // llm.num_key_value_heads >= 2  # real GQA
    for tp in (1, 2, 4):  # the tiny preset must shard at TP 1, 2 and 4
        assert llm.num_key_value_heads % tp == 0
        assert vision.num_padded_heads % tp == 0
        assert llm.intermediate_size % tp == 0 and llm.vocab_size % (128 * tp) == 0


def test_tiny_preset_is_structurally_faithful(tiny_tokenizer):
    config = get_config("tiny")
    assert config.vision_config.num_hidden_layers >= 2 and config.llm_config.num_hidden_layers >= 2
    assert config.num_image_token == 16
    assert config.img_context_token_id == tiny_tokenizer.convert_tokens_to_ids("<|vision_pad|>")
    assert config.llm_config.eos_token_id == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(tiny_tokenizer) <= config.llm_config.vocab_size  # padded rows, as in the release


def test_preset_overrides():
    config = get_config(
        "nvlm-d-72b", llm_num_hidden_layers=2, vision_num_hidden_layers=3, projector_layer_norm_eps=1e-6
    )
    assert config.llm_config.num_hidden_layers == 2
    assert config.vision_config.num_hidden_layers == 3
    assert config.projector_layer_norm_eps == 1e-6
    with pytest.raises(KeyError, match="unknown preset"):
        get_config("nope")
