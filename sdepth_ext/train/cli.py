"""The command line of ``python -m sdepth_ext.train``: options and their checks, then the runs, the
lesion study, the plots and ``summary.json``.

Every option is checked before anything is trained or written (exit status 2 and a message naming the
option and its allowed values); so is ``--resume`` against the checkpoints it would continue. Ctrl-C and
SIGTERM stop the command between two files, never inside one, print how to resume, and exit with status
130 (SIGINT) or 143 (SIGTERM) without a traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .. import survival_probs
from ..data import DATASETS, load_dataset
from ..environment import environment
from ..flops import expected_compute_fraction
from .config import DROPPED_GRADS, MODES, RUNS, SCALINGS, SCHEDULES, TrainConfig, check_config
from .files import atomic_write_text
from .interrupts import handle_interrupts
from .lesion import frontier_study, lesion_study
from .loop import RUN_FILES, ResumeError, plan_resume, train_run
from .plots import plot_error_curves, plot_lesion

__all__ = ["build_parser", "parse_args", "main"]

PROG = "python -m sdepth_ext.train"
DEFAULTS = TrainConfig()
PAIR_FILES = ("summary.json", "error_curves.png", "lesion.png", "frontier.png", "frontier.csv")

DESCRIPTION = """\
Trains sdepth_ext.cifar_resnet with constant depth and with stochastic depth (Huang et al. 2016) side by
side: SGD with Nesterov momentum, random crops of the 4-pixel-padded image and horizontal flips. Writes
per run OUT/<run>/log.csv (one row per epoch), steps.csv (one row per step) and checkpoint.pt, and
OUT/error_curves.png, lesion.png and summary.json (errors, seconds per epoch, the measured time ratio
next to the ideal one)."""

EPILOG = """\
--resume continues every run from its checkpoint, bit-identically on the CPU. The settings must be the
checkpoint's (an error names the one that differs), except --epochs: it may grow, or shrink to no fewer
than the epochs already trained. The lr of every remaining epoch is then the one a run planned for the new
--epochs has at that epoch: the default milestones move to 50%% and 75%% of the new total, the cosine
schedule spans the new total, explicit --milestones stay. (So when a run whose lr had already dropped is
extended, the lr can rise again until the new milestones.) Ctrl-C prints the command that resumes.

