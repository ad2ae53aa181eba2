"""Smoke tests of the benchmarks: both scripts run on a tiny configuration and write JSON of the documented form.

No timing assertions (the machine is shared); the memory and byte-count helpers are checked exactly. The scripts
run with one thread here: on a loaded 2-core machine two threads make tiny ops much slower, not faster.
"""
from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fbkernels

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
ROW_KEYS = {"op", "provider", "dtype", "shape", "pass", "ms", "gbps", "frac_peak", "peak_mem_mib"}


def _bench_module(name):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


def _fused_cpu_providers():
    return [name for name in ("cpp",) if name in fbkernels.available_backends("cpu")]


def _run(script, *args, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--threads", "1", *args],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    stem = script.removesuffix(".py")
    files = sorted(tmp_path.glob(f"{stem}_*.json"))
    assert len(files) == 1, files
    with open(files[0]) as handle:
        payload = json.load(handle)
    assert files[0].with_suffix(".png").stat().st_size > 0
    assert files[0].name.endswith("_smoke.json") == ("--smoke" in args)
    assert (tmp_path / "README_table.md").exists()
    return proc.stdout, payload


def _check_common(payload, device_type="cpu"):
    assert isinstance(payload["device"], str) and payload["device"]
    assert payload["torch"] == torch.__version__
    assert payload["device_type"] == device_type
    assert payload["peak_mem_method"] and payload["timing_method"]
    assert payload["results"]
    for row in payload["results"]:
        assert ROW_KEYS <= set(row), row
        assert row["ms"] > 0 and row["p20_ms"] <= row["ms"] <= row["p80_ms"]
        assert row["peak_mem_mib"] >= 0
        assert isinstance(row["shape"], list) and all(isinstance(s, int) for s in row["shape"])


def test_step_throughput_smoke(tmp_path):
    providers = ["eager", *_fused_cpu_providers()]
    stdout, payload = _run("step_throughput.py", "--smoke", "--providers", ",".join(providers), tmp_path=tmp_path)
    _check_common(payload)
    assert payload["peak_gbps"] > 0
    assert "| op | shape | pass | provider |" in stdout
    step = _bench_module("step_throughput")
    seen = {(r["op"], r["provider"], r["pass"]) for r in payload["results"]}
    for op in ("feedback_step", "context_gate"):
        for provider in providers:
            for pass_name in ("fwd", "fwd_bwd"):
                assert (op, provider, pass_name) in seen
    for row in payload["results"]:
        assert row["matches_eager"], row
        case = step.Case(row["op"], tuple(row["shape"]), row["sweep"])
        assert row["bytes"] == step.minimal_bytes(case, row["pass"], 4)
        assert math.isclose(row["gbps"], row["bytes"] / (row["ms"] * 1e-3) / 1e9, rel_tol=1e-9)
        assert math.isclose(row["frac_peak"], row["gbps"] / payload["peak_gbps"], rel_tol=1e-9)
        assert row["peak_mem_mib"] > 0  # every pass allocates its outputs
    # The README table ignores smoke runs and shows the newest real run's headline per device.
    common = _bench_module("_common")
    assert "feedback_step on" not in (tmp_path / "README_table.md").read_text()
    real = {**payload, "smoke": False}
    common.write_json(real, tmp_path / "step_throughput_test-device_2000-01-01.json")
    table = common.update_readme_table(tmp_path).read_text()
    assert f"feedback_step on {payload['device']}" in table
    assert all(f"| {h['provider']} |" in table for h in payload["headline"])
    if "cpp" in providers:  # the headline names the fused backend against eager
        assert any(h["provider"] == "cpp" and h["fwd_speedup"] > 0 for h in payload["headline"])
        assert "cpp vs eager" in stdout


@pytest.mark.slow
def test_step_throughput_smoke_compile(tmp_path):
    _, payload = _run("step_throughput.py", "--smoke", "--providers", "eager,compile", tmp_path=tmp_path)
    rows = [r for r in payload["results"] if r["provider"] == "compile"]
    assert len(rows) == 6 and all(r["matches_eager"] for r in rows)


def test_minimal_bytes_formula():
    step = _bench_module("step_throughput")
    B, d, k, H, W = 2, 6, 2, 4, 5
    N = H * W
    case = step.Case("feedback_step", (B, d, H, W), "size", num_feedback=k)
    fwd = (2 * B * d * N + d * d + B * d * N + B * k * N) * 4  # read h, f, M; write h_next, v
    bwd = (B * d * N + B * k * N + B * d * N + B * k * N + d * d + 2 * B * d * N + d * d) * 4
    assert step.minimal_bytes(case, "fwd", 4) == fwd
    assert step.minimal_bytes(case, "fwd_bwd", 4) == fwd + bwd
    gate = step.Case("context_gate", (B, d, H, W), "cbl")
    assert step.minimal_bytes(gate, "fwd", 8) == (2 * B * d * N + B * d) * 8


def test_timed_rounds_run_with_the_garbage_collector_paused():
    common = _bench_module("_common")
    enabled_during_call = []
    timings = common.time_fns({"probe": lambda: enabled_during_call.append(gc.isenabled())}, torch.device("cpu"),
                              budget_s=0.0, min_repeats=4, warmup_s=0.0, warmup_calls=2)
    assert timings["probe"].repeats == 4
    assert enabled_during_call == [True, True, False, False, False, False]  # two warm-up calls, four timed ones
    assert gc.isenabled()


def test_header_records_the_environment_that_changes_measurements(monkeypatch):
    common = _bench_module("_common")
    for name in [n for n in os.environ if common._MEASURED_ENVIRONMENT.fullmatch(n)]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "67108864")
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    monkeypatch.setenv("FBKERNELS_HUGE_PAGES", "0")
    monkeypatch.setenv("HOME_OF_SOMETHING_ELSE", "x")
    environment = common.header(torch.device("cpu"), "probe", [])["environment"]
    assert environment == {"FBKERNELS_HUGE_PAGES": "0", "MALLOC_MMAP_THRESHOLD_": "67108864",
                           "OMP_WAIT_POLICY": "passive"}


