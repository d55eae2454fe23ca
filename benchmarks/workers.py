"""The worker processes of the distributed benchmarks (bench_ddp, bench_fsdp): :data:`WORLD` ranks on this
machine, spawned by :func:`run_workers`, joined in a process group by :func:`process_group`; rank 0 saves
what they measured (:func:`save_measured`), which the parent reads back.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .common import configure_cpu_malloc, environment

__all__ = ["WORLD", "group_environment", "process_group", "run_workers", "save_measured"]

WORLD = 2


def _device(backend: str, rank: int) -> torch.device:
    """gloo: the CPU; nccl: one GPU per rank."""
    return torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")


@contextlib.contextmanager
def process_group(rank: int, port: int, backend: str, cpu_malloc: str) -> Iterator[torch.device]:
    """In a worker: apply ``--cpu-malloc`` (a spawned process starts with the system allocator), share the
    CPU cores among the ranks, join the group on ``port`` and yield this rank's device; leave the group on
    exit. Nothing may hold the group then (keep DDP and FSDP models in a function called in the block), so
    that ``destroy_process_group`` frees it and joins gloo's worker threads: a group outliving it let torch
    2.14's gloo abort the exiting process now and then (docs/training.md, the DDP script)."""
    configure_cpu_malloc(cpu_malloc)
    torch.set_num_threads(max(1, (os.cpu_count() or WORLD) // WORLD))
    device = _device(backend, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        yield device
    finally:
        # FSDP2's modules sit in reference cycles (its states, parameter groups and the module's hooks):
        # after the block, a rank's sharded models were still alive until the collector ran, each holding the
        # group, and a group that outlives destroy_process_group let gloo abort the exiting process now and
        # then (bench_fsdp's smoke run, torch 2.14: 11 of 177 runs without this collection, 0 of 80 with it).
        gc.collect()
        dist.destroy_process_group()


def save_measured(rank: int, out_path: str, **measured) -> None:
    """In a worker: rank 0 saves ``measured`` for :func:`run_workers`, with the ``cpu_allocator`` the workers
    ran with (their timing is what the result rows hold)."""
    if rank == 0:
        torch.save({**measured, "cpu_allocator": environment()["cpu_allocator"]}, out_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(worker: Callable, args: tuple, what: str, timeout_s: float) -> dict:
    """Run ``worker(rank, port, out_path, *args)`` in :data:`WORLD` spawned processes and return what rank 0
    saved to ``out_path`` (:func:`save_measured`); ``what`` names the benchmark if they time out."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "samples.pt")
        context = mp.start_processes(worker, args=(_free_port(), out_path, *args), nprocs=WORLD, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what} workers did not finish within {timeout_s} s")
        finally:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
        return torch.load(out_path)


def group_environment(backend: str) -> dict:
    """The stamp of a distributed run, as rank 0's device sees it, with the backend and the world size (the
    ``cpu_allocator`` the workers report replaces this process's)."""
    return {**environment(_device(backend, 0)), "backend": backend, "world_size": WORLD}
