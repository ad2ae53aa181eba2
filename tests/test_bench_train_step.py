"""bench/train_step.py: the smoke run writes JSON of the documented form, and its gradient check catches a broken path.

No timing assertions (the machine is shared). The reference schedule's gradients are checked against the summed
loss's on a tiny model: the comparison the benchmark relies on before it times anything.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
ROW_KEYS = {"op", "path", "provider", "dtype", "shape", "pass", "steps", "bptt", "schedule", "ms", "p20_ms", "p80_ms",
            "peak_mem_mib", "compile_s", "grad_rel_err", "speedup_vs_reference", "memory_vs_reference", "ms_in_unit",
            "mem_in_unit", "gbps", "frac_peak"}


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import train_step
    finally:
        sys.path.remove(str(BENCH))
    return train_step


TINY_UNET = {"in_channels": 3, "num_classes": 2, "seg_channels": 3, "width": 4, "depth": 1}
TINY_CBL = {"in_channels": 3, "num_classes": 4, "alpha": 0.0, "context_dim": 4, "mode": "state",
            "widths": (4, 4, 4, 4), "hidden": 4}


def _unet_data():
    gen = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, 8, 8, generator=gen), torch.randint(0, 2, (1, 8, 8), generator=gen)


def test_gradient_error_flags_a_perturbed_gradient(bench):
    expected = {"a": torch.tensor([1.0, -2.0, 4.0]), "b": torch.tensor([[0.5]]), "unused": None}
    same = {name: None if g is None else g.clone() for name, g in expected.items()}
    assert bench.gradient_error(expected, same) == (0.0, "")
    assert bench.assert_equal_gradients(expected, same, 1e-6, "same") == 0.0

    perturbed = {**same, "a": expected["a"] + torch.tensor([0.0, 0.0, 4e-3])}  # 1e-3 of max|g|
    error, name = bench.gradient_error(expected, perturbed)
    assert name == "a" and error == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(AssertionError, match="'a'"):
        bench.assert_equal_gradients(expected, perturbed, 1e-4, "perturbed")
    # A gradient where none is expected, a missing one and a NaN are failures too.
    with pytest.raises(AssertionError, match="'unused'"):
        bench.assert_equal_gradients(expected, {**same, "unused": torch.ones(2)}, 1e-4, "extra")
    with pytest.raises(AssertionError, match="'b'"):
        bench.assert_equal_gradients(expected, {**same, "b": None}, 1e-4, "missing")
    with pytest.raises(AssertionError, match="'a'"):
        bench.assert_equal_gradients(expected, {**same, "a": torch.full((3,), float("nan"))}, 1e-4, "nan")


def test_reference_schedule_gradients_equal_the_summed_loss(bench):
    x, target = _unet_data()
    steps = 4
    device = torch.device("cpu")
    grads = {path: bench.make_unet_step(path, TINY_UNET, x, target, steps, device, torch.float32).gradients()
             for path in ("reference", "eager", "default", "checkpoint")}
    for path in ("reference", "default", "checkpoint"):
        assert bench.assert_equal_gradients(grads["eager"], grads[path], 1e-5, path) <= 1e-5


def test_gradient_check_catches_a_schedule_that_drops_steps(bench):
    """A per-step schedule that forgets the retained steps' losses (only the last one backpropagated) fails."""
    x, target = _unet_data()
    device = torch.device("cpu")
    eager = bench.make_unet_step("eager", TINY_UNET, x, target, 3, device, torch.float32)
    model = bench.build_unet(TINY_UNET, "reference", device, torch.float32)

    def last_step_only():
        F.cross_entropy(model(x, steps=3)[-1], target).backward()

    broken = bench.TrainStep(model, last_step_only)
    with pytest.raises(AssertionError, match="differs from the eager path"):
        bench.assert_equal_gradients(eager.gradients(), broken.gradients(), 1e-4, "broken")


def test_cbl_reference_schedule_gradients_equal_the_summed_loss(bench):
    gen = torch.Generator().manual_seed(2)
    x, target = torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 4, (2,), generator=gen)
    device = torch.device("cpu")
    grads = {path: bench.make_cbl_step(path, TINY_CBL, x, target, 3, device, torch.float32).gradients()
             for path in ("reference", "eager", "default")}
    for path in ("reference", "default"):
        bench.assert_equal_gradients(grads["eager"], grads[path], 1e-5, path)


