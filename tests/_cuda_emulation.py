"""Builds csrc/cuda's kernels and bindings, unchanged, for the CPU emulation of CUDA in tests/cuda_emulation, and
loads them.

The .cu sources are compiled by g++ after two textual rewrites that keep every line number: a launch
`kernel<<<cfg>>>(args)` becomes `kernel | ::cuda_emulation::Config(cfg) | ::cuda_emulation::args(args)`, and each
__shared__ declaration is followed by a call that poisons the array at the start of every block. They are linked
with the real pybind11 bindings (csrc/cuda/bindings.cpp) into an extension module `_C_cuda`: `EmulatedCuda` is
that module (same parameter structs and functions as fbkernels._C_cuda, so fbkernels/_cuda.py's host code drives
it) plus what only the emulation can tell, the stream of each launch.

    python tests/_cuda_emulation.py OUT_DIR [--sanitize]    builds OUT_DIR/_C_cuda_emulated.so
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "tests" / "cuda_emulation"
CUDA_SOURCES = [ROOT / "csrc" / "cuda" / "feedback_step.cu", ROOT / "csrc" / "cuda" / "context_gate.cu"]
LIBRARY = "_C_cuda_emulated.so"
# AddressSanitizer (out-of-bounds global memory, use after free) and UndefinedBehaviorSanitizer (misaligned
# vector accesses, signed overflow in index arithmetic); any finding aborts the process.
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]

_SHARED_DECLARATION = re.compile(r"__shared__[^;]*?\b(\w+)\s*\[[^;]*;")


def translate(source: str) -> str:
    """The .cu text with launches and shared arrays rewritten for the emulation (same line numbers)."""
    if source.count("<<<") != source.count(">>>("):
        raise ValueError("every kernel launch must be written kernel<<<config>>>(arguments)")
    source = source.replace("<<<", "| ::cuda_emulation::Config(").replace(">>>(", ") | ::cuda_emulation::args(")
    return _SHARED_DECLARATION.sub(
        lambda m: f"{m.group(0)} ::cuda_emulation::poison_shared({m.group(1)}, sizeof({m.group(1)}));", source)


@functools.lru_cache(maxsize=None)
def compiler() -> str | None:
    """The C++ compiler ($CXX, else g++), or None without one that has _Float16 (GCC >= 12 on x86-64 has) or
    without pybind11 (the bindings are built too)."""
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if cxx is None or importlib.util.find_spec("pybind11") is None:
        return None
    probe = subprocess.run([cxx, "-x", "c++", "-std=c++17", "-fsyntax-only", "-"], input="_Float16 half_value;\n",
                           capture_output=True, text=True)
    return cxx if probe.returncode == 0 else None


def build(out_dir: Path, sanitize: bool = False) -> Path:
    """Compiles the emulated kernels into out_dir/LIBRARY and returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    import pybind11

    flags = ["-std=c++17", "-O2" if not sanitize else "-O1", "-g", "-fPIC", "-pthread", "-Wall",
             "-Wno-unknown-pragmas", "-Wno-unused-function", f"-I{EMULATION / 'include'}", f"-I{ROOT / 'csrc'}",
             f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
             '-DFBKERNELS_CUDA_ARCHITECTURES="emulated"']
    if sanitize:
        flags += SANITIZE_FLAGS
    units = []
    for cu in CUDA_SOURCES:
        translated = out_dir / (cu.stem + ".emulated.cpp")
        translated.write_text(f'#line 1 "{cu}"\n' + translate(cu.read_text()))
        units.append(translated)
    units += [EMULATION / "cuda_emulation.cpp", ROOT / "csrc" / "cuda" / "bindings.cpp"]
    objects, jobs = [], []
    for unit in units:
        obj = out_dir / (unit.name + ".o")
        objects.append(obj)
        jobs.append(subprocess.Popen([cxx, *flags, "-c", str(unit), "-o", str(obj)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    errors = [out for job in jobs for out in [job.communicate()[0]] if job.returncode != 0]
    if errors:
        raise RuntimeError("building the emulated CUDA kernels failed:\n" + "\n".join(errors))
    library = out_dir / LIBRARY
    subprocess.run([cxx, *flags, "-shared", *map(str, objects), "-o", str(library)], check=True)
    return library


class EmulatedCuda:
    """The emulated fbkernels._C_cuda (its attributes are the module's) and the streams its kernels launched on."""

    def __init__(self, library: Path):
        # PyInit__C_cuda: the module must be loaded under the name the bindings declare.
        spec = importlib.util.spec_from_file_location("_C_cuda", library)
        self._module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self._module)
        self._lib = ctypes.CDLL(str(library))  # the same loaded library: its launch record
        self._lib.fbk_emulation_take_streams.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_int64]
        self._lib.fbk_emulation_take_streams.restype = ctypes.c_int64

    def __getattr__(self, name):
        return getattr(self._module, name)

    def take_launch_streams(self, max_launches=64):
        """The stream handle of each kernel launch since the last call, in launch order."""
        out = (ctypes.c_uint64 * max_launches)()
        count = self._lib.fbk_emulation_take_streams(out, max_launches)
        return list(out[:min(count, max_launches)])


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(build(Path(sys.argv[1]), sanitize="--sanitize" in sys.argv[2:]))