def test_peak_memory_counts_live_temporaries():
    common = _bench_module("_common")
    mib = 1 << 20

    def fn():
        a = torch.ones(2 * mib // 4)  # 2 MiB
        b = torch.ones(3 * mib // 4)  # 3 MiB, both alive: peak 5 MiB
        del a
        c = torch.ones(1 * mib // 4)  # 4 MiB alive
        return b, c

    peak = common.peak_memory_bytes(fn, torch.device("cpu"))
    assert 5 * mib <= peak < 5 * mib + 64 * 1024


def test_default_output_is_outside_the_committed_results():
    common = _bench_module("_common")
    assert common.DEFAULT_OUT == REPO / "runs" / "bench"
    path = common.result_path(common.DEFAULT_OUT, "step_throughput", torch.device("cpu"))
    assert path.name == f"step_throughput_{common.slug(common.device_name(torch.device('cpu')))}.json"
    assert common.result_path(common.DEFAULT_OUT, "step_throughput", torch.device("cpu"), smoke=True).name.endswith(
        "_smoke.json")


def test_verdict_writes_slower_out():
    step = _bench_module("step_throughput")
    rows = []
    for op, shape in (("feedback_step", [8, 18, 128, 128]), ("context_gate", [128, 64, 16, 16])):
        for pass_name in ("fwd", "fwd_bwd"):
            for provider, ms in (("eager", 4.0), ("compile", 1.0), ("cpp", 2.0)):
                rows.append({"op": op, "shape": shape, "pass": pass_name, "provider": provider, "ms": ms,
                             "peak_mem_mib": 10.0 if provider == "eager" else 5.0, "frac_peak": 0.25,
                             "sweep": "size"})
    lines = step.verdict({"results": rows, "providers": ["eager", "compile", "cpp"]})
    assert len(lines) == 4
    for line in lines:
        assert "2.00x faster than eager" in line and "2.00x slower than torch.compile" in line
        assert "25% of copy bandwidth" in line
    assert sum("peak memory 0.50x eager's" in line for line in lines) == 2


@pytest.mark.skipif(subprocess.run(["which", "g++"], capture_output=True).returncode != 0, reason="no g++")
def test_cpu_kernel_driver_builds_and_runs(tmp_path):
    """bench/cpu_kernel_driver.cpp (the kernels timed without Python) compiles with the CPU module's flags and runs
    every op in both output modes, and with its inputs pushed out of cache."""
    binary = tmp_path / "driver"
    subprocess.run(["g++", "-O1", "-std=c++17", "-fno-math-errno", "-ffp-contract=off", "-fopenmp",
                    f"-I{REPO / 'csrc'}", str(BENCH / "cpu_kernel_driver.cpp"), "-o", str(binary)],
                   check=True, capture_output=True, timeout=300)
    for op in ("feedback_step_forward", "feedback_step_backward", "context_gate_forward", "context_gate_backward"):
        for outputs in ("fresh", "preallocated"):
            proc = subprocess.run([str(binary), op, "2", "5", "37", "2", outputs, "3"], capture_output=True,
                                  text=True, timeout=60, check=True)
            assert proc.stdout.startswith(f"{op} B=2 C=5 N=37 threads=2 {outputs} outputs: median ")
        proc = subprocess.run([str(binary), op, "2", "5", "37", "1", "preallocated", "3", "cold"],
                              capture_output=True, text=True, timeout=60, check=True)
        assert proc.stdout.startswith(f"{op} B=2 C=5 N=37 threads=1 preallocated outputs, cold: median ")


def _in_git_checkout() -> bool:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode == 0


@pytest.mark.skipif(subprocess.run(["which", "g++"], capture_output=True).returncode != 0, reason="no g++")
@pytest.mark.skipif(not _in_git_checkout(), reason="not a git checkout (the script takes one version from git)")
def test_cpu_kernel_ab_builds_and_compares_every_op():
    """bench/cpu_kernel_ab.sh builds the kernels of HEAD and of the working tree into one program and times them in
    pairs; with the op headers unchanged since HEAD both versions write the same bits."""
    unchanged = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "csrc/cpu"]).returncode == 0
    env = {**os.environ, "CXXFLAGS": "-O1"}
    ops = ("feedback_step_forward", "feedback_step_backward", "context_gate_forward", "context_gate_backward")
    for index, op in enumerate(ops):
        args = ["bash", str(BENCH / "cpu_kernel_ab.sh"), *(["HEAD"] if index % 2 else []), op, "2", "5", "37", "2", "3"]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, check=True)
        assert proc.stdout.startswith(f"{op} B=2 C=5 N=37 threads=2: base "), proc.stdout
        assert "change faster in" in proc.stdout and "of 3 pairs" in proc.stdout
        if unchanged:
            assert proc.stdout.rstrip().endswith("same bits"), proc.stdout
    usage = subprocess.run(["bash", str(BENCH / "cpu_kernel_ab.sh")], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and "OP B C N THREADS" in usage.stderr
