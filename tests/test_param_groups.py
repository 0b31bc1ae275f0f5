"""Parameter groups of SGD, Adam and AdamW: per-group hyperparameters equal separate optimizers
and torch.optim with the same groups (float64), ``optimizer.lr`` and schedules scale every group
from its own initial lr, the no-decay and discriminative-rate helpers pick exactly the right
parameters, bad groups are refused with the reason, and the state round-trips (old single-group
states included)."""

from __future__ import annotations

import numpy as np
import pytest

import anycnn
from anycnn import layers as L
from anycnn import optim
from anycnn.data.dataloader import DataLoader
from anycnn.data.datasets import load_dataset
from anycnn.errors import CheckpointError, ConfigError
from anycnn.nn import Module, Parameter, Sequential
from anycnn.optim.schedules import StepDecay
from anycnn.train import Trainer
from anycnn.train.callbacks import Callback

SHAPES = [(3, 4), (4,), (2, 2, 3), (5,)]


def params(rng, shapes=SHAPES):
    return [Parameter(anycnn.asarray(rng.standard_normal(s), dtype="float64")) for s in shapes]


def host(p):
    return anycnn.to_numpy(p.data).copy()


def set_grads(ps, grads):
    for p, g in zip(ps, grads):
        p.grad = anycnn.asarray(g, dtype="float64")


def copies(ps):
    return [Parameter(anycnn.asarray(host(p), dtype="float64")) for p in ps]


# --------------------------------------------------------------------------------------------
# construction


