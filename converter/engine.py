"""The conversion engine: join a mapping table to checkpoint formats, plan, then execute.

Planning reads names, shapes and dtypes only (meta tensors run through the same transforms), and
checks the accounting before any data moves: every source tensor is used by exactly one row or
ignored on purpose, every target tensor is produced exactly once with the shape the model class
expects. Execution then streams tensor by tensor: read (merging TP shards), transform, cast,
write. Nothing holds more than a few tensors at a time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mappings.table import Rule, Table
from mappings.transforms import LayoutError

from .errors import ConversionError
from .formats import legacy
from .formats.safetensors_stream import PlannedTensor, ShardedWriter


@dataclass
class Step:
    """One row applied to one tensor: Megatron `source` <-> HF `targets`."""

    rule: Rule
    layer: str
    source: str
    targets: list[PlannedTensor]


def _match(table: Table, name: str) -> tuple[Rule, str] | None:
    hits = [(rule, layer) for rule in table.rules if (layer := rule.match(name)) is not None]
    if len(hits) > 1:
        raise ConversionError(f"{name}: matched by {len(hits)} rows of the mapping table")
    return hits[0] if hits else None


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def plan_megatron_to_hf(
    ckpt,
    table: Table,
    expected: dict[str, tuple[int, ...]],
    dtype_for: Callable[[str, torch.dtype], torch.dtype],
) -> list[Step]:
    steps, unknown, produced = [], [], {}
    for name in ckpt.names():
        if table.is_ignored(name):
            continue
        hit = _match(table, name)
        if hit is None:
            unknown.append(name)
            continue
        rule, layer = hit
        source = torch.empty(ckpt.shape(name, rule.transform), dtype=ckpt.dtype(name), device="meta")
        try:
            outputs = rule.transform.to_hf(source)
        except (LayoutError, RuntimeError) as exc:
            raise ConversionError(
                f"{ckpt.root}: {name} {tuple(source.shape)} does not fit row '{rule.transform.name}': {exc}"
            ) from None
        targets = []
        for target, out in zip(rule.hf_names(layer), outputs):
            if target in produced:
                raise ConversionError(
                    f"{ckpt.root}: {target} would be written twice (from {produced[target]} "
                    f"and {name}: both local and Transformer Engine names present?)"
                )
            produced[target] = name
            targets.append(PlannedTensor(target, tuple(out.shape), dtype_for(target, source.dtype)))
        steps.append(Step(rule, layer, name, targets))
    if unknown:
        raise ConversionError(f"{ckpt.root}: tensors no mapping row knows: {_listing(unknown)}")
    missing = set(expected) - set(produced)
    if missing:
        raise ConversionError(
            f"{ckpt.root}: the checkpoint lacks tensors the model needs: {_listing(missing)}"
        )
    extra = set(produced) - set(expected)
    if extra:
        raise ConversionError(f"{ckpt.root}: produces tensors the model does not have: {_listing(extra)}")
    wrong = {
        t.name: (t.shape, expected[t.name]) for s in steps for t in s.targets if t.shape != expected[t.name]
    }
    if wrong:
        first = sorted(wrong)[0]
        raise ConversionError(
            f"{ckpt.root}: shapes disagree with the args ({len(wrong)} tensors), e.g. "
            f"{first}: checkpoint gives {wrong[first][0]}, args expect {wrong[first][1]}"
        )
    order = {name: k for k, name in enumerate(expected)}
    steps.sort(key=lambda s: order[s.targets[0].name])
    return steps


def execute_megatron_to_hf(
    ckpt, steps: list[Step], folder: Path, max_shard_size: int, check_finite: bool = False
) -> ShardedWriter:
    planned = [t for s in steps for t in s.targets]
    writer = ShardedWriter(folder, planned, max_shard_size)
    total = writer.total_size
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="tensors -> safetensors", leave=False) as bar:
            for step in steps:
                try:
                    whole = ckpt.read(step.source, step.rule.transform)
                    parts = step.rule.transform.to_hf(whole)
                except LayoutError as exc:
                    raise ConversionError(f"{ckpt.root}: {step.source}: {exc}") from None
                for target, part in zip(step.targets, parts):
                    part = part.to(target.dtype)
                    if check_finite and part.is_floating_point() and not bool(torch.isfinite(part).all()):
                        raise ConversionError(f"{ckpt.root}: {step.source} holds NaN or Inf")
                    bar.update(writer.write(target.name, part))
        writer.finish()
    finally:
        writer.close()
    return writer


# -- HF -> Megatron ------------------------------------------------------------------------------


class HFSource:
    """A Hugging Face folder's tensors, memory-mapped through safetensors."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{self.folder}: no .safetensors files")
        self._handles = {}
        self.where = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:
                raise ConversionError(f"{file}: not a readable safetensors file ({exc})") from None
            self._handles[file.name] = handle
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                self.where[key] = file.name

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.where[name]].get_tensor(name)


