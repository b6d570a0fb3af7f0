"""parity-check made for CI: --tolerances, --junit, --card, bf16 judged against a float32 run, and
the GPU workflow file (.github/workflows/parity.yml)."""

from __future__ import annotations

import json
import shlex
import xml.etree.ElementTree as ET

import pytest
from conftest import REPO, TINY_TOKENIZER, cli

TRAINED = REPO / "tests" / "fixtures" / "nvlm-d-small-trained" / "megatron-tp2"
WORKFLOW = REPO / ".github" / "workflows" / "parity.yml"
CI_TOLERANCES = REPO / ".github" / "parity-tolerances.toml"


def _parity(*args):
    from click.testing import CliRunner

    from converter.parity_cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


# -- thresholds and their sources (no model runs) --------------------------------------------------


def test_tolerances_precedence_and_sources(tmp_path):
    from converter.parity.tolerances import Tolerances

    path = tmp_path / "t.toml"
    path.write_text(
        '[fp32]\nmax_kl = 1e-7\n[bf16]\nmax_kl_ratio = 1.2\ntop1_slack = "off"\n'
        '[cases."long text".bf16]\nmax_kl_ratio = 2.0\n[families.chart.bf16]\nmax_delta_excess = 3\n'
    )
    bf16 = Tolerances("logits", "bf16", path)
    long_text, short = bf16.for_name("long text"), bf16.for_name("short text")
    assert (
        long_text["max_kl_ratio"].value == 2.0
        and '[cases."long text".bf16]' in long_text["max_kl_ratio"].source
    )
    assert short["max_kl_ratio"].value == 1.2 and short["max_kl_ratio"].source == f"{path} [bf16]"
    assert short["top1_slack"].value is None
    assert short["max_abs_diff_ratio"].source == "default (bf16)"
    fp32 = Tolerances("logits", "fp32", path, overrides={"--max-kl": ("max_kl", 1e-3)})
    assert fp32.for_name("x")["max_kl"].value == 1e-3 and fp32.for_name("x")["max_kl"].source == "--max-kl"
    assert Tolerances("bench", "bf16", path).for_name("chart")["max_delta_excess"].value == 3.0
    json_path = tmp_path / "t.json"
    json_path.write_text(json.dumps({"fp32": {"max_abs_diff": None}}))
    assert Tolerances("logits", "fp32", json_path).for_name("x")["max_abs_diff"].value is None


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"fp32": {"max_abs_dif": 1}}', "unknown threshold 'max_abs_dif'"),
        ('{"fp16": {}}', "unknown table 'fp16'"),
        ('{"fp32": {"max_kl_ratio": 2}}', "applies to bf16 only"),
        ('{"bf16": {"max_kl_ratio": "big"}}', "expected a number"),
        ('{"cases": {"short text": {"bf32": {}}}}', "expected fp32 or bf16"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_tolerance_files_are_refused_in_one_line(tmp_path, text, message):
    from converter.errors import ConversionError
    from converter.parity.tolerances import Tolerances

    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(ConversionError, match=message) as caught:
        Tolerances("logits", "fp32", path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_relative_checks_pass_on_either_floor():
    """bf16: ours is held to Megatron's own error (from fp32, or across layouts), with the margin."""
    from converter.parity.judge import logits_checks
    from converter.parity.tolerances import Tolerances

    def metrics(kl, top1, max_abs, positions=100):
        return {"kl": kl, "top1_agreement": top1, "max_abs_diff": max_abs, "positions": positions}

    thresholds = Tolerances("logits", "bf16").for_name("case")
    row = {**metrics(4e-4, 0.97, 0.3), "greedy_match": 0.0}
    row["vs_fp32"] = {"megatron": metrics(2e-4, 0.98, 0.2), "hf": metrics(2.9e-4, 0.97, 0.25)}
    checks = {c["threshold"]: c for c in logits_checks(row, thresholds)}
    assert set(checks) == {"max_kl_ratio", "max_abs_diff_ratio", "top1_slack"}  # greedy: not in bf16
    assert all(c["ok"] for c in checks.values()) and checks["max_kl_ratio"]["value"] == pytest.approx(1.45)
    assert checks["top1_slack"]["value"] == 3 and checks["top1_slack"]["limit"] == 2 + 2
    row["vs_fp32"]["hf"] = metrics(4e-4, 0.90, 0.25)  # KL 2x Megatron's, 10 argmax misses
    failed = {c["threshold"] for c in logits_checks(row, thresholds) if not c["ok"]}
    assert failed == {"max_kl_ratio", "top1_slack"}
    row["megatron_other_layout"] = {"layout": "TP=1 PP=1", **metrics(3e-4, 0.96, 0.4)}  # Megatron vs itself
    checks = {c["threshold"]: c for c in logits_checks(row, thresholds)}
    assert all(c["ok"] for c in checks.values())
    assert checks["max_kl_ratio"]["floor"] == "Megatron TP=1 PP=1" and checks["max_kl_ratio"]["other_floors"]


def test_bench_bf16_is_held_to_megatrons_own_distance_from_fp32():
    from converter.parity.judge import bench_checks
    from converter.parity.tolerances import Tolerances

    thresholds = Tolerances("bench", "bf16").for_name("chart")
    near = {"megatron": 90.0, "hf": 88.0, "delta": -2.0, "megatron_fp32": 89.0}  # 1 point beyond Megatron's
    far = {**near, "hf": 86.0, "delta": -4.0}  # 3 points beyond
    assert [c["ok"] for c in bench_checks(near, thresholds)] == [True]
    (check,) = bench_checks(far, thresholds)
    assert not check["ok"] and check["value"] == 2.0 and check["source"] == "default (bf16)"
    fp32 = Tolerances("bench", "fp32").for_name("chart")
    assert [c["ok"] for c in bench_checks({**near, "delta": 0.0}, fp32)] == [True]
    assert [c["ok"] for c in bench_checks(near, fp32)] == [False]  # fp32: the same score, exactly


def test_junit_counts_and_failure_text(tmp_path):
    from converter.parity import junit
    from converter.parity.judge import logits_checks
    from converter.parity.tolerances import Tolerances

    thresholds = Tolerances("logits", "fp32").for_name("x")
    good = {"max_abs_diff": 1e-6, "top1_agreement": 1.0, "kl": 1e-12, "greedy_match": 1.0}
    bad = {**good, "max_abs_diff": 0.5, "kl": 1e-3}
    cases = [
        {"name": name, "classname": "parity.logits.fp32", "checks": logits_checks(row, thresholds)}
        for name, row in (("a & b", good), ("c", bad), ("d", good))
    ]
    path = junit.write(tmp_path / "j" / "out.xml", junit.suite("s", {"dtype": "fp32"}, cases, 1.5))
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    assert (root.get("tests"), root.get("failures")) == ("3", "1")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "0")
    testcases = suite.findall("testcase")
    assert [t.get("name") for t in testcases] == ["a & b", "c", "d"]
    failure = testcases[1].find("failure")
    assert "max_abs_diff" in failure.get("message") and "max_kl" in failure.get("message")
    assert "<= 0.0001" in failure.get("message") and "default (fp32)" in failure.get("message")
    assert testcases[0].find("failure") is None


def test_card_entries_replace_their_own_kind():
    from converter.model_card import PARITY_BEGIN, with_parity_entry

    card = "---\nlicense: other\n---\n\n# A model\n"
    once = with_parity_entry(card, "logits bf16 TP=2 PP=1", "### run 1\n")
    twice = with_parity_entry(once, "logits bf16 TP=2 PP=1", "### run 2\n")
    both = with_parity_entry(twice, "logits fp32 TP=1 PP=1", "### fp32\n")
    assert twice.count(PARITY_BEGIN) == 1 and "run 1" not in twice and "run 2" in twice
    assert both.startswith(card.rstrip()) and both.count("## Parity") == 1
    assert both.index("### run 2") < both.index("### fp32")  # entries in key order
    assert with_parity_entry(both, "logits fp32 TP=1 PP=1", "### fp32\n") == both


# -- the shipped trained example in bf16 -----------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pytest.importorskip("megatron.core", reason="the Megatron side runs with megatron-core")
    from PIL import Image  # noqa: F401

    from converter.parity.cases import draw_picture

    root = tmp_path_factory.mktemp("trained-ci")
    code, output = cli("megatron-to-hf", TRAINED, root / "hf", "--tokenizer", TINY_TOKENIZER)
    assert code == 0, output
    draw_picture(64, 64, 1).save(root / "picture.png")
    cases = [
        {"name": "short text", "question": "Describe a sunny day in one sentence."},
        {"name": "1-tile image", "question": "What is shown in the image?", "image": "picture.png"},
    ]
    (root / "cases.json").write_text(json.dumps(cases))
    return root


def test_tolerance_file_errors_exit_2_before_any_model_runs(trained, tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"cases": {"long txt": {"bf16": {"max_kl_ratio": 2}}}}))
    code, output = _parity(
        "logits",
        "--megatron",
        TRAINED,
        "--hf",
        trained / "hf",
        "--dtype",
        "bf16",
        "--cases",
        trained / "cases.json",
        "--tolerances",
        bad,
        "--report",
        tmp_path / "r",
    )
    assert code == 2 and "'long txt', not in this run" in output and "Traceback" not in output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_bf16_default_passes_for_the_right_reason_and_a_perturbed_weight_fails(trained, tmp_path):
    """Default bf16 thresholds on the shipped trained model: ours is no further from Megatron's
    float32 run than Megatron's own bf16 run is (x1.5). The projector LayerNorm weight scaled by
    1.02 in the folder (a conversion error small enough to hide in bf16 noise) must fail."""
    import shutil

    from safetensors.torch import load_file, save_file

    hf = trained / "hf"
    code, output = _parity(
        "logits",
        "--megatron",
        TRAINED,
        "--hf",
        hf,
        "--dtype",
        "bf16",
        "--cases",
        trained / "cases.json",
        "--generate",
        4,
        "--report",
        tmp_path / "good",
        "--junit",
        tmp_path / "good.xml",
        "--tolerances",
        CI_TOLERANCES,
        "--card",
        hf,
    )
    assert code == 0, output
    report = json.loads((tmp_path / "good" / "report.json").read_text())
    assert report["reference"].startswith("Megatron float32")
    assert report["tolerance_sources"]["thresholds"]["max_kl_ratio"]["source"] == f"{CI_TOLERANCES} [bf16]"
    for case in report["cases"]:
        assert {c["threshold"] for c in case["checks"]} == {
            "max_kl_ratio",
            "max_abs_diff_ratio",
            "top1_slack",
        }
        assert all(c["ok"] and c["floor"] == "fp32" for c in case["checks"])
        assert 0 < case["vs_fp32"]["megatron"]["kl"] < 1e-2 and 0 < case["vs_fp32"]["hf"]["kl"] < 1e-2
    suite = ET.parse(tmp_path / "good.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("2", "0")
    card = (hf / "README.md").read_text()
    assert "### `parity-check logits`, bf16, Megatron at TP=2 PP=1" in card and card.count("| pass |") == 2
    code, output = cli("verify", hf)
    assert code == 0, output  # the card's manifest entry was re-sealed

    bad = tmp_path / "perturbed"
    shutil.copytree(hf, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["mlp1.0.weight"] = tensors["mlp1.0.weight"] * 1.02
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    code, output = _parity(
        "logits",
        "--megatron",
        TRAINED,
        "--hf",
        bad,
        "--dtype",
        "bf16",
        "--cases",
        trained / "cases.json",
        "--generate",
        0,
        "--report",
        tmp_path / "bad",
        "--junit",
        tmp_path / "bad.xml",
    )
    assert code == 1, output
    suite = ET.parse(tmp_path / "bad.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("2", "1")
    image = [t for t in suite.findall("testcase") if t.get("name") == "1-tile image"][0]
    assert "max_kl_ratio" in image.find("failure").get("message")
    assert suite.findall("testcase")[0].find("failure") is None  # text only: the projector is not used


def test_card_refuses_a_card_changed_by_someone_else(trained, tmp_path):
    import shutil

    from converter.errors import ConversionError
    from converter.model_card import add_parity_entry

    folder = tmp_path / "hf"
    shutil.copytree(trained / "hf", folder)
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nedited by hand\n")
    with pytest.raises(ConversionError, match="changed since nvlm_port_manifest.json recorded it"):
        add_parity_entry(folder, "logits fp32 TP=2 PP=1", "### x\n")


# -- the GPU workflow ------------------------------------------------------------------------------


def _commands(workflow: dict) -> list[list[str]]:
    """Every convert-checkpoint / parity-check invocation in the workflow's run blocks."""
    found = []
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            script = step.get("run", "").replace("\\\n", " ")
            for line in script.splitlines():
                words = shlex.split(line, comments=True)
                for k, word in enumerate(words):
                    if word.rsplit("/", 1)[-1] in ("convert-checkpoint", "parity-check"):
                        found.append([word.rsplit("/", 1)[-1], *words[k + 1 :]])
    return found


def test_gpu_workflow_runs_only_what_our_clis_offer():
    import yaml  # a dependency of transformers
    from click.testing import CliRunner

    from converter.cli import main as convert_main
    from converter.parity_cli import main as parity_main

    workflow = yaml.safe_load(WORKFLOW.read_text())
    job = workflow["jobs"]["parity"]
    assert job["runs-on"][:2] == ["self-hosted", "gpu"]
    uses = [step.get("uses", "") for step in job["steps"]]
    assert any(u.startswith("actions/upload-artifact@") for u in uses)
    assert any("junit" in u.lower() or "test-result" in u.lower() for u in uses)
    commands = _commands(workflow)
    flags = {flag for command in commands for flag in command if flag.startswith("--")}
    assert {"--junit", "--tolerances", "--card", "--device"} <= flags
    groups = {"convert-checkpoint": convert_main, "parity-check": parity_main}
    helps = {}
    for command in commands:
        group, sub = groups[command[0]], command[1]
        assert sub in group.commands, command
        if (command[0], sub) not in helps:
            result = CliRunner().invoke(group, [sub, "--help"], terminal_width=200)
            assert result.exit_code == 0, result.output
            helps[command[0], sub] = result.output
        for word in command[2:]:
            if word.startswith("--"):
                assert f"{word.split('=')[0]} " in helps[command[0], sub], (command[:2], word)
    assert any(c[:2] == ["parity-check", "logits"] for c in commands)
    assert any(c[:2] == ["convert-checkpoint", "megatron-to-hf"] for c in commands)
    assert any(c[:2] == ["convert-checkpoint", "verify"] for c in commands)
