"""Shared helpers of the fbkernels benchmarks: timing, peak memory, peak bandwidth, JSON, markdown, README table.

Timing (``time_fns``): warm-up calls first (at least two and ``warmup_s`` seconds; they include any
torch.compile compilation and are excluded), then timed calls in interleaved rounds (one call of every
compared provider per round, rotating order, so load from other processes on a shared machine hits all
alike); figures are the median and the 20th/80th percentiles over the rounds. Python's garbage collector is
paused during the timed rounds, as ``timeit`` does, so that a collection triggered by one provider's allocations
does not land in another's time.
  - CPU: ``time.perf_counter`` around each call (torch's default intra-op thread count).
  - CUDA: a CUDA event pair around each call, with the L2 cache flushed (a 256 MiB buffer zeroed)
    before each call, like ``triton.testing.do_bench``; one synchronisation after all calls.

Peak memory of a pass (``peak_memory_bytes``), in bytes above the level at the start of the pass (inputs
that exist beforehand are not counted; outputs, saved activations, temporaries and gradients are):
  - CPU: there is no CPU allocator statistic in PyTorch, so the pass runs once more (untimed) under
    ``torch.profiler.profile(profile_memory=True)``; every allocation and free of torch's CPU
    allocator is an event with its byte count, and the peak is the maximum of their running sum.
    Memory a compiled kernel allocates outside torch's allocator (malloc inside C++) is not seen.
  - CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the
    allocated bytes at the start.

Peak bandwidth (``measure_peak_bandwidth``): a large copy ``dst.copy_(src)`` on the device (256 MiB on
CPU, up to 1 GiB on GPU), repeated; peak = (bytes read + bytes written) / the fastest copy. The best of several
copies is what the memory system can do when nothing else gets in the way, so bandwidth fractions compare across
runs on a shared machine (a median would drift with the load).

Outputs go to ``--out`` (default ``runs/bench/``, outside the committed files); a file is named for the script,
the device, the dtype when not float32, ``_partial`` for a run that leaves out part of the default run, and
``_smoke`` for smoke runs, never for the date (``result_path``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import glob
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import fbkernels

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "runs" / "bench"
MIB = 1 << 20


def import_fbkernels():
    """Import fbkernels; fall back to the source tree when it is not installed (the C++ backend then needs a build)."""
    try:
        import fbkernels
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))
        import fbkernels
    return fbkernels


# ---------------------------------------------------------------- device

def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(text: str | None) -> torch.device:
    """The device of ``--device`` (cpu, cuda or cuda:N; None: cuda when present, else cpu), always with an index on
    CUDA (``torch.cuda.set_device`` refuses a CUDA device without one); ValueError saying why it cannot be used."""
    if text is None:
        text = default_device()
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"expected cpu, cuda or cuda:N with CUDA available, got {text!r}: CUDA is not available "
                         "on this machine")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if not 0 <= index < count:
        raise ValueError(f"expected cuda:N with N in 0..{count - 1} ({count} CUDA device{'s' * (count != 1)}), "
                         f"got {text!r}")
    return torch.device("cuda", index)


def use_device(device: torch.device) -> None:
    """Make a (resolved, indexed) CUDA device the current one; nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def device_name(device: torch.device) -> str:
    """Human-readable name of the device, e.g. "NVIDIA H100 80GB HBM3" or "AMD EPYC (2 threads)"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def available_memory_bytes(device: torch.device) -> int:
    """Free memory the benchmark may use: MemAvailable on Linux CPUs, cudaMemGetInfo's free bytes on GPUs."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30  # unknown: assume a modest machine


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- timing

@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    warmup_s: float  # wall time of the warm-up calls (includes torch.compile's compilation)


_L2_FLUSH: dict[torch.device, torch.Tensor] = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    if device not in _L2_FLUSH:
        _L2_FLUSH[device] = torch.empty(256 * MIB, dtype=torch.int8, device=device)
    return _L2_FLUSH[device]


