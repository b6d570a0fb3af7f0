"""The benchmark's table, its check against issue 8's targets, the full-model projection, and the
section appended to docs/PERFORMANCE.md."""

from __future__ import annotations

import math
import os
import platform
import shutil
import statistics
import subprocess
from dataclasses import asdict, dataclass, field

GIB = 2**30
TIME_TARGET = 1.25  # wall <= 1.25 x the raw I/O floor
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
    floor_s: list[float] = field(default_factory=list)  # one per repeat
    wall_s: list[float] = field(default_factory=list)
    process_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    peak_tree_rss: list[int] = field(default_factory=list)
    peak_single_rss: list[int] = field(default_factory=list)

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
            "peak": self.peak,
        }


def table(results: list[Result]) -> str:
    head = (
        "| direction | format | K | workers | read GB | written GB | floor s | wall s | wall/floor "
        "| GB/s | CPU s | peak RSS GiB (tree) | peak / largest tensor | targets |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        time_ok = r.ratio <= TIME_TARGET
        memory_ok = r.peak <= r.memory_bound
        verdict = f"time {'ok' if time_ok else 'MISSED'}, memory {'ok' if memory_ok else 'MISSED'}"
        rows.append(
            f"| {r.direction} | {r.fmt} | {r.depth} | {r.workers} | {r.source_bytes / 1e9:.2f} "
            f"| {r.output_bytes / 1e9:.2f} | {_spread(r.floor_s)} | {_spread(r.wall_s)} | {r.ratio:.2f} "
            f"| {r.output_bytes / 1e9 / r.wall:.3f} | {statistics.median(r.cpu_s):.0f} | {r.peak / GIB:.2f} "
            f"| {r.peak / r.largest_tensor:.2f} | {verdict} |"
        )
    return head + "\n".join(rows) + "\n"


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def projection(results: list[Result], full_source_bytes: int, full_output_bytes: int) -> str:
    """Per (direction, format, workers) with two depths: wall time from the per-byte slope between
    them, and peak memory from its per-layer slope, extended to the full model."""
    lines = []
    keys = sorted({(r.direction, r.fmt, r.workers) for r in results})
    for direction, fmt, workers in keys:
        runs = sorted(
            (r for r in results if (r.direction, r.fmt, r.workers) == (direction, fmt, workers)),
            key=lambda r: r.depth,
        )
        if len(runs) < 2 or runs[0].depth == runs[-1].depth:
            continue
        small, large = runs[0], runs[-1]
        per_byte = (large.wall - small.wall) / (large.output_bytes - small.output_bytes)
        floor_per_byte = (large.floor - small.floor) / (large.source_bytes - small.source_bytes)
        wall = large.wall + per_byte * (full_output_bytes - large.output_bytes)
        floor = large.floor + floor_per_byte * (full_source_bytes - large.source_bytes)
        per_layer = (large.peak - small.peak) / (large.depth - small.depth)
        peak = large.peak + max(per_layer, 0.0) * (FULL_LLM_LAYERS - large.depth)
        fits = "fits" if peak < 24 * GIB else "does NOT fit"
        lines.append(
            f"- {direction}, {fmt}, {workers} worker(s): from K={small.depth} to K={large.depth}, "
            f"{per_byte * 1e9:.2f} s more per GB written and {per_layer / GIB:+.3f} GiB of peak memory "
            f"per layer. Full model ({full_output_bytes / 1e9:.1f} GB written, "
            f"{full_source_bytes / 1e9:.1f} GB read): {wall / 60:.1f} min against a floor of "
            f"{floor / 60:.1f} min (ratio {wall / floor:.2f}), {peak / GIB:.2f} GiB peak ({fits} 24 GiB)"
        )
    return "\n".join(lines) + ("\n" if lines else "")


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


def full_model_bytes(config) -> int:
    from converter.families import NVLMD

    return sum(math.prod(shape) * 2 for shape in NVLMD.expected(config).values())
