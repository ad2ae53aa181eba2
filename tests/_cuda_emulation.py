"""Builds csrc/cuda's kernels, unchanged, for the CPU emulation of CUDA in tests/cuda_emulation, and loads them.

The .cu sources are compiled by g++ after two textual rewrites that keep every line number: a launch
`kernel<<<cfg>>>(args)` becomes `kernel | ::cuda_emulation::Config(cfg) | ::cuda_emulation::args(args)`, and each
__shared__ declaration is followed by a call that poisons the array at the start of every block. The result is a
shared library with C entry points (tests/cuda_emulation/c_api.cpp); `EmulatedCuda` wraps it with the same
functions and arguments as the real module fbkernels._C_cuda, so fbkernels/_cuda.py's host code drives it.

    python tests/_cuda_emulation.py OUT_DIR [--sanitize]    builds OUT_DIR/libfbk_cuda_emulation.so
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "tests" / "cuda_emulation"
CUDA_SOURCES = [ROOT / "csrc" / "cuda" / "feedback_step.cu", ROOT / "csrc" / "cuda" / "context_gate.cu"]
LIBRARY = "libfbk_cuda_emulation.so"
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
    """The C++ compiler ($CXX, else g++), or None without one that has _Float16 (GCC >= 12 on x86-64 has)."""
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if cxx is None:
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
    flags = ["-std=c++17", "-O2" if not sanitize else "-O1", "-g", "-fPIC", "-pthread", "-Wall",
             "-Wno-unknown-pragmas", "-Wno-unused-function", f"-I{EMULATION / 'include'}", f"-I{ROOT / 'csrc'}"]
    if sanitize:
        flags += SANITIZE_FLAGS
    units = []
    for cu in CUDA_SOURCES:
        translated = out_dir / (cu.stem + ".emulated.cpp")
        translated.write_text(f'#line 1 "{cu}"\n' + translate(cu.read_text()))
        units.append(translated)
    units += [EMULATION / "cuda_emulation.cpp", EMULATION / "c_api.cpp"]
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
    """The functions of fbkernels._C_cuda (same names and arguments), run by the emulation on CPU memory."""

    def __init__(self, library: Path):
        lib = ctypes.CDLL(str(library))
        ptr, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
        signatures = {
            "fbk_feedback_step_forward": [ptr] * 5 + [i64] * 4 + [i32, ptr],
            "fbk_feedback_step_num_partials": [i64] * 3 + [ctypes.POINTER(i64)],
            "fbk_feedback_step_backward": [ptr] * 9 + [i64] * 5 + [i32, ptr],
            "fbk_context_gate_forward": [ptr] * 3 + [i64] * 3 + [f64, i32, ptr],
            "fbk_context_gate_backward": [ptr] * 5 + [i64] * 3 + [f64, i32, ptr],
            "fbk_emulation_take_streams": [ctypes.POINTER(ctypes.c_uint64), i64],
        }
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int64 if name.startswith("fbk_emulation_") else ctypes.c_int
        lib.fbk_emulation_error.restype = ctypes.c_char_p
        lib.fbk_kernel_image_error.restype = ctypes.c_char_p
        self._lib = lib

    def _call(self, name, *args):
        status = getattr(self._lib, "fbk_" + name)(*args)
        if status:
            message = self._lib.fbk_emulation_error().decode()
            raise (ValueError if status == 1 else RuntimeError)(message)

    @staticmethod
    def _pointers(addresses):
        return [ctypes.c_void_p(a or None) for a in addresses]

    def feedback_step_forward(self, h, f, decay, h_next, v, B, d, N, k, dtype, stream):
        self._call("feedback_step_forward", *self._pointers([h, f, decay, h_next, v]), B, d, N, k, dtype,
                   ctypes.c_void_p(stream or None))

    def feedback_step_num_partials(self, B, d, N):
        out = ctypes.c_int64()
        self._call("feedback_step_num_partials", B, d, N, ctypes.byref(out))
        return out.value

    def feedback_step_backward(self, grad_h, grad_v, f, v, decay, grad_h_in, grad_f, grad_decay, partials,
                               partials_elements, B, d, N, k, dtype, stream):
        self._call("feedback_step_backward",
                   *self._pointers([grad_h, grad_v, f, v, decay, grad_h_in, grad_f, grad_decay, partials]),
                   partials_elements, B, d, N, k, dtype, ctypes.c_void_p(stream or None))

    def context_gate_forward(self, h, gate_logits, out, B, C, N, alpha, dtype, stream):
        self._call("context_gate_forward", *self._pointers([h, gate_logits, out]), B, C, N, alpha, dtype,
                   ctypes.c_void_p(stream or None))

    def context_gate_backward(self, grad_out, h, gate_logits, grad_h, grad_gate_logits, B, C, N, alpha, dtype,
                              stream):
        self._call("context_gate_backward", *self._pointers([grad_out, h, gate_logits, grad_h, grad_gate_logits]),
                   B, C, N, alpha, dtype, ctypes.c_void_p(stream or None))

    def kernel_image_error(self):
        return self._lib.fbk_kernel_image_error().decode()

    def take_launch_streams(self, max_launches=64):
        """The stream handle of each kernel launch since the last call, in launch order."""
        out = (ctypes.c_uint64 * max_launches)()
        count = self._lib.fbk_emulation_take_streams(out, max_launches)
        return list(out[:min(count, max_launches)])


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(build(Path(sys.argv[1]), sanitize="--sanitize" in sys.argv[2:]))
