"""CBL-CNN against the standard CNN (docs/experiments.md B): per-seed runs, test accuracy, curves, paired t-test.

    python python/cbl.py --preset quick                        # synthetic data, minutes on a 2-core CPU
    python python/cbl.py --preset paper --dataset cifar10 --data-dir ~/data/cifar10 --device cuda
    python python/cbl.py --preset paper --dataset speechcommands --data-dir ~/data/SpeechCommands
    torchrun --nproc_per_node 4 python/cbl.py --preset paper --dataset cifar10 --data-dir ...

For every seed (``--seed``, ``--seed + 1``, ... ``--runs`` of them) both models are built from the same
seed (so they share the backbone's initial weights) and trained by ``fbkernels.train.fit`` (Adam, the lr
halved every N epochs, progress bar, per-epoch validation, checkpoint/resume, DDP under torchrun).
The CBL-CNN loss is ``sum_t w_t CE(y(t), y)`` over its passes (``--step-weights``, default all 1).
Validation and test metrics use each model's final logits (the CBL-CNN's last refinement); the CBL-CNN's
per-pass accuracy is recorded too.

Writes under ``--out``: ``results.json`` (config, every run's test accuracy and per-epoch history, mean and
std per model, the paired t-test), ``curves.json`` and ``curves.png`` (validation loss and accuracy per
epoch), ``results.md`` (the table, also printed), ``checkpoints/`` (one per model and seed: rerunning the
same command resumes, and finished runs are not retrained).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

try:
    import fbkernels
except ImportError:  # run from a source checkout without `pip install`: use the package next to python/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fbkernels
from fbkernels.models import CBLCNN, StandardCNN
from fbkernels.train import fit, is_main_process, predict, seed_everything, step_loss

MODELS = ("standard", "cbl")
LABELS = {"standard": "StandardCNN", "cbl": "CBL-CNN"}

PRESETS = {
    # Synthetic 16x16 images, narrow network: the whole comparison in a few minutes on 2 CPU cores.
    "quick": dict(dataset="synthetic", epochs=6, batch_size=64, lr=2e-3, lr_halve_every=3, runs=3,
                  widths=(16, 32, 32, 64), hidden=64, context_dim=32, steps=2, alpha=0.0,
                  train_size=2000, val_size=500, test_size=1000, image_size=16, noise=1.5,
                  limit_train=2000, limit_eval=1000),
    # docs/experiments.md B: Adam 1e-3 halved every 5 epochs, batch 128, 20 epochs (10 on Speech Commands), 5 runs.
    "paper": dict(dataset="cifar10", epochs=None, batch_size=128, lr=1e-3, lr_halve_every=5, runs=5,
                  widths=(64, 128, 256, 512), hidden=256, context_dim=64, steps=2, alpha=0.0,
                  train_size=45_000, val_size=5_000, test_size=10_000, image_size=32, noise=1.5,
                  limit_train=None, limit_eval=None),
}
PAPER_EPOCHS = {"cifar10": 20, "speechcommands": 10, "synthetic": 20}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def _presets_epilog() -> str:
    fields = sorted({key for preset in PRESETS.values() for key in preset})
    width = max(map(len, fields))
    lines = ["presets (an option left at None takes the preset's value):",
             f"  {'field':<{width}}  " + "  ".join(f"{name:<22}" for name in PRESETS)]
    for key in fields:
        values = [PRESETS[name].get(key) for name in PRESETS]
        cells = [",".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in values]
        lines.append(f"  {key:<{width}}  " + "  ".join(f"{c:<22}" for c in cells))
    lines.append("  epochs of the paper preset (None): " + ", ".join(f"{k} {v}" for k, v in PAPER_EPOCHS.items()))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter, epilog=_presets_epilog())
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="sizes and settings, listed below")
    parser.add_argument("--dataset", choices=["cifar10", "speechcommands", "synthetic"],
                        help="default: the preset's (quick: synthetic, paper: cifar10)")
    parser.add_argument("--data-dir", help="CIFAR-10 python batches or the Speech Commands directory (no download)")
    parser.add_argument("--runs", type=int, help="number of seeds per model")
    parser.add_argument("--seed", type=int, default=0, help="first seed; runs use seed, seed + 1, ...")
    parser.add_argument("--epochs", type=int, help="training epochs per run")
    parser.add_argument("--batch-size", type=int, help="training batch size")
    parser.add_argument("--lr", type=float, help="Adam learning rate")
    parser.add_argument("--lr-halve-every", type=int, help="0 keeps the learning rate constant")
    parser.add_argument("--steps", type=int, help="CBL refinement steps T")
    parser.add_argument("--alpha", type=float, help="gate blend factor in [0, 1]")
    parser.add_argument("--mode", choices=["repropagate", "state"], default="repropagate",
                        help="CBL refinement: recompute the blocks above a gated one, or gate the stored states")
    parser.add_argument("--context-dim", type=int, help="size of the context vector z")
    parser.add_argument("--widths", type=lambda s: tuple(int(w) for w in s.split(",")),
                        help="channels of the 4 conv blocks, e.g. 64,128,256,512")
    parser.add_argument("--hidden", type=int, help="width of the first fully connected layer")
    parser.add_argument("--step-weights", type=lambda s: [float(w) for w in s.split(",")],
                        help="CBL loss weight per pass (T + 1 values), default all 1")
    parser.add_argument("--train-size", type=int, help="synthetic: training items")
    parser.add_argument("--val-size", type=int, help="synthetic: validation items")
    parser.add_argument("--test-size", type=int, help="synthetic: test items")
    parser.add_argument("--image-size", type=int, help="synthetic: image side")
    parser.add_argument("--noise", type=float, help="synthetic: pixel noise std")
    parser.add_argument("--limit-train", type=int, help="real data: train on a fixed random subset of this size")
    parser.add_argument("--limit-eval", type=int, help="real data: validate and test on the first N items")
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for training")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    parser.add_argument("--backend", choices=["eager", "cpp", "cuda", "triton"],
                        help="fbkernels backend of the context gate (default: fastest available)")
    parser.add_argument("--out", default="runs/cbl", help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.epochs is None:
        args.epochs = PAPER_EPOCHS[args.dataset]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if len(args.widths) != 4:
        parser.error(f"--widths needs 4 values (one per block), got {args.widths}")
    if args.step_weights is not None and len(args.step_weights) != args.steps + 1:
        parser.error(f"--step-weights needs steps + 1 = {args.steps + 1} values, got {len(args.step_weights)}")
    if args.dataset != "synthetic" and not args.data_dir:
        parser.error(f"--dataset {args.dataset} reads local files (nothing is downloaded): give --data-dir "
                     "(or use --dataset synthetic)")
    return args


# ---------------------------------------------------------------- data

def _subset(dataset, size, seed):
    """A fixed random subset of ``size`` items (all of them if size is None or larger)."""
    if size is None or size >= len(dataset):
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return torch.utils.data.Subset(dataset, keep.sort().values.tolist())


def load_data(args):
    """(train, val, test, in_channels, num_classes) for ``args.dataset``."""
    if args.dataset == "synthetic":
        from fbkernels.data import synthetic_classification

        options = dict(size=args.image_size, noise=args.noise)
        splits = [synthetic_classification(s, n, **options)
                  for s, n in (("train", args.train_size), ("val", args.val_size), ("test", args.test_size))]
    elif args.dataset == "cifar10":
        from fbkernels.data import cifar10

        splits = [cifar10(args.data_dir, s) for s in ("train", "val", "test")]
    else:
        from fbkernels.data import speech_commands

        splits = [speech_commands(args.data_dir, s) for s in ("train", "val", "test")]
    in_channels, num_classes = splits[0].in_channels, splits[0].num_classes
    if args.dataset != "synthetic":
        splits = [_subset(splits[0], args.limit_train, 0),
                  _subset(splits[1], args.limit_eval, 1), _subset(splits[2], args.limit_eval, 2)]
    for name, split in zip(("train", "val", "test"), splits):
        if len(split) == 0:
            raise SystemExit(f"the {name} split of {args.dataset} is empty")
    return (*splits, in_channels, num_classes)


# ---------------------------------------------------------------- models and evaluation

def build_model(name, in_channels, num_classes, args):
    common = dict(widths=args.widths, hidden=args.hidden)
    if name == "standard":
        return StandardCNN(in_channels, num_classes, **common)
    return CBLCNN(in_channels, num_classes, steps=args.steps, alpha=args.alpha, context_dim=args.context_dim,
                  mode=args.mode, backend=args.backend, **common)


def make_evaluator(args):
    def evaluate(model, dataset):
        """{"loss": CE of the final logits, "accuracy": of the final logits, "accuracy_pass<t>": per pass}."""
        model = getattr(model, "module", model)  # a DDP wrapper: evaluate the module itself
        loss_sum, correct, total = 0.0, None, 0
        for output, target in predict(model, dataset, batch_size=args.eval_batch_size, device=args.device):
            passes = output if isinstance(output, (list, tuple)) else [output]
            loss_sum += float(F.cross_entropy(passes[-1].float(), target, reduction="sum"))
            hits = torch.stack([(p.argmax(dim=1) == target).sum() for p in passes])
            correct = hits if correct is None else correct + hits
            total += target.shape[0]
        result = {"loss": loss_sum / total, "accuracy": float(correct[-1]) / total}
        if len(correct) > 1:
            result.update({f"accuracy_pass{t}": float(c) / total for t, c in enumerate(correct)})
        return result

    return evaluate


def make_loss(name, args):
    if name == "standard":
        return lambda logits, target: F.cross_entropy(logits, target)
    return lambda logits_list, target: step_loss(logits_list, target, args.step_weights)


# ---------------------------------------------------------------- summary, t-test, outputs

def summarize(runs):
    """Mean and sample std of the test accuracy per model, and the paired t-test CBL vs standard."""
    summary = {}
    for name in MODELS:
        accs = [r["test"]["accuracy"] for r in runs if r["model"] == name]
        summary[name] = {
            "n": len(accs), "accuracies": accs,
            "mean": float(np.mean(accs)) if accs else math.nan,
            "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else math.nan,
        }
    by_seed = {name: {r["seed"]: r["test"]["accuracy"] for r in runs if r["model"] == name} for name in MODELS}
    seeds = sorted(set(by_seed["standard"]) & set(by_seed["cbl"]))
    cbl_accs = [by_seed["cbl"][s] for s in seeds]
    std_accs = [by_seed["standard"][s] for s in seeds]
    ttest = {"n": len(seeds), "seeds": seeds, "statistic": math.nan, "pvalue": math.nan,
             "mean_difference": float(np.mean(np.subtract(cbl_accs, std_accs))) if seeds else math.nan}
    if len(seeds) < 2:
        ttest["note"] = "needs at least 2 paired runs"
    elif np.allclose(cbl_accs, std_accs) or np.ptp(np.subtract(cbl_accs, std_accs)) == 0:
        ttest["note"] = "the paired differences have no variance: the t statistic is undefined"
    else:
        statistic, pvalue = paired_t_test(cbl_accs, std_accs)
        ttest.update(statistic=statistic, pvalue=pvalue)
    ttest["test"] = "paired Student t-test of cbl - standard over seeds, two-sided (as scipy.stats.ttest_rel)"
    return summary, ttest


def paired_t_test(a, b) -> tuple[float, float]:
    """Two-sided paired t-test of a - b (n >= 2 pairs with nonzero spread): (t statistic, p-value).

    t = mean(diff) / (std(diff, ddof=1) / sqrt(n)) with n - 1 degrees of freedom; p = I_x(df / 2, 1 / 2) with
    x = df / (df + t^2), the Student t tail through the regularized incomplete beta function."""
    diff = np.subtract(a, b, dtype=np.float64)
    n = diff.size
    statistic = float(diff.mean() / (diff.std(ddof=1) / math.sqrt(n)))
    df = n - 1
    pvalue = regularized_incomplete_beta(df / 2, 0.5, df / (df + statistic * statistic))
    return statistic, min(1.0, pvalue)


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and x in [0, 1], by the Lentz continued fraction (Numerical Recipes' betacf):
    converges fast for x < (a + 1) / (a + b + 2); otherwise the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) is used."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(b, a, 1.0 - x)
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return math.exp(log_front) * fraction / a


def table(summary, ttest, runs) -> str:
    seeds = sorted({r["seed"] for r in runs})
    acc = {(r["model"], r["seed"]): r["test"]["accuracy"] for r in runs}
    header = "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std |"
    lines = [header, "|" + "---|" * (len(seeds) + 3)]
    for name in MODELS:
        cells = [f"{100 * acc[(name, s)]:.2f}" if (name, s) in acc else "-" for s in seeds]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) +
                     f" | {100 * summary[name]['mean']:.2f} | {100 * summary[name]['std']:.2f} |")
    lines.append("")
    lines.append("Test accuracy (%). Paired t-test (CBL-CNN vs StandardCNN, n = {n}): t = {t:.3f}, p = {p:.4f}, "
                 "mean difference = {d:+.2f} points.".format(n=ttest["n"], t=ttest["statistic"], p=ttest["pvalue"],
                                                              d=100 * ttest["mean_difference"]))
    if "note" in ttest:
        lines.append(f"({ttest['note']})")
    return "\n".join(lines)


def curves(runs):
    """{model: {seed: {"train_loss", "val_loss", "val_accuracy"}}} per epoch."""
    out = {name: {} for name in MODELS}
    for r in runs:
        h = r["history"]
        out[r["model"]][str(r["seed"])] = {
            "train_loss": h["train_loss"],
            "val_loss": [v["loss"] for v in h["val"]],
            "val_accuracy": [v["accuracy"] for v in h["val"]],
        }
    return out


def plot_curves(curve_data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (key, title), ax in zip((("val_loss", "validation loss"), ("val_accuracy", "validation accuracy")), axes):
        for color, name in zip(("tab:blue", "tab:red"), MODELS):
            series = [np.asarray(c[key]) for c in curve_data[name].values() if len(c[key])]
            if not series:
                continue
            length = min(len(s) for s in series)
            stacked = np.stack([s[:length] for s in series])
            epochs = np.arange(1, length + 1)
            for s in stacked:
                ax.plot(epochs, s, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(epochs, stacked.mean(0), color=color, linewidth=2, label=f"{LABELS[name]} (mean of {len(series)})")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _json_safe(value):
    """NaN -> None, so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path, data):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as file:
        json.dump(_json_safe(data), file, indent=2)
    os.replace(tmp, path)


