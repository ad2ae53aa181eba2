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
