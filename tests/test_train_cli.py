"""The training command as people use it: --help, every number checked up front, progress output, and a
loop that reads the device once per epoch, not once per step (CPU; the CUDA variant needs a GPU)."""

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sdepth_ext import train
from sdepth_ext.data import load_dataset

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--depth", "8", "--subset", "48", "--batch-size", "16", "--no-progress", "--lesion-draws", "1",
        "--device", "cpu"]


def option_blocks(help_text):
    """{option: its help text} from argparse's --help output."""
    section = help_text.split("options:", 1)[1].split("\n\n", 1)[0]
    blocks, current = {}, None
    for line in section.splitlines():
        match = re.match(r"^  (-\w|--[\w-]+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current:
            blocks[current] += " " + line.strip()
    return blocks


def test_help_runs_as_a_module_and_states_every_default_once():
    out = subprocess.run([sys.executable, "-m", "sdepth_ext.train", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "COLUMNS": "100"})
    assert out.returncode == 0, out.stderr
    blocks = option_blocks(out.stdout)
    flags = {"-h", "--no-lesion", "--no-progress", "--resume", "--frontier", "--overwrite"}
    assert set(blocks) >= flags | {"--depth", "--epochs", "--milestones", "--lesion-draws", "--out"}
    for option, text in blocks.items():
        expected = 0 if option in flags else 1
        assert text.count("default") == expected, (option, text)
    assert "False" not in out.stdout
    # --resume's rules for --epochs are spelled out
    assert "--epochs: it may grow" in out.stdout and "50% and 75% of the new total" in out.stdout


@pytest.mark.parametrize("argv, message", [
    (["--depth", "9"], "--depth must be 6n+2"),
    (["--depth", "2"], "--depth must be 6n+2"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--weight-decay=-1e-4"], "--weight-decay must be a finite number >= 0"),
    (["--p-last", "nan"], "--p-last must be in [0, 1]"),
    (["--p-last", "-0.1"], "--p-last must be in [0, 1]"),
    (["--milestones", "3,2"], "--milestones must be increasing epochs >= 1"),
    (["--milestones", "0"], "--milestones must be increasing epochs >= 1"),
    (["--milestones", "2,2"], "--milestones must be increasing epochs >= 1"),
    (["--milestones", "x"], "--milestones must be a comma list of integers"),
    (["--milestones", "2", "--schedule", "cosine"], "--milestones applies to --schedule step only"),
    (["--seed", "-1"], "--seed must be an integer in 0.."),
    (["--subset", "0"], "--subset must be an integer >= 1"),
    (["--lesion-draws", "0"], "--lesion-draws must be an integer >= 1, got 0"),
    (["--lesion-draws", "-2"], "--lesion-draws must be an integer >= 1, got -2"),
    (["--runs", "constant,constant"], "--runs must be a comma list of constant, stochastic (each once)"),
    (["--runs", ""], "--runs must be"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (["--subset", "100000"], "--subset must be at most 1348"),
])
def test_every_number_is_checked_before_anything_runs(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # an earlier result stays as it was
    with pytest.raises(SystemExit) as exc:
        train.main([*TINY, "--out", str(out), *argv])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]  # nothing trained, nothing written
    assert (out / "summary.json").read_text() == "{}"


def test_no_progress_prints_one_line_per_epoch(tmp_path, capsys, restore_rng_state):
    argv = [*TINY, "--no-lesion", "--epochs", "2", "--out", str(tmp_path)]
    summary = train.main(argv)
    assert summary["environment"]["command"] == " ".join(["python -m sdepth_ext.train", *argv])
    lines = [line for line in capsys.readouterr().out.splitlines() if " epoch " in line]
    pattern = (r"^(constant|stochastic) epoch (\d)/2: lr [\d.e-]+, train loss [\d.]+, train error [\d.]+%, "
               r"test error [\d.]+%, [\d.]+ s, \d+ images/s$")
    assert [re.match(pattern, line).group(1, 2) for line in lines] == [
        ("constant", "1"), ("constant", "2"), ("stochastic", "1"), ("stochastic", "2")]


class FakeBar:
    made = []

    def __init__(self, **kwargs):
        self.kwargs, self.updates, self.postfix, self.closed = kwargs, 0, {}, False
        FakeBar.made.append(self)

    def update(self, n):
        self.updates += n

    def set_postfix(self, refresh=True, **kwargs):
        self.postfix = kwargs

    def close(self):
        self.closed = True


def test_progress_bar_per_epoch_stays_with_loss_error_and_speed(tmp_path, monkeypatch, restore_rng_state):
    import tqdm

    FakeBar.made = []
    monkeypatch.setattr(tqdm, "tqdm", FakeBar)
    args = [a for a in TINY if a != "--no-progress"]
    train.main([*args, "--runs", "stochastic", "--no-lesion", "--epochs", "2", "--out", str(tmp_path)])
    assert len(FakeBar.made) == 2
    for epoch, bar in enumerate(FakeBar.made, 1):
        assert bar.kwargs["leave"] is True and bar.kwargs["total"] == 3 and bar.updates == 3 and bar.closed
        assert f"{epoch}/2" in bar.kwargs["desc"]
        assert {"loss", "err", "img_s"} <= set(bar.postfix)
        assert 0 <= float(bar.postfix["err"]) <= 1 and float(bar.postfix["img_s"]) > 0


# ----------------------------------------------------------------------------------------------------------
# No per-step host sync
# ----------------------------------------------------------------------------------------------------------
READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__", "__format__")
TRAIN_PACKAGE = os.sep + os.path.join("sdepth_ext", "train")


def count_reads_by_the_training_code(monkeypatch, run):
    """How often code under sdepth_ext/train reads a tensor's values on the host while ``run()`` runs."""
    count = [0]

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if TRAIN_PACKAGE in sys._getframe(1).f_code.co_filename:
                count[0] += 1
            return original(self, *args, **kwargs)

        return wrapper

    with monkeypatch.context() as m:
        for name in READS:
            m.setattr(torch.Tensor, name, counting(name))
        run()
    return count[0]


def test_the_loop_reads_the_device_once_per_epoch_not_per_step(tmp_path, monkeypatch, restore_rng_state):
    data = load_dataset("digits").subset(48, 16)

    def reads(batch_size, epochs):
        cfg = train.TrainConfig(depth=8, epochs=epochs, batch_size=batch_size, progress=True,
                                runs=["stochastic"], lesion=False)
        out = tmp_path / f"b{batch_size}e{epochs}"
        return count_reads_by_the_training_code(monkeypatch,
                                                lambda: train.train_run(cfg, data, "stochastic", out))

    three_steps, six_steps = reads(16, 1), reads(8, 1)
    assert three_steps == six_steps  # independent of the number of steps
    per_epoch = reads(16, 2) - three_steps
    assert 0 < per_epoch <= 4


@pytest.mark.needs_cuda
def test_cuda_loop_does_not_sync_per_step(tmp_path, restore_rng_state):
    """On CUDA the data, its shuffling and augmentation live on the GPU: the syncs of an epoch are the
    epoch's one read and evaluation's, however many steps it has."""
    data = load_dataset("digits").subset(96, 32)

    def syncs(batch_size):
        cfg = train.TrainConfig(depth=8, epochs=1, batch_size=batch_size, device="cuda", progress=False,
                                runs=["stochastic"], lesion=False)
        train.train_run(cfg, data, "stochastic", tmp_path / f"warm{batch_size}")  # warm-up: lazy inits
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train.train_run(cfg, data, "stochastic", tmp_path / f"b{batch_size}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert syncs(32) == syncs(8)  # 3 steps and 12 steps
