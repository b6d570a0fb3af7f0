"""Megatron-Core's `torch_dist` format, read without building a model and without a GPU.

    ITER/metadata.json        {"sharded_backend": "torch_dist", ...}
    ITER/.metadata            PyTorch DCP metadata (every tensor's GLOBAL shape and its chunks)
    ITER/__R_K.distcp         data
    ITER/common.pt            args, checkpoint_version, iteration

Tensors are global (no per-rank split); homogeneous layers are stacked on a leading axis
(`language_model.decoder.layers.mlp.linear_fc1.weight` is [layers, 2*ffn, hidden]). The reader
names each layer separately (`...decoder.layers.7.mlp.linear_fc1.weight`) and reads one layer
slice at a time through torch.distributed.checkpoint's own planner machinery, which fetches only
the chunks that overlap the slice.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from ..errors import ConversionError
from . import safe_pickle
from .legacy import find_iteration_dir

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

    format = "torch_dist"

    def names(self) -> list[str]:
        return list(self.entries)

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
        key, layer, meta = self.entries[name]
        full = tuple(meta.size)
        if layer is None:
            dest, offsets = torch.empty(full, dtype=meta.properties.dtype), (0,) * len(full)
        else:
            dest = torch.empty((1, *full[1:]), dtype=meta.properties.dtype)
            offsets = (layer,) + (0,) * (len(full) - 1)
        try:
            dcp.load(
                {key: dest},
                checkpoint_id=str(self.iteration_dir),
                planner=_SlicePlanner(key, offsets, dest),
                no_dist=True,
            )
        except Exception as exc:
            raise ConversionError(
                f"{self.iteration_dir}: cannot read {name} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]})"
            ) from None
        return dest[0] if layer is not None else dest


def is_torch_dist(path: Path) -> bool:
    return (Path(path) / "metadata.json").exists()


def read(root: Path, *, iteration: int | None = None, trust_pickle: bool = False) -> TorchDistCheckpoint:
    iteration_dir, note = find_iteration_dir(root, iteration)
    meta_json = iteration_dir / "metadata.json"
    try:
        backend = json.loads(meta_json.read_text()).get("sharded_backend")
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{meta_json}: unreadable ({exc})") from None
    if backend != "torch_dist":
        raise ConversionError(
            f"{meta_json}: sharded_backend {backend!r} is not supported (only 'torch_dist')"
        )
    common = safe_pickle.load(iteration_dir / "common.pt", trust_pickle=trust_pickle, mmap=False)
    args = common.get("args")
    if args is None:
        raise ConversionError(f"{iteration_dir / 'common.pt'}: no 'args'")
    try:
        metadata = dcp.FileSystemReader(str(iteration_dir)).read_metadata()
    except Exception as exc:
        raise ConversionError(
            f"{iteration_dir / '.metadata'}: unreadable ({type(exc).__name__}: {exc})"
        ) from None
    ckpt = TorchDistCheckpoint(
        Path(root),
        iteration_dir,
        args,
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        note=note,
    )
    for key, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            continue  # _extra_state and other byte objects
        stacked = _STACKED.match(key)
        if stacked:
            for layer in range(meta.size[0]):
                ckpt.entries[f"{stacked.group(1)}.{layer}.{stacked.group(2)}"] = (key, layer, meta)
        else:
            ckpt.entries[key] = (key, None, meta)
    return ckpt
