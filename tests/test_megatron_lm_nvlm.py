"""An NVLM-D written by NVIDIA's own examples/multimodal code (Megatron-LM core_r0.19.0) -> NVLM_D_Model.

tests/fixtures/megatron-lm-0.19-nvlm holds the tiny NVLM-D (modeling/presets.py "tiny") that
examples/multimodal's training code (NVLM flags: internvit, pixel shuffle, tile tags, nvlm image
tags, MultimodalTokenizer qwen2p0; bf16; megatron-core 0.19.2 wheel, one H200) fine-tuned for 2
iterations from this project's `hf-to-megatron` output and saved with Megatron-LM's own
save_checkpoint in both formats, every file as NVIDIA's writer left it (bf16 weights, no optimizer
state: --no-save-optim), plus Megatron's own fp32 logits of each on one text+image sample and its
own view of the loaded weights. How it was made, and the run-time patches the example needs at that
tag: the fixture's README, scripts/fixtures/megatron_lm_nvlm.sh and megatron_lm_nvlm_wrapper.py.

Current Megatron-LM stores no ViT sizes in args (examples/multimodal/config.py derives them from
--vision-model-type), so the converter needs `--vision-real-heads 5` here; with it, the default safe
loading must give a model whose CPU float32 logits are Megatron's GPU float32 logits (measured max
abs diff 5.4e-7), every tensor bitwise, and byte-identical shards from the two formats.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    REPO,
    TINY_TOKENIZER,
    assert_files_as_written,
    cli,
    convert_each_format,
    converted_folder,
    load_hf_tensors,
)

FIXTURE = REPO / "tests" / "fixtures" / "megatron-lm-0.19-nvlm"
FORMATS = ("torch", "torch_dist")
REAL_VIT_HEADS = 5
PADDED_VOCAB = 1024  # 1000 tokenizer ids + the added <image> (id 1000) -> padded to 1024
SEQ = 53  # 33 text ids, <image> -> 5 tile-tag ids + 16 image embeddings
LOGITS_ATOL = 1e-5  # measured 5.4e-7: GPU (H200, TF32 off) vs CPU float32 only

NVIDIA_FILES = {
    "torch": {"latest_checkpointed_iteration.txt", "iter_0000002/mp_rank_00/model_optim_rng.pt"},
    "torch_dist": {
        "latest_checkpointed_iteration.txt",
        "iter_0000002/.metadata",
        "iter_0000002/__0_0.distcp",
        "iter_0000002/metadata.json",
    },
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`convert-checkpoint megatron-to-hf --vision-real-heads 5` of each format; (code, output, dst)."""
    flags = ("--vision-real-heads", REAL_VIT_HEADS)
    return convert_each_format(tmp_path_factory.mktemp(FIXTURE.name), FIXTURE, FORMATS, *flags)


@pytest.fixture(scope="module")
def recorded():
    from safetensors.torch import load_file

    return load_file(FIXTURE / "logits.safetensors")


def test_fixture_is_what_nvidia_wrote():
    assert_files_as_written(FIXTURE, NVIDIA_FILES, iteration="2")


@pytest.mark.parametrize("fmt", FORMATS)
def test_without_vit_heads_it_asks_for_them(tmp_path, fmt):
    code, output = cli("megatron-to-hf", FIXTURE / fmt, tmp_path / "out", "--tokenizer", TINY_TOKENIZER)
    assert code != 0 and "--vision-real-heads" in output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_converts_with_safe_loading(converted, fmt):
    dst = converted_folder(converted, fmt)
    config = json.loads((dst / "config.json").read_text())
    assert config["architectures"] == ["NVLM_D"]
    vision, llm = config["vision_config"], config["llm_config"]
    assert (vision["hidden_size"], vision["num_attention_heads"], vision["intermediate_size"]) == (80, 5, 160)
    assert (vision["num_hidden_layers"], vision["image_size"], vision["patch_size"]) == (2, 64, 8)
    assert (llm["hidden_size"], llm["num_attention_heads"], llm["num_key_value_heads"]) == (128, 8, 4)
    assert (llm["intermediate_size"], llm["num_hidden_layers"], llm["vocab_size"]) == (256, 2, PADDED_VOCAB)
    assert llm["rms_norm_eps"] == 1e-6  # args.layernorm_epsilon in Megatron-LM 0.19
    # examples/multimodal's projector LayerNorm uses config.layernorm_epsilon too (TE LayerNormLinear)
    assert config["projector_layer_norm_eps"] == 1e-6


