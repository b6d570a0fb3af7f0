"""Open a Megatron checkpoint folder in whichever format it is: the one reader interface the
engine, the worker processes, `verify` and modeling/megatron use.

A checkpoint object (legacy.LegacyCheckpoint, torch_dist.TorchDistCheckpoint) answers: `names()`,
`shape(name, transform)`, `dtype(name)`, `nbytes(name)`, `read(name, transform)` (the global tensor,
TP shards merged by the row's transform), `read_order(names)`, `files_of(name)`, and carries
`args`, `tp`, `pp`, `vp`, `format`, `root`, `iteration_dir`, `files`, `note` and `opened_with`
(how to open it again: what a worker process does).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConversionError
from . import legacy, torch_dist


def open_checkpoint(
    path: Path, iteration: int | None = None, trust_pickle: bool = False, *, pipelined_stacks
):
    """The checkpoint at `path` (legacy `torch` or `torch_dist`, told by the iteration folder's
    metadata.json). `pipelined_stacks`: the layer-name prefixes pipeline stages split and number
    locally in legacy rank files (the model families name them: converter/families)."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: does not exist")
    if not path.is_dir():
        raise ConversionError(f"{path}: not a checkpoint folder")
    iteration_dir, _ = legacy.find_iteration_dir(path, iteration)
    if (iteration_dir / "metadata.json").exists():
        ckpt = torch_dist.read(path, iteration=iteration, trust_pickle=trust_pickle)
    else:
        ckpt = legacy.read(
            path, iteration=iteration, trust_pickle=trust_pickle, pipelined_stacks=pipelined_stacks
        )
    # How to open the same checkpoint again (worker processes do): this iteration, this trust.
    resolved = "release" if iteration_dir.name == "release" else int(iteration_dir.name.removeprefix("iter_"))
    ckpt.opened_with = {
        "path": str(path),
        "iteration": resolved,
        "trust_pickle": trust_pickle,
        "pipelined_stacks": tuple(pipelined_stacks),
    }
    return ckpt
