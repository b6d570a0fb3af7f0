"""Checkpoints written by NVIDIA's own Megatron-LM -> transformers' Qwen2ForCausalLM.

tests/fixtures/megatron-lm-0.19-gpt holds a tiny Qwen2-shaped GPT that Megatron-LM's `pretrain_gpt.py`
(branch core_r0.19.0 on the megatron-core 0.19.2 wheel, one H200) trained for 2 iterations with the
distributed optimizer and saved in both formats, every file as NVIDIA's writer left it (optimizer,
distrib_optim.pt, rng_state, `layernorm_epsilon`, torch_dist without common.pt), plus Megatron's own
logits on fixed ids and its own view of the loaded weights. How it was made: the fixture's README
and scripts/fixtures/megatron_lm_gpt.sh.

The converter must take these with its default safe loading (no --trust-pickle), give a model whose
CPU float32 logits are Megatron's GPU float32 logits (measured max abs diff 3.9e-7), copy every
tensor bit for bit, and give byte-identical shards from the two formats.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    REPO,
    assert_files_as_written,
    cli,
    convert_each_format,
    converted_folder,
    load_hf_tensors,
)

FIXTURE = REPO / "tests" / "fixtures" / "megatron-lm-0.19-gpt"
FORMATS = ("torch", "torch_dist")
LAYERS, HIDDEN, HEADS, GROUPS, HEAD_DIM, FFN = 2, 64, 4, 2, 16, 128
VOCAB, PADDED_VOCAB = 1000, 1024  # NullTokenizer --vocab-size 1000 (eod 999) -> padded to 1024
LOGITS_ATOL = 1e-5  # measured 3.9e-7: GPU (H200, TF32 off) vs CPU float32 only

# Every file NVIDIA's writer put there: nothing may be dropped to make the converter's job easier.
NVIDIA_FILES = {
    "torch": {
        "latest_checkpointed_iteration.txt",
        "iter_0000002/mp_rank_00/model_optim_rng.pt",
        "iter_0000002/mp_rank_00/distrib_optim.pt",
    },
    "torch_dist": {
        "latest_checkpointed_iteration.txt",
        "iter_0000002/.metadata",
        "iter_0000002/__0_0.distcp",
        "iter_0000002/metadata.json",
    },
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`convert-checkpoint megatron-to-hf` of each format, default (safe) loading; (code, output, dst)."""
    return convert_each_format(tmp_path_factory.mktemp(FIXTURE.name), FIXTURE, FORMATS)


@pytest.fixture(scope="module")
def recorded():
    from safetensors.torch import load_file

    return load_file(FIXTURE / "logits.safetensors")


@pytest.fixture(scope="module")
def megatron_state():
    """The model's state dict as Megatron-LM's own load_checkpoint left it (same for both formats)."""
    from safetensors.torch import load_file

    return load_file(FIXTURE / "megatron_state.safetensors")


def test_fixture_is_what_nvidia_wrote():
    assert_files_as_written(FIXTURE, NVIDIA_FILES, iteration="2")


@pytest.mark.parametrize("fmt", FORMATS)
def test_converts_with_safe_loading(converted, fmt):
    dst = converted_folder(converted, fmt)
    _, output, _ = converted[fmt]
    assert "qwen2: 17 source tensors -> 27 HF tensors" in output
    config = json.loads((dst / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    expected = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": GROUPS,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,  # stored by Megatron-LM 0.19 as args.layernorm_epsilon
        "tie_word_embeddings": False,
    }
    assert {k: config[k] for k in expected} == expected
    assert config["rope_parameters"]["rope_theta"] == 1_000_000.0
    assert config.get("head_dim", HIDDEN // HEADS) == HEAD_DIM


@pytest.mark.parametrize("fmt", FORMATS)
def test_logits_match_megatrons(converted, recorded, fmt):
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(converted_folder(converted, fmt), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(recorded["input_ids"]).logits
    reference = recorded[f"logits_{fmt}"]
    assert reference.shape == (2, 32, PADDED_VOCAB) and logits.shape == (2, 32, VOCAB)
    diff = (logits - reference[..., :VOCAB]).abs().max().item()
    assert diff <= LOGITS_ATOL, f"{fmt}: max abs diff {diff:.3g} > {LOGITS_ATOL}"


def test_formats_gave_identical_logits(recorded):
    """Recorded on the GPU: the two saves of one seeded run hold the same model."""
    assert torch.equal(recorded["logits_torch"], recorded["logits_torch_dist"])


def _expected_hf(state: dict) -> dict:
    """Megatron's tensors in Qwen2's names, written out here (not through mappings/): fused QKV rows
    are [q heads of group g | k_g | v_g] per KV group, fc1 is [gate; up], padded vocab rows dropped."""
    per_group = HEADS // GROUPS
    hf = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:VOCAB],
        "lm_head.weight": state["output_layer.weight"][:VOCAB],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
    }
    for i in range(LAYERS):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = state[src + f"self_attention.linear_qkv.{kind}"]
            qkv = qkv.reshape(GROUPS, per_group + 2, HEAD_DIM, *qkv.shape[1:])
            rest = qkv.shape[3:]
            hf[dst + f"self_attn.q_proj.{kind}"] = qkv[:, :per_group].reshape(-1, *rest)
            hf[dst + f"self_attn.k_proj.{kind}"] = qkv[:, per_group].reshape(-1, *rest)
            hf[dst + f"self_attn.v_proj.{kind}"] = qkv[:, per_group + 1].reshape(-1, *rest)
        hf[dst + "self_attn.o_proj.weight"] = state[src + "self_attention.linear_proj.weight"]
        gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2)
        hf[dst + "mlp.gate_proj.weight"], hf[dst + "mlp.up_proj.weight"] = gate, up
        hf[dst + "mlp.down_proj.weight"] = state[src + "mlp.linear_fc2.weight"]
        hf[dst + "input_layernorm.weight"] = state[src + "input_layernorm.weight"]
        hf[dst + "post_attention_layernorm.weight"] = state[src + "pre_mlp_layernorm.weight"]
    return hf


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_tensor_is_megatrons_bit_for_bit(converted, megatron_state, fmt):
    dst = converted_folder(converted, fmt)
    assert len(megatron_state) == 17 and all(t.dtype == torch.float32 for t in megatron_state.values())
    expected, got = _expected_hf(megatron_state), load_hf_tensors(dst)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert (got[name].dtype, got[name].shape) == (torch.float32, tensor.shape), name
        assert torch.equal(got[name], tensor), name
    code, output = cli("verify", dst, "--against", FIXTURE / fmt)
    assert code == 0, output


def test_both_formats_give_byte_identical_shards(converted):
    legacy, dist = (converted_folder(converted, fmt) for fmt in FORMATS)
    shards = sorted(p.name for p in legacy.glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in dist.glob("*.safetensors"))
    for name in shards:
        assert (legacy / name).read_bytes() == (dist / name).read_bytes(), name
    index = "model.safetensors.index.json"
    if (legacy / index).exists() or (dist / index).exists():
        assert (legacy / index).read_bytes() == (dist / index).read_bytes()
