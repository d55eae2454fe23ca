"""`make bench` in --smoke mode: runs end to end and writes well-formed, stamped result files.

No timing is asserted anywhere: speed claims live in the benchmark output, measured side by side.
The in-process runs pass ``--cpu-malloc default`` so the pytest process keeps its allocator; the ``keep``
setting is tested in subprocesses.
"""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from benchmarks import common, report
from benchmarks import run as bench_run

STAMP = common.CSV_STAMP  # on every CSV row; cpu_allocator included


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(bench_run, "RESULTS_DIR", tmp_path)
    return tmp_path


def test_smoke_run_writes_stamped_results_and_plots(results_dir, capsys):
    results = bench_run.main(["--smoke", "--cpu-malloc", "default"])
    assert set(results) == {"scheduler", "epilogue", "host", "resnet"}
    out_dir = results_dir / common.device_slug(common.best_device())
    for name in ("scheduler_smoke", "epilogue_smoke", "host_smoke", "resnet_smoke"):
        data = json.loads((out_dir / f"{name}.json").read_text())
        assert all(data["environment"][k] for k in ("device", "torch", "date", "command", "cpu_allocator"))
        assert data["rows"], name
        assert data["samples"] and all(len(v) >= 1 for v in data["samples"].values())
        with open(out_dir / f"{name}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(data["rows"])
        assert all(k in rows[0] for k in STAMP)
    for r in results["epilogue"]:  # every row says how much it rotated, and that covers 4x the L2 (by reads)
        tensor = r["bytes"] // {"fwd": 3, "bwd": 4, "fwd+bwd": 7}[r["pass"]]
        assert r["rotation_bytes"] == r["rotation_sets"] * 3 * tensor
        assert r["rotation_read_bytes"] == r["rotation_sets"] * 2 * tensor >= 4 * r["l2_bytes"]
    for png in ("epilogue_bandwidth_smoke.png", "resnet_ratio_smoke.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out_dir / "summary_smoke.json").read_text())
    assert summary["smoke"] is True and "not measurements" in summary["note"]
    whats = [r["what"] for r in summary["rows"]]
    assert {w.split()[0] for w in whats} >= {"scheduler", "epilogue", "host"}
    assert {w.split(" 4x")[0] for w in whats if w.startswith("epilogue host")} == {
        "epilogue host fwd", "epilogue host fwd+bwd", "epilogue host rows fwd+bwd"}
    host_calls = [r for r in summary["rows"] if r["what"].startswith("epilogue host")]
    assert all("of eager" in r["ratio"] for r in host_calls)
    host_steps = [r for r in summary["rows"] if r["what"].startswith("host step")]
    assert len(host_steps) == 3 and all("of plain" in r["ratio"] and "blocks expected" in r["ideal/limit"]
                                        for r in host_steps)
    printed = capsys.readouterr().out
    assert "device:" in printed and "ideal/limit" in printed  # environment report and the summary table
    lines = printed.strip().splitlines()
    assert lines[0] == lines[-1] == bench_run.SMOKE_NOTE  # a smoke run says so first and last
    table = lines[lines.index(next(line for line in lines if line.startswith("what "))):-1]
    assert len(table) >= len(summary["rows"]) + 2 and all(len(line) <= 120 for line in table)

    markdown = report.main([str(out_dir), "--suffix", "_smoke"])
    assert summary["environment"]["device"] in markdown and summary["environment"]["date"] in markdown
    assert markdown.count("| what |") == 1 and markdown.count("| model |") == 1
    assert markdown.count("| per call |") == 1 and markdown.count("| host step |") == 1
    assert "not measurements" in markdown


def test_resnet_rows_carry_ratio_and_ideal(results_dir):
    rows = bench_run.main(["--smoke", "--only", "resnet", "--cpu-malloc", "default"])["resnet"]
    plain = [r for r in rows if r["variant"] == "plain"]
    assert plain and all(r["ratio"] == 1.0 for r in plain)
    sdepth = [r for r in rows if r["mode"] in ("batch", "row")]
    assert sdepth and all(0.0 < r["ideal_ratio"] < 1.0 for r in sdepth)  # p_last 0.5 skips work
    # Ideals of the plans actually drawn: FLOP fractions (a tiny smoke run may skip nothing). The block-time
    # ideal is built from measured times, which a smoke run's few noisy samples can put on either side of
    # 1: only its presence is checked, never a timing.
    assert all(0.0 < r["drawn_ideal_ratio"] <= 1.0 and math.isfinite(r["drawn_time_ideal_ratio"])
               for r in sdepth)
    assert all(r["ideal_ratio"] == 1.0 for r in rows if r["mode"] in ("torchvision", "droppath"))
    assert all(r["ratio_ci95_low"] <= r["ratio"] <= r["ratio_ci95_high"] for r in rows)
    # Each sdepth row at p_last 0.5 carries its hand-written comparator, which ran on the same plans.
    for r in sdepth:
        twin = next(h for h in rows if h["mode"] == f"hand-{r['mode']}" and h["p_last"] == r["p_last"]
                    and h["model"] == r["model"])
        assert r["hand_ratio"] == twin["ratio"] and r["drawn_ideal_ratio"] == twin["drawn_ideal_ratio"]
        assert r["over_hand"] == pytest.approx(r["ratio"] / r["hand_ratio"])
        assert r["over_hand_ci95_low"] <= r["over_hand"] <= r["over_hand_ci95_high"]


def test_block_cost_interpolates_measured_sizes_through_zero():
    from benchmarks.bench_resnet import block_cost

    times = {8: 2.0, 16: 3.0, 32: 7.0}
    assert block_cost(times, 0) == 0.0
    assert block_cost(times, 4) == pytest.approx(1.0)  # between (0, 0) and (8, 2)
    assert block_cost(times, 12) == pytest.approx(2.5)
    assert block_cost(times, 24) == pytest.approx(5.0)
    assert block_cost(times, 32) == pytest.approx(7.0)


def test_ratio_interval_pairs_rounds_and_contains_the_ratio():
    from benchmarks.bench_resnet import ratio_interval

    plain = [1.0, 2.0, 1.5, 3.0, 1.2, 2.2]
    # A variant at exactly 0.8x of plain in every round: every paired resample gives 0.8, whatever the drift.
    low, high = ratio_interval([0.8 * t for t in plain], plain)
    assert low == pytest.approx(0.8) and high == pytest.approx(0.8)
    noisy = [0.8 * t + d for t, d in zip(plain, (0.1, -0.1, 0.05, -0.05, 0.2, -0.2))]
    low, high = ratio_interval(noisy, plain)
    ratio = sum(noisy) / sum(plain)
    assert low < ratio < high and high - low < 0.5
    assert ratio_interval(noisy, plain) == (low, high)  # seeded


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_hand_skip_comparator_runs_the_converted_models_plans(mode):
    """The hand-written comparator must skip the work of the very plans sdepth_ext draws (same scheduler
    stream): every block's residual runs on as many samples in both, step after step. In batch mode it must
    also compute the same function (torchvision's forward vs the fused epilogue: bit-identical)."""
    import copy

    import sdepth_ext as sd
    from benchmarks.bench_resnet import _blocks, with_hand_skip

    torch.manual_seed(0)
    base = sd.cifar_resnet(20)
    converted = sd.convert(copy.deepcopy(base), p_last=0.5, mode=mode, seed=7).train()
    hand = with_hand_skip(copy.deepcopy(base), mode, 0.5, seed=7).train()
    runs = {"converted": [], "hand": []}
    for name, model in (("converted", converted), ("hand", hand)):
        for l, block in enumerate(_blocks(model)):
            block.conv1.register_forward_pre_hook(
                lambda _, args, l=l, log=runs[name]: log.append((l, args[0].shape[0])))
    x = torch.rand(8, 3, 32, 32)
    for _ in range(6):
        out_converted, out_hand = converted(x), hand(x)
        if mode == "batch":
            torch.testing.assert_close(out_hand, out_converted, rtol=0, atol=0)
    assert runs["hand"] == runs["converted"]
    sizes = [k for _, k in runs["converted"]]
    assert len(sizes) < 6 * 9 if mode == "batch" else min(sizes) < 8  # something was skipped


def _page_faults_of_reused_blocks(cpu_malloc: str) -> tuple[int, str]:
    """Minor page faults of 5 allocate-fill-free cycles of a 64 MB tensor after 15 others (new process), and
    the ``cpu_allocator`` that process's result files would be stamped with."""
    script = textwrap.dedent(f"""
        import resource, torch
        from benchmarks.common import configure_cpu_malloc, environment
        configure_cpu_malloc({cpu_malloc!r})
        for _ in range(15):  # glibc's aligned allocations take a few cycles to settle into a reusable chunk
            torch.ones(2**24)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            torch.ones(2**24)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(environment()["cpu_allocator"])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    faults, allocator = out.stdout.strip().splitlines()[-2:]
    return int(faults), allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc (Linux) only")
def test_keep_freed_cpu_memory_stops_page_faults_on_reuse():
    # 5 x 64 MB = 81920 pages of 4 KiB. glibc's default serves a block this big with mmap and unmaps it when
    # freed, so every cycle faults every page in again; keeping freed memory reuses the same pages.
    faults, allocator = _page_faults_of_reused_blocks("default")
    assert faults > 0.9 * 81920 and allocator == "system default"
    faults, allocator = _page_faults_of_reused_blocks("keep")
    assert faults < 1000 and allocator.startswith("glibc malloc keeping freed memory")


def test_cpu_malloc_helper_lives_in_benchmarks_and_is_stamped():
    import sdepth_ext.environment as library_env
    from benchmarks import cpu_malloc

    assert not hasattr(library_env, "keep_freed_cpu_memory") and not hasattr(library_env, "cpu_allocator")
    assert "cpu_allocator" in STAMP
    # The library stamps what it is told, else the allocator as the process found it.
    assert library_env.environment(cpu_allocator="my allocator")["cpu_allocator"] == "my allocator"
    assert library_env.environment()["cpu_allocator"] == library_env.default_cpu_allocator()
    # The benchmarks' stamp reports their --cpu-malloc setting (None here: this process never applied it).
    assert cpu_malloc.cpu_allocator() is None
    assert common.environment()["cpu_allocator"] == library_env.default_cpu_allocator()


def test_write_results_refuses_a_stamp_without_cpu_allocator(tmp_path):
    env = common.environment()
    common.write_results("ok", [{"x": 1}], env, out_dir=tmp_path)
    with open(tmp_path / "ok.csv", newline="") as f:
        assert next(csv.DictReader(f))["cpu_allocator"] == env["cpu_allocator"]
    del env["cpu_allocator"]
    with pytest.raises(ValueError, match="cpu_allocator"):
        common.write_results("bad", [{"x": 1}], env, out_dir=tmp_path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc (Linux) only")
def test_ddp_results_carry_the_workers_cpu_allocator(tmp_path):
    """bench_ddp times in spawned workers: they apply --cpu-malloc themselves; the stamp reports theirs."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "benchmarks.bench_ddp", "--smoke", "--cpu-malloc", "keep",
                    "--out-dir", str(tmp_path)], cwd=root, check=True, capture_output=True, timeout=600)
    data = json.loads((tmp_path / "ddp_smoke.json").read_text())
    assert data["environment"]["cpu_allocator"].startswith("glibc malloc keeping freed memory")
    assert data["rows"] and {r["variant"] for r in data["rows"]} == {"ddp_ready", "find_unused", "all_blocks"}
    with open(tmp_path / "ddp_smoke.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["cpu_allocator"] == data["environment"]["cpu_allocator"] for r in rows)


def test_rotation_covers_four_times_l2_in_every_size():
    from benchmarks.bench_epilogue import L2_MULTIPLE, READ_TENSORS, _shapes, rotation_sets

    l2 = 50 * 2**20  # an H200's L2
    # CIFAR ResNet-110 stage 3 at batch 128: 2 MiB per fp32 tensor. The old cap of 8 sets rotated 48 MiB of
    # buffers in all, inside the cache; now the forwards of one round read 200 MiB.
    tensor = 128 * 64 * 8 * 8 * 4
    assert rotation_sets(tensor, l2) == 50 and 50 * READ_TENSORS * tensor == 4 * l2
    assert 8 * 3 * tensor < l2
    for smoke in (False, True):
        for _, shape in _shapes(torch.device("cuda"), smoke):  # only the device type is read
            for esize in (4, 2):
                tensor = math.prod(shape) * esize
                n = rotation_sets(tensor, l2)
                assert n * READ_TENSORS * tensor >= L2_MULTIPLE * l2
                assert n == 1 or (n - 1) * READ_TENSORS * tensor < L2_MULTIPLE * l2  # no more than needed
    assert rotation_sets(256 * 256 * 56 * 56 * 4, l2) == 1  # ResNet-50 stage 1 at batch 256: one 822 MB set


def test_compiled_peer_is_timed_without_recompiling():
    from benchmarks import bench_epilogue as be

    torch._dynamo.reset()
    compiled = torch.compile(be._eager, dynamic=False)
    with be._no_donated_buffers():
        samples, rotation = be._bench_shape((2, 16, 8, 8), torch.float32, torch.device("cpu"), compiled,
                                            repeat=1, cache=2**16, variants=["eager", "compiled"])
    assert set(samples) == {(v, p) for v in ("eager", "compiled") for p in be.PASSES}
    assert rotation["rotation_sets"] == 16 and rotation["rotation_read_bytes"] == 4 * 2**16


def test_a_recompile_during_timed_calls_is_an_error():
    from benchmarks import bench_epilogue as be

    calls = [0]

    @torch.compile(backend="eager", dynamic=False)
    def scaled(sc, res, k):
        return torch.relu(sc + k * res)

    def recompiling(sc, res):  # a new Python int each call: a new specialisation each call
        calls[0] += 1
        return scaled(sc, res, calls[0])

    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="recompiled during the timed calls"):
        be._bench_shape((2, 16, 8, 8), torch.float32, torch.device("cpu"), recompiling, repeat=1,
                        cache=2**16, variants=["compiled"])
    torch._dynamo.reset()


def test_summary_leaves_compiled_out_of_the_cpu_epilogue_headline():
    from benchmarks.bench_epilogue import CPU_COMPILED_NOTE

    row = {"pass": "fwd+bwd", "dtype": "float32", "bytes": 7 * 2**20, "shape": "16x64x8x8", "sdepth_ms": 1.0,
           "eager_ms": 2.0, "torchvision_ms": 2.5, "compiled_ms": 9.0, "x_vs_eager": 2.0,
           "x_vs_torchvision": 2.5, "x_vs_compiled": 9.0, "sdepth_pct_copy": 50.0}
    cpu_row = {**row, "sdepth_backend": "torch", "note": CPU_COMPILED_NOTE}
    cpu = bench_run._summary({"epilogue": [cpu_row]}, "cpu")
    cuda = bench_run._summary({"epilogue": [{**row, "sdepth_backend": "triton"}]}, "cuda")
    assert cpu[0]["ratio"] == cpu[0]["brief"]["ratio"] == "2.00x vs eager"
    assert cpu[0]["note"] == CPU_COMPILED_NOTE and "no fair CPU peer" in cpu[0]["peers"]
    assert cuda[0]["ratio"] == "2.00x vs eager, 9.00x vs compiled" and "note" not in cuda[0]
    table = bench_run.summary_table(cpu)  # the note is printed under the table, within its width
    assert "inductor" in table and all(len(line) <= bench_run.TABLE_WIDTH for line in table.splitlines())


def test_run_turns_the_triton_interpreter_on_without_cuda():
    """bench_host needs TRITON_INTERPRET=1 before the kernels are defined: benchmarks.run sets it on import,
    and importing the benchmarks does not define them."""
    script = ("import os, sys, torch, benchmarks.run; print(torch.cuda.is_available(), "
              "os.environ.get('TRITON_INTERPRET'), 'sdepth_ext.kernels.epilogue' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out in (["True", "None", "False"], ["False", "1", "False"])
