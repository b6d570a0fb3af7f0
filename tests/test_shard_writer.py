"""The streaming safetensors writer: any subset of the planned shards, records of finished shards,
and the checks a resumed run makes before it reuses one (issue 7, resume)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from converter.formats import shard_progress
from converter.formats.safetensors_stream import PlannedTensor, ShardedWriter, ShardLayout, read_header


def _tensors():
    generator = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (16, 16, 4), (128,), (8, 8), (100,), (3, 5), (50, 2)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32] * 2
    return {
        f"t{k}": torch.randn(shape, generator=generator).to(dtype)
        for k, (shape, dtype) in enumerate(zip(shapes, dtypes))
    }


def _plan(tensors):
    return [PlannedTensor(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]


MAX = 600  # bytes per shard: six shards from the tensors above


def _write(folder, tensors, only=None, fingerprint="f"):
    writer = ShardedWriter(folder, _plan(tensors), MAX, only=only, fingerprint=fingerprint)
    for name, tensor in tensors.items():
        if writer.wants(name):
            writer.write(name, tensor)
    writer.finish()
    writer.close()
    return writer


def test_writers_of_disjoint_shards_write_the_files_one_writer_writes(tmp_path):
    tensors = _tensors()
    (tmp_path / "one").mkdir()
    whole = _write(tmp_path / "one", tensors)
    count = len(whole.names)
    assert count >= 3
    (tmp_path / "two").mkdir()
    writers = [
        ShardedWriter(tmp_path / "two", _plan(tensors), MAX, only=range(k, count, 2), fingerprint="f")
        for k in (0, 1)
    ]
    for name, tensor in tensors.items():  # interleaved, as two workers would be
        writers[whole.shard_of(name) % 2].write(name, tensor)
    for writer in writers:
        writer.finish()
    whole.layout.write_index(tmp_path / "two")
    whole.layout.write_index(tmp_path / "one")
    for name in [*whole.names, "model.safetensors.index.json"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    loaded = {}
    for name in whole.names:
        loaded.update(load_file(tmp_path / "two" / name))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[n], tensors[n]) for n in tensors)
    digests = whole.layout.recorded_digests(tmp_path / "two", "f")
    assert sorted(digests) == whole.names
    assert all(d.size == (tmp_path / "two" / n).stat().st_size for n, d in digests.items())


def test_a_writer_refuses_tensors_outside_its_shards(tmp_path):
    tensors = _tensors()
    writer = ShardedWriter(tmp_path, _plan(tensors), MAX, only={1})
    first = next(iter(tensors))
    assert writer.shard_of(first) == 0 and not writer.wants(first)
    with pytest.raises(RuntimeError, match="does not write"):
        writer.write(first, tensors[first])
    with pytest.raises(ValueError, match="not in the layout"):
        ShardedWriter(tmp_path, _plan(tensors), MAX, only={99})
    with pytest.raises(RuntimeError, match="incomplete"):
        writer.finish()
    writer.close()


def test_a_finished_shard_is_reused_only_when_record_size_header_and_sha256_hold(tmp_path):
    tensors = _tensors()
    writer = _write(tmp_path, tensors)
    layout = ShardLayout(_plan(tensors), MAX)
    assert set(layout.finished_in(tmp_path, "f")) == set(range(len(layout.names)))
    assert layout.finished_in(tmp_path, "another source or options") == {}

    flipped = tmp_path / writer.names[1]
    raw = bytearray(flipped.read_bytes())
    raw[-1] ^= 0x01  # a data byte: only the checksum can tell
    flipped.write_bytes(bytes(raw))
    cut = tmp_path / writer.names[2]
    cut.write_bytes(cut.read_bytes()[:-4])
    (tmp_path / shard_progress.PROGRESS / f"{writer.names[3]}.json").write_text("{not json")
    retyped = {**tensors, "t0": tensors["t0"].to(torch.float16)}  # shard 0's header changes
    found = ShardLayout(_plan(retyped), MAX).finished_in(tmp_path, "f")
    assert set(found) == set(range(len(layout.names))) - {0, 1, 2, 3}

    shard_progress.clear(tmp_path)
    assert layout.finished_in(tmp_path, "f") == {}


def test_read_header_accepts_the_library_and_names_what_is_wrong(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "lib.safetensors")
    header = read_header(tmp_path / "lib.safetensors")
    assert {n: tuple(e["shape"]) for n, e in header.items()} == {
        n: tuple(t.shape) for n, t in tensors.items()
    }
    raw = (tmp_path / "lib.safetensors").read_bytes()
    length = int.from_bytes(raw[:8], "little")
    cases = {
        "short": (raw[:5], "too short"),
        "cut header": (raw[: 8 + length // 2], "runs past the end"),
        "cut data": (raw[:-10], "data_offsets"),
        "not json": (raw[:8] + b"\xff" * length + raw[8 + length :], "not valid JSON"),
        "extra data": (raw + b"\0" * 8, "accounts for"),
    }
    for label, (data, message) in cases.items():
        path = tmp_path / f"{label}.safetensors"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=message):
            read_header(path)
    bad_dtype = json.loads(raw[8 : 8 + length])
    bad_dtype["t0"]["dtype"] = "Q7"
    text = json.dumps(bad_dtype, separators=(",", ":")).encode()
    text += b" " * (length - len(text))
    (tmp_path / "dtype.safetensors").write_bytes(raw[:8] + text + raw[8 + length :])
    with pytest.raises(ValueError, match="no known dtype"):
        read_header(tmp_path / "dtype.safetensors")
