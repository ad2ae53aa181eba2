"""End-to-end training step of the two feedback models, eager ops against fused ops: time and peak memory.

    python bench/train_step.py                  # best device present; CPU uses a reduced size (see --size)
    python bench/train_step.py --steps 5,20 --size 256 --providers eager,cpp --out /tmp/res

One training step = optimizer.zero_grad(set_to_none=True), forward, loss = sum over the returned
per-step logits of cross-entropy (fbkernels.train.step_loss), backward, Adam step.

  Feedback U-Net  fbkernels.models.FeedbackUNet(3, 2, seg_channels=16, width=16, depth=3), input
                  [B, 3, S, S], T feedback steps for T in --steps (default 1, 5, 10, 20), both BPTT modes
                  ("full" keeps every step's activations, "checkpoint" recomputes them in backward).
  CBL-CNN         fbkernels.models.CBLCNN(3, 10) (T = 2 refinements, alpha = 0, repropagate) on
                  [B, 3, 32, 32] CIFAR-sized inputs.

Providers: "eager" (backend="eager" in the model: the reference ops) and each fused backend available
for the device (cpp on CPU; cuda and triton on a GPU; triton on CPU only when asked for). Configurations
compared with each other are timed in interleaved rounds on identically initialised models.
Peak memory is that of one step above the allocated level before it (parameters, Adam state and the
input excluded; activations, gradients and optimizer temporaries included); see bench/_common.py.

Default sizes: on a GPU the paper's setting (U-Net batch 1 at 512x512, CBL-CNN batch 128); on a CPU
U-Net batch 1 at 64x64 and CBL-CNN batch 8 so that the run takes minutes on 2 cores.

Outputs: a markdown table on stdout; <out>/train_step_<device>_<date>.json of the same form as
step_throughput's ({"device", "torch", "results": [{"op", "provider", "dtype", "shape", "pass", "ms",
"peak_mem_mib", "steps", "bptt", ...}], ...}; "gbps", "frac_peak" and "peak_gbps" are null: a training
step has no minimal byte count); a PNG plot next to it; <out>/README_table.md.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import _common as common

fbkernels = common.import_fbkernels()

PROVIDER_ORDER = ("eager", "cpp", "cuda", "triton")


def select_providers(requested: list[str] | None, device: torch.device) -> list[str]:
    available = fbkernels.available_backends(device)
    if requested is None:
        return [p for p in PROVIDER_ORDER if p in available and not (p == "triton" and device.type == "cpu")]
    missing = [p for p in requested if p not in available]
    if missing:
        raise SystemExit(f"--providers: {', '.join(missing)} not available on {device.type} (available: "
                         f"{', '.join(available)})")
    return requested


UNET_CONFIG = {"in_channels": 3, "num_classes": 2, "seg_channels": 16, "width": 16, "depth": 3}
CBL_CONFIG = {"in_channels": 3, "num_classes": 10, "steps": 2, "alpha": 0.0, "context_dim": 64, "mode": "repropagate"}
# --smoke: tiny models, only to check that the script runs.
SMOKE_UNET = {**UNET_CONFIG, "seg_channels": 4, "width": 4, "depth": 2}
SMOKE_CBL = {**CBL_CONFIG, "context_dim": 8, "widths": (8, 8, 8, 8), "hidden": 8}


def build_unet(config: dict, provider: str, bptt: str, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)  # identical initial weights in every configuration
    kwargs = {key: value for key, value in config.items() if key not in ("in_channels", "num_classes")}
    return fbkernels.models.FeedbackUNet(config["in_channels"], config["num_classes"], **kwargs, bptt=bptt,
                                         backend=provider).to(device=device, dtype=dtype)


def build_cbl(config: dict, provider: str, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    kwargs = {key: value for key, value in config.items() if key not in ("in_channels", "num_classes")}
    return fbkernels.models.CBLCNN(config["in_channels"], config["num_classes"], **kwargs,
                                   backend=provider).to(device=device, dtype=dtype)


def make_train_step(model, x, target, forward_kwargs):
    """A no-argument callable running one full training step of ``model`` on (x, target)."""
    from fbkernels.train import step_loss

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = step_loss(model(x, **forward_kwargs), target)
        loss.backward()
        optimizer.step()

    def measured_step():  # for the memory measurement: gradients of the previous step already released
        optimizer.zero_grad(set_to_none=True)
        return train_step

    return train_step, measured_step


def measure_group(configs: dict, device: torch.device, args) -> dict:
    """{name: (Timing, peak bytes)} of training-step callables compared with each other (interleaved timing)."""
    steps = {name: make() for name, make in configs.items()}
    timings = common.time_fns({name: pair[0] for name, pair in steps.items()}, device, budget_s=args.budget,
                              min_repeats=args.repeats, max_repeats=max(args.repeats, 20), warmup_s=0.0,
                              warmup_calls=1)
    out = {}
    for name, (train_step, prepare) in steps.items():
        step = prepare()
        out[name] = (timings[name], common.peak_memory_bytes(step, device))
    return out


def row(op, provider, dtype, shape, timing, peak_bytes, **extra) -> dict:
    return {
        "op": op, "provider": provider, "dtype": str(dtype).replace("torch.", ""), "shape": list(shape),
        "pass": "train_step", **extra, "ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms,
        "repeats": timing.repeats, "gbps": None, "frac_peak": None, "peak_mem_mib": peak_bytes / common.MIB,
        "warmup_s": timing.warmup_s,
    }


def run(args) -> dict:
    device = torch.device(args.device or common.default_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    gpu = device.type == "cuda"
    if args.smoke:
        size, unet_batch, cbl_batch, steps_list = 16, 1, 2, [1, 2]
        args.repeats, args.budget = 1, 0.0
        unet_config, cbl_config = SMOKE_UNET, SMOKE_CBL
    else:
        size = args.size or (512 if gpu else 64)
        unet_batch = args.batch or 1
        cbl_batch = args.cbl_batch or (128 if gpu else 8)
        steps_list = [int(t) for t in args.steps.split(",")]
        unet_config, cbl_config = UNET_CONFIG, CBL_CONFIG
    requested = None if args.providers is None else [p.strip() for p in args.providers.split(",") if p.strip()]
    providers = select_providers(requested, device)
    models = set(args.models.split(","))
    started = time.perf_counter()
    print(f"{common.device_name(device)}: providers {', '.join(providers)}; U-Net batch {unet_batch} at "
          f"{size}x{size}, T in {steps_list}; CBL-CNN batch {cbl_batch}", file=sys.stderr)

    from tqdm import tqdm

    gen = torch.Generator().manual_seed(0)
    rows = []
    groups = (len(steps_list) if "unet" in models else 0) + (1 if "cbl" in models else 0)
    progress = tqdm(total=groups, desc="train_step", file=sys.stderr, disable=args.no_progress)
    if "unet" in models:
        x = torch.rand(unet_batch, 3, size, size, generator=gen).to(device=device, dtype=dtype)
        target = torch.randint(0, 2, (unet_batch, size, size), generator=gen).to(device)
        for steps in steps_list:
            progress.set_postfix_str(f"FeedbackUNet T={steps}")
            configs = {
                (provider, bptt): (lambda p=provider, b=bptt: make_train_step(
                    build_unet(unet_config, p, b, device, dtype), x, target, {"steps": steps}))
                for bptt in ("full", "checkpoint") for provider in providers
            }
            for (provider, bptt), (timing, peak) in measure_group(configs, device, args).items():
                rows.append(row("feedback_unet_train_step", provider, dtype, x.shape, timing, peak,
                                steps=steps, bptt=bptt))
            progress.update(1)
    if "cbl" in models:
        progress.set_postfix_str("CBLCNN")
        x = torch.randn(cbl_batch, 3, 32, 32, generator=gen).to(device=device, dtype=dtype)
        target = torch.randint(0, 10, (cbl_batch,), generator=gen).to(device)
        configs = {provider: (lambda p=provider: make_train_step(build_cbl(cbl_config, p, device, dtype), x, target, {}))
                   for provider in providers}
        for provider, (timing, peak) in measure_group(configs, device, args).items():
            rows.append(row("cbl_cnn_train_step", provider, dtype, x.shape, timing, peak, steps=2, bptt=None))
        progress.update(1)
    progress.close()

    for r in rows:
        eager = next((e for e in rows if e["provider"] == "eager" and e["op"] == r["op"]
                      and e["steps"] == r["steps"] and e["bptt"] == r["bptt"]), None)
        r["speedup_vs_eager"] = common.ratio(eager and eager["ms"], r["ms"])
        full = next((e for e in rows if e["op"] == r["op"] and e["provider"] == r["provider"]
                     and e["steps"] == r["steps"] and e["bptt"] == "full"), None)
        r["mem_vs_full"] = common.ratio(r["peak_mem_mib"], full and full["peak_mem_mib"]) if r["bptt"] else None

    payload = common.header(device, "train_step", sys.argv[1:])
    payload.update({"dtype": args.dtype, "providers": providers, "peak_gbps": None, "results": rows,
                    "smoke": bool(args.smoke),
                    "unet_config": {**unet_config, "batch": unet_batch, "size": size},
                    "cbl_config": {**cbl_config, "batch": cbl_batch, "size": 32},
                    "optimizer": "Adam(lr=1e-3)", "loss": "fbkernels.train.step_loss (sum of per-step cross-entropy)"})
    payload["headline"], payload["headline_notes"] = headline(rows, providers)
    payload["elapsed_s"] = time.perf_counter() - started
    return payload


def headline(rows: list[dict], providers: list[str]) -> tuple[list[dict], list[str]]:
    def find(op, provider, steps, bptt):
        return next((r for r in rows if r["op"] == op and r["provider"] == provider and r["steps"] == steps
                     and r["bptt"] == bptt), None)

    unet = "feedback_unet_train_step"
    steps_run = sorted({r["steps"] for r in rows if r["op"] == unet})
    shown = [t for t in (5, 20) if t in steps_run] or steps_run[-1:]
    fused = [p for p in providers if p != "eager"]
    table, notes = [], []
    for steps in shown:
        for bptt in ("full", "checkpoint"):
            for provider in providers:
                r = find(unet, provider, steps, bptt)
                if r:
                    table.append({"model": "FeedbackUNet", "shape": common.shape_str(r["shape"]), "steps": steps,
                                  "provider": provider, "bptt": bptt, "ms": r["ms"], "peak_mem_mib": r["peak_mem_mib"]})
    for provider in providers:
        r = find("cbl_cnn_train_step", provider, 2, None)
        if r:
            table.append({"model": "CBLCNN", "shape": common.shape_str(r["shape"]), "steps": 2, "provider": provider,
                          "bptt": "-", "ms": r["ms"], "peak_mem_mib": r["peak_mem_mib"]})
    for provider in fused:
        for steps in shown:
            eager, mine = find(unet, "eager", steps, "full"), find(unet, provider, steps, "full")
            if eager and mine:
                notes.append(f"FeedbackUNet T={steps}, full BPTT: {provider} step {eager['ms'] / mine['ms']:.2f}x "
                             f"the speed of eager ({mine['ms']:.0f} ms vs {eager['ms']:.0f} ms)")
        eager, mine = find("cbl_cnn_train_step", "eager", 2, None), find("cbl_cnn_train_step", provider, 2, None)
        if eager and mine:
            notes.append(f"CBLCNN: {provider} step {eager['ms'] / mine['ms']:.2f}x the speed of eager")
    best = fused[0] if fused else "eager"
    for steps in steps_run:
        full, ckpt = find(unet, best, steps, "full"), find(unet, best, steps, "checkpoint")
        if full and ckpt and steps == steps_run[-1]:
            notes.append(f"FeedbackUNet T={steps} ({best}): checkpoint peak memory {ckpt['peak_mem_mib']:.1f} MiB = "
                         f"{ckpt['peak_mem_mib'] / full['peak_mem_mib']:.2f}x full BPTT's {full['peak_mem_mib']:.1f} MiB")
    full5, ckpt20 = find(unet, best, 5, "full"), find(unet, best, 20, "checkpoint")
    if full5 and ckpt20:
        verdict = "within" if ckpt20["peak_mem_mib"] <= full5["peak_mem_mib"] else "NOT within"
        notes.append(f"checkpoint T=20 needs {ckpt20['peak_mem_mib']:.1f} MiB, {verdict} full BPTT T=5's "
                     f"{full5['peak_mem_mib']:.1f} MiB ({best})")
    return table, notes


def print_report(payload: dict) -> None:
    columns = ["model", "input", "T", "bptt", "ops", "step ms", "p20-p80 ms", "peak MiB", "vs eager", "mem vs full"]
    table = [["FeedbackUNet" if r["op"].startswith("feedback") else "CBLCNN", common.shape_str(r["shape"]), r["steps"],
              r["bptt"] or "-", r["provider"], r["ms"], f"{r['p20_ms']:.4g}-{r['p80_ms']:.4g}", r["peak_mem_mib"],
              None if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x",
              None if r["mem_vs_full"] is None else f"{r['mem_vs_full']:.2f}x"]
             for r in payload["results"]]
    print(f"## train_step on {payload['device']} (torch {payload['torch']}, {payload['dtype']}, {payload['date']})\n")
    print(common.markdown_table(columns, table))
    print()
    for note in payload["headline_notes"]:
        print(f"headline: {note}")


def plot(payload: dict, path: Path) -> Path:
    rows = payload["results"]
    fig, axes = common.new_figure(1, 3)
    colours = {"eager": "tab:gray", "cpp": "tab:blue", "triton": "tab:green", "cuda": "tab:red"}
    for provider in payload["providers"]:
        for bptt, style in (("full", "-"), ("checkpoint", "--")):
            points = sorted((r["steps"], r["ms"], r["peak_mem_mib"]) for r in rows
                            if r["op"] == "feedback_unet_train_step" and r["provider"] == provider and r["bptt"] == bptt)
            if points:
                x = [p[0] for p in points]
                axes[0][0].plot(x, [p[1] for p in points], style, marker="o", color=colours[provider],
                                label=f"{provider} {bptt}")
                axes[0][1].plot(x, [p[2] for p in points], style, marker="o", color=colours[provider],
                                label=f"{provider} {bptt}")
    unet_cfg = payload["unet_config"]
    title = f"FeedbackUNet, batch {unet_cfg['batch']}, {unet_cfg['size']}x{unet_cfg['size']}"
    axes[0][0].set(xlabel="feedback steps T", ylabel="median step ms", title=f"{title}: step time")
    axes[0][1].set(xlabel="feedback steps T", ylabel="peak MiB above baseline", title=f"{title}: peak memory")
    cbl = [r for r in rows if r["op"] == "cbl_cnn_train_step"]
    if cbl:
        ax = axes[0][2]
        names = [r["provider"] for r in cbl]
        ax.bar(names, [r["ms"] for r in cbl], color=[colours[n] for n in names])
        ax.set(ylabel="median step ms", title=f"CBLCNN batch {payload['cbl_config']['batch']}: step time")
        for i, r in enumerate(cbl):
            ax.annotate(f"{r['peak_mem_mib']:.0f} MiB", (i, r["ms"]), ha="center", va="bottom", fontsize=8)
    else:
        axes[0][2].axis("off")
    for ax in axes[0][:2]:
        ax.legend(fontsize=7)
    return common.save_figure(fig, path, payload)


def parse_args(argv=None):
    parser = common.run_argument_parser(__doc__)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--providers", default=None,
                        help="comma-separated subset of eager,cpp,cuda,triton (default: eager and every available "
                             "fused backend; triton on CPU only when asked for)")
    parser.add_argument("--models", default="unet,cbl", help="comma-separated: unet, cbl (default both)")
    parser.add_argument("--steps", default="1,5,10,20", help="Feedback U-Net step counts T (default 1,5,10,20)")
    parser.add_argument("--size", type=int, default=None, help="U-Net image side (default 512 on GPU, 64 on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="U-Net batch (default 1, the paper's)")
    parser.add_argument("--cbl-batch", type=int, default=None, help="CBL-CNN batch (default 128 on GPU, 8 on CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="minimum timed steps per configuration (default 3)")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="seconds of timed steps per compared group, beyond the minimum repeats (default 2)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models and inputs, T in 1,2, one repeat: checks that the script runs; figures "
                             "meaningless")
    args = parser.parse_args(argv)
    unknown = set(args.models.split(",")) - {"unet", "cbl"}
    if unknown:
        parser.error(f"--models: unknown {', '.join(sorted(unknown))}; choose from unet, cbl")
    return args


def main(argv=None) -> int:
    common.run_and_write(parse_args(argv), "train_step", run, print_report, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
