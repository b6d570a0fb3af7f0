"""Megatron-Core's `torch_dist` format, read without building a model and without a GPU.

    ITER/metadata.json        {"sharded_backend": "torch_dist", ...}
    ITER/.metadata            PyTorch DCP metadata (every tensor's GLOBAL shape and its chunks)
    ITER/__R_K.distcp         data
    ITER/common.pt            args, checkpoint_version, iteration

Tensors are global (no per-rank split); homogeneous layers are stacked on a leading axis
(`language_model.decoder.layers.mlp.linear_fc1.weight` is [layers, 2*ffn, hidden]). The reader
names each layer separately (`...decoder.layers.7.mlp.linear_fc1.weight`) and reads one layer
slice at a time: the bytes of the chunks that overlap the slice go straight from the .distcp files
into the slice's tensor (formats/dcp_direct.py); a chunk stored in a way that reader does not
handle is read through torch.distributed.checkpoint's own planner machinery instead, which also
fetches only the chunks that overlap the slice.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from ..errors import ConversionError
from . import dcp_direct, safe_pickle
from .legacy import find_iteration_dir, parallel_sizes
from .read_ahead import FileRange, ReadAhead

_STACKED = re.compile(r"^((?:\w+\.)*?decoder\.layers)\.([a-z_].*)$")


class _SlicePlanner(DefaultLoadPlanner):
    """Reads `offsets`/`shape` of one checkpoint tensor into `dest` (a slice of a stacked tensor)."""

    def __init__(self, key: str, offsets: tuple[int, ...], dest: torch.Tensor):
        super().__init__()
        self._key, self._offsets, self._dest = key, offsets, dest

    def create_local_plan(self) -> LoadPlan:
        meta = self.metadata.state_dict_metadata[self._key]
        chunk = ChunkStorageMetadata(offsets=torch.Size(self._offsets), sizes=self._dest.shape)
        return LoadPlan(create_read_items_for_chunk_list(self._key, meta, [chunk]))

    def resolve_tensor(self, read_item):
        dest = self._dest
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest


class _KnownMetadataReader(dcp.FileSystemReader):
    """DCP's file reader, given the checkpoint's metadata instead of unpickling it at every load."""

    def __init__(self, path: Path, metadata):
        super().__init__(str(path))
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs):
        return self._metadata


@dataclass
class TorchDistCheckpoint:
    root: Path
    iteration_dir: Path
    args: object
    tp: int
    pp: int
    vp: int = 1
    entries: dict[str, tuple[str, int | None, TensorStorageMetadata]] = field(default_factory=dict)
    note: str | None = None
    generation: str = ""  # which megatron-core layout the common state came in (for `inspect`)
    files: list[Path] = field(default_factory=list)  # every file of the iteration folder
    storage: dict = field(default_factory=dict)  # DCP MetadataIndex -> (relative path, offset, length)
    metadata: object = field(default=None, repr=False)  # DCP Metadata, read once (not at every read)
    chunk_info: dict = field(default_factory=dict, repr=False)  # (key, chunk offsets) -> _StorageInfo
    _located: dict = field(default_factory=dict, repr=False)  # (key, offsets) -> StoredChunk or None
    _ahead: tuple | None = field(default=None, repr=False)  # (ReadAhead, name -> position) once ordered

    format = "torch_dist"

    def names(self) -> list[str]:
        return list(self.entries)

    def files_of(self, name: str) -> list[Path]:
        key = self.entries[name][0]
        paths = {info.relative_path for index, info in self.storage.items() if index.fqn == key}
        return [self.iteration_dir / path for path in sorted(paths)]

    def shape(self, name: str, transform=None) -> tuple[int, ...]:
        key, layer, meta = self.entries[name]
        return tuple(meta.size)[1:] if layer is not None else tuple(meta.size)

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][2].properties.dtype

    def nbytes(self, name: str) -> int:
        count = 1
        for size in self.shape(name):
            count *= size
        return count * torch.empty((), dtype=self.dtype(name)).element_size()

    def read(self, name: str, transform=None) -> torch.Tensor:
        if self._ahead is not None and name in self._ahead[1]:
            self._ahead[0].reached(self._ahead[1][name])
        key, layer, meta = self.entries[name]
        full = tuple(meta.size)
        if layer is None:
            dest, offsets = torch.empty(full, dtype=meta.properties.dtype), (0,) * len(full)
        else:
            dest = torch.empty((1, *full[1:]), dtype=meta.properties.dtype)
            offsets = (layer,) + (0,) * (len(full) - 1)
        if not self._read_direct(name, key, meta, offsets, dest):
            self._read_through_dcp(name, key, offsets, dest)
        return dest[0] if layer is not None else dest

    def _read_direct(self, name: str, key: str, meta, offsets: tuple[int, ...], dest: torch.Tensor) -> bool:
        """dest (the region of `key` at `offsets`) read chunk by chunk with dcp_direct; False when
        a chunk it needs is stored in a way dcp_direct leaves to DCP."""
        wanted = [(chunk, self._locate(name, key, meta, chunk)) for chunk in meta.chunks]
        regions = []
        for chunk, stored in wanted:
            region = _overlap(offsets, tuple(dest.shape), tuple(chunk.offsets), tuple(chunk.sizes))
            if region is None:
                continue
            if stored is None:
                return False
            regions.append((stored, region))
        handles: dict[Path, int] = {}
        try:
            for stored, (inside_chunk, inside_dest, lengths) in regions:
                fd = handles.get(stored.path)
                if fd is None:
                    fd = handles[stored.path] = os.open(stored.path, os.O_RDONLY)
                view = dest
                for dim, (begin, length) in enumerate(zip(inside_dest, lengths)):
                    view = view.narrow(dim, begin, length)
                dcp_direct.read_region(stored, inside_chunk, view, fd)
        except OSError as exc:
            raise ConversionError(f"{self.iteration_dir}: cannot read {name} ({exc})") from None
        finally:
            for fd in handles.values():
                os.close(fd)
        return True

    def _locate(self, name: str, key: str, meta, chunk):
        """Where a chunk's data lies (dcp_direct.locate), once per chunk."""
        place = (key, tuple(chunk.offsets))
        if place not in self._located:
            info = self.chunk_info[place]
            self._located[place] = dcp_direct.locate(
                self.iteration_dir / info.relative_path,
                info,
                tuple(chunk.sizes),
                meta.properties.dtype,
                f"{name} (chunk {list(chunk.offsets)})",
            )
        return self._located[place]

    def _read_through_dcp(self, name: str, key: str, offsets: tuple[int, ...], dest: torch.Tensor) -> None:
        try:
            with warnings.catch_warnings():  # no_dist=True is what we mean: DCP warns about it regardless
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(
                    {key: dest},
                    storage_reader=_KnownMetadataReader(self.iteration_dir, self.metadata),
                    planner=_SlicePlanner(key, offsets, dest),
                    no_dist=True,
                )
        except (Exception, CheckpointException) as exc:  # DCP's own exception is a BaseException
            raise ConversionError(self._read_failure(name, key, exc)) from None

    def read_order(self, names: list[str]) -> None:
        """The tensors about to be read, in order: the .distcp byte ranges of their chunks are read
        ahead into the page cache while the current one is being written (formats/read_ahead.py)."""
        chunks: dict[str, list] = {}
        for index, info in self.storage.items():
            chunks.setdefault(index.fqn, []).append((index, info))
        items = []
        for name in names:
            key, layer, _ = self.entries[name]
            items.append(
                [
                    FileRange(str(self.iteration_dir / info.relative_path), info.offset, info.length)
                    for index, info in sorted(
                        chunks.get(key, []), key=lambda c: (c[1].relative_path, c[1].offset)
                    )
                    if layer is None or index.offset[0] == layer
                ]
            )
        self._ahead = (ReadAhead(items), {name: k for k, name in enumerate(names)})

    def _read_failure(self, name: str, key: str, exc: BaseException) -> str:
        """One line naming the .distcp file whose chunk of `key` does not load, and why."""
        if isinstance(exc, CheckpointException) and exc.failures:
            exc = next(iter(exc.failures.values()))[0]
        reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        for index, info in self.storage.items():
            if index.fqn != key:
                continue
            path = self.iteration_dir / info.relative_path
            try:
                with open(path, "rb") as file:
                    file.seek(info.offset)
                    torch.load(io.BytesIO(file.read(info.length)), map_location="cpu", weights_only=True)
            except Exception as chunk_exc:
                reason = f"{type(chunk_exc).__name__}: {(str(chunk_exc).splitlines() or [''])[0][:200]}"
                return f"{path}: cannot read {name} at byte {info.offset} ({reason})"
        return f"{self.iteration_dir}: cannot read {name} ({reason})"


