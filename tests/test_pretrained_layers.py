"""The layers of the pretrained architectures (issue 24): ReLU6, Hardsigmoid, Hardswish, SiLU,
GELU (exact and tanh), Softmax, AdaptiveAvgPool2D, StochasticDepth, SqueezeExcitation and
the portable error function.

Against PyTorch autograd in float64 (output and input gradient within 1e-8; skipped without
torch), by finite differences, and their errors; on the backend under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import anycnn
from anycnn.errors import ConfigError
from anycnn.nn import activations as A
from anycnn.nn import layers as L
from anycnn.nn.blocks import SqueezeExcitation, conv_norm_act
from anycnn.nn.functional.activation import erf
from tests.test_gradcheck import check_layer
from tests.test_new_layers import check_vs_torch, needs_torch

ACTIVATIONS = {
    "relu6": (A.ReLU6, lambda F, x: F.relu6(x)),
    # torch's own hardsigmoid backward multiplies by 1/6 rounded to float32: the formula is exact
    "hardsigmoid": (A.Hardsigmoid, lambda F, x: F.relu6(x + 3.0) / 6.0),
    "hardswish": (A.Hardswish, lambda F, x: F.hardswish(x)),
    "silu": (A.SiLU, lambda F, x: F.silu(x)),
    "gelu": (A.GELU, lambda F, x: F.gelu(x)),
    "gelu-tanh": (lambda: A.GELU("tanh"), lambda F, x: F.gelu(x, approximate="tanh")),
}


def _inputs(rng, shape=(2, 5, 6, 4)):
    """Normal values plus the activations' corners (-3, 0, 3, 6 and either side of them)."""
    x = rng.standard_normal(shape) * 4.0
    flat = x.reshape(-1)
    corners = [-3.0, 0.0, 3.0, 6.0, -3.0001, 2.9999, 6.0001, -0.0001]
    flat[:len(corners)] = corners
    return x


@needs_torch
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_vs_torch(backend, rng, name):
    import torch

    make, reference = ACTIVATIONS[name]
    check_vs_torch(make(), _inputs(rng), lambda xt: reference(torch.nn.functional, xt), {}, rng)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_gradcheck(backend, rng, name):
    x = rng.standard_normal((2, 3, 3, 2)) * 2.0  # away from the kinks, almost surely
    check_layer(ACTIVATIONS[name][0]().to("float64"), x, rng)


def test_activations_keep_float32(backend, rng):
    x = anycnn.asarray(rng.standard_normal((2, 4)), dtype="float32")
    for make, _ in ACTIVATIONS.values():
        assert make().forward(x).dtype == x.dtype


def test_erf_portable_and_native_agree_with_math_erf(backend):
    x = np.concatenate([np.linspace(-7.0, 7.0, 2801), [0.5, 5.999999, 6.0, 1e-12, -1e-12]])
    want = np.array([math.erf(v) for v in x])
    for fn in (erf, erf.portable):
        got = anycnn.to_numpy(fn(anycnn.asarray(x)))
        assert np.max(np.abs(got - want)) < 4e-15
    special = anycnn.to_numpy(erf.portable(anycnn.asarray(np.array([np.inf, -np.inf, np.nan]))))
    assert special[0] == 1.0 and special[1] == -1.0 and np.isnan(special[2])
    f32 = erf.portable(anycnn.asarray(x, dtype="float32"))
    assert f32.dtype == anycnn.asarray(x, dtype="float32").dtype
    assert np.max(np.abs(anycnn.to_numpy(f32) - want)) < 5e-7


@needs_torch
@pytest.mark.parametrize("axis", [-1, 1, 3])
def test_softmax_vs_torch(backend, rng, axis):
    import torch

    dim = {-1: 1, 1: 2, 3: 1}[axis]  # the NHWC axis in NCHW
    check_vs_torch(A.Softmax(axis), rng.standard_normal((2, 3, 4, 5)),
                   lambda xt: torch.softmax(xt, dim=dim), {}, rng)
    check_layer(A.Softmax(axis).to("float64"), rng.standard_normal((2, 3, 4, 5)), rng)


@needs_torch
@pytest.mark.parametrize(("size", "out"), [((7, 7), 1), ((7, 9), (3, 4)), ((5, 5), 5),
                                           ((6, 4), (4, 6))])
def test_adaptive_avg_pool_vs_torch(backend, rng, size, out):
    import torch

    layer = L.AdaptiveAvgPool2D(out)
    x = rng.standard_normal((2, *size, 3))
    check_vs_torch(layer, x, lambda xt: torch.nn.functional.adaptive_avg_pool2d(xt, out), {},
                   rng)
    check_layer(layer, x, rng)
    assert layer.output_hw(size) == layer.output_size


def test_stochastic_depth(backend, rng):
    x = rng.standard_normal((64, 2, 2, 3)) + 5.0
    layer = L.StochasticDepth(0.25, rng=np.random.default_rng(3))
    assert np.array_equal(anycnn.to_numpy(layer.eval().forward(anycnn.asarray(x))), x)
    layer.train()
    y = anycnn.to_numpy(layer.forward(anycnn.asarray(x)))
    kept = np.array([np.allclose(y[i], x[i] / 0.75) for i in range(64)])
    dropped = np.array([np.all(y[i] == 0) for i in range(64)])
    assert np.all(kept | dropped) and 4 <= dropped.sum() <= 30  # whole rows, about a quarter
    dx = anycnn.to_numpy(layer.backward(anycnn.asarray(np.ones_like(x))))
    assert np.array_equal(dx == 0, y == 0)
    batch = L.StochasticDepth(0.5, "batch", rng=np.random.default_rng(0))
    y = anycnn.to_numpy(batch.forward(anycnn.asarray(x)))
    assert np.all(y == 0) or np.allclose(y, 2 * x)
    check_layer(L.StochasticDepth(0.5), rng.standard_normal((4, 2, 2, 1)), rng, reseed=7)


def test_squeeze_excitation_gradcheck_and_names(backend, rng):
    se = SqueezeExcitation(6, 2, activation=A.SiLU, scale_activation=A.Hardsigmoid)
    assert [k for k, _ in se.named_parameters()] == ["fc1.weight", "fc1.bias", "fc2.weight",
                                                   "fc2.bias"]
    check_layer(se.to("float64"), rng.standard_normal((2, 3, 3, 6)), rng)
    block = conv_norm_act(4, 8, 3, 2, groups=4, activation=A.ReLU6)
    assert [type(m).__name__ for m in block] == ["Conv2D", "BatchNorm2D", "ReLU6"]
    assert block[0].pads == (1, 1, 1, 1) and block[0].groups == 4 and block[0].bias is None


def test_bad_options():
    with pytest.raises(ConfigError, match="approximate must be 'none' or 'tanh'"):
        A.GELU("erf")
    with pytest.raises(ConfigError, match="StochasticDepth p must be in"):
        L.StochasticDepth(1.5)
    with pytest.raises(ConfigError, match="mode must be 'row' or 'batch'"):
        L.StochasticDepth(0.1, "column")
    with pytest.raises(ConfigError, match="output_size"):
        L.AdaptiveAvgPool2D(0)
    with pytest.raises(ConfigError, match="odd kernel_size"):
        conv_norm_act(3, 3, 4)
    with pytest.raises(ConfigError, match="axis"):
        A.Softmax(axis=1.5)
