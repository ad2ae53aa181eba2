"""Experiment A of docs/experiments.md: the Feedback U-Net against its feedforward counterpart on noisy polygons.

    python python/feedback_unet.py noise      --preset quick --out python/results/quick   # A1: F1 vs sigma
    python python/feedback_unet.py trainsize  --preset quick --out ...                    # A2: F1 vs D
    python python/feedback_unet.py ablation   --preset quick --out ...                    # A3: decay x softmax
    python python/feedback_unet.py stability  --preset quick --out ...                    # A4: settling
    python python/feedback_unet.py earlyexit  --preset quick --out ...                    # tol against fixed T

Each subcommand trains the models it needs (Adam, cross-entropy; the feedback model's loss summed over its T
training steps) and evaluates them on a fixed test set: the feedback model at every step up to T_test
(``test_steps``, default 2 T, as the authors evaluate a T = 5 model at T = 10) and reported at T and at T_test,
the feedforward model's one pass. Two F1s of the polygon class: pooled (all test pixels together) and per-image
(the authors' averaging: each image's precision and recall, averaged over the images, and the F1 of those two
means). Over the seeds every figure is given with its runs, mean, standard deviation and 95% t interval, and
feedback minus feedforward as a paired difference with its interval (fbkernels.metrics). Each writes
``<experiment>.json`` with every figure and ``<experiment>.png`` into --out and prints a markdown table.
Every finished training run is cached under ``<out>/runs/`` (result JSON, weights, the first test image's
per-step predictions), keyed by the preset fields that make a run (RUN_FIELDS), and an unfinished one resumes
from its checkpoint there; experiments sharing runs (noise, ablation, earlyexit) reuse them, and a lock per
run lets several experiment processes share one --out. ``--jobs N`` trains N runs at once in worker
processes (2 on a 2-core CPU about halves the wall time at 1 thread each; the results are the same). Presets: ``quick``
for a shared 2-core CPU at 1 thread, ``cpu`` (about an hour on 2 cores, closer to the paper), ``paper`` (the
published setting, for a GPU); their comments give the measured basis of their running times. Under torchrun
each training run uses DistributedDataParallel; rank 0 writes the files.

Differences from the authors' code (docs/experiments.md section A lists them with the reasons):

- options that select the authors' form, defaults the paper's text: ``normalization=bn-relu-ln`` (BatchNorm
  + ReLU and a layer norm over (H, W) on the U-Net's output, feedback softmax(LN(h)); our layer norm has no
  per-pixel affine), ``tau=0.2``, ``decay_init=independent`` (Q and Q^-1 initialised independently),
  ``update_factor=fractional`` (c(t) = (1 - (t-1)/T)^0.5 / Gamma(1.5) with T the steps of each call);
- kept on purpose: the polygons' radius spread scales with the image (5 px at 512x512, so the paper preset
  is the authors'); the test noise is fixed by the seed (they redraw it per access) so both models and every
  evaluation see the same images; a smaller GroupNorm U-Net instead of their ResNet-34 U-Net; exact autograd
  through the decay (their custom backward sums a Neumann series); every training step in training mode (their
  loop runs the first T-1 steps of a training forward in eval mode); a 1x1 conv head (theirs 3x3); no stop on
  the summed |h| change (their atol = 1e-5) unless earlyexit's tol is asked for.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
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
from fbkernels.models.feedback import DECAY_INITS, UPDATE_FACTORS, state_changes
from fbkernels.models.unet import NORMALIZATIONS


@dataclass(frozen=True)
class Preset:
    image_size: int
    width: int
    depth: int
    seg_channels: int
    steps: int  # T during training
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
    tau: float = 1.0  # decay time constant (the paper's text: 1; the authors' code: 0.2)
    eval_batch_size: int = 4
    test_steps: int | None = None  # T_test, the steps the feedback model is evaluated at (None: 2 x steps)
    trainsize_seeds: int = 8  # seeds of the trainsize experiment (its runs are small)
    normalization: str = "none"  # "none" (paper) or "bn-relu-ln" (the authors' code); see FeedbackUNet
    update_factor: str = "none"  # "none" (paper) or "fractional" (the authors' code)
    decay_init: str = "orthogonal"  # "orthogonal" (M(0) = I) or "independent" (the authors' code)
    # Tolerances on the RMS state change that earlyexit compares, chosen from a quick-preset model (sigma 4): the
    # change falls by ~e^-1 per step (decay tau = 1), from ~0.5 at step 2 to ~2e-4 at step 10, nearly the same for
    # every image, so these stop after about 8, 6, 5, 4 and 3 of the 10 steps.
    earlyexit_tols: tuple = (0.003, 0.01, 0.03, 0.1, 0.3)

    @property
    def t_test(self) -> int:
        return 2 * self.steps if self.test_steps is None else self.test_steps


# Preset fields that select what a cached run trains and evaluates (its cache key); the others only choose which
# runs an experiment asks for, so changing them reuses every run already done.
RUN_FIELDS = ("image_size", "width", "depth", "seg_channels", "steps", "epochs", "batch_size", "lr", "test_size",
              "tau", "eval_batch_size", "test_steps", "normalization", "update_factor", "decay_init")
CHOICES = {"normalization": NORMALIZATIONS, "update_factor": UPDATE_FACTORS, "decay_init": DECAY_INITS}

PRESETS = {
    # Sized for a 2-core CPU at 1 thread: 48x48 images, a narrow 2-level U-Net, 100 training images for 6 epochs,
    # 100 test images, every other noise level, 6 seeds (8 for trainsize). Basis: the earlier 2-seed noise run took
    # 326 s of training for 24 runs on the idle machine (13.6 s per run); evaluating 100 test images at 10 steps
    # adds ~3 s per pair of runs, so noise = 36 pairs ~ 18 min idle; under load from two other jobs one pair took
    # 45 s (32 s feedback, 10 s feedforward, 3.3 s evaluation), i.e. ~27 min. earlyexit re-evaluates the 36
    # feedback models image by image (~13 s each under load, ~8 min); trainsize ~ 4 min. The polygons are ~10x
    # smaller than at 512x512, so a given sigma hides them more.
    "quick": Preset(
        image_size=48, width=8, depth=2, seg_channels=16, steps=5, epochs=6, batch_size=1, lr=0.01,
        train_size=100, test_size=100, seeds=6, sigmas=(0, 2, 4, 6, 8, 10), train_sizes=(1, 2, 4, 6, 8, 10),
        ablation_sigmas=(0, 4, 8), example_sigmas=(0, 4, 8), stability_sigma=6, stability_steps=15,
    ),
    # About an hour of `noise` on this 2-core CPU, for users without a GPU, closer to the paper: 64x64 images, a
    # 3-level U-Net, D = 200, 10 epochs, 100 test images; 4 noise levels x 3 seeds. Basis, a timed smoke run
    # (1 epoch of 50 images at 64x64, 1 thread, the machine shared with other jobs at load ~2.5): 5 s feedback,
    # 1 s feedforward (100 and 20 ms per image and epoch), 1.3 s to evaluate 20 test images at 10 steps. So one
    # (feedback, feedforward) pair of runs ~ 2000 x 120 ms + 7 s ~ 250 s, noise = 12 pairs ~ 50 min (1 thread;
    # two threads on the shared machine ran 10x slower, so --threads 2 only on an idle one); earlyexit ~ 5 min on
    # top; trainsize (6 sizes <= 10 images x 3 seeds x 2 models) ~ 3 min.
    "cpu": Preset(
        image_size=64, width=8, depth=3, seg_channels=16, steps=5, epochs=10, batch_size=1, lr=0.01,
        train_size=200, test_size=100, seeds=3, sigmas=(0, 3, 6, 9), train_sizes=(1, 2, 4, 6, 8, 10),
        ablation_sigmas=(0, 6), example_sigmas=(0, 6, 9), stability_sigma=6, stability_steps=20, trainsize_seeds=3,
    ),
    # The published setting (docs/experiments.md A): 512x512, D = 200, 10 epochs, batch 1, lr 0.01, evaluated
    # at T = 10 on 200 test images as in the authors' code.
    "paper": Preset(
        image_size=512, width=32, depth=4, seg_channels=16, steps=5, epochs=10, batch_size=1, lr=0.01,
        train_size=200, test_size=200, seeds=3, sigmas=tuple(range(11)), train_sizes=tuple(range(1, 11)),
        ablation_sigmas=tuple(range(11)), example_sigmas=(0, 5, 10), stability_sigma=6, stability_steps=30,
        trainsize_seeds=3,
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
    # Train and test sets never share a seed; both models of a seed see exactly the same data. The test set's
    # noise is fixed by its seed (the authors redraw it at every access) so that every model and every
    # evaluation of a seed sees the same test images.
    train_set = PolygonDataset(train_size, image_size=preset.image_size, sigma=sigma, seed=10_000 + seed, train=True)
    test_set = PolygonDataset(preset.test_size, image_size=preset.image_size, sigma=sigma, seed=20_000 + seed)
    return train_set, test_set


def build_model(spec: RunSpec, preset: Preset, backend):
    common = dict(seg_channels=preset.seg_channels, width=preset.width, depth=preset.depth, tau=preset.tau, backend=backend)
    if spec.model == "feedback":
        return FeedbackUNet(3, 2, decay=spec.decay, softmax=spec.softmax, steps=preset.steps,
                            normalization=preset.normalization, update_factor=preset.update_factor,
                            decay_init=preset.decay_init, **common)
    return FeedforwardUNet(3, 2, decay=spec.decay, decay_step=preset.steps, **common)


def feedback_loss(output, target):
    return train.step_loss(output, target)


@torch.no_grad()
def evaluate_steps(model, test_set, preset: Preset, device, steps=None, keep_logits=False):
    """The feedback model at every step 1..steps (default T_test), the feedforward model's one pass.

    Returns per step the pooled F1 of the polygon class (all test pixels together) and the authors' per-image
    averaging (mean per-image precision and recall, F1 of the two means), the RMS state change of each image
    per step, the first test image's p(polygon) per step and, with ``keep_logits``, all logits
    [N, steps, C, H, W]."""
    model.eval()
    feedback = isinstance(model, FeedbackUNet)
    steps = (steps or preset.t_test) if feedback else 1
    pooled = [metrics.BinaryCounts() for _ in range(steps)]
    per_image = [[] for _ in range(steps)]
    changes, logits_per_step, first = [], [], None
    loader = torch.utils.data.DataLoader(test_set, batch_size=preset.eval_batch_size, shuffle=False)
    for x, y in loader:
        x = x.to(device)
        if feedback:
            logits, states = model(x, steps=steps, return_states=True)
            changes += [[float((b - a)[i].double().pow(2).mean().sqrt()) for a, b in zip(states[:-1], states[1:])]
                        for i in range(x.shape[0])]
        else:
            logits = [model(x)]
        logits = [z.float().cpu() for z in logits]
        for t, z in enumerate(logits):
            counts = metrics.per_image_counts(z.argmax(1), y, 1)
            per_image[t] += counts
            pooled[t] = sum(counts, pooled[t])
        if keep_logits:
            logits_per_step.append(torch.stack(logits, 1))
        if first is None:
            first = (x[0].cpu(), y[0], torch.stack([torch.softmax(z[0], 0)[1] for z in logits]))
    averaged = [metrics.image_averaged_f1(c) for c in per_image]
    return {
        "f1_per_step": [c.f1() for c in pooled],
        "f1_image_per_step": [a["f1"] for a in averaged],
        "precision_image_per_step": [a["precision"] for a in averaged],
        "recall_image_per_step": [a["recall"] for a in averaged],
        "state_change_per_image": changes,  # [N, steps - 1]
        "logits": torch.cat(logits_per_step) if keep_logits else None,
        "example": first,
    }


def run_key(spec: RunSpec, preset: Preset) -> str:
    """The run's name in the cache: its label and the hash of the preset fields that change a run."""
    return f"{spec.label()}-{preset_hash(preset)}"


