"""CBL-CNN against the standard CNN (docs/experiments.md B): per-seed runs, test accuracy, curves, paired statistics.

    python python/cbl.py --preset quick                        # synthetic data, minutes on a 2-core CPU
    python python/cbl.py --preset quick --variant authors      # the authors' code's reading instead of the paper's
    python python/cbl.py --preset paper --dataset cifar10 --data-dir ~/data/cifar10 --device cuda
    python python/cbl.py --preset paper --dataset speechcommands --data-dir ~/data/SpeechCommands
    torchrun --nproc_per_node 4 python/cbl.py --preset paper --dataset cifar10 --data-dir ...

For every seed (``--seed``, ``--seed + 1``, ... ``--runs`` of them) both models are built from the same
seed (so they share the backbone's initial weights) and trained by ``fbkernels.train.fit`` (Adam, the lr
halved every N epochs or constant, progress bar, per-epoch validation, checkpoint/resume, DDP under torchrun).
The CBL-CNN loss is ``sum_t w_t CE(y(t), y)`` over its passes: all w_t = 1 (``--loss-steps all``), only the
final logits (``--loss-steps final``, w = 0, ..., 0, 1) or ``--step-weights``. Validation and test metrics use
each model's final logits (the CBL-CNN's last refinement); the CBL-CNN's per-pass accuracy is recorded too.

Two readings of the method, each a bundle of settings chosen with ``--variant`` (every flag of the bundle can
still be given on its own and then wins):

    setting            --variant paper (the paper's text)       --variant authors (the authors' code)
    --backbone         paper: 8 conv + BN, FC-ReLU-FC           authors: 3 conv (32/64/128), no BN, FC-ReLU-FC
    --standard-dropout 0                                        0.5 before the last FC, standard CNN only
    --context-map      linear_tanh: z = tanh(W y + b)           linear: z = W y + b
    --adapter          sigmoid_gate: h sigmoid(W z + b)         concat_relu: ReLU(1x1 conv [h, mean z]),
                       (fbkernels.context_gate)                 ReLU(FC [h, z]) on the FC state
    --alpha, --learn-alpha   0, fixed                           0 initially, learned (kept in [0, 1])
    --steps            T = 2                                    T = 4
    --mode             repropagate                              state (only the last FC is recomputed)
    --loss-steps       all: every pass's logits                 final: the last logits only
    --lr-halve-every   the preset's (5 on paper)                0: constant learning rate

The differences from the authors' code that remain on purpose in ``--variant authors``: alpha is clamped to
[0, 1] (theirs is unbounded); max pooling is ceil-mode (equal on even sizes) and the SmallCNN pools
adaptively to ``pooled_size`` before the flatten (the identity on 32x32 CIFAR-10 with 8, as their
Speech Commands network does); both models share their initial backbone weights per seed (theirs are drawn one
after the other); no data augmentation (they random-crop and flip, on the test set too); the CIFAR-10
validation split is stratified (theirs random); epochs come from the preset (their current default is 75,
their first version and the paper 20); the Speech Commands settings of their audio.py (pooling after every
conv, alpha fixed at 0.025, batch 32) are not a variant. docs/experiments.md B lists them with the reasons.

Writes under ``--out``: ``results.json`` (config, every run's test accuracy and per-epoch history, mean, std
and 95% CI per model, the paired CBL-minus-standard difference with its 95% CI and t-test), ``curves.json``
and ``curves.png`` (validation loss and accuracy per epoch, every run and the mean per model),
``accuracy.png`` (every run's test accuracy, each model's mean with its 95% CI, and the paired differences),
``results.md`` (the tables, also printed), ``checkpoints/`` (one per model and seed: rerunning the same
command resumes, and finished runs are not retrained).
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
from fbkernels import metrics
from fbkernels.models import CBLCNN
from fbkernels.models.cbl import ADAPTERS, BACKBONES, CONTEXT_MAPS, MODES, build_backbone
from fbkernels.train import fit, is_main_process, predict, seed_everything, step_loss

MODELS = ("standard", "cbl")
LABELS = {"standard": "StandardCNN", "cbl": "CBL-CNN"}

PRESETS = {
    # Synthetic 16x16 images, narrow networks: 5 seeds x 2 models in a few minutes on 2 CPU cores.
    "quick": dict(dataset="synthetic", epochs=6, batch_size=64, lr=2e-3, lr_halve_every=3, runs=5,
                  widths={"paper": (16, 32, 32, 64), "authors": (16, 32, 64)}, hidden=64, pooled_size=4,
                  context_dim=32, train_size=2000, val_size=500, test_size=1000, image_size=16, noise=1.5,
                  limit_train=2000, limit_eval=1000),
    # docs/experiments.md B: Adam 1e-3 halved every 5 epochs, batch 128, 20 epochs (10 on Speech Commands), 5 runs.
    "paper": dict(dataset="cifar10", epochs=None, batch_size=128, lr=1e-3, lr_halve_every=5, runs=5,
                  widths={"paper": (64, 128, 256, 512), "authors": (32, 64, 128)}, hidden=256, pooled_size=8,
                  context_dim=64, train_size=45_000, val_size=5_000, test_size=10_000, image_size=32, noise=1.5,
                  limit_train=None, limit_eval=None),
}
PAPER_EPOCHS = {"cifar10": 20, "speechcommands": 10, "synthetic": 20}

# The two readings of the method (see the module docstring); lr_halve_every None keeps the preset's.
VARIANTS = {
    "paper": dict(backbone="paper", standard_dropout=0.0, context_map="linear_tanh", adapter="sigmoid_gate",
                  alpha=0.0, learn_alpha=False, steps=2, mode="repropagate", loss_steps="all", lr_halve_every=None),
    "authors": dict(backbone="authors", standard_dropout=0.5, context_map="linear", adapter="concat_relu",
                    alpha=0.0, learn_alpha=True, steps=4, mode="state", loss_steps="final", lr_halve_every=0),
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default (None: the preset's or variant's, see help)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _cell(value) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}:{_cell(v)}" for k, v in value.items())
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _presets_epilog() -> str:
    lines = []
    for title, table_ in (("presets (an option left unset takes the preset's value)", PRESETS),
                          ("variants (--variant; an option left unset takes the variant's value, "
                           "lr_halve_every None: the preset's)", VARIANTS)):
        fields = sorted({key for entry in table_.values() for key in entry})
        width = max(map(len, fields))
        cells = {name: [_cell(table_[name].get(key)) for key in fields] for name in table_}
        column = max(22, *(len(c) for row in cells.values() for c in row))
        lines += [f"{title}:", f"  {'field':<{width}}  " + "  ".join(f"{name:<{column}}" for name in table_)]
        lines += [f"  {key:<{width}}  " + "  ".join(f"{cells[name][i]:<{column}}" for name in table_)
                  for i, key in enumerate(fields)]
        lines.append("")
    lines.append("  epochs of the paper preset (None): " + ", ".join(f"{k} {v}" for k, v in PAPER_EPOCHS.items()))
    return "\n".join(lines)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _apply_set(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--set FIELD=VALUE``: the option whose field (dest) is FIELD gets VALUE, converted and checked as its flag's."""
    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "set")}
    for item in args.set:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            parser.error(f"--set expects FIELD=VALUE, got {item!r}")
        if name not in actions:
            parser.error(f"--set: unknown field {name!r}; fields: {', '.join(sorted(actions))}")
        action = actions[name]
        if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # a switch
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                parser.error(f"--set {name}: expected true or false, got {text!r}")
            value = text.lower() in ("true", "1", "yes")
        else:
            try:
                value = action.type(text) if action.type else text
            except (ValueError, argparse.ArgumentTypeError) as error:
                parser.error(f"--set {name}: {error}")
            if action.choices is not None and value not in action.choices:
                parser.error(f"--set {name}: expected one of {', '.join(map(str, action.choices))}, got {text!r}")
        setattr(args, name, value)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter, epilog=_presets_epilog())
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="sizes and settings, listed below")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="paper",
                        help="reading of the method: the paper's text or the authors' code (bundles listed below)")
    parser.add_argument("--dataset", choices=["cifar10", "speechcommands", "synthetic"],
                        help="default: the preset's (quick: synthetic, paper: cifar10)")
    parser.add_argument("--data-dir", help="CIFAR-10 python batches or the Speech Commands directory (no download)")
    parser.add_argument("--runs", type=int, help="number of seeds per model (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; runs use seed, seed + 1, ...")
    parser.add_argument("--epochs", type=int, help="training epochs per run")
    parser.add_argument("--batch-size", type=int, help="training batch size")
    parser.add_argument("--lr", type=float, help="Adam learning rate")
    parser.add_argument("--lr-halve-every", type=int, help="halve the learning rate every N epochs; 0 keeps it constant")
    parser.add_argument("--backbone", choices=BACKBONES,
                        help="network of both models: paper (8 conv + BN) or authors (3 conv, no BN)")
    parser.add_argument("--standard-dropout", type=float, help="dropout before the standard CNN's last FC layer")
    parser.add_argument("--context-map", choices=CONTEXT_MAPS, help="z = g(y): linear_tanh or linear")
    parser.add_argument("--adapter", choices=ADAPTERS,
                        help="sigmoid_gate (fbkernels.context_gate) or concat_relu (the authors' adapter)")
    parser.add_argument("--steps", type=int, help="CBL refinement steps T")
    parser.add_argument("--alpha", type=float, help="blend factor in [0, 1] (its initial value with --learn-alpha)")
    parser.add_argument("--learn-alpha", action=argparse.BooleanOptionalAction,
                        help="make alpha a learned parameter (clamped to [0, 1])")
    parser.add_argument("--mode", choices=MODES,
                        help="CBL refinement: recompute the blocks above a refined one, or refine the stored states "
                             "and recompute only the head (default: repropagate) under --variant paper, state under "
                             "--variant authors")
    parser.add_argument("--loss-steps", choices=["all", "final"],
                        help="CBL loss on every pass's logits (weights 1) or on the final logits only")
    parser.add_argument("--step-weights", type=_float_list,
                        help="CBL loss weight per pass (T + 1 values); overrides --loss-steps")
    parser.add_argument("--context-dim", type=int, help="size of the context vector z")
    parser.add_argument("--widths", type=_int_list,
                        help="conv channels: 4 values (one per block) for the paper backbone, 3 for the authors'")
    parser.add_argument("--hidden", type=int, help="width of the first fully connected layer")
    parser.add_argument("--pooled-size", type=int, help="authors backbone: side of the map flattened into the FC layer")
    parser.add_argument("--train-size", type=int, help="synthetic: training items")
    parser.add_argument("--val-size", type=int, help="synthetic: validation items")
    parser.add_argument("--test-size", type=int, help="synthetic: test items")
    parser.add_argument("--image-size", type=int, help="synthetic: image side")
    parser.add_argument("--noise", type=float, help="synthetic: pixel noise std")
    parser.add_argument("--limit-train", type=int, help="real data: train on a fixed random subset of this size")
    parser.add_argument("--limit-eval", type=int,
                        help="real data: validate and test on a fixed random subset of N items of each split")
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for training")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    parser.add_argument("--backend", choices=["eager", "cpp", "cuda", "triton"],
                        help="fbkernels backend of the sigmoid gate (default: fastest available)")
    parser.add_argument("--out", default="runs/cbl", help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="set any option by its field name, as its flag would, e.g. --set epochs=1 "
                             "--set widths=8,8,8,8 --set learn_alpha=true")
    args = parser.parse_args(argv)
    _apply_set(parser, args)

    # An explicit flag wins over the variant, the variant over the preset.
    for key, value in VARIANTS[args.variant].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    preset = PRESETS[args.preset]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value[args.backbone] if isinstance(value, dict) else value)
    if args.epochs is None:
        args.epochs = PAPER_EPOCHS[args.dataset]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    if args.steps < 0:
        parser.error(f"--steps must be at least 0, got {args.steps}")
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be in [0, 1], got {args.alpha}")
    if not 0.0 <= args.standard_dropout < 1.0:
        parser.error(f"--standard-dropout must be in [0, 1), got {args.standard_dropout}")
    expected_widths = 4 if args.backbone == "paper" else 3
    if len(args.widths) != expected_widths or min(args.widths) < 1:
        parser.error(f"--widths needs {expected_widths} positive values for --backbone {args.backbone}, "
                     f"got {','.join(map(str, args.widths))}")
    # A negative limit sliced that many items off the data (randperm(n)[:-5]) instead of failing, 0 emptied the
    # split; a non-positive evaluation batch failed in the DataLoader only after the first training epoch.
    for flag, value in (("--limit-train", args.limit_train), ("--limit-eval", args.limit_eval),
                        ("--eval-batch-size", args.eval_batch_size)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.step_weights is None:
        args.step_weights = [1.0] * (args.steps + 1) if args.loss_steps == "all" else [0.0] * args.steps + [1.0]
    elif len(args.step_weights) != args.steps + 1:
        parser.error(f"--step-weights needs steps + 1 = {args.steps + 1} values, got {len(args.step_weights)}")
    elif not all(math.isfinite(w) for w in args.step_weights):  # a NaN or inf weight trains on a NaN loss
        parser.error(f"--step-weights must be finite numbers, got {','.join(map(str, args.step_weights))}")
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
    """The standard CNN (``--backbone``, with ``--standard-dropout``) or the CBL-CNN around the same backbone."""
    common = dict(widths=args.widths, hidden=args.hidden,
                  pooled_size=args.pooled_size if args.backbone == "authors" else None)
    if name == "standard":
        return build_backbone(args.backbone, in_channels, num_classes, dropout=args.standard_dropout, **common)
    return CBLCNN(in_channels, num_classes, backbone=args.backbone, steps=args.steps, alpha=args.alpha,
                  learn_alpha=args.learn_alpha, context_dim=args.context_dim, context_map=args.context_map,
                  adapter=args.adapter, mode=args.mode, backend=args.backend, **common)


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
    """Per model: every test accuracy, mean, sample std and the 95% CI of the mean (``metrics.mean_ci95``); and
    the paired CBL-minus-standard differences over the seeds both ran: mean, std, 95% CI and the two-sided
    paired t-test (``metrics.paired_difference``; without SciPy the p-value comes from ``paired_t_test``)."""
    summary = {}
    for name in MODELS:
        accs = [r["test"]["accuracy"] for r in runs if r["model"] == name]
        stats = metrics.mean_ci95(accs)
        summary[name] = {"n": len(accs), "accuracies": accs, "mean": stats["mean"],
                         "std": stats["std"] if len(accs) > 1 else math.nan, "ci95": stats["ci95"]}
    by_seed = {name: {r["seed"]: r["test"]["accuracy"] for r in runs if r["model"] == name} for name in MODELS}
    seeds = sorted(set(by_seed["standard"]) & set(by_seed["cbl"]))
    cbl_accs = [by_seed["cbl"][s] for s in seeds]
    std_accs = [by_seed["standard"][s] for s in seeds]
    paired = metrics.paired_difference(cbl_accs, std_accs) if seeds else None
    ttest = {"n": len(seeds), "seeds": seeds, "differences": [c - s for c, s in zip(cbl_accs, std_accs)],
             "mean_difference": paired["mean"] if paired else math.nan,
             "std_difference": paired["std"] if paired and len(seeds) > 1 else math.nan,
             "ci95": paired["ci95"] if paired else [math.nan, math.nan],
             "statistic": math.nan, "pvalue": math.nan}
    if len(seeds) < 2:
        ttest["note"] = "needs at least 2 paired runs"
    elif paired["std"] == 0.0:
        ttest["note"] = "the paired differences have no variance: the t statistic is undefined"
    else:
        pvalue = paired["p"] if math.isfinite(paired["p"]) else paired_t_test(cbl_accs, std_accs)[1]
        ttest.update(statistic=paired["t"], pvalue=pvalue)
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


def _points(value) -> str:
    return f"{100 * value:.2f}" if isinstance(value, float) and math.isfinite(value) else "-"


def _interval(bounds) -> str:
    low, high = bounds
    return f"[{_points(low)}, {_points(high)}]"


def table(summary, ttest, runs) -> str:
    """Markdown: test accuracy per seed and model, mean, std, 95% CI; the paired differences; the per-pass line."""
    seeds = sorted({r["seed"] for r in runs})
    acc = {(r["model"], r["seed"]): r["test"]["accuracy"] for r in runs}
    header = "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std | 95% CI of the mean |"
    lines = [header, "|" + "---|" * (len(seeds) + 4)]
    for name in MODELS:
        cells = [_points(acc[(name, s)]) if (name, s) in acc else "-" for s in seeds]
        stats = summary[name]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) +
                     f" | {_points(stats['mean'])} | {_points(stats['std'])} | {_interval(stats['ci95'])} |")
    differences = dict(zip(ttest["seeds"], ttest["differences"]))
    cells = [("+" if differences[s] >= 0 else "") + _points(differences[s]) if s in differences else "-" for s in seeds]
    lines.append("| CBL-CNN - StandardCNN (paired) | " + " | ".join(cells) + f" | {_points(ttest['mean_difference'])} | "
                 f"{_points(ttest['std_difference'])} | {_interval(ttest['ci95'])} |")
    lines.append("")
    lines.append(f"Test accuracy (%) on the final logits. Paired t-test of CBL-CNN - StandardCNN over n = {ttest['n']} "
                 f"seeds: t = {ttest['statistic']:.3f}, p = {ttest['pvalue']:.4f}; mean difference "
                 f"{100 * ttest['mean_difference']:+.2f} points, 95% CI {_interval(ttest['ci95'])}.")
    if "note" in ttest:
        lines.append(f"({ttest['note']})")
    passes = [r["test"] for r in runs if r["model"] == "cbl" and "accuracy_pass0" in r["test"]]
    if passes:
        count = len([k for k in passes[0] if k.startswith("accuracy_pass")])
        means = [float(np.mean([p[f"accuracy_pass{t}"] for p in passes])) for t in range(count)]
        lines.append("CBL-CNN test accuracy per pass, mean over runs: " +
                     ", ".join(f"y({t}) {_points(m)}" for t, m in enumerate(means)) + ".")
    alphas = [(r["alpha"], r.get("alpha_parameter")) for r in runs if r["model"] == "cbl" and r.get("alpha") is not None]
    if alphas:
        lines.append("Learned alpha after training, per run (the parameter before the clamp to [0, 1] in brackets): " +
                     ", ".join(f"{a:.3f} ({raw:.3f})" if raw is not None else f"{a:.3f}" for a, raw in alphas) + ".")
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


