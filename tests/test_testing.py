"""``anycnn.testing.check_gradients`` on the backend under test: it passes for every layer type
(float32 layers are checked in float64), fails naming the tensor for wrong backward passes,
samples big tensors with ``max_elements``, refuses a stochastic forward, and leaves the module
as it found it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import anycnn
from anycnn import layers as L
from anycnn.errors import ConfigError
from anycnn.nn.module import Module, Parameter, make_array
from anycnn.testing import GradientCheckError, check_gradients


class Scale(Module):
    """``y = x * scale`` with a learnable per-channel (last axis) ``scale``; ``bug`` plants an
    error: "input" drops the scale from dx, "param" forgets x in dscale, "square" is
    ``y = scale * x**2`` with dx missing its factor 2."""

    def __init__(self, channels: int, bug: str | None = None) -> None:
        self.scale = Parameter(make_array(np.linspace(0.5, 1.5, channels), "float32"))
        self.bug = bug
        self._x = None

    def forward(self, x):
        self._x = x
        return (x * x if self.bug == "square" else x) * self.scale.data

    def backward(self, dy, input_grad=True):
        xp, x = anycnn.backend.namespace_of(dy), self._x
        axes = tuple(range(dy.ndim - 1))
        if self.bug == "square":
            self.scale.accumulate(xp.sum(dy * x * x, axis=axes))
            return dy * self.scale.data * x  # should be 2 * x
        self.scale.accumulate(xp.sum(dy if self.bug == "param" else dy * x, axis=axes))
        return dy if self.bug == "input" else dy * self.scale.data


LAYERS = {
    "conv_stride_pad": (lambda: L.Conv2D(2, 3, 3, stride=2, padding=1), (2, 5, 6, 2)),
    "conv_dilated": (lambda: L.Conv2D(2, 2, (2, 3), stride=(2, 1), padding=(1, 2),
                                      dilation=(1, 2), bias=False), (2, 4, 5, 2)),
    "conv_same": (lambda: L.Conv2D(1, 2, 4, padding="same"), (1, 5, 5, 1)),
    "dense": (lambda: L.Dense(5, 4), (3, 5)),
    "batchnorm_train": (lambda: L.BatchNorm2D(3), (4, 3, 3, 3)),
    "batchnorm_nc": (lambda: L.BatchNorm2D(3), (5, 3)),
    "batchnorm_eval": (lambda: L.BatchNorm2D(3).eval(), (2, 3, 3, 3)),
    "maxpool": (lambda: L.MaxPool2D(3, 2, padding=1, ceil_mode=True), (2, 5, 5, 2)),
    "avgpool": (lambda: L.AvgPool2D(3, 2, padding=1, count_include_pad=False), (2, 5, 5, 2)),
    "global_avgpool": (L.GlobalAvgPool2D, (2, 3, 3, 2)),
    "flatten": (L.Flatten, (2, 3, 3, 2)),
    "relu": (L.ReLU, (3, 7)),
    "leaky_relu": (lambda: L.LeakyReLU(0.1), (3, 7)),
    "sigmoid": (L.Sigmoid, (3, 7)),
    "tanh": (L.Tanh, (3, 7)),
    "dropout_eval": (lambda: L.Dropout(0.3).eval(), (3, 7)),
    "scale": (lambda: Scale(3), (2, 2, 2, 3)),
    "fused_sequential": (lambda: anycnn.Sequential(
        L.Conv2D(1, 2, 3, padding=1), L.ReLU(), L.MaxPool2D(2), L.Flatten(), L.Dense(8, 3)),
        (2, 4, 4, 1)),
}


@pytest.mark.parametrize("case", LAYERS)
def test_every_layer_type_passes(backend, rng, case):
    make, shape = LAYERS[case]
    layer = make()
    report = check_gradients(layer, anycnn.asarray(rng.standard_normal(shape), dtype="float32"))
    names = ["input", *(name for name, _ in layer.named_parameters())]
    assert [t.name for t in report.tensors] == names
    assert report.ok and all(t.checked == np.prod(t.shape) for t in report.tensors)
    assert report.worst.excess < 0.1  # well inside the tolerance, not at its edge


@pytest.mark.parametrize("bug, tensor", [("input", "input"), ("param", "scale"),
                                         ("square", "input")])
def test_a_wrong_backward_fails_naming_the_tensor(backend, rng, bug, tensor):
    x = anycnn.asarray(rng.standard_normal((2, 3, 3, 2)))
    with pytest.raises(AssertionError, match=f"gradient of '{tensor}' of Scale") as info:
        check_gradients(Scale(2, bug=bug), x)
    error = info.value
    assert isinstance(error, GradientCheckError)
    worst = error.report.worst
    assert worst.name == tensor and not worst.ok
    assert f"at index {worst.index}" in str(error)
    assert len(worst.index) == len(worst.shape) and worst.max_rel_error > 0.1
    others = [t for t in error.report.tensors if t.name != tensor]
    assert all(t.ok for t in others)  # only the planted bug is reported


def test_the_module_is_left_as_it_was(backend, rng):
    """Mode, parameters (float32, same arrays), gradients, buffers, what forward kept."""
    model = anycnn.Sequential(L.Conv2D(2, 3, 3), L.BatchNorm2D(3), L.ReLU(), L.Dropout(0.5))
    model[3].eval()
    x = anycnn.asarray(rng.standard_normal((2, 4, 4, 2)), dtype="float32")
    with anycnn.no_grad():
        model.forward(x)
    model.backward(model.forward(x))
    before = {name: (p, p.data, p.grad) for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    ctx = model[1]._ctx
    check_gradients(model, x)
    assert [m.training for m in model.modules()] == [True, True, True, True, False]
    for name, p in model.named_parameters():
        assert (p, p.data, p.grad) == before[name]
        assert anycnn.backend.dtype_name(p.data) == "float32"
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert model[1]._ctx is ctx


def test_the_module_is_restored_after_a_failure(backend, rng):
    layer = Scale(2, bug="param")
    with pytest.raises(AssertionError):
        check_gradients(layer, anycnn.asarray(rng.standard_normal((3, 2))))
    assert layer.scale.grad is None and layer._x is None
    assert anycnn.backend.dtype_name(layer.scale.data) == "float32"


def test_max_elements_samples_each_tensor_reproducibly(backend, rng):
    layer = L.Dense(20, 10)
    x = anycnn.asarray(rng.standard_normal((4, 20)), dtype="float32")
    report = check_gradients(layer, x, max_elements=7)
    assert {t.name: t.checked for t in report.tensors} == {"input": 7, "weight": 7, "bias": 7}
    assert check_gradients(layer, x, max_elements=7) == report  # same seed, same elements
    assert check_gradients(layer, x, max_elements=7, seed=1) != report


def test_a_sample_still_catches_a_wrong_gradient(backend, rng):
    with pytest.raises(AssertionError, match="'scale'"):
        check_gradients(Scale(3, bug="param"), anycnn.asarray(rng.standard_normal((30, 3))),
                        max_elements=2)


def test_dy_is_the_cotangent(backend, rng):
    """With dy = 0 everywhere the objective is flat: even a wrong backward agrees."""
    x = anycnn.asarray(rng.standard_normal((3, 2)))
    check_gradients(Scale(2, bug="param"), x, dy=np.zeros((3, 2)))
    with pytest.raises(AssertionError):
        check_gradients(Scale(2, bug="param"), x, dy=np.ones((3, 2)))
    with pytest.raises(ConfigError, match=r"dy has shape \(2, 3\)"):
        check_gradients(Scale(2), x, dy=np.ones((2, 3)))


def test_a_host_input_moves_to_the_module(backend, rng):
    report = check_gradients(L.Dense(3, 2), rng.standard_normal((2, 3)))
    assert report.ok


def test_a_stochastic_forward_is_refused_with_advice(backend, rng):
    """Dropout in training mode draws masks from the global generator: refused, and the
    generator is put back (the next draw is the one it would have been)."""
    state = anycnn.random.get_state()
    with pytest.raises(ConfigError, match=r"eval mode"):
        check_gradients(L.Dropout(0.5), anycnn.asarray(rng.standard_normal((4, 5))))
    assert anycnn.random.get_state() == state


class _Assigns(Scale):
    """Sets ``scale.grad`` instead of adding to it (right values, wrong accumulation)."""

    def backward(self, dy, input_grad=True):
        self.scale.grad = None
        return super().backward(dy, input_grad)


def test_backward_must_add_to_the_gradient(backend, rng):
    x = anycnn.asarray(rng.standard_normal((3, 2)))
    with pytest.raises(AssertionError, match="does not add to the gradient of 'scale'"):
        check_gradients(_Assigns(2), x)


class _NoInputGrad(Scale):
    def backward(self, dy, input_grad=True):
        super().backward(dy, input_grad)
        return None


@pytest.mark.parametrize("kwargs", [{"eps": 0}, {"rtol": -1}, {"max_elements": 0}])
def test_bad_options_and_missing_input_gradient(backend, rng, kwargs):
    x = anycnn.asarray(rng.standard_normal((3, 2)))
    with pytest.raises(ConfigError):
        check_gradients(Scale(2), x, **kwargs)
    with pytest.raises(ConfigError, match="returned None"):
        check_gradients(_NoInputGrad(2), x)


def test_the_custom_layer_guide_example_runs(tmp_path):
    """The first code block of the guide "Writing your own layer" (on the backend under test;
    the docs tests run every block on NumPy only)."""
    root = Path(__file__).resolve().parent.parent
    guide = (root / "docs" / "guides" / "custom-layers.md").read_text()
    script = tmp_path / "scale.py"
    script.write_text(guide.split("```python\n", 1)[1].split("```", 1)[0])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [["input", "ok"], ["scale", "ok"]]
    assert "Sequential on input (None, 5, 5, 8)" in lines
    rows = [x.split() for x in lines]
    assert ["2", "(Scale)", "(None,", "5,", "5,", "8)", "8", "0"] in rows
    assert ["1.fc1", "(Dense)", "(None,", "2)", "18", "32"] in rows  # inside a forward-only module
