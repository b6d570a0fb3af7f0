"""README.md's shell examples run as written; the demo's output is not drowned.

Every ```bash block of README.md carries a marker on the line before it:
`<!-- runnable -->` (this test runs it, with bash -e, in a fresh folder that sees the repository's
tests/ as the README's paths assume) or `<!-- not run: REASON -->` (placeholders to fill, a GPU,
minutes of work). A block with neither fails the test, so every example is one or the other.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

README = REPO / "README.md"
BLOCK = re.compile(r"^(?P<marker>[^\n]*)\n```(?:bash|sh|shell)\n(?P<body>.*?)^```", re.M | re.S)
RUNNABLE = "<!-- runnable -->"
NOT_RUN = re.compile(r"<!-- not run: \S.* -->")


def readme_blocks() -> list[tuple[str, str]]:
    """(marker line, body) of every shell block."""
    return [(m["marker"].strip(), m["body"]) for m in BLOCK.finditer(README.read_text())]


def test_every_shell_block_is_marked():
    blocks = readme_blocks()
    assert blocks, "README.md has no shell block"
    unmarked = [
        body.splitlines()[0]
        for marker, body in blocks
        if marker != RUNNABLE and not NOT_RUN.fullmatch(marker)
    ]
    assert unmarked == [], f"shell blocks without <!-- runnable --> or <!-- not run: why -->: {unmarked}"
    assert any(marker == RUNNABLE for marker, _ in blocks)


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Each runnable block, run once: (body, CompletedProcess)."""
    work = tmp_path_factory.mktemp("readme")
    (work / "tests").symlink_to(REPO / "tests")
    env = dict(
        os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", HF_HUB_OFFLINE="1"
    )
    env["HF_HOME"] = str(work / ".hf_home")  # remote code lands here, not in the user's cache
    results = []
    for marker, body in readme_blocks():
        if marker == RUNNABLE:
            run = subprocess.run(
                ["bash", "-e", "-c", body], cwd=work, env=env, capture_output=True, text=True, timeout=600
            )
            results.append((body, run))
    return results


def test_runnable_blocks_run_as_written(ran):
    for body, run in ran:
        assert run.returncode == 0, (
            f"{body}\n--- stdout\n{run.stdout[-2000:]}\n--- stderr\n{run.stderr[-3000:]}"
        )


def test_the_quick_start_says_what_it_claims(ran):
    (body, run), *_ = [(b, r) for b, r in ran if "megatron-to-hf" in b]
    assert "torch, TP=2 PP=1, nvlm-d" in run.stdout and "wrote small-hf" in run.stdout  # megatron-to-hf
    assert "small-hf: OK:" in run.stdout  # verify --against
    answer = run.stdout.strip().splitlines()[-1]
    assert answer.strip(), "the model answered nothing"


def test_a_piped_conversion_prints_no_progress_bar(ran):
    """tqdm's disable=None: stderr is a pipe here, so none of the converter's bars is drawn (a bar
    would show its description on stderr)."""
    conversions = [run for body, run in ran if "megatron-to-hf" in body]
    assert conversions
    for run in conversions:
        assert "tensors -> safetensors" not in run.stderr, run.stderr[-2000:]


_QUIET_CHECK = """
import warnings
import megatron.core.models.gpt.gpt_layer_specs, megatron.core.optimizer  # warn on import
with warnings.catch_warnings(record=True) as seen:
    warnings.warn("Apex is not installed. Falling back", UserWarning)
    warnings.warn("a warning of the demo's own", UserWarning)
print([str(w.message) for w in seen])
"""


def test_the_demo_silences_megatron_core_notices_and_nothing_else():
    """scripts/demo.py runs its CLI steps with QUIET_WARNINGS in PYTHONWARNINGS: megatron-core's
    import notices about Apex / Transformer Engine are gone, any other warning still shows."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    run = subprocess.run(
        [sys.executable, "-c", _QUIET_CHECK],
        env=demo._quiet_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Apex" not in run.stderr and "Transformer Engine" not in run.stderr, run.stderr[-2000:]
    assert run.stdout.strip() == '["a warning of the demo\'s own"]'
