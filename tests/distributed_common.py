"""What the DDP and FSDP2 tests (test_ddp.py, test_fsdp.py) share: the two small models, a rank's slice of a
global batch, and running two gloo ranks in spawned processes.

Every wait is bounded: the process group times out after 60 s and the spawn as a whole after the caller's
limit, so a hang fails the test instead of blocking CI. Rank r trains on samples ``r, r + WORLD, ...`` of
each global batch: the order in which row mode's gates interleave ranks.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchvision.models.resnet import BasicBlock

import sdepth_ext as sd
from sdepth_ext.fsdp import MIN_TORCH

WORLD = 2


# ============================================================================================================
# Models and data
# ============================================================================================================
def _gn(channels):
    return nn.GroupNorm(2, channels)


def gn_model():
    """ResNet blocks with GroupNorm and one projection shortcut (block 2). Per-sample normalisation: a step
    over 2 ranks is exactly one step over the concatenated batch (BatchNorm's per-rank statistics would
    differ from full-batch ones)."""
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), _gn(16))
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), _gn(8), nn.ReLU(),
        BasicBlock(8, 8, norm_layer=_gn), BasicBlock(8, 8, norm_layer=_gn),
        BasicBlock(8, 16, stride=2, downsample=down, norm_layer=_gn), BasicBlock(16, 16, norm_layer=_gn),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def bn_model():
    torch.manual_seed(0)
    return sd.cifar_resnet(8, num_classes=5)  # 3 BasicBlocks with BatchNorm, two projection shortcuts


def local_slice(t, rank):
    return t[rank::WORLD]


def assert_close_dicts(got, expected, tol=None):
    """The same keys; each tensor equal (``tol`` None) or close within ``tol`` (assert_close's arguments)."""
    assert got.keys() == expected.keys()
    for name in got:
        if tol is None:
            assert torch.equal(got[name], expected[name]), name
        else:
            torch.testing.assert_close(got[name], expected[name], **tol, msg=name)


# ============================================================================================================
# Two ranks in spawned processes
# ============================================================================================================
def _init_gloo(rank, port, world_size=WORLD):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_the_living(context):
    for p in context.processes:
        if p.is_alive():
            p.kill()


def _rank_main(rank, port, out_dir, work, world_size):
    _init_gloo(rank, port, world_size)
    try:
        torch.save(work(rank, out_dir), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        # FSDP2 models left by ``work`` sit in reference cycles and hold the group until collected; a group
        # alive past destroy_process_group let gloo abort the exiting rank now and then (benchmarks/workers)
        gc.collect()
        dist.destroy_process_group()


def spawn(worker, args, timeout_s, name, nprocs=WORLD):
    """``worker(rank, *args)`` in ``nprocs`` spawned processes; the test fails (and every process is killed)
    if they have not all finished within ``timeout_s``. ``name`` says whose workers in that failure."""
    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"{name} workers did not finish within {timeout_s} s")
    finally:
        _kill_the_living(context)


def run_ranks(work, out_dir, timeout_s, name, world_size=WORLD):
    """``work(rank, out_dir)`` on ``world_size`` ranks (two by default), each in a process of its own with one
    intra-op thread and a gloo process group (``out_dir``: for files of its own); returns what each returned,
    in rank order. ``name`` says whose workers in the failure for a hang. ``work`` must be a module-level
    function (the spawned processes unpickle it)."""
    spawn(_rank_main, (free_port(), out_dir, work, world_size), timeout_s, name, nprocs=world_size)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


# ============================================================================================================
# A rank dies mid-run: the survivor fails fast with an error instead of hanging
# ============================================================================================================
def _killed_rank_main(rank, port, out_dir, mode, setup, lr):
    """Eight SGD steps of ``loss_at(step)`` with ``clear_dropped_grads(model)`` after each backward (row
    mode: a collective of its own); at the fourth, rank 1 kills itself. Saves to ``killed-rank{rank}.pt``
    the error the rank raised (None: it trained on alone) and the seconds from the kill to it."""
    _init_gloo(rank, port)
    model, loss_at = setup(rank, mode)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    start = None
    try:
        for step in range(8):
            if step == 3:
                if rank == 1:
                    os.kill(os.getpid(), 9)  # SIGKILL: no cleanup, no goodbye to the process group
                start = time.monotonic()
            opt.zero_grad(set_to_none=True)
            loss_at(step).backward()
            sd.clear_dropped_grads(model)
            opt.step()
        outcome = {"error": None}
    except Exception as err:  # noqa: BLE001 - whatever the collective raises is the observation
        outcome = {"error": f"{type(err).__name__}: {err}"}
    outcome["seconds"] = None if start is None else time.monotonic() - start
    torch.save(outcome, os.path.join(out_dir, f"killed-rank{rank}.pt"))


def assert_the_other_fails_fast(setup, out_dir, mode, lr, join_timeout_s):
    """Both ranks train (``setup(rank, mode)`` -> ``(model, loss_at)``, a module-level function) with plain
    SGD at ``lr``, until rank 1 kills itself at the fourth step: it died of SIGKILL, and rank 0 raised an
    error within 30 s of it instead of hanging or training on alone."""
    context = mp.start_processes(_killed_rank_main, args=(free_port(), str(out_dir), mode, setup, lr),
                                 nprocs=WORLD, join=False, start_method="spawn")
    survivor = context.processes[0]
    survivor.join(timeout=join_timeout_s)
    try:
        assert not survivor.is_alive(), "rank 0 hung after rank 1 was killed"
    finally:
        _kill_the_living(context)
    assert context.processes[1].exitcode == -9
    outcome = torch.load(os.path.join(out_dir, "killed-rank0.pt"), weights_only=False)
    assert outcome["error"] is not None, "rank 0 trained on alone without noticing"
    assert outcome["seconds"] < 30, outcome


# FSDP2 tests' shared pieces (tests/test_fsdp*.py)
needs_fsdp2 = pytest.mark.skipif(
    tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < MIN_TORCH,
    reason=f"FSDP2 on a CPU with gloo needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (CPU stream events)")


def loss_of(out):
    return out.float().square().mean()


def full_params(model):
    """Unsharded copies of every parameter (a collective under FSDP2: every rank calls it)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().clone()
    return out
