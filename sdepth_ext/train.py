"""``python -m sdepth_ext.train``: constant depth vs stochastic depth on a CIFAR ResNet, and a lesion study.

Trains :func:`sdepth_ext.cifar_resnet` once with constant depth and once with stochastic depth (or either
alone, ``--runs``), as in Huang et al. 2016: SGD with Nesterov momentum 0.9, weight decay 1e-4, a step
(lr / 10 at 50% and 75% of training) or cosine schedule, random 4-pixel-padded crops and horizontal flips.
Writes under ``--out``: per run ``log.csv`` (one row per epoch), ``steps.csv`` (one row per step) and
``checkpoint.pt`` (model with the scheduler's RNG, optimizer, lr schedule, data RNG, epoch); and for the
pair ``error_curves.png`` (test error per epoch, like the paper's Figure 3), ``lesion.png`` and
``summary.json`` (final errors, wall-clock per epoch, measured time ratio next to the ideal).

``--resume`` continues every run from its checkpoint exactly: the next epoch's losses are bit-identical to
those of an uninterrupted run on the same device (tested on the CPU).

The paper's CIFAR-10 run on a GPU (110 layers, 500 epochs, lr 0.1 / 10 at epochs 250 and 375, batch 128)::

    python -m sdepth_ext.train --data cifar10 --data-dir ~/data --depth 110 --epochs 500 \\
        --batch-size 128 --lr 0.1 --milestones 250,375 --p-last 0.5 --out runs/cifar10-110
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .convert import cifar_resnet, convert, survival_probs
from .data import DATASETS, Dataset, augment, load_dataset
from .environment import environment
from .flops import expected_compute_fraction

__all__ = ["TrainConfig", "train_run", "lesion_study", "main"]

RUNS = ("constant", "stochastic")
SCHEDULES = ("step", "cosine")
LOG_FIELDS = ["epoch", "lr", "train_loss", "train_error", "test_loss", "test_error", "epoch_time_s",
              "images_per_s"]


@dataclass
class TrainConfig:
    data: str = "digits"
    data_dir: str | None = None
    depth: int = 20
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"
    milestones: list[int] = field(default_factory=list)  # empty: 50% and 75% of the epochs
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

    def step_milestones(self) -> list[int]:
        return self.milestones or [max(1, self.epochs // 2), max(1, (3 * self.epochs) // 4)]


# ----------------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, num_classes: int, stochastic: bool, device: torch.device):
    torch.manual_seed(cfg.seed)  # the same initial weights for both runs
    model = cifar_resnet(cfg.depth, num_classes)
    if stochastic:
        convert(model, p_last=cfg.p_last, mode=cfg.mode, scaling=cfg.scaling, seed=cfg.seed)
    return model.to(device)


def _lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.step_milestones(), gamma=0.1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500
             ) -> tuple[float, float]:
    """(mean cross-entropy, error rate) in eval mode; restores the model's train/eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, wrong = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        wrong += int((logits.argmax(1) != yb).sum())
    model.train(was_training)
    return loss_sum / max(1, len(y)), wrong / max(1, len(y))


