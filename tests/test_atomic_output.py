"""Atomic output and --resume (issue 7, items 3 and 4): a `convert-checkpoint megatron-to-hf`
process SIGKILLed at any stage never leaves its destination, only `.DST.partial-PID`; a rerun with
--resume reuses the shards it finished (checked) and ends byte-identical to an uninterrupted run;
a full disk ends in one clear line, with its partial files removed."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_TOKENIZER, cli

pytest.importorskip("megatron.core", reason="the checkpoints are made by the Megatron side")

SHARD = "250KB"  # the tiny model's 3.5 MB (real + 7 ViT heads) in 17 shards
SHARDS = 17

# Runs the real CLI in a child process that SIGKILLs itself at a chosen point, or writes slowly
# so that the test can kill it from outside while it polls the partial folder.
_DRIVER = """
import os, signal, sys, time
from pathlib import Path

from converter import families
from converter.formats import safetensors_stream

point, value, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
destination = Path(argv[2]).name


def die():
    os.kill(os.getpid(), signal.SIGKILL)


write, written = safetensors_stream.ShardedWriter.write, [0]


def write_and_maybe_die(self, name, tensor):
    count = write(self, name, tensor)
    written[0] += count
    if point == "bytes" and written[0] >= value:
        die()
    if point == "slow":
        time.sleep(value)
    return count


safetensors_stream.ShardedWriter.write = write_and_maybe_die
if point == "extras":  # every shard and the index written, config.json not yet
    families.NVLMD.write_extras = staticmethod(lambda folder, config: die())
if point == "rename":  # the folder complete, manifest included: the rename into place
    from converter import engine

    rename = engine._rename_no_replace
    engine._rename_no_replace = lambda source, target: (
        die() if Path(target).name == destination else rename(source, target)
    )

from converter.cli import main

main(argv)
"""

TOTAL = 3_481_536  # tensor bytes of the tiny model


def _convert_args(source, out, *extra):
    return [
        "megatron-to-hf",
        str(source),
        str(out),
        "--tokenizer",
        str(TINY_TOKENIZER),
        "--max-shard-size",
        SHARD,
        *extra,
    ]


def _start(point, value, source, out, **popen):
    return subprocess.Popen(
        [sys.executable, "-c", _DRIVER, point, str(value), *_convert_args(source, out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _records(partial: Path) -> int:
    return len(list((partial / ".nvlm_port_progress").glob("*.json")))


@pytest.fixture(scope="module")
def reference(checkpoints, tmp_path_factory):
    """An uninterrupted conversion with the options the killed runs use."""
    out = tmp_path_factory.mktemp("reference") / "hf"
    code, output = cli(*_convert_args(checkpoints["tp2-pp2"], out))
    assert code == 0, output
    assert len(list(out.glob("model-*.safetensors"))) == SHARDS
    return out


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _kill(stage, source, out):
    """Run a conversion to `out` and SIGKILL it at `stage`; return its partial folder."""
    partial = out.parent / f".{out.name}.partial-"
    if stage in ("folder", "two-shards"):
        proc = _start("slow", 0.03, source, out)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            assert not out.exists()
            found = list(out.parent.glob(f".{out.name}.partial-*"))
            if found and (stage == "folder" or _records(found[0]) >= 2):
                proc.kill()
                break
            time.sleep(0.005)
    else:
        value = {"third": TOTAL // 3, "two-thirds": 2 * TOTAL // 3}.get(stage, 0)
        proc = _start("bytes" if value else stage, value, source, out)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"{stage}: the run was not killed ({proc.returncode})"
    assert not out.exists()
    left = {p.name for p in out.parent.iterdir()} - {f".{out.name}.lock"}  # the lock it held may stay
    assert left == {f"{partial.name}{proc.pid}"}
    return Path(f"{partial}{proc.pid}")


STAGES = ["folder", "two-shards", "third", "two-thirds", "extras", "rename"]


@pytest.mark.parametrize("stage", STAGES)
def test_killed_anywhere_then_resumed(checkpoints, reference, tmp_path, stage):
    source, out = checkpoints["tp2-pp2"], tmp_path / "out" / "hf"
    out.parent.mkdir()
    partial = _kill(stage, source, out)
    finished = _records(partial)
    if stage == "extras":
        assert finished == SHARDS
    if stage == "rename":  # the manifest is written and the records dropped: a complete folder,
        assert finished == 0 and (partial / "nvlm_port_manifest.json").exists()  # rewritten on resume
    code, output = cli(*_convert_args(source, out, "--resume"))
    assert code == 0, output
    assert f"resume: {finished} of {SHARDS} shard(s) reused" in output
    _same_files(out, reference)
    assert [p.name for p in out.parent.iterdir()] == ["hf"]


def test_resume_rewrites_a_shard_whose_bytes_changed(checkpoints, reference, tmp_path):
    source, out = checkpoints["tp2-pp2"], tmp_path / "hf"
    partial = _kill("two-thirds", source, out)
    finished = _records(partial)
    assert finished >= 3
    shard = partial / f"model-00002-of-{SHARDS:05d}.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x01
    shard.write_bytes(bytes(raw))
    code, output = cli(*_convert_args(source, out, "--resume"))
    assert code == 0 and f"resume: {finished - 1} of {SHARDS} shard(s) reused" in output, output
    _same_files(out, reference)


def test_a_leftover_is_named_without_resume_and_not_reused_for_other_options(checkpoints, tmp_path):
    source, out = checkpoints["tp2-pp2"], tmp_path / "hf"
    partial = _kill("two-thirds", source, out)
    assert _records(partial) >= 3
    code, output = cli(*_convert_args(source, out))
    assert code == 0 and f"note: {partial} is left from an interrupted conversion" in output, output
    assert partial.is_dir()  # kept for a later --resume, never mixed into a fresh run
    code, output = cli(*_convert_args(source, out, "--resume", "--overwrite", "--dtype", "bf16"))
    assert code == 0 and "resume: 0 of 8 shard(s) reused" in output, output  # bf16: another plan
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    code, output = cli("verify", out, "--against", source)
    assert code == 0, output


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG


def test_a_full_disk_fails_cleanly(checkpoints, tmp_path):
    out = tmp_path / "hf"
    proc = _start("run", 0, checkpoints["tp2-pp2"], out, preexec_fn=_limit_file_size)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "File too large" in errors[0] and ".safetensors" in errors[0], stderr
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_folder_and_leaves_nothing_beside_it(checkpoints, reference, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("the previous conversion")
    code, output = cli(*_convert_args(checkpoints["tp2-pp2"], out, "--overwrite"))
    assert code == 0, output
    _same_files(out, reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
