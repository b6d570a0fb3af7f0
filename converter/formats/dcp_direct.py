"""Read a torch_dist chunk's bytes straight from its .distcp file into the destination tensor.

DCP (torch.distributed.checkpoint) stores every chunk as a torch.save archive at the byte range
the `.metadata` names. Its reader torch.loads each chunk into a new tensor (the bytes copied
once) and copies that into the destination (twice); for a 72B checkpoint that is twice the whole
checkpoint through memory, on top of the kernel's own copy. Here the chunk's archive is opened
on the meta device (its pickle only, through torch's weights_only unpickler: the tensor's dtype,
shape, strides and where its data record starts), that record is checked against the archive's
zip directory and the byte range, and the bytes are read with os.preadv into the destination's
memory: one copy, made by the kernel. A destination region that is not contiguous (a chunk of a
row-parallel weight is a block of columns) is read as one run per row, up to IOV_MAX runs per
call.

`locate` returns None for a chunk stored any other way (DCP stream transforms, another
serialization, a tensor that is a view into a larger storage, big-endian data): the caller then
reads that tensor through DCP itself. Bytes that contradict the metadata are a ConversionError.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConversionError

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip local file header (30 bytes)


@dataclass(frozen=True)
class StoredChunk:
    """Where a chunk's elements lie: C-contiguous from byte `data_offset` of `path`."""

    path: Path
    data_offset: int
    sizes: tuple[int, ...]
    dtype: torch.dtype


class _Window(io.RawIOBase):
    """The bytes [start, start + length) of an open file, as a seekable file of their own."""

    def __init__(self, fd: int, start: int, length: int):
        self._fd, self._start, self._length, self._position = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self._length - self._position))
        if count == 0:
            return 0
        got = os.preadv(self._fd, [memoryview(buffer)[:count]], self._start + self._position)
        self._position += got
        return got