@pytest.mark.parametrize("fmt", FORMATS)
def test_logits_match_megatrons(converted, recorded, fmt):
    from modeling import NVLM_D_Model

    model = NVLM_D_Model.from_pretrained(converted_folder(converted, fmt), dtype=torch.float32).eval()
    ids = recorded["hf_input_ids_image_slots_minus1"].clone()
    assert ids.shape == (1, SEQ) and int((ids == -1).sum()) == 16
    ids[ids == -1] = model.config.img_context_token_id  # Megatron's <image> became these 16 slots
    with torch.no_grad():
        logits = model(
            pixel_values=recorded["pixel_values"], input_ids=ids, image_flags=torch.ones(1, dtype=torch.long)
        ).logits
    reference = recorded[f"logits_{fmt}"]
    assert reference.shape == logits.shape == (1, SEQ, PADDED_VOCAB)
    diff = (logits - reference).abs().max().item()
    assert diff <= LOGITS_ATOL, f"{fmt}: max abs diff {diff:.3g} > {LOGITS_ATOL}"


def test_formats_gave_identical_logits(recorded):
    """Recorded on the GPU: both saves hold the same fine-tuned weights."""
    assert torch.equal(recorded["logits_torch"], recorded["logits_torch_dist"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_tensors_are_megatrons_bit_for_bit(converted, fmt):
    from safetensors.torch import load_file

    dst = converted_folder(converted, fmt)
    state = load_file(FIXTURE / "megatron_state.safetensors")  # Megatron's own view after loading
    got = load_hf_tensors(dst)
    assert len(got) == 61 and {t.dtype for t in got.values()} == {torch.bfloat16}  # as saved (--bf16)
    same = {
        "language_model.model.embed_tokens.weight": "language_model.embedding.word_embeddings.weight",
        "language_model.lm_head.weight": "language_model.output_layer.weight",
        "language_model.model.norm.weight": "language_model.decoder.final_layernorm.weight",
        "language_model.model.layers.1.input_layernorm.weight": (
            "language_model.decoder.layers.1.input_layernorm.weight"
        ),
        "vision_model.embeddings.patch_embedding.weight": "vision_model.conv1.weight",
        "vision_model.encoder.layers.0.ls1": "vision_model.decoder.layers.0.ls1",
        "mlp1.0.weight": "vision_projection.encoder.linear_fc1.layer_norm_weight",
        "mlp1.0.bias": "vision_projection.encoder.linear_fc1.layer_norm_bias",
        "mlp1.1.weight": "vision_projection.encoder.linear_fc1.weight",
        "mlp1.3.weight": "vision_projection.encoder.linear_fc2.weight",
    }
    for hf_name, megatron_name in same.items():
        assert torch.equal(got[hf_name], state[megatron_name]), hf_name
    # ViT QKV: Megatron [q_h, k_h, v_h] per real head -> HF [Q; K; V] blocks of 12 heads (7 zero)
    qkv = state["vision_model.decoder.layers.0.self_attention.linear_qkv.weight"].view(
        REAL_VIT_HEADS, 3, 16, 80
    )
    hf_qkv = got["vision_model.encoder.layers.0.attn.qkv.weight"].view(3, 12, 16, 80)
    assert torch.equal(hf_qkv[:, :REAL_VIT_HEADS], qkv.permute(1, 0, 2, 3))
    assert not hf_qkv[:, REAL_VIT_HEADS:].any()
    code, output = cli("verify", dst, "--against", FIXTURE / fmt)
    assert code == 0, output


def test_both_formats_give_byte_identical_shards(converted):
    legacy, dist = (converted_folder(converted, fmt) for fmt in FORMATS)
    shards = sorted(p.name for p in legacy.glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in dist.glob("*.safetensors"))
    for name in shards:
        assert (legacy / name).read_bytes() == (dist / name).read_bytes(), name
