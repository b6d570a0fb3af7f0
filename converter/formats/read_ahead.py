"""Read the next tensors' bytes into the page cache while the current tensor is being written.

A conversion reads a tensor, transforms it and writes it, one tensor at a time; alone, that leaves
the disk idle for reads while it writes and idle for writes while it reads. A plain copy does
better because the kernel writes back behind it while it reads. This thread gives the converter
the same overlap: it reads the byte ranges of the tensors that come next (in the order the
converter will ask for them) into a small scratch buffer, which leaves them in the page cache,
so the converter's own read finds them there. It stays at most `budget` bytes (and always at
least one tensor) ahead, and holds no tensor: the process's resident memory does not grow, only
the kernel's reclaimable cache does.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass

_SCRATCH = 8 << 20
DEFAULT_BUDGET = 1 << 30


@dataclass(frozen=True)
class FileRange:
    path: str
    offset: int
    length: int


class _Progress:
    """What the reading thread and the converter share (the thread holds no ReadAhead)."""

    def __init__(self):
        self.condition = threading.Condition()
        self.consumer = -1  # index of the tensor the converter read last
        self.stopped = False


class ReadAhead:
    """Prefetch `items[j]` (the file ranges of the j-th tensor to be read) in order. Call
    `reached(j)` when the converter reads tensor j; the thread stops when the object goes away,
    at `close()`, or after the last item."""

    def __init__(self, items: list[list[FileRange]], budget: int = DEFAULT_BUDGET):
        self._progress = _Progress()
        sizes = [sum(r.length for r in ranges) for ranges in items]
        self._thread = threading.Thread(
            target=_prefetch, args=(self._progress, items, sizes, budget), name="read-ahead", daemon=True
        )
        self._thread.start()
        weakref.finalize(self, _stop, self._progress)

    def reached(self, index: int) -> None:
        with self._progress.condition:
            self._progress.consumer = max(self._progress.consumer, index)
            self._progress.condition.notify_all()

    def close(self) -> None:
        _stop(self._progress)
        self._thread.join()


def _stop(progress: _Progress) -> None:
    with progress.condition:
        progress.stopped = True
        progress.condition.notify_all()


def _prefetch(progress: _Progress, items: list[list[FileRange]], sizes: list[int], budget: int) -> None:
    scratch = bytearray(_SCRATCH)
    handles: dict[str, int] = {}
    try:
        for j, ranges in enumerate(items):
            with progress.condition:
                while not progress.stopped and j > progress.consumer + 1:
                    if sum(sizes[progress.consumer + 1 : j + 1]) <= budget:
                        break
                    progress.condition.wait()
                if progress.stopped:
                    return
                if j <= progress.consumer:
                    continue  # the converter got there first
            for file_range in ranges:
                if not _read_range(file_range, scratch, handles, progress, j):
                    break
    except OSError:
        return  # a prefetch is only a hint: the converter's own read reports any real problem
    finally:
        for fd in handles.values():
            os.close(fd)


def _read_range(
    file_range: FileRange, scratch: bytearray, handles: dict, progress: _Progress, j: int
) -> bool:
    """Read one range chunk by chunk; False once the converter has passed tensor j (or stopped)."""
    fd = handles.get(file_range.path)
    if fd is None:
        fd = handles[file_range.path] = os.open(file_range.path, os.O_RDONLY)
    view = memoryview(scratch)
    done = 0
    while done < file_range.length:
        if progress.stopped or progress.consumer >= j:
            return False
        count = os.preadv(fd, [view[: min(_SCRATCH, file_range.length - done)]], file_range.offset + done)
        if count <= 0:
            return True
        done += count
    return True
