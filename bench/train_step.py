"""Whole training steps of the feedback models against the authors' training schedule: time and peak memory.

    python bench/train_step.py                         # CPU: ~10-15 min on 2 cores; writes runs/bench/
    python bench/train_step.py --steps 5,10 --compile-steps none --out /tmp/res
    python bench/train_step.py --smoke                 # tiny models, seconds: checks that the script runs

One training step = zero_grad(set_to_none=True), forward, cross-entropy of the logits of every step, backward,
Adam step. Paths compared, on the same model, data and seed (identical initial weights):

  reference   the schedule of the reference implementation (github.com/DCalhas/feedback_segmentation): after
              each of the first T-1 steps `CE(logits_t, y).backward(retain_graph=True)`, then the final step's
              loss backward, i.e. T(T+1)/2 network backwards; the state update in plain PyTorch autograd
              (fbkernels' eager reference functions, no custom op), and, like the authors' loop, the
              equilibrium test |sum|h_t| - sum|h_{t-1}|| <= 1e-5 after each step. The authors' loop stops
              there; the bench runs all T steps (same gradient on every path) and reports the step after
              which the test held as equilibrium_step (with the decay M(t) -> 0, it holds before T=20).
  eager       FeedbackUNet(backend="eager"): the loss summed over the steps, one backward.
  default     FeedbackUNet(backend=None): the fastest available fbkernels backend (cpp on CPU), one backward.
  checkpoint  as default with bptt="checkpoint" (network activations recomputed in backward).
  compile     torch.compile(FeedbackUNet(backend=None), dynamic=False), one backward; the first step
              (compilation) is reported apart as compile_s. Compiled only at --compile-steps (default T=5).
  compile_network  as default with torch.compile(model.network, dynamic=False): the per-step U-Net compiled
              once and reused by every step (the loop and the fused state update stay eager), so compilation
              does not grow with T. At every T of --steps by default.
  feedforward the unit: a FeedforwardUNet of the same width and depth, one pass, one backward.

Models: FeedbackUNet(3, 2, seg_channels=16, width=16, depth=3), input [1, 3, 64, 64] on CPU (512x512 on a GPU),
T in --steps (default 5, 10, 20). CBLCNN(3, 10, mode="state") (the CBL paper's equations: gated states, only
the head recomputes the logits) on [8, 3, 32, 32] (batch 128 on a GPU), T in --cbl-steps (default 2, 10),
with the same paths (reference = a backward after each refinement's logits, retaining the graph) and
StandardCNN (the same backbone, one pass) as its unit.

Before any timing, every path's parameter gradients of one step are checked against the eager path's
(max |g - g_eager| <= --grad-tol * max |g_eager| per parameter, 1e-4; the compiled paths --compile-grad-tol,
2e-2: inductor's gradients differ by up to 7e-3, see _grad_tol); a path that disagrees stops the run.
Timing: bench/_common.time_fns, the paths of one model and T interleaved call by call, median of the rounds;
the number of rounds fills about --budget seconds, clamped to [--repeats, max(--repeats, 30)] (MAX_ROUNDS).
Peak memory: bench/_common.peak_memory_bytes of one more step (above the level before it: parameters, Adam
state and inputs excluded). Ratios are only meaningful within one run (the machine may be shared).

Every option is checked before anything runs; with --smoke, options given explicitly win over its tiny defaults.

Outputs under --out (default runs/bench/, outside the committed files):
train_step_<device>[_<dtype>][_partial][_smoke].json (the dtype only when not float32; "_partial" when the run
leaves out a model, T or compiled path of the default run)
({"device", "torch", "results": [{"op", "path", "provider", "steps", "bptt", "ms", "peak_mem_mib",
"compile_s", "grad_rel_err", "speedup_vs_reference", "memory_vs_reference", "ms_in_unit", "mem_in_unit", ...}],
"summary": [sentences], "targets": [...], "fastest": {...}}), a PNG of the same name, a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import _common as common

fbkernels = common.import_fbkernels()

from fbkernels import _reference  # noqa: E402  (plain-autograd state update of the reference schedule)

DEFAULT_OUT = common.REPO_ROOT / "runs" / "bench"
UNET_PATHS = ("reference", "eager", "default", "checkpoint", "compile", "compile_network")
CBL_PATHS = ("reference", "eager", "default", "compile")
# Documented training paths of fbkernels (candidates for "fastest"); "reference" and "eager" are baselines.
FBKERNELS_PATHS = ("default", "checkpoint", "compile", "compile_network")
EQUILIBRIUM_ATOL = 1e-5  # the reference implementation's stopping test
MAX_ROUNDS = 30  # timed rounds per group at most (unless --repeats asks for more): caps what --budget buys
# What a run measures by default, normal and smoke: T lists, compiled T lists, sizes, repeats, budget.
DEFAULTS = {
    False: {"steps": [5, 10, 20], "cbl_steps": [2, 10], "compile_steps": [5], "compile_network_steps": "all",
            "cbl_compile_steps": [2], "batch": 1, "repeats": 5, "budget": 10.0},
    True: {"steps": [2, 3], "cbl_steps": [2], "compile_steps": [], "compile_network_steps": [],
           "cbl_compile_steps": [], "size": 16, "batch": 1, "cbl_batch": 2, "repeats": 1, "budget": 0.0},
}

UNET_CONFIG = {"in_channels": 3, "num_classes": 2, "seg_channels": 16, "width": 16, "depth": 3}
CBL_CONFIG = {"in_channels": 3, "num_classes": 10, "alpha": 0.0, "context_dim": 64, "mode": "state"}
SMOKE_UNET = {**UNET_CONFIG, "seg_channels": 4, "width": 4, "depth": 2}
SMOKE_CBL = {**CBL_CONFIG, "context_dim": 8, "widths": (8, 8, 8, 8), "hidden": 8}


# ---------------------------------------------------------------- models

def _kwargs(config: dict) -> dict:
    return {key: value for key, value in config.items() if key not in ("in_channels", "num_classes")}


def build_unet(config: dict, path: str, device, dtype):
    """The FeedbackUNet of ``path`` (the reference schedule runs on the eager-backend model)."""
    torch.manual_seed(0)  # identical initial weights on every path
    backend = "eager" if path in ("reference", "eager") else None
    bptt = "checkpoint" if path == "checkpoint" else "full"
    return fbkernels.models.FeedbackUNet(config["in_channels"], config["num_classes"], **_kwargs(config),
                                         bptt=bptt, backend=backend).to(device=device, dtype=dtype)


def build_feedforward_unet(config: dict, device, dtype):
    torch.manual_seed(0)
    return fbkernels.models.FeedforwardUNet(config["in_channels"], config["num_classes"], **_kwargs(config)).to(
        device=device, dtype=dtype)


def build_cbl(config: dict, path: str, steps: int, device, dtype):
    torch.manual_seed(0)
    backend = "eager" if path in ("reference", "eager") else None
    return fbkernels.models.CBLCNN(config["in_channels"], config["num_classes"], **_kwargs(config), steps=steps,
                                   backend=backend).to(device=device, dtype=dtype)


def build_standard_cnn(config: dict, device, dtype):
    torch.manual_seed(0)
    kwargs = {key: config[key] for key in ("widths", "hidden") if key in config}
    return fbkernels.models.cbl.StandardCNN(config["in_channels"], config["num_classes"], **kwargs).to(
        device=device, dtype=dtype)


# ---------------------------------------------------------------- losses and backward schedules

def summed_loss_backward(model, x, target, forward_kwargs) -> None:
    """fbkernels' schedule: the cross-entropy of every step's logits summed, one backward."""
    logits = model(x, **forward_kwargs)
    if isinstance(logits, torch.Tensor):
        logits = [logits]
    total = sum(F.cross_entropy(step_logits, target) for step_logits in logits)
    total.backward()


def unet_reference_backward(model, x, target, steps: int, *, stop_at_equilibrium: bool = False) -> int | None:
    """The reference implementation's schedule on ``model``'s network, head and decay.

    Each of the first T-1 steps backpropagates its own loss through the whole trajectory so far (retaining
    the graph) and evaluates the authors' equilibrium test (the state's absolute sum moved by <= 1e-5); the
    final step's loss is backpropagated last. The gradient is that of the summed loss. Returns the step after
    which the test held (None if never). With ``stop_at_equilibrium`` the loop stops there, as the authors'
    does; the bench runs all T steps so that every path computes the same gradient.
    """
    k, l = model.num_classes, model.seg_channels
    v = x.new_zeros((x.shape[0], k, *x.shape[2:]))
    h, previous_sum, t, settled = None, float("inf"), 1, None

    def step(h, v, t):
        f = model.network(torch.cat([x, v], dim=1))
        if h is None:
            h = torch.zeros_like(f)
        mix = model.decay(t - 1) if model.decay is not None else model.identity.to(f.dtype)
        h, v_softmax = _reference.feedback_step_forward(h, f, mix, k)
        v = v_softmax if model.softmax else h[:, model.state_channels - k:]
        return h, v, F.cross_entropy(model.head(h[:, :l]), target)

    while t < steps:
        h, v, loss = step(h, v, t)
        loss.backward(retain_graph=True)
        state_sum = float(h.detach().abs().sum())
        t += 1
        if settled is None and abs(state_sum - previous_sum) <= EQUILIBRIUM_ATOL:
            settled = t - 1
            if stop_at_equilibrium:
                break
        previous_sum = state_sum
    h, v, loss = step(h, v, t)
    loss.backward()
    return settled


def cbl_reference_backward(model, x, target) -> int:
    """The per-step backward schedule on a "state"-mode CBLCNN: a backward after each refinement's logits.

    y(0) from the backbone, then per refinement the context gates the stored block outputs (plain-autograd
    gate) and the head recomputes the logits; each y(t), t < T, is backpropagated through everything so far
    (retaining the graph), y(T) last: T+1 backbone backwards instead of one.
    """
    if model.mode != "state":
        raise ValueError(f"the CBL reference schedule is written for mode='state', got {model.mode!r}")
    h, states = x, []
    for block in model.blocks:
        h = block(h)
        states.append(h)
    logits = model.head(h)
    for _ in range(model.steps):
        F.cross_entropy(logits, target).backward(retain_graph=True)
        context = model.context(logits)
        for i in model.gated_blocks:
            gate_logits = model.adapters[str(i)](context).to(states[i].dtype)
            states[i] = _reference.context_gate_forward(states[i], gate_logits, model.alpha)
        logits = model.head(states[-1])
    F.cross_entropy(logits, target).backward()
    return model.steps


class TrainStep:
    """One path's training step: ``loss_backward()`` fills the gradients, ``__call__`` is a whole Adam step."""

    def __init__(self, model, loss_backward):
        self.model = model  # the nn.Module whose parameters are trained (the uncompiled one under compile)
        self.loss_backward = loss_backward
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.info: dict = {}  # what a schedule reports about its last step (the reference's equilibrium step)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_backward()
        self.optimizer.step()

    def gradients(self) -> dict:
        """{parameter name: gradient clone or None} of one forward + backward from the current weights."""
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_backward()
        # A compiled submodule's parameters are named through "_orig_mod."; strip it so paths compare by name.
        grads = {name.replace("_orig_mod.", ""): None if p.grad is None else p.grad.detach().clone()
                 for name, p in self.model.named_parameters()}
        self.optimizer.zero_grad(set_to_none=True)
        return grads

    def prepared(self):
        """The step for the memory measurement, with the previous step's gradients already released."""
        self.optimizer.zero_grad(set_to_none=True)
        return self