def _append_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def train_run(cfg: TrainConfig, data: Dataset, name: str, out_dir: Path, resume: bool = False
              ) -> tuple[torch.nn.Module, list[dict]]:
    """Train one run (``name`` in RUNS) for ``cfg.epochs`` epochs; returns the model and its epoch log."""
    device = torch.device(cfg.device)
    run_dir = out_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg, data.num_classes, name == "stochastic", device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=True)
    lr_scheduler = _lr_scheduler(cfg, optimizer)
    data_rng = torch.Generator().manual_seed(cfg.seed + 1)  # data order and augmentation only
    start_epoch = 0
    checkpoint_path = run_dir / "checkpoint.pt"
    if resume and checkpoint_path.exists():
        # weights_only=False: the checkpoint also holds the data generator state and the config; only
        # load checkpoints this command wrote.
        # Loaded to the CPU: the RNG states must stay CPU ByteTensors (set_state rejects CUDA tensors), and
        # load_state_dict copies weights and optimizer state to the model's device.
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        changed = {k for k, v in asdict(cfg).items() if ckpt["config"].get(k) != v} - {"epochs", "progress"}
        if changed:
            warnings.warn(f"--resume with settings other than the checkpoint's ({sorted(changed)}): the "
                          "restored optimizer and lr schedule keep the checkpoint's",
                          UserWarning, stacklevel=2)
        model.load_state_dict(ckpt["model"])  # the scheduler's RNG rides along in the metadata
        optimizer.load_state_dict(ckpt["optimizer"])
        lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        data_rng.set_state(ckpt["data_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        random.setstate(ckpt["python_rng"])
        start_epoch = ckpt["epoch"]
    else:
        for stale in ("log.csv", "steps.csv"):
            (run_dir / stale).unlink(missing_ok=True)

    train_x, train_y = data.train_x, data.train_y
    n = len(train_y)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=data_rng)
        loss_sum, wrong, seen, step_rows = 0.0, 0, 0, []
        bar = _progress(steps_per_epoch, f"{name} epoch {epoch + 1}/{cfg.epochs}", cfg.progress)
        t0 = time.perf_counter()
        for step in range(steps_per_epoch):
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            xb = augment(train_x[idx], data_rng).to(device, non_blocking=True)
            yb = train_y[idx].to(device, non_blocking=True)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())  # one sync per step; the loss is logged per step anyway
            loss_sum += loss_value * len(idx)
            wrong += int((logits.argmax(1) != yb).sum())
            seen += len(idx)
            step_rows.append({"epoch": epoch + 1, "step": step, "loss": loss_value})
            if bar is not None:
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", err=f"{wrong / seen:.3f}",
                                img_s=f"{seen / max(elapsed, 1e-9):.0f}")
                bar.update(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_time = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        lr = optimizer.param_groups[0]["lr"]
        lr_scheduler.step()
        test_loss, test_error = evaluate(model, data.test_x, data.test_y)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "train_error": wrong / seen,
               "test_loss": test_loss, "test_error": test_error, "epoch_time_s": epoch_time,
               "images_per_s": seen / epoch_time}
        _append_csv(run_dir / "log.csv", LOG_FIELDS, [row])
        _append_csv(run_dir / "steps.csv", ["epoch", "step", "loss"], step_rows)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(), "data_rng": data_rng.get_state(),
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                    "epoch": epoch + 1, "config": asdict(cfg)}, checkpoint_path)
    return model, _read_log(run_dir / "log.csv")


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in requirements.txt
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------------------
# Lesion study (Veit, Wilber, Belongie 2016)
# ----------------------------------------------------------------------------------------------------------
def lesion_study(model: torch.nn.Module, data: Dataset, draws: int, seed: int) -> dict:
    """Test error with each single block deleted, and with k random blocks deleted (k = 1..L/2)."""
    from .convert import find_residual_blocks, lesion

    num_blocks = len(find_residual_blocks(model))
    downsampling = [l for l, b in enumerate(find_residual_blocks(model)) if b.downsample is not None]
    _, base_error = evaluate(model, data.test_x, data.test_y)
    single = []
    for l in range(num_blocks):
        with lesion(model, drop=[l]):
            single.append(evaluate(model, data.test_x, data.test_y)[1])
    rng = random.Random(seed)
    by_k = {}
    for k in range(1, num_blocks // 2 + 1):
        errors = []
        for _ in range(draws):
            with lesion(model, drop=sorted(rng.sample(range(num_blocks), k))):
                errors.append(evaluate(model, data.test_x, data.test_y)[1])
        by_k[k] = errors
    return {"base_error": base_error, "single": single, "random_k": by_k, "downsampling": downsampling}


# ----------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_error_curves(logs: dict[str, list[dict]], path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"constant": ("tab:blue", "constant depth"), "stochastic": ("tab:red", "stochastic depth")}
    for name, log in logs.items():
        color, label = styles[name]
        epochs = [r["epoch"] for r in log]
        ax.plot(epochs, [100 * r["test_error"] for r in log], color=color, label=f"{label}: test")
        ax.plot(epochs, [100 * r["train_error"] for r in log], color=color, ls="--", alpha=0.6,
                label=f"{label}: train")
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lesion(studies: dict[str, dict], path: Path) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"constant": "tab:blue", "stochastic": "tab:red"}
    for name, st in studies.items():
        blocks = list(range(1, len(st["single"]) + 1))
        left.plot(blocks, [100 * e for e in st["single"]], "o-", ms=3, color=colors[name], label=name)
        left.axhline(100 * st["base_error"], color=colors[name], ls=":", alpha=0.7)
        for l in st["downsampling"]:
            left.plot(l + 1, 100 * st["single"][l], "s", ms=7, mfc="none", color=colors[name])
        ks = sorted(st["random_k"], key=int)
        means = [100 * sum(st["random_k"][k]) / len(st["random_k"][k]) for k in ks]
        lo = [100 * min(st["random_k"][k]) for k in ks]
        hi = [100 * max(st["random_k"][k]) for k in ks]
        right.plot([int(k) for k in ks], means, "o-", ms=3, color=colors[name], label=name)
        right.fill_between([int(k) for k in ks], lo, hi, color=colors[name], alpha=0.15)
    left.set_xlabel("deleted block (squares: downsampling blocks; dotted: no deletion)")
    left.set_ylabel("test error (%)")
    left.set_title("deleting one block")
    right.set_xlabel("number of random blocks deleted")
    right.set_ylabel("test error (%)")
    right.set_title("deleting k random blocks (mean, min-max)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def _parse_args(argv) -> tuple[TrainConfig, Path, bool]:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m sdepth_ext.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="digits", choices=DATASETS,
                   help="digits: scikit-learn's bundled 8x8 digits upsampled to 32x32 (offline)")
    p.add_argument("--data-dir", default=None, help="folder with the extracted CIFAR python archive")
    p.add_argument("--depth", type=int, default=110 if cuda else 20, help="6n+2 (110 on GPU, 20 on CPU)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--schedule", default="step", choices=SCHEDULES)
    p.add_argument("--milestones", default="", help="step schedule epochs, e.g. 250,375 (default 50%%,75%%)")
    p.add_argument("--p-last", type=float, default=0.5)
    p.add_argument("--mode", default="batch", choices=("batch", "row"))
    p.add_argument("--scaling", default="paper", choices=("paper", "inverted"))
    p.add_argument("--runs", default="constant,stochastic", help="comma list of: constant, stochastic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--subset", type=int, default=None, help="use only the first N training images")
    p.add_argument("--lesion-draws", type=int, default=5, help="random draws per k in the lesion study")
    p.add_argument("--no-lesion", action="store_true", help="skip the lesion study")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue each run from its checkpoint")
    p.add_argument("--out", default="runs/sdepth", help="output folder")
    a = p.parse_args(argv)

    def fail(msg: str):
        p.error(msg)  # exits with status 2 and the usage line

    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    if not runs or any(r not in RUNS for r in runs):
        fail(f"--runs must be a comma list of {RUNS}, got {a.runs!r}")
    if a.depth < 8 or (a.depth - 2) % 6:
        fail(f"--depth must be 6n+2 with n >= 1 (8, 14, 20, ..., 110), got {a.depth}")
    if a.epochs < 1 or a.batch_size < 1:
        fail("--epochs and --batch-size must be >= 1")
    if not (a.lr > 0 and math.isfinite(a.lr)):
        fail(f"--lr must be a positive number, got {a.lr}")
    if not 0.0 <= a.p_last <= 1.0:
        fail(f"--p-last must be in [0, 1], got {a.p_last}")
    if a.subset is not None and a.subset < 1:
        fail(f"--subset must be >= 1, got {a.subset}")
    try:
        milestones = [int(m) for m in a.milestones.split(",") if m.strip()]
    except ValueError:
        fail(f"--milestones must be a comma list of epochs, got {a.milestones!r}")
    if a.device.startswith("cuda") and not cuda:
        fail(f"--device {a.device}: CUDA is not available on this machine (use --device cpu)")
    cfg = TrainConfig(data=a.data, data_dir=a.data_dir, depth=a.depth, epochs=a.epochs,
                      batch_size=a.batch_size, lr=a.lr, schedule=a.schedule, milestones=milestones,
                      p_last=a.p_last, mode=a.mode, scaling=a.scaling, seed=a.seed, device=a.device,
                      subset=a.subset, runs=runs, lesion=not a.no_lesion, lesion_draws=a.lesion_draws,
                      progress=not a.no_progress)
    return cfg, Path(a.out), a.resume