def test_a_list_of_parameters_is_one_group_with_the_defaults(backend, rng):
    ps = params(rng)
    opt = optim.SGD(ps, lr=0.1, momentum=0.9)
    (group,) = opt.param_groups
    assert group["params"] == ps and opt.params == ps
    assert {k: v for k, v in group.items() if k != "params"} == {
        "lr": 0.1, "initial_lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0}
    assert opt.defaults == {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0}
    assert opt.lr == 0.1


def test_groups_take_missing_keys_from_the_constructor(backend, rng):
    ps = params(rng)
    opt = optim.Adam([{"params": ps[:2], "name": "body"},
                      {"params": ps[2:], "lr": 0.5, "betas": (0.8, 0.9), "weight_decay": 0.1}],
                     lr=0.01, eps=1e-6)
    body, head = opt.param_groups
    assert body == {"params": ps[:2], "name": "body", "lr": 0.01, "initial_lr": 0.01,
                    "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0}
    assert head == {"params": ps[2:], "lr": 0.5, "initial_lr": 0.5, "betas": (0.8, 0.9),
                    "eps": 1e-6, "weight_decay": 0.1}
    assert opt.params == ps  # the groups' parameters in order: the state's indices
    assert optim.AdamW([{"params": ps}]).param_groups[0]["weight_decay"] == 0.01


def test_a_generator_and_a_single_group_dict_are_accepted(backend, rng):
    ps = params(rng)
    assert optim.SGD((p for p in ps), lr=0.1).params == ps
    assert optim.SGD({"params": ps, "lr": 0.2}, lr=0.1).param_groups[0]["lr"] == 0.2
    assert optim.SGD([{"params": ps[0]}], lr=0.1).params == [ps[0]]  # one Parameter


def test_a_parameter_listed_twice_in_one_group_is_stepped_once(backend, rng):
    (p,) = params(rng, [(3,)])
    w0 = host(p)
    opt = optim.SGD([p, p], lr=0.5)
    assert opt.params == [p]
    g = rng.standard_normal(3)
    set_grads([p], [g])
    opt.step()
    np.testing.assert_array_equal(host(p), w0 - 0.5 * g)


@pytest.mark.parametrize(("make", "message"), [
    (lambda ps: optim.SGD([{"params": ps[:2]}, {"params": ps[1:]}], lr=0.1),
     r"a Parameter of shape \(4,\) is in parameter group 0 and in parameter group 1"),
    (lambda ps: optim.SGD([{"params": ps, "momentun": 0.9}], lr=0.1),
     r"SGD parameter group 0 has unknown key\(s\) 'momentun'; a group may hold 'params', "
     r"'lr', 'name', 'momentum', 'nesterov', 'weight_decay'"),
    (lambda ps: optim.Adam([{"params": ps, "momentum": 0.9}]),
     r"Adam parameter group 0 has unknown key\(s\) 'momentum'"),
    (lambda ps: optim.SGD([{"params": ps[:1]}, {"params": [], "name": "head"}], lr=0.1),
     r"SGD parameter group 1 \('head'\) has no parameters"),
    (lambda ps: optim.SGD([{"lr": 0.1}], lr=0.1), "parameter group 0 has no 'params' key"),
    (lambda ps: optim.SGD([{"params": [ps[0], np.zeros(3)]}], lr=0.1),
     "SGD parameter group 0 expects Parameters, got ndarray at position 1"),
    (lambda ps: optim.SGD([ps[0], "w"], lr=0.1), "SGD expects Parameters, got str at position 1"),
    (lambda ps: optim.SGD(3, lr=0.1), "SGD takes an iterable of Parameters, got int"),
    (lambda ps: optim.SGD(ps[0], lr=0.1), "got one Parameter; wrap it in a list"),
    (lambda ps: optim.SGD(L.Dense(2, 2), lr=0.1), r"not the model: pass model.parameters\(\)"),
    (lambda ps: optim.SGD([ps[0], {"params": ps[1:]}], lr=0.1), "not a mix of both"),
    (lambda ps: optim.SGD(set(ps), lr=0.1), "a set have no fixed order"),
    (lambda ps: optim.SGD([], lr=0.1), "empty parameter list"),
    (lambda ps: optim.SGD([{"params": ps, "name": 3}], lr=0.1), "'name' must be a string"),
    (lambda ps: optim.SGD([{"params": ps, "name": "head", "momentum": -1}], lr=0.1),
     r"SGD parameter group 0 \('head'\): momentum must be a finite number >= 0, got -1"),
    (lambda ps: optim.SGD([{"params": ps, "nesterov": True}], lr=0.1),
     r"parameter group 0: nesterov=True needs a momentum > 0"),
    (lambda ps: optim.SGD([{"params": ps, "lr": 0}], lr=0.1),
     "parameter group 0: learning rate must be a finite number > 0, got 0"),
    (lambda ps: optim.AdamW([{"params": ps, "betas": (0.9, 1.0)}]),
     r"AdamW parameter group 0: AdamW beta2 must be in \[0, 1\)"),
    (lambda ps: optim.Adam([{"params": ps, "betas": 0.9}]), "betas must be a pair of numbers"),
    (lambda ps: optim.Adam([{"params": ps, "eps": float("nan")}]), "eps must be a finite"),
], ids=["two-groups", "unknown-key", "key-of-another-optimizer", "empty-group", "no-params",
        "array-in-group", "not-a-parameter", "not-iterable", "one-parameter", "a-module", "mix",
        "set", "empty", "name", "group-momentum", "group-nesterov", "group-lr", "group-betas",
        "betas-not-a-pair", "group-eps"])
def test_bad_groups_are_refused_with_the_reason(backend, rng, make, message):
    with pytest.raises(ConfigError, match=message):
        make(params(rng))


# --------------------------------------------------------------------------------------------
# per-group updates


GROUPED = {  # (optimizer, constructor options, the two groups' own options)
    "sgd": (optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2},
            [{"lr": 0.01}, {"weight_decay": 0.0, "momentum": 0.5, "nesterov": True}]),
    "adam": (optim.Adam, {"lr": 0.01, "weight_decay": 1e-3},
             [{"lr": 0.003, "betas": (0.8, 0.99)}, {"weight_decay": 0.0, "eps": 1e-6}]),
    "adamw": (optim.AdamW, {"lr": 0.01, "weight_decay": 0.05},
              [{"lr": 0.02}, {"weight_decay": 0.0}]),
}


@pytest.mark.parametrize("name", sorted(GROUPED))
def test_groups_equal_separate_optimizers(backend, rng, name):
    cls, defaults, options = GROUPED[name]
    ps = params(rng)
    a, b = copies(ps[:2]), copies(ps[2:])
    grouped = cls([{"params": ps[:2], **options[0]}, {"params": ps[2:], **options[1]}],
                  **defaults)
    separate = [cls(a, **{**defaults, **options[0]}), cls(b, **{**defaults, **options[1]})]
    for _ in range(4):
        grads = [rng.standard_normal(s) for s in SHAPES]
        set_grads(ps, grads)
        set_grads(a + b, grads)
        grouped.step()
        for opt in separate:
            opt.step()
    for p, q in zip(ps, a + b):
        np.testing.assert_array_equal(host(p), host(q))  # the same arithmetic, bit for bit


TORCH = {
    "sgd": (lambda g: optim.SGD(g, lr=0.1, momentum=0.9, weight_decay=1e-2),
            lambda g, torch: torch.optim.SGD(g, lr=0.1, momentum=0.9, weight_decay=1e-2),
            [{"lr": 0.01, "nesterov": True}, {"weight_decay": 0.0, "momentum": 0.5},
             {"lr": 0.3, "momentum": 0.0, "weight_decay": 0.1}]),
    "adam": (lambda g: optim.Adam(g, lr=0.01, weight_decay=1e-3),
             lambda g, torch: torch.optim.Adam(g, lr=0.01, weight_decay=1e-3),
             [{"lr": 0.003, "betas": (0.8, 0.99)}, {"weight_decay": 0.0, "eps": 1e-6},
              {"lr": 0.05}]),
    "adamw": (lambda g: optim.AdamW(g, lr=0.01),
              lambda g, torch: torch.optim.AdamW(g, lr=0.01),
              [{"lr": 0.02, "weight_decay": 0.1}, {"weight_decay": 0.0},
               {"betas": (0.5, 0.9)}]),
}


@pytest.mark.parametrize("name", sorted(TORCH))
def test_groups_follow_torch_optim(backend, rng, name):
    torch = pytest.importorskip("torch")
    make, make_ref, options = TORCH[name]
    ps = params(rng)
    refs = [torch.tensor(host(p), requires_grad=True) for p in ps]
    split = [slice(0, 1), slice(1, 3), slice(3, 4)]
    opt = make([{"params": ps[s], **o} for s, o in zip(split, options)])
    ref = make_ref([{"params": refs[s], **o} for s, o in zip(split, options)], torch)
    for step in range(5):
        if step == 3:  # a schedule halves every group's rate from its own
            opt.lr = opt.lr * 0.5
            for group in ref.param_groups:
                group["lr"] *= 0.5
        grads = [rng.standard_normal(s) for s in SHAPES]
        set_grads(ps, grads)
        for r, g in zip(refs, grads):
            r.grad = torch.tensor(g)
        opt.step()
        ref.step()
    for p, r in zip(ps, refs):
        np.testing.assert_allclose(host(p), r.detach().numpy(), rtol=1e-12, atol=1e-14)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [g["lr"] for g in ref.param_groups], rel=1e-15)


