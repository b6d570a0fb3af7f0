"""sha256 and size of a file, the unit of the resume records and of the manifest."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

CHUNK = 16 * 2**20


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    size: int

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "size": self.size}


def digest_of(path: Path) -> FileDigest:
    """Read the file once, in chunks (a 4 GB shard never sits in memory)."""
    hasher, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return FileDigest(hasher.hexdigest(), size)
