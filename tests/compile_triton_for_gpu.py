"""Compile the fbkernels Triton kernels for an NVIDIA GPU ahead of time, without a GPU: Triton's front end,
its optimisation passes, LLVM and ptxas all run, so a kernel that would fail to compile on the GPU fails here.

    python tests/compile_triton_for_gpu.py            # a representative subset (~20 s); used by tests/test_triton.py
    python tests/compile_triton_for_gpu.py --full     # every dtype x d x gradient combination (~90 s)
    python tests/compile_triton_for_gpu.py --resources   # also registers and spills per kernel (ptxas -v)

Run it with TRITON_INTERPRET unset: under the interpreter the kernels are not compilable JIT functions.
Prints one line per kernel variant and exits 1 if any fails.
"""
from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from fbkernels.triton import context_gate, feedback_step
from fbkernels.triton._utils import INTERPRETING, sum_partials_kernel

POINTER = {"float32": "*fp32", "float64": "*fp64", "float16": "*fp16", "bfloat16": "*bf16"}


def _jit_function(kernel) -> JITFunction:
    """The JIT function under any autotuner wrappers."""
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def compile_kernel(kernel, signature: dict, constexprs: dict, target: GPUTarget, num_warps: int = 4):
    """Compile ``kernel`` with the given argument types (names not in ``signature`` are constexprs)."""
    fn = _jit_function(kernel)
    names = fn.arg_names
    source = ASTSource(
        fn=fn,
        signature={name: signature.get(name, "constexpr") for name in names},
        constexprs={(names.index(name),): value for name, value in constexprs.items()},
    )
    return triton.compile(source, target=target, options={"num_warps": num_warps})


def autotune_configs(kernel, constexprs: dict, every: bool):
    """(BLOCK_N, num_warps) of the configs the kernel's autotuner keeps for these flags (its early prune), all of
    them or only the first."""
    configs = kernel.configs
    if getattr(kernel, "early_config_prune", None):
        configs = kernel.early_config_prune(configs, constexprs)
    kept = [(c.kwargs["BLOCK_N"], c.num_warps) for c in configs]
    return kept if every else kept[:1]