def test_frozen_parameters_are_skipped_even_with_a_gradient(backend, rng):
    ps = params(rng)
    before = [host(p) for p in ps]
    opt = optim.AdamW([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.1}], weight_decay=0.5)
    ps[0].requires_grad = False
    ps[2].requires_grad = False
    set_grads(ps, [rng.standard_normal(s) for s in SHAPES])
    opt.step()
    np.testing.assert_array_equal(host(ps[0]), before[0])  # no step, no decoupled decay
    np.testing.assert_array_equal(host(ps[2]), before[2])
    assert not np.array_equal(host(ps[1]), before[1])
    assert opt.state[0] == {} and opt.state[2] == {}
    ps[0].requires_grad = True  # unfrozen: trained at its group's rate from now on
    opt.step()
    assert opt.state[0]["step"] == 1


# --------------------------------------------------------------------------------------------
# the optimizer's learning rate and schedules


def test_assigning_lr_scales_every_group_from_its_initial_lr(backend, rng):
    ps = params(rng)
    opt = optim.SGD([{"params": ps[:2], "lr": 0.003}, {"params": ps[2:]}], lr=0.1)
    opt.lr = 0.025
    assert opt.lr == 0.025
    assert opt.param_groups[1]["lr"] == 0.025  # no lr of its own: the value exactly
    assert opt.param_groups[0]["lr"] == 0.003 * (0.025 / 0.1)
    opt.lr = 0.1
    assert [g["lr"] for g in opt.param_groups] == [0.003, 0.1]
    assert [g["initial_lr"] for g in opt.param_groups] == [0.003, 0.1]


