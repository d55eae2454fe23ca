"""One training run: the model, SGD, the epoch loop, evaluation, and the checkpoint that is the run's truth.

Per epoch the loop reads the device once: losses and error counts accumulate in device tensors (the
per-step losses in one tensor, for ``steps.csv``) and are copied to the host after the last step. On a GPU
the dataset lives on the device and is shuffled and augmented there with a CUDA generator, so the time of
an epoch is the model's, not a loader's.

After each epoch, in this order and with Ctrl-C / SIGTERM held back until done:

1. ``checkpoint.pt`` is replaced atomically (:func:`~sdepth_ext.train.files.atomic_torch_save`). It holds
   the model (with the stochastic-depth scheduler's RNG in its state_dict metadata), the optimizer, the
   data generator, torch's and Python's RNG states, the settings, the epoch, and every row of ``log.csv``
   and ``steps.csv`` so far;
2. ``log.csv`` is rewritten atomically from those rows and the epoch's rows are appended to ``steps.csv``.

The CSVs are thus never ahead of the checkpoint. A kill between 1 and 2 leaves them one epoch behind, and
``--resume`` rewrites both from the checkpoint before it continues, so every epoch appears exactly once,
wherever the run was killed. A resumed run is bit-identical to an uninterrupted one on the CPU (tested).
"""

from __future__ import annotations

import hashlib
import math
import random
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import cifar_resnet, compute_stats, convert, set_drop_scale, set_dropped_grads
from ..data import Dataset, augment
from .config import (
    DATA_BOUND_SHARE,
    FIXED_ON_RESUME,
    LOG_FIELDS,
    STEP_FIELDS,
    TrainConfig,
    describe_setting,
    device_kind,
    lr_at,
    parse_drop_schedule,
)
from .files import append_csv, atomic_torch_save, atomic_write_csv, remove_temporaries
from .interrupts import deferred_interrupts