@pytest.mark.parametrize("callers_setting", [None, "/caller/inductor-cache"])
def test_fresh_compile_cache_is_removed_and_the_callers_setting_restored(bench, tmp_path, monkeypatch,
                                                                         callers_setting):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    if callers_setting is None:
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", callers_setting)
    seen = {}

    def run(args):
        seen["cache"] = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
        assert seen["cache"].is_dir() and seen["cache"].parent == tmp_path
        (seen["cache"] / "generated.py").write_text("# code inductor would write\n")
        return {"results": []}

    monkeypatch.setattr(bench, "run", run)
    monkeypatch.setattr(bench, "write_outputs", lambda args, payload: seen.setdefault("payload", payload))
    assert bench.main(["--smoke", "--fresh-compile-cache", "--out", str(tmp_path / "out")]) == 0
    assert seen["payload"] == {"results": [], "inductor_cache_dir_removed": True}
    assert not seen["cache"].exists()
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == callers_setting


@pytest.mark.bench
def test_train_step_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "train_step.py"), "--smoke", "--device", "cpu", "--threads", "1", "--out",
         str(tmp_path), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = sorted(tmp_path.glob("train_step_*_smoke.json"))
    assert len(files) == 1, files
    assert files[0].with_suffix(".png").stat().st_size > 0
    payload = json.loads(files[0].read_text())
    assert payload["smoke"] is True and payload["device"] and payload["torch"] == torch.__version__
    assert payload["peak_mem_method"] and payload["timing_method"]
    rows = payload["results"]
    for row in rows:
        assert ROW_KEYS <= set(row), row
        assert row["ms"] > 0 and row["p20_ms"] <= row["ms"] <= row["p80_ms"] and row["peak_mem_mib"] > 0
        assert row["speedup_vs_reference"] > 0 and row["ms_in_unit"] > 0
    seen = {(r["op"], r["path"], r["steps"]) for r in rows}
    for steps in (2, 3):
        for path in ("reference", "eager", "default", "checkpoint"):
            assert ("feedback_unet_train_step", path, steps) in seen
        assert ("feedforward_unet_train_step", "feedforward", steps) in seen
    for path in ("reference", "eager", "default"):
        assert ("cbl_cnn_train_step", path, 2) in seen
    for row in rows:
        if row["path"] not in ("feedforward",):
            assert row["grad_rel_err"] <= payload["grad_tol"]
        else:
            assert row["provider"] == "-"  # the units run no fbkernels op
        if row["path"] == "reference":
            assert row["speedup_vs_reference"] == 1.0 and row["schedule"] == "per_step_backward"
    assert len(payload["summary"]) == 3 and all("reference schedule" in line for line in payload["summary"])
    assert set(payload["fastest"]) == {"FeedbackUNet T=2", "FeedbackUNet T=3", "CBLCNN T=2"}
    assert "| model | input | T | path |" in proc.stdout and "summary: FeedbackUNet T=2" in proc.stdout