def gradient_error(expected: dict, actual: dict) -> tuple[float, str]:
    """(worst per-parameter max|g - g_expected| / max|g_expected|, its parameter name); None counts as zero.

    A parameter whose expected gradient is all zero scores its absolute error divided by 1e-30, so any
    non-zero difference there is a failure.
    """
    if set(expected) != set(actual):
        raise AssertionError(f"parameter names differ: {sorted(set(expected) ^ set(actual))}")
    worst, worst_name = 0.0, ""
    for name, want in expected.items():
        got = actual[name]
        if want is None and got is None:
            continue
        reference = torch.zeros_like(got) if want is None else want
        value = torch.zeros_like(want) if got is None else got
        scale = max(float(reference.abs().max()) if reference.numel() else 0.0, 1e-30)
        error = float((value.double() - reference.double()).abs().max()) / scale if reference.numel() else 0.0
        if not error <= worst:  # also catches NaN
            worst, worst_name = error, name
            if error != error:
                return float("nan"), name
    return worst, worst_name


def assert_equal_gradients(expected: dict, actual: dict, tol: float, label: str) -> float:
    """The worst relative gradient error of ``actual`` against ``expected``; AssertionError above ``tol``."""
    error, name = gradient_error(expected, actual)
    if not error <= tol:
        raise AssertionError(f"{label}: gradient of {name!r} differs from the eager path's by {error:.3g} "
                             f"(relative to its max) > tol {tol:g}")
    return error


