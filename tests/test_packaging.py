"""What the package promises: declared floors that match the code, the licence and citation, hard dependencies that
are what fbkernels imports, a README example that runs, and experiment scripts that explain themselves and reject
bad values cleanly."""
import ast
import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+; 3.10 runs the rest of the suite
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _floor(requirement: str) -> tuple[int, ...]:
    match = re.search(r">=\s*([\d.]+)", requirement)
    assert match, f"no >= floor in {requirement!r}"
    return tuple(int(part) for part in match.group(1).split("."))


def _package_sources():
    return [p for p in (ROOT / "fbkernels").rglob("*.py")]


def _uses_pep604_in_annotations() -> bool:
    for path in _package_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                annotations = [a.annotation for a in node.args.args if a.annotation is not None]
                if any(isinstance(a, ast.BinOp) and isinstance(a.op, ast.BitOr) for a in annotations):
                    return True
    return False


def test_declared_floors_cover_what_the_code_uses():
    """`X | None` annotations are evaluated by torch.library at registration (Python >= 3.10); triton_op and
    wrap_triton appear in torch 2.6."""
    if _uses_pep604_in_annotations():
        assert _floor(PROJECT["requires-python"]) >= (3, 10), PROJECT["requires-python"]
    torch_requirement = next(r for r in PROJECT["dependencies"] if r.startswith("torch"))
    sources = "\n".join(p.read_text() for p in _package_sources())
    if "triton_op" in sources or "wrap_triton" in sources:
        assert _floor(torch_requirement) >= (2, 6), torch_requirement


