"""Test session setup: Triton's interpreter, a fixed seed, the GPU skip, and the heavy suites behind markers.

Plain `pytest` runs the fast suite. The heavy suites carry the markers registered in pyproject.toml and run when a
marker expression selects them (`pytest -m emulation`, `pytest -m "slow or bench"`; .ci/run selects all but `slow`)
or when their file is named on the command line (`pytest tests/test_bench.py`), except the `slow` tests, which
need -m.
"""
import os
from pathlib import Path

# The Triton kernels are tested on CPU tensors through Triton's interpreter, which must be switched on
# before triton is first imported anywhere in the test session.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HEAVY_MARKERS = ("slow", "emulation", "sanitizer", "ddp", "experiments", "bench", "ptxas")

# Heavy tests of the other test files, by (file, test): a test's name with or without its parameters, or None for
# every test of the file. The most specific entry wins: the sanitizer rerun is not part of the emulation suite.
MARKERS_BY_TEST = {
    ("test_cuda_emulation.py", None): "emulation",
    ("test_cuda_emulation.py", "test_under_address_sanitizer"): "sanitizer",
    ("test_triton.py", "test_kernels_compile_for_an_nvidia_gpu"): "ptxas",
    ("test_train.py", "test_two_process_ddp_on_cpu_ends_with_equal_weights"): "ddp",
    ("test_cbl.py", "test_quick_preset_end_to_end_and_resume"): "experiments",
    ("test_cbl.py", "test_cifar10_experiment_on_written_batches"): "experiments",
    ("test_cbl.py", "test_full_quick_preset_runs"): "experiments",
    ("test_bench.py", "test_step_throughput_smoke"): "bench",
    ("test_bench.py", "test_step_throughput_smoke_compile"): "bench",
    ("test_bench.py", "test_train_step_smoke"): "bench",
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _files_named_on_the_command_line(config) -> set:
    root = Path(config.invocation_params.dir)
    paths = (root / arg.split("::")[0] for arg in config.args)
    return {path.resolve() for path in paths if path.is_file()}


def pytest_collection_modifyitems(config, items):
    for item in items:
        file = item.path.name
        for key in ((file, item.name), (file, getattr(item, "originalname", item.name)), (file, None)):
            marker = MARKERS_BY_TEST.get(key)
            if marker is not None:
                break
        if marker is not None:
            item.add_marker(marker)

    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(skip_gpu)

    if config.option.markexpr:
        return  # pytest's own -m selection decides
    named = _files_named_on_the_command_line(config)
    selected, deselected = [], []
    for item in items:
        heavy = {mark.name for mark in item.iter_markers()} & set(HEAVY_MARKERS)
        explicitly_run = item.path.resolve() in named and "slow" not in heavy
        (deselected if heavy and not explicitly_run else selected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected
