"""Backend selection: lazy probing (no CUDA at import), the source-tree diagnosis, FBKERNELS_BACKEND errors and the
fallback from "cuda" when the build has no kernel image for the GPU."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fbkernels
from fbkernels import _cuda, backends

ROOT = Path(__file__).resolve().parents[1]


def _torch_site_packages() -> str:
    return str(Path(torch.__file__).resolve().parents[1])


def _run_python(code: str, cwd, env_extra=None, isolated_site=False) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    env.pop("FBKERNELS_BACKEND", None)
    args = [sys.executable]
    if isolated_site:
        # No site processing: an installed (or editable) fbkernels cannot shadow the one on sys.path, torch comes
        # from PYTHONPATH. The current directory (sys.path[0] for -c) is searched first, as for a user in the repo.
        args.append("-S")
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([_torch_site_packages(), *sys.path[1:]]))
    return subprocess.run([*args, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_does_not_touch_cuda(tmp_path):
    """import fbkernels must not initialise CUDA (a fork after it would break) nor even ask whether CUDA exists."""
    run = _run_python("""
        import torch
        calls = []
        torch.cuda.is_available = lambda: calls.append("is_available") or False
        torch.cuda.device_count = lambda: calls.append("device_count") or 0
        import fbkernels, fbkernels.ops, fbkernels.models, fbkernels.data
        assert not torch.cuda.is_initialized(), "CUDA initialised at import"
        assert calls == [], calls
        # First use probes, once.
        fbkernels.available_backends("cpu")
        assert calls == [], calls
        fbkernels.available_backends("cuda")
        assert calls, "the cuda probe did not run"
        n = len(calls)
        fbkernels.available_backends("cuda")
        assert len(calls) == n, "the probe is not cached"
        print("ok")
    """, cwd=tmp_path)
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout + run.stderr


def _copy_source_tree(dest: Path) -> Path:
    """The repo's package and build files, without any compiled module: what a clone looks like before a build."""
    ignore = shutil.ignore_patterns("*.so", "*.pyd", "__pycache__")
    shutil.copytree(ROOT / "fbkernels", dest / "fbkernels", ignore=ignore)
    shutil.copytree(ROOT / "csrc", dest / "csrc", ignore=ignore)
    for name in ("pyproject.toml", "CMakeLists.txt"):
        shutil.copy(ROOT / name, dest / name)
    return dest


def test_source_tree_without_compiled_modules_is_diagnosed(tmp_path):
    """Python started in a clone imports its source tree: the cpp backend's reason and a one-time warning say so,
    and say how to run instead."""
    tree = _copy_source_tree(tmp_path / "clone")
    run = _run_python("""
        import warnings
        warnings.simplefilter("always")
        import fbkernels, torch
        from fbkernels.backends import unavailable_reason
        assert fbkernels.__file__.startswith(%r), fbkernels.__file__
        with warnings.catch_warnings(record=True) as caught:
            print("AVAILABLE", fbkernels.available_backends("cpu"))
            print("REASON", unavailable_reason("cpp", "cpu"))
            fbkernels.feedback_step(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.eye(2), 1)
            try:
                fbkernels.feedback_step(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.eye(2), 1, backend="cpp")
            except ValueError as err:
                print("ERROR", err)
        print("WARNINGS", len([w for w in caught if "source tree" in str(w.message)]))
        print("WARNED_AT", [w.filename for w in caught if "source tree" in str(w.message)])
    """ % str(tree), cwd=tree, isolated_site=True)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    available = next(line for line in out.splitlines() if line.startswith("AVAILABLE"))
    assert "'eager'" in available and "'cpp'" not in available, available
    reason = next(line for line in out.splitlines() if line.startswith("REASON"))
    assert "source tree" in reason and str(tree) in reason, reason
    assert "python -P" in reason and "pip install --no-build-isolation -e ." in reason, reason
    assert "reinstall" not in reason, reason
    error = next(line for line in out.splitlines() if line.startswith("ERROR"))
    assert "source tree" in error, error
    assert "WARNINGS 1" in out, out
    assert "WARNED_AT ['<string>']" in out, out  # the user's line, not a frame inside the package
    assert "pip install scikit-build-core pybind11" in reason, reason


def test_installed_package_is_not_diagnosed_as_a_source_tree():
    assert backends.source_tree_without_modules() is None


def test_bad_environment_backend_names_the_variable(monkeypatch):
    monkeypatch.setenv("FBKERNELS_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FBKERNELS_BACKEND"):
        fbkernels.context_gate(torch.randn(1, 2, 3), torch.randn(1, 2), 0.5)
    monkeypatch.setenv("FBKERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FBKERNELS_BACKEND='cuda'"):
        fbkernels.context_gate(torch.randn(1, 2, 3), torch.randn(1, 2), 0.5)
    # An explicit argument is named as the argument.
    monkeypatch.delenv("FBKERNELS_BACKEND")
    with pytest.raises(ValueError, match="backend must be one of"):
        fbkernels.context_gate(torch.randn(1, 2, 3), torch.randn(1, 2), 0.5, backend="tpu")


@pytest.mark.skipif("cpp" not in fbkernels.available_backends("cpu"), reason="fbkernels._C not built")
def test_compiled_graph_keeps_the_backend_it_was_traced_with(monkeypatch):
    """FBKERNELS_BACKEND is read when torch.compile traces a call (docs/design.md, section 3): the graph holds the
    backend chosen then, and a later change takes effect in eager calls at once, in a compiled function only after
    torch._dynamo.reset() (or a new torch.compile)."""
    from fbkernels.backends import host_module

    ran = []
    for name in ("cpp", "eager"):
        module = host_module(name)
        forward = module.feedback_step_forward
        monkeypatch.setattr(module, "feedback_step_forward",
                            lambda *args, _run=forward, _name=name: ran.append(_name) or _run(*args))
    monkeypatch.delenv("FBKERNELS_BACKEND", raising=False)
    h, f, decay = torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.eye(4)
    torch._dynamo.reset()
    step = torch.compile(lambda h, f, decay: fbkernels.feedback_step(h, f, decay, 2)[1], fullgraph=True)
    step(h, f, decay)
    assert ran[-1] == "cpp"
    monkeypatch.setenv("FBKERNELS_BACKEND", "eager")
    fbkernels.feedback_step(h, f, decay, 2)
    assert ran[-1] == "eager"
    step(h, f, decay)
    assert ran[-1] == "cpp"
    torch._dynamo.reset()
    step(h, f, decay)
    assert ran[-1] == "eager"
    torch._dynamo.reset()


# ---------------------------------------------------------------- cuda: kernel image for the device

DEFAULT_ARCHITECTURES = ["75-real", "80-real", "86-real", "89-real", "90-real", "90-virtual"]


@pytest.mark.parametrize("capability,runs", [
    ((7, 0), False),   # V100: older than every cubin, and PTX only runs on newer devices
    ((6, 1), False),
    ((7, 5), True),
    ((8, 0), True),
    ((8, 7), True),    # Orin: the sm_86 cubin runs on 8.7 (same major, newer minor)
    ((9, 0), True),
    ((10, 0), True),   # Blackwell: JIT from the compute_90 PTX
    ((12, 0), True),
])
def test_runs_on_compares_capability_with_the_built_architectures(capability, runs):
    assert _cuda.runs_on(capability, DEFAULT_ARCHITECTURES) is runs


def test_runs_on_reads_every_cmake_form():
    assert not _cuda.runs_on((10, 0), ["80-real", "90-real"])  # cubins only: no PTX for newer majors
    assert _cuda.runs_on((8, 6), ["80"])                      # plain "80": cubin and PTX
    assert _cuda.runs_on((9, 0), ["80-virtual"])
    assert not _cuda.runs_on((7, 5), ["80-virtual"])
    assert _cuda.runs_on((7, 0), ["all"])                     # undecidable by name: the runtime probe decides


def test_image_reason_names_the_gpu_the_build_and_the_fix():
    assert _cuda.image_reason("H100", (9, 0), DEFAULT_ARCHITECTURES, None) is None
    reason = _cuda.image_reason("Tesla V100", (7, 0), DEFAULT_ARCHITECTURES, None)
    assert "Tesla V100" in reason and "7.0" in reason and "75-real" in reason
    assert "-DCMAKE_CUDA_ARCHITECTURES=70" in reason
    # The arch list says yes but the driver says no (e.g. PTX newer than the driver): its words are kept.
    reason = _cuda.image_reason("H100", (9, 0), DEFAULT_ARCHITECTURES, "the provided PTX was compiled with an "
                                "unsupported toolchain")
    assert "unsupported toolchain" in reason


def test_cuda_without_an_image_falls_back_to_triton_with_one_warning(monkeypatch):
    """backend=None on a GPU the build has no code for: triton (or eager) with a stated reason, not 'cuda' and
    a "no kernel image" failure at every call."""
    monkeypatch.setattr(backends, "_REASONS", {})
    monkeypatch.setattr(backends, "_WARNED", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "_module_found", lambda module: True)
    monkeypatch.setattr(_cuda, "missing_image_reason", lambda index: _cuda.image_reason(
        "Tesla V100", (7, 0), DEFAULT_ARCHITECTURES, None))
    monkeypatch.delenv("FBKERNELS_BACKEND", raising=False)
    device = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match="Tesla V100") as caught:
        assert backends.resolve_backend(None, device, torch.float32) == "triton"
        assert backends.resolve_backend(None, device, torch.float16) == "triton"
    assert len(caught) == 1
    with pytest.raises(ValueError, match="no kernel image for Tesla V100"):
        backends.resolve_backend("cuda", device, torch.float32)
    monkeypatch.setattr(backends, "_REASONS", {})
    monkeypatch.setattr(backends, "_module_found", lambda module: module != "triton")
    assert backends.resolve_backend(None, device, torch.float32) == "eager"