examples:
  %(prog)s --out runs/digits                  # offline digits data, the defaults above
  %(prog)s --out runs/digits --resume         # after an interruption
  %(prog)s --data cifar10 --data-dir ~/data --depth 110 --epochs 500 --batch-size 128 \\
      --milestones 250,375 --out runs/cifar10-110   # the paper's CIFAR-10 run, on a GPU"""


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(m) for m in text.split(",") if m.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option} must be a comma list of integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The options; each help line states its default once (the help formatter adds none)."""
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEFAULTS
    p.add_argument("--data", default=d.data, choices=DATASETS, metavar="{" + ",".join(DATASETS) + "}",
                   help="digits: scikit-learn's bundled 8x8 handwritten digits upsampled to 32x32, offline; "
                        f"cifar10/cifar100 need --data-dir (default: {d.data})")
    p.add_argument("--data-dir", default=None, help="folder with the extracted CIFAR python archive; "
                                                    "nothing is downloaded (default: none)")
    p.add_argument("--depth", type=int, default=d.depth,
                   help=f"6n+2: 8, 14, 20, ..., 110 (default: {d.depth})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"(default: {d.epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"(default: {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"initial learning rate (default: {d.lr})")
    p.add_argument("--momentum", type=float, default=d.momentum,
                   help=f"Nesterov momentum (default: {d.momentum})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"(default: {d.weight_decay})")
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES,
                   help="step: lr / 10 at each milestone; cosine: to near 0 over --epochs "
                        f"(default: {d.schedule})")
    p.add_argument("--milestones", default="", type=lambda s: _ints(s, "--milestones"),
                   help="epochs after which the step schedule divides the lr by 10, e.g. 250,375 (default: "
                        "50%% and 75%% of --epochs, rounded down; one that falls on epoch 0 or on the other "
                        "is left out, so 2 epochs drop once and 1 epoch never)")
    p.add_argument("--p-last", type=float, default=d.p_last,
                   help=f"survival probability of the last block, linear decay from 1 (default: {d.p_last})")
    p.add_argument("--mode", default=d.mode, choices=MODES,
                   help=f"draw gates per mini-batch, per sample, or a fixed count of samples per unit "
                        f"(default: {d.mode})")
    p.add_argument("--scaling", default=d.scaling, choices=SCALINGS,
                   help=f"paper: scale residuals by p_l at test time; inverted: by 1/p_l in training "
                        f"(default: {d.scaling})")
    p.add_argument("--dropped-grads", default=d.dropped_grads, choices=DROPPED_GRADS,
                   help="what a dropped block's parameters get: zero (a zero gradient: weight decay and "
                        "momentum apply, as in the paper's code) or none (no gradient: frozen that step) "
                        f"(default: {d.dropped_grads})")
    p.add_argument("--runs", default=",".join(d.runs), type=lambda s: [r.strip() for r in s.split(",")],
                   help=f"comma list of {', '.join(RUNS)} (default: {','.join(d.runs)})")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"initial weights, gates, data order and crops (default: {d.seed})")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--subset", type=int, default=None,
                   help="train on the first N training images and test on the first N/3 (default: all)")
    p.add_argument("--lesion-draws", type=int, default=d.lesion_draws,
                   help=f"random draws per k in the lesion study (default: {d.lesion_draws})")
    p.add_argument("--no-lesion", action="store_true", help="skip the lesion study")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars; print one line per epoch instead")
    p.add_argument("--drop-schedule", default=d.drop_schedule,
                   help="the stochastic-depth run's drop rates over the training steps: constant, "
                        "warmup:STEPS (ramp up over STEPS), pld:GAMMA (progressive layer dropping) or "
                        f"late:START (none before step START) (default: {d.drop_schedule})")
    p.add_argument("--frontier", action="store_true",
                   help="after training, the depth-pruning frontier of each run: test error, MACs and "
                        "latency with k blocks removed, with and without BatchNorm re-estimation")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out folder that already holds checkpoints (refused without it)")
    p.add_argument("--resume", action="store_true", help="continue each run from its checkpoint (see below)")
    p.add_argument("--out", default="runs/sdepth", help="output folder (default: runs/sdepth)")
    return p


def parse_args(argv=None) -> tuple[TrainConfig, Path, bool]:
    """Parse and check the options; exits with status 2 and a message naming the option if one is bad."""
    p = build_parser()
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TrainConfig(data=a.data, data_dir=a.data_dir, depth=a.depth, epochs=a.epochs,
                      batch_size=a.batch_size, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
                      schedule=a.schedule, milestones=a.milestones, p_last=a.p_last, mode=a.mode,
                      scaling=a.scaling, seed=a.seed, device=device, subset=a.subset, runs=a.runs,
                      lesion=not a.no_lesion, lesion_draws=a.lesion_draws, progress=not a.no_progress,
                      drop_schedule=a.drop_schedule, frontier=a.frontier, dropped_grads=a.dropped_grads)
    try:
        check_config(cfg)
    except ValueError as err:
        p.error(str(err))  # exits with status 2 and the usage line
    if a.resume and a.overwrite:
        p.error("--resume and --overwrite exclude each other")
    return cfg, Path(a.out), a.resume, a.overwrite


def _fail(message: str, status: int = 2):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(status)


def _resume_command(argv: list[str]) -> str:
    return " ".join([PROG, *map(shlex.quote, argv), *([] if "--resume" in argv else ["--resume"])])


def main(argv=None) -> dict:
    """Run the command (``argv`` without the program name; None: ``sys.argv[1:]``); returns the summary."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, out_dir, resume, overwrite = parse_args(argv)
    try:
        with handle_interrupts():
            return _run(cfg, out_dir, resume, argv, overwrite)
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        saved = any((out_dir / name / "checkpoint.pt").is_file() for name in cfg.runs)
        if saved:
            message = f"every finished epoch is saved; resume with: {_resume_command(argv)}"
        else:
            rerun = " ".join([PROG, *map(shlex.quote, (a for a in argv if a != "--resume"))])
            message = f"no epoch had finished, nothing was saved; start again with: {rerun}"
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\ninterrupted ({name}): {message}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None