__all__ = ["ResumeError", "build_model", "evaluate", "train_run", "plan_resume", "load_checkpoint",
           "data_fingerprint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 2  # 1: before the checkpoint held the log rows (not resumable)
RUN_FILES = ("checkpoint.pt", "log.csv", "steps.csv")


class ResumeError(ValueError):
    """``--resume`` cannot continue this run; the message is one line and names what differs."""


def build_model(cfg: TrainConfig, num_classes: int, stochastic: bool, device: torch.device):
    torch.manual_seed(cfg.seed)  # the same initial weights for both runs
    model = cifar_resnet(cfg.depth, num_classes)
    if stochastic:
        convert(model, p_last=cfg.p_last, rule="linear", mode=cfg.mode, scaling=cfg.scaling, seed=cfg.seed)
        set_dropped_grads(model, cfg.dropped_grads)
    return model.to(device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500
             ) -> tuple[float, float]:
    """(mean cross-entropy, error rate) in eval mode; restores the model's train/eval mode.

    The sums stay on the device and are read once, at the end.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
        wrong += (logits.argmax(1) != yb).sum()
    model.train(was_training)
    total_loss, total_wrong = torch.stack([loss_sum, wrong.double()]).tolist()
    return total_loss / max(1, len(y)), total_wrong / max(1, len(y))


def data_fingerprint(data: Dataset) -> dict:
    """Sizes and a hash of the labels and of a sample of the pixels: enough to tell other data apart."""
    h = hashlib.sha256()
    for t in (data.train_y, data.test_y, data.train_x.reshape(-1)[::997], data.test_x.reshape(-1)[::997]):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return {"name": data.name, "train": len(data.train_y), "test": len(data.test_y),
            "num_classes": data.num_classes, "sha256": h.hexdigest()[:16]}


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint of this command (weights_only=False: it also holds RNG states and settings; only
    load checkpoints this command wrote). Loaded to the CPU: RNG states must stay CPU ByteTensors, and
    ``load_state_dict`` copies weights and optimizer state to the model's device."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure to read is reported the same way
        raise ResumeError(f"--resume: cannot read {path}: {type(err).__name__}: {err}".splitlines()[0]
                          ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ResumeError(f"--resume: {path} was written by an older sdepth_ext.train (it lacks the log "
                          "rows this version resumes from); start the run again without --resume")
    return ckpt


def check_resumable(cfg: TrainConfig, ckpt: dict, name: str, path: Path, fingerprint: dict) -> None:
    """Raise :class:`ResumeError` if ``cfg`` would continue ``ckpt`` as a different experiment."""
    if ckpt["run"] != name:
        raise ResumeError(f"--resume: {path} holds the {ckpt['run']} run, not the {name} run")
    saved = ckpt["config"]
    for key, option in FIXED_ON_RESUME.items():
        old, new = saved.get(key), getattr(cfg, key)
        if key == "device":
            old, new = device_kind(old), device_kind(new)
        if key == "drop_schedule":  # checkpoints of before the option trained without a schedule
            old = "constant" if old is None else old
        if key == "dropped_grads":  # checkpoints of before the option: dropped blocks got no gradient
            old = "none" if old is None else old
        if old != new:
            raise ResumeError(f"--resume: {option} is {describe_setting(key, old)} in {path}, got "
                              f"{describe_setting(key, new)} (only --epochs may change on --resume)")
    if ckpt["data"] != fingerprint:
        raise ResumeError(f"--resume: the data differ from those {path} was trained on (checkpoint: "
                          f"{ckpt['data']}, now: {fingerprint}); check --data-dir")
    if cfg.epochs < ckpt["epoch"]:
        raise ResumeError(f"--resume: --epochs is {cfg.epochs}, but {path} has already trained "
                          f"{ckpt['epoch']} epochs (use --epochs {ckpt['epoch']} or more)")


def plan_resume(cfg: TrainConfig, data: Dataset, out_dir: Path) -> dict[str, bool]:
    """For ``--resume``: which runs continue from a checkpoint (True) and which start (False).

    Checks every run before anything is written: a run whose checkpoint differs in a fixed setting, a run
    with logs but no checkpoint, or an output folder with no checkpoint at all raise :class:`ResumeError`.
    A run without a checkpoint or logs never finished an epoch (e.g. the second of a pair, when the first
    was interrupted) and starts from the beginning.
    """
    out_dir = Path(out_dir)
    fingerprint = data_fingerprint(data)
    plan = {}
    for name in cfg.runs:
        run_dir = out_dir / name
        path = run_dir / "checkpoint.pt"
        if path.is_file():
            check_resumable(cfg, load_checkpoint(path), name, path, fingerprint)
            plan[name] = True
            continue
        logs = [f for f in ("log.csv", "steps.csv") if (run_dir / f).exists()]
        if logs:
            raise ResumeError(f"--resume: {run_dir} has {' and '.join(logs)} but no checkpoint.pt to "
                              "resume from; move the folder away or run without --resume to start over")
        plan[name] = False
    if not any(plan.values()):
        where = ", ".join(str(out_dir / name / "checkpoint.pt") for name in cfg.runs)
        raise ResumeError(f"--resume: nothing to resume, no checkpoint at {where} (no epoch has finished "
                          "yet); run the same command without --resume to start")
    return plan


def _step_rows(epoch: int, losses: list[float]) -> list[dict]:
    return [{"epoch": epoch, "step": step, "loss": loss} for step, loss in enumerate(losses)]


def _write_logs(run_dir: Path, log_rows: list[dict], step_losses: list[torch.Tensor]) -> None:
    """log.csv and steps.csv rewritten from the checkpoint's rows, atomically."""
    atomic_write_csv(run_dir / "log.csv", LOG_FIELDS, log_rows)
    rows = [row for e, losses in enumerate(step_losses) for row in _step_rows(e + 1, losses.tolist())]
    atomic_write_csv(run_dir / "steps.csv", STEP_FIELDS, rows)


def _schedule_words(cfg: TrainConfig) -> str:
    if cfg.schedule == "cosine":
        return f"cosine over {cfg.epochs} epochs"
    ms = cfg.step_milestones()
    return f"lr / 10 after epochs {','.join(map(str, ms))}" if ms else "no lr drops"


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in requirements.txt
        return None
    return tqdm(total=total, desc=desc, unit="step", leave=True, dynamic_ncols=True)


def train_run(cfg: TrainConfig, data: Dataset, name: str, out_dir: Path, resume: bool = False
              ) -> tuple[torch.nn.Module, list[dict]]:
    """Train one run (``name`` in RUNS) up to ``cfg.epochs`` epochs; returns the model and its epoch log.

    ``resume=True`` continues from ``out_dir/name/checkpoint.pt`` and raises :class:`ResumeError` (nothing
    written) if there is none or it was trained with other fixed settings; otherwise the run starts over
    and its old files are removed.
    """
    device = torch.device(cfg.device)
    run_dir = Path(out_dir) / name
    checkpoint_path = run_dir / "checkpoint.pt"
    fingerprint = data_fingerprint(data)
    ckpt = None
    if resume:
        if not checkpoint_path.is_file():
            raise ResumeError(f"--resume: no checkpoint at {checkpoint_path}; run without --resume to start")
        ckpt = load_checkpoint(checkpoint_path)
        check_resumable(cfg, ckpt, name, checkpoint_path, fingerprint)

    data = data.to(device)
    model = build_model(cfg, data.num_classes, name == "stochastic", device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=True)
    # Data order and augmentation only; on the data's device so that shuffling and cropping stay there.
    data_rng = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(run_dir)
    log_rows: list[dict] = []
    step_losses: list[torch.Tensor] = []  # per epoch, float32 on the CPU
    start_epoch = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])  # the scheduler's RNG rides along in the metadata
        optimizer.load_state_dict(ckpt["optimizer"])
        data_rng.set_state(ckpt["data_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        random.setstate(ckpt["python_rng"])
        start_epoch, log_rows, step_losses = ckpt["epoch"], list(ckpt["log"]), list(ckpt["step_losses"])
        _write_logs(run_dir, log_rows, step_losses)  # the checkpoint is the truth: drop rows beyond it
        follows_epochs = cfg.schedule == "cosine" or not cfg.milestones
        if ckpt["config"]["epochs"] != cfg.epochs and start_epoch < cfg.epochs and follows_epochs:
            print(f"{name}: --epochs {ckpt['config']['epochs']} -> {cfg.epochs}: the lr schedule is rebuilt "
                  f"for {cfg.epochs} epochs ({_schedule_words(cfg)}); epoch {start_epoch + 1} runs at lr "
                  f"{lr_at(cfg, start_epoch):.4g}", flush=True)
    else:
        for stale in RUN_FILES:
            (run_dir / stale).unlink(missing_ok=True)

    train_x, train_y = data.train_x, data.train_y
    n = len(train_y)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    sizes = [min(cfg.batch_size, n - s * cfg.batch_size) for s in range(steps_per_epoch)]
    stochastic = name == "stochastic"
    schedule = parse_drop_schedule(cfg.drop_schedule) if stochastic else None
    warned_data_bound = False
    for epoch in range(start_epoch, cfg.epochs):
        lr = lr_at(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        perm = torch.randperm(n, generator=data_rng, device=device)
        losses = torch.zeros(steps_per_epoch, dtype=torch.float32, device=device)
        wrong = torch.zeros((), dtype=torch.int64, device=device)
        bar = _progress(steps_per_epoch, f"{name} {epoch + 1}/{cfg.epochs}", cfg.progress)
        if stochastic:
            compute_stats(model, example_input=train_x[:1], reset=True)  # the epoch's own count from here
        try:
            t0 = time.perf_counter()
            data_time = 0.0
            for step in range(steps_per_epoch):
                if schedule is not None:  # a pure function of the step: a resumed run continues exactly
                    set_drop_scale(model, schedule(epoch * steps_per_epoch + step))
                data_start = time.perf_counter()
                idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                xb = augment(train_x[idx], data_rng)
                yb = train_y[idx]
                data_time += time.perf_counter() - data_start
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses[step] = loss.detach()
                wrong += (logits.argmax(1) != yb).sum()
                if bar is not None:  # host-side numbers only: nothing here waits for the device
                    seen = (step + 1) * cfg.batch_size if step + 1 < steps_per_epoch else n
                    bar.set_postfix(img_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.0f}", refresh=False)
                    bar.update(1)
            # The one read of the epoch (it also waits for the device, so the time below is complete).
            totals = torch.cat([losses.double(), wrong.double().view(1)]).cpu()
            epoch_time = time.perf_counter() - t0
            epoch_losses = totals[:-1].float()
            loss_values = epoch_losses.tolist()
            test_loss, test_error = evaluate(model, data.test_x, data.test_y)
            work = compute_stats(model) if stochastic else None
            row = {"epoch": epoch + 1, "lr": lr,
                   "train_loss": sum(v * s for v, s in zip(loss_values, sizes)) / n,
                   "train_error": float(totals[-1]) / n, "test_loss": test_loss, "test_error": test_error,
                   "epoch_time_s": epoch_time, "images_per_s": n / epoch_time,
                   "drop_scale": schedule(epoch * steps_per_epoch + steps_per_epoch - 1) if schedule else 1.0,
                   "work_ran": work["cumulative"] if work else 1.0,
                   "work_expected": work["expected"] if work else 1.0, "data_time_s": data_time}
            if data_time > DATA_BOUND_SHARE * epoch_time and not warned_data_bound:
                warned_data_bound = True
                warnings.warn(
                    f"{name}: data-loader-bound: {100 * data_time / epoch_time:.0f}% of epoch {epoch + 1}'s "
                    "time went to producing batches; the compute saved cannot shorten the step",
                    UserWarning, stacklevel=2)
            with deferred_interrupts():
                log_rows.append(row)
                step_losses.append(epoch_losses)
                state = {"format": CHECKPOINT_FORMAT, "run": name, "epoch": epoch + 1,
                         "config": asdict(cfg), "data": fingerprint, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(),
                         "data_rng": data_rng.get_state(), "torch_rng": torch.get_rng_state(),
                         "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                         "python_rng": random.getstate(), "log": log_rows, "step_losses": step_losses}
                atomic_torch_save(state, checkpoint_path)
                atomic_write_csv(run_dir / "log.csv", LOG_FIELDS, log_rows)
                append_csv(run_dir / "steps.csv", STEP_FIELDS, _step_rows(epoch + 1, loss_values))
            if bar is not None:
                bar.set_postfix(loss=f"{row['train_loss']:.4f}", err=f"{row['train_error']:.4f}",
                                test_err=f"{test_error:.4f}", img_s=f"{row['images_per_s']:.0f}",
                                refresh=False)
            else:
                print(f"{name} epoch {epoch + 1}/{cfg.epochs}: lr {lr:.4g}, "
                      f"train loss {row['train_loss']:.4f}, train error {100 * row['train_error']:.2f}%, "
                      f"test error {100 * test_error:.2f}%, "
                      f"{epoch_time:.2f} s, {row['images_per_s']:.0f} images/s", flush=True)
        finally:
            if bar is not None:
                bar.close()
    return model, log_rows
