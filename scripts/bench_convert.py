"""Conversion at disk speed in flat memory (issue 8): measure it on full-width NVLM-D-72B slices.

    python scripts/bench_convert.py                               # K=2 and K=6, legacy and torch_dist
    python scripts/bench_convert.py --depths 1,2 --workers 1,2 --append-doc --json out.json

For each depth K (K LLM and K ViT layers, real widths and vocab, TP=8, bfloat16) and each format,
it writes a Megatron checkpoint of seeded random (incompressible) data through nvlm-port's own
HF -> Megatron writer (scripts/conversion_bench/synthetic.py), then, per repeat:
- the raw I/O floor: the fastest plain copy of every checkpoint byte on the same disk, of `cat`,
  `dd bs=64M` and a Python read/write loop (each timed; scripts/conversion_bench/measure.py);
- `convert-checkpoint megatron-to-hf` as a subprocess, once per `--workers` value;
- with --hf-to-megatron, `convert-checkpoint hf-to-megatron` of that output back to the format.
Every timed run starts with the source dropped from the page cache and ends when its output is
fsynced (scripts/conversion_bench/measure.py); peak memory is the highest sum of RSS over the
command's process tree. Outputs are deleted after each measurement, the checkpoint after its
depth and format; the disk must hold one checkpoint and one output at a time (checked first).
The load average is recorded beside every figure: on a shared machine it is the noise.
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from conversion_bench import measure, report, synthetic  # noqa: E402

GB = 10**9


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise click.BadParameter(f"{text!r}: give positive integers")
    return values


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _measured(command: list[str], output: Path, job, sources: list[Path]):
    for source in sources:
        measure.drop_from_page_cache(source)
    before = _children_cpu()
    # Run in the tree under test: `python -m` puts the working folder first on sys.path.
    run = measure.run_measured(command, output, job.env, cwd=job.code)
    if run.returncode != 0:
        raise click.ClickException(f"{shlex.join(command)} failed ({run.returncode}):\n{run.output_tail}")
    return run, _children_cpu() - before


def _disk_needed(size: synthetic.Sizes, reverse: bool) -> int:
    """A checkpoint, and one output (HF folder or floor copy) at a time; a converted-back checkpoint
    beside the HF folder with --hf-to-megatron. 2% and 1 GB for file overheads."""
    copies = size.megatron_bytes + max(size.megatron_bytes, size.hf_bytes)
    if reverse:
        copies += size.megatron_bytes
    return int(copies * 1.02) + GB


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--depths", default="2,6", show_default=True, help="Comma-separated K values (layers per tower)."
)
@click.option("--formats", default="torch,torch_dist", show_default=True, help="torch (legacy), torch_dist.")
@click.option(
    "--workers", "workers_text", default="1", show_default=True, help="Comma-separated, e.g. 1,2,4,8."
)
@click.option("--tp", type=int, default=8, show_default=True)
@click.option(
    "--max-shard-size",
    default="1GB",
    show_default=True,
    help="Output shard size. Smaller than the converter's 4GB default so that a slice of a few "
    "layers has about as many shards per worker as the full model has at 4GB.",
)
@click.option(
    "--repeats",
    type=int,
    default=1,
    show_default=True,
    help="Times to measure the floor and each conversion (medians reported).",
)
@click.option("--hf-to-megatron", "reverse", is_flag=True, help="Also time converting the output back.")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where checkpoints and outputs go (default: the system temporary folder).",
)
@click.option(
    "--code",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=REPO,
    show_default=True,
    help="nvlm-port tree whose convert-checkpoint is timed (to compare two versions).",
)
@click.option(
    "--max-minutes",
    type=float,
    help="Start no new build or conversion after this long (what was measured is kept).",
)
@click.option(
    "--profile",
    is_flag=True,
    help="Run the 1-worker conversions under cProfile and list where their time went (adds a little).",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the raw results here.")
@click.option("--append-doc", is_flag=True, help="Append the table to docs/PERFORMANCE.md.")
@click.option("--keep-outputs", is_flag=True, help="Leave checkpoints and outputs in the workdir.")
def main(
    depths,
    formats,
    workers_text,
    tp,
    max_shard_size,
    repeats,
    reverse,
    workdir,
    code,
    max_minutes,
    profile,
    json_path,
    append_doc,
    keep_outputs,
):
    """Time megatron-to-hf (and optionally hf-to-megatron) against the raw I/O floor on full-width
    NVLM-D-72B slices, with peak memory; print a table and the projection to the full model."""
    started = time.monotonic()
    depth_list, workers = _ints(depths), _ints(workers_text)
    format_list = [f.strip() for f in formats.split(",") if f.strip()]
    if not set(format_list) <= {"torch", "torch_dist"}:
        raise click.BadParameter(f"{formats!r}: formats are torch and torch_dist")
    base = Path(workdir) if workdir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_convert-", dir=base))
    slice_sizes = {k: synthetic.sizes(synthetic.slice_config(k), tp) for k in depth_list}
    needed = max(_disk_needed(slice_sizes[k], reverse) for k in depth_list)
    free = shutil.disk_usage(work).free
    if free < needed:
        shutil.rmtree(work, ignore_errors=True)
        deepest = max(depth_list)
        raise click.ClickException(
            f"{base}: {free / GB:.1f} GB free, but depth K={deepest} needs {needed / GB:.1f} GB at a time "
            f"(a {slice_sizes[deepest].megatron_bytes / GB:.1f} GB checkpoint and one output"
            f"{' and the converted-back checkpoint' if reverse else ''}); pass smaller --depths or "
            "another --workdir"
        )
    code = Path(code).resolve()
    env = measure.bytecode_cached_env(dict(os.environ, PYTHONPATH=str(code)), work / "bytecode")
    python = sys.executable
    disk_line, machine_line = report.disk(work), report.machine()
    click.echo(f"{machine_line}; disk {disk_line}; work folder {work}", err=True)
    # The first start compiles the bytecode into the cache; the next ones are what a conversion pays.
    startup = report.Startup(
        first_s=measure.startup_seconds(python, env, code, repeats=1),
        warm_s=measure.startup_seconds(python, env, code),
    )
    click.echo(f"start-up: {startup.describe()}", err=True)
    results: list[report.Result] = []
    floors: list[dict] = []  # every floor measurement, each method's time
    deadline = Deadline(started, max_minutes)
    try:
        # Format by format, so that a run cut short by --max-minutes still has both depths of the first.
        for fmt in format_list:
            for depth in depth_list:
                if deadline.passed(f"K={depth} {fmt}"):
                    continue
                job = Job(
                    work,
                    depth,
                    fmt,
                    tp,
                    workers,
                    max_shard_size,
                    repeats,
                    reverse,
                    python,
                    env,
                    code,
                    profile,
                    startup.warm_s,
                    floors,
                )
                results += _bench_one(job, slice_sizes[depth], keep_outputs, deadline)
    finally:
        if not keep_outputs:
            shutil.rmtree(work, ignore_errors=True)
    full = synthetic.sizes(synthetic.full_config(), tp)
    body = (
        report.table(results)
        + "\n"
        + f"Start-up (Python, torch and the converter's imports, in every wall time): {startup.describe()}.\n"
        + f"Memory target per row: {report.largest_hint(full.largest)}.\n\n"
        + report.projection(results, full.megatron_bytes, full.hf_bytes)
        + report.profiles(results)
        + _floor_table(floors)
    )
    click.echo("\n" + body)
    command = "python scripts/bench_convert.py " + shlex.join(sys.argv[1:])
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    if json_path:
        payload = {
            "date": stamp,
            "machine": machine_line,
            "disk": disk_line,
            "command": command,
            "startup": {"first_s": startup.first_s, "warm_s": startup.warm_s},
            "results": [r.to_json() for r in results],
            "floors": floors,
        }
        Path(json_path).write_text(json.dumps(payload, indent=1) + "\n")
    if append_doc:
        doc = REPO / "docs" / "PERFORMANCE.md"
        with open(doc, "a") as out:
            out.write(report.section(f"bench_convert.py, {stamp}", machine_line, disk_line, command, body))
        click.echo(f"appended to {doc}", err=True)
    click.echo(f"total {time.monotonic() - started:.0f} s", err=True)


class Deadline:
    """--max-minutes: no new build or conversion starts after it (those measured are kept)."""

    def __init__(self, started: float, minutes: float | None):
        self.started, self.minutes = started, minutes

    def passed(self, what: str) -> bool:
        if self.minutes is None or time.monotonic() - self.started < self.minutes * 60:
            return False
        click.echo(f"--max-minutes {self.minutes} reached: {what} skipped", err=True)
        return True


@dataclass
class Job:
    work: Path
    depth: int
    fmt: str
    tp: int
    workers: list[int]
    max_shard_size: str
    repeats: int
    reverse: bool
    python: str
    env: dict
    code: Path  # the nvlm-port tree whose converter runs
    profile: bool
    startup_s: float  # measure.startup_seconds, part of every conversion's wall time
    floors: list  # each floor measured (appended): what, methods' seconds, load average


def _bench_one(job: Job, size, keep_outputs: bool, deadline: Deadline) -> list[report.Result]:
    depth, fmt = job.depth, job.fmt
    checkpoint, output, floor_copy = job.work / f"k{depth}-{fmt}", job.work / "hf", job.work / "floor"
    start = time.monotonic()
    synthetic.write_checkpoint(checkpoint, synthetic.slice_config(depth), fmt, job.tp)
    measure.sync_files(checkpoint)
    source_bytes = measure.total_bytes(checkpoint)
    click.echo(
        f"K={depth} {fmt}: wrote {source_bytes / GB:.2f} GB in {time.monotonic() - start:.0f} s", err=True
    )
    forward = {
        w: report.Result("megatron-to-hf", fmt, depth, w, source_bytes, 0, size.largest, job.startup_s)
        for w in job.workers
    }
    backward = report.Result("hf-to-megatron", fmt, depth, 1, 0, 0, size.largest, job.startup_s)
    for _ in range(job.repeats):
        if deadline.passed(f"a repeat of K={depth} {fmt}"):
            break
        seconds = _floor(job, f"K={depth} {fmt} megatron-to-hf", checkpoint, floor_copy)
        for w in job.workers:
            if deadline.passed(f"K={depth} {fmt} workers={w}"):
                break
            stats = job.work / f"k{depth}-{fmt}.pstats"
            profiler = ["-m", "cProfile", "-o", str(stats)] if job.profile and w == 1 else []
            command = [
                job.python,
                *profiler,
                "-m",
                "converter.cli",
                "megatron-to-hf",
                str(checkpoint),
                str(output),
            ]
            command += ["--no-tokenizer", "--overwrite", "--max-shard-size", job.max_shard_size]
            command += ["--workers", str(w)] if w > 1 else []
            load = measure.load_average()
            run, cpu = _measured(command, output, job, [checkpoint])
            forward[w].output_bytes = measure.total_bytes(output)
            _record(forward[w], seconds, run, cpu)
            if profiler:
                forward[w].profile = report.top_functions(stats)
            click.echo(
                f"K={depth} {fmt} workers={w}: {run.wall_s:.1f} s (floor {seconds:.1f} s), "
                f"peak {run.peak_tree_rss / 2**30:.2f} GiB, load {load}",
                err=True,
            )
            if job.reverse and w == job.workers[0]:
                _time_back(job, output, backward, keep_outputs)
            if not keep_outputs:
                shutil.rmtree(output)
    if not keep_outputs:
        shutil.rmtree(checkpoint)
    measured = [r for r in [*forward.values(), backward] if r.wall_s]
    return measured


def _time_back(job: Job, output: Path, result: report.Result, keep_outputs: bool) -> None:
    """hf-to-megatron of the converted folder; its floor is a plain copy of that folder."""
    back = job.work / "back"
    seconds = _floor(job, f"K={job.depth} {job.fmt} hf-to-megatron", output, back)
    command = [job.python, "-m", "converter.cli", "hf-to-megatron", str(output), str(back)]
    command += ["--tp", str(job.tp), "--format", job.fmt, "--overwrite"]
    load = measure.load_average()
    run, cpu = _measured(command, back, job, [output])
    result.source_bytes = measure.total_bytes(output)
    result.output_bytes = measure.total_bytes(back)
    _record(result, seconds, run, cpu)
    click.echo(
        f"  hf-to-megatron {job.fmt}: {run.wall_s:.1f} s (floor {seconds:.1f} s), "
        f"peak {run.peak_tree_rss / 2**30:.2f} GiB, load {load}",
        err=True,
    )
    if not keep_outputs:
        shutil.rmtree(back)


def _floor(job: Job, what: str, source: Path, copy: Path) -> float:
    """The best plain copy of `source` (cat, dd, Python loop), kept in job.floors; its seconds."""
    floor = measure.timed_floor(source, copy)
    job.floors.append({"what": what, "seconds": floor.seconds, "load_average": floor.load_average})
    click.echo(f"{what}: {floor.describe()}", err=True)
    return floor.best


def _floor_table(floors: list[dict]) -> str:
    """Each floor measurement: every method's time (the floor is the best of them) and the load."""
    if not floors:
        return ""
    methods = list(measure.FLOOR_METHODS)
    head = "| floor of | " + " s | ".join(methods) + " s | best | load average (1, 5, 15 min) |\n"
    head += "|---" * (len(methods) + 3) + "|\n"
    rows = [
        f"| {f['what']} | "
        + " | ".join(f"{f['seconds'][m]:.1f}" for m in methods)
        + f" | {min(f['seconds'], key=f['seconds'].get)} | {f['load_average']} |"
        for f in floors
    ]
    return "\nFloors (plain copies, cold source, fsynced):\n\n" + head + "\n".join(rows) + "\n"


def _record(result: report.Result, floor_s: float, run, cpu: float) -> None:
    result.floor_s.append(floor_s)
    result.wall_s.append(run.wall_s)
    result.process_s.append(run.process_s)
    result.cpu_s.append(cpu)
    result.peak_tree_rss.append(run.peak_tree_rss)
    result.peak_single_rss.append(run.peak_single_rss)


if __name__ == "__main__":
    main()