def run(spec: RunSpec, preset: Preset, args, *, keep_model=False):
    """Train (or load from the cache) one run; returns its result dict (and the model if asked).

    The result holds the pooled (``f1``) and per-image (``f1_image``) F1 at the training T, the same at T_test
    (``f1_test``, ``f1_image_test``; the feedforward model's one pass for both) and both per step."""
    key = run_key(spec, preset)
    runs_dir = Path(args.out) / "runs"
    result_path = runs_dir / f"{key}.json"
    example_path, weights_path = runs_dir / f"{key}.npz", runs_dir / f"{key}.weights.pt"
    torch.manual_seed(spec.seed)
    model = build_model(spec, preset, args.backend)

    def cached():
        if not all(p.exists() for p in (result_path, example_path, weights_path)):
            return None
        result = json.loads(result_path.read_text())
        if not keep_model:
            return result
        model.load_state_dict(torch.load(weights_path, map_location="cpu"))
        return result, model.to(args.device)

    if (found := cached()) is not None:
        return found
    runs_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(runs_dir / f"{key}.lock"):
        # Another experiment process may have trained this run while we waited for the lock.
        if (found := cached()) is not None:
            return found
        return train_and_evaluate(spec, preset, args, model, key, keep_model)


@contextlib.contextmanager
def run_lock(path: Path):
    """Holds an exclusive lock on ``path`` (POSIX), so two experiment processes sharing --out never train the same
    run at once (the second waits, then finds the result). Not taken under torchrun, where every rank trains the
    run together, nor where fcntl does not exist."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if distributed or fcntl is None:
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def train_all(specs, preset: Preset, args) -> None:
    """Train the runs of ``specs`` not yet in the cache, ``args.jobs`` at a time, each in its own process with
    ``args.threads`` threads; the experiment then finds every run in the cache. With one job (the default) or
    under torchrun this does nothing and run() trains each run when the experiment first needs it."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if args.jobs <= 1 or distributed:
        return
    missing = [spec for spec in dict.fromkeys(specs) if not (Path(args.out) / "runs" / f"{run_key(spec, preset)}.json").exists()]
    if not missing:
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    worker_args = argparse.Namespace(**{**vars(args), "no_progress": True})
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked OpenMP or torch thread state
    with ProcessPoolExecutor(min(args.jobs, len(missing)), mp_context=context) as pool:
        futures = [pool.submit(_train_in_worker, spec, preset, worker_args) for spec in missing]
        for future in tqdm(as_completed(futures), total=len(futures), desc=f"training runs, {args.jobs} jobs",
                           disable=args.no_progress):
            future.result()


