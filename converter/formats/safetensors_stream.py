"""Sharded safetensors written one tensor at a time, with the index Hugging Face expects.

The safetensors library writes a file from a complete dict of tensors, i.e. a whole shard in
memory (4 GB by default). The format itself is simple and fixed (8-byte little-endian header
size, a JSON header with each tensor's dtype, shape and byte range, then the raw bytes), and a
converter knows every tensor's shape and dtype before it reads any data. So this writer lays out
all shards from the plan, writes each header first and then streams each tensor's bytes as it
arrives: memory holds one tensor. Files are read back with the safetensors library in the tests.

Because the layout is fixed up front, a writer can write any subset of the shards (`only`): a
resumed conversion writes the shards an interrupted one did not finish (see shard_progress.py),
and several writers can share one folder, each with its own shards.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConversionError
from . import shard_progress, writeback
from .checksums import FileDigest

DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPE_OF_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}
INDEX = "model.safetensors.index.json"
_WRITEBACK_FROM = 16 << 20  # tensors this large start their writeback at once (formats/writeback.py)


def parse_size(text: str | int) -> int:
    """'4GB' -> 4_000_000_000 (decimal units, as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    units = {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "B": 1,
    }
    upper = text.strip().upper()
    try:
        for unit, factor in units.items():
            if upper.endswith(unit):
                return int(float(upper[: -len(unit)]) * factor)
        return int(upper)
    except OverflowError:  # 'inf GB'
        raise ValueError(f"{text!r} is not a size") from None


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def assign_shards(tensors: list[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    """Tensors in order, a new shard whenever the next one would overflow (one big tensor per
    shard when it alone exceeds the limit), like transformers' save_pretrained."""
    shards, current, size = [], [], 0
    for tensor in tensors:
        if current and size + tensor.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(tensor)
        size += tensor.nbytes
    if current:
        shards.append(current)
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def _header(shard: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    header, offset = {"__metadata__": metadata}, 0
    for tensor in shard:
        header[tensor.name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the library does
    return struct.pack("<Q", len(raw)) + raw


class ShardLayout:
    """Every shard's tensors, file name and header, fixed from the plan before any data moves."""

    def __init__(self, tensors: list[PlannedTensor], max_shard_size: int):
        self.shards = assign_shards(tensors, max_shard_size)
        self.names = shard_names(len(self.shards))
        self.headers = [_header(shard, {"format": "pt"}) for shard in self.shards]
        self._shard_of = {t.name: k for k, shard in enumerate(self.shards) for t in shard}

    def shard_of(self, name: str) -> int:
        """Index of the shard that holds the planned tensor `name`."""
        if name not in self._shard_of:
            raise KeyError(f"{name} is not in the plan")
        return self._shard_of[name]

    def file_size(self, index: int) -> int:
        return len(self.headers[index]) + sum(t.nbytes for t in self.shards[index])

    @property
    def total_size(self) -> int:
        """Bytes of tensor data (what the index's metadata.total_size records)."""
        return sum(t.nbytes for shard in self.shards for t in shard)

    def weight_map(self) -> dict[str, str]:
        return {t.name: name for shard, name in zip(self.shards, self.names) for t in shard}

    def write_index(self, folder: Path) -> None:
        """model.safetensors.index.json, when there is more than one shard (as transformers does)."""
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map()}
            (Path(folder) / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def finished_in(self, folder: Path, fingerprint: str) -> dict[int, FileDigest]:
        """Shards already in `folder` exactly as this layout and fingerprint would write them
        (record, size, header and sha256 checked): the ones a resumed run need not write."""
        found = {}
        for index, name in enumerate(self.names):
            digest = shard_progress.reusable(
                folder, name, self.headers[index], self.file_size(index), fingerprint
            )
            if digest is not None:
                found[index] = digest
        return found

    def recorded_digests(self, folder: Path, fingerprint: str) -> dict[str, FileDigest]:
        """sha256 and size of every shard, from the records its writer left (all must be there)."""
        digests = {name: shard_progress.recorded(folder, name, fingerprint) for name in self.names}
        missing = [name for name, digest in digests.items() if digest is None]
        if missing:
            raise RuntimeError(f"no record of a finished shard for {missing[:3]}")
        return digests


class ShardedWriter:
    """Write the planned tensors of the shards in `only` (default: all of them) into `folder`.

    The tensors of one shard arrive in plan order. A shard's file is opened at its first tensor;
    after its last one the file is flushed to disk and recorded (sha256, size, `fingerprint`) for a
    later resume. Writers with disjoint `only` sets can share a folder: `shard_of(name)` and
    `wants(name)` tell a caller which tensors to hand to which writer.
    """

    def __init__(
        self,
        folder: Path,
        tensors: list[PlannedTensor],
        max_shard_size: int,
        *,
        only: Iterable[int] | None = None,
        fingerprint: str = "",
    ):
        self.folder = Path(folder)
        self.layout = ShardLayout(tensors, max_shard_size)
        self.shards, self.names = self.layout.shards, self.layout.names
        every = range(len(self.shards))
        self.only = frozenset(every if only is None else only)
        if not self.only <= set(every):
            raise ValueError(f"shards {sorted(self.only - set(every))} are not in the layout")
        self.fingerprint = fingerprint
        self._cursor = dict.fromkeys(self.only, 0)
        self._open: dict[int, tuple] = {}  # shard index -> (file, sha256 hasher)
        self._hasher_thread: ThreadPoolExecutor | None = None

    @property
    def total_size(self) -> int:
        return self.layout.total_size

    @property
    def size_to_write(self) -> int:
        """Bytes of tensor data in this writer's shards."""
        return sum(t.nbytes for index in self.only for t in self.shards[index])

    def weight_map(self) -> dict[str, str]:
        return self.layout.weight_map()

    def shard_of(self, name: str) -> int:
        return self.layout.shard_of(name)

    def wants(self, name: str) -> bool:
        """Whether `name` lies in one of this writer's shards."""
        return self.layout.shard_of(name) in self.only

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Append the next tensor of its shard; returns the bytes written."""
        index = self.layout.shard_of(name)
        if index not in self.only:
            raise RuntimeError(
                f"{name} belongs to shard {self.names[index]}, which this writer does not write"
            )
        shard, position = self.shards[index], self._cursor[index]
        planned = shard[position] if position < len(shard) else None
        if planned is None or (name, tuple(tensor.shape), tensor.dtype) != (
            planned.name,
            planned.shape,
            planned.dtype,
        ):
            raise RuntimeError(f"writer expected {planned}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        data = memoryview(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
        path = self.folder / self.names[index]
        try:
            if position == 0:
                self._begin(index, path)
            file, hasher = self._open[index]
            # sha256 on a second thread while the bytes go to the file (both release the GIL)
            hashed = self._hashing().submit(hasher.update, data)
            try:
                file.write(data)
                if len(data) >= _WRITEBACK_FROM:
                    writeback.start(file.fileno())  # the disk writes while the next tensor is read
            finally:
                hashed.result()
            self._cursor[index] += 1
            if self._cursor[index] == len(shard):
                self._end(index, path)
        except OSError as exc:
            raise ConversionError(f"{path}: cannot write ({exc.strerror or exc})") from None
        return planned.nbytes

    def _begin(self, index: int, path: Path) -> None:
        import hashlib

        file = open(path, "wb")  # noqa: SIM115 (closed in _end or close)
        hasher = hashlib.sha256()
        self._open[index] = (file, hasher)
        file.write(self.layout.headers[index])
        hasher.update(self.layout.headers[index])

    def _end(self, index: int, path: Path) -> None:
        file, hasher = self._open.pop(index)
        file.flush()
        os.fsync(file.fileno())
        if hasattr(os, "posix_fadvise"):  # on disk now: drop it from the page cache (drop-behind), so
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # memory stays free for reading
        file.close()
        digest = FileDigest(hasher.hexdigest(), self.layout.file_size(index))
        shard_progress.record(self.folder, self.names[index], digest, self.fingerprint)

    def finish(self) -> None:
        """Check that every shard of this writer is complete (the index is the layout's job)."""
        unfinished = [self.names[i] for i in sorted(self.only) if self._cursor[i] != len(self.shards[i])]
        if unfinished:
            raise RuntimeError(f"shards left incomplete: {unfinished[:3]}")

    def _hashing(self) -> ThreadPoolExecutor:
        if self._hasher_thread is None:
            self._hasher_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        return self._hasher_thread

    def close(self) -> None:
        for file, _ in self._open.values():
            file.close()
        self._open.clear()
        if self._hasher_thread is not None:
            self._hasher_thread.shutdown()
            self._hasher_thread = None


def read_header(path: Path) -> dict[str, dict]:
    """A safetensors file's tensor entries (name -> dtype, shape, data_offsets), checked against
    the file: ValueError saying what is wrong for a header that is cut, not JSON, or inconsistent."""
    size = Path(path).stat().st_size
    with open(path, "rb") as file:
        raw = file.read(8)
        if len(raw) < 8:
            raise ValueError(f"{size} bytes: too short for a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise ValueError(f"header length {length} runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(file.read(length))
        except (ValueError, RecursionError):
            raise ValueError("the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    data_size, covered = size - 8 - length, 0
    for name, entry in header.items():
        problem = _entry_problem(entry, data_size)
        if problem:
            raise ValueError(f"header entry {name}: {problem}")
        covered += entry["data_offsets"][1] - entry["data_offsets"][0]
    if covered != data_size:
        raise ValueError(f"the header accounts for {covered} bytes of data, the file holds {data_size}")
    return header


def _entry_problem(entry, data_size: int) -> str | None:
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPE_OF_NAME:
        return "no known dtype"
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        return f"bad shape {shape!r}"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        return f"bad data_offsets {offsets!r}"
    start, end = offsets
    nbytes = PlannedTensor("", tuple(shape), DTYPE_OF_NAME[entry["dtype"]]).nbytes
    if not 0 <= start <= end <= data_size or end - start != nbytes:
        return f"data_offsets {offsets} do not hold {nbytes} bytes inside {data_size}"
    return None
