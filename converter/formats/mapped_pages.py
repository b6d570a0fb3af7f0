"""Give back the resident pages of memory-mapped checkpoint tensors once they have been used.

torch.load(mmap=True) and safetensors map their files privately; every page a reader touches
stays in the process's resident set until the mapping goes away, so streaming through a whole
checkpoint would end with all of it resident. madvise(MADV_DONTNEED) on a used tensor's pages
drops them from the process (they stay in the page cache, and a later access maps them again from
the file: these mappings are never written, so nothing is lost).

On ordinary memory the same call would zero the data, so it is only made on addresses inside a
private mapping of one of the owner's own files (`FileMappings(paths)`), as /proc/self/maps lists
them. The owner (a checkpoint reader, an HF folder source) keeps those files mapped as long as it
holds the tensors, so its spans cannot go stale under it.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import sys

import torch

from .read_ahead import FileRange

_MADV_DONTNEED = 4  # Linux
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


class FileMappings:
    """The private mappings (start, end, file offset, path) of the files `paths`, from
    /proc/self/maps, read again when an address is not in the last reading."""

    def __init__(self, paths):
        self._paths = {os.path.realpath(p) for p in paths}
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
        if _libc is None:
            return
        spans = []
        try:
            with open("/proc/self/maps") as maps:
                lines = maps.readlines()
        except OSError:
            lines = []
        for line in lines:
            fields = line.split(maxsplit=5)
            # address perms offset dev inode path: a private mapping of one of our files
            if len(fields) == 6 and fields[1].endswith("p") and fields[5].rstrip("\n") in self._paths:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                spans.append((start, end, int(fields[2], 16), fields[5].rstrip("\n")))
        spans.sort()
        self._spans = spans
        self._starts = [span[0] for span in spans]

    def release(self, tensors: list[torch.Tensor | None]) -> None:
        """Drop the resident pages under each tensor's storage (left alone: tensors in ordinary
        memory, or anywhere but these files' mappings; everything off Linux)."""
        for tensor in tensors:
            if tensor is None or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            if storage.nbytes() == 0:
                continue
            span = self.span_of(storage.data_ptr())
            if span is None:
                continue
            start = max(span[0], storage.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE)
            end = min(span[1], -(-(storage.data_ptr() + storage.nbytes()) // mmap.PAGESIZE) * mmap.PAGESIZE)
            if end > start:
                _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)

    def file_range(self, tensor: torch.Tensor) -> FileRange | None:
        """The file bytes under a memory-mapped tensor (None for one in ordinary memory)."""
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            return None
        address = tensor.data_ptr()
        span = self.span_of(address)
        if span is None:
            return None
        start, _, offset, path = span
        last = tensor.untyped_storage().data_ptr() + tensor.untyped_storage().nbytes()
        return FileRange(path, address - start + offset, last - address)


def overlaps(tensor: torch.Tensor, others: list[torch.Tensor | None]) -> bool:
    """Whether `tensor`'s memory lies in (or over) the storage of any of `others`: a result that is
    a view of its inputs keeps needing their pages."""
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    for other in others:
        if other is None:
            continue
        theirs = other.untyped_storage()
        if theirs.data_ptr() < end and start < theirs.data_ptr() + theirs.nbytes():
            return True
    return False