COLORS = {"standard": "tab:blue", "cbl": "tab:red"}


def plot_title(args, sizes) -> str:
    """What a reader needs to know about a figure: preset, variant, data, sizes, epochs, runs, device."""
    data = "synthetic 16x16 images" if args.dataset == "synthetic" and args.image_size == 16 else args.dataset
    if args.dataset == "synthetic" and args.image_size != 16:
        data = f"synthetic {args.image_size}x{args.image_size} images"
    return (f"preset {args.preset}, variant {args.variant} (T = {args.steps}, {args.mode}, {args.adapter})\n"
            f"data: {data}, {sizes[0]} train / {sizes[1]} val / {sizes[2]} test; {args.epochs} "
            f"epoch{'s' if args.epochs != 1 else ''}, "
            f"{args.runs} seed{'s' if args.runs != 1 else ''}; device {args.device}")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _limits(ax, values, pad_fraction=0.15, legend_room=0.0):
    """y limits holding every value (points and interval ends) with a margin, so no error bar leaves the axes;
    ``legend_room`` (a fraction of the data's range) is added on top, so a legend there covers no point."""
    values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return
    low, high = min(values), max(values)
    span = max(high - low, 0.5)
    ax.set_ylim(low - span * pad_fraction, high + span * (pad_fraction + legend_room))


