"""Every pickle a checkpoint holds is loaded without running code from it (issue 14 item 2, issue 15
item 1): Megatron-LM's own globals of any generation become inert stand-ins, numpy RNG state and
signal.Signals load, anything else is refused with the file and the global named. DCP `.metadata`
admits torch's DCP metadata classes only; megatron-core 0.19's `common_state` byte object is read
from the .distcp bytes and unpickled the same safe way."""

from __future__ import annotations

import enum
import os
import pickle
import shutil
import signal
import sys
import types

import numpy as np
import pytest
import torch
from conftest import TINY_TOKENIZER, cli

from converter.errors import ConversionError
from converter.formats import safe_pickle


class _RunsCode:
    """Unpickling this runs a shell command: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _module_with_enum(name: str):
    """A stand-in for a Megatron module of some other version: an enum the installed megatron-core
    may not have (e.g. NVLM-1.0's ModelType.encoder_and_decoder = 2, gone since 0.14)."""
    module = types.ModuleType(name)

    class ModelType(enum.Enum):
        encoder_or_decoder = 1
        encoder_and_decoder = 2

    ModelType.__module__, ModelType.__qualname__ = name, "ModelType"
    module.ModelType = ModelType
    return module


def test_megatron_globals_of_any_version_numpy_rng_and_signals_load_inert(tmp_path):
    import argparse

    name = "megatron.core.enums_of_another_version"
    sys.modules[name] = module = _module_with_enum(name)
    try:
        args = argparse.Namespace(model_type=module.ModelType.encoder_and_decoder, exit_signal=signal.SIGTERM)
        state = {"args": args, "rng_state": [{"np_rng_state": np.random.RandomState(0).get_state()}]}
        state["model"] = {"w": torch.arange(4.0)}
        torch.save(state, tmp_path / "rank.pt")
    finally:
        del sys.modules[name]  # as on a machine without that megatron-core
    # what megatron-core's register_safe_globals() does on import: its REAL enums, process-wide
    real = _module_with_enum("megatron.core.enums").ModelType
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([real, signal.Signals])
    try:
        loaded = safe_pickle.load(tmp_path / "rank.pt")
        registered = torch.serialization.get_safe_globals()
        assert real in registered and signal.Signals in registered  # the loader put them back
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0))
    model_type = loaded["args"].model_type
    assert isinstance(model_type, safe_pickle.StandIn) and model_type.value == 2
    assert model_type.global_name == f"{name}.ModelType"
    assert loaded["args"].exit_signal.value == signal.SIGTERM.value
    assert isinstance(loaded["rng_state"][0]["np_rng_state"][1], safe_pickle.StandIn)  # never a numpy array


def test_a_global_that_runs_code_is_refused_before_anything_is_built(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"args": _RunsCode(marker)}, tmp_path / "rank.pt")
    with pytest.raises(ConversionError, match=r"rank\.pt: refusing to unpickle the global posix\.system"):
        safe_pickle.load(tmp_path / "rank.pt")
    data = (tmp_path / "rank.pt").read_bytes()
    with pytest.raises(ConversionError, match=r"common_state: refusing to unpickle the global posix\.system"):
        safe_pickle.load(data, where="common_state")
    assert not marker.exists()


