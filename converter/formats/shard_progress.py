"""Records of finished shards inside a partial output folder, so that a rerun can reuse them.

A shard's record is written only once its file is complete and flushed to disk: the file's sha256
and size, and the fingerprint of the conversion that wrote it (source files, plan, options). A
rerun reuses a shard only when the record carries the rerun's own fingerprint, the file has the
planned size, its header is byte for byte the planned header, and its sha256 is the recorded one.
One small file per shard, so that writers of different shards never touch the same record.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .checksums import FileDigest, digest_of

PROGRESS = ".nvlm_port_progress"


def _record_path(folder: Path, shard: str) -> Path:
    return Path(folder) / PROGRESS / f"{shard}.json"


def record(folder: Path, shard: str, digest: FileDigest, fingerprint: str) -> None:
    path = _record_path(folder, shard)
    path.parent.mkdir(exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"fingerprint": fingerprint, **digest.to_json()}))
    os.replace(temporary, path)  # a record is there whole or not at all


def recorded(folder: Path, shard: str, fingerprint: str) -> FileDigest | None:
    """The shard's record if it exists, parses and belongs to this fingerprint (not re-checked)."""
    try:
        entry = json.loads(_record_path(folder, shard).read_text())
        if entry["fingerprint"] != fingerprint:
            return None
        return FileDigest(str(entry["sha256"]), int(entry["size"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def reusable(folder: Path, shard: str, header: bytes, size: int, fingerprint: str) -> FileDigest | None:
    """The shard's digest when the file on disk is exactly what this conversion would write."""
    digest = recorded(folder, shard, fingerprint)
    path = Path(folder) / shard
    if digest is None or digest.size != size or not path.is_file() or path.stat().st_size != size:
        return None
    with open(path, "rb") as file:
        if file.read(len(header)) != header:
            return None
    return digest if digest_of(path) == digest else None


def clear(folder: Path) -> None:
    shutil.rmtree(Path(folder) / PROGRESS, ignore_errors=True)