def _train_in_worker(spec: RunSpec, preset: Preset, args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    run(spec, preset, args)


def train_and_evaluate(spec: RunSpec, preset: Preset, args, model, key: str, keep_model: bool):
    """Train one run from scratch (or its checkpoint), evaluate it, write its cache files; returns run()'s value."""
    runs_dir = Path(args.out) / "runs"
    result_path, ckpt_path = runs_dir / f"{key}.json", runs_dir / f"{key}.pt"
    example_path, weights_path = runs_dir / f"{key}.npz", runs_dir / f"{key}.weights.pt"
    train_set, test_set = datasets(preset, spec.sigma, spec.train_size, spec.seed)
    history = train.fit(
        model, train_set, loss_fn=feedback_loss, epochs=preset.epochs, batch_size=preset.batch_size,
        lr=preset.lr, device=args.device, seed=spec.seed, checkpoint=ckpt_path, progress=not args.no_progress,
        desc=spec.label(), leave=False,
    )
    trained = time.perf_counter()
    model.to(args.device)
    evaluation = evaluate_steps(model, test_set, preset, args.device)
    at_train = min(preset.steps, len(evaluation["f1_per_step"])) - 1
    result = {
        **asdict(spec),
        "f1": evaluation["f1_per_step"][at_train],
        "f1_image": evaluation["f1_image_per_step"][at_train],
        "f1_test": evaluation["f1_per_step"][-1],
        "f1_image_test": evaluation["f1_image_per_step"][-1],
        **{k: v for k, v in evaluation.items() if k.endswith("_per_step")},
        "train_loss": history["train_loss"],
        "random_f1": metrics.random_baseline_f1(metrics.class_prior(test_set.labels())),
        # Every epoch's time, also those of an interrupted earlier call that this one resumed.
        "train_seconds": sum(history["epoch_seconds"]),
        "eval_seconds": time.perf_counter() - trained,
    }
    if train.is_main_process():
        image, label, probs = evaluation["example"]
        np.savez_compressed(example_path, image=image.numpy(), label=label.numpy(), probs=probs.numpy().astype(np.float16))
        torch.save(model.state_dict(), weights_path)
        result_path.write_text(json.dumps(result, indent=1))  # written last: it marks the run as done
        ckpt_path.unlink(missing_ok=True)
    log(f"{spec.label()}: F1 {result['f1']:.3f} at T={preset.steps}, {result['f1_test']:.3f} at the last step "
        f"(per-image {result['f1_image']:.3f}, {result['f1_image_test']:.3f}); "
        f"{result['train_seconds']:.0f} s training, {result['eval_seconds']:.1f} s evaluation", args)
    return (result, model) if keep_model else result


def preset_hash(preset: Preset) -> str:
    # Runs are cached per the content of the fields that make a run: editing one never reuses stale results.
    fields = {name: getattr(preset, name) for name in RUN_FIELDS}
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]


def log(message, args):
    if train.is_main_process():
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stdout)


def statistics(values) -> dict:
    """mean, std, n and 95% CI of the mean (metrics.mean_ci95) and the individual values ("runs")."""
    values = [float(v) for v in values]
    return {**metrics.mean_ci95(values), "runs": values}


def seeds_of(args, preset, count=None):
    return [args.seed + i for i in range(args.seeds or count or preset.seeds)]


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
        "overrides": list(args.set),
        "config": {**asdict(preset), "t_test": preset.t_test},
        "device": str(args.device),
        "device_name": device_name(args.device),
        "threads": torch.get_num_threads(),
        "backend": args.backend,
        "available_backends": fbkernels.available_backends(args.device),
        "torch": torch.__version__,
        "fbkernels": fbkernels.__version__,
    }


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def describe(args, preset, **data) -> str:
    """The preset, the data and the device in words, for plot titles."""
    settings = ", ".join(f"{k} {v}" for k, v in data.items())
    variant = "" if (preset.normalization, preset.update_factor, preset.decay_init) == ("none", "none", "orthogonal") else (
        f"; authors' options: normalization {preset.normalization}, update factor {preset.update_factor}, "
        f"decay init {preset.decay_init}")
    overrides = f" with {' '.join(args.set)}" if args.set else ""
    text = (f"preset {args.preset}{overrides}: {preset.image_size}x{preset.image_size} images, {settings}, "
            f"T={preset.steps} training / {preset.t_test} test steps, tau {preset.tau:g}{variant}; {device_name(args.device)}")
    import textwrap

    return "\n".join(textwrap.wrap(text, 150))


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ci_errorbar(ax, x, stats_list, *, clip=(0.0, 1.0), **kwargs):
    """Means with their 95% CI as error bars, the bars cut at ``clip`` (F1 lies in [0, 1]); NaN CIs draw none."""
    means = np.array([s["mean"] for s in stats_list])
    low = np.array([s["ci95"][0] for s in stats_list], dtype=float)
    high = np.array([s["ci95"][1] for s in stats_list], dtype=float)
    low, high = np.where(np.isnan(low), means, low), np.where(np.isnan(high), means, high)
    if clip is not None:
        low, high = np.clip(low, *clip), np.clip(high, *clip)
    return ax.errorbar(x, means, yerr=[means - low, high - means], capsize=3, **kwargs)


def run_dots(ax, x, stats_list, offset, color, marker="o", **kwargs):
    """Every run's value as a small dot next to its mean (shifted by ``offset`` along x)."""
    for xi, s in zip(x, stats_list):
        ax.scatter(np.full(len(s["runs"]), xi + offset), s["runs"], s=10, color=color, marker=marker, alpha=0.45,
                   linewidths=0, **kwargs)


# ---------------------------------------------------------------- A1 and A2: sweeps of one setting

MODELS = ("feedback", "feedforward")
MEASURES = {  # result key -> what it is, in the plots and tables
    "f1": "pooled F1",
    "f1_image": "per-image F1",
}