@pytest.mark.slow
@pytest.mark.bench
def test_train_step_smoke_compiled_paths(tmp_path):
    """Both compiled paths (whole model, network only) pass the gradient check and report their compile time."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "train_step.py"), "--smoke", "--models", "unet", "--compile-steps", "2",
         "--compile-network-steps", "2", "--device", "cpu", "--threads", "1", "--out", str(tmp_path),
         "--no-progress", "--no-plot"],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    payload = json.loads(next(tmp_path.glob("train_step_*_smoke.json")).read_text())
    compiled = [r for r in payload["results"] if r["compiled"]]
    assert {(r["path"], r["steps"]) for r in compiled} == {("compile", 2), ("compile_network", 2)}
    for row in compiled:
        assert row["compile_s"] > 0 and row["grad_rel_err"] <= payload["compile_grad_tol"]
        assert set(row["compile_cache"]) == {"fxgraph_cache_hit", "fxgraph_cache_miss"}


@pytest.mark.slow
def test_reference_reports_the_authors_equilibrium_step(bench):
    """With the decay M(t) -> 0 the state settles: the authors' test holds before T=20, and stopping there (their
    loop) gives another gradient than the T-step one that every path of the bench computes."""
    x, target = _unet_data()
    device = torch.device("cpu")
    full = bench.make_unet_step("reference", TINY_UNET, x, target, 20, device, torch.float32)
    grads = full.gradients()
    settled = full.info["equilibrium_step"]
    assert settled is not None and 1 < settled < 20
    model = bench.build_unet(TINY_UNET, "reference", device, torch.float32)
    stopped = bench.TrainStep(model, lambda: bench.unet_reference_backward(model, x, target, 20,
                                                                           stop_at_equilibrium=True))
    with pytest.raises(AssertionError):
        bench.assert_equal_gradients(grads, stopped.gradients(), 1e-4, "stopped")


# ---------------------------------------------------------------- command line (fast, in-process)

def _parse_error(bench, argv, capsys) -> str:
    """The message of the parser error that `argv` gives (SystemExit 2, before anything runs)."""
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], "--device: expected cpu, cuda or cuda:N with CUDA available, got 'cuda': CUDA is not "
                           "available"),
    (["--device", "gpu"], "--device: expected cpu, cuda or cuda:N, got 'gpu'"),
    (["--threads", "0"], "--threads: expected a positive integer, got '0'"),
    (["--size", "0"], "--size: expected a positive integer, got '0'"),
    (["--size", "-3"], "--size: expected a positive integer, got '-3'"),
    (["--size", "4"], "--size: expected at least 8"),
    (["--batch", "0"], "--batch: expected a positive integer, got '0'"),
    (["--cbl-batch", "0"], "--cbl-batch: expected a positive integer, got '0'"),
    (["--repeats", "0"], "--repeats: expected a positive integer, got '0'"),
    (["--repeats", "-1"], "--repeats: expected a positive integer, got '-1'"),
    (["--budget", "nan"], "--budget: expected a finite number >= 0, got 'nan'"),
    (["--budget", "-1"], "--budget: expected a finite number >= 0, got '-1'"),
    (["--grad-tol", "nan"], "--grad-tol: expected a finite number >= 0, got 'nan'"),
    (["--grad-tol=-1e-4"], "--grad-tol: expected a finite number >= 0, got '-1e-4'"),
    (["--compile-grad-tol", "inf"], "--compile-grad-tol: expected a finite number >= 0, got 'inf'"),
    (["--steps", "0"], "--steps: expected comma-separated positive integers (or none), got '0'"),
    (["--steps", "abc"], "--steps: expected comma-separated positive integers (or none), got 'abc'"),
    (["--steps", "5,,10"], "--steps: expected comma-separated positive integers (or none), got '5,,10'"),
    (["--steps", "none"], "--steps: expected at least one T, got none"),
    (["--steps", "5,5"], "--steps: expected each T once, got '5,5'"),
    (["--cbl-steps", "0"], "--cbl-steps: expected comma-separated positive integers (or none), got '0'"),
    (["--steps", "5,10", "--compile-steps", "20"], "--compile-steps: expected T among --steps 5,10, got 20"),
    (["--compile-network-steps", "7"], "--compile-network-steps: expected T among --steps 5,10,20, got 7"),
    (["--cbl-compile-steps", "3"], "--cbl-compile-steps: expected T among --cbl-steps 2,10, got 3"),
    (["--smoke", "--compile-steps", "5"], "--compile-steps: expected T among --steps 2,3, got 5"),
    (["--models", ""], "--models: expected a comma-separated subset of unet, cbl, got ''"),
    (["--models", "unet,unet"], "--models: expected each model once"),
    (["--models", "cbl", "--steps", "5"], "--steps: expected only with unet in --models, got --models cbl"),
    (["--models", "unet", "--cbl-batch", "4"], "--cbl-batch: expected only with cbl in --models, got --models unet"),
])
def test_parser_errors(bench, capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    error = _parse_error(bench, ["--device", "cpu", "--out", str(tmp_path), *argv], capsys)
    assert message in error, error


def test_out_must_be_a_writable_directory(bench, capsys, tmp_path):
    existing_file = tmp_path / "file"
    existing_file.write_text("")
    error = _parse_error(bench, ["--device", "cpu", "--out", str(existing_file)], capsys)
    assert f"--out: expected a directory, got '{existing_file}', an existing file" in error


def test_smoke_defaults_yield_to_explicit_options(bench, tmp_path):
    def parse(*argv):
        return bench.parse_args(["--device", "cpu", "--out", str(tmp_path), *argv])

    smoke = parse("--smoke")
    assert (smoke.steps, smoke.cbl_steps, smoke.size, smoke.batch, smoke.cbl_batch, smoke.repeats, smoke.budget) == \
        ([2, 3], [2], 16, 1, 2, 1, 0.0)
    assert (smoke.compile_steps, smoke.compile_network_steps, smoke.cbl_compile_steps) == ([], [], [])
    given = parse("--smoke", "--steps", "4", "--cbl-steps", "3", "--size", "32", "--batch", "2", "--cbl-batch", "3",
                  "--repeats", "2", "--budget", "0.5", "--compile-steps", "4", "--cbl-compile-steps", "3")
    assert (given.steps, given.cbl_steps, given.size, given.batch, given.cbl_batch, given.repeats, given.budget) == \
        ([4], [3], 32, 2, 3, 2, 0.5)
    assert (given.compile_steps, given.compile_network_steps, given.cbl_compile_steps) == ([4], [], [3])
    default = parse()
    assert (default.steps, default.cbl_steps, default.size, default.batch, default.cbl_batch, default.repeats,
            default.budget) == ([5, 10, 20], [2, 10], 64, 1, 8, 5, 10.0)
    assert (default.compile_steps, default.compile_network_steps, default.cbl_compile_steps) == ([5], [5, 10, 20], [2])
    assert default.partial is False and smoke.partial is False


def test_compile_step_lists(bench, tmp_path):
    """Default compiled T are those of the run; an empty list means none (it used to mean the default)."""
    def parse(*argv):
        return bench.parse_args(["--device", "cpu", "--out", str(tmp_path), *argv])

    assert parse("--steps", "10,20", "--cbl-steps", "10").compile_steps == []
    assert parse("--steps", "10,20", "--cbl-steps", "10").cbl_compile_steps == []
    assert parse("--compile-steps", "").compile_steps == []
    assert parse("--compile-steps", "none").compile_steps == []
    assert parse("--compile-steps", "10,20").compile_steps == [10, 20]


def test_partial_runs_are_marked(bench, tmp_path):
    def parse(*argv):
        return bench.parse_args(["--device", "cpu", "--out", str(tmp_path), *argv])

    assert parse("--models", "cbl,unet").partial is False
    assert parse("--steps", "5,10,20,40").partial is False  # more than the default run
    for argv in (["--models", "unet"], ["--steps", "5,10"], ["--cbl-steps", "2"], ["--compile-steps", "none"],
                 ["--compile-network-steps", "5"], ["--cbl-compile-steps", ""]):
        assert parse(*argv).partial is True, argv
    assert parse("--smoke", "--models", "unet").partial is True


def test_budget_help_says_what_it_buys(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"at most max(--repeats, {bench.MAX_ROUNDS})" in text
    assert "beyond the minimum repeats" not in text


def test_run_uses_the_options_given_and_records_them(bench, tmp_path, capsys):
    """A tiny in-process run: explicit options win over --smoke's, the JSON records repeats and budget and is
    named as a partial run (no FeedbackUNet), the first line describes only the model run, the README table names
    each row's path and provider."""
    argv = ["--smoke", "--device", "cpu", "--models", "cbl", "--cbl-steps", "1", "--cbl-batch", "1", "--repeats", "2",
            "--budget", "0.01", "--out", str(tmp_path), "--no-plot", "--no-progress"]
    assert bench.main(argv) == 0
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert "CBLCNN batch 1, T in [1]" in first and "FeedbackUNet" not in first
    [path] = tmp_path.glob("train_step_*.json")
    assert path.name.endswith("_partial_smoke.json")
    payload = json.loads(path.read_text())
    assert payload["argv"] == argv
    assert (payload["repeats"], payload["budget_s"], payload["max_rounds"]) == (2, 0.01, bench.MAX_ROUNDS)
    assert {r["steps"] for r in payload["results"]} == {1} and all(r["repeats"] >= 2 for r in payload["results"])
    assert {r["shape"][0] for r in payload["results"]} == {1}
    assert all(r["provider"] == "-" for r in payload["results"] if r["path"] == "feedforward")
    assert all(h["path"] != h["provider"] or h["path"] == "eager" for h in payload["headline"])
    sys.path.insert(0, str(BENCH))
    try:
        import _common as common
    finally:
        sys.path.remove(str(BENCH))
    common.write_json({**payload, "smoke": False, "partial": False}, tmp_path / "train_step_x.json")
    table = common.update_readme_table(tmp_path).read_text()
    assert "| model | input [B,C,H,W] | steps T | path | provider | bptt | step ms | peak MiB |" in table
    default = next(r for r in payload["results"] if r["path"] == "default")
    assert f"| CBLCNN | 1x3x32x32 | 1 | default | {default['provider']} | - |" in table


def test_readme_table_of_the_committed_training_run_names_paths_and_providers(tmp_path):
    """The committed train_step JSON predates the headline's "path": its table still gets the real providers."""
    sys.path.insert(0, str(BENCH))
    try:
        import _common as common
    finally:
        sys.path.remove(str(BENCH))
    committed = REPO / "bench" / "results" / "train_step_amd-epyc-2-threads.json"
    (tmp_path / committed.name).write_text(committed.read_text())
    table = common.update_readme_table(tmp_path).read_text()
    assert "| steps T | path | provider | bptt |" in table and "| ops |" not in table
    assert "| FeedbackUNet | 1x3x64x64 | 5 | reference | eager | full |" in table
    assert "| FeedbackUNet | 1x3x64x64 | 5 | default | cpp | full |" in table
