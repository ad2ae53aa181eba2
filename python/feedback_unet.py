"""Experiment A of docs/experiments.md: the Feedback U-Net against its feedforward counterpart on noisy polygons.

    python python/feedback_unet.py noise      --preset quick --out python/results/quick   # A1: F1 vs sigma
    python python/feedback_unet.py trainsize  --preset quick --out ...                    # A2: F1 vs D
    python python/feedback_unet.py ablation   --preset quick --out ...                    # A3: decay x softmax
    python python/feedback_unet.py stability  --preset quick --out ...                    # A4: settling

Each subcommand trains the models it needs (Adam, cross-entropy; the feedback model's loss summed over
its T steps), evaluates the F1 of the polygon class on a fixed test set (the feedback model at its last
training step), writes ``<experiment>.json`` with every figure and ``<experiment>.png`` into --out, and
prints a markdown table. Every finished training run is cached under ``<out>/runs/`` (result JSON plus
the first test image's per-step predictions) and an unfinished one resumes from its checkpoint there, so
an interrupted experiment rerun with the same arguments loses nothing and experiments sharing runs
(noise and ablation) reuse them. Presets: ``quick`` is sized for a shared 2-core CPU (well under 30
minutes for ``noise``), ``paper`` is the published setting (512x512 images, D = 200, 10 epochs,
batch 1, sigma 0..10) and is meant for a GPU. Under torchrun each training run uses
DistributedDataParallel; rank 0 writes the files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

import fbkernels
from fbkernels import metrics, train
from fbkernels.data import PolygonDataset
from fbkernels.models import FeedbackUNet, FeedforwardUNet


@dataclass(frozen=True)
class Preset:
    image_size: int
    width: int
    depth: int
    seg_channels: int
    steps: int  # T during training and evaluation
    epochs: int
    batch_size: int
    lr: float
    train_size: int
    test_size: int
    seeds: int
    sigmas: tuple
    train_sizes: tuple
    ablation_sigmas: tuple
    example_sigmas: tuple  # the noise levels shown in the grid of example predictions
    stability_sigma: float
    stability_steps: int  # steps unrolled when checking that a trained model settles
    tau: float = 1.0
    eval_batch_size: int = 4


PRESETS = {
    # Sized for a 2-core CPU shared with other jobs (noise: ~10-20 min): 48x48 images, a narrow 2-level
    # U-Net, 100 training images for 6 epochs, 2 seeds and every other noise level. The polygons are
    # ~10x smaller than at 512x512, so a given sigma hides them more: at 32x32 both models already fail
    # from sigma 4 on, at 48x48 the feedback model still finds them at sigma 6.
    "quick": Preset(
        image_size=48, width=8, depth=2, seg_channels=16, steps=5, epochs=6, batch_size=1, lr=0.01,
        train_size=100, test_size=20, seeds=2, sigmas=(0, 2, 4, 6, 8, 10), train_sizes=(1, 2, 4, 6, 8, 10),
        ablation_sigmas=(0, 4, 8), example_sigmas=(0, 4, 8), stability_sigma=6, stability_steps=15,
    ),
    # The published setting (docs/experiments.md A): 512x512, D = 200, test 20, 10 epochs, batch 1, lr 0.01.
    "paper": Preset(
        image_size=512, width=32, depth=4, seg_channels=16, steps=5, epochs=10, batch_size=1, lr=0.01,
        train_size=200, test_size=20, seeds=3, sigmas=tuple(range(11)), train_sizes=tuple(range(1, 11)),
        ablation_sigmas=tuple(range(11)), example_sigmas=(0, 5, 10), stability_sigma=6, stability_steps=30,
    ),
}

VARIANTS = {  # name -> (decay, softmax)
    "decay+softmax": (True, True),
    "decay": (True, False),
    "softmax": (False, True),
    "none": (False, False),
}


@dataclass(frozen=True)
class RunSpec:
    """One training run: a model variant trained on one data setting with one seed."""

    model: str  # "feedback" or "feedforward"
    sigma: float
    train_size: int
    seed: int
    decay: bool = True
    softmax: bool = True

    def label(self) -> str:
        variant = ("decay" if self.decay else "nodecay") + ("" if self.model == "feedforward" else ("+softmax" if self.softmax else "+nosoftmax"))
        return f"{self.model}-{variant}-sigma{self.sigma:g}-D{self.train_size}-seed{self.seed}"


# ---------------------------------------------------------------- building blocks

def datasets(preset: Preset, sigma: float, train_size: int, seed: int):
    # Train and test sets never share a seed; both models of a seed see exactly the same data.
    train_set = PolygonDataset(train_size, image_size=preset.image_size, sigma=sigma, seed=10_000 + seed, train=True)
    test_set = PolygonDataset(preset.test_size, image_size=preset.image_size, sigma=sigma, seed=20_000 + seed)
    return train_set, test_set


def build_model(spec: RunSpec, preset: Preset, backend):
    common = dict(seg_channels=preset.seg_channels, width=preset.width, depth=preset.depth, tau=preset.tau, backend=backend)
    if spec.model == "feedback":
        return FeedbackUNet(3, 2, decay=spec.decay, softmax=spec.softmax, steps=preset.steps, **common)
    return FeedforwardUNet(3, 2, decay=spec.decay, decay_step=preset.steps, **common)


def feedback_loss(output, target):
    return train.step_loss(output, target)


@torch.no_grad()
def evaluate_steps(model, test_set, preset: Preset, device, steps=None):
    """Per-step pooled F1 of the polygon class, per-step state changes, and per-image logits for PCA."""
    model.eval()
    feedback = isinstance(model, FeedbackUNet)
    steps = steps or preset.steps
    counts = [metrics.BinaryCounts() for _ in range(steps if feedback else 1)]
    changes, logits_per_step, first = [], [], None
    loader = torch.utils.data.DataLoader(test_set, batch_size=preset.eval_batch_size, shuffle=False)
    for x, y in loader:
        x = x.to(device)
        if feedback:
            logits, states = model(x, steps=steps, return_states=True)
            changes.append([[float((b - a)[i].double().pow(2).mean().sqrt()) for a, b in zip(states[:-1], states[1:])]
                            for i in range(x.shape[0])])
        else:
            logits = [model(x)]
        logits = [z.float().cpu() for z in logits]
        for t, z in enumerate(logits):
            counts[t] = counts[t] + metrics.binary_counts(z.argmax(1), y, 1)
        logits_per_step.append(torch.stack(logits, 1))  # [B, steps, C, H, W]
        if first is None:
            first = (x[0].cpu(), y[0], torch.stack([torch.softmax(z[0], 0)[1] for z in logits]))
    return {
        "f1_per_step": [c.f1() for c in counts],
        "state_change_per_image": [row for batch in changes for row in batch],  # [N, steps - 1]
        "logits": torch.cat(logits_per_step),
        "example": first,
    }


def run(spec: RunSpec, preset: Preset, args, *, keep_model=False):
    """Train (or load from the cache) one run; returns its result dict (and the model if asked)."""
    key = f"{spec.label()}-{preset_hash(preset)}"
    runs_dir = Path(args.out) / "runs"
    result_path, ckpt_path = runs_dir / f"{key}.json", runs_dir / f"{key}.pt"
    example_path, weights_path = runs_dir / f"{key}.npz", runs_dir / f"{key}.weights.pt"
    torch.manual_seed(spec.seed)
    model = build_model(spec, preset, args.backend)
    if all(p.exists() for p in (result_path, example_path, weights_path)):
        result = json.loads(result_path.read_text())
        if not keep_model:
            return result
        model.load_state_dict(torch.load(weights_path, map_location="cpu"))
        return result, model.to(args.device)
    runs_dir.mkdir(parents=True, exist_ok=True)
    train_set, test_set = datasets(preset, spec.sigma, spec.train_size, spec.seed)
    started = time.perf_counter()
    history = train.fit(
        model, train_set, loss_fn=feedback_loss, epochs=preset.epochs, batch_size=preset.batch_size,
        lr=preset.lr, device=args.device, seed=spec.seed, checkpoint=ckpt_path, progress=args.progress,
        desc=spec.label(), leave=False,
    )
    model.to(args.device)
    evaluation = evaluate_steps(model, test_set, preset, args.device)
    result = {
        **asdict(spec),
        "f1": evaluation["f1_per_step"][-1],
        "f1_per_step": evaluation["f1_per_step"],
        "train_loss": history["train_loss"],
        "random_f1": metrics.random_baseline_f1(metrics.class_prior(test_set.labels())),
        "train_seconds": time.perf_counter() - started,
    }
    if train.is_main_process():
        image, label, probs = evaluation["example"]
        np.savez_compressed(example_path, image=image.numpy(), label=label.numpy(), probs=probs.numpy().astype(np.float16))
        torch.save(model.state_dict(), weights_path)
        result_path.write_text(json.dumps(result, indent=1))  # written last: it marks the run as done
        ckpt_path.unlink(missing_ok=True)
    log(f"{spec.label()}: F1 {result['f1']:.3f} (steps {' '.join(f'{v:.3f}' for v in result['f1_per_step'])}), "
        f"{result['train_seconds']:.0f} s", args)
    return (result, model) if keep_model else result


def preset_hash(preset: Preset) -> str:
    # Runs are cached per preset content: editing a preset never reuses stale results.
    return hashlib.sha1(json.dumps(asdict(preset), sort_keys=True).encode()).hexdigest()[:8]


def log(message, args):
    if train.is_main_process():
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stdout)


def summarise(values):
    mean, std = metrics.mean_std(values)
    return {"f1_mean": mean, "f1_std": std, "seeds": len(values)}


def seeds_of(args, preset):
    return [args.seed + i for i in range(args.seeds or preset.seeds)]


def write_outputs(args, name, payload, figure):
    if not train.is_main_process():
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    figure.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
    print(f"wrote {out / f'{name}.json'} and {out / f'{name}.png'}")


def header(args, preset, experiment):
    return {
        "experiment": experiment,
        "preset": args.preset,
        "config": asdict(preset),
        "device": str(args.device),
        "backend": args.backend,
        "available_backends": fbkernels.available_backends(args.device),
        "torch": torch.__version__,
        "fbkernels": fbkernels.__version__,
    }


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------- A1 and A2: sweeps of one setting

MODELS = ("feedback", "feedforward")


def sweep(args, preset, key, values, make_spec, xlabel, title):
    """Train both models for every value of one setting and seed: (F1 points per model and value, random F1, fig).

    ``key`` names the setting in the points ("sigma", "train_size"); ``make_spec(model, value, seed)`` gives the run.
    The random baseline is that of the first value's test sets, averaged over the seeds."""
    seeds = seeds_of(args, preset)
    results = {(model, value, seed): run(make_spec(model, value, seed), preset, args)
               for value in values for seed in seeds for model in MODELS}
    points = [
        {"model": model, key: value, **summarise([results[model, value, s]["f1"] for s in seeds]),
         "f1_runs": [results[model, value, s]["f1"] for s in seeds]}
        for model in MODELS for value in values
    ]
    random_f1 = float(np.mean([results["feedback", values[0], s]["random_f1"] for s in seeds]))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, marker in zip(MODELS, ("o", "s")):
        pts = [p for p in points if p["model"] == model]
        ax.errorbar([p[key] for p in pts], [p["f1_mean"] for p in pts], yerr=[p["f1_std"] for p in pts],
                    marker=marker, capsize=3, label=f"{model} U-Net")
    ax.axhline(random_f1, color="gray", linestyle="--", label="random")
    ax.set(xlabel=xlabel, ylabel="F1 (polygon)", title=f"{title} ({args.preset}, {len(seeds)} seeds)", ylim=(0, 1))
    ax.legend()
    train_seconds = sum(r["train_seconds"] for r in results.values())
    return points, random_f1, fig, train_seconds