def sweep(args, preset, key, values, make_spec, seeds):
    """Train both models for every value of one setting and seed.

    Returns (points, differences, random F1 per seed, results, train seconds): a point per model and value
    with the statistics of the pooled and per-image F1 at T_train ("f1", "f1_image") and at T_test ("f1_test",
    "f1_image_test"; the feedforward model's one pass); a difference per value: feedback minus feedforward
    paired over the seeds (metrics.paired_difference) for each of the four."""
    train_all([make_spec(model, value, seed) for value in values for seed in seeds for model in MODELS], preset, args)
    results = {(model, value, seed): run(make_spec(model, value, seed), preset, args)
               for value in values for seed in seeds for model in MODELS}
    measures = ("f1", "f1_image", "f1_test", "f1_image_test")
    points = []
    for model in MODELS:
        for value in values:
            point = {"model": model, key: value}
            for measure in measures:
                point[measure] = statistics([results[model, value, s][measure] for s in seeds])
            point.update(f1_mean=point["f1"]["mean"], f1_std=point["f1"]["std"], f1_runs=point["f1"]["runs"])
            points.append(point)
    differences = [
        {key: value, **{measure: metrics.paired_difference([results["feedback", value, s][measure] for s in seeds],
                                                            [results["feedforward", value, s][measure] for s in seeds])
                        for measure in measures}}
        for value in values
    ]
    random_f1 = {s: results["feedback", values[0], s]["random_f1"] for s in seeds}
    train_seconds = sum(r["train_seconds"] for r in results.values())
    return points, differences, random_f1, results, train_seconds


def sweep_figure(args, preset, key, values, points, differences, random_f1, xlabel, title, data):
    """Three panels: pooled F1, per-image F1 (runs as dots, means with 95% CIs; the feedback model at T_train
    and T_test), and the paired feedback-minus-feedforward difference with its 95% CI."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    x = np.asarray(values, dtype=float)
    spacing = float(np.min(np.diff(np.unique(x)))) if len(x) > 1 else 1.0
    random_mean = float(np.mean(list(random_f1.values())))
    series = [("feedback", "", f"feedback U-Net, T={preset.steps}", "tab:blue", "o", -0.12),
              ("feedback", "_test", f"feedback U-Net, T={preset.t_test}", "tab:green", "D", 0.0),
              ("feedforward", "", "feedforward U-Net", "tab:orange", "s", 0.12)]
    for ax, measure in zip(axes[:2], MEASURES):
        for model, suffix, label, color, marker, offset in series:
            stats_list = [next(p for p in points if p["model"] == model and p[key] == v)[measure + suffix] for v in values]
            run_dots(ax, x, stats_list, offset * spacing + 0.05 * spacing, color, marker)
            ci_errorbar(ax, x + offset * spacing, stats_list, color=color, marker=marker, markersize=5, linewidth=1,
                        label=f"{label}: mean, 95% CI; dots = runs")
        ax.axhline(random_mean, color="gray", linestyle="--", linewidth=1, label=f"random predictor ({random_mean:.2f})")
        ax.set(xlabel=xlabel, ylabel=MEASURES[measure] + " of the polygon class", ylim=(-0.03, 1.03),
               title=MEASURES[measure] + (" (all test pixels together)" if measure == "f1" else
                                          " (mean per-image precision and recall)"))
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.36, 0.0), ncol=2, fontsize=8, frameon=False)
    ax = axes[2]
    for measure, suffix, color, marker, offset in (("f1", "", "tab:blue", "o", -0.1), ("f1_image", "", "tab:purple", "^", 0.1)):
        diffs = [d[measure + suffix] for d in differences]
        ci_errorbar(ax, x + offset * spacing, diffs, clip=(-1.0, 1.0), color=color, marker=marker, linestyle="none",
                    label=f"{MEASURES[measure]}: mean, 95% CI")
    ax.axhline(0, color="black", linewidth=0.8, label="no difference")
    ax.set(xlabel=xlabel, ylabel=f"feedback (T={preset.steps}) minus feedforward F1",
           title="paired difference over seeds")
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"{title}\n{describe(args, preset, **data)}", fontsize=9)
    fig.tight_layout()
    return fig


def fmt_stats(stats):
    low, high = stats["ci95"]
    ci = "" if np.isnan(low) else f" [{low:.3f}, {high:.3f}]"
    return f"{stats['mean']:.3f}{ci}"


def sweep_rows(points, differences, key, values, label):
    rows = []
    for value in values:
        fb = next(p for p in points if p["model"] == "feedback" and p[key] == value)
        ff = next(p for p in points if p["model"] == "feedforward" and p[key] == value)
        d = next(d for d in differences if d[key] == value)
        rows.append([label(value), fmt_stats(fb["f1"]), fmt_stats(fb["f1_test"]), fmt_stats(ff["f1"]),
                     fmt_stats(d["f1"]), fmt_stats(fb["f1_image"]), fmt_stats(ff["f1_image"]), fmt_stats(d["f1_image"])])
    return rows


def sweep_columns(preset, first):
    return [first, f"FB pooled F1 (T={preset.steps})", f"FB pooled (T={preset.t_test})", "FF pooled F1",
            "FB-FF pooled", f"FB per-image F1 (T={preset.steps})", "FF per-image F1", "FB-FF per-image"]


def noise_specs(preset):
    return lambda model, sigma, seed: RunSpec(model, sigma, preset.train_size, seed, decay=model == "feedback")


def experiment_noise(args, preset):
    sigmas = [float(s) for s in preset.sigmas]
    seeds = seeds_of(args, preset)
    points, differences, random_f1, results, total_seconds = sweep(args, preset, "sigma", sigmas, noise_specs(preset), seeds)
    fig = sweep_figure(args, preset, "sigma", sigmas, points, differences, random_f1, "noise sigma",
                       f"A1: F1 against the input noise, {len(seeds)} seeds",
                       {"D": preset.train_size, "test images": preset.test_size})
    payload = {**header(args, preset, "noise"), "seeds": seeds, "points": points, "differences": differences,
               "random_f1": float(np.mean(list(random_f1.values()))), "random_f1_per_seed": random_f1,
               "train_seconds_total": total_seconds}
    write_outputs(args, "noise", payload, fig)
    example_grid(args, preset, seeds[0])
    print_table(sweep_columns(preset, "sigma"), sweep_rows(points, differences, "sigma", sigmas, lambda s: f"{s:g}"),
                f"mean [95% CI] over {len(seeds)} seeds; FB-FF paired over seeds at T={preset.steps}; random baseline "
                f"F1 {payload['random_f1']:.3f}; training time {total_seconds / 60:.1f} min")
    return payload


def example_steps(preset) -> list[int]:
    """The feedback steps shown in the example grid: 1, 2, T_train and T_test."""
    return sorted({1, min(2, preset.t_test), preset.steps, preset.t_test})


def example_grid(args, preset, seed):
    """PNG grid: per example sigma, the input, the label, the feedback model's p(polygon) at a few steps, the
    feedforward model's; colour bars for the input intensity and p(polygon)."""
    if not train.is_main_process():
        return
    plt = pyplot()
    sigmas = [s for s in preset.example_sigmas if s in preset.sigmas]
    if not sigmas:
        return
    steps = example_steps(preset)
    cols = 3 + len(steps)
    fig, axes = plt.subplots(len(sigmas), cols, figsize=(1.7 * cols + 1.6, 1.8 * len(sigmas) + 0.6), squeeze=False)
    for row, sigma in enumerate(sigmas):
        fb = load_example(args, preset, RunSpec("feedback", float(sigma), preset.train_size, seed, decay=True))
        ff = load_example(args, preset, RunSpec("feedforward", float(sigma), preset.train_size, seed, decay=False))
        panels = [(fb["image"][0], "input (channel 1)", "gray"), (fb["label"], "label", "gray")]
        panels += [(fb["probs"][t - 1], f"feedback, step {t}", "viridis") for t in steps]
        panels += [(ff["probs"][0], "feedforward", "viridis")]
        for col, (img, title, cmap) in enumerate(panels):
            ax = axes[row, col]
            shown = ax.imshow(np.asarray(img, dtype=np.float32), cmap=cmap, vmin=0, vmax=1)
            if cmap == "gray":
                gray = shown
            else:
                prob = shown
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
        axes[row, 0].set_ylabel(f"sigma = {sigma:g}", fontsize=8)
    fig.colorbar(gray, ax=axes[:, :2].ravel().tolist(), location="left", fraction=0.04, pad=0.08,
                 label="input (min-max normalised), label")
    fig.colorbar(prob, ax=axes[:, 2:].ravel().tolist(), fraction=0.02, pad=0.02, label="p(polygon)")
    fig.suptitle(f"Predicted p(polygon) on the first test image of seed {seed}, models of experiment A1\n"
                 f"{describe(args, preset, D=preset.train_size)}", fontsize=8, y=0.97, va="bottom")
    out = Path(args.out) / "noise_examples.png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    print(f"wrote {out}")


