"""scripts/bench_model.py: its counts against hand-computed numbers, the published code on our
weights, and one whole run on the CPU.

No wall time is checked: only that the script runs end to end, writes what it says, and that the
published code it times computes what our class computes, on the same tensors. The published code
is not part of this project: the tests that run it look for it in $NVLM_RELEASE_CODE or
.device/torch_ref_model (see docs/PERFORMANCE.md) and are skipped without it."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO

from modeling import NVLM_D_Model, get_config

RELEASE_CODE = Path(os.environ.get("NVLM_RELEASE_CODE", REPO / ".device" / "torch_ref_model"))
needs_release_code = pytest.mark.skipif(
    not (RELEASE_CODE / "modeling_nvlm_d.py").is_file(), reason=f"no published NVLM-D code in {RELEASE_CODE}"
)


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
    flops = bench.prefill_flops(model, tiles=7, seq_len=seq)
    vit_layer = 3 * 3200 * 3200 + 3200 * 3200 + 2 * 3200 * 12800  # qkv, proj over the 25 real heads, fc1, fc2
    llm_layer = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 29568  # q, o, k, v, gate/up/down
    assert flops["vit_linear"] == 2 * 7 * 1025 * 4 * vit_layer
    assert flops["vit_patch_embedding"] == 2 * 7 * 1024 * 3200 * 3 * 14 * 14
    assert flops["vit_attention"] == 4 * 7 * 1025**2 * 3200 * 4
    assert flops["projector"] == 2 * 1792 * (12800 * 29568 + 29568 * 8192)
    assert flops["llm_linear"] == 2 * seq * 4 * llm_layer
    assert flops["llm_attention"] == 2 * seq * (seq + 1) * 8192 * 4
    assert flops["logits"] == 2 * 152064 * 8192
    assert 22.5e12 < sum(flops.values()) < 23.5e12

    weights = bench.decode_bytes(model)  # bytes on the meta device: float32 here
    llm_params = 4 * (llm_layer + 8192 + 1024 * 2 + 2 * 8192)  # + q/k/v biases + the two norms
    assert weights == {
        "llm_layers": 4 * llm_params,
        "final_norm": 4 * 8192,
        "lm_head": 4 * 152064 * 8192,
        "embedding_row": 4 * 8192,
    }


def test_depths_and_a_folder_without_the_published_code(bench, tmp_path, capsys):
    assert bench.parse_args([]).depths == [(4, 4), (40, 45)]
    assert bench.parse_args(["--depths", "2+3"]).depths == [(2, 3)]
    with pytest.raises(SystemExit):
        bench.parse_args(["--depths", "4"])
    (tmp_path / "modeling_nvlm_d.py").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--release-code", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(tmp_path) in err and "modeling_intern_vit.py" in err and "Traceback" not in err


@needs_release_code
def test_published_code_runs_on_our_tensors_and_agrees(bench):
    """The published NVLM_D_Model built by the bench holds our very parameter tensors (no copy) and,
    in float32, gives our logits and our greedy tokens (through its own generate, shimmed for 5.x)."""
    release = bench.load_release_code(RELEASE_CODE)
    model = bench.build_model("tiny", 2, 2, "cpu", torch.float32, seed=1)
    theirs = bench.build_release_model(release, model)
    ours_tensors = {name: t.data_ptr() for name, t in model.state_dict().items()}
    assert {name: t.data_ptr() for name, t in theirs.state_dict().items()} == ours_tensors
    assert type(theirs).__module__ == "nvlm_release_code.modeling_nvlm_d"
    inputs = bench.make_inputs(model, None, torch.device("cpu"))
    paths = bench.generation_paths(model, theirs, bench.parse_args(["--device", "cpu"]))
    tokens = {name: generate(inputs, 8)[0].tolist() for name, generate in paths.items()}
    assert tokens["published code"] == tokens["ours"] == tokens["ours, transformers loop"]
    assert len(set(tokens["ours"])) > 1
    logits = bench.teacher_forced_logits(model, theirs, inputs, tokens["ours"])
    compared = bench.compare_logits(logits)
    assert compared["top1_agreement"] == 1.0 and compared["positions"] == 8
    assert compared["max_abs_diff"] < 1e-5 and compared["max_abs_logit"] > 1e-2


@pytest.mark.slow
def test_whole_run_on_cpu(bench, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--preset", "tiny", "--dtype", "fp32", "--depths", "2+2,1+2"]
    argv += ["--new-tokens", "6", "--repeats", "1", "--warmup", "1", "--quick-floor", "--json", str(out)]
    argv += ["--profile", str(tmp_path / "profile.txt")]
    with_release = (RELEASE_CODE / "modeling_nvlm_d.py").is_file()
    if with_release:
        argv += ["--release-code", str(RELEASE_CODE)]
    bench.main(argv)
    profiles = (tmp_path / "profile.txt").read_text()
    names = ("ours", "published code") if with_release else ("ours",)
    for depth in ("2+2", "1+2"):
        for name in names:
            assert f"== {depth} layers, {name}, 1 new token(s)\n" in profiles
            assert f"== {depth} layers, {name}, 6 new token(s)\n" in profiles
    report = json.loads(out.read_text())
    assert report["command"] == "scripts/bench_model.py " + " ".join(argv)
    assert report["floor"]["matmul_tflops"] > 0 and report["floor"]["bandwidth_tbs"] > 0
    assert [d["model"]["preset_dims"]["llm_layers"] for d in report["depths"]] == [2, 1]
    for depth in report["depths"]:
        assert depth["model"]["tiles"] == 7 and depth["model"]["image_tokens"] == 7 * 16
        assert set(depth["paths"]) == {"ours", "ours, transformers loop"} | (
            {"published code"} if with_release else set()
        )
        for path in depth["paths"].values():
            assert (
                path["prefill_s"] > 0 and path["prefill_x_floor"] > 0 and path["decode_x_floor"] is not None
            )
        assert depth["paths"]["ours"]["decode_path"] == "transformers' loop"  # fast decode: CUDA by default
        assert all(g["identical"] for g in depth["greedy_vs_ours"].values())
        if with_release:
            assert depth["logits_vs_published"]["top1_agreement"] == 1.0
    check = report["fp32_check"]
    assert check["new_tokens"] == 6 and all(c["identical"] for c in check["vs_reference"].values())
    assert len(check["vs_reference"]) == (2 if with_release else 1)
