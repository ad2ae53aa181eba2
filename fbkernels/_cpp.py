"""Host side of the "cpp" backend: allocates outputs with torch and calls the C++ kernels (fbkernels._C_avx512,
_C_avx2 or _C).

All functions take contiguous [B, d, *S] tensors of one dtype on the CPU (the kernels see B, d and N = prod(S)) and
return outputs of that shape.
Each call fills one parameter struct (fbkernels/_params.py: sizes, dtype code, thread count; then pointers and which
gradients to write, assigned field by field here: a call on small maps takes microseconds, and the generic keyword
fill costs a few more) and calls one compiled entry per op and pass. The kernels run on PyTorch's own OpenMP thread
pool, with ``torch.get_num_threads()`` threads; their results do not depend on the thread count.
"""
from __future__ import annotations

import importlib
import math
import os
import sys
import threading
import warnings

import torch

from ._params import context_gate_params, feedback_step_params, pointer
from ._settings import check_choice


# The compiled CPU modules, widest instruction set first: (isa, module, PyTorch CPU capabilities that run it).
CPU_BUILDS = (
    ("avx512", "fbkernels._C_avx512", ("AVX512",)),
    ("avx2", "fbkernels._C_avx2", ("AVX2", "AVX512")),
    ("default", "fbkernels._C", None),  # any x86-64 (SSE2), or any other CPU
)


def _build(isa: str):
    """The CPU_BUILDS entry of ``isa``."""
    check_choice("isa", isa, [name for name, _, _ in CPU_BUILDS])
    return next(build for build in CPU_BUILDS if build[0] == isa)


def cpu_runs(isa: str) -> bool:
    """Whether this CPU runs the build for ``isa``, as PyTorch detects it (ATEN_CPU_CAPABILITY=default: only
    "default")."""
    capabilities = _build(isa)[2]
    return capabilities is None or torch.backends.cpu.get_cpu_capability() in capabilities


def load_kernels(isa: str | None = None):
    """The compiled CPU kernels built for ``isa`` ("avx512", "avx2" or "default"; ImportError where not built;
    whether this CPU runs them is the caller's to check, with cpu_runs), or by default the widest build that was
    built and that this CPU runs."""
    if isa is not None:
        return importlib.import_module(_build(isa)[1])
    for name, module, _ in CPU_BUILDS:
        if cpu_runs(name):
            try:
                return importlib.import_module(module)
            except ImportError:  # not built (not x86-64, or a compiler without the flags)
                if name == "default":
                    raise


def loaded_openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes (libgomp, libomp, libiomp) mapped into this process (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6}
    except OSError:
        return []
    names = ("libgomp", "libomp", "libiomp")
    return sorted(path for path in paths if any(path.rsplit("/", 1)[-1].startswith(name) for name in names))


_C = load_kernels()

if len(loaded_openmp_runtimes()) > 1:
    # PyTorch's runtime under another soname (some wheels ship a hashed libgomp-<hash>.so.1): the kernels got a
    # second runtime whose worker threads compete with PyTorch's.
    warnings.warn(
        "fbkernels: more than one OpenMP runtime is loaded (" + ", ".join(loaded_openmp_runtimes()) + "); the cpp "
        "kernels' threads compete with PyTorch's. Setting OMP_WAIT_POLICY=passive limits the cost.",
        RuntimeWarning, stacklevel=2,
    )


def _feedback_step_params(like, num_feedback, **fields):
    """_C.FeedbackStepParams for a state ``like`` [B, d, *S], running on torch.get_num_threads() threads."""
    params = feedback_step_params(_C, like, num_feedback, **fields)
    params.num_threads = max(1, torch.get_num_threads())
    return params


def _context_gate_params(like, alpha, **fields):
    """_C.ContextGateParams for a feature map ``like`` [B, C, *S], running on torch.get_num_threads() threads."""
    params = context_gate_params(_C, like, alpha, **fields)
    params.num_threads = max(1, torch.get_num_threads())
    return params