def sweep_table(points, key, values, label):
    return [[label(value)] + [fmt(next(p for p in points if p["model"] == m and p[key] == value)) for m in MODELS]
            for value in values]


def experiment_noise(args, preset):
    sigmas = [float(s) for s in preset.sigmas]
    points, random_f1, fig, total_seconds = sweep(
        args, preset, "sigma", sigmas,
        lambda model, sigma, seed: RunSpec(model, sigma, preset.train_size, seed, decay=model == "feedback"),
        "noise sigma", "A1 noise")
    payload = {**header(args, preset, "noise"), "points": points, "random_f1": random_f1,
               "train_seconds_total": total_seconds}
    write_outputs(args, "noise", payload, fig)
    example_grid(args, preset, seeds_of(args, preset)[0])
    print_table(["sigma", "feedback F1", "feedforward F1"], sweep_table(points, "sigma", sigmas, lambda s: f"{s:g}"),
                f"random baseline F1: {random_f1:.3f}; training time {total_seconds / 60:.1f} min")
    return payload


def example_grid(args, preset, seed):
    """PNG grid: per example sigma, the input, the label, the feedback model's p(polygon) per step, the feedforward's."""
    if not train.is_main_process():
        return
    plt = pyplot()
    sigmas = [s for s in preset.example_sigmas if s in preset.sigmas]
    cols = 3 + preset.steps
    fig, axes = plt.subplots(len(sigmas), cols, figsize=(1.6 * cols, 1.7 * len(sigmas)), squeeze=False)
    for row, sigma in enumerate(sigmas):
        fb = load_example(args, preset, RunSpec("feedback", float(sigma), preset.train_size, seed, decay=True))
        ff = load_example(args, preset, RunSpec("feedforward", float(sigma), preset.train_size, seed, decay=False))
        panels = [(fb["image"][0], "input"), (fb["label"], "label")]
        panels += [(p, f"FB t={t + 1}") for t, p in enumerate(fb["probs"])] + [(ff["probs"][0], "FF")]
        for col, (img, title) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(np.asarray(img, dtype=np.float32), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
        axes[row, 0].set_ylabel(f"sigma={sigma:g}", fontsize=8)
    fig.suptitle("p(polygon) per step, first test image", fontsize=9)
    out = Path(args.out) / "noise_examples.png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    print(f"wrote {out}")


def load_example(args, preset, spec):
    return np.load(Path(args.out) / "runs" / f"{spec.label()}-{preset_hash(preset)}.npz")


# ---------------------------------------------------------------- A2: training-set size

def experiment_trainsize(args, preset):
    sizes = list(preset.train_sizes)
    points, random_f1, fig, total_seconds = sweep(
        args, preset, "train_size", sizes,
        lambda model, size, seed: RunSpec(model, 0.0, size, seed, decay=model == "feedback"),
        "training-set size D", "A2 training-set size, sigma 0")
    smallest = {
        model: next((p["train_size"] for p in points if p["model"] == model and p["f1_mean"] > random_f1), None)
        for model in MODELS
    }
    payload = {**header(args, preset, "trainsize"), "points": points, "random_f1": random_f1,
               "smallest_train_size_beating_random": smallest, "train_seconds_total": total_seconds}
    write_outputs(args, "trainsize", payload, fig)
    print_table(["D", "feedback F1", "feedforward F1"], sweep_table(points, "train_size", sizes, str),
                f"random baseline F1: {random_f1:.3f}; smallest D beating it: {smallest}")
    return payload


# ---------------------------------------------------------------- A3: ablation

def experiment_ablation(args, preset):
    seeds = seeds_of(args, preset)
    configs = [("feedback", name, *flags) for name, flags in VARIANTS.items()]
    configs += [("feedforward", "decay", True, False), ("feedforward", "none", False, False)]
    points = []
    for model, variant, decay, softmax in configs:
        per_seed = []
        for seed in seeds:
            f1s = [run(RunSpec(model, float(sigma), preset.train_size, seed, decay, softmax), preset, args)["f1"]
                   for sigma in preset.ablation_sigmas]
            per_seed.append(float(np.mean(f1s)))  # averaged over the noise levels
        points.append({"model": model, "variant": variant, "decay": decay, "softmax": softmax if model == "feedback" else None,
                       **summarise(per_seed), "f1_runs": per_seed, "sigmas": [float(s) for s in preset.ablation_sigmas]})
    payload = {**header(args, preset, "ablation"), "points": points}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{'FB' if p['model'] == 'feedback' else 'FF'} {p['variant']}" for p in points]
    ax.bar(range(len(points)), [p["f1_mean"] for p in points], yerr=[p["f1_std"] for p in points], capsize=3,
           color=["tab:blue" if p["model"] == "feedback" else "tab:orange" for p in points])
    ax.set_xticks(range(len(points)), labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="F1 averaged over sigma", title=f"A3 ablation ({args.preset})", ylim=(0, 1))
    write_outputs(args, "ablation", payload, fig)
    print_table(["model", "variant", "F1 (mean over sigma)"], [[p["model"], p["variant"], fmt(p)] for p in points],
                f"sigmas {list(preset.ablation_sigmas)}")
    return payload


# ---------------------------------------------------------------- A4: stability

def experiment_stability(args, preset):
    seeds = seeds_of(args, preset)
    sigma = float(preset.stability_sigma)
    variants = {"decay+softmax": (True, True), "no decay": (False, True), "no decay, no softmax": (False, False)}
    points, summary, pca = [], {}, {}
    for variant, (decay, softmax) in variants.items():
        per_seed = []
        for seed in seeds:
            spec = RunSpec("feedback", sigma, preset.train_size, seed, decay, softmax)
            _, model = run(spec, preset, args, keep_model=True)
            _, test_set = datasets(preset, sigma, preset.train_size, seed)
            per_seed.append(evaluate_steps(model, test_set, preset, args.device, steps=preset.stability_steps))
        for t in range(preset.stability_steps):
            f1s = [e["f1_per_step"][t] for e in per_seed]
            point = {"model": "feedback", "variant": variant, "step": t + 1, **summarise(f1s)}
            if t > 0:
                change = [float(np.mean([row[t - 1] for row in e["state_change_per_image"]])) for e in per_seed]
                point["state_change_mean"], point["state_change_std"] = metrics.mean_std(change)
            points.append(point)
        last = [float(np.mean([row[-1] for row in e["state_change_per_image"]])) for e in per_seed]
        first = [float(np.mean([row[0] for row in e["state_change_per_image"]])) for e in per_seed]
        summary[variant] = {"final_state_change": metrics.mean_std(last)[0],
                            "final_over_first_state_change": float(np.mean([a / b for a, b in zip(last, first)]))}
        pca[variant] = first_principal_component(per_seed[0]["logits"])  # [images, steps], first seed
    payload = {**header(args, preset, "stability"), "sigma": sigma, "points": points, "summary": summary,
               "pc1_per_image": {k: v.tolist() for k, v in pca.items()}}
    plt = pyplot()
    fig, axes = plt.subplots(1, len(variants), figsize=(4 * len(variants), 3.2), sharey=False, squeeze=False)
    steps = np.arange(1, preset.stability_steps + 1)
    for ax, (variant, pc1) in zip(axes[0], pca.items()):
        for trajectory in pc1:
            ax.plot(steps, trajectory, alpha=0.6)
        ax.axvline(preset.steps, color="gray", linestyle=":", label="training T")
        ax.set(title=f"{variant}\nfinal state change {summary[variant]['final_state_change']:.2e}", xlabel="step", ylabel="PC 1 of logits")
    fig.suptitle(f"A4 stability, sigma {sigma:g} ({args.preset}), first seed, one line per test image", fontsize=9, y=1.06)
    write_outputs(args, "stability", payload, fig)
    print_table(["variant", f"F1 at T={preset.steps}", f"F1 at {preset.stability_steps}", "final state change", "final / first change"], [
        [variant, fmt(next(p for p in points if p["variant"] == variant and p["step"] == preset.steps)),
         fmt(next(p for p in points if p["variant"] == variant and p["step"] == preset.stability_steps)),
         f"{s['final_state_change']:.3e}", f"{s['final_over_first_state_change']:.3e}"]
        for variant, s in summary.items()
    ], f"sigma {sigma:g}; state change = RMS of h(t) - h(t-1)")
    return payload


def first_principal_component(logits: torch.Tensor) -> np.ndarray:
    """Project every (image, step) logits map onto the first principal component of all of them: [images, steps]."""
    images, steps = logits.shape[:2]
    flat = logits.reshape(images * steps, -1).double()
    centred = flat - flat.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ v[0]).reshape(images, steps).numpy()