# ---------------------------------------------------------------- measurement

def make_unet_step(path: str, config: dict, x, target, steps: int, device, dtype) -> TrainStep:
    model = build_unet(config, path, device, dtype)
    if path == "reference":
        train_step = TrainStep(model, lambda: train_step.info.update(
            equilibrium_step=unet_reference_backward(model, x, target, steps)))
        return train_step
    if path == "compile_network":
        # The per-step network compiled once and reused by every step: compilation no longer grows with T.
        model.network = torch.compile(model.network, dynamic=False)
    runner = torch.compile(model, dynamic=False) if path == "compile" else model
    return TrainStep(model, lambda: summed_loss_backward(runner, x, target, {"steps": steps}))


def make_cbl_step(path: str, config: dict, x, target, steps: int, device, dtype) -> TrainStep:
    model = build_cbl(config, path, steps, device, dtype)
    if path == "reference":
        return TrainStep(model, lambda: cbl_reference_backward(model, x, target))
    runner = torch.compile(model, dynamic=False) if path == "compile" else model
    return TrainStep(model, lambda: summed_loss_backward(runner, x, target, {}))


def _grad_tol(path: str, args) -> float:
    """Compiled paths get --compile-grad-tol: inductor's gradients of FeedbackUNet T=5 differ from eager's by
    up to 7e-3 (relative) while its forward agrees to 3e-6 and aot_eager's gradients to 1e-6; that fits its
    max-pool backward sending a window's gradient to another of tied maxima (18% of the first level's 2x2
    windows are tied after ReLU), an equally valid subgradient, but it is not proven."""
    return args.compile_grad_tol if path.startswith("compile") else args.grad_tol


def _fx_graph_cache_counts() -> dict:
    """Inductor's FX-graph cache hits and misses so far: a hit means the compile time excludes code generation."""
    counters = torch._dynamo.utils.counters["inductor"]
    return {"fxgraph_cache_hit": counters["fxgraph_cache_hit"], "fxgraph_cache_miss": counters["fxgraph_cache_miss"]}


def measure(steps_by_path: dict, unit: TrainStep, device, args, label: str) -> dict:
    """{path: figures} of one model at one T: gradient check against "eager", interleaved timing, peak memory."""
    compile_s, compile_cache, grads = {}, {}, {}
    for path, step in steps_by_path.items():
        before = _fx_graph_cache_counts()
        started = time.perf_counter()
        grads[path] = step.gradients()  # the compile path compiles here
        if path in ("compile", "compile_network"):
            compile_s[path] = time.perf_counter() - started
            after = _fx_graph_cache_counts()
            compile_cache[path] = {key: after[key] - before[key] for key in after}
    errors = {path: assert_equal_gradients(grads["eager"], grads[path], _grad_tol(path, args), f"{label} {path}")
              for path in steps_by_path}
    fns = {**steps_by_path, "unit": unit}
    timings = common.time_fns(fns, device, budget_s=args.budget, min_repeats=args.repeats,
                              max_repeats=max(args.repeats, MAX_ROUNDS), warmup_s=0.0, warmup_calls=1)
    out = {}
    for name, fn in fns.items():
        peak = common.peak_memory_bytes(fn.prepared(), device)
        out[name] = {"timing": timings[name], "peak_bytes": peak, "compile_s": compile_s.get(name),
                     "equilibrium_step": fn.info.get("equilibrium_step"),
                     "compile_cache": compile_cache.get(name), "grad_rel_err": errors.get(name)}
    return out