def test_dcp_metadata_admits_only_dcp_classes(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(ConversionError, match=r"\.metadata: refusing to unpickle the global posix\.system"):
        safe_pickle.load_dcp_metadata(tmp_path / ".metadata")
    assert not marker.exists()


pytestmark_megatron = pytest.mark.skipif(
    __import__("importlib").util.find_spec("megatron.core") is None,
    reason="the checkpoints are made by the Megatron side",
)


@pytestmark_megatron
@pytest.mark.parametrize("command", ["megatron-to-hf", "inspect", "verify", "reshard"])
def test_a_crafted_dcp_metadata_runs_no_code_in_any_command(checkpoints, tmp_path, command):
    source = tmp_path / "hostile"
    shutil.copytree(checkpoints["tp2-dist"], source)
    marker = tmp_path / "pwned"
    (source / "iter_0000001" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    out = tmp_path / "out"
    if command == "megatron-to-hf":
        code, output = cli(command, source, out, "--tokenizer", TINY_TOKENIZER)
    elif command == "inspect":
        code, output = cli(command, source)
    elif command == "verify":
        hf = tmp_path / "hf"
        assert cli("megatron-to-hf", checkpoints["tp2-dist"], hf, "--no-tokenizer")[0] == 0
        code, output = cli(command, hf, "--against", source)
    else:
        code, output = cli(command, source, out, "--tp", "1")
    assert code == 2, output
    assert "posix.system" in output and "Traceback" not in output
    assert not marker.exists() and not out.exists()


@pytestmark_megatron
def test_dcp_storage_paths_outside_the_iteration_folder_are_refused(checkpoints, tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    source = tmp_path / "escape"
    shutil.copytree(checkpoints["tp2-dist"], source)
    meta_path = source / "iter_0000001" / ".metadata"
    metadata = safe_pickle.load_dcp_metadata(meta_path)
    index, info = next(iter(metadata.storage_data.items()))
    (tmp_path / "outside.distcp").write_bytes((source / "iter_0000001" / info.relative_path).read_bytes())
    metadata.storage_data[index] = _StorageInfo("../../outside.distcp", info.offset, info.length)
    meta_path.write_bytes(pickle.dumps(metadata))
    code, output = cli("megatron-to-hf", source, tmp_path / "out", "--no-tokenizer")
    assert code == 2 and "not inside the iteration folder" in output, output


@pytestmark_megatron
def test_common_state_inside_dcp_as_megatron_core_0_19_stores_it(checkpoints, tmp_path):
    """The 0.19 layout (no common.pt; `common_state` a byte object of the DCP checkpoint), built
    here by moving the common state of a 0.16-style checkpoint into DCP with torch's own writer.
    Real 0.19 checkpoints by Megatron-LM: tests/test_megatron_lm_gpt.py."""
    import io

    import torch.distributed.checkpoint as dcp

    source = tmp_path / "mcore019"
    shutil.copytree(checkpoints["tp2-dist"], source)
    iteration = source / "iter_0000001"
    common = safe_pickle.load(iteration / "common.pt", mmap=False)
    (iteration / "common.pt").unlink()
    extra = tmp_path / "extra"  # a ShardedObject: key common_state/shard_0_1, torch.save([state]) bytes
    blob = io.BytesIO()
    torch.save([common], blob)
    dcp.save({"common_state/shard_0_1": io.BytesIO(blob.getvalue())}, checkpoint_id=str(extra), no_dist=True)
    # join the byte object's metadata and file into the checkpoint
    metadata = safe_pickle.load_dcp_metadata(iteration / ".metadata")
    added = safe_pickle.load_dcp_metadata(extra / ".metadata")
    metadata.state_dict_metadata.update(added.state_dict_metadata)
    for index, info in added.storage_data.items():
        shutil.copyfile(extra / info.relative_path, iteration / ("common_" + info.relative_path))
        info.relative_path = "common_" + info.relative_path
        metadata.storage_data[index] = info
    (iteration / ".metadata").write_bytes(pickle.dumps(metadata))

    code, output = cli("inspect", source)
    assert code == 0 and "common_state in DCP" in output, output
    ours, reference = tmp_path / "hf", tmp_path / "hf-ref"
    assert cli("megatron-to-hf", source, ours, "--no-tokenizer")[0] == 0
    assert cli("megatron-to-hf", checkpoints["tp2-dist"], reference, "--no-tokenizer")[0] == 0
    for shard in sorted(reference.glob("*.safetensors")):
        assert (ours / shard.name).read_bytes() == shard.read_bytes()
