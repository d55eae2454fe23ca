"""Fault injection on the real training command (subprocesses, CPU, tiny runs): SIGKILL inside and around
the checkpoint's torch.save, SIGKILL at random points of epochs in batch and row mode, Ctrl-C and SIGTERM.

After every fault, resuming (with the command the interrupted run printed, where it printed one) must give
the same steps.csv and log.csv, bit for bit, as an uninterrupted run, with every epoch exactly once.
"""

import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdepth_ext.train.files import read_csv

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
EPOCHS = 4
ARGS = ["--depth", "8", "--subset", "96", "--batch-size", "8", "--no-progress", "--no-lesion",
        "--runs", "stochastic", "--device", "cpu", "--epochs", str(EPOCHS)]
COMMAND = [sys.executable, "-m", "sdepth_ext.train"]
TIMEOUT = 300

# Runs the command with torch.save replaced: at its N-th call the process SIGKILLs itself before writing
# (SD_FAULT=before) or after writing half of the bytes (during); or it SIGKILLs itself as soon as the N-th
# checkpoint is complete on disk (after): once torch.save returns for a save straight to the file, or
# once os.replace has put the new checkpoint.pt in place for an atomic one.
KILL_IN_SAVE = """
import io, os, signal, sys
import torch
mode, target = os.environ["SD_FAULT"], int(os.environ["SD_FAULT_CALL"])
original_save, original_replace, calls, done = torch.save, os.replace, [0], [0]

def complete():
    done[0] += 1
    if done[0] == target and mode == "after":
        os.kill(os.getpid(), signal.SIGKILL)

def save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == target and mode == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    if calls[0] == target and mode == "during":
        buf = io.BytesIO()
        original_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        fh = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
        fh.write(data[:len(data) // 2])
        fh.flush()
        os.fsync(fh.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    original_save(obj, f, *args, **kwargs)
    if isinstance(f, (str, os.PathLike)):
        complete()

def replace(src, dst):
    original_replace(src, dst)
    if os.path.basename(dst) == "checkpoint.pt":
        complete()

torch.save, os.replace = save, replace
from sdepth_ext.train import main
main(sys.argv[1:])
"""


