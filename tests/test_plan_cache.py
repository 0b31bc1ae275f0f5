"""A Sequential keeps its execution plan (:mod:`anycnn.nn.fusion`) from one forward to the
next while nothing it depends on changed, and builds it again when something did: the layers,
their training modes (eval-only fusions, ``freeze(eval=True)``), fusion being suspended."""

from __future__ import annotations

import numpy as np

import anycnn
from anycnn import layers as L
from anycnn.nn.fusion import BatchNormReLU
from anycnn.nn.inference import ConvReLU
from anycnn.nn.modes import suspended


def _model() -> anycnn.nn.Sequential:
    anycnn.manual_seed(0)
    return anycnn.nn.Sequential(L.Conv2D(3, 16, 3, padding=1), L.BatchNorm2D(16), L.ReLU(),
                                L.Conv2D(16, 16, 3, padding=1), L.ReLU(), L.Flatten(),
                                L.Dense(16 * 6 * 6, 4))


def _x() -> object:
    return anycnn.asarray(np.random.default_rng(0).random((2, 6, 6, 3), dtype=np.float32))


def _types(model) -> list[str]:
    return [type(step).__name__ for step in model._plan]


def _host(a) -> np.ndarray:
    return np.asarray(anycnn.to_numpy(a))


def test_the_plan_is_kept_between_forwards():
    model, x = _model(), _x()
    model.forward(x)
    first = list(model._plan)
    model.forward(x)
    assert all(a is b for a, b in zip(model._plan, first, strict=True))
    assert isinstance(model._plan[1], BatchNormReLU)


def test_a_replaced_layer_builds_the_plan_again():
    model, x = _model(), _x()
    model.forward(x)
    model[2] = L.Identity()  # BatchNorm2D -> ReLU is no longer a fusable run
    model.forward(x)
    assert _types(model)[1:3] == ["BatchNorm2D", "Identity"]
    relu = L.ReLU()
    setattr(model, "2", relu)  # not through __setitem__: seen all the same
    model.forward(x)
    assert model._plan[1].relu is relu


def test_training_mode_and_eval_freeze_build_the_plan_again():
    model, x = _model(), _x()
    model.forward(x)
    assert _types(model)[2:4] == ["Conv2D", "ReLU"]  # the eval-only fusion is not taken
    model[3].freeze(eval=True)
    model[4].freeze(eval=True)
    model.forward(x)  # the outer forward trains; the frozen pair is in eval mode
    assert isinstance(model._plan[2], ConvReLU)
    model[3].eval_pinned = model[4].eval_pinned = False
    model.train()
    model.forward(x)
    assert _types(model)[2:4] == ["Conv2D", "ReLU"]


def test_suspended_fusion_builds_the_plan_again():
    model, x = _model(), _x()
    model.forward(x)
    with suspended():
        model.forward(x)
        assert _types(model)[1:3] == ["BatchNorm2D", "ReLU"]
    model.forward(x)
    assert isinstance(model._plan[1], BatchNormReLU)


def test_kept_plans_give_the_same_training_steps():
    """Three SGD steps with the plan kept and with a new model each step: the same weights."""
    x = _x()
    y = anycnn.asarray(np.array([0, 1]))

    def steps(fresh: bool) -> list[np.ndarray]:
        model = _model()
        loss = anycnn.nn.losses.SoftmaxCrossEntropy()
        opt = anycnn.optim.optimizers.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            if fresh:
                model._plan_cache = None
            model.zero_grad()
            loss.forward(model.forward(x), y)
            model.backward(loss.backward(), input_grad=False)
            opt.step()
        return [_host(p.data) for p in model.parameters()]

    for kept, fresh in zip(steps(False), steps(True), strict=True):
        np.testing.assert_array_equal(kept, fresh)
