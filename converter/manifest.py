"""The sha256 manifest a conversion leaves in its Hugging Face folder (`nvlm_port_manifest.json`).

It lists every file of the folder (sha256 and size) and says where the weights came from (source
checkpoint path, format, iteration, parallel layout) and which tool wrote them. It holds no
timestamp: two conversions of one source with one set of options write identical manifests, so a
resumed conversion is byte for byte the uninterrupted one. `convert-checkpoint verify` checks it.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from .formats import shard_progress
from .formats.checksums import FileDigest, digest_of

MANIFEST = "nvlm_port_manifest.json"
FORMAT = "nvlm-port manifest 1"


def tool_version() -> str:
    try:
        return metadata.version("nvlm-port")
    except metadata.PackageNotFoundError:
        return "unknown"


def tool() -> dict:
    return {"name": "nvlm-port", "version": tool_version()}


def source_record(ckpt, dtype: str) -> dict:
    return {
        "path": str(Path(ckpt.root).resolve()),
        "format": ckpt.format,
        "iteration": ckpt.iteration_dir.name,
        "tensor_parallel": ckpt.tp,
        "pipeline_parallel": ckpt.pp,
        "dtype": dtype,
    }


def seal(folder: Path, source: dict, known: dict[str, FileDigest]) -> None:
    """Write the manifest of `folder` (files in `known` are not read again: the shards' digests
    come from their writers) and drop the resume records: the last step before the rename."""
    folder = Path(folder)
    shard_progress.clear(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name != MANIFEST:
            files[name] = (known.get(name) or digest_of(path)).to_json()
    manifest = {
        "format": FORMAT,
        "tool": tool(),
        "source": source,
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def read_manifest(folder: Path) -> dict | None:
    """The manifest's `files` table checked for shape (ValueError naming the problem), or None."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("size"), int)
        for e in files.values()
    ):
        raise ValueError(f"{path}: no valid 'files' table")
    return manifest


def reseal(folder: Path, name: str, by: str) -> None:
    """Record the new sha256 and size of one file that a tool of ours changed after the conversion
    (`parity-check --card` appending its figures to README.md), marked with `resealed_by`; every
    other entry stays as the conversion wrote it. The caller checks the file against its old entry
    first: a file changed by anyone else must not be sealed over."""
    folder = Path(folder)
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["files"][name] = {**digest_of(folder / name).to_json(), "resealed_by": by}
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    partial.replace(path)