def test_hard_dependencies_are_what_the_package_imports():
    imported, optional = set(), set()
    for path in _package_sources():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # `try: import x / except ImportError` marks x optional
            if isinstance(node, ast.Try) and any("ImportError" in ast.unparse(h.type or ast.Name("")) for h in node.handlers):
                optional |= {alias.name.split(".")[0] for n in node.body if isinstance(n, ast.Import) for alias in n.names}
                optional |= {n.module.split(".")[0] for n in node.body
                             if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    declared = {re.split(r"[<>=!~ \[]", r)[0] for r in PROJECT["dependencies"]}
    third_party = {name for name in imported
                   if name not in sys.stdlib_module_names and name not in ("fbkernels", "triton", *optional)}
    assert declared == third_party, (declared, third_party)  # triton is the optional extra of its backend
    assert "triton" in PROJECT["optional-dependencies"]["triton"]


def test_license_citation_and_metadata():
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "fbkernels developers" in license_text
    assert PROJECT["license"] == {"text": "MIT"}
    assert "License :: OSI Approved :: MIT License" in PROJECT["classifiers"]
    citation = (ROOT / "CITATION.cff").read_text()
    for needle in ("cff-version", "Deep Recurrence for Dynamical Segmentation Models", "arXiv:2507.10143",
                   "Contextual Backpropagation Loops", "arXiv:2412.17737"):
        assert needle in citation, needle
    for name, url in PROJECT.get("urls", {}).items():
        assert len(name) <= 32, f"{name!r}: core metadata refuses URL labels over 32 characters"
        assert url.startswith("https://") and "example" not in url and "TODO" not in url, url


@pytest.mark.slow
def test_wheel_carries_the_license(tmp_path):
    """Builds the wheel (CPU kernels only, about a minute) and reads its metadata."""
    env = dict(os.environ, FBKERNELS_CUDA="OFF")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                            "-w", str(tmp_path), str(ROOT)], env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheel = next(tmp_path.glob("fbkernels-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), names
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Python: >=3.10" in metadata
    assert "Requires-Dist: torch>=2.6" in metadata
    assert "Provides-Extra: experiments" in metadata


# ---------------------------------------------------------------- experiment scripts

def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_experiment_{name}", ROOT / "python" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run_script(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "python" / f"{name}.py"), *args], capture_output=True,
                          text=True, timeout=120)


def test_readme_usage_example_runs(tmp_path):
    # The README's Python example, as a user would paste it, run outside the source tree (the installed package).
    example = re.search(r"## Usage\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert example, "README.md lost its ## Usage python example"
    proc = subprocess.run([sys.executable, "-c", example.group(1)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps_line, backends_line = proc.stdout.strip().splitlines()[-2:]
    assert re.fullmatch(r"([1-9]|10) steps used", steps_line), proc.stdout
    assert "'eager'" in backends_line, proc.stdout


def test_feedback_unet_help_lists_experiments_and_defaults():
    run = _run_script("feedback_unet", "--help")
    assert run.returncode == 0, run.stderr
    module = _script("feedback_unet")
    for name, description in module.EXPERIMENT_HELP.items():
        assert name in run.stdout
        assert description.split(":")[0] in run.stdout
    assert re.search(r"\(default:\s+quick\)", run.stdout)
    for field in ("epochs", "sigmas", "train_sizes", "stability_steps"):
        assert re.search(rf"^\s+{field}\s", run.stdout, re.M), field


def test_cbl_help_shows_defaults_and_presets():
    run = _run_script("cbl", "--help")
    assert run.returncode == 0, run.stderr
    assert re.search(r"\(default:\s+quick\)", run.stdout) and re.search(r"\(default:\s+repropagate\)", run.stdout)
    for field in ("epochs", "batch_size", "widths"):
        assert re.search(rf"^\s+{field}\s", run.stdout, re.M), field


@pytest.mark.parametrize("script,args", [
    ("feedback_unet", ["noise", "--set", "epochs=abc"]),
    ("feedback_unet", ["noise", "--set", "sigmas=0,x"]),
    ("feedback_unet", ["noise", "--set", "nonsense=1"]),
    ("feedback_unet", ["noise", "--set", "epochs"]),
    ("cbl", ["--epochs", "abc"]),
])
def test_bad_values_give_a_usage_error_not_a_traceback(script, args):
    run = _run_script(script, *args)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stderr and "error:" in run.stderr, run.stderr


def test_paired_t_test_without_scipy_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    import numpy as np

    cbl = _script("cbl")
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 20):
        for scale in (1e-3, 1.0, 30.0):
            a = rng.normal(size=n)
            b = a + rng.normal(0.2, 0.5, size=n) * scale
            statistic, pvalue = cbl.paired_t_test(a, b)
            expected = stats.ttest_rel(a, b)
            assert statistic == pytest.approx(expected.statistic, rel=1e-10)
            assert pvalue == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300)


def test_cbl_summary_runs_without_scipy():
    code = ("import sys; sys.modules['scipy'] = None; sys.path.insert(0, %r); import cbl\n"
            "runs = [{'model': m, 'seed': s, 'test': {'accuracy': a}} for m, accs in "
            "(('standard', [0.70, 0.72, 0.69]), ('cbl', [0.74, 0.73, 0.75])) for s, a in enumerate(accs)]\n"
            "summary, ttest = cbl.summarize(runs); print(round(ttest['pvalue'], 6))" % str(ROOT / "python"))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert float(run.stdout) == pytest.approx(0.127643, abs=1e-6)  # scipy.stats.ttest_rel on these numbers


def test_cuda_architectures_given_once_do_not_stick_in_the_build_cache(tmp_path):
    """pip reuses build/: a -DCMAKE_CUDA_ARCHITECTURES given to one build must not apply to the next (README)."""
    import shutil

    pybind11 = pytest.importorskip("pybind11")
    cmake = shutil.which("cmake")
    if cmake is None or shutil.which("nvcc") is None:
        pytest.skip("needs cmake and nvcc")
    common = [cmake, "-S", str(ROOT), "-B", str(tmp_path), "-DFBKERNELS_CUDA=ON",
              f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}"]

    def configure(*extra):
        run = subprocess.run([*common, *extra], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        return next(line for line in run.stdout.splitlines() if "building CUDA kernels for" in line)

    assert configure("-DCMAKE_CUDA_ARCHITECTURES=86").endswith("for 86")
    assert configure().endswith("for 75-real;80-real;86-real;89-real;90-real;90-virtual")
