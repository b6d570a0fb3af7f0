"""The conversion engine: join a mapping table to checkpoint formats, plan, then execute.

Planning reads names, shapes and dtypes only (meta tensors run through the same transforms), and
checks the accounting before any data moves: every source tensor is used by exactly one row or
ignored on purpose, every target tensor is produced exactly once with the shape the model class
expects. Execution then streams tensor by tensor (converter/streaming.py): read (merging TP shards),
transform, cast, write; with --workers N in N processes (converter/workers.py). Nothing holds more
than a few tensors at a time. Checkpoints are opened by converter/formats/reader.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException
from tqdm import tqdm

from mappings.table import Rule, Table
from mappings.transforms import LayoutError

from .errors import ConversionError
from .families import PIPELINED_STACKS
from .formats import shard_progress
from .formats.checksums import FileDigest
from .formats.reader import open_checkpoint
from .formats.safetensors_stream import PlannedTensor, ShardedWriter, ShardLayout
from .streaming import Step, stream_steps, where
from .workers import write_in_workers


def _match(table: Table, name: str) -> tuple[Rule, str] | None:
    hits = [(rule, layer) for rule in table.rules if (layer := rule.match(name)) is not None]
    if len(hits) > 1:
        raise ConversionError(f"{name}: matched by {len(hits)} rows of the mapping table")
    return hits[0] if hits else None


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# A row adds only padding (dummy ViT heads: real + 7, e.g. 1 real head -> 8); a target larger than
# this many times its source means args that contradict the tensors (e.g. vocab_size 2**31).
MAX_GROWTH = 8


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
            if out.numel() > MAX_GROWTH * source.numel() + 2**20:  # before any of it is built
                raise ConversionError(
                    f"{where(ckpt, name)}: {name} {tuple(source.shape)} would become {target} "
                    f"{tuple(out.shape)}: a size in the args contradicts the tensors"
                )
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
                disable=None,  # no bar where stderr is not a terminal (CI logs, pipes)
            ) as bar:
                stream_steps(ckpt, steps, writer, check_finite, bar.update)
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


# HF -> Megatron writers: converter/megatron_writers.py


# -- output folders --------------------------------------------------------------------------
#
# The rules every command's output folder follows (README "What the converter refuses"):
# - DST may not be SRC, lie inside SRC or contain it (checked on resolved paths);
# - one run at a time per DST: an fcntl lock on `.NAME.lock` beside DST, held for the whole run;
# - the output is written into `.NAME.partial-PID` and renamed into place at the end; the rename
#   replaces nothing that was not there, unchanged, at the start (and only with --overwrite);
# - --resume continues only in a real folder (not a symlink) that the user owns;
# - an error, SIGTERM or SIGINT removes the partial folder; SIGKILL leaves it (for --resume).


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
    """Temporary siblings `.NAME.partial-PID` of `destination` whose process is gone (killed runs);
    symlinks among them too (resume refuses them, the note names them)."""
    destination = Path(destination)
    if not destination.parent.is_dir():
        return []
    found = []
    for entry in destination.parent.iterdir():
        match = _PARTIAL.match(entry.name)
        if (
            match
            and match["name"] == destination.name
            and (entry.is_dir() or entry.is_symlink())
            and not _pid_alive(int(match["pid"]))
        ):
            found.append(entry)
    return sorted(found)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_location(destination: Path, sources=()) -> None:
    """Refuse a DST that is a source, lies inside one or contains one (an --overwrite would
    replace the checkpoint being read)."""
    target = Path(os.path.realpath(destination))
    for source in sources:
        if source is None:
            continue
        real = Path(os.path.realpath(source))
        if target == real:
            raise ConversionError(f"{destination}: is the source {source}; choose another output folder")
        if _inside(target, real):
            raise ConversionError(
                f"{destination}: lies inside the source {source}; choose another output folder"
            )
        if _inside(real, target):
            raise ConversionError(
                f"{destination}: contains the source {source}; choose another output folder"
            )


def _identity(path: Path):
    """What `path` is now (device, inode, type), without following a symlink; None when absent."""
    try:
        stat = os.lstat(path)
    except FileNotFoundError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_mode & 0o170000)


class _Lock:
    """An exclusive fcntl lock on `.NAME.lock` beside DST, for the whole run (refused, not waited
    for, when another run holds it). The file is removed, still locked, at the end."""

    def __init__(self, destination: Path):
        self.path = destination.parent / f".{destination.name}.lock"
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConversionError(
                    f"{destination}: another run is writing it (it holds {self.path}); "
                    "wait for that run to end or stop it"
                ) from None
            except OSError:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return
            os.close(fd)  # the holder removed the file as we opened it: lock the new one

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)


# What torch.save's C++ file writer says when a write fails (ENOSPC, EFBIG): no errno survives.
_WRITE_FAILED = re.compile(r"iostream error|unexpected pos \d+|PytorchStreamWriter failed|file write failed")


def _write_failure(exc: BaseException) -> str | None:
    """Why a write failed (full disk, file-size limit, I/O error), or None for another error.
    DCP's writer wraps its rank's exception in a CheckpointException; torch.save's C++ writer
    raises a RuntimeError without the errno."""
    if isinstance(exc, CheckpointException) and exc.failures:
        exc = next(iter(exc.failures.values()))[0]
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    if isinstance(exc, RuntimeError) and _WRITE_FAILED.search(str(exc)):
        reason = " ".join(str(exc).split())[:160]
        return f"torch's file writer: {reason} (disk full or a file-size limit?)"
    return None


class _Terminated(BaseException):
    """SIGTERM or SIGINT during a run: unwound like an error (the partial folder removed)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_STOPPING = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def _signals_unwind():
    """SIGTERM (SLURM, `timeout`, `docker stop`) and SIGINT raise _Terminated in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise _Terminated(signum)

    previous = {signum: signal.signal(signum, stop) for signum in _STOPPING}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _remove(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _resumable(partial: Path) -> None:
    if partial.is_symlink():
        raise ConversionError(f"{partial}: is a symlink, not a partial folder this tool left; not resumed")
    owner = partial.lstat().st_uid
    if owner != os.getuid():
        raise ConversionError(f"{partial}: owned by user id {owner}, not by you ({os.getuid()}); not resumed")


def _rename_no_replace(source: Path, target: Path) -> None:
    """rename(2) that fails (FileExistsError) when `target` exists: renameat2(RENAME_NOREPLACE)
    where the kernel and libc have it, else a check just before the rename."""
    libc = _libc()
    if libc is not None:
        result = libc.renameat2(-100, os.fsencode(source), -100, os.fsencode(target), 1)
        if result == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(target))
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.renameat2  # noqa: B018 (glibc >= 2.28)
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def atomic_folder(
    destination: Path, overwrite: bool = False, resume: bool = False, sources=()
) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `destination` only on success, under the
    rules above. On an error, SIGTERM or SIGINT it is removed; killed, it stays (as
    `.NAME.partial-PID`), and `resume` continues in the newest such folder a dead process left
    (removing older ones)."""
    destination = Path(destination)
    check_output_location(destination, sources)
    _refuse_existing(destination, overwrite)
    parent = destination.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        lock = _Lock(destination)
    except OSError as exc:
        blocker = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file" if blocker else exc.strerror
        raise ConversionError(f"{parent}: cannot write there ({reason})") from None
    try:
        with _signals_unwind():
            _refuse_existing(destination, overwrite)  # again: under the lock
            before = _identity(destination)
            temporary = _partial_folder(destination, parent, resume)
            try:
                yield temporary
                _commit(temporary, destination, before, overwrite)
            except (OSError, RuntimeError, CheckpointException) as exc:
                _remove(temporary)
                reason = _write_failure(exc)
                if reason is None:
                    raise
                raise ConversionError(
                    f"{destination}: writing failed: {reason}; partial output removed"
                ) from None
            except _Terminated as exc:
                _remove(temporary)
                name = signal.Signals(exc.signum).name
                raise ConversionError(f"{destination}: stopped by {name}; partial output removed") from None
            except BaseException:
                _remove(temporary)
                raise
    finally:
        lock.release()