def row(op: str, path: str, provider: str, shape, steps: int, bptt, schedule: str, figures: dict, dtype) -> dict:
    timing = figures["timing"]
    return {
        "op": op, "path": path, "provider": provider, "dtype": str(dtype).replace("torch.", ""), "shape": list(shape),
        "pass": "train_step", "steps": steps, "bptt": bptt, "schedule": schedule,
        "compiled": path.startswith("compile"),
        "ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms, "repeats": timing.repeats,
        "gbps": None, "frac_peak": None, "peak_mem_mib": figures["peak_bytes"] / common.MIB,
        "compile_s": figures["compile_s"], "compile_cache": figures["compile_cache"],
        "equilibrium_step": figures["equilibrium_step"],
        "grad_rel_err": figures["grad_rel_err"],
    }


def _provider(path: str, device, dtype) -> str:
    if path in ("reference", "eager"):
        return "eager"
    return fbkernels.backends.resolve_backend(None, device, dtype)


def _schedule(path: str) -> str:
    return "per_step_backward" if path == "reference" else "summed_loss"


def run(args) -> dict:
    """The benchmark of parse_args' arguments (all checked and resolved there)."""
    device = args.device
    common.use_device(device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    size, unet_batch, cbl_batch = args.size, args.batch, args.cbl_batch
    steps_list, cbl_steps_list = args.steps, args.cbl_steps
    compile_steps, network_compile_steps = args.compile_steps, args.compile_network_steps
    cbl_compile_steps = args.cbl_compile_steps
    unet_config, cbl_config = (SMOKE_UNET, SMOKE_CBL) if args.smoke else (UNET_CONFIG, CBL_CONFIG)
    models = args.models
    started = time.perf_counter()
    described = []
    if "unet" in models:
        described.append(f"FeedbackUNet batch {unet_batch} at {size}x{size}, T in {steps_list} (compiled at "
                         f"{compile_steps or 'none'}, network compiled at {network_compile_steps or 'none'})")
    if "cbl" in models:
        described.append(f"CBLCNN batch {cbl_batch}, T in {cbl_steps_list} (compiled at {cbl_compile_steps or 'none'})")
    print(f"{common.device_name(device)}: " + "; ".join(described), file=sys.stderr)

    from tqdm import tqdm

    gen = torch.Generator().manual_seed(0)
    rows = []
    groups = (len(steps_list) if "unet" in models else 0) + (len(cbl_steps_list) if "cbl" in models else 0)
    progress = tqdm(total=groups, desc="train_step", file=sys.stderr, disable=args.no_progress)
    if "unet" in models:
        x = torch.rand(unet_batch, 3, size, size, generator=gen).to(device=device, dtype=dtype)
        target = torch.randint(0, 2, (unet_batch, size, size), generator=gen).to(device)
        feedforward = build_feedforward_unet(unet_config, device, dtype)
        unit = TrainStep(feedforward, lambda: summed_loss_backward(feedforward, x, target, {}))
        for steps in steps_list:
            progress.set_postfix_str(f"FeedbackUNet T={steps}")
            paths = [p for p in UNET_PATHS if (p != "compile" or steps in compile_steps)
                     and (p != "compile_network" or steps in network_compile_steps)]
            steps_by_path = {p: make_unet_step(p, unet_config, x, target, steps, device, dtype) for p in paths}
            figures = measure(steps_by_path, unit, device, args, f"FeedbackUNet T={steps}")
            for path in paths:
                bptt = "checkpoint" if path == "checkpoint" else "full"
                rows.append(row("feedback_unet_train_step", path, _provider(path, device, dtype), x.shape, steps, bptt,
                                _schedule(path), figures[path], dtype))
            rows.append(row("feedforward_unet_train_step", "feedforward", "-", x.shape,  # no fbkernels op
                            steps, None, "single_pass", figures["unit"], dtype))
            progress.update(1)
    if "cbl" in models:
        x = torch.randn(cbl_batch, 3, 32, 32, generator=gen).to(device=device, dtype=dtype)
        target = torch.randint(0, cbl_config["num_classes"], (cbl_batch,), generator=gen).to(device)
        cnn = build_standard_cnn(cbl_config, device, dtype)
        unit = TrainStep(cnn, lambda: summed_loss_backward(cnn, x, target, {}))
        for steps in cbl_steps_list:
            progress.set_postfix_str(f"CBLCNN T={steps}")
            paths = [p for p in CBL_PATHS if p != "compile" or steps in cbl_compile_steps]
            steps_by_path = {p: make_cbl_step(p, cbl_config, x, target, steps, device, dtype) for p in paths}
            figures = measure(steps_by_path, unit, device, args, f"CBLCNN T={steps}")
            for path in paths:
                rows.append(row("cbl_cnn_train_step", path, _provider(path, device, dtype), x.shape, steps, None,
                                _schedule(path), figures[path], dtype))
            rows.append(row("standard_cnn_train_step", "feedforward", "-", x.shape, steps, None, "single_pass",
                            figures["unit"], dtype))
            progress.update(1)
    progress.close()
    add_ratios(rows)

    payload = common.header(device, "train_step", args.argv)
    payload.update({
        "dtype": args.dtype, "smoke": bool(args.smoke), "partial": args.partial, "models": models,
        "steps": steps_list, "cbl_steps": cbl_steps_list, "peak_gbps": None, "results": rows,
        "repeats": args.repeats, "max_rounds": max(args.repeats, MAX_ROUNDS), "budget_s": args.budget,
        "paths": {"reference": "per-step backward with retain_graph (the reference implementation's schedule), "
                               "plain-autograd state update, eager ops",
                  "eager": "backend='eager', summed loss, one backward",
                  "default": "backend=None (fastest available fbkernels backend), summed loss, one backward",
                  "checkpoint": "backend=None, bptt='checkpoint', summed loss, one backward",
                  "compile": "torch.compile(model with backend=None, dynamic=False), summed loss, one backward",
                  "compile_network": "model with backend=None whose per-step network is torch.compile(network, "
                                     "dynamic=False) (the loop and the fused state update stay eager), summed loss, "
                                     "one backward",
                  "feedforward": "the unit: FeedforwardUNet (or StandardCNN for CBLCNN) training step"},
        "grad_tol": args.grad_tol, "compile_grad_tol": args.compile_grad_tol, "compile_steps": compile_steps,
        "compile_network_steps": network_compile_steps,
        "cbl_compile_steps": cbl_compile_steps,
        "unet_config": {**unet_config, "batch": unet_batch, "size": size},
        "cbl_config": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in cbl_config.items()},
                       "batch": cbl_batch, "size": 32},
        "optimizer": "Adam(lr=1e-3)", "loss": "sum over steps of mean cross-entropy",
        "inductor_cache_dir": torch._inductor.runtime.cache_dir_utils.cache_dir(),
        "fresh_compile_cache": bool(args.fresh_compile_cache),
        "early_exit_available": "tol" in inspect.signature(fbkernels.models.FeedbackLoop.forward).parameters,
    })
    payload["fastest"] = fastest_paths(rows)
    payload["summary"] = summary(rows)
    payload["targets"] = targets(rows)
    payload["headline"], payload["headline_notes"] = headline(rows), payload["summary"]
    payload["elapsed_s"] = time.perf_counter() - started
    return payload


