"""Give back the resident pages of memory-mapped checkpoint tensors once they have been used.

torch.load(mmap=True) maps each rank file privately; every page a reader touches stays in the
process's resident set until the mapping goes away, so streaming through a whole checkpoint would
end with all of it resident. madvise(MADV_DONTNEED) on a used tensor's pages drops them from the
process (they stay in the page cache, and a later access maps them again from the file: these
mappings are never written, so nothing is lost). Only ranges inside file mappings listed in
/proc/self/maps are touched: on ordinary memory the same call would zero the data.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import sys

import torch

from .read_ahead import FileRange

_MADV_DONTNEED = 4  # Linux
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


class FileMappings:
    """The process's private file mappings (start, end, file offset, path), from /proc/self/maps;
    read again when an address is not in the last reading."""

    def __init__(self):
        self._starts: list[int] = []
        self._spans: list[tuple[int, int, int, str]] = []

    def span_of(self, address: int) -> tuple[int, int, int, str] | None:
        span = self._lookup(address)
        if span is None:
            self._read()
            span = self._lookup(address)
        return span

    def _lookup(self, address: int) -> tuple[int, int, int, str] | None:
        at = bisect.bisect_right(self._starts, address) - 1
        if at >= 0 and self._spans[at][0] <= address < self._spans[at][1]:
            return self._spans[at]
        return None

    def _read(self) -> None:
        spans = []
        try:
            with open("/proc/self/maps") as maps:
                lines = maps.readlines()
        except OSError:
            lines = []
        for line in lines:
            fields = line.split(maxsplit=5)
            # address perms offset dev inode path: a private mapping of a file
            if (
                len(fields) == 6
                and fields[1].endswith("p")
                and fields[4] != "0"
                and fields[5].startswith("/")
            ):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                spans.append((start, end, int(fields[2], 16), fields[5].rstrip("\n")))
        spans.sort()
        self._spans = spans
        self._starts = [span[0] for span in spans]


_MAPPINGS = FileMappings()


def release(tensors: list[torch.Tensor]) -> None:
    """Drop the resident pages under each tensor's storage where that storage is a private file
    mapping (a no-op off Linux and for tensors in ordinary memory)."""
    if _libc is None:
        return
    for tensor in tensors:
        if tensor is None or tensor.device.type != "cpu":
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0:
            continue
        span = _MAPPINGS.span_of(storage.data_ptr())
        if span is None:
            continue
        start = max(span[0], storage.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE)
        end = min(span[1], -(-(storage.data_ptr() + storage.nbytes()) // mmap.PAGESIZE) * mmap.PAGESIZE)
        if end > start:
            _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def file_range(tensor: torch.Tensor) -> FileRange | None:
    """The file bytes under a memory-mapped tensor (None for a tensor in ordinary memory)."""
    if _libc is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return None
    address = tensor.data_ptr()
    span = _MAPPINGS.span_of(address)
    if span is None:
        return None
    start, _, offset, path = span
    last = tensor.untyped_storage().data_ptr() + tensor.untyped_storage().nbytes()
    return FileRange(path, address - start + offset, last - address)
