"""The benchmark's table, its check against issue 17's target (wall <= 1.1 x the fastest plain
copy), the full-model projection, and the section appended to docs/PERFORMANCE.md."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

GIB = 2**30
TIME_TARGET = 1.1  # wall <= 1.1 x the raw I/O floor (the best of cat / dd / a Python loop)
FULL_LLM_LAYERS, FULL_VIT_LAYERS = 80, 45


@dataclass
class Result:
    """One (format, depth, workers) conversion, with the floor of its source measured beside it."""

    direction: str  # "megatron-to-hf" or "hf-to-megatron"
    fmt: str
    depth: int
    workers: int
    source_bytes: int
    output_bytes: int
    largest_tensor: int
    startup_s: float = 0.0  # Python + imports, inside every wall time (measure.startup_seconds)
    floor_s: list[float] = field(default_factory=list)  # one per repeat
    wall_s: list[float] = field(default_factory=list)
    process_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    peak_tree_rss: list[int] = field(default_factory=list)
    peak_single_rss: list[int] = field(default_factory=list)
    profile: list[str] = field(default_factory=list)  # with --profile: the top functions by own time

    @property
    def floor(self) -> float:
        return statistics.median(self.floor_s)

    @property
    def wall(self) -> float:
        return statistics.median(self.wall_s)

    @property
    def ratio(self) -> float:
        return self.wall / self.floor

    @property
    def net_ratio(self) -> float:
        """Wall time less the fixed start-up, over the floor: the per-byte ratio a full model sees."""
        return (self.wall - self.startup_s) / self.floor

    @property
    def peak(self) -> int:
        return max(self.peak_tree_rss)

    @property
    def memory_bound(self) -> int:
        return 2 * self.largest_tensor + GIB

    def to_json(self) -> dict:
        return {
            **asdict(self),
            "floor": self.floor,
            "wall": self.wall,
            "ratio": self.ratio,
            "net_ratio": self.net_ratio,
            "peak": self.peak,
        }


def table(results: list[Result]) -> str:
    head = (
        "| direction | format | K | workers | read GB | written GB | floor s | wall s | wall/floor "
        "| (wall - start-up)/floor | GB/s | CPU s | peak RSS GiB (tree) | peak / largest tensor | targets |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        time_ok = r.ratio <= TIME_TARGET
        memory_ok = r.peak <= r.memory_bound
        net = "ok" if r.net_ratio <= TIME_TARGET else "MISSED"
        verdict = (
            f"time {'ok' if time_ok else 'MISSED'} (net of start-up {net}), "
            f"memory {'ok' if memory_ok else 'MISSED'}"
        )
        rows.append(
            f"| {r.direction} | {r.fmt} | {r.depth} | {r.workers} | {r.source_bytes / 1e9:.2f} "
            f"| {r.output_bytes / 1e9:.2f} | {_spread(r.floor_s)} | {_spread(r.wall_s)} "
            f"| {r.ratio:.2f} | {r.net_ratio:.2f} "
            f"| {r.output_bytes / 1e9 / r.wall:.3f} | {statistics.median(r.cpu_s):.0f} | {r.peak / GIB:.2f} "
            f"| {r.peak / r.largest_tensor:.2f} | {verdict} |"
        )
    return head + "\n".join(rows) + "\n"


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


FLAT = 2**27  # 128 MiB: a deeper slice's peak at most this much higher counts as the same (noise)


@dataclass
class Startup:
    first_s: float  # the first start: compiles the bytecode cache
    warm_s: float  # median of the next ones

    def describe(self) -> str:
        return f"{self.warm_s:.1f} s (the first start, compiling the bytecode cache: {self.first_s:.1f} s)"


def projection(results: list[Result], full_source_bytes: int, full_output_bytes: int) -> str:
    """Per (direction, format, workers) measured at two depths or more: the full model's time at
    the deepest slice's rate net of the start-up, which is counted once (and, beside it, at the
    per-byte slope between the depths) against the floor at its rate, and its peak memory (flat
    when the depths agree within FLAT, else extended by the per-layer slope to 80 LLM layers)."""
    lines = []
    for direction, fmt, workers in sorted({(r.direction, r.fmt, r.workers) for r in results}):
        runs = sorted(
            (r for r in results if (r.direction, r.fmt, r.workers) == (direction, fmt, workers)),
            key=lambda r: r.depth,
        )
        if len(runs) < 2 or runs[0].depth == runs[-1].depth:
            continue
        small, large = runs[0], runs[-1]
        full_out = full_output_bytes if direction == "megatron-to-hf" else full_source_bytes
        full_in = full_source_bytes if direction == "megatron-to-hf" else full_output_bytes
        # The start-up is paid once; the rest scales with the bytes.
        wall = large.startup_s + (large.wall - large.startup_s) * full_out / large.output_bytes
        floor = large.floor * full_in / large.source_bytes
        slope = (large.wall - small.wall) / (large.output_bytes - small.output_bytes)
        by_slope = large.wall + slope * (full_out - large.output_bytes)
        per_layer = (large.peak - small.peak) / (large.depth - small.depth)
        if large.peak - small.peak <= FLAT:  # not growing with depth (a smaller peak deeper is noise)
            peak, shape = max(large.peak, small.peak), "flat"
        else:
            peak, shape = large.peak + per_layer * (FULL_LLM_LAYERS - large.depth), "growing"
        fits = "fits" if peak < 24 * GIB else "does NOT fit"
        lines.append(
            f"- {direction}, {fmt}, {workers} worker(s): peak {small.peak / GIB:.2f} GiB at K={small.depth}, "
            f"{large.peak / GIB:.2f} GiB at K={large.depth} ({shape}: {per_layer / GIB:+.3f} GiB per layer) "
            f"-> {peak / GIB:.2f} GiB for the full model ({fits} 24 GiB). Time at the K={large.depth} rate "
            f"({large.output_bytes / 1e9 / large.wall:.3f} GB/s): {wall / 60:.1f} min for "
            f"{full_out / 1e9:.1f} GB against a floor of {floor / 60:.1f} min (ratio {wall / floor:.2f}); "
            f"the slope between the depths ({slope * 1e9:.2f} s/GB) gives {by_slope / 60:.1f} min."
        )
    return "\n".join(lines) + ("\n" if lines else "")


def top_functions(stats_path, count: int = 8) -> list[str]:
    """The functions that took the most time of their own in a cProfile dump, as 'seconds name'."""
    import pstats

    stats = pstats.Stats(str(stats_path)).stats
    ranked = sorted(stats.items(), key=lambda item: -item[1][2])[:count]
    return [
        f"{own:.1f} s {name if file == '~' else f'{Path(file).name}:{line}({name})'}"
        for (file, line, name), (_, _, own, _, _) in ranked
    ]


def profiles(results: list[Result]) -> str:
    lines = [
        f"- {r.direction} {r.fmt} K={r.depth} (cProfile, own time): " + "; ".join(r.profile)
        for r in results
        if r.profile
    ]
    return ("\nWhere the time went:\n" + "\n".join(lines) + "\n") if lines else ""


def machine() -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPUs ({cpu}), {psutil.virtual_memory().total / GIB:.0f} GiB RAM"


def disk(path) -> str:
    usage = shutil.disk_usage(path)
    device = ""
    try:
        found = subprocess.run(["df", "--output=source,fstype", str(path)], capture_output=True, text=True)
        device = " ".join(found.stdout.split()[2:4])
    except OSError:
        pass
    return f"{device} at {path}, {usage.total / 1e9:.0f} GB ({usage.free / 1e9:.0f} GB free at start)"


def section(title: str, machine_line: str, disk_line: str, command: str, body: str) -> str:
    return f"\n## {title}\n\nMachine: {machine_line}; disk: {disk_line}.\nCommand: `{command}`\n\n{body}"


def largest_hint(largest: int) -> str:
    return (
        f"largest tensor {largest / 1e9:.2f} GB ({largest / GIB:.2f} GiB); memory bound 2x + 1 GiB = "
        f"{(2 * largest + GIB) / GIB:.2f} GiB"
    )
