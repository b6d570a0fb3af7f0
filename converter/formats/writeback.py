"""Start writing a file's dirty pages to the disk now, without waiting for them (Linux only).

The kernel starts writing back a file's dirty pages only past a share of the machine's memory
(dirty_background_ratio, 10% by default: 12 GB on a 128 GB host), so a converter that fsyncs each
finished shard would otherwise leave the disk idle while it reads and transforms, then wait for
the whole shard at the fsync. sync_file_range(SYNC_FILE_RANGE_WRITE) queues what has been written
so far and returns: the disk writes while the converter works, and the fsync finds little left.
"""

from __future__ import annotations

import ctypes
import sys

_SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_call = getattr(_libc, "sync_file_range", None) if _libc is not None else None
if _call is not None:
    _call.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)


def start(fd: int) -> None:
    """Queue every dirty page of the open file `fd` for writing (a hint: errors are ignored)."""
    if _call is not None:
        _call(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
