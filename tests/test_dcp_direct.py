"""torch_dist chunks read straight from the .distcp files (converter/formats/dcp_direct.py): the
same tensors as torch's own DCP reader, any region of a chunk into any strided destination, and
bytes that contradict the metadata refused in one line."""

from __future__ import annotations

import io
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO

from converter.errors import ConversionError
from converter.formats import dcp_direct, torch_dist

FIXTURES = REPO / "tests" / "fixtures"


def _both_ways(ckpt, name):
    """(direct read or None when it leaves the tensor to DCP, DCP's own read) of one entry."""
    key, layer, meta = ckpt.entries[name]
    full = tuple(meta.size)
    shape = full if layer is None else (1, *full[1:])
    offsets = (0,) * len(full) if layer is None else (layer,) + (0,) * (len(full) - 1)
    direct = torch.full(shape, 3, dtype=meta.properties.dtype)  # not what DCP would leave
    through_dcp = torch.full(shape, 7, dtype=meta.properties.dtype)
    read = ckpt._read_direct(name, key, meta, offsets, direct)
    ckpt._read_through_dcp(name, key, offsets, through_dcp)
    return (direct if read else None), through_dcp


@pytest.mark.parametrize(
    "where",
    [
        "tp2-dist",
        FIXTURES / "megatron-lm-0.19-gpt" / "torch_dist",
        FIXTURES / "megatron-lm-0.19-nvlm" / "torch_dist",
    ],
    ids=["ours-tp2", "megatron-lm-gpt", "megatron-lm-nvlm"],
)
def test_every_tensor_reads_as_torchs_own_dcp_reader_reads_it(checkpoints, where):
    root = checkpoints[where] if isinstance(where, str) else where
    ckpt = torch_dist.read(root)
    chunk_counts = set()
    for name in ckpt.names():
        direct, through_dcp = _both_ways(ckpt, name)
        assert direct is not None, f"{name} was left to DCP"
        assert direct.dtype == through_dcp.dtype and torch.equal(direct.view(-1), through_dcp.view(-1)), name
        chunk_counts.add(len(ckpt.entries[name][2].chunks))
    if where == "tp2-dist":  # row- and column-parallel chunks: strided and contiguous regions both
        assert max(chunk_counts) > 1


def _chunk_file(tmp_path: Path, tensor: torch.Tensor, before: bytes = b"x" * 1000):
    """A file holding `before` and then torch.save(tensor) (as DCP lays a chunk into a .distcp
    file), and the _StorageInfo-like record of that chunk."""
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    path = tmp_path / "__0_0.distcp"
    path.write_bytes(before + buffer.getvalue())
    info = SimpleNamespace(relative_path=path.name, offset=len(before), length=len(buffer.getvalue()))
    return path, info


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64])
def test_any_region_of_a_chunk_reads_into_a_strided_destination(tmp_path, dtype):
    chunk = (torch.arange(4 * 6 * 10) * 3).reshape(4, 6, 10).to(dtype)
    path, info = _chunk_file(tmp_path, chunk)
    stored = dcp_direct.locate(path, info, (4, 6, 10), dtype, "t")
    assert stored is not None
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, lengths in [
            ((0, 0, 0), (4, 6, 10)),  # the whole chunk
            ((1, 0, 0), (1, 6, 10)),  # one layer
            ((0, 2, 0), (4, 3, 10)),  # rows: runs apart in the file
            ((0, 0, 4), (4, 6, 5)),  # columns: one run per row
            ((2, 1, 3), (2, 4, 6)),
        ]:
            whole = torch.zeros(5, 9, 17, dtype=dtype)  # the destination: the region inside a larger tensor
            view = whole[1 : 1 + lengths[0], 2 : 2 + lengths[1], 3 : 3 + lengths[2]]
            dcp_direct.read_region(stored, start, view, fd)
            expected = torch.zeros_like(whole)
            expected[1 : 1 + lengths[0], 2 : 2 + lengths[1], 3 : 3 + lengths[2]] = chunk[
                start[0] : start[0] + lengths[0],
                start[1] : start[1] + lengths[1],
                start[2] : start[2] + lengths[2],
            ]
            assert torch.equal(whole, expected), (start, lengths)
    finally:
        os.close(fd)


def test_chunks_stored_otherwise_are_left_to_dcp(tmp_path):
    tensor = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    path, info = _chunk_file(tmp_path, tensor)
    transformed = SimpleNamespace(**vars(info), transform_descriptors=["zstd"])
    assert dcp_direct.locate(path, transformed, (4, 5), torch.float32, "t") is None
    assert dcp_direct.locate(path, info, (4, 5), torch.bfloat16, "t") is None  # DCP casts on its copy
    view_path, view_info = _chunk_file(tmp_path / "..", torch.arange(40.0)[5:25].reshape(4, 5))
    located = dcp_direct.locate(view_path, view_info, (4, 5), torch.float32, "t")  # a view: its offset
    dest = torch.empty(4, 5)
    fd = os.open(view_path, os.O_RDONLY)
    try:
        dcp_direct.read_region(located, (0, 0), dest, fd)
    finally:
        os.close(fd)
    assert torch.equal(dest, torch.arange(5.0, 25.0).reshape(4, 5))
    raw = tmp_path / "raw.distcp"
    raw.write_bytes(tensor.numpy().tobytes())  # not a torch.save archive
    raw_info = SimpleNamespace(relative_path=raw.name, offset=0, length=raw.stat().st_size)
    assert dcp_direct.locate(raw, raw_info, (4, 5), torch.float32, "t") is None


def _one_line(exc: ConversionError, path: Path) -> str:
    message = str(exc)
    assert "\n" not in message and str(path) in message
    return message


def test_bytes_that_contradict_the_metadata_are_refused_in_one_line(tmp_path):
    tensor = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    path, info = _chunk_file(tmp_path, tensor)
    with pytest.raises(ConversionError) as shape:
        dcp_direct.locate(path, info, (8, 4), torch.float32, "w")
    assert "the .metadata says [8, 4]" in _one_line(shape.value, path)
    # a byte range that starts inside the archive: its zip directory is found from the end, but
    # what it points at is no torch archive
    shifted = SimpleNamespace(**{**vars(info), "offset": info.offset + 7, "length": info.length - 7})
    with pytest.raises(ConversionError) as moved:
        dcp_direct.locate(path, shifted, (8, 8), torch.float32, "w")
    assert "cannot read the chunk" in _one_line(moved.value, path)
    # a chunk whose data lies past the end of the file (truncated after the metadata was checked)
    stored = dcp_direct.locate(path, info, (8, 8), torch.float32, "w")
    os.truncate(path, stored.data_offset + 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ConversionError) as truncated:
            dcp_direct.read_region(stored, (0, 0), torch.empty(8, 8), fd)
    finally:
        os.close(fd)
    assert "truncated" in _one_line(truncated.value, path)
