"""A `torch.save` file written one tensor at a time, with only one tensor in memory.

torch.save pickles a whole object and then copies every tensor's bytes into a zip archive
(uncompressed records `ARCHIVE/data/0`, `ARCHIVE/data/1`, ... in the order the pickler met the
storages). It has no streaming writer, but `torch.serialization.skip_data` saves the archive with
each record's space reserved and its bytes left out. So a file is written in two steps:

1. the skeleton: torch.save of the object with untouched `torch.empty` placeholders under
   skip_data. The placeholders are never read, so they cost address space, not memory;
2. the data: each tensor's bytes written at its record's offset as the tensor arrives, with the
   CRC-32 of every record patched into its data descriptor and central-directory entry at the end.

The result is the file torch.save would have written for the real tensors (the same pickle, the
same layout, valid CRCs), apart from the random `.data/serialization_id` every save draws.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from . import writeback

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # signature ... file name length, extra length
_LOCAL_SIGNATURE = 0x04034B50
_DESCRIPTOR_SIGNATURE = b"PK\x07\x08"
_CENTRAL_SIGNATURE = b"PK\x01\x02"
_END_SIGNATURE = b"PK\x05\x06"
_ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
_ZIP64_END_SIGNATURE = b"PK\x06\x06"
_MAX_WRITE = 1 << 30  # one pwrite call writes at most this many bytes (Linux stops near 2 GiB)
_WRITEBACK_FROM = 16 << 20  # tensors this large start their writeback at once (writeback.py)


@dataclass
class Record:
    """Where one tensor's bytes and CRC-32 fields live in the archive."""

    name: str
    offset: int
    nbytes: int
    crc_fields: tuple[int, ...]  # file positions of the two CRC-32 fields (descriptor, central entry)
    crc: int = 0
    written: bool = False


def _tensors_in_pickle_order(obj) -> list[torch.Tensor]:
    """The tensors of `obj` in the order the pickler meets them (dict insertion order, depth first)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in _tensors_in_pickle_order(value)]
    if isinstance(obj, list | tuple):
        return [t for value in obj for t in _tensors_in_pickle_order(value)]
    return []


def _central_directory(handle) -> tuple[int, int]:
    """(offset, size) of the archive's central directory, from its (zip64) end record."""
    handle.seek(0, os.SEEK_END)
    end = handle.tell()
    tail_size = min(end, 1 << 16)
    handle.seek(end - tail_size)
    tail = handle.read(tail_size)
    at = tail.rfind(_END_SIGNATURE)
    if at < 0:
        raise ValueError("no end of central directory record")
    size, offset = struct.unpack_from("<II", tail, at + 12)
    locator = at - 20
    if locator >= 0 and tail[locator : locator + 4] == _ZIP64_LOCATOR_SIGNATURE:
        (zip64_end,) = struct.unpack_from("<Q", tail, locator + 8)
        handle.seek(zip64_end)
        record = handle.read(56)
        if record[:4] != _ZIP64_END_SIGNATURE:
            raise ValueError("bad zip64 end of central directory record")
        size, offset = struct.unpack_from("<QQ", record, 40)
    return offset, size


def _records(path: Path, count: int) -> list[Record]:
    """The data records data/0 .. data/{count-1} of a torch.save archive, in key order."""
    with open(path, "rb") as handle:
        cd_offset, cd_size = _central_directory(handle)
        handle.seek(cd_offset)
        directory = handle.read(cd_size)
        central_crc = {}
        at = 0
        while at + 46 <= len(directory) and directory[at : at + 4] == _CENTRAL_SIGNATURE:
            name_len, extra_len, comment_len = struct.unpack_from("<HHH", directory, at + 28)
            name = directory[at + 46 : at + 46 + name_len].decode()
            central_crc[name] = cd_offset + at + 16
            at += 46 + name_len + extra_len + comment_len
        records = []
        with zipfile.ZipFile(handle) as archive:
            infos = {info.filename.split("/", 1)[1]: info for info in archive.infolist()}
            for key in range(count):
                info = infos[f"data/{key}"]
                handle.seek(info.header_offset)
                fields = _LOCAL_HEADER.unpack(handle.read(_LOCAL_HEADER.size))
                if fields[0] != _LOCAL_SIGNATURE:
                    raise ValueError(f"bad local header for {info.filename}")
                offset = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
                crc_fields = (central_crc[info.filename],)
                if info.file_size:
                    handle.seek(offset + info.file_size)
                    if handle.read(4) != _DESCRIPTOR_SIGNATURE:
                        raise ValueError(f"no data descriptor after {info.filename}")
                    crc_fields = (offset + info.file_size + 4, *crc_fields)
                records.append(Record(info.filename, offset, info.file_size, crc_fields))
    return records


class StreamedTorchSave:
    """torch.save(obj, path) where obj's tensors are given as shapes now and as data later.

    `obj` holds placeholder tensors (any CPU tensors of the right shape and dtype, never read);
    `write(index, tensor)` then stores the data of the index-th tensor of `obj` (pickle order).
    `finish()` checks that every tensor was written and seals the CRCs."""

    def __init__(self, path: Path, obj):
        self.path = Path(path)
        placeholders = _tensors_in_pickle_order(obj)
        storages = {t.untyped_storage()._cdata for t in placeholders}
        if len(storages) != len(placeholders) or any(t.storage_offset() for t in placeholders):
            raise ValueError("each placeholder needs a storage of its own")
        self.shapes = [(tuple(t.shape), t.dtype) for t in placeholders]
        with torch.serialization.skip_data():
            torch.save(obj, self.path)
        self.records = _records(self.path, len(placeholders))
        for record, placeholder in zip(self.records, placeholders):
            if record.nbytes != placeholder.nbytes:
                raise ValueError(
                    f"{self.path}: {record.name} holds {record.nbytes} bytes, expected {placeholder.nbytes}"
                )
        self._fd = os.open(self.path, os.O_WRONLY)

    def write(self, index: int, tensor: torch.Tensor) -> int:
        record = self.records[index]
        if (tuple(tensor.shape), tensor.dtype) != self.shapes[index]:
            raise ValueError(
                f"{self.path}: tensor {index} should be {self.shapes[index]}, got {tuple(tensor.shape)}"
            )
        if record.written:
            raise ValueError(f"{self.path}: tensor {index} written twice")
        data = memoryview(tensor.detach().contiguous().view(torch.uint8).numpy()).cast("B")
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done : done + _MAX_WRITE], record.offset + done)
        if record.nbytes >= _WRITEBACK_FROM:
            writeback.start(self._fd)  # the disk writes while the next tensor is made
        record.crc = zlib.crc32(data)
        record.written = True
        return record.nbytes

    def finish(self) -> None:
        missing = [r.name for r in self.records if not r.written]
        if missing:
            raise RuntimeError(f"{self.path}: {len(missing)} tensors never written, e.g. {missing[0]}")
        for record in self.records:
            for position in record.crc_fields:
                os.pwrite(self._fd, struct.pack("<I", record.crc), position)
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
