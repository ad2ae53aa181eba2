"""Compile the fbkernels Triton kernels for an NVIDIA GPU ahead of time, without a GPU: Triton's front end,
its optimisation passes, LLVM and ptxas all run, so a kernel that would fail to compile on the GPU fails here.

    python tests/compile_triton_for_gpu.py            # a representative subset (~20 s); used by tests/test_triton.py
    python tests/compile_triton_for_gpu.py --full     # every dtype x d x gradient combination (~90 s)

Run it with TRITON_INTERPRET unset: under the interpreter the kernels are not compilable JIT functions.
Prints one line per kernel variant and exits 1 if any fails.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from fbkernels.triton import context_gate, feedback_step
from fbkernels.triton._utils import INTERPRETING, dtype_flags, sum_partials_kernel

POINTER = {"float32": "*fp32", "float64": "*fp64", "float16": "*fp16", "bfloat16": "*bf16"}


def _jit_function(kernel) -> JITFunction:
    """The JIT function under any autotuner wrappers."""
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def compile_kernel(kernel, signature: dict, constexprs: dict, target: GPUTarget) -> None:
    """Compile ``kernel`` with the given argument types (names not in ``signature`` are constexprs)."""
    fn = _jit_function(kernel)
    names = fn.arg_names
    source = ASTSource(
        fn=fn,
        signature={name: signature.get(name, "constexpr") for name in names},
        constexprs={(names.index(name),): value for name, value in constexprs.items()},
    )
    triton.compile(source, target=target)


def variants(full: bool):
    """(label, kernel, signature, constexprs) of every variant to compile."""
    dtypes = list(POINTER) if full else ["float32", "bfloat16", "float64"]
    channels = (4, 18, 33, 64) if full else (4, 18)
    gradients = ((True, True), (False, True), (True, False)) if full else ((True, True),)
    for dtype, d in itertools.product(dtypes, channels):
        ptr, partial = POINTER[dtype], "*fp64" if dtype == "float64" else "*fp32"
        # The flags the host code launches with for this dtype and d, plus one tile size of the autotuner's.
        flags = dict(feedback_step._launch_flags(torch.empty(0, dtype=getattr(torch, dtype)), d), BLOCK_N=128)
        yield (f"feedback_step forward {dtype} d={d}", feedback_step._feedback_step_forward_kernel,
               dict(h_ptr=ptr, f_ptr=ptr, decay_ptr=ptr, h_next_ptr=ptr, v_ptr=ptr, d="i32", N="i32",
                    num_feedback="i32"), flags)
        for has_grad_h, has_grad_v in gradients:
            yield (f"feedback_step backward {dtype} d={d} grad_h={has_grad_h} grad_v={has_grad_v}",
                   feedback_step._feedback_step_backward_kernel,
                   dict(grad_h_ptr=ptr, grad_v_ptr=ptr, f_ptr=ptr, v_ptr=ptr, decay_ptr=ptr, grad_h_in_ptr=ptr,
                        grad_f_ptr=ptr, partial_ptr=partial, B="i32", d="i32", N="i32", num_feedback="i32",
                        num_programs="i32"),
                   dict(flags, HAS_GRAD_H=has_grad_h, HAS_GRAD_V=has_grad_v))
    for dtype in dtypes:
        ptr, partial = POINTER[dtype], "*fp64" if dtype == "float64" else "*fp32"
        flags = dtype_flags(getattr(torch, dtype))
        alpha = dict(alpha_head="fp32", alpha_tail="fp32")
        yield (f"context_gate forward {dtype}", context_gate._context_gate_forward_kernel,
               dict(h_ptr=ptr, gate_logits_ptr=ptr, out_ptr=ptr, N="i32", **alpha), dict(flags, BLOCK_N=1024))
        yield (f"context_gate backward {dtype}", context_gate._context_gate_backward_kernel,
               dict(grad_out_ptr=ptr, h_ptr=ptr, gate_logits_ptr=ptr, grad_h_ptr=ptr, partial_ptr=partial, N="i32",
                    num_chunks="i32", **alpha), dict(flags, BLOCK_N=1024, CHUNK=8192))
        yield (f"context_gate grad_logits {dtype}", context_gate._context_gate_grad_logits_kernel,
               dict(partial_ptr=partial, gate_logits_ptr=ptr, grad_gate_logits_ptr=ptr, num_chunks="i32", **alpha),
               dict(IS_FP64=flags["IS_FP64"]))
        yield (f"sum_partials {dtype}", sum_partials_kernel,
               dict(partial_ptr=partial, out_ptr=ptr, num_partials="i32", numel="i32"), dict(BLOCK=256))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every combination instead of a representative subset")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80 or 90 (default 90)")
    args = parser.parse_args(argv)
    if INTERPRETING:
        print("TRITON_INTERPRET=1 is set: unset it to compile the kernels for a GPU", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for label, kernel, signature, constexprs in variants(args.full):
        try:
            compile_kernel(kernel, signature, constexprs, target)
            print(f"ok    sm_{args.arch} {label}")
        except Exception as err:  # report every failing variant, not only the first
            failed += 1
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            print(f"FAIL  sm_{args.arch} {label}: {type(err).__name__}: {first_line}")
    print(f"{failed} of the variants failed" if failed else "all variants compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