def test_assigning_lr_of_one_group_sets_it_exactly(backend, rng):
    opt = optim.Adam(params(rng), lr=3e-3)
    for value in (1e-3 / 3, 0.7, 1e-30):
        opt.lr = value
        assert opt.param_groups[0]["lr"] == value == opt.lr


def test_a_group_lr_assigned_directly_is_used_by_the_next_step(backend, rng):
    (p,) = params(rng, [(3,)])
    w0 = host(p)
    opt = optim.SGD([{"params": [p]}], lr=0.1)
    opt.param_groups[0]["lr"] = 0.5  # as PyTorch users write their own schedules
    g = rng.standard_normal(3)
    set_grads([p], [g])
    opt.step()
    np.testing.assert_array_equal(host(p), w0 - 0.5 * g)


def test_schedule_scaling_matches_torch_lambdalr_per_group(rng):
    torch = pytest.importorskip("torch")
    base, schedule = 0.1, StepDecay(0.1, step_size=2, gamma=0.3)
    ps = params(rng)
    opt = optim.SGD([{"params": ps[:1], "lr": 0.004}, {"params": ps[1:3]},
                     {"params": ps[3:], "lr": 0.25}], lr=base)
    t = [torch.zeros(1, requires_grad=True) for _ in range(3)]
    ref = torch.optim.SGD([{"params": [t[0]], "lr": 0.004}, {"params": [t[1]]},
                           {"params": [t[2]], "lr": 0.25}], lr=base)
    sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda e: schedule(e) / base)
    for epoch in range(7):
        opt.lr = schedule(epoch)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(
            [g["lr"] for g in ref.param_groups], rel=1e-15)
        ref.step()
        sched.step()


class GroupRates(Callback):
    def __init__(self):
        self.epochs, self.steps = [], []

    def on_epoch_begin(self, trainer, epoch):
        self.epochs.append([g["lr"] for g in trainer.optimizer.param_groups])

    def on_step_end(self, trainer, step, logs):
        self.steps.append((logs["lr"], [g["lr"] for g in trainer.optimizer.param_groups]))


@pytest.fixture(scope="module")
def tiny_data():
    data = load_dataset("mnist-sample")
    return data.train.subset(np.arange(64))


def grouped_model():
    anycnn.manual_seed(3)
    return Sequential(L.Conv2D(1, 4, 3, stride=2), L.BatchNorm2D(4), L.ReLU(),
                      L.GlobalAvgPool2D(), L.Dense(4, 10))


