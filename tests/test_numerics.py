"""Megatron-Core's rounding order on our class (converter/parity/numerics.py): with every named
source aligned, bfloat16 logits are bit-identical to Megatron's at TP=1; the patches come off
completely; the ablation script attributes the difference."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_TOKENIZER, cli, make_megatron_checkpoint

pytest.importorskip("megatron.core", reason="the Megatron side is needed")


def _bf16_pair(root, tp: str):
    megatron = make_megatron_checkpoint(
        root / "megatron", "--preset", "tiny", "--tp", tp, "--dtype", "bfloat16", "--format", "torch"
    )
    code, output = cli("megatron-to-hf", megatron, root / "hf", "--tokenizer", TINY_TOKENIZER)
    assert code == 0, output
    return megatron, root / "hf"


@pytest.fixture(scope="module")
def compact_cases(tmp_path_factory):
    """Short text, a 3-tile image and a two-turn image conversation: every path the default cases
    take (text, tiles + thumbnail, history), without their 1k-token text and 7 tiles, which make a
    bf16 run on two CPU cores several times slower and test nothing more here."""
    from converter.parity.cases import draw_picture
    from modeling import get_config

    root, size = tmp_path_factory.mktemp("numerics-cases"), get_config("tiny").image_size
    draw_picture(2 * size, size, 1).save(root / "wide.png")
    draw_picture(size, size, 3).save(root / "square.png")
    cases = [
        {"name": "short text", "question": "Describe a sunny day in one sentence."},
        {"name": "3-tile image", "question": "What is shown in the image?", "image": "wide.png"},
        {
            "name": "two-turn",
            "question": "And what colour is the background?",
            "image": "square.png",
            "history": [["<image>\nWhat shapes are there?", "Rectangles and circles."]],
        },
    ]
    (root / "cases.json").write_text(json.dumps(cases))
    return root / "cases.json"


@pytest.fixture(scope="module")
def tp1_bf16(tmp_path_factory):
    return _bf16_pair(tmp_path_factory.mktemp("numerics-tp1"), "1")


@pytest.fixture(scope="module")
def tp2_bf16(tmp_path_factory):
    return _bf16_pair(tmp_path_factory.mktemp("numerics-tp2"), "2")


@pytest.mark.slow
@pytest.mark.parametrize("pair", ["tp1_bf16", "tp2_bf16"])
def test_aligned_numerics_give_bit_identical_bf16_logits(pair, request, compact_cases, tmp_path):
    """At TP=2 too: Megatron's per-rank partial sums are emulated (tp_reductions)."""
    from click.testing import CliRunner

    from converter.parity_cli import main

    megatron, hf = request.getfixturevalue(pair)
    args = ["logits", "--megatron", megatron, "--hf", hf, "--dtype", "bf16", "--generate", "4"]
    args += ["--cases", compact_cases]
    result = CliRunner().invoke(
        main, [str(a) for a in args + ["--hf-numerics", "megatron", "--report", tmp_path / "r"]]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["hf_numerics"] == "megatron" and report["dtype"] == "bf16"
    for case in report["cases"]:
        assert case["max_abs_diff"] == 0.0 and case["kl"] == 0.0, case["name"]
        assert case["top1_agreement"] == 1.0, case["name"]
        assert all(row["max_abs_diff"] == 0.0 for row in case["layers"]), case["name"]


def test_the_patches_come_off(tp1_bf16):
    from converter.parity import numerics
    from converter.parity.logits import load_hf

    _, hf = tp1_bf16
    model = load_hf(hf, torch.bfloat16, "cpu")
    ids = torch.arange(1, 40).unsqueeze(0)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    from transformers import AutoTokenizer

    from modeling import build_prompt

    tokenizer = AutoTokenizer.from_pretrained(hf)
    image_ids = tokenizer(
        build_prompt("What?", [2], model.config.num_image_token), return_tensors="pt"
    ).input_ids

    def logits():
        with torch.no_grad():
            return model(input_ids=ids).logits, model(
                input_ids=image_ids, pixel_values=pixels.bfloat16()
            ).logits

    before = logits()
    with numerics.megatron_numerics(model, numerics.SOURCES, output_rows=1024):
        assert model.language_model.config._attn_implementation == numerics.MEGATRON_ATTENTION
        inside = logits()
    after = logits()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not any(torch.equal(a, b) for a, b in zip(before, inside))  # it did change the rounding
    assert model.language_model.config._attn_implementation == "sdpa"
    assert not any("forward" in m.__dict__ or "_qk_norm" in m.__dict__ for m in model.modules())
    with (
        pytest.raises(ValueError, match="unknown numerics sources"),
        numerics.megatron_numerics(model, ["x"]),
    ):
        pass


@pytest.mark.slow
def test_ablation_script_attributes_the_difference(tp1_bf16, compact_cases, tmp_path):
    megatron, hf = tp1_bf16
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "parity_ablation.py"),
            "--megatron",
            str(megatron),
            "--hf",
            str(hf),
        ]
        + ["--device", "cpu", "--cases", str(compact_cases), "--out", str(tmp_path / "a")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "a" / "ablation.json").read_text())
    variants = {v["variant"]: v["cases"] for v in report["variants"]}
    from converter.parity.numerics import SOURCES

    assert len(variants) == 1 + 2 * len(SOURCES) - 1  # as shipped, each source alone, cumulative
    everything = variants["+ " + " + ".join(SOURCES)]
    assert all(c["identical_logits"] == 1.0 and c["kl"] == 0.0 for c in everything)
    shipped = variants["as shipped"]
    assert all(c["identical_logits"] < 1.0 and c["first_difference"] for c in shipped)
    # the float32 reference: both bfloat16 runs are measured against the exact function
    assert all(row["kl_from_fp32"] > 0 for row in report["megatron_vs_fp32"])
    table = (tmp_path / "a" / "ablation.md").read_text()
    assert "| as shipped |" in table and "Distance from the exact function" in table
