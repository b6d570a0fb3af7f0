"""parity-check logits on the tiny preset at TP=2, float32, CPU (what CI runs)."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_TOKENIZER, cli

pytest.importorskip("megatron.core", reason="the Megatron side is needed")


@pytest.fixture(scope="module")
def tp2_hf(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "hf"
    code, output = cli("megatron-to-hf", checkpoints["tp2-dist"], out, "--tokenizer", TINY_TOKENIZER)
    assert code == 0, output
    return out


def _parity(*args):
    from click.testing import CliRunner

    from converter.parity_cli import main

    result = CliRunner().invoke(main, ["logits", *[str(a) for a in args]], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.mark.slow
def test_logits_parity_tp2_fp32(checkpoints, tp2_hf, tmp_path):
    code, output = _parity("--megatron", checkpoints["tp2-dist"], "--hf", tp2_hf, "--report", tmp_path / "r")
    assert code == 0, output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [c["name"] for c in report["cases"]] == [
        "short text",
        "long text",
        "1-tile image",
        "7-tile image",
        "two-turn",
    ]
    long_text = report["cases"][1]
    assert long_text["tokens"] >= 1000
    assert report["cases"][3]["tiles"] == 7  # 6 tiles + thumbnail
    for case in report["cases"]:
        assert case["max_abs_diff"] <= 1e-4, case["name"]
        assert case["top1_agreement"] == 1.0 and case["greedy_match"] == 1.0, case["name"]
        assert case["positions"] == case["tokens"]  # all positions compared
        assert len(case["greedy_megatron"]) >= 1
        assert [row["module"] for row in case["layers"]][-2:] == ["llm.layers.0", "llm.layers.1"]
        # Megatron's prompt construction differs from ours (newline after <|im_end|>): shown, not hidden
        assert not case["prompt_check"]["identical"]
    image_layers = [row["module"] for row in report["cases"][2]["layers"]]
    assert image_layers[:3] == ["vision.layers.0", "vision.layers.1", "projector"]
    assert (tmp_path / "r" / "report.md").read_text().count("| yes |") == 5
    assert (tmp_path / "r" / "layer_errors.png").stat().st_size > 10_000


def test_outside_tolerance_exits_1(checkpoints, tp2_hf, tmp_path):
    """A tolerance no float computation meets: the run reports it and exits 1; the JUnit failure
    names the metric, the threshold and where the threshold came from."""
    import xml.etree.ElementTree as ET

    code, output = _parity(
        "--megatron",
        checkpoints["tp2-dist"],
        "--hf",
        tp2_hf,
        "--report",
        tmp_path / "r",
        "--generate",
        0,
        "--max-abs-diff",
        0,
        "--cases",
        _one_case(tmp_path),
        "--junit",
        tmp_path / "junit.xml",
    )
    assert code == 1, output
    assert "OUTSIDE tolerance" in output
    assert "hello: max_abs_diff: max |ours - Megatron| = " in output and "[--max-abs-diff]: FAILED" in output
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("1", "1")
    message = suite.find("testcase").find("failure").get("message")
    assert "must be <= 0 [--max-abs-diff]" in message and "max_kl" not in message


def _one_case(tmp_path):
    path = tmp_path / "cases.json"
    path.write_text(json.dumps([{"name": "hello", "question": "Say hello."}]))
    return path


def test_bench_scores_both_codebases_alike(checkpoints, tp2_hf, tmp_path):
    """Seeded random weights answer noise, identically on both sides: every delta is 0.0. The JUnit
    has one test case per family; the card gets the table and its manifest entry is re-sealed."""
    import shutil
    import xml.etree.ElementTree as ET

    from converter.parity.cases import draw_picture

    card_folder = tmp_path / "card"
    shutil.copytree(tp2_hf, card_folder)

    (tmp_path / "images").mkdir()
    items = []
    for k, (metric, answers, options) in enumerate(
        [
            ("vqa", ["yes"] * 10, None),
            ("anls", ["invoice 42"], None),
            ("relaxed", ["12"], None),
            ("mc", ["B"], ["red", "blue", "green"]),
            ("exact", ["NVLM"], None),
        ]
    ):
        draw_picture(128, 64, k).save(tmp_path / "images" / f"{k}.png")
        items.append(
            {
                "id": str(k),
                "benchmark": metric,
                "image": f"images/{k}.png",
                "question": "What is it?",
                "answers": answers,
                "metric": metric,
                "options": options,
            }
        )
    items.append(
        {"id": "text", "benchmark": "exact", "question": "Say NVLM.", "answers": ["NVLM"], "metric": "exact"}
    )
    data = tmp_path / "bench.jsonl"
    data.write_text("\n".join(json.dumps(item) for item in items) + "\n")
    from click.testing import CliRunner

    from converter.parity_cli import main

    result = CliRunner().invoke(
        main,
        [
            "bench",
            "--megatron",
            str(checkpoints["tp2-dist"]),
            "--hf",
            str(tp2_hf),
            "--data",
            str(data),
            "--report",
            str(tmp_path / "r"),
            "--max-new-tokens",
            "6",
            "--junit",
            str(tmp_path / "junit.xml"),
            "--card",
            str(card_folder),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert set(report["benchmarks"]) == {"vqa", "anls", "relaxed", "mc", "exact"}
    assert report["benchmarks"]["exact"]["n"] == 2
    for entry in report["benchmarks"].values():
        assert entry["delta"] == 0.0 and 0 <= entry["megatron"] <= 100
    assert all(item["same_answer"] for item in report["items"])
    assert (
        "| benchmark | metric | n | majority baseline | Megatron | HF | delta | Megatron fp32 | ok |"
        in (tmp_path / "r" / "report.md").read_text()
    )
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("5", "0")
    assert sorted(t.get("name") for t in suite.findall("testcase")) == sorted(report["benchmarks"])
    card = (card_folder / "README.md").read_text()
    assert "### `parity-check bench`, fp32, Megatron at TP=2 PP=1, `bench.jsonl`" in card
    assert card.count("| pass |") == 5
    code, output = cli("verify", card_folder)
    assert code == 0, output
