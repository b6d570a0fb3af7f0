"""Shared fixtures: the tiny tokenizer and model the project ships or builds, and the reference folder."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = REPO / "tests" / "fixtures" / "tiny-tokenizer"
REFERENCE = REPO.parent / "shared" / "reference" / "nvlm-d-72b"


def reference_file(name: str) -> Path:
    """A file of the published release's metadata; skip the test where ../shared is absent."""
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"{path} is absent: the published NVLM-D-72B metadata lives in ../shared/reference")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER, local_files_only=True)


@pytest.fixture(scope="session")
def tiny_model():
    from modeling import NVLM_D_Model, get_config

    torch.manual_seed(0)
    return NVLM_D_Model(get_config("tiny")).eval()


def make_megatron_checkpoint(out: Path, *args: str) -> Path:
    """Run scripts/make_megatron_checkpoint.py (the real CLI) into `out`."""
    import subprocess
    import sys

    cmd = [sys.executable, str(REPO / "scripts" / "make_megatron_checkpoint.py"), *args, str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return out


def tiny_inputs(tokenizer):
    """A text prompt and a 3-tile (2 tiles + thumbnail) image prompt, as ids + pixels."""
    from modeling import build_prompt, get_config

    config = get_config("tiny")
    text = tokenizer(
        build_prompt("Write a long sentence about red circles and blue squares.", [], config.num_image_token),
        return_tensors="pt",
    ).input_ids
    image = tokenizer(
        build_prompt("What is shown?", [3], config.num_image_token), return_tensors="pt"
    ).input_ids
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, 64, 64, generator=generator)
    return [{"input_ids": text, "pixel_values": None}, {"input_ids": image, "pixel_values": pixels}]


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` run once per test run, even under pytest-xdist (`make test` runs 2 workers):
    the first worker to ask builds into a folder all workers share (the parent of their base temp
    folders), behind a file lock; the others wait and reuse it. The folder is marked complete only
    after `build` returns, so a worker never sees half a checkpoint."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = shared / f"shared-{name}", shared / f"shared-{name}.done"
    with FileLock(str(shared / f"shared-{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Seeded tiny Megatron checkpoints (one seed: the same model) in several layouts and formats."""
    layouts = {
        "tp2-pp2": ("--tp", "2", "--pp", "2"),
        "tp1-te": ("--spec", "te"),
        "tp2-dist": ("--tp", "2", "--format", "torch_dist"),
    }

    def build(root: Path) -> None:
        for name, args in layouts.items():
            make_megatron_checkpoint(root / name, "--preset", "tiny", *args)

    root = built_once(tmp_path_factory, "megatron", build)
    return {name: root / name for name in layouts}


@pytest.fixture(scope="session")
def shapes_only_72b(tmp_path_factory):
    """The full nvlm-d-72b at TP=8, shapes and dtypes only (legacy format)."""

    def build(root: Path) -> None:
        make_megatron_checkpoint(root / "tp8", "--preset", "nvlm-d-72b", "--tp", "8", "--shapes-only")

    return built_once(tmp_path_factory, "72b", build) / "tp8"


def cli(*args: str):
    """Run convert-checkpoint in-process; return (exit code, output)."""
    from click.testing import CliRunner

    from converter.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def convert_each_format(root: Path, fixture: Path, formats, *flags) -> dict:
    """`megatron-to-hf` (default safe loading) of each format folder of a fixture made by NVIDIA's
    code; fmt -> (exit code, output, DST)."""
    made = {}
    for fmt in formats:
        code, output = cli("megatron-to-hf", fixture / fmt, root / fmt, "--tokenizer", TINY_TOKENIZER, *flags)
        made[fmt] = (code, output, root / fmt)
    return made


def converted_folder(converted: dict, fmt: str) -> Path:
    code, output, dst = converted[fmt]
    assert code == 0, f"megatron-to-hf of NVIDIA's {fmt} checkpoint failed:\n{output}"
    return dst


def assert_files_as_written(fixture: Path, expected: dict[str, set[str]], iteration: str) -> None:
    """Every file NVIDIA's writer put in each format folder, and no other: nothing may be dropped
    to make the converter's job easier."""
    for fmt, names in expected.items():
        root = fixture / fmt
        assert {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} == names, fmt
        assert (root / "latest_checkpointed_iteration.txt").read_text() == iteration
    if "torch_dist" in expected:
        meta_json = fixture / "torch_dist" / f"iter_{int(iteration):07d}" / "metadata.json"
        meta = json.loads(meta_json.read_text())
        assert meta == {"sharded_backend": "torch_dist", "sharded_backend_version": 1}


def load_hf_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


_REMOTE_CHECK = textwrap.dedent(
    """
    import importlib.util, sys
    # No nvlm-port on the path: drop the repo and the editable-install finder, then prove it.
    sys.path[:] = [p for p in sys.path if p not in ("", ".", REPO)]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")
                        and "editable" not in type(f).__module__]
    for name in ("modeling", "converter", "mappings"):
        assert importlib.util.find_spec(name) is None, name + " is importable"
    import torch
    from transformers import AutoModel, AutoTokenizer
    model = AutoModel.from_pretrained(FOLDER, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    tokenizer = AutoTokenizer.from_pretrained(FOLDER)
    inputs = torch.load(FOLDER + "/inputs.pt")
    with torch.no_grad():
        logits = model(pixel_values=inputs["pixels"], input_ids=inputs["ids"]).logits
    torch.save(logits, FOLDER + "/remote_logits.pt")
    print(model.chat(tokenizer, inputs["pixels"], "What is shown?", dict(max_new_tokens=4, do_sample=False)))
    """
)


def remote_code_logits(folder: Path, pixels, input_ids, workdir: Path):
    """Load `folder` with AutoModel(trust_remote_code=True) in a Python that cannot import
    nvlm-port, run it on the inputs (and chat once), return its logits."""
    torch.save({"pixels": pixels, "ids": input_ids}, Path(folder) / "inputs.pt")
    run_without_nvlm_port(_REMOTE_CHECK, folder, workdir)
    return torch.load(Path(folder) / "remote_logits.pt")


def run_without_nvlm_port(script: str, folder: Path, workdir: Path) -> None:
    """Run `script` (given REPO and FOLDER) in an isolated, offline Python (-I, no PYTHONPATH, its own
    HF_HOME), as a user of the converted `folder` would who has no nvlm-port installed."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HOME=str(workdir / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    source = f"REPO = {str(REPO)!r}\nFOLDER = {str(folder)!r}\n" + script
    command = [sys.executable, "-I", "-c", source]
    run = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


# Under `make test` (pytest-xdist, whole files per worker) the files that take longest start first,
# so that neither worker is left alone with one of them at the end; the order inside a file is kept.
LONGEST_FIRST = (
    "test_trained_checkpoint.py",
    "test_megatron_side.py",
    "test_conversion.py",
    "test_megatron_lm_parity.py",
    "test_numerics.py",
    "test_parity.py",
    "test_parity_ci.py",
    "test_refusals.py",
    "test_qwen2_family.py",
    "test_atomic_output.py",
)


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
