"""Megatron-Core's `torch_dist` format written from a single process, one chunk in memory at a time.

torch.distributed.checkpoint (DCP) saves a state dict of tensors; each tensor's data is stored in
chunks (the pieces the ranks hold) that together cover its global shape. Megatron-Core stores one
chunk per layer and per tensor-parallel rank. This writer declares those chunks to DCP itself
(a planner that lists write items instead of deriving them from tensors) and hands each chunk's
data over only when DCP's file writer asks for it, so nothing is built whole: memory holds what
`chunk_data` makes for one chunk (the caller may keep the tensor it was cut from, see
converter/megatron_writers.py).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes) of one chunk in the global tensor


@dataclass(frozen=True)
class ChunkedTensor:
    """One checkpoint tensor: its key, global shape and dtype, and the chunks it is stored in."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[Box, ...]


def even_chunks(shape: tuple[int, ...], dim: int | None, pieces: int, lead: int | None = None) -> list[Box]:
    """`pieces` equal chunks of `shape` along `dim` (one chunk when dim is None). With `lead`, the
    boxes live at index `lead` of a leading stacking axis (Megatron-Core's per-layer chunks)."""
    boxes = []
    if dim is None or pieces == 1:
        ranges = [(0, shape[dim])] if dim is not None else [None]
    else:
        if shape[dim] % pieces:
            raise ValueError(f"dim {dim} of {shape} does not split into {pieces} chunks")
        step = shape[dim] // pieces
        ranges = [(k * step, step) for k in range(pieces)]
    for span in ranges:
        offsets, sizes = [0] * len(shape), list(shape)
        if span is not None:
            offsets[dim], sizes[dim] = span
        if lead is not None:
            offsets, sizes = [lead, *offsets], [1, *sizes]
        boxes.append((tuple(offsets), tuple(sizes)))
    return boxes


class _DeclaredChunksPlanner(DefaultSavePlanner):
    """The default planner for the state dict's objects, plus the declared tensor chunks."""

    def __init__(
        self, tensors: list[ChunkedTensor], chunk_data: Callable[[ChunkedTensor, Box], torch.Tensor]
    ):
        super().__init__()
        self._tensors = {t.key: t for t in tensors}
        self._chunk_data = chunk_data

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        items = list(plan.items)
        for tensor in self._tensors.values():
            for offsets, sizes in tensor.chunks:
                items.append(
                    WriteItem(
                        index=MetadataIndex(tensor.key, torch.Size(offsets)),
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
                            properties=TensorProperties(dtype=tensor.dtype),
                            size=torch.Size(tensor.shape),
                        ),
                    )
                )
        mappings = dict(plan.planner_data or {})
        mappings.update({key: (key,) for key in self._tensors})  # what flattening a flat dict records
        self.plan = dataclasses.replace(plan, items=items, planner_data=mappings)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        tensor = self._tensors.get(write_item.index.fqn)
        if tensor is None or write_item.type != WriteItemType.SHARD:
            return super().resolve_data(write_item)
        chunk = write_item.tensor_data.chunk
        box = (tuple(chunk.offsets), tuple(chunk.sizes))
        data = self._chunk_data(tensor, box)
        if tuple(data.shape) != box[1] or data.dtype != tensor.dtype:
            raise RuntimeError(f"{tensor.key} chunk {box}: got {tuple(data.shape)} {data.dtype}")
        return data


def save(
    path: Path,
    tensors: list[ChunkedTensor],
    objects: dict,
    chunk_data: Callable[[ChunkedTensor, Box], torch.Tensor],
) -> None:
    """DCP files in `path`: `objects` pickled as they are, each tensor's chunks from `chunk_data`,
    asked for in the order of `tensors` and of their chunks."""
    # One writer thread and no copy-ahead: chunks are resolved one by one, in plan order.
    writer = dcp.FileSystemWriter(str(path), thread_count=1, per_thread_copy_ahead=0)
    planner = _DeclaredChunksPlanner(tensors, chunk_data)
    with warnings.catch_warnings():  # no_dist=True is what we mean: DCP warns about it regardless
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(objects, storage_writer=writer, planner=planner, no_dist=True)
