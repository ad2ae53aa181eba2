"""Throughput of the fbkernels ops (feedback_step, context_gate) per provider: time, bandwidth, peak memory.

    python bench/step_throughput.py                 # best device present; the quick sweep on CPU, full on GPU
    python bench/step_throughput.py --device cpu --full --providers eager,cpp --dtype float64 --out /tmp/res

The run ends with a verdict, one line per op and pass: the fused backend against eager and against torch.compile
at the op's key shape, and the fraction of the copy bandwidth it reaches at the op's largest shape.

Providers (each only where it can run; see ``--providers``):
  eager    fbkernels.feedback_step / context_gate with backend="eager": the reference code of
           fbkernels/_reference.py that the tests check every backend against (its hand-written backward).
  compile  torch.compile(dynamic=False) of that same reference forward; fwd_bwd differentiates it with
           torch autograd (AOTAutograd compiles the backward too). Compiled once per shape and pass, during
           the warm-up, which is excluded from the timings (its wall time is the row's "warmup_s").
  cpp, cuda, triton   the fused backends through the public API (backend=...). triton on CPU tensors runs
           only under TRITON_INTERPRET=1 and is left out of the default providers there: the interpreter is a
           test vehicle, not a performance path.

Passes: "fwd" (outputs only, inputs without requires_grad) and "fwd_bwd" (forward, then
torch.autograd.grad of both outputs with given upstream gradients to every input).

Achieved bandwidth = minimal bytes moved / median time, with itemsize s, N = H*W, k = num_feedback:
  feedback_step fwd      reads h, f, M; writes h_next, v           (3*B*d*N + B*k*N + d*d) * s
  feedback_step fwd_bwd  fwd + backward: reads grad_h, grad_v, f, v, M; writes grad_h_in, grad_f, grad_M
                         fwd + (4*B*d*N + 2*B*k*N + 2*d*d) * s
  context_gate  fwd      reads h, gate_logits; writes out          (2*B*C*N + B*C) * s
  context_gate  fwd_bwd  fwd + reads grad_out, h, gate_logits; writes grad_h, grad_gate_logits
                         fwd + (3*B*C*N + 2*B*C) * s
frac_peak = achieved / peak, the peak being the fastest of several large same-device copies in the same run.
Timing, memory and bandwidth methods: see bench/_common.py (also recorded in the JSON).
Before timing, each provider's result is compared with eager's ("matches_eager" in the JSON); a provider that
differs gets "MISMATCH" in the verdict instead of its figures, and the script then exits with status 1.

Outputs: a markdown table and the verdict on stdout; <out>/step_throughput_<device>[_<dtype>][_partial][_smoke].json
(--out, default runs/bench/, outside the committed results; the dtype only when not float32, "_partial" when
--providers leaves out a provider the default run has) of the form
{"device", "torch", "peak_gbps", "results": [{"op", "provider", "dtype", "shape", "pass", "ms", "gbps",
"frac_peak", "peak_mem_mib", ...}], "headline": [...], ...}; a PNG plot next to it; <out>/README_table.md.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import _common as common

fbkernels = common.import_fbkernels()
from fbkernels import _reference  # noqa: E402  (after the import fallback above)

PROVIDERS = ("eager", "compile", "cpp", "triton", "cuda")
PASSES = ("fwd", "fwd_bwd")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The headline: the Feedback U-Net state (l = 16 segmentation + k = 2 feedback channels) at batch 8.
HEADLINE_SHAPES = ((8, 18, 128, 128), (8, 18, 512, 512))
NUM_FEEDBACK = 2
# The maps CBL-CNN gates: the outputs of its 4 blocks (2 convs of 64, 128, 256, 512 channels, then a 2x2 max
# pool; fbkernels.models.StandardCNN) on 32x32 CIFAR images at the paper's batch of 128.
CBL_FEATURE_MAPS = ((128, 64, 16, 16), (128, 128, 8, 8), (128, 256, 4, 4), (128, 512, 2, 2))


@dataclass(frozen=True)
class Case:
    op: str  # "feedback_step" or "context_gate"
    shape: tuple  # [B, d, H, W] for feedback_step, [B, C, H, W] for context_gate
    sweep: str  # which sweep the case belongs to: "size", "batch", "d" or "cbl"
    num_feedback: int = NUM_FEEDBACK
    alpha: float = 0.0


@dataclass
class Sweep:
    cases: list[Case]
    budget_s: float  # timed seconds per (case, provider, pass), roughly
    min_repeats: int
    warmup_s: float


def make_sweep(kind: str) -> Sweep:
    fb, cg = "feedback_step", "context_gate"
    if kind == "smoke":
        cases = [Case(fb, (2, 6, 16, 16), "size"), Case(fb, (8, 18, 128, 128), "size"), Case(cg, (4, 8, 8, 8), "cbl")]
        return Sweep(cases, budget_s=0.01, min_repeats=3, warmup_s=0.0)
    if kind == "quick":
        cases = [Case(fb, (8, 18, s, s), "size") for s in (64, 128, 256)]
        cases += [Case(fb, (b, 18, 128, 128), "batch") for b in (1, 32)]
        cases += [Case(fb, (8, d, 128, 128), "d") for d in (4, 64)]
        cases += [Case(cg, shape, "cbl") for shape in CBL_FEATURE_MAPS[:2]]
        return Sweep(cases, budget_s=0.25, min_repeats=5, warmup_s=0.05)
    cases = []
    for batch in (1, 8, 32):
        cases += [Case(fb, (batch, 18, s, s), "size" if batch == 8 else "batch") for s in (64, 128, 256, 512)]
    cases += [Case(fb, (8, d, 256, 256), "d") for d in (4, 8, 16, 32, 64)]
    cases += [Case(cg, shape, "cbl") for shape in CBL_FEATURE_MAPS]
    return Sweep(cases, budget_s=1.0, min_repeats=10, warmup_s=0.2)


# ---------------------------------------------------------------- bytes and footprint

def minimal_bytes(case: Case, pass_name: str, itemsize: int) -> int:
    """Bytes a perfect kernel must move for the pass (formulas in the module docstring)."""
    batch, channels = case.shape[:2]
    n = math.prod(case.shape[2:])
    if case.op == "feedback_step":
        d, k = channels, case.num_feedback
        fwd = 3 * batch * d * n + batch * k * n + d * d
        bwd = 4 * batch * d * n + 2 * batch * k * n + 2 * d * d
    else:
        fwd = 2 * batch * channels * n + batch * channels
        bwd = 3 * batch * channels * n + 2 * batch * channels
    return (fwd + (bwd if pass_name == "fwd_bwd" else 0)) * itemsize


def footprint_bytes(case: Case, itemsize: int) -> int:
    """Generous bound on what one fwd_bwd case holds at once (inputs, upstream grads, outputs, eager temporaries)."""
    return 14 * math.prod(case.shape) * itemsize


# ---------------------------------------------------------------- providers

def make_inputs(case: Case, dtype: torch.dtype, device: torch.device) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(device=device, dtype=dtype)

    batch, channels = case.shape[:2]
    spatial = case.shape[2:]
    if case.op == "feedback_step":
        k = case.num_feedback
        decay = torch.linalg.matrix_exp(-torch.eye(channels) + 0.1 * torch.randn(channels, channels, generator=gen))
        return {
            "h": randn(*case.shape), "f": randn(*case.shape), "decay": decay.to(device=device, dtype=dtype),
            "grad_h": randn(*case.shape), "grad_v": randn(batch, k, *spatial),
        }
    return {"h": randn(*case.shape), "gate_logits": randn(batch, channels), "grad_out": randn(*case.shape)}


def forward_fn(provider: str, case: Case):
    """fn(*op inputs) -> outputs for the provider; compile gets a fresh compilation for this case."""
    if case.op == "feedback_step":
        if provider == "compile":
            torch._dynamo.reset()  # one static-shape graph per case: no recompile limit, no stale guards
            compiled = torch.compile(_reference.feedback_step_forward, dynamic=False)
            return lambda h, f, decay: compiled(h, f, decay, case.num_feedback)
        return lambda h, f, decay: fbkernels.feedback_step(h, f, decay, case.num_feedback, backend=provider)
    if provider == "compile":
        torch._dynamo.reset()
        compiled = torch.compile(_reference.context_gate_forward, dynamic=False)
        return lambda h, gate_logits: compiled(h, gate_logits, case.alpha)
    return lambda h, gate_logits: fbkernels.context_gate(h, gate_logits, case.alpha, backend=provider)


def pass_fn(provider: str, case: Case, pass_name: str, inputs: dict):
    """A no-argument callable running one pass, returning its outputs (fwd) or input gradients (fwd_bwd)."""
    forward = forward_fn(provider, case)
    if case.op == "feedback_step":
        names, upstream = ("h", "f", "decay"), (inputs["grad_h"], inputs["grad_v"])
    else:
        names, upstream = ("h", "gate_logits"), (inputs["grad_out"],)
    if pass_name == "fwd":
        args = [inputs[name] for name in names]
        return lambda: forward(*args)
    leaves = [inputs[name].detach().requires_grad_() for name in names]  # share storage: no extra memory

    def fwd_bwd():
        outputs = forward(*leaves)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return torch.autograd.grad(outputs, leaves, upstream)

    return fwd_bwd


def outputs_match(result, reference, dtype: torch.dtype) -> bool:
    result = result if isinstance(result, (tuple, list)) else (result,)
    reference = reference if isinstance(reference, (tuple, list)) else (reference,)
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    return all(
        torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * max(1.0, b.abs().max().item()))
        for a, b in zip(result, reference)
    )


FUSED = ("cpp", "cuda", "triton")


def select_providers(requested: list[str] | None, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> tuple[list[str], list[str]]:
    """(providers to run, notes on the ones left out: not available on the device, or not for the dtype)."""
    available = fbkernels.available_backends(device)
    notes = []
    if requested is None:
        candidates = list(PROVIDERS)
        if device.type == "cpu" and "triton" in available:
            available = [name for name in available if name != "triton"]
            notes.append("triton: left out on CPU (interpreter only); ask for it with --providers")
    else:
        candidates = requested
    chosen = []
    for name in candidates:
        if name != "compile" and name not in available:
            if requested is not None or name != "triton" or device.type != "cpu":
                notes.append(f"{name}: not available on {device.type} (available: {', '.join(available)})")
            continue
        if name in FUSED:
            try:
                fbkernels.backends.resolve_backend(name, device, dtype)
            except (TypeError, ValueError) as error:  # e.g. cpp has no half precision
                notes.append(f"{name}: cannot run {str(dtype).replace('torch.', '')} on {device.type} ({error})")
                continue
        chosen.append(name)
    return chosen, notes


def sweep_kind(args, device: torch.device) -> str:
    if args.smoke:
        return "smoke"
    if args.quick is None:
        return "quick" if device.type == "cpu" else "full"
    return "quick" if args.quick else "full"


# ---------------------------------------------------------------- run

def run(args) -> dict:
    """The sweep of parse_args' arguments (device, providers and dtype already checked there)."""
    device = args.device
    common.use_device(device)
    dtype = DTYPES[args.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    kind = sweep_kind(args, device)
    sweep = make_sweep(kind)
    providers, notes = args.providers, args.provider_notes
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    started = time.perf_counter()
    peak_gbps, copy_bytes = common.measure_peak_bandwidth(device, budget_s=0.1 if kind == "smoke" else 1.0,
                                                          nbytes=16 * common.MIB if kind == "smoke" else None)
    print(f"{common.device_name(device)}: peak copy bandwidth {peak_gbps:.1f} GB/s "
          f"({copy_bytes / common.MIB:.0f} MiB moved per copy); sweep {kind}, {args.dtype}, providers "
          f"{', '.join(providers)}", file=sys.stderr)
    if environment := common.measured_environment():
        print("environment: " + " ".join(f"{name}={value}" for name, value in environment.items()), file=sys.stderr)

    from tqdm import tqdm

    rows, skipped = [], []
    memory_limit = common.available_memory_bytes(device) * 0.6
    progress = tqdm(total=len(sweep.cases) * len(PASSES) * len(providers), desc="step_throughput", file=sys.stderr,
                    disable=args.no_progress)
    for case in sweep.cases:
        if footprint_bytes(case, itemsize) > memory_limit:
            skipped.append({"op": case.op, "shape": list(case.shape), "reason": "would not fit in free memory"})
            progress.update(len(PASSES) * len(providers))
            continue
        inputs = make_inputs(case, dtype, device)
        for pass_name in PASSES:
            progress.set_postfix_str(f"{case.op} {common.shape_str(case.shape)} {pass_name}")
            measured, failed = measure(case, pass_name, providers, inputs, sweep, device, dtype, itemsize, peak_gbps)
            rows += measured
            skipped += failed
            for row in failed:
                print(f"skip: {row}", file=sys.stderr)
            progress.update(len(providers))
        del inputs
    progress.close()

    for row in rows:  # speed-up against eager on the same case and pass
        eager = next((r for r in rows if r["provider"] == "eager" and r["op"] == row["op"]
                      and r["shape"] == row["shape"] and r["pass"] == row["pass"]), None)
        row["speedup_vs_eager"] = common.ratio(eager and eager["ms"], row["ms"])

    payload = common.header(device, "step_throughput", args.argv)
    payload.update({
        "sweep": kind, "smoke": kind == "smoke", "dtype": args.dtype, "providers": providers,
        "partial": args.partial, "default_providers": args.default_providers, "peak_gbps": peak_gbps,
        "peak_copy_bytes": copy_bytes, "bytes_formula": BYTES_FORMULA, "results": rows, "skipped": skipped,
        "notes": notes,
    })
    payload["headline"] = headline(rows, args.dtype)
    payload["verdict"] = verdict(payload)
    payload["elapsed_s"] = time.perf_counter() - started
    return payload


BYTES_FORMULA = {
    "feedback_step": {"fwd": "(3*B*d*N + B*k*N + d*d) * itemsize",
                      "fwd_bwd": "fwd + (4*B*d*N + 2*B*k*N + 2*d*d) * itemsize"},
    "context_gate": {"fwd": "(2*B*C*N + B*C) * itemsize", "fwd_bwd": "fwd + (3*B*C*N + 2*B*C) * itemsize"},
}


def measure(case, pass_name, providers, inputs, sweep, device, dtype, itemsize, peak_gbps):
    """(rows, skipped) for one case and pass: every provider checked against eager, timed interleaved, measured."""
    base = {"op": case.op, "dtype": str(dtype).replace("torch.", ""), "shape": list(case.shape), "pass": pass_name,
            "sweep": case.sweep}
    if case.op == "feedback_step":
        base["num_feedback"] = case.num_feedback
    else:
        base["alpha"] = case.alpha
    reference = pass_fn("eager", case, pass_name, inputs)()
    fns, matches, first_s, skipped = {}, {}, {}, []
    for provider in providers:
        try:
            fn = pass_fn(provider, case, pass_name, inputs)
            start = time.perf_counter()
            matches[provider] = outputs_match(fn(), reference, dtype)  # the first call compiles (compile provider)
            first_s[provider] = time.perf_counter() - start
            fns[provider] = fn
        except (TypeError, ValueError) as error:  # e.g. a dtype the backend does not support
            skipped.append({**base, "provider": provider, "reason": f"{type(error).__name__}: {error}"})
        except torch.cuda.OutOfMemoryError as error:
            skipped.append({**base, "provider": provider, "reason": f"out of memory: {error}"})
    del reference
    if not fns:
        return [], skipped
    timings = common.time_fns(fns, device, budget_s=sweep.budget_s * len(fns), min_repeats=sweep.min_repeats,
                              warmup_s=sweep.warmup_s)
    moved = minimal_bytes(case, pass_name, itemsize)
    rows = []
    for provider, fn in fns.items():
        timing = timings[provider]
        peak_bytes = common.peak_memory_bytes(fn, device)
        gbps = moved / (timing.median_ms * 1e-3) / 1e9
        rows.append({
            **base, "provider": provider,
            "ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms, "repeats": timing.repeats,
            "bytes": moved, "gbps": gbps, "frac_peak": gbps / peak_gbps,
            "peak_mem_mib": peak_bytes / common.MIB, "matches_eager": matches[provider],
            "warmup_s": first_s[provider] + timing.warmup_s,
        })
    return rows, skipped


def headline(rows: list[dict], dtype_name: str) -> list[dict]:
    """Per provider at the headline shapes: fwd and fwd_bwd time, speed-up and fwd_bwd memory against eager."""
    out = []
    for shape in HEADLINE_SHAPES:
        def find(provider, pass_name):
            return next((r for r in rows if r["op"] == "feedback_step" and tuple(r["shape"]) == shape
                         and r["provider"] == provider and r["pass"] == pass_name), None)

        eager_fwd, eager_bwd = find("eager", "fwd"), find("eager", "fwd_bwd")
        for provider in PROVIDERS:
            fwd, bwd = find(provider, "fwd"), find(provider, "fwd_bwd")
            if fwd is None or bwd is None:
                continue
            out.append({
                "shape": common.shape_str(shape), "dtype": dtype_name, "provider": provider,
                "fwd_ms": fwd["ms"], "fwd_bwd_ms": bwd["ms"], "fwd_bwd_gbps": bwd["gbps"],
                "fwd_bwd_peak_mem_mib": bwd["peak_mem_mib"],
                "fwd_speedup": None if eager_fwd is None else eager_fwd["ms"] / fwd["ms"],
                "fwd_bwd_speedup": None if eager_bwd is None else eager_bwd["ms"] / bwd["ms"],
                "fwd_bwd_mem_vs_eager": None if eager_bwd is None or not eager_bwd["peak_mem_mib"]
                else bwd["peak_mem_mib"] / eager_bwd["peak_mem_mib"],
                "matches_eager": bool(fwd.get("matches_eager", True) and bwd.get("matches_eager", True)),
            })
    return out


# ---------------------------------------------------------------- report

def print_table(payload: dict) -> None:
    columns = ["op", "shape", "pass", "provider", "ms", "p20-p80 ms", "GB/s", "% peak", "peak MiB", "vs eager", "ok"]
    table = [[r["op"], common.shape_str(r["shape"]), r["pass"], r["provider"], r["ms"],
              f"{r['p20_ms']:.3g}-{r['p80_ms']:.3g}", r["gbps"], 100 * r["frac_peak"], r["peak_mem_mib"],
              None if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x",
              "yes" if r["matches_eager"] else "MISMATCH"]
             for r in payload["results"]]
    print(f"## step_throughput on {payload['device']} (torch {payload['torch']}, {payload['dtype']}, "
          f"peak copy {payload['peak_gbps']:.1f} GB/s, {payload['date']})\n")
    print(common.markdown_table(columns, table))
    print("\nk = 2 feedback channels for feedback_step (shape B x d x H x W); context_gate shape B x C x H x W, "
          "alpha 0. ok = result equals eager's.")


def print_headline(payload: dict) -> None:
    for h in payload["headline"]:
        if h["provider"] == "eager":
            continue
        start = f"headline feedback_step B x d x H x W = {h['shape']}, k = 2, {h['dtype']}: {h['provider']} "
        if h.get("matches_eager") is False:
            print(start + "vs eager: MISMATCH with eager's result, timing not comparable")
        elif h["fwd_speedup"] is None or h["fwd_bwd_speedup"] is None:
            print(start + f"fwd {h['fwd_ms']:.3g} ms, fwd_bwd {h['fwd_bwd_ms']:.3g} ms (eager not measured: "
                          "no speed-up; - in the README table)")
        else:
            mem = h["fwd_bwd_mem_vs_eager"]
            print(start + f"vs eager: fwd {h['fwd_speedup']:.2f}x, fwd_bwd {h['fwd_bwd_speedup']:.2f}x faster; "
                          "fwd_bwd peak memory " + ("-" if mem is None else f"{mem:.2f}x eager's"))


def plot(payload: dict, path: Path) -> Path:
    """Per op: fwd time, fwd_bwd time (one bar per provider and shape; fused bars labelled with their speed-up
    over torch.compile, below 1 where slower) and the fraction of the copy bandwidth reached per shape."""
    rows = payload["results"]
    ops = [op for op in ("feedback_step", "context_gate") if any(r["op"] == op for r in rows)]
    fig, axes = common.new_figure(max(1, len(ops)), 3, width=5.4, height=3.8)
    colours = {"eager": "tab:gray", "compile": "tab:orange", "cpp": "tab:blue", "triton": "tab:green",
               "cuda": "tab:red"}
    fused = [p for p in ("cpp", "triton", "cuda") if p in payload["providers"]]

    def find(op, shape, provider, pass_name):
        return next((r for r in rows if r["op"] == op and tuple(r["shape"]) == shape and r["provider"] == provider
                     and r["pass"] == pass_name), None)

    for i, op in enumerate(ops):
        shapes = sorted({tuple(r["shape"]) for r in rows if r["op"] == op}, key=lambda s: (math.prod(s), s))
        names = ["x".join(map(str, s)) for s in shapes]
        providers = [p for p in PROVIDERS if any(r["op"] == op and r["provider"] == p for r in rows)]
        for col, pass_name in enumerate(PASSES):
            series, labels = {}, {}
            for provider in providers:
                found = [find(op, s, provider, pass_name) for s in shapes]
                series[provider] = [None if r is None else r["ms"] for r in found]
                if provider in fused:
                    compiled = [find(op, s, "compile", pass_name) for s in shapes]
                    labels[provider] = [None if r is None or c is None else f"{c['ms'] / r['ms']:.2f}x"
                                        for r, c in zip(found, compiled)]
            common.grouped_bars(axes[i][col], names, series, colours, labels=labels, log=True)
            axes[i][col].set(ylabel="median ms (log)", title=f"{op} {pass_name}: time\n(labels: fused speed-up "
                             "over torch.compile)")
            axes[i][col].set_xlabel("shape B x C x H x W", fontsize=8)
            axes[i][col].tick_params(axis="x", labelrotation=30)
            axes[i][col].legend(fontsize=7, loc="upper left")
        bandwidth = {f"{p} {pass_name}": [None if (r := find(op, s, p, pass_name)) is None else 100 * r["frac_peak"]
                                          for s in shapes]
                     for p in fused for pass_name in PASSES}
        light = {"cpp": "lightblue", "triton": "lightgreen", "cuda": "lightsalmon"}  # fwd_bwd: the lighter shade
        shade = {f"{p} {pass_name}": colours[p] if pass_name == "fwd" else light[p] for p in fused for pass_name in PASSES}
        ax = axes[i][2]
        if bandwidth:
            common.grouped_bars(ax, names, bandwidth, shade)
            ax.axhline(50, color="black", linestyle=":", label="50% (target)")
            tallest = max((v for values in bandwidth.values() for v in values if v is not None), default=0.0)
            ax.set_ylim(0, max(110.0, 1.1 * tallest))  # shares above 100% (data in cache) stay in view
            ax.legend(fontsize=7, loc="upper left")
        ax.set(ylabel="% of copy bandwidth", title=f"{op}: fused bandwidth\n(copy {payload['peak_gbps']:.1f} GB/s, "
               "best of several large copies)")
        ax.set_xlabel("shape B x C x H x W", fontsize=8)
        ax.tick_params(axis="x", labelrotation=30)
    return common.save_figure(fig, path, payload)


def parse_args(argv=None):
    """The arguments, checked before anything is measured: --device resolved (args.device a torch.device),
    --providers a list of the providers that can run (args.provider_notes on those left out), args.partial."""
    parser = common.run_argument_parser(__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="quick", action="store_true", default=None,
                      help="the quick sweep (default on CPU: under 3 minutes on 2 cores)")
    size.add_argument("--full", dest="quick", action="store_false", help="the full sweep (default on GPU)")
    size.add_argument("--smoke", action="store_true",
                      help="three shapes (two tiny ones and the 8x18x128x128 headline, which the verdict needs) "
                           "and few repeats: checks that the script runs; figures meaningless")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--providers", default=None,
                        help=f"comma-separated subset of {','.join(PROVIDERS)} (default: all available; "
                             "triton on CPU only when asked for, under TRITON_INTERPRET=1); those that cannot run "
                             "on the device or dtype are left out with a note, and the run stops if none can; a run "
                             "without one of the default providers is written as _partial")
    args = parser.parse_args(argv)
    common.check_run_args(parser, args, argv)
    requested = None
    if args.providers is not None:
        requested = [p.strip() for p in args.providers.split(",") if p.strip()]
        if not requested:
            parser.error(f"--providers: expected a comma-separated subset of {','.join(PROVIDERS)}, "
                         f"got {args.providers!r}")
        unknown = [p for p in requested if p not in PROVIDERS]
        if unknown:
            parser.error(f"--providers: expected a comma-separated subset of {','.join(PROVIDERS)}, got unknown "
                         f"{', '.join(map(repr, unknown))} in {args.providers!r}")
        repeated = sorted({p for p in requested if requested.count(p) > 1})
        if repeated:
            parser.error(f"--providers: expected each provider once, got {', '.join(repeated)} more than once in "
                         f"{args.providers!r}")
    dtype = DTYPES[args.dtype]
    args.providers, args.provider_notes = select_providers(requested, args.device, dtype)
    if not args.providers:
        parser.error(f"--providers: expected at least one provider that can run {args.dtype} on "
                     f"{args.device.type}, got {', '.join(requested or PROVIDERS)}: "
                     + "; ".join(args.provider_notes))
    args.default_providers = select_providers(None, args.device, dtype)[0]
    args.partial = bool(set(args.default_providers) - set(args.providers))
    return args


