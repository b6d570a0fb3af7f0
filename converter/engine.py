"""The conversion engine: join a mapping table to checkpoint formats, plan, then execute.

Planning reads names, shapes and dtypes only (meta tensors run through the same transforms), and
checks the accounting before any data moves: every source tensor is used by exactly one row or
ignored on purpose, every target tensor is produced exactly once with the shape the model class
expects. Execution then streams tensor by tensor: read (merging TP shards), transform, cast,
write. Nothing holds more than a few tensors at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from mappings.table import Rule, Table
from mappings.transforms import LayoutError

from .errors import ConversionError
from .formats import legacy, shard_progress
from .formats.checksums import FileDigest
from .formats.safetensors_stream import PlannedTensor, ShardedWriter, ShardLayout


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
        try:
            source = torch.empty(ckpt.shape(name, rule.transform), dtype=ckpt.dtype(name), device="meta")
        except LayoutError as exc:
            raise ConversionError(f"{where(ckpt, name)}: {name}: {exc}") from None
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


def where(ckpt, name: str) -> str:
    """The file(s) a source tensor lives in, for an error message."""
    files = ckpt.files_of(name)
    if not files:
        return str(ckpt.iteration_dir)
    more = f" (and {len(files) - 1} more)" if len(files) > 1 else ""
    return f"{files[0]}{more}"


def resume_fingerprint(ckpt, planned: list[PlannedTensor], max_shard_size: int, check_finite: bool) -> str:
    """What a finished shard depends on: the source files (path, size, mtime), the plan and the
    options. A rerun reuses only shards recorded under its own fingerprint."""
    files = []
    for path in ckpt.files:
        stat = Path(path).stat()
        files.append([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
    tensors = [[t.name, list(t.shape), str(t.dtype)] for t in planned]
    text = json.dumps([files, tensors, max_shard_size, check_finite])
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class WriteResult:
    digests: dict[str, FileDigest]  # every shard file -> sha256 and size
    reused: list[str] = field(default_factory=list)  # shards an interrupted run had finished


def execute_megatron_to_hf(
    ckpt,
    steps: list[Step],
    folder: Path,
    max_shard_size: int,
    check_finite: bool = False,
    resume: bool = False,
) -> WriteResult:
    """Stream every step's tensors into the planned shards. With `resume`, shards an interrupted
    run left finished in `folder` (record, size, header and sha256 checked) are kept, anything
    else there is removed, and only the steps with a target in another shard are read."""
    planned = [t for s in steps for t in s.targets]
    fingerprint = resume_fingerprint(ckpt, planned, max_shard_size, check_finite)
    layout = ShardLayout(planned, max_shard_size)
    reused = {}
    if resume:
        reused = layout.finished_in(folder, fingerprint)
        _remove_all_but(Path(folder), {layout.names[i] for i in reused} | {shard_progress.PROGRESS})
    pending = set(range(len(layout.names))) - set(reused)
    writer = ShardedWriter(folder, planned, max_shard_size, only=pending, fingerprint=fingerprint)
    try:
        with tqdm(
            total=writer.size_to_write, unit="B", unit_scale=True, desc="tensors -> safetensors", leave=False
        ) as bar:
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
                    bar.update(writer.write(target.name, part))
        writer.finish()
    finally:
        writer.close()
    layout.write_index(folder)
    return WriteResult(
        layout.recorded_digests(folder, fingerprint), [layout.names[i] for i in sorted(reused)]
    )


def _remove_all_but(folder: Path, keep: set[str]) -> None:
    for entry in folder.iterdir():
        if entry.name not in keep:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


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


_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a folder named after our own pid was left by an earlier process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftover_partials(destination: Path) -> list[Path]:
    """Temporary siblings `.NAME.partial-PID` of `destination` whose process is gone (killed runs)."""
    destination = Path(destination)
    if not destination.parent.is_dir():
        return []
    found = []
    for entry in destination.parent.iterdir():
        match = _PARTIAL.match(entry.name)
        if (
            match
            and match["name"] == destination.name
            and entry.is_dir()
            and not _pid_alive(int(match["pid"]))
        ):
            found.append(entry)
    return sorted(found)


@contextlib.contextmanager
def atomic_folder(destination: Path, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `destination` only on success. On an error
    it is removed; killed, it stays (as `.NAME.partial-PID`), and `resume` continues in the newest
    such folder a dead process left (removing older ones)."""
    destination = Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())) and not overwrite:
        what = "is a file" if not destination.is_dir() else "exists and is not empty"
        raise ConversionError(f"{destination}: {what} (pass --overwrite to replace it)")
    parent = destination.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        temporary = parent / f".{destination.name}.partial-{os.getpid()}"
        leftovers = leftover_partials(destination) if resume else []
        if leftovers:
            newest = max(leftovers, key=lambda p: p.stat().st_mtime_ns)
            if newest != temporary:
                shutil.rmtree(temporary, ignore_errors=True)
                newest.rename(temporary)
            for older in leftovers:
                if older != newest:
                    shutil.rmtree(older, ignore_errors=True)
        else:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir()
    except OSError as exc:
        blocker = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file" if blocker else exc.strerror
        raise ConversionError(f"{parent}: cannot write there ({reason})") from None
    try:
        yield temporary
    except OSError as exc:
        shutil.rmtree(temporary, ignore_errors=True)
        where = f" ({exc.filename})" if exc.filename else ""
        raise ConversionError(
            f"{destination}: writing failed: {exc.strerror or exc}{where}; partial output removed"
        ) from None
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    replaced = parent / f".{destination.name}.replaced-{os.getpid()}"
    if destination.exists() or destination.is_symlink():
        destination.rename(replaced)  # out of the way first: a kill now leaves no half-removed folder
    temporary.rename(destination)
    if replaced.is_dir() and not replaced.is_symlink():
        shutil.rmtree(replaced)
    elif replaced.exists() or replaced.is_symlink():
        replaced.unlink()


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