def locate(path: Path, info, sizes: tuple[int, ...], dtype: torch.dtype, what: str) -> StoredChunk | None:
    """The place of a chunk's data (`info`: DCP's _StorageInfo of it, `sizes` and `dtype` from the
    metadata), or None when it is not stored as a plain torch.save archive of its own tensor."""
    if getattr(info, "transform_descriptors", None):
        return None
    where = f"{path}: {what} at byte {info.offset}"
    fd = os.open(path, os.O_RDONLY)
    try:
        window = io.BufferedReader(_Window(fd, info.offset, info.length), buffer_size=1 << 16)
        try:
            archive = zipfile.ZipFile(window)
        except (zipfile.BadZipFile, ValueError, OSError):
            return None  # not a torch.save archive (another DCP serialization): DCP reads it
        records = {entry.filename: entry for entry in archive.infolist()}
        prefix = next((name[: -len("data.pkl")] for name in records if name.endswith("/data.pkl")), None)
        if prefix is None:
            return None
        order = records.get(prefix + "byteorder")
        if order is not None and archive.read(order) != b"little":
            return None
        window.seek(0)
        try:
            tensor = torch.load(window, map_location="meta", weights_only=True)
        except Exception as exc:
            reason = (str(exc).splitlines() or [""])[0][:200]
            problem = f"{type(exc).__name__}: {reason}"
            raise ConversionError(f"{where}: cannot read the chunk ({problem})") from None
        if not isinstance(tensor, torch.Tensor):
            raise ConversionError(f"{where}: holds a {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != tuple(sizes):
            raise ConversionError(f"{where}: holds {list(tensor.shape)}, the .metadata says {list(sizes)}")
        if tensor.dtype != dtype or not tensor.is_contiguous():
            return None  # DCP converts to the metadata's dtype on its copy, and reads any strides
        storage = tensor.untyped_storage()
        record_offset = getattr(storage, "_checkpoint_offset", None)
        if record_offset is None:
            return None
        data = _data_record(window, records, prefix, record_offset, where)
        element = tensor.element_size()
        first = tensor.storage_offset() * element
        needed = math.prod(sizes) * element
        if first + needed > min(data.file_size, storage.nbytes()):
            raise ConversionError(
                f"{where}: its data record holds {data.file_size:,} bytes, "
                f"the tensor needs {first + needed:,}"
            )
        return StoredChunk(Path(path), info.offset + record_offset + first, tuple(sizes), dtype)
    finally:
        os.close(fd)


def _data_record(window, records: dict, prefix: str, record_offset: int, where: str) -> zipfile.ZipInfo:
    """The archive's data record that starts at `record_offset`: stored uncompressed, inside the
    chunk's byte range, its local header agreeing with the zip directory."""
    for name, entry in records.items():
        if not name.startswith(prefix + "data/"):
            continue
        window.seek(entry.header_offset)
        header = window.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise ConversionError(f"{where}: the record {name} has no zip header")
        name_length, extra_length = _LOCAL_HEADER.unpack(header)[-2:]
        start = entry.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        if start != record_offset:
            continue
        if entry.compress_type != zipfile.ZIP_STORED or entry.compress_size != entry.file_size:
            raise ConversionError(f"{where}: the record {name} is compressed")
        window.seek(0, io.SEEK_END)
        if start + entry.file_size > window.tell():
            raise ConversionError(f"{where}: the record {name} runs past the chunk's byte range")
        return entry
    raise ConversionError(f"{where}: no data record starts at byte {record_offset} of the chunk")


def read_region(chunk: StoredChunk, start: tuple[int, ...], dest: torch.Tensor, fd: int) -> None:
    """Read the part of `chunk` that begins at element index `start` (within the chunk) and has
    dest's shape, into `dest` (a view, possibly strided, of a contiguous CPU tensor) from `fd`."""
    sizes, lengths = chunk.sizes, tuple(dest.shape)
    if any(s < 0 or s + n > c for s, n, c in zip(start, lengths, sizes)) or len(start) != len(sizes):
        raise ValueError(f"region {list(start)}+{list(lengths)} outside the chunk {list(sizes)}")
    if dest.numel() == 0:
        return
    element = dest.element_size()
    source_strides = [math.prod(sizes[i + 1 :]) for i in range(len(sizes))]
    # The innermost dims where the region covers the chunk whole and dest's layout is C-contiguous
    # form one run of bytes on both sides; the dims outside them enumerate the runs.
    inner, run = len(lengths), 1
    while inner > 0:
        dim = inner - 1
        if dest.stride(dim) != run and lengths[dim] != 1:
            break
        run *= lengths[dim]
        inner = dim
        if lengths[dim] != sizes[dim]:
            break
    outer = lengths[:inner]
    grid = np.indices(outer, dtype=np.int64).reshape(len(outer), -1) if outer else np.zeros((0, 1), np.int64)
    source = sum(int(s) * st for s, st in zip(start, source_strides))
    source = source + sum(grid[i] * source_strides[i] for i in range(len(outer)))
    target = dest.storage_offset() + sum(grid[i] * dest.stride(i) for i in range(len(outer)))
    source = np.broadcast_to(np.asarray(source, np.int64), grid.shape[1:]) * element
    target = np.broadcast_to(np.asarray(target, np.int64), grid.shape[1:]) * element
    memory = _bytes_of(dest)
    run_bytes = run * element
    group = 0
    while group < len(source):
        end = group + 1  # runs that follow each other in the file are one call
        while end < len(source) and end - group < IOV_MAX and source[end] == source[end - 1] + run_bytes:
            end += 1
        buffers = [memory[t : t + run_bytes] for t in target[group:end].tolist()]
        _read_fully(fd, buffers, chunk.data_offset + int(source[group]), chunk.path)
        group = end


def _bytes_of(dest: torch.Tensor) -> memoryview:
    """The bytes of dest's whole storage, writable (dest shares them)."""
    storage = dest.untyped_storage()
    base = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))
    return memoryview(base.numpy())


def _read_fully(fd: int, buffers: list[memoryview], offset: int, path: Path) -> None:
    """os.preadv until every buffer is filled (a regular file reads short only at its end)."""
    first = 0
    while first < len(buffers):
        count = os.preadv(fd, buffers[first:] if first else buffers, offset)
        if count <= 0:
            raise ConversionError(f"{path}: truncated at byte {offset:,} (the .metadata names bytes past it)")
        offset += count
        while first < len(buffers) and count >= len(buffers[first]):
            count -= len(buffers[first])
            first += 1
        if count:
            buffers[first] = buffers[first][count:]
