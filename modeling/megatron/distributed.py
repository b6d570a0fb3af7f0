"""Start N*M ranks on this host and initialise Megatron-Core's model-parallel state.

gloo on CPU (with the CPU shim), NCCL on GPUs (one GPU per rank, megatron-core untouched).
`run_ranks(fn, layout, *args)` starts one process per rank, runs `fn(rank, *args)` in each after
initialisation, and returns what rank 0 returned. A failure on any rank raises in the caller.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import cpu_shim
from .builder import ParallelLayout


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_rank(rank: int, layout: ParallelLayout, backend: str, port: int, seed: int = 1234) -> None:
    """Process-group and model-parallel initialisation of one rank."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if backend == "gloo":
        cpu_shim.install()
    else:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=layout.world_size
    )
    parallel_state.initialize_model_parallel(layout.tp, layout.pp)
    model_parallel_cuda_manual_seed(seed)


def shutdown_rank() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _worker(rank, fn, layout, backend, port, result_dir, args):
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // layout.world_size))
        init_rank(rank, layout, backend, port)
        result = fn(rank, *args)
        if rank == 0:
            torch.save(result, Path(result_dir) / "result.pt")
        dist.barrier()
    except BaseException:
        (Path(result_dir) / f"error_{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        shutdown_rank()


def run_ranks(fn, layout: ParallelLayout, *args, backend: str | None = None):
    """Run fn(rank, *args) on layout.world_size freshly spawned ranks; return rank 0's result."""
    backend = backend or default_backend()
    with tempfile.TemporaryDirectory(prefix="nvlm-ranks-") as result_dir:
        try:
            mp.spawn(
                _worker,
                args=(fn, layout, backend, _free_port(), result_dir, args),
                nprocs=layout.world_size,
                join=True,
            )
        except Exception as exc:
            errors = sorted(Path(result_dir).glob("error_*.txt"))
            detail = errors[0].read_text() if errors else str(exc)
            raise RuntimeError(f"a Megatron rank failed:\n{detail}") from None
        from .runner import MegatronOutputs

        with torch.serialization.safe_globals([MegatronOutputs]):  # rank 0's result: tensors, lists, dicts
            return torch.load(Path(result_dir) / "result.pt", weights_only=True)
