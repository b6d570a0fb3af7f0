"""Sharded safetensors written one tensor at a time, with the index Hugging Face expects.

The safetensors library writes a file from a complete dict of tensors, i.e. a whole shard in
memory (4 GB by default). The format itself is simple and fixed (8-byte little-endian header
size, a JSON header with each tensor's dtype, shape and byte range, then the raw bytes), and a
converter knows every tensor's shape and dtype before it reads any data. So this writer lays out
all shards from the plan, writes each header first and then streams each tensor's bytes as it
arrives: memory holds one tensor. Files are read back with the safetensors library in the tests.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

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
INDEX = "model.safetensors.index.json"


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
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


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


class ShardedWriter:
    """Write the planned tensors, in plan order, into `folder`."""

    def __init__(self, folder: Path, tensors: list[PlannedTensor], max_shard_size: int):
        self.folder = Path(folder)
        self.shards = assign_shards(tensors, max_shard_size)
        self.names = shard_names(len(self.shards))
        self._order = [t for shard in self.shards for t in shard]
        self._next = 0
        self._file = None
        self._shard = -1
        self._remaining_in_shard = 0

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for t in self._order)

    def weight_map(self) -> dict[str, str]:
        return {t.name: name for shard, name in zip(self.shards, self.names) for t in shard}

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Append the next tensor of the plan; returns the bytes written."""
        planned = self._order[self._next]
        if name != planned.name or tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise RuntimeError(f"writer expected {planned}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if self._remaining_in_shard == 0:
            self._open_next_shard()
        data = tensor.detach().contiguous().cpu().view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._next += 1
        self._remaining_in_shard -= 1
        if self._remaining_in_shard == 0:
            self._file.close()
            self._file = None
        return planned.nbytes

    def _open_next_shard(self) -> None:
        self._shard += 1
        shard = self.shards[self._shard]
        self._file = open(self.folder / self.names[self._shard], "wb")  # noqa: SIM115 (closed in write)
        self._file.write(_header(shard, {"format": "pt"}))
        self._remaining_in_shard = len(shard)

    def finish(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"only {self._next} of {len(self._order)} planned tensors were written")
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map()}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