# ---------------------------------------------------------------- output helpers

def fmt(point):
    return f"{point['f1_mean']:.3f} ± {point['f1_std']:.3f}"


def print_table(columns, rows, note=None):
    if not train.is_main_process():
        return
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if note:
        print(note)


EXPERIMENTS = {"noise": experiment_noise, "trainsize": experiment_trainsize, "ablation": experiment_ablation,
               "stability": experiment_stability}


EXPERIMENT_HELP = {
    "noise": "A1: F1 of the polygon class against the noise sigma, feedback vs feedforward (preset fields sigmas, "
             "train_size, seeds)",
    "trainsize": "A2: F1 against the number of training images D (train_sizes; sigma 0)",
    "ablation": "A3: decay x softmax variants of the feedback model against the feedforward one (ablation_sigmas)",
    "stability": "A4: whether a trained feedback model settles when unrolled past T (stability_sigma, "
                 "stability_steps)",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def _presets_epilog() -> str:
    names = list(Preset.__dataclass_fields__)
    width = max(map(len, names))
    lines = ["experiments:"]
    lines += [f"  {name:<10} {text}" for name, text in EXPERIMENT_HELP.items()]
    lines += ["", "preset fields (override any with --set FIELD=VALUE; tuples as comma lists):",
              f"  {'field':<{width}}  " + "  ".join(f"{p:<24}" for p in PRESETS)]
    for name in names:
        values = [",".join(map(str, v)) if isinstance(v, tuple) else str(v)
                  for v in (getattr(PRESETS[p], name) for p in PRESETS)]
        lines.append(f"  {name:<{width}}  " + "  ".join(f"{v:<24}" for v in values))
    return "\n".join(lines)


def parse_args(argv=None) -> tuple[argparse.Namespace, Preset]:
    """The command line and the preset it selects, with its --set overrides applied (bad values exit with a usage
    error)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter, epilog=_presets_epilog())
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS), metavar="experiment",
                        help="one of: " + ", ".join(sorted(EXPERIMENTS)) + " (described below)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="sizes and settings, listed below")
    parser.add_argument("--seed", type=int, default=0, help="first seed; runs use seed, seed+1, ...")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (None: the preset's)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (None: cuda if available, else cpu)")
    parser.add_argument("--backend", default=None, choices=list(fbkernels.backends.BACKENDS),
                        help="fbkernels backend of the feedback step (None: fastest available)")
    parser.add_argument("--out", default=None, help="output directory (None: python/results/<preset>)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (None: 1 for the quick preset on CPU, where the small "
                             "convolutions gain nothing from more and a shared CPU makes extra threads spin; "
                             "else torch's default)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a preset field, e.g. --set epochs=2 --set sigmas=0,5")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        preset = override(PRESETS[args.preset], args.set)
    except ValueError as error:
        parser.error(str(error))
    return args, preset


def main(argv=None):
    args, preset = parse_args(argv)
    if args.threads is None and args.preset == "quick" and torch.device(args.device).type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = args.out or str(Path(__file__).resolve().parent / "results" / args.preset)
    started = time.perf_counter()
    EXPERIMENTS[args.experiment](args, preset)
    if train.is_main_process():
        print(f"{args.experiment} ({args.preset}) finished in {(time.perf_counter() - started) / 60:.1f} min")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def override(preset: Preset, assignments) -> Preset:
    """preset with FIELD=VALUE assignments applied; ValueError naming the field for an unknown field or a value
    of the wrong type."""
    changes = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        if name not in Preset.__dataclass_fields__:
            raise ValueError(f"--set: unknown preset field {name!r}; fields: {sorted(Preset.__dataclass_fields__)}")
        current = getattr(preset, name)
        try:
            if isinstance(current, tuple):
                changes[name] = tuple(float(v) if "." in v else int(v) for v in value.split(",") if v)
            else:
                changes[name] = type(current)(value)
        except ValueError:
            kind = "a comma list of numbers" if isinstance(current, tuple) else type(current).__name__
            raise ValueError(f"--set {name}: expected {kind}, got {value!r}") from None
    return replace(preset, **changes)


if __name__ == "__main__":
    main()