def resource_usage(compiled, arch: int) -> str:
    """Registers per thread and spill bytes of a compiled kernel, from `ptxas -v` on its PTX (Triton's ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        ptx = f"{tmp}/kernel.ptx"
        with open(ptx, "w") as out:
            out.write(compiled.asm["ptx"])
        log = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}", ptx,
                              "-o", f"{tmp}/kernel.o"], capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (f"{registers.group(1) if registers else '?'} registers, "
            f"{spills.group(1) if spills else '?'}/{spills.group(2) if spills else '?'} bytes spilled (st/ld)")


def variants(full: bool, every_config: bool = False):
    """(label, kernel, signature, constexprs, num_warps) of every variant to compile."""
    dtypes = list(POINTER) if full else ["float32", "bfloat16", "float64"]
    # d = 100 and 128: the kernels without the in-register grad_decay accumulator (dL/dM is a matmul there).
    channels = (4, 18, 33, 64, 100, 128) if full or every_config else (4, 18, 100)
    gradients = ((True, True), (False, True), (True, False)) if full else ((True, True),)
    for dtype, d in itertools.product(dtypes, channels):
        ptr, partial = POINTER[dtype], "*fp64" if dtype == "float64" else "*fp32"
        # The flags the host code launches with for this dtype and d, and the tile sizes the autotuner keeps.
        flags = feedback_step._launch_flags(torch.empty(0, dtype=getattr(torch, dtype)), d)
        forward = feedback_step._feedback_step_forward_kernel
        for block_n, warps in autotune_configs(forward, flags, every_config):
            yield (f"feedback_step forward {dtype} d={d} BLOCK_N={block_n} warps={warps}", forward,
                   dict(h_ptr=ptr, f_ptr=ptr, decay_ptr=ptr, h_next_ptr=ptr, v_ptr=ptr, d="i32", N="i32",
                        num_feedback="i32"), dict(flags, BLOCK_N=block_n), warps)
        backward = feedback_step._feedback_step_backward_kernel
        accumulate = flags["D_PAD"] <= feedback_step._ACCUMULATE_MAX_D_PAD
        outputs = dict(WRITE_G=True, WRITE_GRAD_F=True, ACC_DECAY=accumulate)
        backward_flags = dict(flags, **outputs)
        for (has_grad_h, has_grad_v), (block_n, warps) in itertools.product(
                gradients, autotune_configs(backward, backward_flags, every_config)):
            yield (f"feedback_step backward {dtype} d={d} grad_h={has_grad_h} grad_v={has_grad_v} "
                   f"accumulate={accumulate} BLOCK_N={block_n} warps={warps}", backward,
                   dict(grad_h_ptr=ptr, grad_v_ptr=ptr, f_ptr=ptr, v_ptr=ptr, decay_ptr=ptr, grad_h_in_ptr=ptr,
                        grad_f_ptr=ptr, partial_ptr=partial, B="i32", d="i32", N="i32", num_feedback="i32",
                        num_programs="i32"),
                   dict(backward_flags, BLOCK_N=block_n, HAS_GRAD_H=has_grad_h, HAS_GRAD_V=has_grad_v), warps)
    for dtype in dtypes:
        ptr, partial = POINTER[dtype], "*fp64" if dtype == "float64" else "*fp32"
        is_fp64 = dtype == "float64"
        alpha = dict(alpha_head="fp32", alpha_tail="fp32")
        # Tiles the host picks for CBL-CNN maps (4 and 256 positions) and for long rows.
        for N in (4, 256, 1 << 16):
            block_r, block_n, warps = context_gate.tile_shape(1024, N)
            tile = dict(IS_FP64=is_fp64, BLOCK_R=block_r, BLOCK_N=block_n)
            label = f"{dtype} N={N} BLOCK_R={block_r} BLOCK_N={block_n}"
            yield (f"context_gate forward {label}", context_gate._context_gate_forward_kernel,
                   dict(h_ptr=ptr, gate_logits_ptr=ptr, out_ptr=ptr, num_rows="i32", N="i32", **alpha), tile, warps)
            chunk = min(context_gate._CHUNK, block_n * triton.cdiv(N, block_n))
            yield (f"context_gate backward {label}", context_gate._context_gate_backward_kernel,
                   dict(grad_out_ptr=ptr, h_ptr=ptr, gate_logits_ptr=ptr, grad_h_ptr=ptr, partial_ptr=partial,
                        num_rows="i32", N="i32", num_chunks="i32", **alpha),
                   dict(tile, CHUNK=chunk, WRITE_GRAD_H=True, WRITE_PARTIALS=True), warps)
        yield (f"context_gate grad_logits {dtype}", context_gate._context_gate_grad_logits_kernel,
               dict(partial_ptr=partial, gate_logits_ptr=ptr, grad_gate_logits_ptr=ptr, num_rows="i32",
                    num_chunks="i32", **alpha), dict(IS_FP64=is_fp64, BLOCK_R=context_gate._GRAD_LOGITS_ROWS), 4)
        yield (f"sum_partials {dtype}", sum_partials_kernel,
               dict(partial_ptr=partial, out_ptr=ptr, num_partials="i32", numel="i32"), dict(BLOCK=256), 4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every combination instead of a representative subset")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80 or 90 (default 90)")
    parser.add_argument("--resources", action="store_true",
                        help="every autotune config the kernels keep, with its registers and spills")
    args = parser.parse_args(argv)
    if INTERPRETING:
        print("TRITON_INTERPRET=1 is set: unset it to compile the kernels for a GPU", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for label, kernel, signature, constexprs, num_warps in variants(args.full, every_config=args.resources):
        try:
            compiled = compile_kernel(kernel, signature, constexprs, target, num_warps)
            usage = f": {resource_usage(compiled, args.arch)}" if args.resources else ""
            print(f"ok    sm_{args.arch} {label}{usage}")
        except Exception as err:  # report every failing variant, not only the first
            failed += 1
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            print(f"FAIL  sm_{args.arch} {label}: {type(err).__name__}: {first_line}")
    print(f"{failed} of the variants failed" if failed else "all variants compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