def _summarise(times_ms: list[float], warmup_s: float) -> Timing:
    p20, median, p80 = np.percentile(np.asarray(times_ms), [20, 50, 80])
    return Timing(float(median), float(p20), float(p80), len(times_ms), warmup_s)


def time_fns(fns: dict, device: torch.device, *, budget_s: float = 0.3, min_repeats: int = 5,
             max_repeats: int = 100, warmup_s: float = 0.05, warmup_calls: int = 2) -> dict:
    """{name: Timing} of each no-argument callable, timed in interleaved rounds.

    Each callable is warmed up first (at least ``warmup_calls`` calls and ``warmup_s`` seconds; compilation
    happens here; the last warm-up call's time sizes the run), then every round calls each callable once, in a
    rotating order, so that load from other processes on a shared machine falls on all of them alike and their
    ratios stay honest. The number of rounds fills about ``budget_s`` seconds, clamped to [min_repeats,
    max_repeats]. The garbage collector is paused during the rounds (``timeit`` does the same).
    """
    names = list(fns)
    warmups, estimates = {}, {}
    for name in names:
        fn = fns[name]
        start = time.perf_counter()
        calls = 0
        while calls < max(1, warmup_calls) or time.perf_counter() - start < warmup_s:
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            estimates[name] = max(time.perf_counter() - t0, 1e-6)
            calls += 1
        warmups[name] = time.perf_counter() - start
    repeats = int(min(max_repeats, max(min_repeats, budget_s / sum(estimates.values()))))

    with _gc_paused():
        times_ms = _timed_rounds(fns, names, repeats, device)
    return {name: _summarise(times_ms[name], warmups[name]) for name in names}