def _run(cfg: TrainConfig, out_dir: Path, resume: bool, argv: list[str], overwrite: bool = False) -> dict:
    try:
        data = load_dataset(cfg.data, cfg.data_dir)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        _fail(str(err), status=1)
    if cfg.subset is not None:
        if cfg.subset > len(data.train_y):
            _fail(f"--subset must be at most {len(data.train_y)} (the training images of {cfg.data}), "
                  f"got {cfg.subset}")
        data = data.subset(cfg.subset, max(1, cfg.subset // 3))
    if resume:
        try:
            plan = plan_resume(cfg, data, out_dir)
        except ResumeError as err:
            _fail(str(err))
    else:
        existing = [str(out_dir / name / "checkpoint.pt") for name in cfg.runs
                    if (out_dir / name / "checkpoint.pt").is_file()]
        if existing and not overwrite:
            _fail(f"{', '.join(existing)} already exist: continue with --resume, start over with "
                  "--overwrite, or choose another --out")
        plan = dict.fromkeys(cfg.runs, False)
        for name in cfg.runs:  # a fresh start: no file of an earlier experiment may be resumed later
            for stale in RUN_FILES:
                (out_dir / name / stale).unlink(missing_ok=True)
        for stale in PAIR_FILES:
            (out_dir / stale).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = data.to(cfg.device)
    print(f"data={cfg.data}: {len(data.train_y)} train / {len(data.test_y)} test images; "
          f"cifar_resnet({cfg.depth}) on {cfg.device}; runs={','.join(cfg.runs)}; out={out_dir}", flush=True)

    models, logs = {}, {}
    for name in cfg.runs:
        models[name], logs[name] = train_run(cfg, data, name, out_dir, resume=plan[name])
        last = logs[name][-1]
        print(f"{name}: test error {100 * last['test_error']:.2f}% after {last['epoch']} epochs, "
              f"{sum(r['epoch_time_s'] for r in logs[name]):.1f} s of training", flush=True)

    stamp = environment(torch.device(cfg.device))
    # as typed: the generic stamp would name this package's __main__ module
    stamp["command"] = " ".join([PROG, *map(shlex.quote, argv)])
    summary: dict = {"environment": stamp, "config": asdict(cfg), "runs": {}}
    for name, log in logs.items():
        summary["runs"][name] = {
            "final_test_error": log[-1]["test_error"], "best_test_error": min(r["test_error"] for r in log),
            "final_train_error": log[-1]["train_error"],
            "mean_epoch_time_s": sum(r["epoch_time_s"] for r in log) / len(log), "epochs": len(log)}
    if "stochastic" in models:
        example = data.test_x[:1]
        survival = survival_probs(models["stochastic"])
        summary["ideal_time_ratio"] = expected_compute_fraction(models["stochastic"], example, survival)
        if "constant" in logs:
            # the first epoch carries one-time warm-up costs (allocator, kernel selection)
            def steady(log):
                return [r["epoch_time_s"] for r in (log[1:] if len(log) > 1 else log)]

            sd_t, c_t = steady(logs["stochastic"]), steady(logs["constant"])
            summary["measured_time_ratio"] = (sum(sd_t) / len(sd_t)) / (sum(c_t) / len(c_t))
            # medians: an epoch slowed by other work on a shared machine moves them little
            summary["median_time_ratio"] = statistics.median(sd_t) / statistics.median(c_t)
            print(f"time per epoch, stochastic / constant: {summary['measured_time_ratio']:.3f} "
                  f"(medians {summary['median_time_ratio']:.3f}; ideal {summary['ideal_time_ratio']:.3f}, "
                  "the expected share of FLOPs that runs)")
    plot_error_curves(logs, out_dir / "error_curves.png",
                      f"cifar_resnet({cfg.depth}) on {cfg.data}, p_last={cfg.p_last}")
    if cfg.lesion:
        studies = {name: lesion_study(m, data, cfg.lesion_draws, cfg.seed) for name, m in models.items()}
        plot_lesion(studies, out_dir / "lesion.png")
        summary["lesion"] = studies
    if cfg.frontier:
        summary["frontier"] = frontier_study(models, data, out_dir, cfg)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1))
    print(f"wrote {out_dir}/summary.json, error_curves.png" + (", lesion.png" if cfg.lesion else "")
          + (", frontier.csv, frontier.png" if cfg.frontier else ""))
    return summary
