"""Finite-difference gradient checks of every layer and loss, float64, on the backend under test.

For a layer ``f`` and a fixed random cotangent ``R`` the scalar ``s(x) = sum(f(x) * R)`` has
gradient ``backward(R)``. Central differences along random directions must match the analytic
directional derivative (input and every parameter); one small convolution is also checked
element by element.
"""

from __future__ import annotations

import numpy as np
import pytest

import anycnn
from anycnn import layers as L
from anycnn import losses
from tests.layer_cases import case_id, conv_cases, pool_cases

EPS = 1e-6


def _scalar(layer, x, cotangent, reseed=None):
    if reseed is not None:
        layer.rng = np.random.default_rng(reseed)
    y = anycnn.to_numpy(layer.forward(anycnn.asarray(x)))
    return float(np.sum(y * cotangent))


def check_layer(layer, x, rng, directions=3, reseed=None):
    """Directional finite-difference check of dx and each parameter gradient of ``layer``."""
    if reseed is not None:
        layer.rng = np.random.default_rng(reseed)
    y = anycnn.to_numpy(layer.forward(anycnn.asarray(x)))
    cot = rng.standard_normal(y.shape)
    layer.zero_grad()
    dx = anycnn.to_numpy(layer.backward(anycnn.asarray(cot)))
    grads = {name: anycnn.to_numpy(p.grad) for name, p in layer.named_parameters()}
    for _ in range(directions):
        v = rng.standard_normal(x.shape)
        num = (_scalar(layer, x + EPS * v, cot, reseed)
               - _scalar(layer, x - EPS * v, cot, reseed)) / (2 * EPS)
        ana = float(np.sum(dx * v))
        assert num == pytest.approx(ana, rel=1e-6, abs=1e-7), "input gradient"
    for name, p in layer.named_parameters():
        base = anycnn.to_numpy(p.data).copy()
        for _ in range(directions):
            v = rng.standard_normal(base.shape)
            p.data = anycnn.asarray(base + EPS * v)
            plus = _scalar(layer, x, cot, reseed)
            p.data = anycnn.asarray(base - EPS * v)
            minus = _scalar(layer, x, cot, reseed)
            p.data = anycnn.asarray(base)
            ana = float(np.sum(grads[name] * v))
            assert (plus - minus) / (2 * EPS) == pytest.approx(ana, rel=1e-6, abs=1e-7), name


@pytest.mark.parametrize("case", conv_cases(16), ids=case_id)
def test_conv2d(backend, rng, case):
    c = case["shape"][-1]
    layer = L.Conv2D(c, case["out"], case["kernel_size"], case["stride"], case["padding"],
                     case["dilation"], bias=case["bias"], dtype="float64")
    check_layer(layer, rng.standard_normal(case["shape"]), rng)


@pytest.mark.parametrize("case", pool_cases(16), ids=case_id)
@pytest.mark.parametrize("kind", ["max", "avg", "avg_exclude_pad"])
def test_pooling(backend, rng, case, kind):
    opts = {k: case[k] for k in ("kernel_size", "stride", "padding", "ceil_mode")}
    layer = L.MaxPool2D(**opts) if kind == "max" else L.AvgPool2D(
        **opts, count_include_pad=kind == "avg")
    check_layer(layer, rng.standard_normal(case["shape"]), rng)


@pytest.mark.parametrize("make, shape", [
    (lambda: L.Dense(6, 3, dtype="float64"), (4, 6)),
    (lambda: L.Dense(5, 2, bias=False, dtype="float64"), (1, 5)),
    (L.GlobalAvgPool2D, (2, 3, 4, 2)),
    (L.Flatten, (2, 3, 4, 2)),
    (L.ReLU, (3, 7)),
    (lambda: L.LeakyReLU(0.1), (3, 7)),
    (L.Sigmoid, (3, 7)),
    (L.Tanh, (3, 7)),
    (lambda: L.BatchNorm2D(3, dtype="float64"), (4, 2, 3, 3)),
    (lambda: L.BatchNorm2D(3, dtype="float64"), (5, 3)),
], ids=["dense", "dense_nobias_batch1", "gap", "flatten", "relu", "leaky", "sigmoid", "tanh",
        "batchnorm_nhwc", "batchnorm_nc"])
def test_other_layers(backend, rng, make, shape):
    check_layer(make(), rng.standard_normal(shape), rng)


def test_batchnorm_eval(backend, rng):
    layer = L.BatchNorm2D(2, dtype="float64")
    layer.forward(anycnn.asarray(rng.standard_normal((4, 3, 3, 2)) * 2 + 1))
    layer.eval()
    check_layer(layer, rng.standard_normal((2, 3, 3, 2)), rng)


def test_dropout_with_fixed_mask(backend, rng):
    check_layer(L.Dropout(0.3), rng.standard_normal((4, 5)), rng, reseed=9)


def test_conv2d_elementwise(backend, rng):
    """Every input and weight element of a small strided, dilated, padded convolution."""
    layer = L.Conv2D(2, 2, (2, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                     dtype="float64")
    x = rng.standard_normal((2, 4, 5, 2))
    y = anycnn.to_numpy(layer.forward(anycnn.asarray(x)))
    cot = rng.standard_normal(y.shape)
    dx = anycnn.to_numpy(layer.backward(anycnn.asarray(cot)))
    num = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = EPS
        num[idx] = (_scalar(layer, x + e, cot) - _scalar(layer, x - e, cot)) / (2 * EPS)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_softmax_cross_entropy(backend, rng, smoothing):
    loss_fn = losses.SoftmaxCrossEntropy(label_smoothing=smoothing)
    logits = rng.standard_normal((5, 4)) * 3
    labels = anycnn.asarray(rng.integers(0, 4, 5))

    def value(z):
        return float(anycnn.to_numpy(loss_fn.forward(anycnn.asarray(z), labels)))

    value(logits)
    grad = anycnn.to_numpy(loss_fn.backward())
    for _ in range(3):
        v = rng.standard_normal(logits.shape)
        num = (value(logits + EPS * v) - value(logits - EPS * v)) / (2 * EPS)
        assert num == pytest.approx(float(np.sum(grad * v)), rel=1e-6, abs=1e-8)


def test_mse(backend, rng):
    loss_fn = losses.MSELoss()
    pred, target = rng.standard_normal((3, 4)), anycnn.asarray(rng.standard_normal((3, 4)))

    def value(p):
        return float(anycnn.to_numpy(loss_fn.forward(anycnn.asarray(p), target)))

    value(pred)
    grad = anycnn.to_numpy(loss_fn.backward())
    v = rng.standard_normal(pred.shape)
    num = (value(pred + EPS * v) - value(pred - EPS * v)) / (2 * EPS)
    assert num == pytest.approx(float(np.sum(grad * v)), rel=1e-6, abs=1e-8)