def _int_list(text: str) -> list[int]:
    """argparse type of a T list: comma-separated positive integers, each once; "" or "none" is the empty list."""
    if text.strip().lower() in ("", "none"):
        return []
    items = [t.strip() for t in text.split(",")]
    try:
        values = [int(t) for t in items]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers (or none), got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected each T once, got {text!r}")
    return values


# ---------------------------------------------------------------- ratios and summary

def _find(rows, op, path, steps):
    return next((r for r in rows if r["op"] == op and r["path"] == path and r["steps"] == steps), None)


UNIT_OP = {"feedback_unet_train_step": "feedforward_unet_train_step", "cbl_cnn_train_step": "standard_cnn_train_step"}


def add_ratios(rows: list[dict]) -> None:
    """speedup_vs_reference, memory_vs_reference (reference / path: > 1 is faster / lighter) and the path's
    time and memory in units of the feedforward step measured in the same group."""
    for r in rows:
        model_op = next((m for m, u in UNIT_OP.items() if r["op"] in (m, u)), None)
        reference = _find(rows, model_op, "reference", r["steps"])
        unit = _find(rows, UNIT_OP[model_op], "feedforward", r["steps"])
        r["speedup_vs_reference"] = common.ratio(reference and reference["ms"], r["ms"])
        r["memory_vs_reference"] = common.ratio(reference and reference["peak_mem_mib"], r["peak_mem_mib"])
        r["ms_in_unit"] = common.ratio(r["ms"], unit and unit["ms"])
        r["mem_in_unit"] = common.ratio(r["peak_mem_mib"], unit and unit["peak_mem_mib"])


def fastest_paths(rows: list[dict]) -> dict:
    """{"<model> T=<t>": path} of the fastest fbkernels path (default, checkpoint, compile) per model and T."""
    out = {}
    for op, model in (("feedback_unet_train_step", "FeedbackUNet"), ("cbl_cnn_train_step", "CBLCNN")):
        for steps in sorted({r["steps"] for r in rows if r["op"] == op}):
            candidates = [r for r in rows if r["op"] == op and r["steps"] == steps and r["path"] in FBKERNELS_PATHS]
            if candidates:
                out[f"{model} T={steps}"] = min(candidates, key=lambda r: r["ms"])["path"]
    return out


def _times(ratio: float, better: str, worse: str) -> str:
    """"2.50x faster" for a ratio (reference / path) of 2.5, "1.25x slower" for 0.8."""
    return f"{ratio:.2f}x {better}" if ratio >= 1 else f"{1 / ratio:.2f}x {worse}"