def run(argv, out, check=True, env=None):
    proc = subprocess.run([*argv, "--out", str(out)], cwd=ROOT, env=env or ENV, capture_output=True,
                          text=True, timeout=TIMEOUT)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def results(out):
    run_dir = Path(out) / "stochastic"
    steps = [(r["epoch"], r["step"], r["loss"]) for r in read_csv(run_dir / "steps.csv")]
    log = [tuple(r[k] for k in ("epoch", "lr", "train_loss", "train_error", "test_loss", "test_error"))
           for r in read_csv(run_dir / "log.csv")]
    return steps, log


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per mode, computed when first asked for."""
    cache = {}

    def get(mode):
        if mode not in cache:
            out = tmp_path_factory.mktemp(f"reference-{mode}")
            run([*COMMAND, *ARGS, "--mode", mode], out)
            cache[mode] = results(out)
            assert [int(e) for e, *_ in cache[mode][1]] == list(range(1, EPOCHS + 1))
        return cache[mode]

    return get


def resume_and_compare(out, mode, reference):
    run([*COMMAND, *ARGS, "--mode", mode, "--resume"], out)
    got = results(out)
    assert [int(e) for e, *_ in got[1]] == list(range(1, EPOCHS + 1))  # every epoch exactly once
    assert got == reference(mode)


@pytest.mark.parametrize("when", ["before", "during", "after"])
def test_sigkill_inside_the_checkpoint_save(tmp_path, reference, when):
    """The second checkpoint's save is killed before it writes (the logs of epoch 2 would already be on
    disk in a loop that logs before it saves), half-way through its bytes, or right after it (before the
    logs of the epoch are written)."""
    env = {**ENV, "SD_FAULT": when, "SD_FAULT_CALL": "2"}
    proc = run([sys.executable, "-c", KILL_IN_SAVE, *ARGS, "--mode", "batch"], tmp_path, check=False, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    ckpt = torch.load(tmp_path / "stochastic" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == (2 if when == "after" else 1)  # the previous checkpoint is intact
    logged = [int(r["epoch"]) for r in read_csv(tmp_path / "stochastic" / "log.csv")]
    assert logged == list(range(1, len(logged) + 1)) and len(logged) <= ckpt["epoch"]  # never ahead of it
    resume_and_compare(tmp_path, "batch", reference)
    assert not [p for p in (tmp_path / "stochastic").iterdir() if ".tmp-" in p.name]


def _epoch_seconds(line: str, default: float) -> float:
    match = re.search(r", ([\d.]+) s, ", line)
    return float(match.group(1)) if match else default


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_sigkill_at_random_points_then_resume_is_exact(tmp_path, reference, mode):
    rng = random.Random(f"kills-{mode}")
    kills, launches, epoch_time = 0, 0, 0.5
    while True:
        launches += 1
        assert launches < 20
        resume = ["--resume"] if (tmp_path / "stochastic" / "checkpoint.pt").is_file() else []
        proc = subprocess.Popen([*COMMAND, *ARGS, "--mode", mode, *resume, "--out", str(tmp_path)], cwd=ROOT,
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if kills == 3:
            assert proc.wait(timeout=TIMEOUT) == 0
            break
        # let 0-2 epochs finish, then kill at a random moment of the next epoch (steps, test, checkpoint)
        wanted, seen = rng.randint(0, 2), 0
        for line in proc.stdout:
            if " epoch " in line:
                epoch_time = _epoch_seconds(line, epoch_time)
                seen += 1
            if line.startswith("data=") and wanted == 0 or seen == wanted > 0:
                break
        time.sleep(rng.uniform(0, 1.5 * epoch_time))
        proc.kill()
        proc.wait(timeout=TIMEOUT)
        proc.stdout.close()
        kills += 1
    got = results(tmp_path)
    assert [int(e) for e, *_ in got[1]] == list(range(1, EPOCHS + 1))
    assert got == reference(mode)


def _start_and_wait_for(tmp_path, first_epoch: bool, stderr):
    proc = subprocess.Popen([*COMMAND, *ARGS, "--mode", "batch", "--out", str(tmp_path)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=stderr, text=True)
    for line in proc.stdout:
        if (" epoch 1/" in line) if first_epoch else line.startswith("data="):
            return proc, line
    raise AssertionError("the run ended before the expected line")


@pytest.mark.parametrize("signum, status, name", [(signal.SIGINT, 130, "Ctrl-C"),
                                                  (signal.SIGTERM, 143, "SIGTERM")])
def test_interrupt_prints_the_resume_command_and_resuming_is_exact(tmp_path, reference, signum, status, name):
    err_path = tmp_path / "stderr.txt"
    out = tmp_path / "run"
    with open(err_path, "w") as err:
        proc, line = _start_and_wait_for(out, True, err)
        time.sleep(random.Random(name).uniform(0, _epoch_seconds(line, 0.5)))
        proc.send_signal(signum)
        assert proc.wait(timeout=TIMEOUT) == status
        proc.stdout.close()
    text = err_path.read_text()
    assert "Traceback" not in text
    said = [line for line in text.splitlines() if line.startswith("interrupted")]
    assert len(said) == 1, text
    assert said[0].startswith(f"interrupted ({name}): every finished epoch is saved; resume with: ")
    command = shlex.split(said[0].split("resume with: ", 1)[1])
    assert command[:3] == ["python", "-m", "sdepth_ext.train"] and command[-1] == "--resume"
    proc = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    got = results(out)
    assert [int(e) for e, *_ in got[1]] == list(range(1, EPOCHS + 1))
    assert got == reference("batch")


def test_interrupt_before_the_first_epoch_says_nothing_was_saved(tmp_path):
    err_path = tmp_path / "stderr.txt"
    out = tmp_path / "run"
    with open(err_path, "w") as err:
        proc, _ = _start_and_wait_for(out, False, err)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=TIMEOUT) == 130
        proc.stdout.close()
    text = err_path.read_text()
    assert "Traceback" not in text
    said = [line for line in text.splitlines() if line.startswith("interrupted")]
    assert len(said) == 1 and "nothing was saved; start again with: python -m sdepth_ext.train" in said[0]
    assert "--resume" not in said[0]
    assert not (out / "stochastic" / "checkpoint.pt").exists()