def plot_curves(curve_data, path, title):
    """Validation loss and accuracy per epoch: one thin line per run (seed) and a thick mean per model."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for (key, ylabel), ax in zip((("val_loss", "validation loss (cross-entropy)"),
                                  ("val_accuracy", "validation accuracy (%)")), axes):
        scale = 100.0 if key == "val_accuracy" else 1.0
        for name in MODELS:
            series = [np.asarray(c[key]) * scale for c in curve_data[name].values() if len(c[key])]
            if not series:
                continue
            length = min(len(s) for s in series)
            stacked = np.stack([s[:length] for s in series])
            epochs = np.arange(1, length + 1)
            for i, run in enumerate(stacked):
                ax.plot(epochs, run, color=COLORS[name], alpha=0.35, linewidth=0.9, marker=".", markersize=4,
                        label=f"{LABELS[name]}: each run ({len(series)})" if i == 0 else None)
            ax.plot(epochs, stacked.mean(0), color=COLORS[name], linewidth=2.4, marker="o", markersize=5,
                    label=f"{LABELS[name]}: mean of the runs")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("Validation curves, StandardCNN vs CBL-CNN (final logits)\n" + title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy(summary, ttest, runs, path, title):
    """Left: every run's test accuracy per model, runs of one seed joined, and each mean with its 95% CI.
    Right: the paired differences CBL-CNN - StandardCNN per seed, their mean and 95% CI, and zero."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    acc = {(r["model"], r["seed"]): 100 * r["test"]["accuracy"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    values = []
    # Each seed a little to the side of the next, so equal accuracies stay visible as separate runs.
    offset = {s: (k - (len(seeds) - 1) / 2) * min(0.05, 0.3 / max(len(seeds), 1)) for k, s in enumerate(seeds)}
    for seed in seeds:  # one grey line per seed: the two models' runs share the seed and initial weights
        if ("standard", seed) in acc and ("cbl", seed) in acc:
            left.plot([offset[seed], 1 + offset[seed]], [acc[("standard", seed)], acc[("cbl", seed)]], color="0.6",
                      linewidth=0.8, zorder=1)
    for x, name in enumerate(MODELS):
        points = [acc[(name, s)] for s in seeds if (name, s) in acc]
        left.scatter([x + offset[s] for s in seeds if (name, s) in acc], points, color=COLORS[name], s=28,
                     zorder=3, label=f"{LABELS[name]}: one run per seed ({len(points)})")
        stats = summary[name]
        mean, (low, high) = 100 * stats["mean"], stats["ci95"]
        values += points + [mean]
        if math.isfinite(low):
            low, high = 100 * low, 100 * high
            values += [low, high]
            left.errorbar([x + 0.25], [mean], yerr=[[mean - low], [high - mean]], fmt="D", color="black",
                          capsize=5, markersize=6, zorder=4, label="mean and 95% CI of the mean" if x == 0 else None)
        else:
            left.scatter([x + 0.25], [mean], marker="D", color="black", zorder=4,
                         label="mean (one run: no CI)" if x == 0 else None)
    left.set_xticks([0, 1], [LABELS[name] for name in MODELS])
    left.set_xlim(-0.5, 1.7)
    left.set_ylabel("test accuracy (%)")
    left.set_title("Test accuracy of every run", fontsize=10)
    _limits(left, values, legend_room=0.5)
    left.grid(axis="y", alpha=0.3)
    left.legend(fontsize=8, loc="upper center", ncol=2)

    differences = [100 * d for d in ttest["differences"]]
    right.axhline(0.0, color="0.3", linewidth=1, linestyle="--", label="no difference")
    right.scatter(range(len(differences)), differences, color="tab:purple", s=28, zorder=3,
                  label="CBL-CNN - StandardCNN, one seed")
    values = differences + [0.0]
    mean, (low, high) = 100 * ttest["mean_difference"], ttest["ci95"]
    position = len(differences) + 0.5
    if math.isfinite(low):
        low, high = 100 * low, 100 * high
        values += [mean, low, high]
        right.errorbar([position], [mean], yerr=[[mean - low], [high - mean]], fmt="D", color="black", capsize=5,
                       markersize=6, zorder=4, label="mean and 95% CI")
    elif math.isfinite(mean):
        values.append(mean)
        right.scatter([position], [mean], marker="D", color="black", zorder=4, label="mean (one seed: no CI)")
    p = ttest["pvalue"]
    right.set_title("Paired difference per seed (points)" +
                    (f"\npaired t-test: t = {ttest['statistic']:.2f}, p = {p:.3f}" if math.isfinite(p) else ""),
                    fontsize=10)
    right.set_xticks(list(range(len(differences))) + [position],
                     [f"seed {s}" for s in ttest["seeds"]] + ["mean"], rotation=45, ha="right", fontsize=8)
    right.set_xlim(-0.7, position + 0.7)
    right.set_ylabel("difference in test accuracy (points)")
    _limits(right, values, legend_room=0.7)
    right.grid(axis="y", alpha=0.3)
    right.legend(fontsize=7, loc="upper left")
    fig.suptitle("Test accuracy, StandardCNN vs CBL-CNN\n" + title, fontsize=10)
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
CONFIG_KEYS = ("preset", "variant", "dataset", "data_dir", "batch_size", "lr", "lr_halve_every", "backbone",
               "standard_dropout", "context_map", "adapter", "steps", "alpha", "learn_alpha", "mode", "loss_steps",
               "step_weights", "context_dim", "widths", "hidden", "pooled_size", "train_size", "val_size",
               "test_size", "image_size", "noise", "limit_train", "limit_eval")