def load_example(args, preset, spec):
    return np.load(Path(args.out) / "runs" / f"{spec.label()}-{preset_hash(preset)}.npz")


# ---------------------------------------------------------------- A2: training-set size

def smallest_beating(points, model, sizes, seeds, results, random_f1):
    """Where ``model`` first beats the random predictor: per seed (the smallest D whose pooled F1 exceeds that
    seed's random F1; None if none does) and for the mean (the smallest D whose 95% CI lower bound exceeds it)."""
    per_seed = {}
    for s in seeds:
        per_seed[s] = next((d for d in sizes if results[model, d, s]["f1"] > random_f1[s]), None)
    found = [d for d in per_seed.values() if d is not None]
    random_mean = float(np.mean(list(random_f1.values())))
    ci_lower = next((p["train_size"] for p in points if p["model"] == model
                     and not np.isnan(p["f1"]["ci95"][0]) and p["f1"]["ci95"][0] > random_mean), None)
    return {
        "per_seed": per_seed,
        "seeds_never_beating": sum(d is None for d in per_seed.values()),
        "mean": float(np.mean(found)) if found else None,
        "min": min(found) if found else None,
        "max": max(found) if found else None,
        "smallest_ci_lower_above_random": ci_lower,
    }


def experiment_trainsize(args, preset):
    sizes = list(preset.train_sizes)
    seeds = seeds_of(args, preset, preset.trainsize_seeds)
    make_spec = lambda model, size, seed: RunSpec(model, 0.0, size, seed, decay=model == "feedback")  # noqa: E731
    points, differences, random_f1, results, total_seconds = sweep(args, preset, "train_size", sizes, make_spec, seeds)
    smallest = {model: smallest_beating(points, model, sizes, seeds, results, random_f1) for model in MODELS}
    fig = sweep_figure(args, preset, "train_size", sizes, points, differences, random_f1, "training-set size D",
                       f"A2: F1 against the number of training images, {len(seeds)} seeds",
                       {"sigma": 0, "test images": preset.test_size})
    text = "\n".join(f"{m} U-Net first beats the random predictor (pooled F1) at D = {fmt_smallest(smallest[m])}"
                     for m in MODELS)
    fig.text(0.5, -0.1, text, ha="center", va="top", fontsize=8)
    payload = {**header(args, preset, "trainsize"), "seeds": seeds, "points": points, "differences": differences,
               "random_f1": float(np.mean(list(random_f1.values()))), "random_f1_per_seed": random_f1,
               "smallest_train_size_beating_random": smallest, "train_seconds_total": total_seconds}
    write_outputs(args, "trainsize", payload, fig)
    print_table(sweep_columns(preset, "D"), sweep_rows(points, differences, "train_size", sizes, str),
                f"random baseline F1: {payload['random_f1']:.3f}; smallest D beating it: "
                + "; ".join(f"{m} {fmt_smallest(smallest[m])}" for m in MODELS))
    return payload


def fmt_smallest(s):
    per_seed = "never" if s["mean"] is None else f"{s['mean']:.1f} per seed (range {s['min']}-{s['max']}"
    if s["mean"] is not None:
        never = s["seeds_never_beating"]
        per_seed += f", {never} seed{'s' if never > 1 else ''} never)" if never else ")"
    ci = s["smallest_ci_lower_above_random"]
    return f"{per_seed}; 95% CI lower bound above random from D = {'never' if ci is None else ci}"


# ---------------------------------------------------------------- A3: ablation

def experiment_ablation(args, preset):
    seeds = seeds_of(args, preset)
    sigmas = [float(s) for s in preset.ablation_sigmas]
    configs = [("feedback", name, *flags) for name, flags in VARIANTS.items()]
    configs += [("feedforward", "decay", True, False), ("feedforward", "none", False, False)]
    train_all([RunSpec(model, sigma, preset.train_size, seed, decay, softmax) for model, _, decay, softmax in configs
               for seed in seeds for sigma in sigmas], preset, args)
    per_config = {}
    for model, variant, decay, softmax in configs:
        per_seed = {"f1": [], "f1_image": []}
        for seed in seeds:
            results = [run(RunSpec(model, sigma, preset.train_size, seed, decay, softmax), preset, args) for sigma in sigmas]
            for measure in per_seed:  # averaged over the noise levels
                per_seed[measure].append(float(np.mean([r[measure] for r in results])))
        per_config[model, variant] = per_seed
    full, baseline = ("feedback", "decay+softmax"), ("feedforward", "none")
    points = []
    for model, variant, decay, softmax in configs:
        values = per_config[model, variant]
        point = {"model": model, "variant": variant, "decay": decay, "softmax": softmax if model == "feedback" else None,
                 "sigmas": sigmas}
        for measure in MEASURES:
            point[measure] = statistics(values[measure])
            point[f"{measure}_minus_full_feedback"] = metrics.paired_difference(values[measure], per_config[full][measure])
            point[f"{measure}_minus_feedforward"] = metrics.paired_difference(values[measure], per_config[baseline][measure])
        point.update(f1_mean=point["f1"]["mean"], f1_std=point["f1"]["std"], f1_runs=point["f1"]["runs"])
        points.append(point)
    payload = {**header(args, preset, "ablation"), "seeds": seeds, "points": points}
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    labels = [f"{'feedback' if p['model'] == 'feedback' else 'feedforward'}\n{p['variant']}" for p in points]
    x = np.arange(len(points))
    for ax, measure in zip(axes, MEASURES):
        colors = ["tab:blue" if p["model"] == "feedback" else "tab:orange" for p in points]
        for xi, p, color in zip(x, points, colors):
            run_dots(ax, [xi], [p[measure]], 0.15, color)
            ci_errorbar(ax, [xi], [p[measure]], color=color, marker="o", linestyle="none")
        ax.set_xticks(x, labels, fontsize=7)
        ax.set(ylabel=f"{MEASURES[measure]}, mean over sigma", ylim=(-0.03, 1.03),
               title=f"{MEASURES[measure]}: mean and 95% CI, dots = seeds")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"A3 ablation: decay and softmax of the feedback, F1 averaged over sigma {', '.join(f'{s:g}' for s in sigmas)}\n"
                 f"{describe(args, preset, D=preset.train_size, seeds=len(seeds))}", fontsize=9)
    fig.tight_layout()
    write_outputs(args, "ablation", payload, fig)
    print_table(["model", "variant", "pooled F1", "minus full feedback", "minus feedforward", "per-image F1"],
                [[p["model"], p["variant"], fmt_stats(p["f1"]), fmt_stats(p["f1_minus_full_feedback"]),
                  fmt_stats(p["f1_minus_feedforward"]), fmt_stats(p["f1_image"])] for p in points],
                f"mean [95% CI] over {len(seeds)} seeds of the F1 averaged over sigmas {sigmas}; differences paired over seeds")
    return payload


