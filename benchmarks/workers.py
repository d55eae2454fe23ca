"""Benchmark work in spawned processes: :func:`run_spawned` runs a worker in fresh processes and reads back
what it saved (bench_host's step part, one process at a time). The distributed benchmarks (bench_ddp,
bench_fsdp) run :data:`WORLD` ranks on this machine through :func:`run_workers`, joined in a process group
by :func:`process_group`; rank 0 saves what they measured (:func:`save_measured`).
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

__all__ = ["WORLD", "group_environment", "process_group", "run_spawned", "run_workers", "save_measured"]

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


def run_spawned(worker: Callable, args: tuple, what: str, timeout_s: float, nprocs: int = 1):
    """Run ``worker(index, out_path, *args)`` in ``nprocs`` spawned processes (``index`` 0 to ``nprocs - 1``)
    and return what they saved to ``out_path`` (one file, in a temporary folder: :func:`torch.save` of
    tensors, numbers, strings and containers of them).

    ``what`` names the work in the errors: ``TimeoutError`` past ``timeout_s`` seconds (the processes still
    alive are killed), ``RuntimeError`` when a process raised (its traceback in the message) or died.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "measured.pt")
        context = mp.start_processes(worker, args=(out_path, *args), nprocs=nprocs, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=min(5.0, max(0.1, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what} did not finish within {timeout_s} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
            raise RuntimeError(f"{what} failed: {err}") from err
        finally:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
                    p.join()  # reaped: no zombie left behind
        return torch.load(out_path, weights_only=True)


def run_workers(worker: Callable, args: tuple, what: str, timeout_s: float) -> dict:
    """Run ``worker(rank, out_path, port, *args)`` in :data:`WORLD` spawned processes (:func:`run_spawned`;
    ``port``: a free one for :func:`process_group`) and return what rank 0 saved to ``out_path``
    (:func:`save_measured`); ``what`` names the benchmark in the errors."""
    return run_spawned(worker, (_free_port(), *args), f"{what} workers", timeout_s, nprocs=WORLD)


def group_environment(backend: str) -> dict:
    """The stamp of a distributed run, as rank 0's device sees it, with the backend and the world size (the
    ``cpu_allocator`` the workers report replaces this process's)."""
    return {**environment(_device(backend, 0)), "backend": backend, "world_size": WORLD}
