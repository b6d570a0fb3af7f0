"""Output safety as a rule of the output-folder code (issue 15, item 2): DST is never SRC, inside
it or around it; the final rename replaces nothing that appeared or changed while the run worked;
one run at a time per DST (an fcntl lock beside it); --resume continues only in a real folder the
user owns; SIGTERM and SIGINT clean up like an error."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, cli

from converter.engine import atomic_folder
from converter.errors import ConversionError

pytest.importorskip("megatron.core", reason="the checkpoints are made by the Megatron side")


def _one_error(output: str) -> str:
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    return errors[0]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hf_folder(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "hf"
    code, output = cli("megatron-to-hf", checkpoints["tp1-te"], out, "--no-tokenizer")
    assert code == 0, output
    return out


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_megatron_to_hf_never_writes_over_its_source(checkpoints, tmp_path, where):
    source = tmp_path / "a" / "ckpt"
    shutil.copytree(checkpoints["tp1-te"], source)
    before = _tree(source)
    dst = {"same": source, "parent": tmp_path / "a", "inside": source / "hf"}[where]
    code, output = cli("megatron-to-hf", source, dst, "--no-tokenizer", "--overwrite")
    assert code == 2, output
    line = _one_error(output)
    assert {"same": "is the source", "parent": "contains the source", "inside": "lies inside"}[where] in line
    assert _tree(source) == before
    assert not list(tmp_path.rglob(".*partial*"))


@pytest.mark.parametrize("command", ["hf-to-megatron", "reshard"])
def test_hf_to_megatron_and_reshard_never_write_over_their_source(checkpoints, hf_folder, tmp_path, command):
    if command == "hf-to-megatron":
        source = tmp_path / "hf"
        shutil.copytree(hf_folder, source)
        options = ()
    else:
        source = tmp_path / "ckpt"
        shutil.copytree(checkpoints["tp1-te"], source)
        options = ("--tp", "1")
    before = _tree(source)
    for dst in (source, tmp_path, source / "out"):
        code, output = cli(command, source, dst, *options, "--overwrite")
        assert code == 2, output
        assert "source" in _one_error(output)
        assert _tree(source) == before


def test_a_second_run_into_the_same_destination_is_refused(checkpoints, tmp_path):
    out = tmp_path / "out"
    with open(tmp_path / ".out.lock", "w") as held:  # what a running conversion holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, output = cli("megatron-to-hf", checkpoints["tp1-te"], out, "--no-tokenizer")
    assert code == 2, output
    assert "another run is writing it" in _one_error(output)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    code, output = cli("megatron-to-hf", checkpoints["tp1-te"], out, "--no-tokenizer")  # lock released
    assert code == 0, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the run removed the lock file


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_destination_that_appears_or_changes_during_the_run_is_kept(tmp_path, overwrite):
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "old.txt").write_text("there at the start")
    refused = pytest.raises(ConversionError, match="while this run was writing; not replaced")
    with refused, atomic_folder(out, overwrite=overwrite) as folder:
        (folder / "model.safetensors").write_text("ours")
        if overwrite:  # replaced by another folder while we work
            out.rename(tmp_path / "moved")
        out.mkdir()
        (out / "theirs.txt").write_text("made by the user meanwhile")
    assert _tree(out) == {"theirs.txt": b"made by the user meanwhile"}
    assert sorted(p.name for p in tmp_path.iterdir()) == (["moved", "out"] if overwrite else ["out"])


def test_an_empty_destination_that_fills_up_during_the_run_is_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    refused = pytest.raises(ConversionError, match="changed while this run was writing")
    with refused, atomic_folder(out) as folder:
        (folder / "model.safetensors").write_text("ours")
        (out / "theirs.txt").write_text("made meanwhile")
    assert _tree(out) == {"theirs.txt": b"made meanwhile"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_replaces_what_was_there_at_the_start(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_folder(out, overwrite=True) as folder:
        (folder / "new.txt").write_text("new")
    assert _tree(out) == {"new.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        pid += 1


def test_resume_refuses_a_partial_folder_that_is_a_symlink(checkpoints, tmp_path):
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    out = tmp_path / "out"
    (tmp_path / f".out.partial-{_dead_pid()}").symlink_to(victim)
    code, output = cli("megatron-to-hf", checkpoints["tp1-te"], out, "--no-tokenizer", "--resume")
    assert code == 2, output
    assert "is a symlink" in _one_error(output)
    assert _tree(victim) == {"thesis.tex": b"years of work"}
    assert not out.exists()


def test_resume_refuses_a_partial_folder_of_another_user(checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "out"
    partial = tmp_path / f".out.partial-{_dead_pid()}"
    partial.mkdir()
    (partial / "theirs.safetensors").write_text("someone else's")
    monkeypatch.setattr("converter.engine.os.getuid", lambda: os.stat(partial).st_uid + 1)
    code, output = cli("megatron-to-hf", checkpoints["tp1-te"], out, "--no-tokenizer", "--resume")
    assert code == 2, output
    assert "not by you" in _one_error(output)
    assert (partial / "theirs.safetensors").read_text() == "someone else's"


# hf-to-megatron / megatron-to-hf in a child process that pauses after each write, so that the
# test can signal it while the partial folder holds a file (on a loaded machine too: the pause is
# long, and the signal ends it, so it costs no time).
_SLOW = """
import sys, time
from converter.formats import safetensors_stream, torch_zip

for cls, method in ((torch_zip.StreamedTorchSave, "write"), (safetensors_stream.ShardedWriter, "write")):
    original = getattr(cls, method)
    def slow(self, *args, _original=original):
        result = _original(self, *args)
        time.sleep(2.0)
        return result
    setattr(cls, method, slow)

from converter.cli import main

main(sys.argv[1:])
"""


@pytest.mark.parametrize(
    ("signum", "command"), [(signal.SIGTERM, "hf-to-megatron"), (signal.SIGINT, "megatron-to-hf")]
)
def test_sigterm_and_sigint_remove_the_partial_folder(checkpoints, hf_folder, tmp_path, signum, command):
    out = tmp_path / "out"
    if command == "hf-to-megatron":
        argv = [command, str(hf_folder), str(out), "--tp", "1"]
    else:
        argv = [command, str(checkpoints["tp1-te"]), str(out), "--no-tokenizer", "--max-shard-size", "250KB"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW, *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        partial = list(tmp_path.glob(".out.partial-*"))
        if partial and any(partial[0].rglob("*.*")):
            proc.send_signal(signum)
            break
        time.sleep(0.01)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    assert f"stopped by {signal.Signals(signum).name}" in _one_error(stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_hf_to_megatron_names_a_leftover_and_leaves_it(hf_folder, tmp_path):
    leftover = tmp_path / f".mega.partial-{_dead_pid()}"
    leftover.mkdir()
    code, output = cli("hf-to-megatron", hf_folder, tmp_path / "mega")
    assert code == 0, output
    assert f"note: {leftover} is left from an interrupted run" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == [leftover.name, "mega"]
