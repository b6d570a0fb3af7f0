"""What the converter refuses, and how: one line naming the file and the problem, exit status 2,
no output folder left behind, and no code from a pickle ever executed (a first part of issue 7)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import cli

pytest.importorskip("megatron.core", reason="the checkpoints are made by the Megatron side")


class _CreatesAFile:
    """Unpickling this runs os.system: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _refused(tmp_path, source, *needles):
    out = tmp_path / "out"
    code, output = cli("megatron-to-hf", source, out, "--no-tokenizer")
    assert code == 2, output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in output, output
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))
    return output


def test_a_pickle_that_runs_code_is_refused(checkpoints, tmp_path):
    import torch

    source = tmp_path / "hostile"
    shutil.copytree(checkpoints["tp1-te"], source)
    marker = tmp_path / "pwned"
    rank = source / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    torch.save({"args": _CreatesAFile(marker), "model": {}}, rank)
    output = _refused(tmp_path, source, str(rank), "posix.system")
    assert "--trust-pickle" in output
    assert not marker.exists()


def test_not_a_checkpoint_and_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(tmp_path, tmp_path / "empty", "not a Megatron checkpoint")
    _refused(tmp_path, tmp_path / "missing", "does not exist")


def test_tracker_pointing_to_a_missing_iteration(checkpoints, tmp_path):
    source = tmp_path / "ckpt"
    shutil.copytree(checkpoints["tp1-te"], source)
    (source / "latest_checkpointed_iteration.txt").write_text("7")
    _refused(tmp_path, source, "latest_checkpointed_iteration.txt", "iteration 7")


def test_missing_tp_rank(checkpoints, tmp_path):
    source = tmp_path / "ckpt"
    shutil.copytree(checkpoints["tp2-pp2"], source)
    shutil.rmtree(source / "iter_0000001" / "mp_rank_01_001")
    _refused(tmp_path, source, "mp_rank_01_001", "missing")


def test_truncated_rank_file(checkpoints, tmp_path):
    source = tmp_path / "ckpt"
    shutil.copytree(checkpoints["tp1-te"], source)
    rank = source / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    rank.write_bytes(rank.read_bytes()[: rank.stat().st_size // 2])
    _refused(tmp_path, source, str(rank), "cannot be read")


def test_unknown_sharded_backend(checkpoints, tmp_path):
    source = tmp_path / "ckpt"
    shutil.copytree(checkpoints["tp2-dist"], source)
    meta = source / "iter_0000001" / "metadata.json"
    meta.write_text(json.dumps({"sharded_backend": "zarr"}))
    _refused(tmp_path, source, "metadata.json", "zarr")


def test_existing_output_is_not_overwritten_without_asking(checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, output = cli("megatron-to-hf", checkpoints["tp1-te"], out, "--no-tokenizer")
    assert code == 2 and "--overwrite" in output
    assert (out / "keep.txt").read_text() == "mine"