@contextlib.contextmanager
def _gc_paused():
    """Collects once, then keeps Python's garbage collector off until the block ends (restored if it was on)."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _timed_rounds(fns: dict, names: list, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """{name: milliseconds of each call} over ``repeats`` rounds of one call per name, in rotating order."""
    times_ms: dict[str, list[float]] = {name: [] for name in names}
    if device.type == "cuda":
        flush = _l2_flush_buffer(device)
        recorded = []
        for round_index in range(repeats):
            for j in range(len(names)):
                name = names[(round_index + j) % len(names)]
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                flush.zero_()
                begin.record()
                fns[name]()
                end.record()
                recorded.append((name, begin, end))
        torch.cuda.synchronize(device)
        for name, begin, end in recorded:
            times_ms[name].append(begin.elapsed_time(end))
    else:
        for round_index in range(repeats):
            for j in range(len(names)):
                name = names[(round_index + j) % len(names)]
                t0 = time.perf_counter()
                fns[name]()
                times_ms[name].append((time.perf_counter() - t0) * 1e3)
    return times_ms


# ---------------------------------------------------------------- memory

PEAK_MEM_METHOD = {
    "cpu": "torch.profiler(profile_memory=True) CPU-allocator events of one untimed pass: peak of the running sum of "
           "allocated bytes above the level at the start of the pass (pre-existing inputs excluded; memory "
           "allocated outside torch's allocator is not seen; the cpp backend's cache of large output blocks is "
           "emptied before the pass, so its outputs are counted)",
    "cuda": "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() at the start "
            "of the pass (pre-existing inputs excluded)",
}

TIMING_METHOD = {
    "cpu": "time.perf_counter around each call after warm-up (compilation excluded); compared providers interleaved "
           "call by call; median, p20, p80 over repeats; torch default intra-op threads; no cache flush between calls; "
           "Python's garbage collector paused during the timed rounds",
    "cuda": "CUDA events around each call after warm-up (compilation excluded), L2 flushed (256 MiB zeroed) before "
            "each call; compared providers interleaved call by call; median, p20, p80 over repeats; Python's garbage "
            "collector paused during the timed rounds",
}


@contextlib.contextmanager
def _quiet_stderr():
    """Silences file descriptor 2 (the profiler's C++ side writes its status lines there) and Python warnings."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated during one call of ``fn`` above the allocated level when it starts (see module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del result
        return int(peak)

    from torch.profiler import ProfilerActivity, profile

    # The cpp backend hands out cached blocks for outputs of 32 MiB or more: a reused block is no allocator event,
    # so a pass starting with cached blocks would not count its outputs. Emptied, the pass allocates every output
    # (a block freed into the cache within the pass counts as still allocated: the peak can only come out higher).
    fbkernels.empty_cpu_cache()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result  # freeing the outputs inside the window keeps the event stream balanced; the peak is unaffected
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return int(peak)


def measure_peak_bandwidth(device: torch.device, *, nbytes: int | None = None, budget_s: float = 1.0,
                           min_copies: int = 8) -> tuple[float, int]:
    """(GB/s, bytes moved per copy) of a large device-local copy: (read + write bytes) / the fastest of at least
    ``min_copies`` copies (and about ``budget_s`` seconds of them), after one warm-up copy."""
    if nbytes is None:
        nbytes = 256 * MIB if device.type == "cpu" else min(1 << 30, available_memory_bytes(device) // 8)
    numel = nbytes // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    best_s, copies, start = math.inf, 0, time.perf_counter()
    while copies < min_copies or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best_s = min(best_s, time.perf_counter() - t0)
        copies += 1
    moved = 2 * numel * 4
    del src, dst
    return moved / best_s / 1e9, moved


# ---------------------------------------------------------------- output

# Environment variables that change what a run measures: thread pools, the C library's allocator (fresh large
# outputs cost page zero-filling unless freed memory is reused), fbkernels' own switches.
_MEASURED_ENVIRONMENT = re.compile(r"(OMP_|KMP_|MKL_|MALLOC_|FBKERNELS_)\w*|GLIBC_TUNABLES|LD_PRELOAD|TRITON_INTERPRET")


def measured_environment() -> dict[str, str]:
    """The environment variables set for this run that change what it measures (see _MEASURED_ENVIRONMENT)."""
    return {name: value for name, value in sorted(os.environ.items()) if _MEASURED_ENVIRONMENT.fullmatch(name)}


def header(device: torch.device, script: str, argv: list[str]) -> dict:
    """The common top of every result JSON."""
    import fbkernels

    return {
        "script": script,
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "fbkernels": fbkernels.__version__,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "num_threads": torch.get_num_threads(),
        "timing_method": TIMING_METHOD[device.type],
        "peak_mem_method": PEAK_MEM_METHOD[device.type],
        "argv": argv,
        "environment": measured_environment(),
    }


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def finite_non_negative(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def run_argument_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark script's parser, described by the first paragraph of its docstring `doc`, with the options every
    benchmark script shares: device, threads, output directory, plot and progress switches. After parsing, call
    check_run_args (it resolves --device and prepares --out)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch.set_num_threads for the run (default: torch's default; recorded in the JSON)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="result directory, created if missing (default runs/bench, outside the committed results)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def check_run_args(parser: argparse.ArgumentParser, args, argv) -> None:
    """Validate the shared options before anything is measured (parser.error on a bad one): args.device becomes
    the resolved torch.device, args.out an existing writable directory; args.argv keeps the arguments given."""
    try:
        args.device = resolve_device(args.device)
    except ValueError as error:
        parser.error(f"--device: {error}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out: expected a directory, got {str(out)!r}, an existing file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out: expected a directory that can be created, got {str(out)!r} ({error.strerror})")
    if not os.access(out, os.W_OK | os.X_OK):
        parser.error(f"--out: expected a writable directory, got {str(out)!r}, not writable")
    args.out = out
    args.argv = list(sys.argv[1:] if argv is None else argv)


def run_and_write(args, script: str, run, report, plot) -> dict:
    """Run a benchmark script's sweep and write its outputs: run(args) -> payload; the JSON under args.out, the
    markdown report (report(payload)) on stdout, the PNG (plot(payload, path)) unless --no-plot, and the README
    table. Returns the payload."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    payload = run(args)
    path = write_json(payload, result_path(args.out, script, args.device, dtype=payload["dtype"],
                                           partial=payload.get("partial", False), smoke=args.smoke))
    report(payload)
    if not args.no_plot:
        plot(payload, path.with_suffix(".png"))
    update_readme_table(args.out)
    print(f"\nwrote {path}" + ("" if args.no_plot else f" and {path.with_suffix('.png').name}")
          + f"; {payload['elapsed_s']:.0f} s", file=sys.stderr)
    return payload


def result_path(out_dir: Path, script: str, device: torch.device | str, *, dtype: str = "float32",
                partial: bool = False, smoke: bool = False) -> Path:
    """<out>/<script>_<device slug>[_<dtype>][_partial][_smoke].json: one file per script, device and dtype (a
    rerun replaces it; `device` is a torch.device or its name as device_name gives it). float32 gets no suffix;
    a run that leaves out part of the default run (a provider, a model, a T) is "_partial", and smoke runs are
    "_smoke", so that neither ever replaces a complete run's figures."""
    name = device_name(device) if isinstance(device, torch.device) else device
    suffix = ("" if dtype == "float32" else f"_{slug(dtype)}") + ("_partial" if partial else "") + (
        "_smoke" if smoke else "")
    return Path(out_dir) / f"{script}_{slug(name)}{suffix}.json"


def write_json(payload: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=1, allow_nan=True)
        handle.write("\n")
    return path


def markdown_table(columns: list[str], rows: list[list]) -> str:
    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


def ratio(numerator, denominator):
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def new_figure(nrows: int, ncols: int, width: float = 5.0, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes


def grouped_bars(ax, categories: list[str], series: dict[str, list], colours: dict[str, str], *,
                 labels: dict[str, list] | None = None, log: bool = False) -> None:
    """One group of bars per category, one bar per series (value None: no bar, "n/a" written in its place).

    Bars instead of lines: series that coincide stay visible side by side, and categories that are distinct
    shapes with the same size are never drawn at one x. ``labels[name][i]`` is written above bar i of a series.
    """
    names = list(series)
    width = 0.8 / max(1, len(names))
    present = [v for values in series.values() for v in values if v is not None]
    floor = min(present) / 2 if (log and present) else 0.0
    for j, name in enumerate(names):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(categories))]
        for i, (x, value) in enumerate(zip(xs, series[name])):
            if value is None:
                ax.text(x, floor if log else 0.0, "n/a", rotation=90, ha="center", va="bottom", fontsize=6,
                        color=colours[name])
                continue
            ax.bar(x, value - floor if log else value, width, bottom=floor if log else 0.0, color=colours[name],
                   label=name if i == next(k for k, v in enumerate(series[name]) if v is not None) else None)
            text = labels.get(name, [None] * len(categories))[i] if labels else None
            if text:
                ax.annotate(text, (x, value), xytext=(0, 2), textcoords="offset points", rotation=90,
                            ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(categories)), categories, fontsize=8)
    if log:
        ax.set_yscale("log")
    # Room above the tallest bar for its label.
    top = max(present) if present else 1.0
    ax.set_ylim(top=top * (4.0 if log else 1.25))
    ax.grid(axis="y", alpha=0.3)


def save_figure(fig, path: Path, payload: dict) -> Path:
    """Title the figure with the run's device, dtype and torch version, and save it as `path`."""
    import matplotlib.pyplot as plt

    fig.suptitle(f"{payload['device']}, {payload['dtype']}, torch {payload['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- README table

def _latest(out_dir: Path, script: str) -> dict[tuple[str, str], dict]:
    """Newest complete result JSON of ``script`` per (device, dtype) in ``out_dir`` (by the date recorded inside);
    smoke and partial runs are left out."""
    latest: dict[tuple[str, str], dict] = {}
    for name in glob.glob(str(Path(out_dir) / f"{script}_*.json")):
        try:
            with open(name) as handle:
                payload = json.load(handle)
        except (OSError, ValueError):
            continue
        if payload.get("smoke") or payload.get("partial"):
            continue  # figures of a smoke run mean nothing; a partial run does not hold the whole table
        key = (payload.get("device", "?"), payload.get("dtype", "float32"))
        if key not in latest or payload.get("date", "") > latest[key].get("date", ""):
            latest[key] = payload
    return latest


def _training_path_and_provider(payload: dict, h: dict) -> tuple[str, str]:
    """(path, fbkernels provider) of a train_step headline entry. Results written before the headline had a "path"
    held the path under "provider"; their provider is looked up in the results."""
    if "path" in h:
        return h["path"], h["provider"]
    ops = {"FeedbackUNet": "feedback_unet_train_step", "CBLCNN": "cbl_cnn_train_step"}
    found = next((r for r in payload.get("results", []) if r.get("op") == ops.get(h["model"])
                  and r.get("path") == h["provider"] and r.get("steps") == h["steps"]), None)
    return h["provider"], "-" if found is None else found.get("provider", "-")


def _headline_section(payload: dict, title: str, columns: list[str], row) -> list[str]:
    """README lines of one result: `title`, its headline rows as a table (row(h) per headline entry) and its
    headline notes; none when it has no headline."""
    headline = payload.get("headline") or []
    if not headline:
        return []
    section = [title, markdown_table(columns, [row(h) for h in headline])]
    notes = payload.get("headline_notes") or []
    if notes:
        section.append("\n" + "\n".join(f"- {note}" for note in notes))
    return section


def update_readme_table(out_dir: Path) -> Path:
    """Rewrite <out_dir>/README_table.md from the newest step_throughput and train_step JSON of each device and
    dtype (smoke and partial runs left out)."""
    sections = [f"<!-- generated by bench/_common.py from the newest result JSON in {Path(out_dir).name}/; "
                "do not edit by hand -->"]
    throughput = _latest(out_dir, "step_throughput")
    training = _latest(out_dir, "train_step")
    for device, dtype in sorted(set(throughput) | set(training)):
        named = device if dtype == "float32" else f"{device}, {dtype}"
        if (device, dtype) in throughput:
            payload = throughput[device, dtype]
            sections += _headline_section(
                payload,
                f"**feedback_step on {named}** (torch {payload['torch']}, {payload['date'][:10]}, "
                f"peak copy bandwidth {payload['peak_gbps']:.1f} GB/s; `python bench/step_throughput.py`)\n",
                ["shape [B,d,H,W], k=2", "dtype", "provider", "fwd ms", "fwd_bwd ms", "fwd_bwd GB/s",
                 "fwd_bwd peak MiB", "speed-up vs eager (fwd / fwd_bwd)"],
                lambda h: [h["shape"], h["dtype"], h["provider"], h["fwd_ms"], h["fwd_bwd_ms"], h["fwd_bwd_gbps"],
                           h["fwd_bwd_peak_mem_mib"],
                           "MISMATCH with eager, timing not comparable" if h.get("matches_eager") is False
                           else "-" if h["fwd_speedup"] is None or h["fwd_bwd_speedup"] is None
                           else f"{h['fwd_speedup']:.2f}x / {h['fwd_bwd_speedup']:.2f}x"],
            )
        if (device, dtype) in training:
            payload = training[device, dtype]
            sections += _headline_section(
                payload,
                f"\n**Training step on {named}** (torch {payload['torch']}, {payload['date'][:10]}; "
                f"`python bench/train_step.py`)\n",
                ["model", "input [B,C,H,W]", "steps T", "path", "provider", "bptt", "step ms", "peak MiB"],
                lambda h, payload=payload: [h["model"], h["shape"], h["steps"], *_training_path_and_provider(payload, h),
                                            h["bptt"], h["ms"], h["peak_mem_mib"]],
            )
        sections.append("")
    path = Path(out_dir) / "README_table.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(sections) + "\n")
    return path
