"""CBL-CNN models (StandardCNN, ContextualLoops, CBLCNN) and the python/cbl.py experiment end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import fbkernels
from fbkernels.models import CBLCNN, ContextualLoops, SmallCNN, StandardCNN
from fbkernels.models.cbl import ConcatReluAdapter
from fbkernels.train import step_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(widths=(4, 6, 8, 8), hidden=12)


def _cbl(**kwargs):
    options = dict(SMALL, context_dim=5)
    options.update(kwargs)
    return CBLCNN(3, 7, **options)


AUTHORS_SMALL = dict(backbone="authors", widths=(4, 6, 8), hidden=12, pooled_size=4)


def _authors(**kwargs):
    """The authors' reading on a small network: SmallCNN, linear context, concat-ReLU adapters, learned alpha,
    T = 4, "state" mode."""
    options = dict(AUTHORS_SMALL, context_dim=5, context_map="linear", adapter="concat_relu", learn_alpha=True,
                   steps=4, mode="state")
    options.update(kwargs)
    return CBLCNN(3, 7, **options)


def _gate(h, a, alpha):
    return alpha * h + (1 - alpha) * h * torch.sigmoid(a).reshape(*a.shape, *([1] * (h.dim() - 2)))


def _concat_relu(h, z, linear, alpha):
    """The authors' refinement, written out: alpha h + (1 - alpha) ReLU(W [h, c] + b), c = mean(z) per position
    for a map, z for a vector."""
    if h.dim() == 2:
        new = torch.relu(linear(torch.cat([h, z], dim=1)))
    else:
        c = z.mean(dim=1)[:, None, None, None].expand(-1, 1, *h.shape[2:])
        new = torch.relu(torch.nn.functional.conv2d(torch.cat([h, c], dim=1), linear.weight[:, :, None, None], linear.bias))
    return alpha * h + (1 - alpha) * new


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
    _assert_backbone_and_first_pass_equal(standard, cbl)


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


# ---------------------------------------------------------------- the authors' network and options


def test_small_cnn_is_the_authors_network():
    model = SmallCNN(3, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(128 * 8 * 8, 256), (256, 10)]
    x = torch.randn(2, 3, 32, 32)
    states = []
    h = x
    for block in model.blocks:
        h = block(h)
        states.append(tuple(h.shape))
    assert states == [(2, 32, 32, 32), (2, 64, 16, 16), (2, 128, 8, 8), (2, 256)]
    assert model.block_channels == (32, 64, 128, 256) and model.vector_blocks == (3,)
    # Speech-Commands-like inputs: the adaptive pooling makes the FC input fixed.
    assert model(torch.randn(2, 3, 64, 101)).shape == (2, 10)


def test_dropout_only_where_asked_and_off_in_eval():
    standard = SmallCNN(3, 10, widths=(4, 6, 8), hidden=12, pooled_size=4, dropout=0.5)
    assert [m.p for m in standard.modules() if isinstance(m, nn.Dropout)] == [0.5]
    assert [m.p for m in _authors().modules() if isinstance(m, nn.Dropout)] == [0.0]
    x = torch.randn(4, 3, 16, 16)
    standard.eval()
    torch.testing.assert_close(standard(x), standard(x))
    standard.train()
    assert not torch.allclose(standard(x), standard(x))


@pytest.mark.parametrize("mode", ["repropagate", "state"])
@pytest.mark.parametrize("adapter", ["sigmoid_gate", "concat_relu"])
@pytest.mark.parametrize("learn_alpha", [False, True])
def test_authors_backbone_runs_every_option(mode, adapter, learn_alpha):
    model = _authors(mode=mode, adapter=adapter, learn_alpha=learn_alpha, steps=2)
    logits = model(torch.randn(2, 3, 16, 16))
    assert len(logits) == 3 and all(y.shape == (2, 7) for y in logits)
    step_loss(logits, torch.tensor([0, 1])).backward()
    used = {"3"} if mode == "state" else {"0", "1", "2", "3"}
    for key in model.adapters:
        grads = [p.grad for p in model.adapters[key].parameters()]
        assert all((g is not None) == (key in used) for g in grads), (key, mode)
    if learn_alpha:
        assert model.alpha_parameter.grad is not None and model.alpha_parameter.grad.abs() > 0


def test_initial_pass_of_the_authors_cbl_is_their_standard_cnn():
    torch.manual_seed(3)
    standard = SmallCNN(3, 7, widths=(4, 6, 8), hidden=12, pooled_size=4, dropout=0.5)
    torch.manual_seed(3)
    cbl = _authors()
    _assert_backbone_and_first_pass_equal(standard, cbl)


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_concat_relu_state_mode_is_the_authors_refinement(alpha):
    """Every stored state refined by alpha h + (1 - alpha) ReLU(W [h, c] + b), only the last FC recomputed, the
    context a linear map of the logits (no tanh)."""
    model = _authors(alpha=alpha, steps=3).eval()
    assert not any(isinstance(m, nn.Tanh) for m in model.context.modules())
    x = torch.randn(2, 3, 16, 16)
    logits, refined = model(x, return_states=True)
    with torch.no_grad():
        states, h = [], x
        for block in model.blocks:
            h = block(h)
            states.append(h)
        for t in range(3):
            z = model.context[0](logits[t])
            states = [_concat_relu(s, z, model.adapters[str(i)].linear, alpha) for i, s in enumerate(states)]
            torch.testing.assert_close(logits[t + 1], model.head(states[3]))
    for got, want in zip(refined, states):
        torch.testing.assert_close(got, want)


def test_concat_relu_adapter_on_maps_and_vectors():
    z = torch.randn(2, 5)
    on_map = ConcatReluAdapter(6, 5, vector=False)
    assert on_map.linear.weight.shape == (6, 7)  # C + 1: the mean of z is one extra channel
    h = torch.randn(2, 6, 3, 4)
    torch.testing.assert_close(on_map(h, z), _concat_relu(h, z, on_map.linear, 0.0))
    on_vector = ConcatReluAdapter(6, 5, vector=True)
    assert on_vector.linear.weight.shape == (6, 11)  # C + context_dim
    v = torch.randn(2, 6)
    torch.testing.assert_close(on_vector(v, z), _concat_relu(v, z, on_vector.linear, 0.0))


def test_learned_alpha_stays_in_range_and_can_come_back():
    model = _authors(mode="repropagate", steps=1).eval()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    fixed = _authors(mode="repropagate", steps=1, learn_alpha=False).eval()
    fixed.load_state_dict({k: v for k, v in model.state_dict().items() if k != "alpha_parameter"})
    with torch.no_grad():
        model.alpha_parameter.fill_(-0.4)
    assert model.alpha == 0.0
    # Beyond the bound the forward uses alpha = 0 exactly, and the parameter still gets a gradient.
    for got, want in zip(model(x), fixed(x)):
        torch.testing.assert_close(got, want)
    step_loss(model(x), y).backward()
    assert model.alpha_parameter.grad is not None and model.alpha_parameter.grad != 0
    with torch.no_grad():
        model.alpha_parameter.fill_(1.7)
    assert model.alpha == 1.0
    logits = model(x)
    torch.testing.assert_close(logits[1], logits[0])  # alpha 1: the refinement keeps h


def test_learned_alpha_with_the_sigmoid_gate_equals_the_fixed_blend():
    torch.manual_seed(2)
    learned = _cbl(alpha=0.3, learn_alpha=True).eval()
    fixed = _cbl(alpha=0.3).eval()
    fixed.load_state_dict({k: v for k, v in learned.state_dict().items() if k != "alpha_parameter"})
    x = torch.randn(2, 3, 16, 16)
    for got, want in zip(learned(x), fixed(x)):
        torch.testing.assert_close(got, want)
    assert isinstance(learned.alpha_parameter, nn.Parameter) and learned.alpha == pytest.approx(0.3)
    learned.alpha = 0.6
    assert float(learned.alpha_parameter.detach()) == pytest.approx(0.6)


def test_state_dict_round_trip_and_eval_are_deterministic():
    model = _authors()
    x = torch.randn(2, 3, 16, 16)
    step_loss(model(x), torch.tensor([0, 1])).backward()
    with torch.no_grad():
        model.alpha_parameter.fill_(0.25)
    state = model.state_dict()
    assert "alpha_parameter" in state and "context.0.weight" in state and "adapters.3.linear.weight" in state
    loaded = _authors()
    loaded.load_state_dict(state)
    assert loaded.alpha == pytest.approx(0.25)
    model.eval(), loaded.eval()
    for got, want in zip(loaded(x), model(x)):
        torch.testing.assert_close(got, want)
    with pytest.raises(RuntimeError, match="alpha_parameter"):
        _authors(learn_alpha=False).load_state_dict(state)


def test_new_options_are_validated_with_clear_errors():
    with pytest.raises(ValueError, match=r"context_map must be one of \['linear_tanh', 'linear'\], got 'relu'"):
        _cbl(context_map="relu")
    with pytest.raises(ValueError, match=r"adapter must be one of \['sigmoid_gate', 'concat_relu'\], got 'film'"):
        _cbl(adapter="film")
    with pytest.raises(TypeError, match="learn_alpha must be a bool, got int 1"):
        _cbl(learn_alpha=1)
    with pytest.raises(ValueError, match=r"backbone must be one of \['paper', 'authors'\], got 'resnet'"):
        CBLCNN(3, 7, backbone="resnet")
    with pytest.raises(ValueError, match="widths must be 3 positive channel counts.*got \\(4, 6, 8, 8\\)"):
        CBLCNN(3, 7, backbone="authors", widths=(4, 6, 8, 8))
    with pytest.raises(ValueError, match="pooled_size is an option of the authors' backbone"):
        CBLCNN(3, 7, pooled_size=4)
    with pytest.raises(ValueError, match="pooled_size must be >= 1, got 0"):
        SmallCNN(3, 7, pooled_size=0)
    with pytest.raises(ValueError, match=r"dropout must be a float in \[0, 1\), got 1.0"):
        StandardCNN(3, 7, dropout=1.0)
    with pytest.raises(TypeError, match=r"dropout must be a float in \[0, 1\), got str '0.1'"):
        StandardCNN(3, 7, dropout="0.1")
    # Sizes are ints under the user's names: a float is refused, not truncated or passed on to torch.
    with pytest.raises(TypeError, match=r"widths\[0\] must be an int >= 1, got float 4.5"):
        CBLCNN(3, 7, widths=(4.5, 8, 8, 8))
    with pytest.raises(TypeError, match="in_channels must be an int >= 1, got float 3.0"):
        CBLCNN(3.0, 10)
    with pytest.raises(TypeError, match="hidden must be an int >= 1, got float 8.5"):
        CBLCNN(3, 10, hidden=8.5)
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        StandardCNN(3, 0)
    with pytest.raises(ValueError, match=r"vector_blocks must be indices in 0..1, got \(2,\)"):
        ContextualLoops([nn.Identity(), nn.Identity()], nn.Identity(), [3, 3], 3, vector_blocks=[2])
    with pytest.raises(TypeError, match="context_dim must be an int >= 1"):
        _cbl(context_dim=2.5)
    # ContextualLoops' own sizes and indices too: int() used to truncate 4.7 channels to 4 and block 0.9 to 0.
    head = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(TypeError, match=r"block_channels\[0\] must be an int >= 1, got float 4.7"):
        ContextualLoops([nn.Conv1d(2, 4, 1)], head, [4.7], 3)
    with pytest.raises(TypeError, match=r"gated_blocks\[0\] must be an int >= 0, got float 0.9"):
        ContextualLoops([nn.Conv1d(2, 4, 1)], head, [4], 3, gated_blocks=[0.9])
    with pytest.raises(TypeError, match=r"vector_blocks\[0\] must be an int >= 0, got float 0.5"):
        ContextualLoops([nn.Conv1d(2, 4, 1)], head, [4], 3, vector_blocks=[0.5])
    with pytest.raises(ValueError, match=r"gated_blocks\[0\] must be >= 0, got -1"):
        ContextualLoops([nn.Conv1d(2, 4, 1)], head, [4], 3, gated_blocks=[-1])
    # A concat_relu adapter told the wrong kind of state says which block and what it expected.
    blocks = [nn.Sequential(nn.Conv1d(2, 4, 1), nn.AdaptiveAvgPool1d(1), nn.Flatten())]
    model = ContextualLoops(blocks, nn.Linear(4, 3), [4], 3, adapter="concat_relu")
    with pytest.raises(ValueError, match=r"blocks\[0\] must return a feature map \[B, C, \*S\] for its concat_relu"):
        model(torch.randn(2, 2, 5))


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
    assert {"results.json", "curves.json", "curves.png", "accuracy.png", "results.md", "config.json", "checkpoints"} <= files
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000 and os.path.getsize(os.path.join(out, "accuracy.png")) > 1000
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
    assert saved["config"]["variant"] == "paper" and saved["config"]["step_weights"] == [1.0, 1.0, 1.0]
    assert len(saved["summary"]["cbl"]["ci95"]) == 2 and len(saved["ttest"]["ci95"]) == 2
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


def test_a_configuration_without_checkpoints_does_not_lock_the_out_directory(tmp_path):
    # A run that failed before its first checkpoint (here on an impossible image size; on a GPU, out of memory at
    # batch 128) left config.json behind, and the corrected command was refused as "holds checkpoints of another
    # configuration" although there was nothing to resume.
    experiment = _experiment()
    out = str(tmp_path / "run")
    tiny = [*TINY, "--runs", "1", "--epochs", "1", "--out", out]
    with pytest.raises(ValueError, match="size must be >= 1"):
        experiment.main([*tiny, "--image-size", "0"])
    assert os.listdir(os.path.join(out, "checkpoints")) == []
    result = experiment.main(tiny)
    assert len(result["runs"]) == 2


@pytest.mark.experiments
def test_authors_variant_end_to_end(tmp_path):
    experiment = _experiment()
    out = str(tmp_path / "authors")
    tiny = ["--train-size", "64", "--val-size", "32", "--test-size", "32", "--image-size", "8", "--widths", "4,4,6",
            "--hidden", "8", "--pooled-size", "2", "--context-dim", "4", "--batch-size", "16", "--runs", "2",
            "--no-progress", "--epochs", "1"]
    result = experiment.main(["--preset", "quick", "--variant", "authors", "--out", out, *tiny])
    with open(os.path.join(out, "config.json")) as file:
        config = json.load(file)
    assert (config["backbone"], config["adapter"], config["context_map"], config["mode"], config["steps"]) == (
        "authors", "concat_relu", "linear", "state", 4)
    assert config["learn_alpha"] and config["step_weights"] == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert config["lr_halve_every"] == 0 and config["standard_dropout"] == 0.5
    cbl_runs = [r for r in result["runs"] if r["model"] == "cbl"]
    assert all(0.0 <= r["alpha"] <= 1.0 and r["alpha"] == min(max(r["alpha_parameter"], 0.0), 1.0) for r in cbl_runs)
    assert {"accuracy_pass0", "accuracy_pass4"} <= set(cbl_runs[0]["test"])
    assert os.path.getsize(os.path.join(out, "accuracy.png")) > 1000
    with open(os.path.join(out, "results.md")) as file:
        report = file.read()
    assert "95% CI" in report and "Learned alpha" in report and "CBL-CNN - StandardCNN (paired)" in report


def test_variants_set_their_bundle_and_explicit_flags_win():
    experiment = _experiment()
    paper = experiment.parse_args([])
    assert (paper.variant, paper.backbone, paper.adapter, paper.context_map, paper.mode, paper.steps) == (
        "paper", "paper", "sigmoid_gate", "linear_tanh", "repropagate", 2)
    assert (paper.learn_alpha, paper.alpha, paper.standard_dropout, paper.runs) == (False, 0.0, 0.0, 5)
    assert paper.step_weights == [1.0, 1.0, 1.0] and paper.lr_halve_every == 3 and paper.widths == (16, 32, 32, 64)
    authors = experiment.parse_args(["--variant", "authors"])
    assert (authors.backbone, authors.adapter, authors.context_map, authors.mode, authors.steps) == (
        "authors", "concat_relu", "linear", "state", 4)
    assert authors.learn_alpha and authors.step_weights == [0.0] * 4 + [1.0] and authors.lr_halve_every == 0
    assert authors.widths == (16, 32, 64) and authors.standard_dropout == 0.5
    mixed = experiment.parse_args(["--variant", "authors", "--mode", "repropagate", "--steps", "2", "--no-learn-alpha",
                                   "--loss-steps", "all", "--adapter", "sigmoid_gate", "--lr-halve-every", "3"])
    assert (mixed.mode, mixed.steps, mixed.learn_alpha, mixed.step_weights, mixed.adapter, mixed.lr_halve_every) == (
        "repropagate", 2, False, [1.0, 1.0, 1.0], "sigmoid_gate", 3)
    for bad in (["--variant", "authors", "--widths", "4,4,4,4"], ["--widths", "4,4,4"], ["--alpha", "1.5"],
                ["--steps", "2", "--step-weights", "1,1"], ["--standard-dropout", "1"], ["--variant", "both"]):
        with pytest.raises(SystemExit):
            experiment.parse_args(bad)


def test_impossible_limits_batches_and_step_weights_are_refused(capsys):
    # --limit-train -5 dropped 5 items without a word (randperm(n)[:-5]), --eval-batch-size 0 failed only after
    # the first training epoch, and a NaN step weight trained on a NaN loss.
    experiment = _experiment()
    cifar = ["--dataset", "cifar10", "--data-dir", "unused"]
    for bad, message in (([*cifar, "--limit-train", "-5"], "--limit-train must be at least 1, got -5"),
                         ([*cifar, "--limit-eval", "0"], "--limit-eval must be at least 1, got 0"),
                         (["--eval-batch-size", "0"], "--eval-batch-size must be at least 1, got 0"),
                         (["--step-weights", "nan,1,1"], "--step-weights must be finite numbers, got nan,1.0,1.0")):
        with pytest.raises(SystemExit):
            experiment.parse_args(bad)
        assert message in capsys.readouterr().err
    assert experiment.parse_args([*cifar, "--limit-train", "1"]).limit_train == 1


def test_limit_eval_help_says_what_the_subset_is(capsys):
    # --help promised "the first N items"; load_data takes a fixed random subset (_subset), as for --limit-train.
    experiment = _experiment()
    with pytest.raises(SystemExit):
        experiment.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--limit-eval LIMIT_EVAL real data: validate and test on a fixed random subset" in text
    assert experiment._subset(list(range(100)), 5, 1).indices != [0, 1, 2, 3, 4]


def test_set_fields_like_their_flags():
    experiment = _experiment()
    args = experiment.parse_args(["--set", "variant=authors", "--set", "epochs=1", "--set", "widths=8,8,8",
                                  "--set", "learn_alpha=false", "--set", "loss-steps=all"])
    assert (args.backbone, args.epochs, args.widths, args.learn_alpha, args.step_weights) == (
        "authors", 1, (8, 8, 8), False, [1.0] * 5)
    for bad in (["--set", "nonsense=1"], ["--set", "epochs=abc"], ["--set", "mode=loop"], ["--set", "epochs"],
                ["--set", "learn_alpha=maybe"]):
        with pytest.raises(SystemExit):
            experiment.parse_args(bad)


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
    from fbkernels import metrics

    assert summary["cbl"]["ci95"] == pytest.approx(metrics.mean_ci95(cbl)["ci95"])
    assert ttest["ci95"] == pytest.approx(metrics.paired_difference(cbl, standard)["ci95"])
    assert ttest["differences"] == pytest.approx([0.04, 0.01, 0.06])


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
    assert len(saved["runs"]) == 2 * 5 and saved["summary"]["standard"]["mean"] > 0.5


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


def test_a_model_evaluated_with_more_steps_loads_into_one_built_with_its_steps():
    # Raising steps for an evaluation adds statistics for the new passes, which stay in the state_dict after steps
    # goes back: a model built again with the training steps must load it (and then run the extra passes alike).
    torch.manual_seed(0)
    model = _cbl(steps=1)
    model(torch.randn(4, 3, 16, 16))
    model.steps = 3
    model(torch.randn(4, 3, 16, 16))
    model.steps = 1
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    loaded = _cbl(steps=1)
    loaded.load_state_dict(model.state_dict())
    loaded.eval()
    assert loaded.steps == 1 and len(loaded.refinement_statistics) == 3
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    model.steps = loaded.steps = 3
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    nested = nn.Sequential(_cbl(steps=1))
    nested.load_state_dict(nn.Sequential(model).state_dict())
    assert len(nested[0].refinement_statistics) == 3


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
    with pytest.raises(ValueError, match=r"alpha must be a finite number >= 0 and <= 1, got -0.5"):
        model.alpha = -0.5
    with pytest.raises(ValueError, match=r"alpha must be a finite number >= 0 and <= 1, got nan"):
        model.alpha = float("nan")
    assert (model.steps, model.backend, model.mode, model.alpha) == (2, None, "repropagate", 0.0)
    # Any real number, as the op takes it: a NumPy float32 (not a Python float) too; a bool or a tensor is refused.
    model.alpha = np.float32(0.25)
    assert model.alpha == 0.25 and type(model.alpha) is float
    assert _cbl(alpha=np.float32(0.5), learn_alpha=True).alpha == 0.5
    with pytest.raises(TypeError, match="alpha must be a finite number >= 0 and <= 1, got bool True"):
        model.alpha = True
    with pytest.raises(TypeError, match="alpha must be a finite number >= 0 and <= 1, got Tensor"):
        model.alpha = torch.tensor(0.5)


def test_input_block_and_head_errors_name_what_broke():
    model = _cbl()
    with pytest.raises(ValueError, match=r"x must have in_channels=3 channels, got 1"):
        model(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"x must be a batch \[B, C, H, W\]"):
        model(torch.randn(3, 8, 8))
    # A 0-dim tensor is a Tensor of the wrong shape: the message gives the expected and the given shape.
    loops = ContextualLoops([nn.Conv1d(2, 4, 1)], nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3)), [4], 3)
    with pytest.raises(ValueError, match=r"x must be a batched torch.Tensor \[B, \.\.\.\], got shape \[\]"):
        loops(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"x must be a batched torch.Tensor \[B, \.\.\.\], got list"):
        loops([1.0])
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
    options = [dict(), dict(mode="state"), dict(steps=0), dict(mode="state", gated_blocks=[0, 1]),
               dict(learn_alpha=True), dict(learn_alpha=True, steps=0), dict(learn_alpha=True, mode="state", gated_blocks=[1]),
               dict(adapter="concat_relu", context_map="linear"), dict(adapter="concat_relu", mode="state", learn_alpha=True),
               dict(AUTHORS_SMALL, adapter="concat_relu", mode="state", learn_alpha=True),
               dict(AUTHORS_SMALL, adapter="concat_relu", mode="state", learn_alpha=True, gated_blocks=[0, 2]),
               dict(AUTHORS_SMALL, mode="repropagate", learn_alpha=True)]
    for kwargs in options:
        model = _cbl(**kwargs)
        step_loss(model(x), y).backward()
        without_grad = sorted(name for name, p in model.named_parameters() if p.grad is None)
        assert sorted(model.unused_parameter_names()) == without_grad, kwargs


# ---------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("mode", ["repropagate", "state", "authors"])
def test_bfloat16_autocast_runs_and_stays_close_to_float32(mode):
    torch.manual_seed(0)
    model = (_authors(alpha=0.2) if mode == "authors" else _cbl(mode=mode)).eval()
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


def _assert_backbone_and_first_pass_equal(standard, cbl):
    """Same seed, same backbone weights (the backbone is built first), so the initial pass agrees."""
    for name, value in standard.state_dict().items():
        torch.testing.assert_close(cbl.state_dict()[name], value)
    standard.eval(), cbl.eval()
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(cbl(x)[0], standard(x))
