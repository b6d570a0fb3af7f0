"""Measurements for the conversion benchmark: page-cache state, the raw I/O floor, and a command's
wall time and peak resident memory summed over its whole process tree.

The floor is the fastest plain copy of the same bytes that can be measured on the disk: `cat`,
`dd` with 64 MiB blocks and a Python read/write loop of 16 MiB blocks each copy every source
file, cold and fsynced like a conversion, and the fastest of the three is the floor (on a small
shared machine a Python loop alone can be half as fast as `cat`, which flatters a converter).

Cache state: before every timed run (floor or conversion) the source files are flushed and dropped
from the page cache with posix_fadvise(DONTNEED) (per file: no root needed, nothing else evicted),
so each run reads from the disk. Writes count until they are on the disk: after the run, the
output files are fsynced and that time is part of the wall time. Both the floor and the
conversion are timed this way.
"""

from __future__ import annotations

import os
import shutil
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


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other users of a shared machine show here)."""
    try:
        with open("/proc/loadavg") as loadavg:
            return " ".join(loadavg.read().split()[:3])
    except OSError:
        return "?"


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


def tool_copy(tool: str, source: Path, destination: Path) -> int:
    """Copy every file under `source` into `destination` with `cat` or `dd bs=64M`, one process
    per file (their start is part of the time, as a conversion's is). Returns bytes copied."""
    source, destination = Path(source), Path(destination)
    copied = 0
    for file in files_under(source):
        target = destination / file.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        if tool == "cat":
            with open(target, "wb") as out:
                subprocess.run(["cat", str(file)], stdout=out, check=True)
        else:
            subprocess.run(["dd", f"if={file}", f"of={target}", "bs=64M", "status=none"], check=True)
        copied += file.stat().st_size
    return copied


FLOOR_METHODS = ("cat", "dd", "loop")


@dataclass
class Floor:
    """One measurement of the floor: each method's seconds (cold source, fsynced output)."""

    seconds: dict[str, float]
    copied: int
    load_average: str  # before the first method

    @property
    def best(self) -> float:
        return min(self.seconds.values())

    @property
    def best_method(self) -> str:
        return min(self.seconds, key=self.seconds.get)

    def describe(self) -> str:
        each = ", ".join(f"{name} {s:.1f}" for name, s in self.seconds.items())
        return f"floor {self.best:.1f} s ({each}; load {self.load_average})"


def timed_copy(method: str, source: Path, destination: Path) -> tuple[float, int]:
    """One plain copy of every source byte on the same disk, cold source cache, fsynced; the copy
    is deleted afterwards. Returns (seconds, bytes)."""
    drop_from_page_cache(source)
    start = time.perf_counter()
    if method == "loop":
        copied = plain_copy(source, destination)
    else:
        copied = tool_copy(method, source, destination)
    sync_files(destination)
    seconds = time.perf_counter() - start
    if Path(destination).is_dir():
        shutil.rmtree(destination)
    else:
        Path(destination).unlink()
    return seconds, copied


def timed_floor(source: Path, destination: Path, methods=FLOOR_METHODS) -> Floor:
    """The raw I/O floor: every method of `methods` once (see the module docstring)."""
    load = load_average()
    seconds, copied = {}, 0
    for method in methods:
        seconds[method], copied = timed_copy(method, source, destination)
    return Floor(seconds, copied, load)