# Everything but the epoch count: more epochs on the same --out continue the saved runs.
CONFIG_KEYS = ("preset", "dataset", "data_dir", "batch_size", "lr", "lr_halve_every", "steps", "alpha",
               "mode", "context_dim", "widths", "hidden", "step_weights", "train_size", "val_size", "test_size",
               "image_size", "noise", "limit_train", "limit_eval")


def check_resumable(out, config):
    """Checkpoints in ``out`` from another configuration would resume the wrong training: refuse."""
    path = os.path.join(out, "config.json")
    if os.path.exists(path):
        with open(path) as file:
            previous = json.load(file)
        changed = sorted(k for k in CONFIG_KEYS if previous.get(k) != config.get(k))
        if changed:
            raise SystemExit(f"{out!r} holds checkpoints of another configuration (differs in {', '.join(changed)}); "
                             "choose another --out or delete it")


def main(argv=None):
    args = parse_args(argv)
    main_process = is_main_process()
    config = {k: v for k, v in vars(args).items()}
    config["widths"] = list(args.widths)
    config["fbkernels_version"] = fbkernels.__version__
    config["available_backends"] = fbkernels.available_backends(args.device)
    checkpoints = os.path.join(args.out, "checkpoints")
    if main_process:
        os.makedirs(checkpoints, exist_ok=True)
        check_resumable(args.out, _json_safe(config))
        write_json(os.path.join(args.out, "config.json"), config)

    train_set, val_set, test_set, in_channels, num_classes = load_data(args)
    if main_process:
        print(f"{args.dataset}: {len(train_set)} train / {len(val_set)} val / {len(test_set)} test, "
              f"{num_classes} classes; {args.runs} run(s) x {len(MODELS)} models, {args.epochs} epochs, "
              f"device {args.device}, gate backend {args.backend or 'auto'}", flush=True)
    evaluate = make_evaluator(args)
    runs = []
    for seed in range(args.seed, args.seed + args.runs):
        for name in MODELS:
            # Same seed for both models: the CBL-CNN's backbone starts from the StandardCNN's weights.
            seed_everything(seed)
            model = build_model(name, in_channels, num_classes, args)
            started = time.perf_counter()
            history = fit(
                model, train_set, loss_fn=make_loss(name, args), epochs=args.epochs, batch_size=args.batch_size,
                lr=args.lr, lr_halve_every=args.lr_halve_every or None, val_set=val_set, eval_fn=evaluate,
                device=args.device, seed=seed, checkpoint=os.path.join(checkpoints, f"{name}_seed{seed}.pt"),
                progress=not args.no_progress and main_process, desc=f"{LABELS[name]} seed {seed}",
                num_workers=args.num_workers,
            )
            test = evaluate(model, test_set)
            runs.append({"model": name, "seed": seed, "test": test, "history": history,
                         "parameters": sum(p.numel() for p in model.parameters()),
                         "seconds_this_call": time.perf_counter() - started})
            if main_process:
                print(f"{LABELS[name]} seed {seed}: test accuracy {100 * test['accuracy']:.2f}%", flush=True)
                summary, ttest = summarize(runs)
                write_json(os.path.join(args.out, "results.json"),
                           {"config": config, "runs": runs, "summary": summary, "ttest": ttest})

    if not main_process:
        return None
    summary, ttest = summarize(runs)
    curve_data = curves(runs)
    write_json(os.path.join(args.out, "curves.json"), curve_data)
    plot_curves(curve_data, os.path.join(args.out, "curves.png"))
    report = table(summary, ttest, runs)
    with open(os.path.join(args.out, "results.md"), "w") as file:
        file.write(report + "\n")
    print(report)
    print(f"wrote {args.out}/results.json, curves.json, curves.png, results.md")
    return {"summary": summary, "ttest": ttest, "runs": runs}


if __name__ == "__main__":
    main()
