"""Feedback U-Net models: return contract, the state update's math, gradients, BPTT modes, decay stability."""
import pytest
import torch

import fbkernels
from fbkernels.models import DecayMatrix, FeedbackLoop, FeedbackUNet, FeedforwardUNet, UNet, state_changes
from fbkernels.train import step_loss

FUSED = ["cpp", "triton"]


def tiny(**kwargs):
    options = dict(seg_channels=4, width=4, depth=2)
    options.update(kwargs)
    return FeedbackUNet(3, 2, **options)


def test_unet_maps_any_size_to_the_requested_channels():
    net = UNet(5, 7, width=4, depth=3)
    assert net(torch.rand(2, 5, 20, 13)).shape == (2, 7, 20, 13)
    assert UNet(1, 2, width=2, depth=0)(torch.rand(1, 1, 8, 8)).shape == (1, 2, 8, 8)


def test_feedback_unet_returns_per_step_logits_and_states():
    model = tiny()
    x = torch.rand(2, 3, 20, 20)
    logits = model(x, steps=3)
    assert isinstance(logits, list) and len(logits) == 3
    assert all(y.shape == (2, 2, 20, 20) for y in logits)
    logits, states = model(x, steps=4, return_states=True)
    assert len(logits) == len(states) == 4
    assert all(h.shape == (2, 6, 20, 20) for h in states)
    assert len(model(x)) == 5  # default T
    with pytest.raises(ValueError):
        model(x, steps=0)
    with pytest.raises(ValueError):
        tiny(bptt="truncated")


def test_feedforward_unet_returns_one_logits_tensor():
    x = torch.rand(2, 3, 16, 16)
    for decay in (False, True):
        out = FeedforwardUNet(3, 2, seg_channels=4, width=4, depth=2, decay=decay)(x)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 16, 16)


@pytest.mark.parametrize("softmax", [True, False])
def test_state_update_follows_the_feedback_equations(softmax):
    """h(t) = h(t-1) + M(t-1) f(t); the network sees [x, v(t-1)] with v(0) = 0 and v = softmax(h[:, d-k:])."""
    torch.manual_seed(1)
    model = tiny(softmax=softmax).double()
    with torch.no_grad():  # move M away from the identity so a wrong step index would show
        model.decay.basis_inv.add_(0.1 * torch.randn_like(model.decay.basis_inv))
    seen_inputs, outputs = [], []

    def record(module, args, out):
        seen_inputs.append(args[0])
        outputs.append(out)

    model.network.register_forward_hook(record)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    logits, states = model(x, steps=3, return_states=True)
    previous = torch.zeros_like(states[0])
    for t, (h, f, inputs) in enumerate(zip(states, outputs, seen_inputs), start=1):
        m = fbkernels.decay_matrix(model.decay.basis, model.decay.basis_inv, torch.ones(6, dtype=torch.float64), t - 1, 1.0)
        torch.testing.assert_close(h, previous + torch.einsum("ij,bjhw->bihw", m, f))
        assert torch.equal(inputs[:, :3], x)
        if t == 1:
            assert not inputs[:, 3:].any()
        else:
            expected_v = torch.softmax(previous[:, 4:], dim=1) if softmax else previous[:, 4:]
            torch.testing.assert_close(inputs[:, 3:], expected_v)
        torch.testing.assert_close(logits[t - 1], model.head(h[:, :4]))
        previous = h


def test_models_call_the_public_ops_with_their_backend(monkeypatch):
    calls = []
    real_step = fbkernels.feedback_step

    def recording_step(h, f, decay, num_feedback, *, backend=None):
        calls.append(backend)
        return real_step(h, f, decay, num_feedback, backend=backend)

    monkeypatch.setattr(fbkernels, "feedback_step", recording_step)
    tiny(backend="eager")(torch.rand(1, 3, 8, 8), steps=3)
    FeedforwardUNet(3, 2, width=4, depth=1, decay=True, backend="eager")(torch.rand(1, 3, 8, 8))
    assert calls == ["eager"] * 4
    with pytest.raises(ValueError, match="backend"):
        tiny(backend="no-such-backend")(torch.rand(1, 3, 8, 8), steps=1)