def read(root: Path, *, iteration: int | None = None, trust_pickle: bool = False) -> TorchDistCheckpoint:
    iteration_dir, note = find_iteration_dir(root, iteration)
    meta_json = iteration_dir / "metadata.json"
    try:
        described = json.loads(meta_json.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{meta_json}: unreadable ({exc})") from None
    if not isinstance(described, dict):
        raise ConversionError(f"{meta_json}: holds a {type(described).__name__}, not a JSON object")
    backend = described.get("sharded_backend")
    if backend != "torch_dist":
        raise ConversionError(
            f"{meta_json}: sharded_backend {backend!r} is not supported (only 'torch_dist')"
        )
    metadata_path = iteration_dir / ".metadata"
    metadata = safe_pickle.load_dcp_metadata(metadata_path, trust_pickle=trust_pickle)
    try:
        storage = dict(metadata.storage_data)
        state_meta = dict(metadata.state_dict_metadata)
    except (AttributeError, TypeError) as exc:
        raise ConversionError(f"{metadata_path}: not DCP metadata ({exc})") from None
    _check_storage_files(iteration_dir, storage)
    common, common_where, generation = _common_state(iteration_dir, state_meta, storage, trust_pickle)
    args = common.get("args") if isinstance(common, dict) else None
    if args is None:
        raise ConversionError(f"{common_where}: no 'args'")
    tp, pp, _ = parallel_sizes(args, common_where)
    ckpt = TorchDistCheckpoint(Path(root), iteration_dir, args, tp, pp, note=note, storage=storage)
    ckpt.metadata = metadata
    ckpt.generation = generation
    ckpt.files = sorted(p for p in iteration_dir.iterdir() if p.is_file())
    stored = {(index.fqn, tuple(index.offset or ())): info for index, info in storage.items()}
    ckpt.chunk_info = stored
    for key, meta in state_meta.items():
        if not isinstance(meta, TensorStorageMetadata) or key.startswith(IGNORED_PREFIXES):
            continue  # _extra_state and other byte objects; optimizer state is never read
        _check_chunks(metadata_path, key, meta, stored)  # before anything proportional to its size
        stacked = _STACKED.match(key)
        if stacked:
            for layer in range(meta.size[0]):
                ckpt.entries[f"{stacked.group(1)}.{layer}.{stacked.group(2)}"] = (key, layer, meta)
        else:
            ckpt.entries[key] = (key, None, meta)
    return ckpt


# Top-level keys of a torch_dist checkpoint that are not the model's: the distributed optimizer's
# state (exp_avg, exp_avg_sq, fp32 param buckets) and RNG state. Never read.
IGNORED_PREFIXES = ("optimizer.", "rng_state", "rerun_state_machine_state")
COMMON_STATE_KEY = "common_state"  # megatron-core >= 0.19: a ShardedObject, key "common_state/shard_0_1"


def _common_state(iteration_dir: Path, state_meta: dict, storage: dict, trust_pickle: bool):
    """The common state dict (args, iteration, ...): `common.pt` up to megatron-core 0.18, the DCP
    byte object `common_state` from 0.19 (read as raw bytes and unpickled safely; DCP's own
    planner would torch.load it with weights_only=False). Returns (state, where, generation)."""
    common_path = iteration_dir / "common.pt"
    if common_path.exists():
        state = safe_pickle.load(common_path, trust_pickle=trust_pickle, mmap=False)
        return state, common_path, "megatron-core <= 0.18 (common.pt)"
    keys = [key for key in state_meta if key == COMMON_STATE_KEY or key.startswith(COMMON_STATE_KEY + "/")]
    infos = [info for index, info in storage.items() if index.fqn in keys]
    if not infos:
        raise ConversionError(
            f"{common_path}: missing, and {iteration_dir / '.metadata'} has no {COMMON_STATE_KEY!r} "
            "(megatron-core 0.19+) either"
        )
    if len(infos) != 1:
        raise ConversionError(f"{iteration_dir / '.metadata'}: {len(infos)} chunks of {COMMON_STATE_KEY!r}")
    info = infos[0]
    path = iteration_dir / info.relative_path
    where = f"{path} ({COMMON_STATE_KEY} at byte {info.offset})"
    if getattr(info, "transform_descriptors", None):
        raise ConversionError(f"{where}: stored with transforms {info.transform_descriptors}, not supported")
    with open(path, "rb") as file:
        file.seek(info.offset)
        data = file.read(info.length)
    # DCP stores torch.save(BytesIO(torch.save([common state]))): a ShardedObject's bytes, wrapped
    state = safe_pickle.load(data, trust_pickle=trust_pickle, where=where)
    inner = safe_pickle.bytes_of(state)
    if inner is not None:
        state = safe_pickle.load(inner, trust_pickle=trust_pickle, where=where)
    if isinstance(state, (list, tuple)) and len(state) == 1:
        state = state[0]
    return state, Path(where), "megatron-core >= 0.19 (common_state in DCP)"


def _overlap(offsets, lengths, chunk_offsets, chunk_sizes):
    """The part of the region (offsets, lengths) inside a chunk, as (start in the chunk, start in
    the region, lengths), or None when they do not meet."""
    inside_chunk, inside_region, common = [], [], []
    for at, length, chunk_at, chunk_size in zip(offsets, lengths, chunk_offsets, chunk_sizes):
        low, high = max(at, chunk_at), min(at + length, chunk_at + chunk_size)
        if low >= high:
            return None
        inside_chunk.append(low - chunk_at)
        inside_region.append(low - at)
        common.append(high - low)
    return tuple(inside_chunk), tuple(inside_region), tuple(common)


def _check_chunks(metadata_path: Path, key: str, meta, stored: dict) -> None:
    """A tensor's chunks lie inside its shape, cover all of it, and each has the bytes it claims in
    the data files: sizes in a `.metadata` (e.g. 10**12 stacked layers) are checked against the
    data actually present."""
    size = tuple(meta.size)
    if any(not isinstance(d, int) or d < 0 for d in size):
        raise ConversionError(f"{metadata_path}: {key} has the shape {list(size)}")
    try:
        element = torch.empty((), dtype=meta.properties.dtype).element_size()
    except (AttributeError, TypeError, RuntimeError):
        raise ConversionError(f"{metadata_path}: {key} has no valid dtype") from None
    total, covered = math.prod(size), 0
    for chunk in meta.chunks:
        offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
        if (
            len(offsets) != len(size)
            or len(sizes) != len(size)
            or any(o < 0 or n < 0 or o + n > d for o, n, d in zip(offsets, sizes, size))
        ):
            raise ConversionError(f"{metadata_path}: {key} {list(size)} has a chunk outside it ({chunk})")
        volume = math.prod(sizes)
        info = stored.get((key, offsets))
        if info is None:
            raise ConversionError(
                f"{metadata_path}: {key}: the chunk at {list(offsets)} has no data file entry"
            )
        if not getattr(info, "transform_descriptors", None) and info.length < volume * element:
            raise ConversionError(
                f"{metadata_path}: {key}: the chunk at {list(offsets)} claims {volume * element:,} bytes, "
                f"its data holds {info.length:,}"
            )
        covered += volume
    if covered != total:
        raise ConversionError(
            f"{metadata_path}: {key} is {list(size)} ({total:,} elements) but its chunks hold {covered:,}"
        )


def _check_storage_files(iteration_dir: Path, storage: dict) -> None:
    """Every .distcp file the metadata names exists and is long enough for its chunks."""
    needed: dict[str, int] = {}
    inside = iteration_dir.resolve()
    for info in storage.values():
        relative = Path(info.relative_path)
        escapes = relative.is_absolute() or ".." in relative.parts
        if escapes or inside not in (inside / relative).resolve().parents:
            raise ConversionError(
                f"{iteration_dir / '.metadata'}: names the data file {info.relative_path!r}, which is not "
                "inside the iteration folder"
            )
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for relative, length in sorted(needed.items()):
        path = iteration_dir / relative
        if not path.is_file():
            raise ConversionError(f"{path}: missing (the checkpoint's .metadata lists it)")
        size = path.stat().st_size
        if size < length:
            raise ConversionError(f"{path}: truncated ({size:,} bytes; the .metadata says {length:,})")
