"""The training command: smoke run, exact resumption, data loading and argument errors (CPU, tiny sizes).

More in test_train_resume.py, test_train_cli.py, test_train_data.py and test_faults_train.py.
"""

import csv
import pickle

import numpy as np
import pytest
import torch

from sdepth_ext import train
from sdepth_ext.data import augment, load_dataset

# On the CPU also where a GPU is present: bit-identical resumption is a CPU guarantee (cuDNN's default
# convolution algorithms need not be deterministic).
TINY = ["--depth", "8", "--subset", "48", "--batch-size", "16", "--no-progress", "--lesion-draws", "1",
        "--device", "cpu"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_run_writes_logs_and_plots(tmp_path, restore_rng_state):
    summary = train.main([*TINY, "--epochs", "1", "--out", str(tmp_path)])
    for name in ("constant", "stochastic"):
        log = read_csv(tmp_path / name / "log.csv")
        assert len(log) == 1 and list(log[0]) == train.LOG_FIELDS
        assert 0.0 <= float(log[0]["test_error"]) <= 1.0 and float(log[0]["epoch_time_s"]) > 0
        assert len(read_csv(tmp_path / name / "steps.csv")) == 3  # 48 images / batch 16
        assert (tmp_path / name / "checkpoint.pt").is_file()
    for png in ("error_curves.png", "lesion.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0.5 < summary["ideal_time_ratio"] < 1.0
    assert summary["measured_time_ratio"] > 0 and summary["median_time_ratio"] > 0
    # depth 8: 3 blocks -> single-block lesions for each, k = 1 random deletion
    assert len(summary["lesion"]["stochastic"]["single"]) == 3
    assert summary["lesion"]["constant"]["downsampling"] == [1, 2]


@pytest.mark.parametrize("mode", ["batch", "row", "subset"])
def test_resume_reproduces_next_epoch_exactly(tmp_path, restore_rng_state, mode):
    # Explicit milestones stay as given when --epochs grows on resume (tests/test_train_resume.py covers
    # the default ones, which follow the new --epochs).
    args = [*TINY, "--runs", "stochastic", "--mode", mode, "--no-lesion", "--p-last", "0.3",
            "--milestones", "2"]
    train.main([*args, "--epochs", "3", "--out", str(tmp_path / "straight")])
    train.main([*args, "--epochs", "1", "--out", str(tmp_path / "resumed")])
    train.main([*args, "--epochs", "3", "--out", str(tmp_path / "resumed"), "--resume"])
    straight = read_csv(tmp_path / "straight" / "stochastic" / "steps.csv")
    resumed = read_csv(tmp_path / "resumed" / "stochastic" / "steps.csv")
    assert len(straight) == len(resumed) == 9
    # bit-identical losses (CSV holds the shortest repr that round-trips a float)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    log_a = read_csv(tmp_path / "straight" / "stochastic" / "log.csv")
    log_b = read_csv(tmp_path / "resumed" / "stochastic" / "log.csv")
    assert [r["test_error"] for r in log_a] == [r["test_error"] for r in log_b]


@pytest.mark.needs_cuda
def test_resume_on_cuda_restores_the_cpu_rng_states(tmp_path, restore_rng_state):
    """A CUDA run's checkpoint holds CPU generator states; resuming must not move them to the GPU."""
    # argparse keeps the last --device: this one, after TINY's "cpu"
    args = [*TINY, "--device", "cuda", "--runs", "stochastic", "--no-lesion", "--milestones", "2"]
    train.main([*args, "--epochs", "1", "--out", str(tmp_path)])
    train.main([*args, "--epochs", "2", "--out", str(tmp_path), "--resume"])
    assert len(read_csv(tmp_path / "stochastic" / "log.csv")) == 2


def test_digits_dataset_is_fixed_and_normalized():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.train_x.shape == (1348, 3, 32, 32) and a.test_x.shape == (449, 3, 32, 32)
    assert torch.equal(a.test_y, b.test_y) and torch.equal(a.train_x, b.train_x)
    assert abs(float(a.train_x.mean())) < 1e-3 and abs(float(a.train_x.std()) - 1) < 1e-3
    assert set(a.train_y.tolist()) == set(range(10))


def test_augment_matches_loop_reference():
    x = torch.randn(6, 3, 32, 32)
    out = augment(x, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    dy = torch.randint(0, 9, (6,), generator=g)
    dx = torch.randint(0, 9, (6,), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(6):
        crop = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)


def _write_cifar10(folder, n_per_batch=4):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n_per_batch).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_archive_loads(tmp_path):
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    data = load_dataset("cifar10", tmp_path)
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    assert data.num_classes == 10 and data.train_y.dtype == torch.int64


def test_cifar_errors(tmp_path):
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("cifar10", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_dataset("cifar10", tmp_path)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(b"not a pickle")
    (folder / "test").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="malformed"):
        load_dataset("cifar100", tmp_path)
    with pytest.raises(ValueError, match="data must be one of"):
        load_dataset("mnist")


@pytest.mark.parametrize("argv, message", [
    (["--depth", "9"], "--depth must be 6n+2"),
    (["--runs", "deep"], "--runs must be"),
    (["--p-last", "1.5"], "--p-last must be in"),
    (["--lr", "0"], "--lr must be"),
    (["--milestones", "a,b"], "--milestones"),
    (["--mode", "sample"], "invalid choice"),
])
def test_bad_arguments_exit_with_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--data", "cifar10", "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert exc.value.code == 1
    assert "no download is attempted" in capsys.readouterr().err
