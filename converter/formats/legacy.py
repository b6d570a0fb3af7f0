"""Megatron-LM's legacy `torch` checkpoint format, read and written rank by rank.

    ROOT/latest_checkpointed_iteration.txt      an iteration number or "release"
    ROOT/iter_0000123/mp_rank_TT[_PPP]/model_optim_rng.pt
        {"args", "checkpoint_version", "iteration", "model" (or "model0", "model1", ... with virtual
         pipeline parallelism), optionally "optimizer", "rng_state", ...}

The reader exposes the checkpoint as GLOBAL names (pipeline stages and virtual chunks joined, layer
numbers restored) each with its list of tensor-parallel shards, memory-mapped: nothing is read
until a tensor is used. Optimizer and RNG entries are never touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConversionError
from . import safe_pickle

TRACKER = "latest_checkpointed_iteration.txt"
_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?$")
_LLM_LAYER = re.compile(r"^((?:language_model\.)?decoder\.layers\.)(\d+)\.")


def iteration_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def find_iteration_dir(root: Path, iteration: int | None = None) -> tuple[Path, str | None]:
    """The iteration folder to read, and a note when it was chosen without a tracker."""
    root = Path(root)
    if iteration is not None:
        path = root / iteration_name(iteration)
        if not path.is_dir():
            raise ConversionError(f"{path}: iteration {iteration} not found")
        return path, None
    tracker = root / TRACKER
    if tracker.exists():
        text = tracker.read_text().strip()
        if text != "release" and not text.isdigit():
            raise ConversionError(f"{tracker}: expected an iteration number or 'release', found {text!r}")
        path = root / iteration_name(text)
        if not path.is_dir():
            raise ConversionError(f"{tracker}: points to iteration {text}, but {path} does not exist")
        return path, None
    iterations = sorted(p for p in root.glob("iter_*") if p.is_dir())
    if not iterations:
        raise ConversionError(f"{root}: not a Megatron checkpoint (no {TRACKER} and no iter_* folder)")
    note = None
    if len(iterations) > 1:
        note = (
            f"{root}: no {TRACKER}; using the newest of {len(iterations)} iterations, {iterations[-1].name}"
        )
    return iterations[-1], note


@dataclass
class LegacyCheckpoint:
    root: Path
    iteration_dir: Path
    args: object
    tp: int
    pp: int
    vp: int
    shards: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # global name -> per TP rank
    note: str | None = None

    format = "torch"

    def names(self) -> list[str]:
        return list(self.shards)

    def read(self, name: str, transform) -> torch.Tensor:
        """The global tensor of `name`, merging its TP shards with the row's transform."""
        return transform.merge(self.shards[name])

    def shape(self, name: str, transform) -> tuple[int, ...]:
        metas = [torch.empty(s.shape, dtype=s.dtype, device="meta") for s in self.shards[name]]
        return tuple(transform.merge(metas).shape) if transform.tp_dim is not None else tuple(metas[0].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.shards[name][0].dtype

    def nbytes(self, name: str) -> int:
        return sum(s.numel() * s.element_size() for s in self.shards[name])


def _rank_files(iteration_dir: Path) -> dict[tuple[int, int], Path]:
    files = {}
    for child in sorted(iteration_dir.iterdir()):
        found = _RANK_DIR.match(child.name)
        if found and child.is_dir():
            files[(int(found.group(1)), int(found.group(2) or 0))] = child / "model_optim_rng.pt"
    return files


def read(root: Path, *, iteration: int | None = None, trust_pickle: bool = False) -> LegacyCheckpoint:
    iteration_dir, note = find_iteration_dir(root, iteration)
    files = _rank_files(iteration_dir)
    if not files:
        raise ConversionError(f"{iteration_dir}: no mp_rank_* folders")
    first = safe_pickle.load(files[min(files)], trust_pickle=trust_pickle)
    args = first.get("args")
    if args is None:
        raise ConversionError(f"{files[min(files)]}: no 'args' in the checkpoint")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    expected = {(t, p) for t in range(tp) for p in range(pp)}
    missing = sorted(expected - set(files))
    if missing:
        names = ", ".join(f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") for t, p in missing)
        raise ConversionError(
            f"{iteration_dir}: args say TP={tp} PP={pp} but these ranks are missing: {names}"
        )
    for path in files.values():
        if not path.exists():
            raise ConversionError(f"{path}: missing")
    ckpt = LegacyCheckpoint(Path(root), iteration_dir, args, tp, pp, 1, note=note)
    layouts: dict[int, set[str]] = {}
    for (t, p), path in sorted(files.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        state = first if (t, p) == min(files) else safe_pickle.load(path, trust_pickle=trust_pickle)
        chunks = sorted(k for k in state if re.fullmatch(r"model\d*", k))
        if not chunks:
            raise ConversionError(f"{path}: no 'model' entry (not a model checkpoint?)")
        ckpt.vp = len(chunks) if chunks != ["model"] else 1
        names = set()
        for chunk in chunks:
            virtual = int(chunk[5:] or 0)
            offset = _layer_offset(args, p, virtual, pp, ckpt.vp)
            for key, tensor in state[chunk].items():
                if not isinstance(tensor, torch.Tensor):
                    continue  # _extra_state None / BytesIO stand-ins
                name = _LLM_LAYER.sub(lambda m, o=offset: f"{m.group(1)}{int(m.group(2)) + o}.", key)
                names.add(name)
                ckpt.shards.setdefault(name, [None] * tp)[t] = tensor
        layouts.setdefault(p, set())
        if t == 0:
            layouts[p] = names
        elif names != layouts[p]:
            diff = sorted(names ^ layouts[p])[:5]
            raise ConversionError(f"{path}: holds different tensors than TP rank 0 of its stage: {diff}")
    return ckpt


def _layer_offset(args, pp_rank: int, virtual: int, pp: int, vp: int) -> int:
    per_chunk = args.num_layers // (pp * vp)
    return (virtual * pp + pp_rank) * per_chunk


def rank_dir(root: Path, iteration: int, tp_rank: int, pp_rank: int, pp: int) -> Path:
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return Path(root) / iteration_name(iteration) / name


def write_rank(root: Path, iteration: int, tp_rank: int, pp_rank: int, pp: int, args, model: dict) -> Path:
    path = rank_dir(root, iteration, tp_rank, pp_rank, pp)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": model},
        path / "model_optim_rng.pt",
    )
    return path / "model_optim_rng.pt"


def write_tracker(root: Path, iteration: int) -> None:
    (Path(root) / TRACKER).write_text(str(iteration))


def local_layer_name(name: str, pp_rank: int, layers_per_stage: int) -> str:
    """Global LLM layer number -> the stage-local one a legacy file stores."""
    return _LLM_LAYER.sub(lambda m: f"{m.group(1)}{int(m.group(2)) - pp_rank * layers_per_stage}.", name)


def stage_of(name: str, pp: int, layers_per_stage: int, num_layers: int) -> int:
    """Pipeline stage a global tensor lives on: LLM layer i on i // per-stage; embeddings, vision
    and projector on the first; final norm and output layer on the last."""
    found = _LLM_LAYER.match(name)
    if found:
        return int(found.group(2)) // layers_per_stage
    if name.endswith(("final_layernorm.weight", "output_layer.weight")):
        return pp - 1
    return 0