def summary(rows: list[dict]) -> list[str]:
    """One sentence per model and T: how many times faster and lighter each path is than the reference."""
    lines = []
    for op, model in (("feedback_unet_train_step", "FeedbackUNet"), ("cbl_cnn_train_step", "CBLCNN")):
        for steps in sorted({r["steps"] for r in rows if r["op"] == op}):
            reference = _find(rows, op, "reference", steps)
            unit = _find(rows, UNIT_OP[op], "feedforward", steps)
            if reference is None:
                continue
            parts = [f"{r['path']} {_times(r['speedup_vs_reference'], 'faster', 'slower')} and "
                     f"{_times(r['memory_vs_reference'], 'lighter', 'heavier')} ({r['ms']:.0f} ms, "
                     f"{r['peak_mem_mib']:.1f} MiB)"
                     for r in rows if r["op"] == op and r["steps"] == steps and r["path"] != "reference"]
            lines.append(f"{model} T={steps}: against the reference schedule ({reference['ms']:.0f} ms, "
                         f"{reference['peak_mem_mib']:.1f} MiB = {reference['ms_in_unit']:.1f}x the time and "
                         f"{reference['mem_in_unit']:.1f}x the memory of one feedforward step "
                         f"of {unit['ms']:.0f} ms, {unit['peak_mem_mib']:.1f} MiB), " + "; ".join(parts) + ".")
    return lines


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets on FeedbackUNet, each with its measured figure and whether it is met."""
    op = "feedback_unet_train_step"
    out = []
    for steps, goal in ((5, 2.5), (10, 4.5)):
        candidates = [r for r in rows if r["op"] == op and r["steps"] == steps and r["path"] in FBKERNELS_PATHS]
        if candidates and _find(rows, op, "reference", steps):
            best = max(candidates, key=lambda r: r["speedup_vs_reference"])
            out.append({"target": f"fastest fbkernels path >= {goal}x the reference schedule at T={steps}",
                        "path": best["path"], "value": best["speedup_vs_reference"], "goal": goal,
                        "met": best["speedup_vs_reference"] >= goal, "grad_rel_err": best["grad_rel_err"]})
    ckpt, full = _find(rows, op, "checkpoint", 20), _find(rows, op, "default", 20)
    if ckpt:
        out.append({"target": "checkpoint T=20 peak memory <= 2.5x the feedforward U-Net step's",
                    "path": "checkpoint", "value": ckpt["mem_in_unit"], "goal": 2.5, "met": ckpt["mem_in_unit"] <= 2.5})
    if ckpt and full:
        value = ckpt["ms"] / full["ms"]
        out.append({"target": "checkpoint T=20 step time <= 1.3x full BPTT's (default path)",
                    "path": "checkpoint", "value": value, "goal": 1.3, "met": value <= 1.3})
    return out


def headline(rows: list[dict]) -> list[dict]:
    """Rows of the README table (bench/_common.update_readme_table): FeedbackUNet and CBLCNN, every path."""
    return [{"model": "FeedbackUNet" if r["op"] == "feedback_unet_train_step" else "CBLCNN",
             "shape": common.shape_str(r["shape"]), "steps": r["steps"], "path": r["path"], "provider": r["provider"],
             "bptt": r["bptt"] or "-", "ms": r["ms"], "peak_mem_mib": r["peak_mem_mib"],
             "speedup_vs_reference": r["speedup_vs_reference"], "memory_vs_reference": r["memory_vs_reference"]}
            for r in rows if r["op"] in UNIT_OP]


def _compile_cell(r: dict):
    if r["compile_s"] is None:
        return None
    hits = (r.get("compile_cache") or {}).get("fxgraph_cache_hit", 0)
    return f"{r['compile_s']:.0f}" + (" (warm cache)" if hits else "")


def print_report(payload: dict) -> None:
    names = {"feedback_unet_train_step": "FeedbackUNet", "feedforward_unet_train_step": "FeedforwardUNet (unit)",
             "cbl_cnn_train_step": "CBLCNN", "standard_cnn_train_step": "StandardCNN (unit)"}
    columns = ["model", "input", "T", "path", "ops", "step ms", "p20-p80 ms", "peak MiB", "x faster than ref",
               "x lighter than ref", "time / ff step", "mem / ff step", "compile s", "grad err"]

    def fmt(value, pattern):
        return None if value is None else pattern.format(value)

    table = [[names[r["op"]], common.shape_str(r["shape"]), r["steps"], r["path"], r["provider"], r["ms"],
              f"{r['p20_ms']:.4g}-{r['p80_ms']:.4g}", r["peak_mem_mib"], fmt(r["speedup_vs_reference"], "{:.2f}x"),
              fmt(r["memory_vs_reference"], "{:.2f}x"), fmt(r["ms_in_unit"], "{:.2f}"), fmt(r["mem_in_unit"], "{:.2f}"),
              _compile_cell(r), fmt(r["grad_rel_err"], "{:.1e}")]
             for r in payload["results"]]
    print(f"## train_step on {payload['device']} (torch {payload['torch']}, {payload['dtype']}, {payload['date']})\n")
    print(common.markdown_table(columns, table))
    print()
    for line in payload["summary"]:
        print(f"summary: {line}")
    for key, path in payload["fastest"].items():
        print(f"fastest fbkernels path at {key}: {path}")
    for target in payload["targets"]:
        print(f"target: {target['target']}: {target['value']:.2f} ({target['path']}) -> "
              f"{'met' if target['met'] else 'NOT met'}")


COLOURS = {"reference": "tab:red", "eager": "tab:gray", "default": "tab:blue", "checkpoint": "tab:cyan",
           "compile": "tab:purple", "compile_network": "tab:green", "feedforward": "black"}


def plot(payload: dict, path: Path) -> Path:
    """Per model: step time (log) and peak memory per T, one bar per path (labels: times faster / lighter than the
    reference schedule); the feedforward network's step is the dashed unit line. A path not run at a T shows n/a."""
    rows = payload["results"]
    fig, axes = common.new_figure(2, 2, width=6.4, height=4.2)
    unet_cfg, cbl_cfg = payload["unet_config"], payload["cbl_config"]
    panels = (("feedback_unet_train_step", "feedforward_unet_train_step", UNET_PATHS,
               f"FeedbackUNet w{unet_cfg['width']} d{unet_cfg['depth']}, {unet_cfg['batch']}x{unet_cfg['size']}^2"),
              ("cbl_cnn_train_step", "standard_cnn_train_step", CBL_PATHS,
               f"CBLCNN (state), batch {cbl_cfg['batch']}, 32^2"))
    for col, (op, unit_op, paths, title) in enumerate(panels):
        steps = sorted({r["steps"] for r in rows if r["op"] == op})
        if not steps:
            axes[0][col].axis("off")
            axes[1][col].axis("off")
            continue
        paths = [p for p in paths if any(r["op"] == op and r["path"] == p for r in rows)]
        found = {p: [_find(rows, op, p, t) for t in steps] for p in paths}
        reference = [_find(rows, op, "reference", t) for t in steps]
        for row, (key, better, ylabel, log) in enumerate((("ms", "faster", "median training step, ms (log)", True),
                                                           ("peak_mem_mib", "lighter", "peak memory, MiB", False))):
            series = {p: [None if r is None else r[key] for r in found[p]] for p in paths}
            labels = {p: [None if r is None or ref is None or not r[key] else f"{ref[key] / r[key]:.1f}x"
                          for r, ref in zip(found[p], reference)] for p in paths if p != "reference"}
            ax = axes[row][col]
            common.grouped_bars(ax, [f"T = {t}" for t in steps], series, COLOURS, labels=labels, log=log)
            units = [_find(rows, unit_op, "feedforward", t) for t in steps]
            for i, unit in enumerate(units):
                if unit is not None:
                    ax.hlines(unit[key], i - 0.45, i + 0.45, colors=COLOURS["feedforward"], linestyles="--",
                              label="feedforward step (unit)" if i == 0 else None)
            ax.set(ylabel=ylabel, title=f"{title}\n{'step time' if row == 0 else 'peak memory'} "
                                         f"(labels: x {better} than reference)")
            ax.legend(fontsize=7, loc="upper left", ncol=2)
    return common.save_figure(fig, path, payload)


