"""Measurements for the conversion benchmark: page-cache state, the raw I/O floor, and a command's
wall time and peak resident memory summed over its whole process tree.

Cache state: before every timed run (floor or conversion) the source files are flushed and dropped
from the page cache with posix_fadvise(DONTNEED) (per file: no root needed, nothing else evicted),
so each run reads from the disk. Writes count until they are on the disk: after the run, the
output files are fsynced and that time is part of the wall time. Both the floor and the
conversion are timed this way.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import psutil
except ImportError as exc:  # pragma: no cover - psutil comes with nvlm-port[test] and [megatron]
    raise SystemExit("bench_convert.py needs psutil (pip install psutil)") from exc

COPY_BUFFER = 16 << 20


def files_under(path: Path) -> list[Path]:
    path = Path(path)
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def total_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in files_under(path))


def drop_from_page_cache(path: Path) -> None:
    """Flush the files under `path` to the disk and drop them from the page cache."""
    for file in files_under(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sync_files(path: Path) -> None:
    """fsync every file under `path` (and the folders, so new names are durable too)."""
    for file in files_under(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for folder in {Path(path), *(f.parent for f in files_under(path))}:
        if folder.is_dir():
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def plain_copy(source: Path, destination: Path) -> int:
    """Copy every file under `source` into `destination` with read/write of 16 MiB (no sendfile,
    no copy_file_range: those may share blocks instead of writing them). Returns bytes copied."""
    source, destination = Path(source), Path(destination)
    buffer = bytearray(COPY_BUFFER)
    view = memoryview(buffer)
    copied = 0
    for file in files_under(source):
        target = destination / file.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(file, "rb", buffering=0) as reader, open(target, "wb", buffering=0) as writer:
            while count := reader.readinto(buffer):
                done = 0
                while done < count:
                    done += writer.write(view[done:count])
                copied += count
    return copied


@dataclass
class Run:
    wall_s: float  # process exit + fsync of its outputs
    process_s: float  # process exit only
    peak_tree_rss: int  # bytes: highest sum of RSS over the process and its descendants, polled
    peak_single_rss: int  # bytes: highest VmHWM (kernel high-water mark) of any one process
    processes: int  # distinct processes seen in the tree
    returncode: int
    output_tail: str


class TreeMemoryPoller:
    """Polls a process tree every `interval` seconds: the sum of RSS of all its live processes,
    and each process's own peak (VmHWM, exact, read while it lives)."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_tree = 0
        self.peak_single: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            tree = 0
            for process in processes:
                try:
                    tree += process.memory_info().rss
                    self.peak_single[process.pid] = max(
                        self.peak_single.get(process.pid, 0), _hwm(process.pid)
                    )
                except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
                    continue
            self.peak_tree = max(self.peak_tree, tree)
            self._stop.wait(self.interval)


def _hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_measured(command: list[str], outputs: Path, env: dict | None = None, cwd: Path | None = None) -> Run:
    """Run `command`, polling its tree's memory; then fsync `outputs` (counted in wall_s)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    with TreeMemoryPoller(process.pid) as poller:
        output = process.communicate()[0].decode(errors="replace")
    process_s = time.perf_counter() - start
    if process.returncode == 0 and Path(outputs).exists():
        sync_files(outputs)
    wall_s = time.perf_counter() - start
    return Run(
        wall_s=wall_s,
        process_s=process_s,
        peak_tree_rss=poller.peak_tree,
        peak_single_rss=max(poller.peak_single.values(), default=0),
        processes=len(poller.peak_single),
        returncode=process.returncode,
        output_tail=output[-2000:],
    )


# What a conversion imports before it reads a byte: the CLI, the engine, both readers, the workers.
STARTUP_IMPORTS = (
    "import converter.cli, converter.engine, converter.workers, converter.formats.legacy, "
    "converter.formats.torch_dist"
)


def bytecode_cached_env(env: dict, cache: Path) -> dict:
    """`env` with Python's bytecode written to and read from `cache`: an installed Python normally
    has its modules compiled, but a read-only or PYTHONDONTWRITEBYTECODE install compiles every
    imported module again in every process (seconds for torch), which is not conversion time."""
    env = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPYCACHEPREFIX": str(cache)}


def startup_seconds(python: str, env: dict, cwd: Path, repeats: int = 3) -> float:
    """Median wall time of a process that starts Python, imports what a conversion imports, and
    exits: the fixed cost inside every conversion's wall time (a plain copy has none)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([python, "-c", STARTUP_IMPORTS], env=env, cwd=cwd, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_floor(source: Path, destination: Path) -> tuple[float, int]:
    """The raw I/O floor: a plain copy of every source byte on the same disk, cold source cache,
    fsynced. Returns (seconds, bytes)."""
    drop_from_page_cache(source)
    start = time.perf_counter()
    copied = plain_copy(source, destination)
    sync_files(destination)
    return time.perf_counter() - start, copied