def hf_steps(table: Table, hf_names: list[str]) -> list[tuple[Rule, str]]:
    """(row, layer) pairs that together consume every HF tensor exactly once."""
    pending, steps = set(hf_names), []
    for name in hf_names:
        for rule in table.rules:
            layer = rule.match_hf(name)
            if layer is not None:
                steps.append((rule, layer))
                break
    for rule, layer in steps:
        for target in rule.hf_names(layer):
            if target not in pending:
                raise ConversionError(f"HF tensor {target} is missing or used twice")
            pending.discard(target)
    if pending:
        raise ConversionError(f"HF tensors no mapping row knows: {_listing(pending)}")
    return steps


def megatron_tensors(source_get, steps, tp: int) -> Iterator[tuple[str, torch.Tensor, Rule]]:
    """Global Megatron tensors (canonical names, target TP padding) from HF-side tensors."""
    for rule, layer in steps:
        parts = [source_get(name) for name in rule.hf_names(layer)]
        try:
            whole = rule.transform.from_hf(parts, tp)
        except LayoutError as exc:
            raise ConversionError(f"{rule.hf_names(layer)[0]}: {exc}") from None
        yield rule.megatron_name(layer), whole, rule


def write_legacy(folder: Path, args, steps, source_get, *, iteration: int = 1) -> None:
    """One rank file at a time; each holds its slice of every tensor of its stage."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    per_stage = args.num_layers // pp
    if args.num_layers % pp:
        raise ConversionError(f"{args.num_layers} layers do not divide into PP={pp} stages")
    stages = {}
    for rule, layer in steps:
        name = rule.megatron_name(layer)
        stages.setdefault(legacy.stage_of(name, pp, per_stage, args.num_layers), []).append((rule, layer))
    with tqdm(total=tp * pp, desc="megatron ranks", leave=False) as bar:
        for p in range(pp):
            for t in range(tp):
                state = {}
                for name, whole, rule in megatron_tensors(source_get, stages.get(p, []), tp):
                    piece = rule.transform.split(whole, tp)[t]
                    state[legacy.local_layer_name(name, p, per_stage)] = piece.clone()
                legacy.write_rank(folder, iteration, t, p, pp, args, state)
                bar.update()
    legacy.write_tracker(folder, iteration)


_STACK = __import__("re").compile(r"^((?:\w+\.)*?decoder\.layers)\.(\d+)\.(.*)$")


_EXTRA_STATE_OWNERS = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")


def write_torch_dist(folder: Path, args, steps, source_get, *, iteration: int = 1) -> None:
    """What Megatron-Core's dist_checkpointing.save writes, from a single process: global tensors
    under the sharded state dict's names (input norms fused into the next linear's name), the
    layers of each parameter stacked on a leading axis, and an empty `_extra_state` object per
    linear layer (Megatron-Core's loader expects them). One stacked tensor in memory at a time."""
    import json

    import torch.distributed.checkpoint as dcp

    groups: dict[str, list] = {}
    for rule, layer in steps:
        name = rule.sharded_name(layer)
        found = _STACK.match(name)
        key = f"{found.group(1)}.{found.group(3)}" if found else name
        groups.setdefault(key, []).append((int(found.group(2)) if found else None, rule, layer))
    path = Path(folder) / legacy.iteration_name(iteration)
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, members in tqdm(groups.items(), desc="stacking", leave=False):
        members.sort(key=lambda m: -1 if m[0] is None else m[0])
        pairs = [(r, l) for _, r, l in members]
        tensors = [
            whole for _, whole, _ in megatron_tensors(source_get, pairs, args.tensor_model_parallel_size)
        ]
        stacked = members[0][0] is not None
        state[key] = torch.stack(tensors) if stacked else tensors[0]
        if key.endswith(_EXTRA_STATE_OWNERS) and "output_layer" not in key:
            owner = key.rsplit(".", 1)[0]
            count = len(members) if stacked else 1
            for index in range(count):
                # DCP pickles non-tensor values: this stores torch.save([None]), the bytes Megatron-Core
                # writes for a ShardedObject holding the local spec's None extra state.
                state[f"{owner}._extra_state/shard_{index}_{count}"] = [None]
    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": iteration}, path / "common.pt")
    metadata = {
        "sharded_backend": "torch_dist",
        "sharded_backend_version": 1,
        "common_backend": "torch",
        "common_backend_version": 1,
    }
    (path / "metadata.json").write_text(json.dumps(metadata))
    legacy.write_tracker(folder, iteration)


# -- output folders --------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_folder(destination: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `destination` only on success."""
    destination = Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())) and not overwrite:
        raise ConversionError(f"{destination}: exists and is not empty (pass --overwrite to replace it)")
    parent = destination.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        temporary = parent / f".{destination.name}.partial-{os.getpid()}"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
    except OSError as exc:
        raise ConversionError(f"{parent}: cannot write there ({exc.strerror})") from None
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if destination.exists():
        shutil.rmtree(destination) if destination.is_dir() else destination.unlink()
    temporary.rename(destination)


def open_megatron(path: Path, *, iteration: int | None = None, trust_pickle: bool = False):
    from .formats import torch_dist

    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: does not exist")
    if not path.is_dir():
        raise ConversionError(f"{path}: not a checkpoint folder")
    iteration_dir, _ = legacy.find_iteration_dir(path, iteration)
    if (iteration_dir / "metadata.json").exists():
        return torch_dist.read(path, iteration=iteration, trust_pickle=trust_pickle)
    return legacy.read(path, iteration=iteration, trust_pickle=trust_pickle)
