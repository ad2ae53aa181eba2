"""CBL-CNN models (StandardCNN, ContextualLoops, CBLCNN) and the python/cbl.py experiment end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fbkernels
from fbkernels.models import CBLCNN, ContextualLoops, StandardCNN
from fbkernels.train import step_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(widths=(4, 6, 8, 8), hidden=12)


def _cbl(**kwargs):
    options = dict(SMALL, context_dim=5)
    options.update(kwargs)
    return CBLCNN(3, 7, **options)


def _gate(h, a, alpha):
    return alpha * h + (1 - alpha) * h * torch.sigmoid(a)[:, :, None, None]


# ---------------------------------------------------------------- shapes and gradients


@pytest.mark.parametrize("size", [(32, 32), (9, 13), (1, 1)])
def test_standard_cnn_any_input_size(size):
    model = StandardCNN(3, 7, **SMALL)
    assert len([m for m in model.modules() if isinstance(m, nn.Conv2d)]) == 8
    assert len([m for m in model.modules() if isinstance(m, nn.Linear)]) == 2
    assert model(torch.randn(2, 3, *size)).shape == (2, 7)


@pytest.mark.parametrize("mode", ["repropagate", "state"])
@pytest.mark.parametrize("steps", [0, 1, 3])
def test_cbl_returns_one_logits_per_pass(mode, steps):
    model = _cbl(mode=mode, steps=steps)
    logits = model(torch.randn(2, 3, 12, 10))
    assert isinstance(logits, list) and len(logits) == steps + 1
    assert all(y.shape == (2, 7) for y in logits)


def test_cbl_default_is_the_paper_setting():
    model = CBLCNN(1, 35)
    assert (model.steps, model.alpha, model.mode, model.context_dim) == (2, 0.0, "repropagate", 64)
    assert model.gated_blocks == (0, 1, 2, 3)
    assert len(model(torch.randn(2, 1, 64, 101))) == 3


def test_every_adapter_gets_a_gradient_in_repropagate_mode():
    model = _cbl()
    loss = step_loss(model(torch.randn(4, 3, 16, 16)), torch.randint(0, 7, (4,)))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert set(model.adapters) == {"0", "1", "2", "3"}


def test_state_mode_trains_only_the_last_adapter():
    model = _cbl(mode="state")
    step_loss(model(torch.randn(4, 3, 16, 16)), torch.randint(0, 7, (4,))).backward()
    for index in ("0", "1", "2"):
        assert model.adapters[index].weight.grad is None
    assert model.adapters["3"].weight.grad.abs().sum() > 0
    assert model.context[0].weight.grad.abs().sum() > 0


def test_initial_pass_is_the_standard_cnn():
    torch.manual_seed(5)
    standard = StandardCNN(3, 7, **SMALL)
    torch.manual_seed(5)
    cbl = _cbl()
    # Same seed, same backbone weights (the backbone is built first), so the initial pass agrees.
    for name, value in standard.state_dict().items():
        torch.testing.assert_close(cbl.state_dict()[name], value)
    standard.eval(), cbl.eval()
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(cbl(x)[0], standard(x))


@pytest.mark.parametrize("mode", ["repropagate", "state"])
def test_alpha_one_makes_refinement_the_identity(mode):
    model = _cbl(mode=mode, alpha=1.0).eval()
    logits = model(torch.randn(2, 3, 16, 16))
    for y in logits[1:]:
        torch.testing.assert_close(y, logits[0])


# ---------------------------------------------------------------- the two modes, precisely


def _perturb_adapter(model, index):
    with torch.no_grad():
        model.adapters[str(index)].bias.add_(3.0)


def test_state_mode_earlier_gates_do_not_change_the_logits_the_last_does():
    model = _cbl(mode="state", steps=2).eval()
    x = torch.randn(3, 3, 16, 16)
    before = model(x)
    for index in (0, 1, 2):
        _perturb_adapter(model, index)
    after_early = model(x)
    for y0, y1 in zip(before, after_early):
        torch.testing.assert_close(y0, y1)
    _perturb_adapter(model, 3)
    after_last = model(x)
    torch.testing.assert_close(after_last[0], before[0])
    assert not torch.allclose(after_last[1], before[1])


def test_state_mode_gates_each_stored_state_on_its_own_and_accumulates():
    model = _cbl(mode="state", steps=2).eval()
    x = torch.randn(2, 3, 16, 16)
    logits, refined = model(x, return_states=True)
    with torch.no_grad():
        states, h = [], x
        for block in model.blocks:
            h = block(h)
            states.append(h)
        expected = list(states)
        for t in range(2):
            z = model.context(logits[t])
            for i in range(4):
                expected[i] = _gate(expected[i], model.adapters[str(i)](z), 0.0)
            torch.testing.assert_close(logits[t + 1], model.head(expected[3]))
    for got, want in zip(refined, expected):
        torch.testing.assert_close(got, want)


def test_repropagate_mode_recomputes_the_blocks_above_each_gate():
    model = _cbl(mode="repropagate", steps=2, alpha=0.25).eval()
    x = torch.randn(2, 3, 16, 16)
    logits = model(x)
    with torch.no_grad():
        h0 = model.blocks[0](x)
        for t in range(2):
            z = model.context(logits[t])
            h = _gate(h0, model.adapters["0"](z), 0.25)
            for i in range(1, 4):
                h = _gate(model.blocks[i](h), model.adapters[str(i)](z), 0.25)
            torch.testing.assert_close(logits[t + 1], model.head(h))
    # Unlike "state" mode, gating the first block changes the refined logits.
    before = model(x)
    _perturb_adapter(model, 0)
    after = model(x)
    torch.testing.assert_close(after[0], before[0])
    assert not torch.allclose(after[1], before[1])


def test_gated_blocks_subset_only_has_those_adapters():
    model = _cbl(gated_blocks=[1, 3]).eval()
    assert set(model.adapters) == {"1", "3"}
    x = torch.randn(2, 3, 16, 16)
    logits = model(x)
    with torch.no_grad():
        h = model.blocks[1](model.blocks[0](x))
        z = model.context(logits[0])
        h = _gate(h, model.adapters["1"](z), 0.0)
        h = _gate(model.blocks[3](model.blocks[2](h)), model.adapters["3"](z), 0.0)
        torch.testing.assert_close(logits[1], model.head(h))


# ---------------------------------------------------------------- the fbkernels op applies the gate


@pytest.mark.parametrize("mode", ["repropagate", "state"])
def test_the_fbkernels_op_applies_every_gate(monkeypatch, mode):
    calls = []
    real = fbkernels.context_gate

    def recording_gate(h, gate_logits, alpha, *, backend=None):
        calls.append((tuple(h.shape), tuple(gate_logits.shape), alpha, backend))
        return real(h, gate_logits, alpha, backend=backend)

    monkeypatch.setattr(fbkernels, "context_gate", recording_gate)
    model = _cbl(mode=mode, steps=2, alpha=0.5, backend="eager")
    model(torch.randn(2, 3, 16, 16))
    assert len(calls) == 2 * 4
    assert {c[2] for c in calls} == {0.5} and {c[3] for c in calls} == {"eager"}
    assert sorted({(c[0][1], c[1]) for c in calls}) == [(4, (2, 4)), (6, (2, 6)), (8, (2, 8))]
    # Without the op nothing is gated: an identity stand-in leaves the refined logits equal to the first
    # (in training mode: in eval mode each pass has its own running statistics, trained on gated maps).
    monkeypatch.setattr(fbkernels, "context_gate", lambda h, a, alpha, *, backend=None: h)
    logits = model.train()(torch.randn(2, 3, 16, 16))
    torch.testing.assert_close(logits[1], logits[0])


def test_gate_goes_through_the_registered_op_and_its_backend():
    model = _cbl(backend="eager")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(torch.randn(2, 3, 8, 8))
    assert any("fbkernels::context_gate" in event.name for event in prof.events())
    with pytest.raises(ValueError, match="backend"):
        _cbl(backend="no-such-backend")(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("backend", [b for b in fbkernels.available_backends("cpu") if b != "eager"])
def test_backends_agree_with_eager(backend):
    torch.manual_seed(1)
    model = _cbl(backend="eager").eval()
    x = torch.randn(2, 3, 16, 16)
    reference = model(x)
    model.backend = backend
    for got, want in zip(model(x), reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_contextual_loops_wraps_any_network():
    blocks = [nn.Sequential(nn.Conv1d(2, 5, 3, padding=1), nn.ReLU()), nn.Sequential(nn.Conv1d(5, 4, 3, padding=1), nn.ReLU())]
    head = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3))
    model = ContextualLoops(blocks, head, [5, 4], 3, steps=2, context_dim=6)
    logits = model(torch.randn(2, 2, 11))
    assert len(logits) == 3 and all(y.shape == (2, 3) for y in logits)
    step_loss(logits, torch.tensor([0, 2])).backward()
    assert all(p.grad is not None for p in model.adapters.parameters())


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="mode"):
        _cbl(mode="loop")
    with pytest.raises(ValueError, match="alpha"):
        _cbl(alpha=1.5)
    with pytest.raises(ValueError, match="steps"):
        _cbl(steps=-1)
    with pytest.raises(ValueError, match="gated_blocks"):
        _cbl(gated_blocks=[4])
    with pytest.raises(ValueError, match="widths"):
        StandardCNN(3, 10, widths=(8, 8))
    with pytest.raises(ValueError, match="block_channels"):
        ContextualLoops([nn.Identity()], nn.Identity(), [3, 4], 2)


def test_cbl_trains_on_a_tiny_batch():
    torch.manual_seed(0)
    model = _cbl()
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 7
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = step_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < 0.5 * first


# ---------------------------------------------------------------- python/cbl.py end to end


def _experiment():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cbl_experiment", os.path.join(REPO, "python", "cbl.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--train-size", "80", "--val-size", "40", "--test-size", "40", "--image-size", "8", "--widths", "4,4,6,6",
        "--hidden", "8", "--context-dim", "4", "--batch-size", "16", "--runs", "2", "--no-progress"]


def test_quick_preset_end_to_end_and_resume(tmp_path, capsys):
    experiment = _experiment()
    out = str(tmp_path / "run")
    result = experiment.main(["--preset", "quick", "--epochs", "1", "--out", out, *TINY])
    files = set(os.listdir(out))
    assert {"results.json", "curves.json", "curves.png", "results.md", "config.json", "checkpoints"} <= files
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000
    with open(os.path.join(out, "results.json")) as file:
        saved = json.load(file)
    assert saved["config"]["dataset"] == "synthetic" and saved["config"]["lr"] == 2e-3
    assert [(r["model"], r["seed"]) for r in saved["runs"]] == [("standard", 0), ("cbl", 0), ("standard", 1), ("cbl", 1)]
    for run in saved["runs"]:
        assert 0.0 <= run["test"]["accuracy"] <= 1.0 and len(run["history"]["val"]) == 1
    assert {"accuracy_pass0", "accuracy_pass1", "accuracy_pass2"} <= set(saved["runs"][1]["test"])
    for name in ("standard", "cbl"):
        accs = [r["test"]["accuracy"] for r in saved["runs"] if r["model"] == name]
        assert saved["summary"][name]["mean"] == pytest.approx(sum(accs) / 2)
    assert saved["ttest"]["n"] == 2 and saved["ttest"]["seeds"] == [0, 1]
    with open(os.path.join(out, "curves.json")) as file:
        curve_data = json.load(file)
    assert set(curve_data) == {"standard", "cbl"} and len(curve_data["cbl"]["1"]["val_accuracy"]) == 1
    assert "| CBL-CNN |" in capsys.readouterr().out

    # Rerun with one more epoch: the saved first epoch is resumed, not retrained.
    again = experiment.main(["--preset", "quick", "--epochs", "2", "--out", out, *TINY])
    for before, after in zip(result["runs"], again["runs"]):
        assert after["history"]["epochs_run"] == 2
        assert after["history"]["val"][0] == before["history"]["val"][0]
    # Another configuration on the same directory would resume the wrong checkpoints: refused.
    with pytest.raises(SystemExit, match="another configuration"):
        experiment.main(["--preset", "quick", "--epochs", "2", "--out", out, *TINY, "--lr", "0.1"])


def test_summary_uses_the_paired_t_test():
    from scipy.stats import ttest_rel

    experiment = _experiment()
    standard, cbl = [0.70, 0.72, 0.69], [0.74, 0.73, 0.75]
    runs = [{"model": m, "seed": s, "test": {"accuracy": a}}
            for m, accs in (("standard", standard), ("cbl", cbl)) for s, a in enumerate(accs)]
    summary, ttest = experiment.summarize(runs)
    expected = ttest_rel(cbl, standard)
    assert ttest["statistic"] == pytest.approx(expected.statistic) and ttest["pvalue"] == pytest.approx(expected.pvalue)
    assert summary["cbl"]["mean"] == pytest.approx(0.74) and summary["standard"]["std"] == pytest.approx(0.0152752523)
    assert ttest["mean_difference"] == pytest.approx(0.0366666667)


def test_cifar10_experiment_on_written_batches(tmp_path):
    import pickle

    import numpy as np

    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(directory / name, "wb") as file:
            pickle.dump({b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                         b"labels": list(np.arange(20) % 10)}, file, protocol=2)
    experiment = _experiment()
    result = experiment.main(["--preset", "quick", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--epochs", "1",
                              "--out", str(tmp_path / "out"), "--runs", "1", "--widths", "4,4,4,4", "--hidden", "8",
                              "--backend", "eager", "--no-progress"])
    assert [r["model"] for r in result["runs"]] == ["standard", "cbl"]
    assert result["runs"][1]["test"]["accuracy"] * 20 == pytest.approx(round(result["runs"][1]["test"]["accuracy"] * 20))
    with pytest.raises(SystemExit):
        experiment.parse_args(["--dataset", "cifar10"])  # no --data-dir: nothing is downloaded


@pytest.mark.slow
def test_full_quick_preset_runs(tmp_path):
    completed = subprocess.run([sys.executable, os.path.join(REPO, "python", "cbl.py"), "--preset", "quick",
                                "--out", str(tmp_path), "--no-progress"], capture_output=True, text=True, timeout=1200)
    assert completed.returncode == 0, completed.stderr
    with open(tmp_path / "results.json") as file:
        saved = json.load(file)
    assert len(saved["runs"]) == 6 and saved["summary"]["standard"]["mean"] > 0.5


# ---------------------------------------------------------------- normalisation statistics per pass


def _eval_minus_train(model, x, forwards=60):
    """max |eval - train| per returned output after ``forwards`` training-mode forwards on one batch."""
    model.train()
    with torch.no_grad():
        for _ in range(forwards):
            train_out = model(x)
        model.eval()
        eval_out = model(x)
    train_out = train_out if isinstance(train_out, list) else [train_out]
    eval_out = eval_out if isinstance(eval_out, list) else [eval_out]
    return [float((e - t).abs().max()) for e, t in zip(eval_out, train_out)]


@pytest.mark.parametrize("mode", ["repropagate", "state"])
def test_eval_mode_computes_what_training_did_for_every_pass(mode):
    """Running statistics converge to one batch's after many forwards on it: eval then matches train
    (up to the unbiased variance BatchNorm keeps, the StandardCNN's own gap), for y(0) and every y(t)."""
    x = torch.randn(8, 3, 16, 16)
    torch.manual_seed(0)
    standard_gap = _eval_minus_train(StandardCNN(3, 7, **SMALL), x)[0]
    torch.manual_seed(0)
    gaps = _eval_minus_train(_cbl(mode=mode, steps=3), x)
    assert len(gaps) == 4
    assert max(gaps) <= 2 * standard_gap + 1e-3, (gaps, standard_gap)


def test_only_the_first_pass_updates_the_backbones_statistics():
    torch.manual_seed(5)
    standard = StandardCNN(3, 7, **SMALL)
    torch.manual_seed(5)
    cbl = _cbl(steps=2)
    x = torch.randn(4, 3, 16, 16)
    standard(x), cbl(x)
    cbl_state = cbl.state_dict()
    for name, value in standard.state_dict().items():
        torch.testing.assert_close(cbl_state[name], value, rtol=0, atol=0, msg=name)
    # Each refinement pass folded its own (gated) maps once into its own statistics.
    assert len(cbl.refinement_statistics) == 2
    for statistics in cbl.refinement_statistics:
        assert len(statistics) == 6  # blocks 1..3 run again, two BatchNorms each
        assert all(int(s.num_batches_tracked) == 1 for s in statistics)
    assert not torch.equal(cbl.refinement_statistics[0][0].running_mean, cbl.blocks[1][0][1].running_mean)


def test_more_steps_later_start_from_the_last_passes_statistics():
    model = _cbl(steps=1)
    model(torch.randn(4, 3, 16, 16))
    model.steps = 3
    assert len(model.refinement_statistics) == 3
    for j, stats in enumerate(model.refinement_statistics[2]):
        torch.testing.assert_close(stats.running_mean, model.refinement_statistics[0][j].running_mean)
    assert len(model.eval()(torch.randn(2, 3, 16, 16))) == 4
    loaded = _cbl(steps=3)
    loaded.load_state_dict(model.state_dict())


# ---------------------------------------------------------------- settings and errors where they enter


def test_settings_are_validated_where_they_enter():
    model = _cbl()
    with pytest.raises(TypeError, match="steps must be an int"):
        model.steps = 2.5
    with pytest.raises(TypeError, match="steps must be an int"):
        _cbl(steps=2.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        _cbl(backend="nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        model.backend = "nonsense"
    with pytest.raises(ValueError, match="mode must be one of"):
        model.mode = "loop"
    with pytest.raises(ValueError, match="alpha must be in"):
        model.alpha = -0.5
    assert (model.steps, model.backend, model.mode, model.alpha) == (2, None, "repropagate", 0.0)


def test_input_block_and_head_errors_name_what_broke():
    model = _cbl()
    with pytest.raises(ValueError, match=r"x must have in_channels=3 channels, got 1"):
        model(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"x must be a batch \[B, C, H, W\]"):
        model(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match=r"x must have in_channels=3 channels, got 1"):
        StandardCNN(3, 7, **SMALL)(torch.randn(2, 1, 8, 8))

    class ReturnsDict(nn.Module):
        def forward(self, h):
            return {"out": h}

    head = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(TypeError, match=r"blocks\[1\] must return a Tensor.*got dict"):
        ContextualLoops([nn.Conv1d(2, 4, 1), ReturnsDict()], head, [4, 4], 3)(torch.randn(2, 2, 5))
    with pytest.raises(ValueError, match=r"blocks\[0\] must return a feature map \[B, block_channels\[0\], \*S\] = \[2, 5, \*S\]"):
        ContextualLoops([nn.Conv1d(2, 4, 1), nn.Conv1d(4, 4, 1)], head, [5, 4], 3)(torch.randn(2, 2, 5))
    with pytest.raises(ValueError, match=r"head must return logits \[B, num_classes\] = \[2, 3\], got \[2, 4\]"):
        ContextualLoops([nn.Conv1d(2, 4, 1)], nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten()), [4], 3)(torch.randn(2, 2, 5))


def test_unused_parameter_names_match_the_gradients():
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    for kwargs in (dict(), dict(mode="state"), dict(steps=0), dict(mode="state", gated_blocks=[0, 1])):
        model = _cbl(**kwargs)
        step_loss(model(x), y).backward()
        without_grad = sorted(name for name, p in model.named_parameters() if p.grad is None)
        assert sorted(model.unused_parameter_names()) == without_grad, kwargs


# ---------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("mode", ["repropagate", "state"])
def test_bfloat16_autocast_runs_and_stays_close_to_float32(mode):
    torch.manual_seed(0)
    model = _cbl(mode=mode).eval()
    x = torch.randn(4, 3, 16, 16)
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.train()(x)
        loss = step_loss(logits, torch.arange(4))
    loss.backward()
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    for got, want in zip(logits, reference):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want, rtol=0.1, atol=0.1)