# ---------------------------------------------------------------- A4: stability

def experiment_stability(args, preset):
    if preset.stability_steps < preset.steps:
        raise SystemExit(f"stability: stability_steps must be >= steps (the training T, {preset.steps}) to unroll past "
                         f"it, got {preset.stability_steps}")
    seeds = seeds_of(args, preset)
    sigma = float(preset.stability_sigma)
    variants = {"decay+softmax": (True, True), "no decay": (False, True), "no decay, no softmax": (False, False)}
    points, summary, pca = [], {}, {}
    train_all([RunSpec("feedback", sigma, preset.train_size, seed, decay, softmax) for decay, softmax in variants.values()
               for seed in seeds], preset, args)
    for variant, (decay, softmax) in variants.items():
        per_seed = []
        for seed in seeds:
            spec = RunSpec("feedback", sigma, preset.train_size, seed, decay, softmax)
            _, model = run(spec, preset, args, keep_model=True)
            _, test_set = datasets(preset, sigma, preset.train_size, seed)
            per_seed.append(evaluate_steps(model, test_set, preset, args.device, steps=preset.stability_steps,
                                           keep_logits=True))
        for t in range(preset.stability_steps):
            point = {"model": "feedback", "variant": variant, "step": t + 1}
            for measure in MEASURES:
                point[measure] = statistics([e[f"{measure}_per_step"][t] for e in per_seed])
            if t > 0:
                point["state_change"] = statistics([np.mean([row[t - 1] for row in e["state_change_per_image"]])
                                                    for e in per_seed])
            point.update(f1_mean=point["f1"]["mean"], f1_std=point["f1"]["std"])
            points.append(point)
        last = [float(np.mean([row[-1] for row in e["state_change_per_image"]])) for e in per_seed]
        first = [float(np.mean([row[0] for row in e["state_change_per_image"]])) for e in per_seed]
        at_train = [e["f1_per_step"][preset.steps - 1] for e in per_seed]
        at_end = [e["f1_per_step"][-1] for e in per_seed]
        summary[variant] = {"final_state_change": statistics(last),
                            "final_over_first_state_change": statistics([a / b for a, b in zip(last, first)]),
                            "f1_last_minus_f1_at_training_T": metrics.paired_difference(at_end, at_train)}
        pca[variant] = first_principal_component(per_seed[0]["logits"])  # [images, steps], first seed
    payload = {**header(args, preset, "stability"), "seeds": seeds, "sigma": sigma, "points": points, "summary": summary,
               "pc1_per_image": {k: v.tolist() for k, v in pca.items()}}
    plt = pyplot()
    fig, axes = plt.subplots(2, len(variants), figsize=(4.6 * len(variants), 7.4), squeeze=False)
    steps = np.arange(1, preset.stability_steps + 1)
    for col, (variant, pc1) in enumerate(pca.items()):
        ax = axes[0, col]
        for trajectory in pc1:
            ax.plot(steps, trajectory, alpha=0.4, linewidth=0.8)
        ax.axvline(preset.steps, color="black", linestyle=":", label=f"training T = {preset.steps}")
        change = summary[variant]["final_state_change"]["mean"]
        ax.set(title=f"{variant}\nmean RMS state change at step {preset.stability_steps}: {change:.1e}",
               xlabel="step", ylabel="logits on their 1st principal component")
        ax.legend(fontsize=7, loc="best", title="one line per test image, first seed", title_fontsize=7)
        ax = axes[1, col]
        pts = [p for p in points if p["variant"] == variant]
        for measure, color, marker in (("f1", "tab:blue", "o"), ("f1_image", "tab:purple", "^")):
            stats_list = [p[measure] for p in pts]
            run_dots(ax, steps, stats_list, 0.15, color, marker)
            ci_errorbar(ax, steps, stats_list, color=color, marker=marker, markersize=3, linewidth=1,
                        label=f"{MEASURES[measure]}: mean, 95% CI; dots = seeds")
        ax.axvline(preset.steps, color="black", linestyle=":", label=f"training T = {preset.steps}")
        diff = summary[variant]["f1_last_minus_f1_at_training_T"]
        ax.set(xlabel="step", ylabel="F1 of the polygon class", ylim=(-0.03, 1.03),
               title=f"F1(step {preset.stability_steps}) - F1(T={preset.steps}) = {fmt_stats(diff)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper right")
    fig.suptitle(f"A4 stability: the trained feedback model unrolled past its training T\n"
                 f"{describe(args, preset, sigma=f'{sigma:g}', D=preset.train_size, seeds=len(seeds))}", fontsize=9)
    fig.tight_layout()
    write_outputs(args, "stability", payload, fig)
    print_table(["variant", f"pooled F1 at T={preset.steps}", f"at {preset.stability_steps}", "difference",
                 "final state change", "final / first change"], [
        [variant, fmt_stats(next(p for p in points if p["variant"] == variant and p["step"] == preset.steps)["f1"]),
         fmt_stats(next(p for p in points if p["variant"] == variant and p["step"] == preset.stability_steps)["f1"]),
         fmt_stats(s["f1_last_minus_f1_at_training_T"]), f"{s['final_state_change']['mean']:.3e}",
         f"{s['final_over_first_state_change']['mean']:.3e}"]
        for variant, s in summary.items()
    ], f"sigma {sigma:g}; mean [95% CI] over {len(seeds)} seeds; state change = RMS of h(t) - h(t-1)")
    return payload


def first_principal_component(logits: torch.Tensor) -> np.ndarray:
    """Project every (image, step) logits map onto the first principal component of all of them: [images, steps]."""
    images, steps = logits.shape[:2]
    flat = logits.reshape(images * steps, -1).double()
    centred = flat - flat.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ v[0]).reshape(images, steps).numpy()


# ---------------------------------------------------------------- early exit on the noise runs' feedback models