# ---------------------------------------------------------------- command line

def parse_args(argv=None):
    """The arguments, all checked and resolved before anything runs: args.device a torch.device, the T lists,
    sizes, repeats and budget filled in from the (smoke) defaults where not given, args.partial."""
    parser = common.run_argument_parser(__doc__)
    parser.set_defaults(out=DEFAULT_OUT)
    positive = common.positive_int
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--models", default="unet,cbl", help="comma-separated: unet, cbl (default both)")
    parser.add_argument("--steps", type=_int_list, default=None,
                        help="FeedbackUNet step counts T, positive (default 5,10,20; --smoke 2,3)")
    parser.add_argument("--compile-steps", type=_int_list, default=None,
                        help="the T of --steps at which FeedbackUNet is also compiled (default 5 when in --steps; "
                             "'none' or '' to skip; each costs minutes of compilation on a CPU; --smoke: none)")
    parser.add_argument("--compile-network-steps", type=_int_list, default=None,
                        help="the T of --steps at which FeedbackUNet runs with torch.compile(model.network) "
                             "(default: every T of --steps; 'none' or '' to skip; --smoke: none)")
    parser.add_argument("--cbl-steps", type=_int_list, default=None,
                        help="CBLCNN refinement counts T, positive (default 2,10; --smoke 2)")
    parser.add_argument("--cbl-compile-steps", type=_int_list, default=None,
                        help="the T of --cbl-steps at which CBLCNN is compiled (default 2 when in --cbl-steps; "
                             "'none' or '' to skip; --smoke: none)")
    parser.add_argument("--size", type=positive, default=None,
                        help="U-Net image side (default 512 on GPU, 64 on CPU; --smoke 16)")
    parser.add_argument("--batch", type=positive, default=None, help="U-Net batch (default 1, the paper's)")
    parser.add_argument("--cbl-batch", type=positive, default=None,
                        help="CBL-CNN batch (default 128 on GPU, 8 on CPU; --smoke 2)")
    parser.add_argument("--repeats", type=positive, default=None,
                        help="minimum timed rounds per compared group, >= 1 (one round: one step of every path and "
                             "of the unit; default 5, --smoke 1)")
    parser.add_argument("--budget", type=common.finite_non_negative, default=None,
                        help="seconds of timed rounds per compared group, roughly: the number of rounds is "
                             "this budget over the warm-up step's time, clamped to at least --repeats and at most "
                             f"max(--repeats, {MAX_ROUNDS}), so a large budget buys no more than {MAX_ROUNDS} rounds "
                             "(default 10, --smoke 0; recorded in the JSON with the rounds' bounds)")
    parser.add_argument("--grad-tol", type=common.finite_non_negative, default=1e-4,
                        help="largest allowed max|g - g_eager| / max|g_eager| per parameter (default 1e-4)")
    parser.add_argument("--compile-grad-tol", type=common.finite_non_negative, default=2e-2,
                        help="the same for the compiled paths (default 2e-2; see _grad_tol for why it is looser)")
    parser.add_argument("--fresh-compile-cache", action="store_true",
                        help="compile into a new, empty inductor cache directory (TORCHINDUCTOR_CACHE_DIR): the "
                             "compile time a first-time user sees; without it a warm cache can hide code generation")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models, T in 2,3 (CBL 2), one repeat, no compile, unless other options say "
                             "otherwise: checks that the script runs")
    args = parser.parse_args(argv)
    common.check_run_args(parser, args, argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - {"unet", "cbl"}
    if unknown or not models:
        parser.error(f"--models: expected a comma-separated subset of unet, cbl, got {args.models!r}")
    if len(set(models)) != len(models):
        parser.error(f"--models: expected each model once, got {args.models!r}")
    args.models = models
    # Options that only one model reads may not be given when that model does not run.
    for model, options in (("unet", ("steps", "compile_steps", "compile_network_steps", "size", "batch")),
                           ("cbl", ("cbl_steps", "cbl_compile_steps", "cbl_batch"))):
        given = [f"--{name.replace('_', '-')}" for name in options if getattr(args, name) not in (None, [])]
        if model not in models and given:
            parser.error(f"{given[0]}: expected only with {model} in --models, got --models {','.join(models)}")
    defaults = DEFAULTS[bool(args.smoke)]
    gpu = args.device.type == "cuda"
    defaults = {**defaults, "size": defaults.get("size", 512 if gpu else 64),
                "cbl_batch": defaults.get("cbl_batch", 128 if gpu else 8)}
    for name in ("steps", "cbl_steps", "size", "batch", "cbl_batch", "repeats", "budget"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    for name in ("steps", "cbl_steps"):
        if not getattr(args, name):
            parser.error(f"--{name.replace('_', '-')}: expected at least one T, got none")
    depth = (SMOKE_UNET if args.smoke else UNET_CONFIG)["depth"]
    if args.size < 2 ** depth:
        parser.error(f"--size: expected at least {2 ** depth} (the U-Net of depth {depth} halves the image "
                     f"{depth} times), got {args.size}")
    # The compiled T lists: given ones must be T of their run; defaults keep only the T that run.
    for name, runs in (("compile_steps", "steps"), ("compile_network_steps", "steps"),
                       ("cbl_compile_steps", "cbl_steps")):
        measured = getattr(args, runs)
        given = getattr(args, name)
        if given is None:
            default = defaults[name]
            setattr(args, name, list(measured) if default == "all" else [t for t in default if t in measured])
        elif not set(given) <= set(measured):
            parser.error(f"--{name.replace('_', '-')}: expected T among --{runs.replace('_', '-')} "
                         f"{','.join(map(str, measured))}, got {','.join(map(str, given))}")
    args.partial = not _groups(DEFAULTS[bool(args.smoke)], ["unet", "cbl"]) <= _groups(vars(args), models)
    return args


def _groups(settings: dict, models) -> set:
    """(model, T, path) of every group a run with these T lists measures; path "" stands for the paths that run at
    every T (reference, eager, default and, for FeedbackUNet, checkpoint)."""
    groups = set()
    if "unet" in models:
        network = settings["steps"] if settings["compile_network_steps"] == "all" else settings["compile_network_steps"]
        groups |= {("unet", t, "") for t in settings["steps"]}
        groups |= {("unet", t, "compile") for t in settings["compile_steps"]}
        groups |= {("unet", t, "compile_network") for t in network}
    if "cbl" in models:
        groups |= {("cbl", t, "") for t in settings["cbl_steps"]}
        groups |= {("cbl", t, "compile") for t in settings["cbl_compile_steps"]}
    return groups


def write_outputs(args, payload: dict) -> Path:
    """<out>/train_step_<device>[_<dtype>][_partial][_smoke].json (named for what it holds; a rerun replaces it),
    the PNG beside it, the README table of the results directory; the report on stdout."""
    path = common.write_json(payload, common.result_path(args.out, "train_step", args.device, dtype=args.dtype,
                                                         partial=args.partial, smoke=args.smoke))
    print_report(payload)
    if not args.no_plot:
        plot(payload, path.with_suffix(".png"))
    common.update_readme_table(args.out)
    print(f"\nwrote {path}" + ("" if args.no_plot else f" and {path.with_suffix('.png').name}")
          + f"; {payload['elapsed_s']:.0f} s", file=sys.stderr)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.fresh_compile_cache:
        write_outputs(args, run(args))
        return 0
    import os
    import tempfile

    # Read by inductor when it first compiles, so setting it before any compilation is enough. The directory
    # (hundreds of MB of generated code) goes when the run ends, and the caller's setting comes back.
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="fbkernels_train_step_inductor_") as cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        try:
            payload = run(args)
        finally:
            if previous is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
    payload["inductor_cache_dir_removed"] = True  # the fresh cache went with the run
    write_outputs(args, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
