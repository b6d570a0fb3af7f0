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
    workers: int = 1,
) -> WriteResult:
    """Stream every step's tensors into the planned shards. With `resume`, shards an interrupted
    run left finished in `folder` (record, size, header and sha256 checked) are kept, anything
    else there is removed, and only the steps with a target in another shard are read. With
    `workers` > 1 the shards to write are split among that many processes (converter/workers.py);
    the index is written here, once, after all of them."""
    planned = [t for s in steps for t in s.targets]
    fingerprint = resume_fingerprint(ckpt, planned, max_shard_size, check_finite)
    layout = ShardLayout(planned, max_shard_size)
    reused = {}
    if resume:
        reused = layout.finished_in(folder, fingerprint)
        _remove_all_but(Path(folder), {layout.names[i] for i in reused} | {shard_progress.PROGRESS})
    pending = set(range(len(layout.names))) - set(reused)
    if workers > 1 and len(pending) > 1:
        from .workers import write_in_workers

        write_in_workers(
            ckpt, steps, folder, layout, pending, max_shard_size, check_finite, fingerprint, workers
        )
    else:
        writer = ShardedWriter(folder, planned, max_shard_size, only=pending, fingerprint=fingerprint)
        try:
            with tqdm(
                total=writer.size_to_write,
                unit="B",
                unit_scale=True,
                desc="tensors -> safetensors",
                leave=False,
            ) as bar:
                stream_steps(ckpt, steps, writer, check_finite, bar.update)
            writer.finish()
        finally:
            writer.close()
    layout.write_index(folder)
    return WriteResult(
        layout.recorded_digests(folder, fingerprint), [layout.names[i] for i in sorted(reused)]
    )


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


def _remove_all_but(folder: Path, keep: set[str]) -> None:
    for entry in folder.iterdir():
        if entry.name not in keep:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


# HF -> Megatron writers: converter/megatron_writers.py


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
        ckpt = torch_dist.read(path, iteration=iteration, trust_pickle=trust_pickle)
    else:
        ckpt = legacy.read(path, iteration=iteration, trust_pickle=trust_pickle)
    # How to open the same checkpoint again (worker processes do): this iteration, this trust.
    resolved = "release" if iteration_dir.name == "release" else int(iteration_dir.name.removeprefix("iter_"))
    ckpt.opened_with = {"path": str(path), "iteration": resolved, "trust_pickle": trust_pickle}
    return ckpt
