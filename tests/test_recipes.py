"""Issue 26 item 6, the pieces: RMSprop, OneCycle, ReduceLROnPlateau and per-step cosine,
gradient clipping by norm and by value, and the weight EMA, each against PyTorch (float64,
several steps, tight tolerance) where torch is installed, on every backend; their state round
trips and resumes bit for bit on NumPy and array-api-strict. (The Trainer and the CLI with them:
tests/test_recipes_train.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest

import anycnn
from anycnn import layers as L
from anycnn import optim
from anycnn.errors import CheckpointError, ConfigError
from anycnn.nn import Parameter
from anycnn.optim import EMA, Cosine, OneCycle, ReduceLROnPlateau, RMSprop
from anycnn.optim.schedules import interval_of, make_schedule

TOL = dict(rtol=1e-12, atol=1e-14)
SHAPES = [(3, 4), (5,), (2, 3, 2)]


def host(a):
    return np.asarray(anycnn.to_numpy(a.data if isinstance(a, Parameter) else a))


def make_params(rng):
    return [Parameter(anycnn.asarray(rng.standard_normal(s))) for s in SHAPES]


def exact(backend) -> bool:
    """Bit-identical results are promised on NumPy and array-api-strict (NumPy underneath)."""
    return backend.name in ("numpy", "array_api_strict")


# --------------------------------------------------------------------------------------------
# RMSprop

RMSPROP = {
    "default": {},
    "momentum": {"momentum": 0.9},
    "centered": {"centered": True},
    "all": {"alpha": 0.9, "eps": 1e-6, "weight_decay": 1e-2, "momentum": 0.5, "centered": True},
}


@pytest.mark.parametrize("name", sorted(RMSPROP))
def test_rmsprop_follows_torch(backend, rng, name):
    torch = pytest.importorskip("torch")
    options = RMSPROP[name]
    ps = make_params(rng)
    refs = [torch.tensor(host(p), requires_grad=True) for p in ps]
    opt = RMSprop(ps, lr=0.01, **options)
    ref = torch.optim.RMSprop(refs, lr=0.01, **options)
    _steps_match_torch(torch, opt, ref, ps, refs, rng, 6)
    assert not np.array_equal(host(ps[0]), host(make_params(np.random.default_rng(1234))[0]))


def test_rmsprop_groups_follow_torch(backend, rng):
    torch = pytest.importorskip("torch")
    ps = make_params(rng)
    refs = [torch.tensor(host(p), requires_grad=True) for p in ps]
    options = [{"lr": 0.003, "momentum": 0.9}, {"centered": True, "alpha": 0.8},
               {"weight_decay": 0.1}]
    opt = RMSprop([{"params": [p], **o} for p, o in zip(ps, options)], lr=0.01)
    ref = torch.optim.RMSprop([{"params": [r], **o} for r, o in zip(refs, options)], lr=0.01)
    _steps_match_torch(torch, opt, ref, ps, refs, rng, 5)


def _steps_match_torch(torch, opt, ref, ps, refs, rng, steps: int) -> None:
    """``steps`` optimizer steps of ``opt`` (anycnn) and ``ref`` (torch) with the same random
    gradients; the parameters ``ps`` and ``refs`` agree after them."""
    for _ in range(steps):
        for p, r in zip(ps, refs):
            g = rng.standard_normal(p.shape)
            p.grad, r.grad = anycnn.asarray(g), torch.tensor(g)
        opt.step()
        ref.step()
    for p, r in zip(ps, refs):
        np.testing.assert_allclose(host(p), r.detach().numpy(), **TOL)


@pytest.mark.parametrize("name", ["momentum", "all"])
def test_rmsprop_state_round_trip_resumes_exactly(backend, rng, name):
    grads = [[rng.standard_normal(s) for s in SHAPES] for _ in range(6)]
    start = [rng.standard_normal(s) for s in SHAPES]

    def run(ps, opt, steps):
        for gs in steps:
            for p, g in zip(ps, gs):
                p.grad = anycnn.asarray(g)
            opt.step()

    ps = [Parameter(anycnn.asarray(w)) for w in start]
    straight = RMSprop(ps, lr=0.01, **RMSPROP[name])
    run(ps, straight, grads)

    first = [Parameter(anycnn.asarray(w)) for w in start]
    opt = RMSprop(first, lr=0.01, **RMSPROP[name])
    run(first, opt, grads[:3])
    state = opt.state_dict()
    saved = {k: anycnn.to_numpy(v).copy() for k, v in state["arrays"].items()}
    expected = {"square_avg", "momentum_buffer"} | ({"grad_avg"} if name == "all" else set())
    assert {k.split(".", 1)[1] for k in saved} == expected

    resumed = [Parameter(anycnn.asarray(host(p))) for p in first]
    other = RMSprop(resumed, lr=0.5)  # other options: restored from the state
    other.load_state_dict({**state, "arrays": saved})
    assert other.param_groups[0]["momentum"] == RMSPROP[name]["momentum"]
    run(resumed, other, grads[3:])
    for a, b in zip(resumed, ps):
        if exact(backend):
            np.testing.assert_array_equal(host(a), host(b))
        else:
            np.testing.assert_allclose(host(a), host(b), rtol=1e-12)


@pytest.mark.parametrize("options, message", [
    ({"alpha": 1.0}, r"alpha must be a number in \[0, 1\)"),
    ({"alpha": -0.1}, "alpha"),
    ({"eps": 0.0}, "eps must be a finite number > 0"),
    ({"momentum": -1}, "momentum must be a finite number >= 0"),
    ({"weight_decay": math.nan}, "weight_decay"),
    ({"lr": 0}, "learning rate must be"),
])
def test_rmsprop_refuses_bad_options(backend, rng, options, message):
    with pytest.raises(ConfigError, match=message):
        RMSprop(make_params(rng), **options)


def test_rmsprop_is_an_optimizer_name(backend):
    from anycnn.optim.optimizers import OPTIMIZERS

    assert OPTIMIZERS["rmsprop"] is RMSprop


# --------------------------------------------------------------------------------------------
# schedules


def torch_lrs(torch, make_scheduler, steps, metrics=None):
    """The learning rate of each of ``steps`` steps of a torch scheduler."""
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    scheduler = make_scheduler(opt)
    out = []
    for i in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step(*([] if metrics is None else [metrics[i]]))
    return out


@pytest.mark.parametrize("options", [
    {}, {"three_phase": True}, {"anneal_strategy": "linear", "pct_start": 0.25},
    {"div_factor": 10.0, "final_div_factor": 100.0, "pct_start": 0.5},
], ids=["default", "three-phase", "linear", "factors"])
def test_onecycle_follows_torch(options):
    torch = pytest.importorskip("torch")
    want = torch_lrs(torch, lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.4, total_steps=37, cycle_momentum=False, **options), 37)
    ours = OneCycle(0.4, total_steps=37, **options)
    assert interval_of(ours) == "step"
    np.testing.assert_allclose([ours(t) for t in range(37)], want, rtol=1e-14, atol=0)
    by_epochs = OneCycle(0.4, epochs=3, steps_per_epoch=12, **options)
    want = torch_lrs(torch, lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.4, epochs=3, steps_per_epoch=12, cycle_momentum=False, **options), 36)
    np.testing.assert_allclose([by_epochs(t) for t in range(36)], want, rtol=1e-14, atol=0)


def test_onecycle_shape_and_limits():
    sched = OneCycle(1.0, total_steps=100)
    lrs = [sched(t) for t in range(100)]
    assert lrs[0] == pytest.approx(1 / 25) and max(lrs) == pytest.approx(1.0)
    assert int(np.argmax(lrs)) == 29 and lrs[-1] == pytest.approx(1 / 25 / 1e4)
    sched(100)  # one past the last step, as PyTorch
    with pytest.raises(ConfigError, match="step 101 of a 100-step cycle"):
        sched(101)
    with pytest.raises(ConfigError, match="covers 100 steps, but the run would train 120"):
        sched.check_steps(120)
    with pytest.raises(ConfigError, match="needs total_steps, or epochs and steps_per_epoch"):
        OneCycle(1.0)
    with pytest.raises(ConfigError, match="pct_start"):
        OneCycle(1.0, 10, pct_start=1.5)
    with pytest.raises(ConfigError, match="anneal_strategy"):
        OneCycle(1.0, 10, anneal_strategy="exp")


def test_cosine_per_step_follows_torch_stepped_per_batch():
    torch = pytest.importorskip("torch")
    want = torch_lrs(torch, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(
        o, T_max=30, eta_min=0.01), 40)
    ours = Cosine(0.1, min_lr=0.01, total_steps=30)
    assert interval_of(ours) == "step" and interval_of(Cosine(0.1, 3)) == "epoch"
    # torch's recursive form and the closed form differ in the last bits only
    np.testing.assert_allclose([ours(t) for t in range(31)], want[:31], rtol=1e-12, atol=1e-15)
    assert ours(39) == 0.01  # held at min_lr after the end (torch's form goes up again)
    with pytest.raises(ConfigError, match=r"total_epochs .* or total_steps"):
        Cosine(0.1)
    with pytest.raises(ConfigError, match=r"total_epochs .* or total_steps"):
        Cosine(0.1, 3, total_steps=30)


PLATEAU = {
    "default-patience-1": {"patience": 1},
    "cooldown-threshold": {"patience": 2, "cooldown": 2, "threshold": 0.05},
    "max-abs-min-lr": {"mode": "max", "patience": 0, "threshold_mode": "abs", "threshold": 0.01,
                       "min_lr": 0.002},
    "eps": {"patience": 0, "factor": 0.5, "min_lr": 0.0999, "eps": 1e-3},
}
METRICS = [1.0, 0.9, 0.95, 0.96, 0.97, 0.89, 0.9, 0.91, 0.92, 0.93, 0.94, 0.95, 0.5, 0.6, 0.7,
           0.8, 0.9, 1.0, math.nan, 0.4]


@pytest.mark.parametrize("name", sorted(PLATEAU))
def test_reduce_on_plateau_follows_torch(name):
    torch = pytest.importorskip("torch")
    options = PLATEAU[name]
    want = torch_lrs(torch, lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, **options),
                     len(METRICS), METRICS)
    sched = ReduceLROnPlateau(0.1, **options)
    history = [{"epoch": e + 1, "val_loss": v} for e, v in enumerate(METRICS)]
    # the rate of epoch e folds the records of the epochs before it, whatever else is there
    assert [sched(e, history) for e in range(len(METRICS))] == want
    assert len(set(want)) > 1 or name == "eps"  # eps: every reduction is too small to apply


def test_reduce_on_plateau_reads_its_monitor_and_checks_options():
    sched = ReduceLROnPlateau(1.0, monitor="val_accuracy", mode="max", patience=0)
    history = [{"epoch": 1, "val_accuracy": 0.5, "val_loss": 9.0},
               {"epoch": 2, "val_accuracy": 0.4, "val_loss": 1.0}]
    assert sched(1, history) == 1.0 and sched(2, history) == pytest.approx(0.1)
    assert sched.reads_history and interval_of(sched) == "epoch"
    for bad, message in [({"mode": "auto"}, "mode must be 'min' or 'max'"),
                         ({"factor": 1.0}, r"factor must be in \(0, 1\)"),
                         ({"patience": -1}, "patience must be an integer >= 0"),
                         ({"threshold_mode": "pct"}, "threshold_mode")]:
        with pytest.raises(ConfigError, match=message):
            ReduceLROnPlateau(1.0, **bad)


def test_make_schedule_knows_the_new_names():
    assert make_schedule("onecycle", 0.1, 3, steps_per_epoch=5) == OneCycle(
        0.1, epochs=3, steps_per_epoch=5)
    assert make_schedule("cosine-per-step", 0.1, 3, steps_per_epoch=5) == Cosine(
        0.1, total_steps=15)
    plateau = make_schedule("plateau", 0.1, 3, monitor="val_accuracy", patience=4)
    assert (plateau.mode, plateau.patience, plateau.monitor) == ("max", 4, "val_accuracy")
    with pytest.raises(ConfigError, match="needs steps_per_epoch"):
        make_schedule("onecycle", 0.1, 3)


# --------------------------------------------------------------------------------------------
# gradient clipping


def with_grads(rng, scale=3.0):
    ps = make_params(rng)
    grads = [scale * rng.standard_normal(s) for s in SHAPES]
    for p, g in zip(ps, grads):
        p.grad = anycnn.asarray(g)
    return ps, grads


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf, "inf"])
@pytest.mark.parametrize("max_norm", [1.5, 1e3])
def test_clip_grad_norm_follows_torch(backend, rng, norm_type, max_norm):
    torch = pytest.importorskip("torch")
    ps, grads = with_grads(rng)
    refs = [torch.tensor(host(p), requires_grad=True) for p in ps]
    for r, g in zip(refs, grads):
        r.grad = torch.tensor(g)
    ps[1].grad = refs[1].grad = None  # no gradient: left out
    total = optim.clip_grad_norm_(ps, max_norm, norm_type)
    want = torch.nn.utils.clip_grad_norm_(refs, max_norm, float(norm_type))
    assert anycnn.backend.backend_label(total) == backend.name  # a device array: no host read
    np.testing.assert_allclose(float(anycnn.to_numpy(total)), want.item(), **TOL)
    for p, r in zip(ps, refs):
        if r.grad is None:
            assert p.grad is None
        else:
            np.testing.assert_allclose(host(p.grad), r.grad.numpy(), **TOL)
    clipped = float(anycnn.to_numpy(optim.grad_norm(ps, norm_type)))
    assert clipped == pytest.approx(min(max_norm, want.item()), rel=1e-5)


def test_clip_grad_value_follows_torch(backend, rng):
    torch = pytest.importorskip("torch")
    ps, grads = with_grads(rng)
    refs = [torch.tensor(host(p), requires_grad=True) for p in ps]
    for r, g in zip(refs, grads):
        r.grad = torch.tensor(g)
    optim.clip_grad_value_(ps, 0.7)
    torch.nn.utils.clip_grad_value_(refs, 0.7)
    for p, r in zip(ps, refs):
        np.testing.assert_array_equal(host(p.grad), r.grad.numpy())
    assert max(np.abs(host(p.grad)).max() for p in ps) == 0.7


def test_clipping_takes_a_model_and_refuses_bad_input(backend, rng):
    model = anycnn.Sequential(L.Dense(4, 3), L.ReLU(), L.Dense(3, 2))
    for p in model.parameters():
        p.grad = anycnn.asarray(np.full(p.shape, 10.0, dtype=np.float32))
    total = optim.clip_grad_norm_(model, 1.0)
    assert float(anycnn.to_numpy(total)) == pytest.approx(10.0 * math.sqrt(4 * 3 + 3 + 3 * 2 + 2))
    assert float(anycnn.to_numpy(optim.grad_norm(model))) == pytest.approx(1.0, rel=1e-5)
    assert anycnn.backend.dtype_name(model[0].weight.grad) == "float32"
    assert optim.clip_grad_norm_([Parameter(anycnn.asarray(np.zeros(2)))], 1.0) == 0.0
    with pytest.raises(ConfigError, match="max_norm must be a finite number > 0"):
        optim.clip_grad_norm_(model, 0)
    with pytest.raises(ConfigError, match="clip_value must be a finite number > 0"):
        optim.clip_grad_value_(model, -1)
    with pytest.raises(ConfigError, match="norm_type"):
        optim.clip_grad_norm_(model, 1.0, norm_type=0)
    with pytest.raises(ConfigError, match="expects Parameters, got ndarray"):
        optim.clip_grad_norm_([np.zeros(3)], 1.0)
    p = Parameter(anycnn.asarray(np.zeros(2)))
    p.grad = anycnn.asarray(np.array([np.inf, 1.0]))
    with pytest.raises(anycnn.errors.TrainingError, match="total norm of the gradients is inf"):
        optim.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)


# --------------------------------------------------------------------------------------------
# EMA


def small_model():
    return anycnn.Sequential(L.Conv2D(1, 3, 3), L.BatchNorm2D(3), L.ReLU(), L.Flatten(),
                             L.Dense(2 * 2 * 3, 2))


def perturb(model, rng):
    """What an optimizer step and a training forward do: new weights and BN statistics."""
    for p in model.parameters():
        p.data = p.data + anycnn.asarray(rng.standard_normal(p.shape), dtype="float64")
    bn = model[1]
    bn.running_mean = bn.running_mean + anycnn.asarray(rng.standard_normal(3), dtype="float64")
    bn.running_var = bn.running_var + anycnn.asarray(rng.random(3), dtype="float64")


@pytest.mark.parametrize("decay", [0.9, 0.5])
def test_ema_follows_torch_averaged_model(backend, rng, decay):
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = small_model().to("float64")
    tensors = {k: torch.tensor(np.asarray(anycnn.to_numpy(v))) for k, v in
               model.state_dict().items()}

    class Holder(torch.nn.Module):  # the same tensors in a torch module
        def __init__(self):
            super().__init__()
            for k, v in tensors.items():
                if "running" in k:
                    self.register_buffer(k.replace(".", "_"), v.clone())
                else:
                    setattr(self, k.replace(".", "_"), torch.nn.Parameter(v.clone()))

    held = Holder()
    ref = AveragedModel(held, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema = EMA(model, decay)
    for _ in range(5):
        perturb(model, rng)
        with torch.no_grad():
            for k, v in model.state_dict().items():
                getattr(held, k.replace(".", "_")).copy_(torch.tensor(np.asarray(
                    anycnn.to_numpy(v))))
        ema.update()
        ref.update_parameters(held)
    assert ema.updates == 5
    ref_state = dict(ref.module.named_parameters()) | dict(ref.module.named_buffers())
    for k, v in ema.averages.items():
        np.testing.assert_allclose(host(v), ref_state[k.replace(".", "_")].detach().numpy(),
                                   rtol=1e-13, atol=1e-15)


def test_ema_applied_swaps_without_copies_and_restores(backend, rng):
    model = small_model().to("float64")
    ema = EMA(model, 0.5)
    before = {k: host(v).copy() for k, v in model.state_dict().items()}
    perturb(model, rng)
    ema.update()  # the first update copies
    trained = {k: host(v).copy() for k, v in model.state_dict().items()}
    perturb(model, rng)
    ema.update()
    now = dict(model.state_dict())
    averages = {k: host(v).copy() for k, v in ema.averages.items()}
    for k in averages:  # halfway between the two states
        np.testing.assert_allclose(averages[k], (trained[k] + host(now[k])) / 2, rtol=1e-14)
        assert not np.array_equal(averages[k], before[k])
    with ema.applied() as inside:
        assert inside is model
        for k, v in model.state_dict().items():
            np.testing.assert_array_equal(host(v), averages[k])
    for k, v in model.state_dict().items():
        assert v is now[k]  # the very arrays: nothing copied, nothing changed


def test_ema_warmup_and_state_round_trip(backend, rng):
    model = small_model().to("float64")
    ema = EMA(model, 0.999, warmup=True)
    assert [round(ema.current_decay(), 6)] == [round(2 / 11, 6)]
    perturb(model, rng)
    ema.update()
    perturb(model, rng)
    ema.update()
    assert ema.current_decay() == pytest.approx(4 / 13)
    state = ema.state_dict()
    saved = {**state, "arrays": {k: anycnn.to_numpy(v).copy() for k, v in state["arrays"].items()}}
    other = EMA(small_model().to("float64"), 0.5)
    other.model.load_state_dict(model.state_dict())
    other.load_state_dict(saved)
    assert (other.decay, other.warmup, other.updates) == (0.999, True, 2)
    for _ in range(2):
        perturb(model, np.random.default_rng(5))
    perturb(other.model, np.random.default_rng(5))
    perturb(other.model, np.random.default_rng(5))
    ema.update()
    other.update()
    for k, v in ema.averages.items():
        if exact(backend):
            np.testing.assert_array_equal(host(other.averages[k]), host(v))
        else:
            np.testing.assert_allclose(host(other.averages[k]), host(v), rtol=1e-13)


def test_ema_refuses_bad_input(backend):
    model = small_model()
    for decay in (1.0, -0.1, "0.9", True):
        with pytest.raises(ConfigError, match=r"decay must be a number in \[0, 1\)"):
            EMA(model, decay)
    with pytest.raises(ConfigError, match="averages a model"):
        EMA([p for p in model.parameters()], 0.9)
    ema = EMA(model, 0.9)
    state = ema.state_dict()
    with pytest.raises(CheckpointError, match="does not fit this model"):
        EMA(anycnn.Sequential(L.Flatten(), L.Dense(4, 2)), 0.9).load_state_dict(state)
    bad = {**state, "arrays": {**state["arrays"], "4.weight": np.zeros((3, 3))}}
    with pytest.raises(CheckpointError, match=r"EMA tensor '4.weight' has shape \(3, 3\)"):
        ema.load_state_dict(bad)
    with pytest.raises(CheckpointError, match="malformed EMA state"):
        ema.load_state_dict({"decay": 0.5})
    assert ema.updates == 0 and ema.decay == 0.9  # nothing changed


def test_ema_copy_to_another_model(backend, rng):
    model = small_model().to("float64")
    ema = EMA(model, 0.9)
    perturb(model, rng)
    ema.update()
    perturb(model, rng)
    ema.update()
    target = ema.copy_to(small_model().to("float64"))
    for k, v in target.state_dict().items():
        np.testing.assert_array_equal(host(v), host(ema.averages[k]))
        assert v is not ema.averages[k]