@torch.no_grad()
def early_exit_evaluation(model, test_set, steps, tols, device):
    """Each test image alone (batch 1, so the steps used are that image's network passes): the fixed-T run and
    one run per tolerance. Returns pooled and per-image F1, mean passes and seconds per image for each, and the
    fixed run's RMS state change per image and step [N, steps - 1]."""
    model.eval()
    counts = {None: [], **{tol: [] for tol in tols}}
    passes = {key: [] for key in counts}
    seconds = {key: 0.0 for key in counts}
    changes = []
    for index in range(len(test_set)):
        x, y = test_set[index]
        x = x[None].to(device)
        for tol in counts:
            started = time.perf_counter()
            if tol is None:
                logits, states = model(x, steps=steps, return_states=True)
                changes.append(state_changes(states))
            else:
                logits = model(x, steps=steps, tol=tol)
            prediction = logits[-1].argmax(1).cpu()
            seconds[tol] += time.perf_counter() - started
            counts[tol] += metrics.per_image_counts(prediction, y[None], 1)
            passes[tol].append(len(logits))
    out = {}
    for tol in counts:
        name = "fixed" if tol is None else tol
        out[name] = {"f1": sum(counts[tol], metrics.BinaryCounts()).f1(),
                     "f1_image": metrics.image_averaged_f1(counts[tol])["f1"],
                     "passes_per_image": float(np.mean(passes[tol])),
                     "seconds_per_image": seconds[tol] / max(len(test_set), 1)}
    out["state_change_per_image"] = changes
    return out


def experiment_earlyexit(args, preset):
    """The noise experiment's feedback models (trained if missing) at a fixed T = T_test against the early exit
    ``tol`` of FeedbackLoop.forward, every test image alone."""
    sigmas = [float(s) for s in preset.sigmas]
    seeds = seeds_of(args, preset)
    tols = [float(t) for t in preset.earlyexit_tols]
    steps = preset.t_test
    evaluations = {}
    train_all([noise_specs(preset)("feedback", sigma, seed) for sigma in sigmas for seed in seeds], preset, args)
    for sigma in sigmas:
        for seed in seeds:
            _, model = run(noise_specs(preset)("feedback", sigma, seed), preset, args, keep_model=True)
            _, test_set = datasets(preset, sigma, preset.train_size, seed)
            evaluations[sigma, seed] = early_exit_evaluation(model, test_set, steps, tols, args.device)
            e = evaluations[sigma, seed]
            log(f"early exit sigma {sigma:g} seed {seed}: fixed T={steps} F1 {e['fixed']['f1']:.3f}; "
                + ", ".join(f"tol {t:g}: {e[t]['passes_per_image']:.2f} passes, F1 {e[t]['f1']:.3f}" for t in tols), args)
    points = []
    for sigma in sigmas:
        fixed = [evaluations[sigma, s]["fixed"] for s in seeds]
        changes = np.asarray([row for s in seeds for row in evaluations[sigma, s]["state_change_per_image"]])
        quantiles = {q: np.quantile(changes, q / 100, axis=0).tolist() for q in (10, 50, 90)} if changes.size else {}
        point = {"sigma": sigma, "fixed_steps": steps,
                 "fixed": {"f1": statistics([f["f1"] for f in fixed]), "f1_image": statistics([f["f1_image"] for f in fixed]),
                           "seconds_per_image": statistics([f["seconds_per_image"] for f in fixed])},
                 "state_change_quantiles_per_step": {f"p{q}": v for q, v in quantiles.items()},  # steps 2..T
                 "tols": []}
        for tol in tols:
            early = [evaluations[sigma, s][tol] for s in seeds]
            mean_passes = statistics([e["passes_per_image"] for e in early])
            delta = metrics.paired_difference([e["f1"] for e in early], [f["f1"] for f in fixed])
            delta_image = metrics.paired_difference([e["f1_image"] for e in early], [f["f1_image"] for f in fixed])
            ratio = steps / mean_passes["mean"]
            point["tols"].append({
                "tol": tol, "passes_per_image": mean_passes, "passes_saved_ratio": ratio,
                "f1": statistics([e["f1"] for e in early]), "f1_minus_fixed": delta, "f1_image_minus_fixed": delta_image,
                "seconds_per_image": statistics([e["seconds_per_image"] for e in early]),
                "meets_target": bool(ratio >= 1.5 and abs(delta["mean"]) <= 0.01),
                "meets_target_with_ci": bool(ratio >= 1.5 and not np.isnan(delta["ci95"][0])
                                             and delta["ci95"][0] >= -0.01 and delta["ci95"][1] <= 0.01),
            })
        points.append(point)
    payload = {**header(args, preset, "earlyexit"), "seeds": seeds, "fixed_steps": steps, "tols": tols,
               "target": "passes_saved_ratio >= 1.5 with |pooled F1 with tol - F1 at fixed T| <= 0.01",
               "points": points}
    fig = earlyexit_figure(args, preset, points, tols, steps, seeds)
    write_outputs(args, "earlyexit", payload, fig)
    rows = [[f"{p['sigma']:g}", f"{tol['tol']:g}", f"{tol['passes_per_image']['mean']:.2f}",
             f"{tol['passes_saved_ratio']:.2f}x", fmt_stats(p["fixed"]["f1"]), fmt_stats(tol["f1"]),
             fmt_stats(tol["f1_minus_fixed"]), "yes" if tol["meets_target"] else "no",
             "yes" if tol["meets_target_with_ci"] else "no"]
            for p in points for tol in p["tols"]]
    print_table(["sigma", "tol", "passes per image", f"saved ({steps} / passes)", f"pooled F1, fixed T={steps}",
                 "pooled F1, tol", "F1 tol - fixed", "target (mean)", "target (CI)"], rows,
                f"each test image alone (batch 1); mean [95% CI] over {len(seeds)} seeds, differences paired over "
                f"seeds; target: >= 1.5x fewer passes and F1 within 0.01")
    return payload