@pytest.mark.parametrize("learn_rates", [False, True])
def test_gradients_reach_every_parameter(learn_rates):
    model = tiny(learn_rates=learn_rates)
    x, y = torch.rand(2, 3, 16, 16), torch.randint(0, 2, (2, 16, 16))
    step_loss(model(x, steps=3), y).backward()
    names = {name for name, _ in model.named_parameters()}
    assert {"decay.basis", "decay.basis_inv"} <= names
    assert ("decay.rate_logits" in names) == learn_rates
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    ff = FeedforwardUNet(3, 2, seg_channels=4, width=4, depth=1, decay=True, learn_rates=learn_rates)
    step_loss(ff(x), y).backward()
    for name, p in ff.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_decay_matrix_module_starts_at_identity_and_keeps_rates_positive():
    decay = DecayMatrix(5, tau=2.0, learn_rates=True)
    torch.testing.assert_close(decay(0), torch.eye(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(decay(3), torch.eye(5) * torch.exp(torch.tensor(-1.5)), atol=1e-5, rtol=0)
    with torch.no_grad():
        decay.rate_logits.fill_(-30.0)
    assert (decay.rates > 0).all()


def _loss_and_grads(model, x, y, steps):
    model.zero_grad(set_to_none=True)
    loss = step_loss(model(x, steps=steps), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_checkpoint_mode_gives_the_same_gradients_as_full_mode():
    torch.manual_seed(3)
    model = tiny().double()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 2, (2, 16, 16))
    full_loss, full_grads = _loss_and_grads(model, x, y, steps=4)
    model.bptt = "checkpoint"
    ckpt_loss, ckpt_grads = _loss_and_grads(model, x, y, steps=4)
    torch.testing.assert_close(ckpt_loss, full_loss, rtol=1e-12, atol=0)
    for name in full_grads:
        torch.testing.assert_close(ckpt_grads[name], full_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def _peak_bytes(model, x, y, steps) -> int:
    """Peak CPU memory (bytes) of one forward+backward, tracked per tensor storage by torch's MemTracker."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        step_loss(model(x, steps=steps), y).backward()
    peak = tracker.get_tracker_snapshot("peak")
    return sum(int(stats["Total"]) for stats in peak.values())


def test_checkpoint_mode_uses_less_peak_memory_at_ten_steps():
    pytest.importorskip("torch.distributed._tools.mem_tracker")
    torch.manual_seed(0)
    x, y = torch.rand(1, 3, 16, 16), torch.randint(0, 2, (1, 16, 16))
    peaks = {}
    for mode in ("full", "checkpoint"):
        for steps in (5, 10):
            torch.manual_seed(0)
            peaks[mode, steps] = _peak_bytes(tiny(width=8, bptt=mode), x, y, steps)
    print({f"{m}@T={t}": f"{b / 2**20:.2f} MiB" for (m, t), b in peaks.items()})
    assert peaks["checkpoint", 10] < 0.5 * peaks["full", 10]
    # Full BPTT keeps every step's U-Net activations: its peak grows with T several times faster.
    full_growth = peaks["full", 10] - peaks["full", 5]
    ckpt_growth = peaks["checkpoint", 10] - peaks["checkpoint", 5]
    assert ckpt_growth < 0.5 * full_growth


def test_with_decay_the_state_settles_and_without_it_does_not():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        _, settling = tiny(decay=True)(x, steps=30, return_states=True)
        _, drifting = tiny(decay=False)(x, steps=30, return_states=True)
    decayed, undecayed = state_changes(settling), state_changes(drifting)
    assert len(decayed) == 29
    assert decayed[-1] < 1e-9 * decayed[0]  # M(t) = e^{-t} I at initialisation
    assert undecayed[-1] > 0.3 * undecayed[0]  # a constant-size update every step


def test_feedback_loop_wraps_a_user_network():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(2 + 3, 4 + 3, 1)

        def forward(self, inputs):
            return self.conv(inputs)

    model = FeedbackLoop(Tiny(), torch.nn.Conv1d(4, 3, 1), num_classes=3, seg_channels=4, steps=2)
    logits = model(torch.rand(5, 2, 11))  # 1-D positions: any spatial rank works
    assert [y.shape for y in logits] == [(5, 3, 11)] * 2
    bad = FeedbackLoop(torch.nn.Conv1d(5, 6, 1), torch.nn.Conv1d(4, 3, 1), num_classes=3, seg_channels=4)
    with pytest.raises(ValueError, match="channels"):
        bad(torch.rand(5, 2, 11))


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backends_match_eager_through_the_model(backend):
    if backend not in fbkernels.available_backends("cpu"):
        pytest.skip(f"backend {backend} not available here")
    torch.manual_seed(0)
    model = tiny(width=4)
    x, y = torch.rand(2, 3, 12, 12), torch.randint(0, 2, (2, 12, 12))
    model.backend = "eager"
    eager_loss, eager_grads = _loss_and_grads(model, x, y, steps=3)
    model.backend = backend
    fused_loss, fused_grads = _loss_and_grads(model, x, y, steps=3)
    torch.testing.assert_close(fused_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name in eager_grads:
        torch.testing.assert_close(fused_grads[name], eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------- settings are validated where they enter


def test_one_class_with_softmax_is_refused_and_without_softmax_feeds_back_the_state():
    with pytest.raises(ValueError, match="num_classes=1.*softmax"):
        FeedbackUNet(1, 1)
    with pytest.raises(ValueError, match="num_classes=1"):
        FeedbackLoop(torch.nn.Conv2d(2, 3, 1), torch.nn.Conv2d(2, 1, 1), num_classes=1, seg_channels=2)
    model = FeedbackUNet(1, 1, seg_channels=4, width=4, depth=1, softmax=False)
    seen = []
    model.network.register_forward_hook(lambda module, args, out: seen.append(args[0][:, 1:].clone()))
    _, states = model(torch.rand(2, 1, 8, 8), steps=3, return_states=True)
    # Without softmax the single feedback channel is the state itself, not a constant.
    torch.testing.assert_close(seen[2], states[1][:, -1:])
    assert seen[2].std() > 0
    with pytest.raises(ValueError, match="num_classes=1"):
        model.softmax = True


def test_constructor_sizes_are_checked_under_the_users_names():
    # Before the U-Net is built: its own checks would name in_channels + num_classes, not what the user passed.
    with pytest.raises(ValueError, match="width must be >= 1, got 0"):
        FeedbackUNet(3, 2, width=0)
    with pytest.raises(ValueError, match="depth must be >= 0, got -1"):
        FeedbackUNet(3, 2, depth=-1)
    with pytest.raises(TypeError, match="in_channels must be an int >= 1, got float 3.0"):
        FeedbackUNet(3.0, 2)
    with pytest.raises(TypeError, match="width must be an int >= 1, got float 2.5"):
        FeedbackUNet(3, 2, width=2.5)
    with pytest.raises(TypeError, match="out_channels must be an int >= 1, got str '2'"):
        UNet(3, "2")
    with pytest.raises(ValueError, match="width must be >= 1, got 0"):
        FeedforwardUNet(3, 2, width=0)


def test_feedforward_decay_settings_are_checked_at_construction():
    # Unchecked, a negative decay_step failed only in the first forward, named as decay_matrix's "t".
    with pytest.raises(ValueError, match="decay_step must be >= 0, got -1"):
        FeedforwardUNet(3, 2, width=4, depth=1, decay=True, decay_step=-1)
    with pytest.raises(TypeError, match="decay_step must be an int >= 0, got str '5'"):
        FeedforwardUNet(3, 2, width=4, depth=1, decay=True, decay_step="5")
    # tau as FeedbackUNet checks it, with or without decay.
    with pytest.raises(ValueError, match="tau must be a finite number > 0, got -1"):
        FeedforwardUNet(3, 2, width=4, depth=1, tau=-1)
    assert FeedforwardUNet(3, 2, width=4, depth=1, decay=True, decay_step=0)(torch.rand(1, 3, 8, 8)).shape == (1, 2, 8, 8)


def test_decay_flags_are_bools_and_learned_rates_need_the_decay():
    # learn_rates=True without decay was dropped without a word; decay="no" (truthy) built a decay matrix.
    for model in (FeedbackUNet, FeedforwardUNet):
        with pytest.raises(ValueError, match="learn_rates=True needs decay=True"):
            model(3, 2, width=4, depth=1, decay=False, learn_rates=True)
        with pytest.raises(TypeError, match="decay must be a bool, got str 'no'"):
            model(3, 2, width=4, depth=1, decay="no")
        with pytest.raises(TypeError, match="learn_rates must be a bool, got int 1"):
            model(3, 2, width=4, depth=1, decay=True, learn_rates=1)
    with pytest.raises(TypeError, match="learn_rates must be a bool, got int 0"):
        DecayMatrix(3, learn_rates=0)
    with pytest.raises(TypeError, match="feedback_layernorm must be a bool, got int 1"):
        FeedbackLoop(torch.nn.Conv2d(5, 3, 1), torch.nn.Conv2d(1, 2, 1), num_classes=2, seg_channels=1,
                     feedback_layernorm=1)
    assert FeedbackUNet(3, 2, width=4, depth=1, seg_channels=4, decay=True, learn_rates=True).decay.rate_logits.shape == (6,)


def test_settings_are_validated_where_they_enter():
    model = tiny()
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(TypeError, match="steps must be an int.*2.5"):
        model(x, steps=2.5)
    with pytest.raises(TypeError, match="steps"):
        model(x, steps=True)
    with pytest.raises(ValueError, match="bptt must be one of"):
        model.bptt = "nonsense"
    assert model.bptt == "full"
    with pytest.raises(ValueError, match="steps must be >= 1"):
        model.steps = 0
    with pytest.raises(TypeError, match="steps"):
        model.steps = 3.0
    assert model.steps == 5
    with pytest.raises(ValueError, match="backend must be one of"):
        FeedbackUNet(1, 2, backend="nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        model.backend = "nonsense"
    with pytest.raises(TypeError, match="backend must be a str or None"):
        model.backend = 3
    with pytest.raises(ValueError, match="backend must be one of"):
        FeedforwardUNet(1, 2, backend="nonsense")
    # A known backend that cannot run here is accepted at construction; the call says why it cannot run.
    model.backend = "cuda"
    with pytest.raises(ValueError, match="not available"):
        model(x, steps=1)
    model.backend = None
    model.bptt, model.steps = "checkpoint", 2
    assert (model.bptt, model.steps) == ("checkpoint", 2) and len(model(x)) == 2


# ---------------------------------------------------------------- input errors in the model's terms


def test_input_errors_are_in_the_models_terms():
    model = FeedbackUNet(1, 2, seg_channels=4, width=4, depth=1)
    with pytest.raises(ValueError, match=r"x must have in_channels=1 channels, got 3"):
        model(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"x must be a batch \[B, C, H, W\].*\[1, 8, 8\]"):
        model(torch.rand(1, 8, 8))
    with pytest.raises(TypeError, match="x must be a floating"):
        model(torch.ones(1, 1, 8, 8, dtype=torch.long))


class _Downsample(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2 + 2, 3 + 2, 3, stride=2, padding=1)

    def forward(self, inputs):
        return self.conv(inputs)


class _ReturnsDict(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2 + 2, 3 + 2, 1)

    def forward(self, inputs):
        return {"out": self.conv(inputs)}


def test_a_user_network_or_head_that_breaks_the_contract_gets_a_clear_error():
    x = torch.rand(2, 2, 8, 8)
    head = torch.nn.Conv2d(3, 2, 1)
    with pytest.raises(ValueError, match=r"network must return .*\[2, 5, 8, 8\].*got \[2, 5, 4, 4\]"):
        FeedbackLoop(_Downsample(), head, num_classes=2, seg_channels=3)(x)
    with pytest.raises(TypeError, match="network must return a Tensor.*got dict"):
        FeedbackLoop(_ReturnsDict(), head, num_classes=2, seg_channels=3)(x)
    bad_head = torch.nn.Conv2d(3, 4, 1)
    with pytest.raises(ValueError, match=r"head must return logits \[B, num_classes, \.\.\.\] = \[2, 2, \.\.\.\]"):
        FeedbackLoop(torch.nn.Conv2d(4, 5, 1), bad_head, num_classes=2, seg_channels=3)(x)


# ---------------------------------------------------------------- early exit


def test_early_exit_stops_once_the_state_settles():
    torch.manual_seed(0)
    model = tiny(decay=True)
    x = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        all_logits, all_states = model(x, steps=12, return_states=True)
        changes = state_changes(all_states)  # changes[i] is the change of step t = i + 2
        tol = 0.5 * (changes[2] + changes[3])  # between the changes of steps 4 and 5: stops after step 5
        assert changes[3] < tol <= changes[2]
        logits, states = model(x, steps=12, tol=tol, return_states=True)
    assert len(logits) == len(states) == 5
    for got, want in zip(logits, all_logits):
        torch.testing.assert_close(got, want)
    for got, want in zip(states, all_states):
        torch.testing.assert_close(got, want)


def test_early_exit_never_stops_at_the_first_step_and_runs_all_steps_for_an_unreachable_tol():
    model = tiny(decay=True)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert len(model(x, steps=6, tol=1e30)) == 2  # the first step's change (from h(0) = 0) never counts
        assert len(model(x, steps=1, tol=1e30)) == 1
        assert len(model(x, steps=6, tol=1e-300)) == 6
        assert len(model(x, steps=6)) == 6


def test_early_exit_tolerance_is_validated_and_return_states_is_keyword_only():
    model = tiny()
    x = torch.rand(1, 3, 8, 8)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tol must be None or a finite number > 0"):
            model(x, steps=2, tol=bad)
    for bad in ("1e-3", True, torch.tensor(1e-3)):
        with pytest.raises(TypeError, match="tol must be"):
            model(x, steps=2, tol=bad)
    with pytest.raises(TypeError):
        model(x, 2, True)  # return_states (and tol) are keyword-only


# ---------------------------------------------------------------- mixed precision


class _LastLayerOutsideAutocast(torch.nn.Module):
    """[B, 2 + 2, H, W] -> [B, 3 + 2, H, W]; its last layer runs in float32 even under autocast."""

    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Conv2d(2 + 2, 8, 3, padding=1)
        self.out = torch.nn.Conv2d(8, 3 + 2, 1)

    def forward(self, inputs):
        hidden = torch.relu(self.hidden(inputs))
        with torch.autocast(inputs.device.type, enabled=False):
            return self.out(hidden.float())


def _mixed_precision_models():
    torch.manual_seed(0)
    yield "unet", FeedbackUNet(2, 2, seg_channels=3, width=4, depth=1), torch.rand(2, 2, 8, 8)
    torch.manual_seed(0)
    yield "unet-checkpoint", FeedbackUNet(2, 2, seg_channels=3, width=4, depth=1, bptt="checkpoint"), torch.rand(2, 2, 8, 8)
    torch.manual_seed(0)
    loop = FeedbackLoop(_LastLayerOutsideAutocast(), torch.nn.Conv2d(3, 2, 1), num_classes=2, seg_channels=3)
    yield "float32-last-layer", loop, torch.rand(2, 2, 8, 8)


@pytest.mark.parametrize("name", ["unet", "unet-checkpoint", "float32-last-layer"])
def test_bfloat16_autocast_keeps_the_state_in_float32(name):
    _, model, x = next(m for m in _mixed_precision_models() if m[0] == name)
    y = torch.randint(0, 2, (2, 8, 8))
    reference_logits, reference_states = model(x, steps=3, return_states=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, states = model(x, steps=3, return_states=True)
        loss = step_loss(logits, y)
    loss.backward()
    assert all(h.dtype == torch.float32 for h in states)
    for got, want in zip(states, reference_states):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
    for got, want in zip(logits, reference_logits):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
    for param_name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), param_name


def test_feedforward_unet_with_decay_runs_under_autocast():
    model = FeedforwardUNet(2, 2, seg_channels=3, width=4, depth=1, decay=True)
    x = torch.rand(2, 2, 8, 8)
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------- checkpointed BPTT with a BatchNorm network


class _BatchNormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2 + 2, 6, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(6)
        self.out = torch.nn.Conv2d(6, 3 + 2, 1)

    def forward(self, inputs):
        return self.out(torch.relu(self.norm(self.conv(inputs))))


def _full_and_checkpointed_batchnorm_loops():
    """Two float64 loops with the same weights around a BatchNorm network, full and checkpointed BPTT, and a batch."""
    torch.manual_seed(0)
    full = FeedbackLoop(_BatchNormNet(), torch.nn.Conv2d(3, 2, 1), num_classes=2, seg_channels=3).double()
    ckpt = FeedbackLoop(_BatchNormNet(), torch.nn.Conv2d(3, 2, 1), num_classes=2, seg_channels=3, bptt="checkpoint")
    ckpt.double().load_state_dict(full.state_dict())
    x = torch.rand(3, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 2, (3, 8, 8))
    return full, ckpt, x, y


def test_checkpoint_mode_with_batchnorm_matches_full_mode_and_updates_statistics_once_per_forward():
    full, ckpt, x, y = _full_and_checkpointed_batchnorm_loops()
    full_loss, full_grads = _loss_and_grads(full, x, y, steps=4)
    ckpt_loss, ckpt_grads = _loss_and_grads(ckpt, x, y, steps=4)
    torch.testing.assert_close(ckpt_loss, full_loss, rtol=1e-12, atol=0)
    for name in full_grads:
        torch.testing.assert_close(ckpt_grads[name], full_grads[name], rtol=1e-9, atol=1e-12, msg=name)
    assert int(full.network.norm.num_batches_tracked) == 4
    for name, value in full.network.norm.named_buffers():
        assert torch.equal(getattr(ckpt.network.norm, name), value), name


def test_checkpoint_mode_with_batchnorm_backpropagates_a_retained_graph_twice():
    # Each backward recomputes the checkpointed steps inside the one context checkpoint's context_fn gave at the
    # forward: it must be enterable again (a second loss.backward() used to fail with an AttributeError).
    full, ckpt, x, y = _full_and_checkpointed_batchnorm_loops()
    for model in (full, ckpt):
        loss = step_loss(model(x, steps=3), y)
        loss.backward(retain_graph=True)
        loss.backward()
    for (name, p_full), p_ckpt in zip(full.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p_ckpt.grad, p_full.grad, rtol=1e-9, atol=1e-12, msg=name)
    for name, value in full.network.norm.named_buffers():
        assert torch.equal(getattr(ckpt.network.norm, name), value), name


def test_checkpoint_mode_keeps_only_the_recursion_per_step():
    """Per extra step only h(t) (d channels), v(t), the logits and the loss's log-softmax (k channels each) stay."""
    pytest.importorskip("torch.distributed._tools.mem_tracker")
    x, y = torch.rand(1, 3, 16, 16), torch.randint(0, 2, (1, 16, 16))
    peaks = {}
    for steps in (6, 12):
        torch.manual_seed(0)
        peaks[steps] = _peak_bytes(tiny(width=8, bptt="checkpoint"), x, y, steps)
    per_step = (peaks[12] - peaks[6]) / 6
    recursion = (6 + 3 * 2) * 16 * 16 * 4  # (d + 3k) float32 channels of 16x16 positions
    print(f"checkpoint: {per_step:.0f} bytes per step, recursion {recursion} bytes")
    assert per_step <= 1.1 * recursion


@pytest.mark.parametrize("decay", [True, False])
def test_a_model_built_on_the_meta_device_loads_and_computes_alike(decay):
    # to_empty() leaves every tensor uninitialised and load_state_dict fills the persistent ones only: the identity
    # mix of a model without decay (a non-persistent buffer) must not come from the buffer's values.
    reference = tiny(decay=decay).eval()
    with torch.device("meta"):
        model = tiny(decay=decay)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for buffer in model.buffers():
            buffer.fill_(float("nan") if buffer.is_floating_point() else 0)
    model.load_state_dict(reference.state_dict())
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(model.eval()(x), reference(x), rtol=0, atol=0)


def test_decay_matrices_equal_the_per_step_decay():
    from fbkernels.models import DecayMatrix

    decay = DecayMatrix(6, tau=0.7, learn_rates=True).double()
    with torch.no_grad():
        decay.rate_logits.add_(torch.randn(6, dtype=torch.float64))
    batched = decay.matrices(4)
    assert batched.shape == (4, 6, 6)
    for t in range(4):
        torch.testing.assert_close(batched[t], decay(t), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the authors' variants as options


def _record_network(model):
    """Hook the loop's network: lists of its inputs [x, v(t-1)] and outputs f(t), one per step."""
    seen_inputs, outputs = [], []

    def record(module, args, out):  # returns None: the output is left as it is
        seen_inputs.append(args[0])
        outputs.append(out)

    model.network.register_forward_hook(record)
    return seen_inputs, outputs


def test_fractional_update_factors_against_a_hand_computation():
    from fbkernels.models.feedback import fractional_update_factors

    # c(t) = (1 - (t-1)/T)**0.5 / Gamma(1.5), Gamma(1.5) = sqrt(pi)/2 = 0.886226925..., T = 3.
    assert fractional_update_factors(3) == pytest.approx([1.128379167, 0.921317732, 0.651470015], rel=1e-8)
    assert fractional_update_factors(1) == pytest.approx([1.128379167])
    # The schedule is stretched to each call's T: at T = 10 the fourth step gets sqrt(0.7) / Gamma(1.5).
    assert fractional_update_factors(10)[3] == pytest.approx(0.836660027 / 0.886226925)


@pytest.mark.parametrize("decay", [True, False])
def test_fractional_factor_scales_each_update(decay):
    """h(t) = h(t-1) + c(t) M(t-1) f(t) with the call's T in c; the decay and the feedback are unchanged."""
    from fbkernels.models.feedback import fractional_update_factors

    torch.manual_seed(2)
    model = tiny(update_factor="fractional", decay=decay).double()
    seen_inputs, outputs = _record_network(model)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    for steps in (3, 5):
        seen_inputs.clear(), outputs.clear()
        logits, states = model(x, steps=steps, return_states=True)
        factors = fractional_update_factors(steps)
        previous = torch.zeros_like(states[0])
        for t, (h, f) in enumerate(zip(states, outputs), start=1):
            m = model.decay(t - 1) if decay else torch.eye(6, dtype=torch.float64)
            torch.testing.assert_close(h, previous + factors[t - 1] * torch.einsum("ij,bjhw->bihw", m, f))
            if t > 1:
                torch.testing.assert_close(seen_inputs[t - 1][:, 3:], torch.softmax(previous[:, 4:], dim=1))
            previous = h
    # Against the default model with the same weights: the first update differs by exactly c(1).
    plain = tiny(decay=decay).double()
    plain.load_state_dict(model.state_dict())
    _, plain_states = plain(x, steps=3, return_states=True)
    _, states = model(x, steps=3, return_states=True)
    torch.testing.assert_close(states[0], fractional_update_factors(3)[0] * plain_states[0])
    assert not torch.allclose(states[1], plain_states[1])


def test_authors_normalization_normalises_the_output_and_the_feedback():
    """f = LN_HW(ReLU(BN(UNet(...)))) and v(t) = softmax(LN_HW(h(t)[:, l:])), v(0) = 1/k, computed by hand."""
    torch.manual_seed(4)
    model = tiny(normalization="bn-relu-ln").double()
    assert isinstance(model.network[0], UNet) and model.normalization == "bn-relu-ln"
    unet_outputs = []
    model.network[0].register_forward_hook(lambda module, args, out: unet_outputs.append(out))
    seen_inputs, outputs = _record_network(model)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    _, states = model(x, steps=3, return_states=True)

    def layer_norm_hw(z):  # per (sample, channel) over the 8x8 positions, biased variance, eps 1e-5
        mean = z.mean(dim=(2, 3), keepdim=True)
        var = ((z - mean) ** 2).mean(dim=(2, 3), keepdim=True)
        return (z - mean) / torch.sqrt(var + 1e-5)

    for u, f in zip(unet_outputs, outputs):
        mean = u.mean(dim=(0, 2, 3), keepdim=True)  # BatchNorm in training mode: the batch's statistics
        var = ((u - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        torch.testing.assert_close(f, layer_norm_hw(torch.relu((u - mean) / torch.sqrt(var + 1e-5))))
    torch.testing.assert_close(seen_inputs[0][:, 3:], torch.full((2, 2, 8, 8), 0.5, dtype=torch.float64))
    for t in (1, 2):
        torch.testing.assert_close(seen_inputs[t][:, 3:], torch.softmax(layer_norm_hw(states[t - 1][:, 4:]), dim=1))
    # Every update is M(t-1) f with f normalised: unit variance per channel and image over (H, W).
    torch.testing.assert_close(outputs[0].var(dim=(2, 3), unbiased=False), torch.ones(2, 6, dtype=torch.float64),
                               atol=1e-3, rtol=0)
    # Without softmax the feedback is the normalised state itself, and v(0) = LN(0) = 0.
    no_softmax = tiny(normalization="bn-relu-ln", softmax=False).double()
    seen_inputs, _ = _record_network(no_softmax)
    _, states = no_softmax(x, steps=2, return_states=True)
    assert not seen_inputs[0][:, 3:].any()
    torch.testing.assert_close(seen_inputs[1][:, 3:], layer_norm_hw(states[0][:, 4:]))


def test_independent_decay_init_and_tau():
    import math

    torch.manual_seed(0)
    decay = DecayMatrix(6, tau=0.2, init="independent")
    bound = math.sqrt(6.0 / (6 + 6))  # Xavier uniform's bound for a 6x6 matrix
    assert decay.basis.abs().max() <= bound and decay.basis_inv.abs().max() <= bound
    assert not torch.allclose(decay.basis_inv, decay.basis.t())
    assert not torch.allclose(decay(0), torch.eye(6), atol=0.1)  # M(0) = P P_inv is not the identity
    torch.testing.assert_close(decay(1), math.exp(-5.0) * decay.basis @ decay.basis_inv)  # tau = 0.2: e^{-t/0.2}
    orthogonal = DecayMatrix(6, tau=0.2)
    torch.testing.assert_close(orthogonal(1), math.exp(-5.0) * torch.eye(6), atol=1e-6, rtol=0)
    assert tiny(decay_init="independent").decay.init == "independent"


@pytest.mark.parametrize("options", [
    dict(normalization="bn-relu-ln"),
    dict(update_factor="fractional"),
    dict(decay_init="independent", tau=0.2),
    dict(normalization="bn-relu-ln", update_factor="fractional", decay_init="independent", tau=0.2),
    dict(normalization="bn-relu-ln", bptt="checkpoint"),
])
def test_authors_options_keep_shapes_gradients_and_early_exit(options):
    torch.manual_seed(0)
    model = tiny(**options)
    x, y = torch.rand(2, 3, 12, 12), torch.randint(0, 2, (2, 12, 12))
    logits, states = model(x, steps=3, return_states=True)
    assert [z.shape for z in logits] == [(2, 2, 12, 12)] * 3 and [h.shape for h in states] == [(2, 6, 12, 12)] * 3
    step_loss(logits, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        assert len(model(x, steps=6, tol=1e30)) == 2
        assert len(model(x, steps=10)) == 10 and all(torch.isfinite(z).all() for z in model(x, steps=10))


def test_authors_options_are_validated():
    with pytest.raises(ValueError, match=r"normalization must be one of \['none', 'bn-relu-ln'\], got 'batchnorm'"):
        tiny(normalization="batchnorm")
    with pytest.raises(ValueError, match=r"update_factor must be one of \['none', 'fractional'\], got 'gamma'"):
        tiny(update_factor="gamma")
    with pytest.raises(ValueError, match=r"decay_init must be one of \['orthogonal', 'independent'\], got 'xavier'"):
        tiny(decay_init="xavier")
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="tau must be a finite number > 0"):
            tiny(tau=bad)
    with pytest.raises(TypeError, match="tau must be a finite number > 0, got str"):
        tiny(tau="0.2")
    with pytest.raises(TypeError, match="feedback_layernorm must be a bool"):
        FeedbackLoop(torch.nn.Conv2d(4, 5, 1), torch.nn.Conv2d(3, 2, 1), num_classes=2, seg_channels=3,
                     feedback_layernorm=1)


# ---------------------------------------------------------------- experiment script smoke runs (marker: experiments)


def _experiment_script():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "python" / "feedback_unet.py"
    spec = importlib.util.spec_from_file_location("_experiment_feedback_unet", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


TINY = ["--set", "image_size=16", "--set", "width=2", "--set", "depth=1", "--set", "seg_channels=2",
        "--set", "epochs=1", "--set", "train_size=2", "--set", "test_size=3", "--set", "steps=2",
        "--set", "sigmas=0,4", "--set", "example_sigmas=0,4", "--set", "train_sizes=1,2", "--set", "ablation_sigmas=0",
        "--set", "stability_sigma=4", "--set", "stability_steps=3", "--set", "earlyexit_tols=0.01,1e9",
        "--seeds", "2", "--no-progress", "--threads", "1"]


@pytest.mark.experiments
def test_feedback_unet_experiment_writes_under_runs_by_default(tmp_path, monkeypatch):
    # The committed results in python/results/ are written only when --out names them.
    script = _experiment_script()
    monkeypatch.chdir(tmp_path)
    script.main(["stability", *TINY])
    assert (tmp_path / "runs" / "feedback_unet" / "quick" / "stability.json").is_file()


@pytest.mark.experiments
def test_feedback_unet_experiments_end_to_end_with_tiny_overrides(tmp_path, capsys):
    import json

    script = _experiment_script()
    out = tmp_path / "out"
    for experiment in ("noise", "earlyexit", "trainsize", "ablation", "stability"):
        script.main([experiment, *TINY, "--out", str(out)])
        assert (out / f"{experiment}.png").stat().st_size > 0
    assert (out / "noise_examples.png").exists()
    noise = json.loads((out / "noise.json").read_text())
    assert noise["config"]["t_test"] == 4 and noise["seeds"] == [0, 1]
    for point in noise["points"]:
        for measure in ("f1", "f1_image", "f1_test", "f1_image_test"):
            stats = point[measure]
            assert stats["n"] == 2 and len(stats["runs"]) == 2 and len(stats["ci95"]) == 2
            assert all(0 <= v <= 1 for v in stats["runs"])
        if point["model"] == "feedforward":
            assert point["f1_test"]["runs"] == point["f1"]["runs"]  # one pass: T_test is T_train
    run_files = sorted((out / "runs").glob("feedback-*.json"))
    result = json.loads(run_files[0].read_text())
    assert len(result["f1_per_step"]) == len(result["f1_image_per_step"]) == 4  # steps 1..T_test
    assert result["f1"] == result["f1_per_step"][1] and result["f1_test"] == result["f1_per_step"][3]
    difference = noise["differences"][0]["f1"]
    fb = next(p for p in noise["points"] if p["model"] == "feedback" and p["sigma"] == 0)["f1"]["runs"]
    ff = next(p for p in noise["points"] if p["model"] == "feedforward" and p["sigma"] == 0)["f1"]["runs"]
    assert difference["mean"] == pytest.approx(sum(a - b for a, b in zip(fb, ff)) / 2)

    early = json.loads((out / "earlyexit.json").read_text())
    assert early["fixed_steps"] == 4 and early["tols"] == [0.01, 1e9]
    for point in early["points"]:
        unreachable_low, huge = point["tols"]
        assert huge["passes_per_image"]["runs"] == [2.0, 2.0]  # tol 1e9 stops at the second step
        assert huge["passes_saved_ratio"] == pytest.approx(2.0)
        assert 2 <= unreachable_low["passes_per_image"]["mean"] <= 4
        # Early exit at step 2 predicts what the fixed run predicted at step 2, on the same test images.
    fixed_step2 = {}
    for path in run_files:
        r = json.loads(path.read_text())
        fixed_step2[r["sigma"], r["seed"]] = r["f1_per_step"][1]
    for point in early["points"]:
        expected = [fixed_step2[point["sigma"], s] for s in early["seeds"]]
        assert point["tols"][1]["f1"]["runs"] == pytest.approx(expected)

    trainsize = json.loads((out / "trainsize.json").read_text())
    assert trainsize["seeds"] == [0, 1]
    smallest = trainsize["smallest_train_size_beating_random"]["feedback"]
    assert set(smallest) >= {"per_seed", "mean", "min", "max", "smallest_ci_lower_above_random"}
    ablation = json.loads((out / "ablation.json").read_text())
    full = next(p for p in ablation["points"] if p["model"] == "feedback" and p["variant"] == "decay+softmax")
    assert full["f1_minus_full_feedback"]["mean"] == 0.0
    stability = json.loads((out / "stability.json").read_text())
    assert {p["step"] for p in stability["points"]} == {1, 2, 3}
    assert "f1_last_minus_f1_at_training_T" in stability["summary"]["decay+softmax"]
    printed = capsys.readouterr().out
    assert "| sigma | tol |" in printed and "target (mean)" in printed


@pytest.mark.experiments
def test_feedback_unet_authors_options_from_the_command_line(tmp_path):
    import json

    script = _experiment_script()
    out = tmp_path / "authors"
    script.main(["noise", *TINY, "--set", "sigmas=4", "--set", "example_sigmas=4", "--seeds", "1",
                 "--set", "normalization=bn-relu-ln", "--set", "update_factor=fractional",
                 "--set", "decay_init=independent", "--set", "tau=0.2", "--set", "test_steps=3", "--out", str(out)])
    noise = json.loads((out / "noise.json").read_text())
    assert noise["config"]["normalization"] == "bn-relu-ln" and noise["config"]["t_test"] == 3
    weights = torch.load(next((out / "runs").glob("feedback-*.weights.pt")))
    assert "network.1.running_mean" in weights  # the BatchNorm after the U-Net
    for bad, message in (("normalization=layer", "normalization: expected one of"),
                         ("update_factor=x", "update_factor: expected one of"),
                         ("tau=0", "tau: expected a positive"), ("test_steps=0", "test_steps: expected an int >= 1")):
        with pytest.raises(ValueError, match=message):
            script.override(script.PRESETS["quick"], [bad])
    assert script.override(script.PRESETS["quick"], ["test_steps=none"]).t_test == 10
    assert script.override(script.PRESETS["quick"], ["earlyexit_tols=1e-3,0.5"]).earlyexit_tols == (0.001, 0.5)
    # Fields that only choose runs leave the cache key alone; fields that make a run change it.
    quick = script.PRESETS["quick"]
    assert script.preset_hash(script.override(quick, ["sigmas=0", "seeds=3", "earlyexit_tols=0.1"])) == script.preset_hash(quick)
    assert script.preset_hash(script.override(quick, ["tau=0.2"])) != script.preset_hash(quick)


def test_feedback_unet_counts_below_one_are_refused_and_float_fields_take_floats(capsys):
    # --seeds 0 and --threads 0 fell back to the preset's seeds and torch's threads without a word, --set
    # trainsize_seeds=0 to --seeds; a negative count ran no seed. stability_sigma, a float field holding 6, refused 6.5.
    script = _experiment_script()
    for argv, message in ((["--seeds", "0"], "--seeds must be >= 1, got 0"),
                          (["--seeds", "-2"], "--seeds must be >= 1, got -2"),
                          (["--threads", "0"], "--threads must be >= 1, got 0"),
                          (["--set", "seeds=0"], "--set seeds: expected an int >= 1, got '0'"),
                          (["--set", "trainsize_seeds=0"], "--set trainsize_seeds: expected an int >= 1, got '0'")):
        with pytest.raises(SystemExit):
            script.parse_args(["noise", *argv])
        assert message in capsys.readouterr().err
    _, preset = script.parse_args(["stability", "--set", "stability_sigma=6.5"])
    assert preset.stability_sigma == 6.5
    with pytest.raises(ValueError, match="stability_sigma: expected float, got 'x'"):
        script.override(script.PRESETS["quick"], ["stability_sigma=x"])


def test_feedback_unet_settings_that_failed_after_training_are_refused_at_once():
    script = _experiment_script()
    # T_test below the training T: its last step was reported as the F1 at T, and the example grid failed.
    for sets in (["test_steps=3"], ["test_steps=3", "steps=4"], ["steps=4", "test_steps=3"]):
        with pytest.raises(ValueError, match=r"test_steps: expected none or an int >= steps \((5|4)\), got 3"):
            script.override(script.PRESETS["quick"], sets)
    assert script.override(script.PRESETS["quick"], ["steps=4", "test_steps=4"]).t_test == 4
    # An empty list: sigmas= failed with an IndexError before training.
    for field in ("sigmas", "train_sizes", "ablation_sigmas", "example_sigmas", "earlyexit_tols"):
        with pytest.raises(ValueError, match=f"--set {field}: expected a comma list of at least one number, got ''"):
            script.override(script.PRESETS["quick"], [f"{field}="])
    # A tol <= 0 failed in FeedbackLoop only after earlyexit had trained every noise run.
    for bad in ("earlyexit_tols=0.1,-1", "earlyexit_tols=0", "earlyexit_tols=inf"):
        with pytest.raises(ValueError, match="earlyexit_tols: expected positive finite numbers"):
            script.override(script.PRESETS["quick"], [bad])


def test_run_lock_excludes_a_second_holder(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    script = _experiment_script()
    path = tmp_path / "run.lock"
    with script.run_lock(path):
        with open(path) as other:  # a second open file description: what another process would hold
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(path) as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on exit


@pytest.mark.experiments
def test_runs_trained_in_parallel_jobs_equal_the_sequential_ones(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = _experiment_script()
    script.main(["noise", *TINY, "--out", str(tmp_path / "sequential")])
    path = Path(__file__).resolve().parents[1] / "python" / "feedback_unet.py"
    subprocess.run([sys.executable, str(path), "noise", *TINY, "--jobs", "2", "--out", str(tmp_path / "jobs")],
                   check=True, capture_output=True)
    sequential, jobs = (json.loads((tmp_path / name / "noise.json").read_text())["points"]
                        for name in ("sequential", "jobs"))
    assert [p["f1_runs"] for p in sequential] == [p["f1_runs"] for p in jobs]
    with pytest.raises(SystemExit):
        script.main(["noise", *TINY, "--jobs", "0", "--out", str(tmp_path / "bad")])


@pytest.mark.experiments
def test_feedback_unet_train_seconds_count_the_epochs_of_an_interrupted_call(tmp_path, monkeypatch):
    # A run resumed from its checkpoint reported only the resumed epochs' time.
    import json
    import time

    script = _experiment_script()
    real_fit = script.train.fit

    def interrupted_after_one_epoch(model, data, **kwargs):
        def slow_loss(output, target):
            time.sleep(0.5)  # per batch: the interrupted call's epoch takes >= 0.5 s
            return kwargs["loss_fn"](output, target)

        real_fit(model, data, **{**kwargs, "epochs": 1, "loss_fn": slow_loss})
        raise KeyboardInterrupt

    argv = ["stability", *TINY, "--seeds", "1", "--set", "epochs=2", "--out", str(tmp_path / "out")]
    with monkeypatch.context() as patch:
        patch.setattr(script.train, "fit", interrupted_after_one_epoch)
        with pytest.raises(KeyboardInterrupt):
            script.main(argv)
    script.main(argv)
    results = [json.loads(path.read_text()) for path in (tmp_path / "out" / "runs").glob("*.json")]
    assert results and all(len(r["train_loss"]) == 2 for r in results)
    # The run that was interrupted counts its first epoch; the others trained in the second call alone.
    assert sorted(r["train_seconds"] >= 0.5 for r in results) == [False] * (len(results) - 1) + [True]
