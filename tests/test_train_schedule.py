"""The training command's drop schedules, compute accounting, data-wait warning, depth frontier and the
refusal to start over a run without --overwrite (CPU, tiny)."""

import time

import pytest

from sdepth_ext import train
from sdepth_ext.train import files as train_files
from sdepth_ext.train import loop as train_loop

TINY = ["--depth", "8", "--subset", "48", "--batch-size", "16", "--no-progress", "--lesion-draws", "1",
        "--device", "cpu", "--no-lesion"]


def log_of(out, run="stochastic"):
    return train_files.read_csv(out / run / "log.csv")


def test_warmup_schedule_is_logged_and_resumes_exactly(tmp_path, restore_rng_state):
    args = [*TINY, "--runs", "stochastic", "--drop-schedule", "warmup:5", "--milestones", "2"]
    train.main([*args, "--epochs", "3", "--out", str(tmp_path / "straight")])
    train.main([*args, "--epochs", "1", "--out", str(tmp_path / "resumed")])
    train.main([*args, "--epochs", "3", "--out", str(tmp_path / "resumed"), "--resume"])
    straight, resumed = log_of(tmp_path / "straight"), log_of(tmp_path / "resumed")
    # 3 steps per epoch: the scale at each epoch's last step is min(1, step / 5) with steps 2, 5, 8
    assert [float(r["drop_scale"]) for r in straight] == [0.4, 1.0, 1.0]
    steps = [train_files.read_csv(tmp_path / name / "stochastic" / "steps.csv") for name in ("straight",
                                                                                            "resumed")]
    assert [r["loss"] for r in steps[0]] == [r["loss"] for r in steps[1]]  # bit-identical
    assert [r["test_error"] for r in straight] == [r["test_error"] for r in resumed]


def test_a_changed_schedule_is_refused_on_resume(tmp_path, restore_rng_state):
    args = [*TINY, "--runs", "stochastic", "--out", str(tmp_path)]
    train.main([*args, "--epochs", "1"])
    with pytest.raises(SystemExit) as err:
        train.main([*args, "--epochs", "2", "--resume", "--drop-schedule", "late:2"])
    assert err.value.code == 2


@pytest.mark.parametrize("bad", ["cosine", "warmup", "warmup:0", "pld:-1", "late:x"])
def test_bad_schedules_are_refused_up_front(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        train.main([*TINY, "--drop-schedule", bad, "--out", str(tmp_path)])
    assert err.value.code == 2 and "--drop-schedule" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_work_that_ran_is_logged_per_epoch(tmp_path, restore_rng_state):
    train.main([*TINY, "--epochs", "2", "--p-last", "0.2", "--out", str(tmp_path)])
    for row in log_of(tmp_path):
        ran, expected = float(row["work_ran"]), float(row["work_expected"])
        assert 0.0 < ran <= 1.0 and 0.0 < expected < 1.0
        assert 0.0 <= float(row["data_time_s"]) < float(row["epoch_time_s"])
    assert all(float(r["work_ran"]) == 1.0 for r in log_of(tmp_path, "constant"))


def test_a_slow_loader_is_reported_once(tmp_path, monkeypatch, restore_rng_state):
    original = train_loop.augment

    def slow(x, generator):
        time.sleep(0.2)
        return original(x, generator)

    monkeypatch.setattr(train_loop, "augment", slow)
    with pytest.warns(UserWarning, match="data-loader-bound") as caught:
        train.main([*TINY, "--runs", "stochastic", "--epochs", "2", "--out", str(tmp_path)])
    assert sum("data-loader-bound" in str(w.message) for w in caught) == 1


def test_a_fast_loader_is_not_reported(tmp_path, recwarn, restore_rng_state):
    train.main([*TINY, "--runs", "stochastic", "--epochs", "1", "--out", str(tmp_path)])
    assert not [w for w in recwarn if "data-loader-bound" in str(w.message)]


def test_frontier_for_both_runs(tmp_path, restore_rng_state):
    summary = train.main([*TINY, "--epochs", "1", "--frontier", "--out", str(tmp_path)])
    rows = train_files.read_csv(tmp_path / "frontier.csv")
    assert {r["run"] for r in rows} == {"constant", "stochastic"}
    for name in ("constant", "stochastic"):
        frontier = summary["frontier"][name]
        assert [r["k"] for r in frontier] == [0, 1]  # depth 8: 3 units, max_drop = 1
        assert frontier[0]["macs_ratio"] == 1.0 > frontier[1]["macs_ratio"]
        assert all(r["error_recalibrated"] is not None for r in frontier)
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_starting_over_an_existing_run_needs_overwrite(tmp_path, capsys, restore_rng_state):
    args = [*TINY, "--runs", "stochastic", "--epochs", "1", "--out", str(tmp_path)]
    train.main(args)
    before = (tmp_path / "stochastic" / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit) as err:
        train.main(args)
    assert err.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "stochastic" / "checkpoint.pt").read_bytes() == before  # untouched
    train.main([*args, "--overwrite"])