def earlyexit_figure(args, preset, points, tols, steps, seeds):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    sigmas = np.array([p["sigma"] for p in points])
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(tols)))
    ax = axes[0]
    step_axis = np.arange(2, steps + 1)
    for p, color in zip(points, plt.cm.plasma(np.linspace(0, 0.85, len(points)))):
        q = p["state_change_quantiles_per_step"]
        if q:
            ax.plot(step_axis, q["p50"], color=color, label=f"sigma {p['sigma']:g}")
            ax.fill_between(step_axis, q["p10"], q["p90"], color=color, alpha=0.15)
    for tol, color in zip(tols, colors):
        ax.axhline(tol, color=color, linestyle="--", linewidth=1)
        ax.annotate(f"tol {tol:g}", (steps, tol), fontsize=7, ha="right", va="bottom", color=color)
    ax.set(yscale="log", xlabel="step t", ylabel="RMS state change |h(t) - h(t-1)|",
           title="state change per step: median, 10-90% band of images")
    ax.legend(fontsize=7, title="fixed-T run", title_fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    spacing = float(np.min(np.diff(sigmas))) if len(sigmas) > 1 else 1.0
    for i, (tol, color) in enumerate(zip(tols, colors)):
        offset = (i - (len(tols) - 1) / 2) * 0.08 * spacing
        stats_list = [next(t for t in p["tols"] if t["tol"] == tol)["passes_per_image"] for p in points]
        run_dots(ax, sigmas, stats_list, offset + 0.03 * spacing, color)
        ci_errorbar(ax, sigmas + offset, stats_list, clip=(0, steps), color=color, marker="o", markersize=4,
                    linewidth=1, label=f"tol {tol:g}")
    ax.axhline(steps, color="black", linewidth=1, label=f"fixed T = {steps}")
    ax.axhline(steps / 1.5, color="red", linestyle=":", linewidth=1, label="target: 1.5x fewer passes")
    ax.set(xlabel="noise sigma", ylabel="network passes per test image", ylim=(0, steps + 0.5),
           title="passes used: mean, 95% CI; dots = seeds")
    ax.set_xticks(sigmas)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.19), ncol=4, frameon=False)
    ax.grid(alpha=0.3)
    ax = axes[2]
    for i, (tol, color) in enumerate(zip(tols, colors)):
        offset = (i - (len(tols) - 1) / 2) * 0.08 * spacing
        diffs = [next(t for t in p["tols"] if t["tol"] == tol)["f1_minus_fixed"] for p in points]
        ci_errorbar(ax, sigmas + offset, diffs, clip=(-1.0, 1.0), color=color, marker="o", markersize=4, linestyle="none",
                    label=f"tol {tol:g}")
    ax.axhspan(-0.01, 0.01, color="green", alpha=0.12, label="target: within 0.01")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(xlabel="noise sigma", ylabel=f"pooled F1 with tol minus F1 at T = {steps}",
           title="F1 change: mean, 95% CI paired over seeds")
    ax.set_xticks(sigmas)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.19), ncol=3, frameon=False)
    ax.grid(alpha=0.3)
    fig.suptitle(f"Early exit of the trained feedback U-Net (tol on the RMS state change) against a fixed T = {steps}, "
                 f"each test image alone\n{describe(args, preset, D=preset.train_size, seeds=len(seeds), **{'test images': preset.test_size})}",
                 fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- output helpers

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
               "stability": experiment_stability, "earlyexit": experiment_earlyexit}


EXPERIMENT_HELP = {
    "noise": "A1: F1 of the polygon class against the noise sigma, feedback vs feedforward (preset fields sigmas, "
             "train_size, seeds)",
    "trainsize": "A2: F1 against the number of training images D (train_sizes; sigma 0)",
    "ablation": "A3: decay x softmax variants of the feedback model against the feedforward one (ablation_sigmas)",
    "stability": "A4: whether a trained feedback model settles when unrolled past T (stability_sigma, "
                 "stability_steps)",
    "earlyexit": "the noise runs' feedback models at a fixed T = test_steps against early exit on the state change "
                 "(earlyexit_tols): network passes per image and the F1 change",
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
    parser.add_argument("--out", default=None,
                        help="output directory (None: runs/feedback_unet/<preset>, outside the committed results in "
                             "python/results/)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="training runs trained at once, each in its own process with --threads threads (2 on a "
                             "2-core CPU halves the wall time of the quick preset; runs are cached, so any mix of "
                             "jobs gives the same results)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (None: 1 for the quick and cpu presets on CPU, where the small "
                             "convolutions gain nothing from more and a shared CPU makes extra threads spin; "
                             "else torch's default)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a preset field, e.g. --set epochs=2 --set sigmas=0,5")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    # None means the preset's seeds and torch's threads; 0 would fall back to those silently (`or`, `if threads:`)
    # and a negative count would run no seed or fail in torch.set_num_threads.
    for flag, value in (("--seeds", args.seeds), ("--threads", args.threads)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        preset = override(PRESETS[args.preset], args.set)
    except ValueError as error:
        parser.error(str(error))
    return args, preset


def main(argv=None):
    args, preset = parse_args(argv)
    if args.threads is None and args.preset in ("quick", "cpu") and torch.device(args.device).type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = args.out or str(Path("runs") / "feedback_unet" / args.preset)
    started = time.perf_counter()
    EXPERIMENTS[args.experiment](args, preset)
    if train.is_main_process():
        print(f"{args.experiment} ({args.preset}) finished in {(time.perf_counter() - started) / 60:.1f} min")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def override(preset: Preset, assignments) -> Preset:
    """preset with FIELD=VALUE assignments applied; ValueError naming the field for an unknown field or a value
    of the wrong type or out of range. A field whose default is None (test_steps) takes an int or "none"."""
    changes = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        if name not in Preset.__dataclass_fields__:
            raise ValueError(f"--set: unknown preset field {name!r}; fields: {sorted(Preset.__dataclass_fields__)}")
        current = getattr(preset, name)
        default = Preset.__dataclass_fields__[name].default
        try:
            if isinstance(current, tuple):
                changes[name] = tuple(_number(v) for v in value.split(",") if v)
            elif current is None or default is None:
                changes[name] = None if value.lower() == "none" else int(value)
            elif Preset.__dataclass_fields__[name].type == "float":
                # A float field may hold an int in a preset (stability_sigma=6): "6.5" must still be accepted.
                changes[name] = float(value)
            else:
                changes[name] = type(current)(value)
        except ValueError:
            kind = ("a comma list of numbers" if isinstance(current, tuple) else
                    "an int or none" if current is None or default is None else
                    "float" if Preset.__dataclass_fields__[name].type == "float" else type(current).__name__)
            raise ValueError(f"--set {name}: expected {kind}, got {value!r}") from None
        # Every list (noise levels, training sizes, tols) drives a loop or a plot: empty, an experiment failed
        # with an IndexError or ran nothing.
        if isinstance(current, tuple) and not changes[name]:
            raise ValueError(f"--set {name}: expected a comma list of at least one number, got {value!r}")
        if name in CHOICES and changes[name] not in CHOICES[name]:
            raise ValueError(f"--set {name}: expected one of {list(CHOICES[name])}, got {value!r}")
        if name == "tau" and not (math.isfinite(changes[name]) and changes[name] > 0):
            raise ValueError(f"--set tau: expected a positive finite number, got {value!r}")
        # FeedbackLoop refuses such a tol only when earlyexit evaluates, after every noise run has been trained.
        if name == "earlyexit_tols" and not all(math.isfinite(t) and t > 0 for t in changes[name]):
            raise ValueError(f"--set earlyexit_tols: expected positive finite numbers, got {value!r}")
        # seeds and trainsize_seeds too: 0 ran no seed, or (trainsize_seeds) silently fell back to seeds.
        if (name in ("test_steps", "steps", "stability_steps", "seeds", "trainsize_seeds") and changes[name] is not None
                and changes[name] < 1):
            raise ValueError(f"--set {name}: expected an int >= 1, got {value!r}")
    preset = replace(preset, **changes)
    # Checked on the result, whichever of the two was set: a T_test below T reported its last step as the F1 "at
    # T" and failed in the example grid after every run was trained.
    if preset.t_test < preset.steps:
        raise ValueError(f"--set test_steps: expected none or an int >= steps ({preset.steps}), got {preset.test_steps}")
    return preset


def _number(text: str):
    """An int if the text is one ("3"), else a float ("0.5", "1e-3")."""
    try:
        return int(text)
    except ValueError:
        return float(text)


if __name__ == "__main__":
    main()