def _refuse_existing(destination: Path, overwrite: bool) -> None:
    if overwrite or not (destination.exists() or destination.is_symlink()):
        return
    if not destination.is_dir():
        what = "is a file" if destination.exists() else "is a broken symlink"
        raise ConversionError(f"{destination}: {what} (pass --overwrite to replace it)")
    if any(destination.iterdir()):
        raise ConversionError(f"{destination}: exists and is not empty (pass --overwrite to replace it)")


def _partial_folder(destination: Path, parent: Path, resume: bool) -> Path:
    try:
        temporary = parent / f".{destination.name}.partial-{os.getpid()}"
        leftovers = leftover_partials(destination) if resume else []
        for leftover in leftovers:
            _resumable(leftover)
        if leftovers:
            newest = max(leftovers, key=lambda p: p.lstat().st_mtime_ns)
            if newest != temporary:
                _remove(temporary)
                newest.rename(temporary)
            for older in leftovers:
                if older != newest:
                    shutil.rmtree(older, ignore_errors=True)
        else:
            _remove(temporary)
            temporary.mkdir()
    except OSError as exc:
        raise ConversionError(f"{parent}: cannot write there ({exc.strerror})") from None
    return temporary


def _commit(temporary: Path, destination: Path, before, overwrite: bool) -> None:
    """The final rename, with SIGTERM/SIGINT held back: replaces `destination` only when it is what
    was there at the start (an empty folder, or with --overwrite anything)."""
    parent = destination.parent
    held = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if held:
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOPPING)
    try:
        now = _identity(destination)
        if now != before:
            raise _changed(destination, "appeared" if before is None else "changed")
        replaced = None
        if now is not None and not overwrite:
            try:
                os.rmdir(destination)  # the empty folder it was at the start (fails if no longer empty)
            except OSError:
                raise _changed(destination, "changed") from None
        elif now is not None:
            replaced = parent / f".{destination.name}.replaced-{os.getpid()}"
            _remove(replaced)
            destination.rename(replaced)  # out of the way first: a kill now leaves no half-removed folder
            if _identity(replaced) != before:  # swapped between the check and the rename
                _rename_no_replace(replaced, destination)
                raise _changed(destination, "changed")
        try:
            _rename_no_replace(temporary, destination)
        except FileExistsError:
            kept = f"; the previous folder is kept as {replaced}" if replaced is not None else ""
            raise _changed(destination, "appeared", kept) from None
        if replaced is not None:
            _remove(replaced)
    finally:
        if held:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPPING)


def _changed(destination: Path, what: str, kept: str = "") -> ConversionError:
    return ConversionError(
        f"{destination}: {what} while this run was writing; not replaced{kept} (partial output removed)"
    )


def open_megatron(path: Path, *, iteration: int | None = None, trust_pickle: bool = False):
    """formats/reader.open_checkpoint with the pipelined layer stacks of every known family (for
    callers that open a checkpoint before its family is known)."""
    return open_checkpoint(path, iteration, trust_pickle, pipelined_stacks=PIPELINED_STACKS)
