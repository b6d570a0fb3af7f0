"""scripts/bench_model.py: its counts against hand-computed numbers, and one whole run on the CPU.

No wall time is checked: only that the script runs end to end, writes what it says, and that the
release's formulation it times computes what our class computes."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import REPO

from modeling import NVLM_D_Model, get_config


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_model", REPO / "scripts" / "bench_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_counts_of_the_72b_slice(bench):
    """4 LLM + 4 ViT layers of nvlm-d-72b, 7 tiles, a 1850-token prompt (built on the meta device)."""
    with torch.device("meta"):
        model = NVLM_D_Model(get_config("nvlm-d-72b", llm_num_hidden_layers=4, vision_num_hidden_layers=4))
    seq = 1850
    flops = bench.prefill_flops(model, tiles=7, seq_len=seq, logit_positions=1)
    vit_layer = 3 * 4096 * 3200 + 3200 * 4096 + 2 * 3200 * 12800  # qkv, proj (dummy heads included), fc1, fc2
    llm_layer = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 29568  # q, o, k, v, gate/up/down
    assert flops["vit_linear"] == 2 * 7 * 1025 * 4 * vit_layer
    assert flops["vit_patch_embedding"] == 2 * 7 * 1024 * 3200 * 3 * 14 * 14
    assert flops["vit_attention"] == 4 * 7 * 1025**2 * 4096 * 4
    assert flops["projector"] == 2 * 1792 * (12800 * 29568 + 29568 * 8192)
    assert flops["llm_linear"] == 2 * seq * 4 * llm_layer
    assert flops["llm_attention"] == 2 * seq * (seq + 1) * 8192 * 4
    assert flops["logits"] == 2 * 152064 * 8192
    all_positions = bench.prefill_flops(model, tiles=7, seq_len=seq, logit_positions=seq)
    assert all_positions["logits"] == seq * flops["logits"]
    total = sum(flops.values())
    assert 23.0e12 < total < 24.0e12  # the issue's ~28 TFLOP less the ~4.6 TFLOP of all-position logits

    weights = bench.decode_bytes(model)  # bytes on the meta device: float32 here
    llm_params = 4 * (llm_layer + 8192 + 1024 * 2 + 2 * 8192)  # + q/k/v biases + the two norms
    assert weights == {
        "llm_layers": 4 * llm_params,
        "final_norm": 4 * 8192,
        "lm_head": 4 * 152064 * 8192,
        "embedding_row": 4 * 8192,
    }


def test_release_formulation_is_switched_on_and_off(bench):
    torch.manual_seed(0)
    model = NVLM_D_Model(get_config("tiny")).eval()
    layer = model.vision_model.encoder.layers[0]
    with bench.release_formulation(model) as kwargs:
        assert kwargs == {"logits_to_keep": 0}
        assert model.language_model.config._attn_implementation == "eager"
        assert layer.attn.forward.__func__ is bench.naive_vit_attention
        assert layer.norm1.forward.__func__ is bench.plain_rms_norm
    assert model.language_model.config._attn_implementation == "sdpa"
    assert "forward" not in vars(layer.attn) and "forward" not in vars(layer.norm1)
    assert not model.language_model.lm_head._forward_hooks


@pytest.mark.slow
def test_whole_run_on_cpu(bench, tmp_path):
    out = tmp_path / "bench.json"
    argv = [
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--dtype",
        "fp32",
        "--llm-layers",
        "2",
        "--vit-layers",
        "2",
    ]
    argv += ["--new-tokens", "6", "--repeats", "1", "--warmup", "1", "--quick-floor", "--json", str(out)]
    argv += ["--profile", str(tmp_path / "profile.txt")]
    bench.main(argv)
    profiles = (tmp_path / "profile.txt").read_text()
    for name in ("ours", "eager"):
        assert f"== {name}, 1 new token(s)\n" in profiles and f"== {name}, 6 new token(s)\n" in profiles
    report = json.loads(out.read_text())
    assert report["command"] == "scripts/bench_model.py " + " ".join(argv)
    assert report["model"]["tiles"] == 7 and report["model"]["image_tokens"] == 7 * 16
    assert report["floor"]["matmul_tflops"] > 0 and report["floor"]["bandwidth_tbs"] > 0
    for name in ("ours", "eager"):
        path = report["paths"][name]
        assert path["prefill_s"] > 0 and path["prefill_x_floor"] > 0 and path["decode_x_floor"] is not None
    assert report["paths"]["eager"]["prefill_flops"] > report["paths"]["ours"]["prefill_flops"]
    outputs = report["outputs"]
    assert outputs["greedy_vs_ours"]["eager"]["identical"]
    assert outputs["ours_greedy_is_own_argmax"]
    assert outputs["top1_agreement"] == 1.0
    assert outputs["logits_max_abs_diff"] < 1e-5 and outputs["logits_max_abs"] > 1e-2