def main(argv=None) -> dict:
    cfg, out_dir, resume = _parse_args(argv)
    try:
        data = load_dataset(cfg.data, cfg.data_dir)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    if cfg.subset is not None:
        data = data.subset(cfg.subset, max(1, cfg.subset // 3))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"data={cfg.data}: {len(data.train_y)} train / {len(data.test_y)} test images; "
          f"cifar_resnet({cfg.depth}) on {cfg.device}; runs={cfg.runs}; out={out_dir}")

    models, logs = {}, {}
    for name in cfg.runs:
        models[name], logs[name] = train_run(cfg, data, name, out_dir, resume=resume)
        last = logs[name][-1]
        print(f"{name}: test error {100 * last['test_error']:.2f}% after {int(last['epoch'])} epochs, "
              f"{sum(r['epoch_time_s'] for r in logs[name]):.1f} s of training")

    summary: dict = {"environment": environment(torch.device(cfg.device)), "config": asdict(cfg), "runs": {}}
    for name, log in logs.items():
        summary["runs"][name] = {
            "final_test_error": log[-1]["test_error"], "best_test_error": min(r["test_error"] for r in log),
            "mean_epoch_time_s": sum(r["epoch_time_s"] for r in log) / len(log), "epochs": len(log)}
    if "stochastic" in models:
        example = data.test_x[:1].to(cfg.device)
        survival = survival_probs(models["stochastic"])
        summary["ideal_time_ratio"] = expected_compute_fraction(models["stochastic"], example, survival)
        if "constant" in logs:
            # the first epoch carries one-time warm-up costs (allocator, kernel selection)
            def steady(log):
                return [r["epoch_time_s"] for r in (log[1:] if len(log) > 1 else log)]

            sd_t, c_t = steady(logs["stochastic"]), steady(logs["constant"])
            summary["measured_time_ratio"] = (sum(sd_t) / len(sd_t)) / (sum(c_t) / len(c_t))
            print(f"time per epoch, stochastic / constant: {summary['measured_time_ratio']:.3f} "
                  f"(ideal {summary['ideal_time_ratio']:.3f}, the expected share of FLOPs that runs)")
    plot_error_curves(logs, out_dir / "error_curves.png",
                      f"cifar_resnet({cfg.depth}) on {cfg.data}, p_last={cfg.p_last}")
    if cfg.lesion:
        studies = {name: lesion_study(m, data, cfg.lesion_draws, cfg.seed) for name, m in models.items()}
        plot_lesion(studies, out_dir / "lesion.png")
        summary["lesion"] = studies
    with open(out_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {out_dir}/summary.json, error_curves.png" + (", lesion.png" if cfg.lesion else ""))
    return summary


if __name__ == "__main__":
    main()