def _versus(other_ms, fused_ms, name: str) -> str:
    speedup = other_ms / fused_ms
    return f"{speedup:.2f}x faster than {name}" if speedup >= 1 else f"{1 / speedup:.2f}x slower than {name}"


def verdict(payload: dict) -> list[str]:
    """One line per op, pass and fused provider: against eager and torch.compile at the key shape (feedback_step:
    the Feedback U-Net state 8x18x128x128; context_gate: the shape where it does worst against torch.compile when
    torch.compile was measured, else the largest; its shapes are called CBL-CNN maps only when they are), peak
    memory against eager (fwd_bwd), and the fraction of the copy bandwidth at the largest shape measured. A
    provider whose result differs from eager's at any shape of the op and pass gets a MISMATCH line instead of
    figures; a fused provider asked for but not measured, or none asked for, gets a line saying why."""
    rows = payload["results"]

    def find(op, shape, provider, pass_name):
        return next((r for r in rows if r["op"] == op and tuple(r["shape"]) == tuple(shape)
                     and r["provider"] == provider and r["pass"] == pass_name), None)

    lines = []
    fused = [p for p in FUSED if p in payload["providers"]]
    for op in ("feedback_step", "context_gate"):
        cases = [r for r in rows if r["op"] == op and r["provider"] in fused]
        if not cases:
            continue
        largest = max(cases, key=lambda r: (math.prod(r["shape"]), r["sweep"] == "size"))["shape"]
        for pass_name in PASSES:
            for provider in fused:
                shapes = sorted({tuple(r["shape"]) for r in cases if r["provider"] == provider
                                 and r["pass"] == pass_name}, key=math.prod)
                if not shapes:
                    continue
                if op == "feedback_step":
                    key = HEADLINE_SHAPES[0] if HEADLINE_SHAPES[0] in shapes else shapes[-1]
                    where = common.shape_str(key)
                else:
                    def vs_compile(shape):
                        return find(op, shape, "compile", pass_name)["ms"] / find(op, shape, provider, pass_name)["ms"]

                    maps = "CBL-CNN maps" if all(s in CBL_FEATURE_MAPS for s in shapes) else "shapes"
                    compared = [s for s in shapes if find(op, s, "compile", pass_name) is not None]
                    if len(compared) > 1:
                        key = min(compared, key=vs_compile)
                        where = (f"{common.shape_str(key)} (worst of {len(compared)} {maps} against "
                                 "torch.compile)")
                    elif compared:
                        key = compared[0]
                        where = common.shape_str(key)
                    else:
                        key = shapes[-1]
                        where = common.shape_str(key) + ("" if len(shapes) == 1
                                                         else f" (largest of {len(shapes)} {maps})")
                mismatched = [s for s in shapes if not find(op, s, provider, pass_name).get("matches_eager", True)]
                if mismatched:
                    lines.append(f"{op} {pass_name} at {where}: {provider} MISMATCH with eager's result at "
                                 f"{', '.join(map(common.shape_str, mismatched))}, timing not comparable")
                    continue
                own = find(op, key, provider, pass_name)
                parts = [f"{op} {pass_name} at {where}: {provider} {own['ms']:.3g} ms"]
                for other, name in (("eager", "eager"), ("compile", "torch.compile")):
                    reference = find(op, key, other, pass_name)
                    if reference is not None:
                        parts.append(_versus(reference["ms"], own["ms"], name))
                eager = find(op, key, "eager", pass_name)
                if pass_name == "fwd_bwd" and eager is not None and eager["peak_mem_mib"]:
                    parts.append(f"peak memory {own['peak_mem_mib'] / eager['peak_mem_mib']:.2f}x eager's")
                big = find(op, largest, provider, pass_name)
                if big is not None:
                    parts.append(f"{100 * big['frac_peak']:.0f}% of copy bandwidth at {common.shape_str(largest)}")
                lines.append(parts[0] + ", " + ", ".join(parts[1:]))
    # Say why when a fused provider has no figures: none asked for or able to run, or every case skipped.
    if not fused:
        why = [note for note in payload.get("notes", []) if note.split(":")[0] in FUSED]
        lines.append(f"no fused provider measured: providers {', '.join(payload['providers'])}"
                     + (f" ({'; '.join(why)})" if why else f", none of {', '.join(FUSED)} asked for"))
    for provider in fused:
        if not any(r["provider"] == provider for r in rows):
            reasons = sorted({s["reason"] for s in payload.get("skipped", []) if s.get("provider") == provider
                              or "provider" not in s})
            lines.append(f"{provider}: not measured at any shape"
                         + (f" ({'; '.join(reasons)})" if reasons else ""))
    return lines


def report(payload) -> None:
    print_table(payload)
    print()
    print_headline(payload)
    print(f"\nVerdict ({payload['device']}, {payload['dtype']}, copy bandwidth {payload['peak_gbps']:.1f} GB/s; "
          "ratios of medians timed interleaved in this run):")
    for line in payload["verdict"]:
        print(f"  {line}")


def main(argv=None) -> int:
    """0, or 1 when a provider's result differs from eager's (its timings are then not comparable)."""
    payload = common.run_and_write(parse_args(argv), "step_throughput", run, report, plot)
    mismatches = [r for r in payload["results"] if not r["matches_eager"]]
    if mismatches:
        names = sorted({r["provider"] for r in mismatches})
        print(f"error: {len(mismatches)} rows ({', '.join(names)}) do not match eager's result; their timings are "
              "not comparable", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
