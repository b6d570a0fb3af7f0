"""Tensor-by-tensor execution of a plan: read a source tensor (TP shards merged), transform, cast,
write its targets; shared by the engine (one process) and converter/workers.py (N processes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mappings.table import Rule
from mappings.transforms import LayoutError

from .errors import ConversionError
from .formats.safetensors_stream import PlannedTensor, ShardedWriter


@dataclass
class Step:
    """One row applied to one tensor: Megatron `source` <-> HF `targets`."""

    rule: Rule
    layer: str
    source: str
    targets: list[PlannedTensor]


def where(ckpt, name: str) -> str:
    """The file(s) a source tensor lives in, for an error message."""
    files = ckpt.files_of(name)
    if not files:
        return str(ckpt.iteration_dir)
    more = f" (and {len(files) - 1} more)" if len(files) > 1 else ""
    return f"{files[0]}{more}"


def stream_steps(ckpt, steps: list[Step], writer: ShardedWriter, check_finite: bool, advance) -> None:
    """Read, transform and write, tensor by tensor, the steps with a target in one of the writer's
    shards; `advance(bytes)` after each tensor written."""
    # The reader reads ahead in this order (page cache only) while each tensor is written.
    ckpt.read_order([s.source for s in steps if any(writer.wants(t.name) for t in s.targets)])
    for step in steps:
        if not any(writer.wants(t.name) for t in step.targets):
            continue
        try:
            whole = ckpt.read(step.source, step.rule.transform)
            parts = step.rule.transform.to_hf(whole)
        except LayoutError as exc:
            raise ConversionError(f"{where(ckpt, step.source)}: {step.source}: {exc}") from None
        for target, part in zip(step.targets, parts):
            if not writer.wants(target.name):
                continue
            part = part.to(target.dtype)
            if check_finite and part.is_floating_point() and not bool(torch.isfinite(part).all()):
                raise ConversionError(f"{where(ckpt, step.source)}: {step.source} holds NaN or Inf")
            advance(writer.write(target.name, part))
        whole = parts = part = None  # free this tensor before the next one is read
