"""--resume: the checkpoint is the truth (written atomically, logs never ahead of it), settings that cannot
change are refused, --epochs rebuilds the lr schedule, and a missing checkpoint is an error (CPU, tiny)."""

import json
import os
import shutil

import pytest
import torch

from sdepth_ext import train
from sdepth_ext.train import files as train_files

TINY = ["--depth", "8", "--subset", "48", "--batch-size", "16", "--no-progress", "--lesion-draws", "1",
        "--device", "cpu"]
BASE = [*TINY, "--runs", "stochastic", "--no-lesion"]


def read_csv(path):
    return train_files.read_csv(path)


def epochs_of(path):
    return [int(r["epoch"]) for r in read_csv(path)]


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def steps_and_errors(run_dir):
    steps = [(r["epoch"], r["step"], r["loss"]) for r in read_csv(run_dir / "steps.csv")]
    log = [(r["epoch"], r["lr"], r["train_loss"], r["test_error"]) for r in read_csv(run_dir / "log.csv")]
    return steps, log


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A stochastic run of 1 epoch (checkpoint, logs, summary), copied by the tests that change it."""
    out = tmp_path_factory.mktemp("one_epoch")
    cpu_state = torch.get_rng_state()
    train.main([*BASE, "--epochs", "1", "--out", str(out)])
    torch.set_rng_state(cpu_state)
    return out


@pytest.fixture
def trained(one_epoch, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_epoch, out)
    return out


def resume_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------------------------------------
# Settings that cannot change
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, old, new", [
    ("--depth", "8", "14"),
    ("--mode", "batch", "row"),
    ("--scaling", "paper", "inverted"),
    ("--p-last", "0.5", "0.3"),
    ("--batch-size", "16", "8"),
    ("--seed", "0", "3"),
    ("--lr", "0.1", "0.05"),
    ("--momentum", "0.9", "0.5"),
    ("--weight-decay", "0.0001", "0.001"),
    ("--schedule", "step", "cosine"),
    ("--milestones", "the default (50% and 75% of --epochs)", "1"),
    ("--subset", "48", "40"),
])
def test_resume_refuses_a_changed_setting(trained, capsys, restore_rng_state, option, old, new):
    before = snapshot(trained)
    line = resume_error([*BASE, "--epochs", "2", "--out", str(trained), "--resume", option, new], capsys)
    assert option in line and f"is {old} in" in line and f"got {new}" in line
    assert snapshot(trained) == before  # the folder is left as it was


def _write_cifar10(folder, label_shift):
    import pickle

    import numpy as np

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 "labels": ((rng.integers(0, 10, 4) + label_shift) % 10).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_resume_refuses_other_data_at_the_same_option_values(tmp_path, capsys, restore_rng_state):
    _write_cifar10(tmp_path / "a" / "cifar-10-batches-py", 0)
    _write_cifar10(tmp_path / "b" / "cifar-10-batches-py", 1)
    args = [*BASE, "--data", "cifar10", "--subset", "20", "--out", str(tmp_path / "run")]
    train.main([*args, "--epochs", "1", "--data-dir", str(tmp_path / "a")])
    line = resume_error([*args, "--epochs", "2", "--data-dir", str(tmp_path / "b"), "--resume"], capsys)
    assert "data differ" in line and "--data-dir" in line
    # the same files elsewhere are fine: --data-dir itself may change
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    train.main([*args, "--epochs", "2", "--data-dir", str(tmp_path / "moved"), "--resume"])
    assert epochs_of(tmp_path / "run" / "stochastic" / "log.csv") == [1, 2]


def test_resume_refuses_a_checkpoint_of_the_other_run(trained, capsys, restore_rng_state):
    shutil.copytree(trained / "stochastic", trained / "constant")
    line = resume_error([*TINY, "--runs", "constant", "--no-lesion", "--epochs", "2", "--out", str(trained),
                         "--resume"], capsys)
    assert "holds the stochastic run, not the constant run" in line


def test_resume_refuses_fewer_epochs_than_trained(trained, capsys, restore_rng_state):
    train.main([*BASE, "--epochs", "2", "--out", str(trained), "--resume"])
    line = resume_error([*BASE, "--epochs", "1", "--out", str(trained), "--resume"], capsys)
    assert "--epochs is 1" in line and "already trained 2 epochs" in line


# ----------------------------------------------------------------------------------------------------------
# --resume without a checkpoint
# ----------------------------------------------------------------------------------------------------------
def test_resume_without_any_checkpoint_is_an_error_and_writes_nothing(tmp_path, capsys):
    line = resume_error([*BASE, "--epochs", "2", "--out", str(tmp_path / "new"), "--resume"], capsys)
    assert "nothing to resume" in line and "without --resume" in line
    assert not (tmp_path / "new").exists()


def test_resume_with_logs_but_no_checkpoint_keeps_the_logs(trained, capsys):
    (trained / "stochastic" / "checkpoint.pt").unlink()
    before = snapshot(trained)
    line = resume_error([*BASE, "--epochs", "2", "--out", str(trained), "--resume"], capsys)
    assert "log.csv and steps.csv but no checkpoint.pt" in line
    assert snapshot(trained) == before


def test_resume_starts_a_run_that_never_finished_an_epoch(trained, restore_rng_state):
    """The second run of a pair has no files when the first was interrupted: it starts from epoch 1."""
    train.main([*TINY, "--no-lesion", "--runs", "stochastic,constant", "--epochs", "1", "--out", str(trained),
                "--resume"])
    assert epochs_of(trained / "constant" / "log.csv") == [1]
    assert epochs_of(trained / "stochastic" / "log.csv") == [1]


def test_resume_of_a_finished_run_trains_nothing_and_rewrites_the_summary(trained, restore_rng_state):
    log = (trained / "stochastic" / "log.csv").read_bytes()
    (trained / "summary.json").unlink()
    summary = train.main([*BASE, "--epochs", "1", "--out", str(trained), "--resume"])
    assert summary["runs"]["stochastic"]["epochs"] == 1
    assert (trained / "stochastic" / "log.csv").read_bytes() == log
    assert json.loads((trained / "summary.json").read_text())["runs"]["stochastic"]["epochs"] == 1


# ----------------------------------------------------------------------------------------------------------
# --epochs on resume: the lr schedule follows the new total
# ----------------------------------------------------------------------------------------------------------
def test_default_milestones_are_distinct_and_leave_room():
    assert train.default_milestones(1) == []
    assert train.default_milestones(2) == [1]
    assert train.default_milestones(3) == [1, 2]
    assert train.default_milestones(4) == [2, 3]
    assert train.default_milestones(40) == [20, 30]
    assert train.default_milestones(500) == [250, 375]
    for epochs in range(1, 60):
        ms = train.default_milestones(epochs)
        assert ms == sorted(set(ms)) and all(1 <= m < epochs for m in ms)


def test_two_epochs_drop_the_lr_once_not_100x(tmp_path, restore_rng_state):
    train.main([*BASE, "--epochs", "2", "--out", str(tmp_path)])
    lrs = [float(r["lr"]) for r in read_csv(tmp_path / "stochastic" / "log.csv")]
    assert lrs == pytest.approx([0.1, 0.01])


def test_growing_epochs_rebuilds_the_step_schedule(tmp_path, capsys, restore_rng_state):
    train.main([*BASE, "--epochs", "4", "--out", str(tmp_path)])  # milestones 2, 3
    train.main([*BASE, "--epochs", "8", "--out", str(tmp_path), "--resume"])  # milestones 4, 6
    assert "--epochs 4 -> 8: the lr schedule is rebuilt for 8 epochs" in capsys.readouterr().out
    lrs = [float(r["lr"]) for r in read_csv(tmp_path / "stochastic" / "log.csv")]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.01, 0.01, 0.001, 0.001])
    assert epochs_of(tmp_path / "stochastic" / "log.csv") == list(range(1, 9))


def test_growing_epochs_rebuilds_the_cosine_schedule(tmp_path, restore_rng_state):
    args = [*BASE, "--schedule", "cosine", "--out", str(tmp_path)]
    train.main([*args, "--epochs", "2"])
    train.main([*args, "--epochs", "4", "--resume"])
    cfg4 = train.TrainConfig(schedule="cosine", epochs=4)
    lrs = [float(r["lr"]) for r in read_csv(tmp_path / "stochastic" / "log.csv")]
    assert lrs[2:] == pytest.approx([train.lr_at(cfg4, 2), train.lr_at(cfg4, 3)])
    assert min(lrs) > 0.01  # the old schedule (T_max 2) reached 0.0 at epoch 3


def test_growing_epochs_from_a_shared_prefix_matches_a_straight_run(tmp_path, restore_rng_state):
    """1 epoch, then --epochs 3: epoch 1 had the same lr as in a 3-epoch run, so everything is identical."""
    train.main([*BASE, "--epochs", "3", "--out", str(tmp_path / "straight")])
    train.main([*BASE, "--epochs", "1", "--out", str(tmp_path / "resumed")])
    train.main([*BASE, "--epochs", "3", "--out", str(tmp_path / "resumed"), "--resume"])
    assert steps_and_errors(tmp_path / "resumed" / "stochastic") == \
        steps_and_errors(tmp_path / "straight" / "stochastic")


# ----------------------------------------------------------------------------------------------------------
# The checkpoint is written atomically and the logs are never ahead of it
# ----------------------------------------------------------------------------------------------------------
class Crash(Exception):
    pass


def crashing_save(monkeypatch, call, when):
    """torch.save fails at its ``call``-th call: before writing anything, or half-way through."""
    original = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            if when == "before":
                raise Crash
            if when == "half":
                import io

                buf = io.BytesIO()
                original(obj, buf, *args, **kwargs)
                data = buf.getvalue()
                if isinstance(f, (str, os.PathLike)):
                    with open(f, "wb") as fh:
                        fh.write(data[:len(data) // 2])
                else:
                    f.write(data[:len(data) // 2])
                raise Crash
        original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def crash_after_checkpoint(monkeypatch, call):
    """The ``call``-th checkpoint is complete and in place, then the run dies (before its logs)."""
    original = os.replace
    calls = []

    def replace(src, dst):
        original(src, dst)
        if os.path.basename(dst) == "checkpoint.pt":
            calls.append(1)
            if len(calls) == call:
                raise Crash

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("when", ["before", "half", "after"])
def test_a_failed_save_leaves_a_loadable_checkpoint_and_consistent_logs(tmp_path, monkeypatch,
                                                                        restore_rng_state, when):
    train.main([*BASE, "--epochs", "3", "--out", str(tmp_path / "straight")])
    run = tmp_path / "crashed"
    with monkeypatch.context() as m:
        if when == "after":
            crash_after_checkpoint(m, 2)
        else:
            crashing_save(m, 2, when)
        with pytest.raises(Crash):
            train.main([*BASE, "--epochs", "3", "--out", str(run)])
    ckpt = torch.load(run / "stochastic" / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == (2 if when == "after" else 1)
    assert not [p.name for p in (run / "stochastic").iterdir() if ".tmp-" in p.name]
    # the logs never run ahead of the checkpoint
    logged = epochs_of(run / "stochastic" / "log.csv")
    assert logged == list(range(1, len(logged) + 1)) and len(logged) <= ckpt["epoch"]
    train.main([*BASE, "--epochs", "3", "--out", str(run), "--resume"])
    assert epochs_of(run / "stochastic" / "log.csv") == [1, 2, 3]
    assert steps_and_errors(run / "stochastic") == steps_and_errors(tmp_path / "straight" / "stochastic")


def test_summary_and_logs_are_replaced_atomically(tmp_path, monkeypatch, restore_rng_state):
    replaced = []
    original = os.replace

    def record(src, dst):
        replaced.append((os.fspath(src), os.fspath(dst)))
        return original(src, dst)

    monkeypatch.setattr(os, "replace", record)
    train.main([*BASE, "--epochs", "1", "--out", str(tmp_path)])
    targets = {os.path.relpath(dst, tmp_path) for _, dst in replaced}
    assert {"summary.json", "error_curves.png", os.path.join("stochastic", "checkpoint.pt"),
            os.path.join("stochastic", "log.csv")} <= targets
    for src, dst in replaced:
        assert os.path.dirname(src) == os.path.dirname(dst) and ".tmp-" in os.path.basename(src)


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def fail(f):
        f.write(b"partial")
        raise Crash

    with pytest.raises(Crash):
        train_files.atomic_write(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    train_files.atomic_write_text(path, "new")
    assert path.read_text() == "new"