class LargeOutputCache:
    """Reuses the memory of large outputs (>= ``min_bytes``) and of streamed ones that nothing references any more.

    glibc gives each block of 32 MiB or more its own fresh mapping and returns it to the OS when freed, so every
    such output is new memory that the OS zero-fills page by page on first write: 3.8-9 ms per 38 MB output on
    the 2-core benchmark VM (23-38 ms when the VM has handed the pages back to its host), against 6-7 ms for the
    whole 8x18x256x256 feedback_step forward (docs/cpu-kernels.md). Smaller blocks come from glibc's heap, which
    reuses them, except the outputs the kernel writes with non-temporal stores (``streamed``): glibc's block may be
    one another op has just written, whose dirty lines those stores must first evict, or, once glibc trims its
    heap, new pages; the cache's block is neither. A block is handed out again only for an output of exactly its
    size, and only when the cache holds its last reference: no tensor, view or storage object uses it (its
    storage's C++ use count is the cache's one, and no one else holds the Python storage object, which PyTorch
    keeps one of per storage); a block that has been moved to shared memory (sent to another process, which maps it
    unseen by those counts) is dropped. At most ``max_blocks`` blocks are kept; ``fbkernels.empty_cpu_cache()``
    frees the unused ones, and ``FBKERNELS_CPU_OUTPUT_CACHE=0`` in the environment turns the cache off. Like
    PyTorch's CUDA caching allocator with GPU memory, it keeps freed memory of the process for reuse: here at most
    ``max_blocks`` blocks.
    """

    def __init__(self, min_bytes: int = 32 << 20, max_blocks: int = 4,
                 enabled: bool = os.environ.get("FBKERNELS_CPU_OUTPUT_CACHE", "1") != "0"):
        self.min_bytes, self.max_blocks = min_bytes, max_blocks
        self._blocks: list[torch.UntypedStorage] = []  # least recently handed out first
        self._lock = threading.Lock()  # two Python threads must not hand out one block
        self.enabled = enabled and self._reference_counts_work()

    def _unused(self, i: int) -> bool:
        # The C++ count is the Python storage object's own reference; the Python count is the list's and
        # getrefcount's argument. Not binding the block to a name keeps that count exact.
        return torch._C._storage_Use_Count(self._blocks[i]._cdata) == 1 and sys.getrefcount(self._blocks[i]) == 2

    def _reference_counts_work(self) -> bool:
        """Whether this PyTorch and Python count references as ``_unused`` expects (else the cache stays off)."""
        if not hasattr(torch._C, "_storage_Use_Count"):
            return False
        probe = torch.empty(4)
        self._blocks.append(probe.untyped_storage())
        try:
            in_use = self._unused(0)
            storage = probe.untyped_storage()
            del probe
            held_as_storage = self._unused(0)
            del storage
            return not in_use and not held_as_storage and self._unused(0)
        finally:
            self._blocks.clear()

    def _serves(self, nbytes: int, streamed: bool) -> bool:
        """Whether an output of ``nbytes`` comes from the cache: a large one, or one written with streaming stores."""
        return self.enabled and (streamed or nbytes >= self.min_bytes)

    def empty_like(self, like: torch.Tensor, streamed: bool = False) -> torch.Tensor:
        """An uninitialised tensor like ``like`` (a contiguous CPU tensor, as the host functions take); ``streamed``:
        the kernel writes it with non-temporal stores (cached whatever its size)."""
        if not self._serves(like.nbytes, streamed):
            return torch.empty_like(like)  # the common case first: empty_like is cheaper than empty(shape, dtype)
        return self.empty(like.shape, like.dtype, streamed)

    def empty(self, shape, dtype: torch.dtype, streamed: bool = False) -> torch.Tensor:
        """An uninitialised contiguous CPU tensor of ``shape`` and ``dtype`` (``streamed`` as in empty_like)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if not self._serves(nbytes, streamed):
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            # A block sent to another process (DataLoader workers, multiprocessing queues, share_memory_()) was moved
            # to shared memory in place, and the receiver maps it without a reference the counts would see: such a
            # block is dropped, never handed out again.
            if any(block.is_shared() for block in self._blocks):
                self._blocks = [block for block in self._blocks if not block.is_shared()]
            for i in range(len(self._blocks)):
                if self._blocks[i].nbytes() == nbytes and self._unused(i):
                    self._blocks.append(self._blocks.pop(i))
                    return torch.empty(0, dtype=dtype).set_(self._blocks[-1], 0, shape)
            out = torch.empty(shape, dtype=dtype)
            if len(self._blocks) >= self.max_blocks:
                unused = [i for i in range(len(self._blocks)) if self._unused(i)]
                if not unused:  # every block is in use: this output is not cached
                    return out
                del self._blocks[unused[0]]
            self._blocks.append(out.untyped_storage())
            return out

    def clear(self) -> None:
        """Free the blocks that nothing uses; blocks in use stay cached until the next ``clear``."""
        with self._lock:
            unused = {i for i in range(len(self._blocks)) if self._unused(i)}
            self._blocks = [block for i, block in enumerate(self._blocks) if i not in unused]

    def cached_bytes(self) -> int:
        """Bytes held by the cache, in use or not."""
        with self._lock:
            return sum(block.nbytes() for block in self._blocks)


output_cache = LargeOutputCache()


def _new_lock_after_fork() -> None:
    # A child forked while another thread held the lock would wait for it forever at its first large output.
    output_cache._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_after_fork)


def feedback_step_forward(h, f, decay, num_feedback):
    params = _feedback_step_params(h, num_feedback)
    streamed = _C.streams(params, False)
    h_next = output_cache.empty_like(h, streamed)
    v = output_cache.empty((h.shape[0], num_feedback, *h.shape[2:]), h.dtype, streamed)
    params.h, params.f, params.decay = h.data_ptr(), f.data_ptr(), decay.data_ptr()
    params.h_next, params.v = h_next.data_ptr(), v.data_ptr()
    _C.feedback_step_forward(params)
    return h_next, v


def feedback_step_backward(grad_h, grad_v, f, v, decay, num_feedback, needs_grad=(True, True, True)):
    """(grad of h, grad of f, grad of decay), each None where needs_grad says it is not wanted. grad_h / grad_v
    (the gradients of h_next and v) may be None, meaning zero."""
    need_h, need_f, need_decay = (bool(flag) for flag in needs_grad)
    params = _feedback_step_params(f, num_feedback)
    params.f, params.v, params.decay = f.data_ptr(), v.data_ptr(), decay.data_ptr()
    params.grad_h_next, params.grad_v = pointer(grad_h), pointer(grad_v)
    params.need_grad_h, params.need_grad_f, params.need_grad_decay = need_h, need_f, need_decay
    streamed = _C.streams(params, True)
    grad_h_in = output_cache.empty_like(f, streamed) if need_h else None
    grad_f = output_cache.empty_like(f, streamed) if need_f else None
    grad_decay = torch.empty_like(decay) if need_decay else None
    params.grad_h, params.grad_f, params.grad_decay = pointer(grad_h_in), pointer(grad_f), pointer(grad_decay)
    _C.feedback_step_backward(params)
    return grad_h_in, grad_f, grad_decay


def context_gate_forward(h, gate_logits, alpha):
    params = _context_gate_params(h, alpha)
    out = output_cache.empty_like(h, _C.streams(params, False))
    params.h, params.gate_logits, params.out = h.data_ptr(), gate_logits.data_ptr(), out.data_ptr()
    _C.context_gate_forward(params)
    return out


def context_gate_backward(grad_out, h, gate_logits, alpha, needs_grad=(True, True)):
    """(grad of h, grad of gate_logits), each None where needs_grad says it is not wanted."""
    need_h, need_gate = (bool(flag) for flag in needs_grad)
    params = _context_gate_params(h, alpha)
    params.grad_out, params.h, params.gate_logits = grad_out.data_ptr(), h.data_ptr(), gate_logits.data_ptr()
    params.need_grad_h, params.need_grad_gate_logits = need_h, need_gate
    grad_h = output_cache.empty_like(h, _C.streams(params, True)) if need_h else None
    grad_gate_logits = torch.empty_like(gate_logits) if need_gate else None
    params.grad_h, params.grad_gate_logits = pointer(grad_h), pointer(grad_gate_logits)
    _C.context_gate_backward(params)
    return grad_h, grad_gate_logits
