"""The settings of a training run: :class:`TrainConfig`, their checks, the lr schedule, what --resume keeps.

Every check names the command-line option it is about, so the CLI and direct callers of
:func:`~sdepth_ext.train.train_run` get the same one-line messages. The lr of an epoch is a pure function of
the epoch and the settings (:func:`lr_at`); nothing about the schedule lives in a checkpoint, so a resumed
run with a different ``--epochs`` follows the schedule planned for the new total (see :func:`lr_at`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..data import DATASETS
from ..grads import DROPPED_GRADS
from ..rules import drop_schedule
from ..scheduler import MODES
from ..state import SCALINGS as LIBRARY_SCALINGS

__all__ = ["TrainConfig", "RUNS", "SCHEDULES", "MODES", "SCALINGS", "DROPPED_GRADS", "LOG_FIELDS",
           "STEP_FIELDS", "FIXED_ON_RESUME", "DATA_BOUND_SHARE", "default_milestones", "milestones_for",
           "lr_at", "check_config", "describe_setting", "device_kind", "parse_drop_schedule"]

RUNS = ("constant", "stochastic")
SCHEDULES = ("step", "cosine")
# The scalings the CLI's runs offer: the paper's and the inverted one (no "none": it needs no run of its own).
SCALINGS = tuple(s for s in LIBRARY_SCALINGS if s in ("paper", "inverted"))
LOG_FIELDS = ["epoch", "lr", "train_loss", "train_error", "test_loss", "test_error", "epoch_time_s",
              "images_per_s", "drop_scale", "work_ran", "work_expected", "data_time_s"]
# What each extra column means: drop_scale, the drop schedule's value at the epoch's last step (1 without
# a schedule); work_ran / work_expected, the share of residual-branch FLOPs that ran in the epoch and that
# the rates in force expected (sd.compute_stats; 1 for the constant run); data_time_s, host seconds spent
# producing batches (indexing, augmentation) within epoch_time_s.
DATA_BOUND_SHARE = 0.25  # above it, a step waits on its data more than the saving can show
STEP_FIELDS = ["epoch", "step", "loss"]
MAX_SEED = 2**32 - 1

# Settings a resumed run must share with its checkpoint (field -> option): changing any of them would make
# the run a hybrid of two experiments. --epochs may change (the lr schedule follows the new total), and so
# may what only reads or reports a run (--data-dir, --runs, --lesion-draws, --no-lesion, --no-progress).
FIXED_ON_RESUME = {
    "data": "--data", "subset": "--subset", "depth": "--depth", "batch_size": "--batch-size", "lr": "--lr",
    "momentum": "--momentum", "weight_decay": "--weight-decay", "schedule": "--schedule",
    "milestones": "--milestones", "p_last": "--p-last", "mode": "--mode", "scaling": "--scaling",
    "seed": "--seed", "device": "--device", "drop_schedule": "--drop-schedule",
    "dropped_grads": "--dropped-grads",
}


@dataclass
class TrainConfig:
    data: str = "digits"
    data_dir: str | None = None
    # The defaults train the offline digits set in about 10 minutes on a 2-core CPU, long enough for the
    # stochastic-depth run to converge after the first lr drop (docs/reproduction.md, "Results: the offline
    # digits set").
    depth: int = 32
    epochs: int = 40
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"
    milestones: list[int] = field(default_factory=list)  # empty: the default ones, default_milestones()
    p_last: float = 0.5
    mode: str = "batch"
    scaling: str = "paper"
    seed: int = 0
    device: str = "cpu"
    subset: int | None = None  # train on the first N images only (smoke runs)
    runs: list[str] = field(default_factory=lambda: list(RUNS))
    lesion: bool = True
    lesion_draws: int = 5
    progress: bool = True
    drop_schedule: str = "constant"  # KIND[:ARG] of sdepth_ext.drop_schedule, over the training steps
    dropped_grads: str = "zero"  # what a dropped block's parameters get: sdepth_ext.set_dropped_grads
    frontier: bool = False  # the depth-pruning frontier of each trained model (sdepth_ext.depth_frontier)

    def step_milestones(self) -> list[int]:
        """The epochs after which the step schedule divides the lr by 10."""
        return milestones_for(self.milestones, self.epochs)


def default_milestones(epochs: int) -> list[int]:
    """50% and 75% of ``epochs``, rounded down, as in the paper (500 epochs: 250, 375).

    A milestone is the number of epochs after which the lr drops, so it must lie in 1..epochs-1; one that
    does not, or that falls on the other, is left out: 2 epochs drop once (after epoch 1), 1 epoch never.
    """
    return sorted({m for m in (epochs // 2, (3 * epochs) // 4) if 1 <= m < epochs})


def milestones_for(milestones: list[int], epochs: int) -> list[int]:
    return list(milestones) if milestones else default_milestones(epochs)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """The lr of epoch ``epoch`` (0-based) of a run planned for ``cfg.epochs`` epochs.

    step: ``lr * 0.1**k``, k the number of milestones <= epoch. cosine:
    ``lr * (1 + cos(pi * epoch / epochs)) / 2``, never 0 within the run. A pure function of its arguments:
    a run resumed with a new ``--epochs`` gets, for every remaining epoch, the lr that a run planned for
    the new total from the start has there.
    """
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    drops = sum(1 for m in cfg.step_milestones() if m <= epoch)
    return cfg.lr * 0.1**drops


def parse_drop_schedule(text: str):
    """``constant``, ``warmup:STEPS``, ``pld:GAMMA`` or ``late:START`` -> a :func:`sdepth_ext.drop_schedule`.

    Raises ``ValueError`` naming ``--drop-schedule`` and the forms it takes.
    """
    forms = "constant, warmup:STEPS, pld:GAMMA or late:START"
    kind, _, arg = str(text).partition(":")
    try:
        if kind == "constant" and not arg:
            return drop_schedule("constant")
        if kind in ("warmup", "late") and arg:
            return drop_schedule(kind, **{"steps" if kind == "warmup" else "start": int(arg)})
        if kind == "pld" and arg:
            return drop_schedule("pld", gamma=float(arg))
    except ValueError as err:
        raise ValueError(f"--drop-schedule {text!r}: {err}") from None
    raise ValueError(f"--drop-schedule must be {forms}, got {text!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def device_kind(device: str) -> str:
    return torch.device(device).type


def check_config(cfg: TrainConfig) -> TrainConfig:
    """Raise ``ValueError`` naming the option and its allowed values for the first setting out of range."""
    def need(ok: bool, message: str):
        if not ok:
            raise ValueError(message)

    need(cfg.data in DATASETS, f"--data must be one of {', '.join(DATASETS)}, got {cfg.data!r}")
    need(_is_int(cfg.depth) and cfg.depth >= 8 and (cfg.depth - 2) % 6 == 0,
         f"--depth must be 6n+2 with n >= 1 (8, 14, 20, ..., 110), got {cfg.depth}")
    need(_is_int(cfg.epochs) and cfg.epochs >= 1, f"--epochs must be an integer >= 1, got {cfg.epochs}")
    need(_is_int(cfg.batch_size) and cfg.batch_size >= 1,
         f"--batch-size must be an integer >= 1, got {cfg.batch_size}")
    need(_is_real(cfg.lr) and math.isfinite(cfg.lr) and cfg.lr > 0,
         f"--lr must be a finite number > 0, got {cfg.lr}")
    need(_is_real(cfg.momentum) and 0.0 <= cfg.momentum < 1.0,
         f"--momentum must be in [0, 1), got {cfg.momentum}")
    need(_is_real(cfg.weight_decay) and math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
         f"--weight-decay must be a finite number >= 0, got {cfg.weight_decay}")
    need(cfg.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if cfg.milestones:
        ms = list(cfg.milestones)
        need(cfg.schedule == "step", "--milestones applies to --schedule step only")
        # A milestone at or beyond --epochs is allowed: it takes effect if the run is resumed for longer.
        need(all(_is_int(m) for m in ms) and ms == sorted(set(ms)) and ms[0] >= 1,
             f"--milestones must be increasing epochs >= 1, got {','.join(str(m) for m in ms)}")
    need(_is_real(cfg.p_last) and 0.0 <= cfg.p_last <= 1.0, f"--p-last must be in [0, 1], got {cfg.p_last}")
    need(cfg.mode in MODES, f"--mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    need(cfg.scaling in SCALINGS, f"--scaling must be one of {', '.join(SCALINGS)}, got {cfg.scaling!r}")
    need(_is_int(cfg.seed) and 0 <= cfg.seed <= MAX_SEED,
         f"--seed must be an integer in 0..{MAX_SEED}, got {cfg.seed}")
    need(cfg.subset is None or (_is_int(cfg.subset) and cfg.subset >= 1),
         f"--subset must be an integer >= 1, got {cfg.subset}")
    need(bool(cfg.runs) and all(r in RUNS for r in cfg.runs) and len(set(cfg.runs)) == len(cfg.runs),
         f"--runs must be a comma list of {', '.join(RUNS)} (each once), got {','.join(cfg.runs)!r}")
    need(_is_int(cfg.lesion_draws) and cfg.lesion_draws >= 1,
         f"--lesion-draws must be an integer >= 1, got {cfg.lesion_draws}")
    need(cfg.dropped_grads in DROPPED_GRADS,
         f"--dropped-grads must be one of {', '.join(DROPPED_GRADS)}, got {cfg.dropped_grads!r}")
    parse_drop_schedule(cfg.drop_schedule)
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, TypeError):
        device = None
    need(device is not None and device.type in ("cpu", "cuda"),
         f"--device must be cpu, cuda or cuda:N, got {cfg.device!r}")
    if device.type == "cuda":
        need(torch.cuda.is_available(),
             f"--device {cfg.device}: CUDA is not available on this machine (use --device cpu)")
        need(device.index is None or device.index < torch.cuda.device_count(),
             f"--device {cfg.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return cfg


def describe_setting(name: str, value) -> str:
    """A setting's value as the command line spells it (for resume errors)."""
    if name == "milestones":
        return ",".join(str(m) for m in value) if value else "the default (50% and 75% of --epochs)"
    if name == "subset" and value is None:
        return "all images (no --subset)"
    return str(value)