def check_resumable(out, config):
    """Checkpoints in ``out`` from another configuration would resume the wrong training: refuse. A config.json
    without checkpoints (a run that failed or was stopped before its first epoch ended, say out of memory) holds
    nothing to resume: the same --out with other settings is then fine."""
    path = os.path.join(out, "config.json")
    checkpoints = os.path.join(out, "checkpoints")
    if os.path.exists(path) and os.path.isdir(checkpoints) and any(n.endswith(".pt") for n in os.listdir(checkpoints)):
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
              f"variant {args.variant} (backbone {args.backbone}, {args.adapter}, T = {args.steps}, {args.mode}), "
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
            learned = getattr(model, "learn_alpha", False)
            # alpha as the forward uses it (clamped to [0, 1]) and the parameter itself, which may lie beyond a bound.
            alpha = {"alpha": model.alpha if learned else None,
                     "alpha_parameter": float(model.alpha_parameter.detach()) if learned else None}
            runs.append({"model": name, "seed": seed, "test": test, "history": history, **alpha,
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
    title = plot_title(args, (len(train_set), len(val_set), len(test_set)))
    plot_curves(curve_data, os.path.join(args.out, "curves.png"), title)
    plot_accuracy(summary, ttest, runs, os.path.join(args.out, "accuracy.png"), title)
    report = table(summary, ttest, runs)
    with open(os.path.join(args.out, "results.md"), "w") as file:
        file.write(report + "\n")
    print(report)
    print(f"wrote {args.out}/results.json, curves.json, curves.png, accuracy.png, results.md")
    return {"summary": summary, "ttest": ttest, "runs": runs}


if __name__ == "__main__":
    main()
