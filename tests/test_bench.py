"""Smoke tests of the benchmarks: both scripts run on a tiny configuration and write JSON of the documented form.

No timing assertions (the machine is shared); the memory and byte-count helpers are checked exactly. The scripts
run with one thread here: on a loaded 2-core machine two threads make tiny ops much slower, not faster.
"""
from __future__ import annotations

import gc
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fbkernels

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
# The committed step_throughput run that README.md quotes (the 2-core Xeon VM).
XEON_RUN = "step_throughput_intel-r-xeon-r-processor-2-threads.json"
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
    real = {**payload, "smoke": False, "partial": False}  # (partial runs, as smoke ones, stay out of the table)
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


# ---------------------------------------------------------------- command line, verdict and outputs (fast, in-process)

def _parse_error(parse_args, argv, capsys) -> str:
    """The message of the parser error that `argv` gives (SystemExit 2, before anything is measured)."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _tiny_sweep(step):
    """A sweep of two tiny cases: a whole run of the script in well under a second."""
    cases = [step.Case("feedback_step", (1, 4, 4, 4), "size"), step.Case("context_gate", (2, 4, 4, 4), "cbl")]
    return lambda kind: step.Sweep(cases, budget_s=0.0, min_repeats=2, warmup_s=0.0)


@pytest.fixture
def step(monkeypatch):
    step = _bench_module("step_throughput")
    monkeypatch.setattr(step, "make_sweep", _tiny_sweep(step))
    return step


def test_device_resolution_gives_cuda_an_index(monkeypatch):
    """`--device cuda` (or the default on a GPU machine) resolves to the current CUDA device with its index:
    torch.cuda.set_device refuses a CUDA device without one, which crashed both scripts on every GPU machine."""
    common = _bench_module("_common")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    selected = []
    monkeypatch.setattr(torch._C, "_cuda_setDevice", selected.append, raising=False)
    assert common.resolve_device(None) == torch.device("cuda", 1)
    assert common.resolve_device("cuda") == torch.device("cuda", 1)
    assert common.resolve_device("cuda:0") == torch.device("cuda", 0)
    assert common.resolve_device("cpu") == torch.device("cpu")
    for text in ("cuda", None, "cuda:0"):
        common.use_device(common.resolve_device(text))  # torch.cuda.set_device with CUDA's own call mocked
    assert selected == [1, 1, 0]
    with pytest.raises(ValueError, match="cuda:N with N in 0..1"):
        common.resolve_device("cuda:2")
    for text in ("gpu", "meta", "mps", ""):
        with pytest.raises(ValueError, match="expected cpu, cuda or cuda:N"):
            common.resolve_device(text)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.resolve_device(None) == torch.device("cpu")
    for text in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="CUDA is not available"):
            common.resolve_device(text)


@pytest.mark.parametrize("device, message", [("cuda", "CUDA is not available"), ("cuda:1", "CUDA is not available"),
                                             ("gpu", "got 'gpu'"), ("meta", "got 'meta'")])
def test_step_throughput_refuses_a_device_it_cannot_use(step, monkeypatch, capsys, tmp_path, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    error = _parse_error(step.parse_args, ["--device", device, "--out", str(tmp_path)], capsys)
    assert "--device: expected cpu, cuda or cuda:N" in error and message in error


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads: expected a positive integer, got '0'"),
    (["--threads", "-2"], "--threads: expected a positive integer, got '-2'"),
    (["--providers", ""], "--providers: expected a comma-separated subset of eager,compile,cpp,triton,cuda, got ''"),
    (["--providers", " , "], "got ' , '"),
    (["--providers", "cpp,fused"], "got unknown 'fused'"),
    (["--providers", "eager,eager"], "--providers: expected each provider once, got eager more than once"),
    (["--providers", "cuda"], "--providers: expected at least one provider that can run float32 on cpu, got cuda"),
])
def test_step_throughput_parser_errors(step, capsys, tmp_path, argv, message):
    error = _parse_error(step.parse_args, ["--device", "cpu", "--out", str(tmp_path), *argv], capsys)
    assert message in error, error


def test_out_must_be_a_writable_directory(step, capsys, tmp_path):
    """A bad --out stops the run before it measures anything (it used to fail after the whole sweep)."""
    existing_file = tmp_path / "file"
    existing_file.write_text("")
    error = _parse_error(step.parse_args, ["--device", "cpu", "--out", str(existing_file)], capsys)
    assert f"--out: expected a directory, got '{existing_file}', an existing file" in error
    error = _parse_error(step.parse_args, ["--device", "cpu", "--out", str(existing_file / "below")], capsys)
    assert "--out: expected a directory that can be created" in error
    args = step.parse_args(["--device", "cpu", "--out", str(tmp_path / "new" / "dir")])
    assert (tmp_path / "new" / "dir").is_dir() and args.out == tmp_path / "new" / "dir"


def test_result_names_keep_dtypes_and_partial_runs_apart(tmp_path):
    common = _bench_module("_common")
    device = "AMD EPYC (2 threads)"
    assert common.result_path(tmp_path, "step_throughput", device).name == "step_throughput_amd-epyc-2-threads.json"
    assert common.result_path(tmp_path, "train_step", device, dtype="float64").name == \
        "train_step_amd-epyc-2-threads_float64.json"
    assert common.result_path(tmp_path, "step_throughput", device, dtype="bfloat16", partial=True, smoke=True).name \
        == "step_throughput_amd-epyc-2-threads_bfloat16_partial_smoke.json"
    # The committed results keep the names they are referred to by (README.md, docs/training.md).
    committed = sorted((REPO / "bench" / "results").glob("*.json"))
    assert {path.name for path in committed} >= {"step_throughput_amd-epyc-2-threads.json",
                                                  "step_throughput_intel-r-xeon-r-processor-2-threads.json",
                                                  "train_step_amd-epyc-2-threads.json"}
    for path in committed:
        payload = json.loads(path.read_text())
        assert common.result_path(path.parent, payload["script"], payload["device"], dtype=payload["dtype"],
                                  partial=payload.get("partial", False), smoke=payload["smoke"]) == path


def test_readme_table_leaves_out_partial_runs_and_keeps_dtypes_apart(tmp_path):
    common = _bench_module("_common")
    full = json.loads((REPO / "bench" / "results" / XEON_RUN).read_text())
    for name, changes in (("full", {}), ("partial", {"partial": True, "date": "2999-01-01", "torch": "partial-torch"}),
                          ("float64", {"dtype": "float64", "torch": "float64-torch",
                                       "headline": [{**h, "dtype": "float64"} for h in full["headline"]]})):
        common.write_json({**full, **changes}, tmp_path / f"step_throughput_{name}.json")
    table = common.update_readme_table(tmp_path).read_text()
    assert "partial-torch" not in table  # newer, but partial: the complete run's table stays
    assert f"**feedback_step on {full['device']}** (torch {full['torch']}" in table
    assert f"**feedback_step on {full['device']}, float64** (torch float64-torch" in table


def test_partial_runs_are_marked(step, tmp_path):
    def parse(*argv):
        return step.parse_args(["--device", "cpu", "--out", str(tmp_path), *argv])

    default = parse()
    assert default.partial is False and default.providers == default.default_providers
    assert parse("--providers", ",".join(default.default_providers)).partial is False
    assert parse("--providers", "eager").partial is True  # the default run has eager and compile at least


def test_step_throughput_without_eager_runs_and_writes_dashes(step, tmp_path, capsys):
    """--providers cpp (no eager) used to crash formatting the missing speed-ups after the whole run."""
    if "cpp" not in fbkernels.available_backends("cpu"):
        pytest.skip("no cpp backend")
    assert step.main(["--smoke", "--device", "cpu", "--providers", "cpp", "--out", str(tmp_path), "--no-plot",
                      "--no-progress"]) == 0
    payload = json.loads(next(tmp_path.glob("step_throughput_*_partial_smoke.json")).read_text())
    assert payload["providers"] == ["cpp"] and payload["partial"] is True
    assert all(row["speedup_vs_eager"] is None for row in payload["results"])
    entry = {"shape": "8x18x128x128", "dtype": "float32", "provider": "cpp", "fwd_ms": 1.0, "fwd_bwd_ms": 2.0,
             "fwd_bwd_gbps": 3.0, "fwd_bwd_peak_mem_mib": 4.0, "fwd_speedup": None, "fwd_bwd_speedup": None,
             "fwd_bwd_mem_vs_eager": None, "matches_eager": True}
    capsys.readouterr()
    step.print_headline({"headline": [entry]})
    assert "cpp fwd 1 ms, fwd_bwd 2 ms (eager not measured" in capsys.readouterr().out
    common = _bench_module("_common")
    common.write_json({**payload, "smoke": False, "partial": False, "headline": [entry]}, tmp_path / "step_throughput_x.json")
    assert "| cpp | 1 | 2 | 3 | 4 | - |" in common.update_readme_table(tmp_path).read_text()


def test_step_throughput_records_the_argv_it_was_given(step, tmp_path):
    argv = ["--smoke", "--device", "cpu", "--providers", "eager", "--out", str(tmp_path), "--no-plot", "--no-progress"]
    assert step.main(argv) == 0
    payload = json.loads(next(tmp_path.glob("step_throughput_*.json")).read_text())
    assert payload["argv"] == argv


def test_step_throughput_half_precision_without_a_fused_provider_says_why(step, tmp_path):
    """--dtype float16 --providers eager,cpp on CPU: cpp cannot run float16; the verdict says so instead of being
    empty, and the file is named for the dtype and as partial, so that it replaces no complete float32 run."""
    if "cpp" not in fbkernels.available_backends("cpu"):
        pytest.skip("no cpp backend")
    assert step.main(["--smoke", "--device", "cpu", "--dtype", "float16", "--providers", "eager,cpp", "--out",
                      str(tmp_path), "--no-plot", "--no-progress"]) == 0
    [path] = tmp_path.glob("step_throughput_*.json")
    assert path.name.endswith("_float16_partial_smoke.json")
    payload = json.loads(path.read_text())
    assert payload["providers"] == ["eager"]
    [line] = payload["verdict"]
    assert line.startswith("no fused provider measured: providers eager (cpp: cannot run float16 on cpu")


def test_mismatching_provider_gets_no_verdict_figures_and_a_failing_exit_status(step, tmp_path, monkeypatch, capsys):
    if "cpp" not in fbkernels.available_backends("cpu"):
        pytest.skip("no cpp backend")
    monkeypatch.setattr(step, "outputs_match", lambda result, reference, dtype: False)
    assert step.main(["--smoke", "--device", "cpu", "--providers", "eager,cpp", "--out", str(tmp_path), "--no-plot",
                      "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "do not match eager's result" in captured.err
    payload = json.loads(next(tmp_path.glob("step_throughput_*.json")).read_text())
    assert len(payload["verdict"]) == 4
    for line in payload["verdict"]:
        assert "cpp MISMATCH with eager's result" in line and "timing not comparable" in line
        assert "faster" not in line and "slower" not in line
    entry = {"shape": "8x18x128x128", "dtype": "float32", "provider": "cpp", "fwd_ms": 1.0, "fwd_bwd_ms": 2.0,
             "fwd_bwd_gbps": 3.0, "fwd_bwd_peak_mem_mib": 4.0, "fwd_speedup": 2.0, "fwd_bwd_speedup": 2.0,
             "fwd_bwd_mem_vs_eager": 0.5, "matches_eager": False}
    step.print_headline({"headline": [entry]})
    out = capsys.readouterr().out
    assert "cpp vs eager: MISMATCH with eager's result, timing not comparable" in out and "faster" not in out


def _verdict_rows(op, shapes_ms, providers=("eager", "compile", "cpp")):
    rows = []
    for shape, by_provider in shapes_ms.items():
        for pass_name in ("fwd", "fwd_bwd"):
            for provider in providers:
                rows.append({"op": op, "shape": list(shape), "pass": pass_name, "provider": provider,
                             "ms": by_provider[provider], "peak_mem_mib": 1.0, "frac_peak": 0.5, "sweep": "cbl",
                             "matches_eager": True})
    return rows


def test_context_gate_verdict_claims_only_the_comparisons_made(step):
    maps = {(128, 64, 16, 16): {"eager": 3.0, "compile": 1.0, "cpp": 0.5},  # 2x torch.compile
            (128, 128, 8, 8): {"eager": 3.0, "compile": 1.0, "cpp": 0.8}}  # 1.25x: the worst
    lines = step.verdict({"results": _verdict_rows("context_gate", maps), "providers": ["eager", "compile", "cpp"]})
    assert lines[0].startswith("context_gate fwd at 128x128x8x8 (worst of 2 CBL-CNN maps against torch.compile)")
    # Without torch.compile no "worst against torch.compile"; the largest map is the key shape.
    lines = step.verdict({"results": _verdict_rows("context_gate", maps, ("eager", "cpp")),
                          "providers": ["eager", "cpp"]})
    assert lines[0].startswith("context_gate fwd at 128x64x16x16 (largest of 2 CBL-CNN maps): cpp 0.5 ms")
    assert not any("torch.compile" in line for line in lines)
    # The smoke shape is no CBL-CNN map.
    smoke = {(4, 8, 8, 8): {"eager": 3.0, "compile": 1.0, "cpp": 0.5}, (2, 8, 4, 4): {"eager": 3.0, "compile": 1.0,
                                                                                      "cpp": 0.5}}
    for providers in (("eager", "cpp"), ("eager", "compile", "cpp")):
        lines = step.verdict({"results": _verdict_rows("context_gate", smoke, providers), "providers": list(providers)})
        assert lines and not any("CBL-CNN" in line for line in lines)
        assert lines[0].startswith("context_gate fwd at ")


def test_bandwidth_panel_shows_shares_above_110_percent(step, monkeypatch):
    common = _bench_module("_common")
    figures = []
    monkeypatch.setattr(common, "save_figure", lambda fig, path, payload: figures.append(fig) or path)
    rows = _verdict_rows("context_gate", {(128, 128, 8, 8): {"eager": 3.0, "compile": 1.0, "cpp": 0.5}})
    for row in rows:
        row["frac_peak"] = 1.5 if row["provider"] == "cpp" else 0.5
    step.plot({"results": rows, "providers": ["eager", "compile", "cpp"], "peak_gbps": 10.0}, Path("unused.png"))
    bandwidth_axes = figures[0].axes[2]
    assert bandwidth_axes.get_ylim()[1] >= 1.1 * 150
    import matplotlib.pyplot as plt

    plt.close(figures[0])


def test_readme_verdict_table_quotes_the_committed_verdict():
    """README.md's table of the committed run's verdict gives, per op and pass, the shape and figures of that
    run's JSON verdict line."""
    payload = json.loads((REPO / "bench" / "results" / XEON_RUN).read_text())
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("The verdict of the committed run"):]
    table = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                           for line in section.splitlines()[:20] if line.startswith("| "))}
    passes = {"fwd": "forward", "fwd_bwd": "forward + backward"}
    pattern = re.compile(r"(\w+) (fwd|fwd_bwd) at (\S+)(?: \([^)]*\))?: cpp (\S+) ms, (\S+ (?:faster|slower)) than "
                         r"eager, (\S+ (?:faster|slower)) than torch\.compile(?:, peak memory (\S+) eager's)?, "
                         r"(\d+)% of copy bandwidth at (\S+)$")
    assert len(payload["verdict"]) == 4
    for line in payload["verdict"]:
        op, pass_name, shape, ms, eager, compiled, memory, share, largest = pattern.match(line).groups()
        label = f"{op} {passes[pass_name]}" + (f", {shape}" if op == "context_gate" else "")
        assert label in table, (label, sorted(table))
        cells = table[label]
        assert cells[1:4] == [f"{ms} ms", eager, compiled], (line, cells)
        if memory is not None:
            assert cells[4] == memory, (line, cells)
        assert (f"{share}% at {largest}" in cells[5]) if largest != shape else cells[5].startswith(f"{share}%")