def test_trainer_schedule_and_warmup_scale_every_group(backend, tiny_data):
    model = grouped_model()
    opt = optim.SGD(optim.split_groups(model, "4", lr_backbone=0.002), lr=0.05, momentum=0.9)
    rates = GroupRates()
    trainer = Trainer(model, opt, schedule=StepDecay(0.05, step_size=1, gamma=0.5),
                      warmup_steps=3, progress=False, callbacks=[rates])
    trainer.fit(DataLoader(tiny_data, 32, shuffle=True, seed=1), epochs=3)
    # warmup: step s of the run uses s/3 of its epoch's rate (2 steps an epoch), in every group
    assert len(rates.steps) == 6
    for s, (lr, groups) in enumerate(rates.steps[:3], start=1):
        factor = 0.5 ** ((s - 1) // 2) * (s / 3 if s < 3 else 1.0)
        assert lr == pytest.approx(0.05 * factor, rel=1e-15) and groups[1] == lr
        assert groups[0] == pytest.approx(0.002 * factor, rel=1e-15)
    for epoch, groups in enumerate(rates.epochs[1:], start=1):
        assert groups[1] == 0.05 * 0.5 ** epoch
        assert groups[0] == pytest.approx(0.002 * 0.5 ** epoch, rel=1e-15)
    assert [r["lr"] for r in trainer.history] == [0.05 * 2 / 3, 0.025, 0.0125]  # last steps


# --------------------------------------------------------------------------------------------
# the helpers


class Scale(Module):
    """A user layer with a parameter named ``bias`` (caught by name) and one that is not."""

    def __init__(self):
        self.gain = Parameter(anycnn.asarray(np.ones(4), dtype="float32"))
        self.bias = Parameter(anycnn.asarray(np.zeros(4), dtype="float32"))

    def forward(self, x):
        return x * self.gain + self.bias


class MyNorm(Scale):
    """A user norm layer: found only when its class is named in ``no_decay``."""


class Net(Module):
    def __init__(self):
        self.stem = L.Conv2D(1, 4, 3)                  # weight, bias
        self.bn = L.BatchNorm2D(4)                     # weight, bias (by type)
        self.body = Sequential(L.Conv2D(4, 4, 3, bias=False), L.GroupNorm(2, 4),
                               L.Conv2D(4, 4, 1), L.LayerNorm(4), L.LayerNorm(4, affine=False))
        self.gamma = L.BatchNorm2D(4)                  # a norm layer whose name says nothing
        self.scale = Scale()
        self.mine = MyNorm()
        self.fc = L.Dense(4, 3)
        self.fc2 = L.Dense(3, 3)

    def forward(self, x):  # pragma: no cover - the helpers never call it
        return x


def names_of(model, group):
    ids = {id(p) for p in group["params"]}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def test_decay_groups_pick_exactly_the_norm_parameters_and_the_biases(backend):
    model = Net()
    decay, no_decay = optim.decay_groups(model, 0.05)
    assert decay["name"] == "decay" and decay["weight_decay"] == 0.05
    assert no_decay["name"] == "no_decay" and no_decay["weight_decay"] == 0.0
    assert names_of(model, decay) == ["stem.weight", "body.0.weight", "body.2.weight",
                                      "scale.gain", "mine.gain", "fc.weight", "fc2.weight"]
    assert names_of(model, no_decay) == [
        "stem.bias", "bn.weight", "bn.bias", "body.1.weight", "body.1.bias", "body.2.bias",
        "body.3.weight", "body.3.bias", "gamma.weight", "gamma.bias", "scale.bias",
        "mine.bias", "fc.bias", "fc2.bias"]
    assert len(decay["params"]) + len(no_decay["params"]) == len(model.parameters())


def test_decay_groups_options(backend):
    model = Net()
    (decay, no_decay) = optim.decay_groups(model, no_decay=("norm", MyNorm))
    assert "weight_decay" not in decay  # the optimizer's
    assert "mine.gain" in names_of(model, no_decay) and "fc.bias" in names_of(model, decay)
    (only,) = optim.decay_groups(Sequential(L.Conv2D(1, 2, 3, bias=False)), 1e-4)
    assert only["name"] == "decay"  # an empty group is left out
    opt = optim.AdamW(optim.decay_groups(model), lr=1e-3, weight_decay=0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    with pytest.raises(ConfigError, match=r"no_decay takes 'bias', 'norm'.*got 'bn'"):
        optim.decay_groups(model, no_decay=("bias", "bn"))
    with pytest.raises(ConfigError, match=r"decay_groups needs the model .* got list"):
        optim.decay_groups(model.parameters())
    with pytest.raises(ConfigError, match="weight_decay must be a finite number >= 0"):
        optim.decay_groups(model, -1.0)


def test_split_groups_head_and_backbone(backend):
    model = Net()
    backbone, head = optim.split_groups(model, "fc", lr_backbone=1e-4)
    assert (backbone["name"], backbone["lr"]) == ("backbone", 1e-4)
    assert head["name"] == "head" and "lr" not in head  # the optimizer's lr
    assert names_of(model, head) == ["fc.weight", "fc.bias"]  # not fc2
    assert len(backbone["params"]) == len(model.parameters()) - 2
    by_module = optim.split_groups(model, model.fc, lr_backbone=1e-4, lr=0.1)
    assert [names_of(model, g) for g in by_module] == [names_of(model, backbone),
                                                       names_of(model, head)]
    assert by_module[1]["lr"] == 0.1
    two = optim.split_groups(model, ["fc", "fc2"], lr_backbone=1e-4)
    assert names_of(model, two[1]) == ["fc.weight", "fc.bias", "fc2.weight", "fc2.bias"]
    opt = optim.SGD(optim.split_groups(model, "body.2", lr_backbone=0.01), lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.1]


def test_split_groups_with_the_no_decay_split(backend):
    model = Net()
    groups = optim.split_groups(model, "fc", lr_backbone=1e-4, no_decay=("bias", "norm"))
    assert [g["name"] for g in groups] == ["backbone", "backbone.no_decay", "head",
                                           "head.no_decay"]
    assert [g.get("lr") for g in groups] == [1e-4, 1e-4, None, None]
    assert [g.get("weight_decay") for g in groups] == [None, 0.0, None, 0.0]
    assert names_of(model, groups[2]) == ["fc.weight"]
    assert names_of(model, groups[3]) == ["fc.bias"]
    opt = optim.SGD(groups, lr=0.1, weight_decay=5e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0, 5e-4, 0.0]


def test_split_groups_errors(backend):
    model = Net()
    with pytest.raises(ConfigError, match=r"head 'classifier' names no parameter of the model "
                                          r"\(its parts: stem, bn, body, gamma, scale, mine, "
                                          r"fc, fc2\)"):
        optim.split_groups(model, "classifier", lr_backbone=1e-4)
    with pytest.raises(ConfigError, match="head 'f' names no parameter"):
        optim.split_groups(model, "f", lr_backbone=1e-4)  # a prefix of a name is no match
    with pytest.raises(ConfigError, match="holds every parameter"):
        optim.split_groups(model.fc, model.fc, lr_backbone=1e-4)
    with pytest.raises(ConfigError, match="holds no parameter of the model"):
        optim.split_groups(model, L.Dense(2, 2), lr_backbone=1e-4)
    with pytest.raises(ConfigError, match="lr_backbone must be a finite number > 0"):
        optim.split_groups(model, "fc", lr_backbone=0)
    with pytest.raises(ConfigError, match="head must be a submodule of the model"):
        optim.split_groups(model, 3, lr_backbone=1e-4)


def test_helpers_keep_frozen_and_shared_parameters_once(backend):
    shared = L.Dense(3, 3)
    model = Sequential(shared, L.ReLU(), shared, L.Dense(3, 2))
    model[0].weight.requires_grad = False
    groups = optim.decay_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [2, 2]  # frozen included, shared once
    opt = optim.SGD(optim.split_groups(model, "3", lr_backbone=0.01), lr=0.1)
    assert len(opt.params) == 4


# --------------------------------------------------------------------------------------------
# state


def trained(make, rng, steps=3):
    ps = params(rng)
    opt = make(ps)
    for _ in range(steps):
        set_grads(ps, [rng.standard_normal(s) for s in SHAPES])
        opt.step()
    return ps, opt


def groups_of(ps):
    return [{"params": ps[:2], "lr": 0.02, "name": "a"},
            {"params": ps[2:], "weight_decay": 0.0, "betas": (0.5, 0.6)}]


def test_state_dict_round_trip_restores_every_group(backend, rng):
    ps, opt = trained(lambda ps: optim.AdamW(groups_of(ps), lr=0.01), rng)
    opt.lr = 0.004
    state = opt.state_dict()
    assert state["lr"] == 0.004 and state["initial_lr"] == 0.01
    assert [g["params"] for g in state["param_groups"]] == [[0, 1], [2, 3]]
    assert state["param_groups"][1]["betas"] == [0.5, 0.6]  # JSON-able

    fresh = optim.AdamW(groups_of(copies(ps)), lr=0.3, betas=(0.1, 0.2))
    fresh.load_state_dict(state)
    assert fresh.lr == 0.004 and fresh.defaults["lr"] == 0.01
    for got, want in zip(fresh.param_groups, opt.param_groups):
        assert {k: v for k, v in got.items() if k != "params"} == {
            k: v for k, v in want.items() if k != "params"}
    fresh.lr = 0.01  # the ratios came back with the state
    assert [g["lr"] for g in fresh.param_groups] == [0.02, 0.01]


def test_state_of_other_groups_is_refused_and_changes_nothing(backend, rng):
    ps, opt = trained(lambda ps: optim.SGD(groups_of_sgd(ps), lr=0.1, momentum=0.9), rng)
    state = opt.state_dict()
    one = optim.SGD(copies(ps), lr=0.1, momentum=0.9)
    with pytest.raises(CheckpointError, match="optimizer state has 2 parameter group"):
        one.load_state_dict(state)
    other = optim.SGD([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.1, momentum=0.9)
    with pytest.raises(CheckpointError, match=r"parameter group 0 holds 1 parameter\(s\), the "
                                              "optimizer state's group 0 holds 2"):
        other.load_state_dict(state)
    bad = {**state, "param_groups": [state["param_groups"][0],
                                     {**state["param_groups"][1], "momentum": -1.0}]}
    fresh = optim.SGD(groups_of_sgd(copies(ps)), lr=0.1, momentum=0.9)
    with pytest.raises(CheckpointError, match="invalid optimizer state: parameter group 1: "
                                              "momentum must be"):
        fresh.load_state_dict(bad)
    assert fresh.state == [{}] * 4 and fresh.param_groups[1]["momentum"] == 0.9


def groups_of_sgd(ps):
    return [{"params": ps[:2], "lr": 0.01}, {"params": ps[2:], "weight_decay": 1e-3}]


def legacy(state, hyper):
    """``state`` as written before parameter groups existed (one group, values at the top)."""
    (group,) = state["param_groups"]
    old = {"type": state["type"], "lr": group["lr"], "steps": state["steps"],
           "arrays": state["arrays"]}
    for name in hyper:
        if name == "betas":
            old["beta1"], old["beta2"] = group["betas"]
        else:
            old[name] = group[name]
    return old


@pytest.mark.parametrize("make", [
    lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda ps: optim.Adam(ps, lr=0.01, betas=(0.8, 0.95), weight_decay=1e-3),
], ids=["sgd", "adam"])
def test_an_old_single_group_state_loads_and_resumes_exactly(backend, rng, make):
    ps, opt = trained(make, rng)
    old = legacy(opt.state_dict(), type(opt).hyper_names)
    assert "param_groups" not in old
    fresh = make(copies(ps))
    fresh.lr = 1.0  # restored from the state
    fresh.load_state_dict(old)
    assert fresh.lr == opt.lr and fresh.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for name in type(opt).hyper_names:
        assert fresh.param_groups[0][name] == opt.param_groups[0][name]
    grads = [rng.standard_normal(s) for s in SHAPES]
    set_grads(ps, grads)
    set_grads(fresh.params, grads)
    opt.step()
    fresh.step()
    for p, q in zip(ps, fresh.params):
        np.testing.assert_array_equal(host(q), host(p))
    two = make([{"params": copies(ps[:1])}, {"params": copies(ps[1:])}])
    with pytest.raises(CheckpointError, match=r"one parameter group .*written before parameter "
                                              r"groups existed.*has 2"):
        two.load_state_dict(old)


def test_data_parallel_ranks_must_share_the_groups(backend, tiny_data):
    from anycnn.train.parallel import fingerprint, fingerprint_differences

    loader = DataLoader(tiny_data, 32)
    prints = []
    for lr_backbone in (0.01, 0.01, 0.02):
        model = grouped_model()
        opt = optim.SGD(optim.split_groups(model, "4", lr_backbone=lr_backbone), lr=0.1)
        prints.append(fingerprint(Trainer(model, opt, progress=False), loader, 1))
    assert fingerprint_differences(prints[:2]) == []
    (line,) = fingerprint_differences([prints[0], prints[2]])
    assert line.startswith("optimizer: ") and "'lr': 0.02" in line
