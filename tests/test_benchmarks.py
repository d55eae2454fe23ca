"""`make bench` in --smoke mode: runs end to end and writes well-formed, stamped result files.

No timing is asserted anywhere: speed claims live in the benchmark output, measured side by side.
"""

import csv
import json

import pytest

from benchmarks import common, report
from benchmarks import run as bench_run

STAMP = ("device", "torch", "triton", "torchvision", "date", "command")


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(bench_run, "RESULTS_DIR", tmp_path)
    return tmp_path


def test_smoke_run_writes_stamped_results_and_plots(results_dir, capsys):
    results = bench_run.main(["--smoke"])
    assert set(results) == {"scheduler", "epilogue", "resnet"}
    out_dir = results_dir / common.device_slug(common.best_device())
    for name in ("scheduler_smoke", "epilogue_smoke", "resnet_smoke"):
        data = json.loads((out_dir / f"{name}.json").read_text())
        assert all(data["environment"][k] for k in ("device", "torch", "date", "command"))
        assert data["rows"], name
        assert data["samples"] and all(len(v) >= 1 for v in data["samples"].values())
        with open(out_dir / f"{name}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(data["rows"])
        assert all(k in rows[0] for k in STAMP)
    for png in ("epilogue_bandwidth_smoke.png", "resnet_ratio_smoke.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out_dir / "summary_smoke.json").read_text())
    assert {r["what"].split()[0] for r in summary["rows"]} >= {"scheduler", "epilogue"}
    printed = capsys.readouterr().out
    assert "device:" in printed and "ideal/limit" in printed  # environment report and the summary table

    markdown = report.main([str(out_dir), "--suffix", "_smoke"])
    assert summary["environment"]["device"] in markdown and summary["environment"]["date"] in markdown
    assert markdown.count("| what |") == 1 and markdown.count("| model |") == 1


def test_resnet_rows_carry_ratio_and_ideal(results_dir):
    rows = bench_run.main(["--smoke", "--only", "resnet"])["resnet"]
    plain = [r for r in rows if r["variant"] == "plain"]
    assert plain and all(r["ratio"] == 1.0 for r in plain)
    sdepth = [r for r in rows if r["mode"] in ("batch", "row")]
    assert sdepth and all(0.0 < r["ideal_ratio"] < 1.0 for r in sdepth)  # p_last 0.5 skips work
    # Ideals of the plans actually drawn: fractions of the plain step (block times are measured, so only
    # bounded above by 1; a tiny smoke run may skip nothing).
    assert all(0.0 < r["drawn_ideal_ratio"] <= 1.0 and r["drawn_time_ideal_ratio"] <= 1.0 for r in sdepth)
    assert all(r["ideal_ratio"] == 1.0 for r in rows if r["mode"] in ("torchvision", "droppath"))


def test_block_cost_interpolates_measured_sizes_through_zero():
    from benchmarks.bench_resnet import block_cost

    times = {8: 2.0, 16: 3.0, 32: 7.0}
    assert block_cost(times, 0) == 0.0
    assert block_cost(times, 4) == pytest.approx(1.0)  # between (0, 0) and (8, 2)
    assert block_cost(times, 12) == pytest.approx(2.5)
    assert block_cost(times, 24) == pytest.approx(5.0)
    assert block_cost(times, 32) == pytest.approx(7.0)
