"""`megatron-to-hf --workers N`: the output shards split among N processes.

The shard layout is fixed by the plan before any data moves (formats/safetensors_stream.py), so a
writer can write any subset of the shards (`ShardedWriter(only=...)`) and each shard's bytes do not
depend on who writes it. Each worker process opens the checkpoint itself, writes whole shards by
streaming their tensors exactly as a single process does (streaming.stream_steps: one tensor and
its TP shards in memory at a time), and records each finished shard. The parent shows one progress
bar; the index (and the manifest, by the caller) is written once, after every worker has finished.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .errors import ConversionError
from .formats.reader import open_checkpoint
from .formats.safetensors_stream import ShardedWriter
from .streaming import stream_steps


def partition(sizes: dict[int, int], workers: int) -> list[list[int]]:
    """Shard indices split into at most `workers` groups of about equal bytes (largest shard to
    the least loaded group, then each group in file order)."""
    groups: list[list[int]] = [[] for _ in range(min(workers, len(sizes)))]
    loads = [0] * len(groups)
    for index in sorted(sizes, key=lambda i: (-sizes[i], i)):
        lightest = loads.index(min(loads))
        groups[lightest].append(index)
        loads[lightest] += sizes[index]
    return [sorted(group) for group in groups if group]


@dataclass
class WorkerJob:
    opened_with: dict  # open_checkpoint's arguments for the same checkpoint
    steps: list  # the whole plan (every worker lays out every shard the same way)
    folder: str
    max_shard_size: int
    check_finite: bool
    fingerprint: str
    shards: list[int]
    threads: int  # torch intra-op threads of this worker (the CPUs shared among the workers)


def write_in_workers(
    ckpt,
    steps,
    folder: Path,
    layout,
    pending: set[int],
    max_shard_size,
    check_finite,
    fingerprint,
    workers: int,
) -> None:
    """Write the `pending` shards of `layout` with `workers` processes; raise the first failure."""
    sizes = {index: layout.file_size(index) for index in pending}
    groups = partition(sizes, workers)
    context = multiprocessing.get_context("spawn")  # no fork of a process holding threads and mappings
    events = context.Queue()
    processes = []
    for group in groups:
        threads = max(1, (os.cpu_count() or 1) // len(groups))
        job = WorkerJob(
            ckpt.opened_with, steps, str(folder), max_shard_size, check_finite, fingerprint, group, threads
        )
        processes.append(
            context.Process(target=_work, args=(job, events), name="nvlm-port-worker", daemon=True)
        )
    total = sum(t.nbytes for index in pending for t in layout.shards[index])
    try:
        for process in processes:
            process.start()
        _follow(processes, events, total, len(groups))
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            if process.pid is not None:
                process.join()


def _follow(processes, events, total: int, count: int) -> None:
    """Show progress until every worker reports done; raise on a worker's error or death."""
    finished = 0
    desc = f"tensors -> safetensors ({count} workers)"
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False, disable=None) as bar:
        while finished < count:
            try:
                kind, value = events.get(timeout=0.5)
            except queue.Empty:
                for process in processes:
                    if process.exitcode not in (None, 0):
                        raise ConversionError(
                            f"a worker process died (exit code {process.exitcode}): out of memory?"
                        ) from None
                continue
            if kind == "bytes":
                bar.update(value)
            elif kind == "done":
                finished += 1
            else:
                raise ConversionError(value)


def _work(job: WorkerJob, events) -> None:
    """One worker: its shards, streamed; progress, completion or the error message to the parent."""
    import torch

    torch.set_num_threads(job.threads)  # N workers x all CPUs each would oversubscribe the machine
    try:
        opened = job.opened_with
        ckpt = open_checkpoint(
            Path(opened["path"]),
            opened["iteration"],
            opened["trust_pickle"],
            pipelined_stacks=opened["pipelined_stacks"],
        )
        planned = [t for s in job.steps for t in s.targets]
        writer = ShardedWriter(
            Path(job.folder), planned, job.max_shard_size, only=job.shards, fingerprint=job.fingerprint
        )
        try:
            stream_steps(ckpt, job.steps, writer, job.check_finite, lambda n: events.put(("bytes", n)))
            writer.finish()
        finally:
            writer.close()
        events.put(("done", None))
    except ConversionError as exc:
        events.put(("error", str(exc)))
    except Exception as exc:  # reported by the parent as one line, like every conversion error
        events.put(("error", f"worker for shards {job.shards}: {type(exc).__name__}: {exc}"))
