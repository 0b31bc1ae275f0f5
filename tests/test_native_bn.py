"""BatchNorm's whole training pass with its per-channel arithmetic compiled
(:mod:`anycnn.kernels.native_bn`): the same bits as the NumPy arithmetic between the compiled
sweeps (``native_bn`` off), for every output the layer keeps or returns; and where it declines."""

from __future__ import annotations

import numpy as np
import pytest

from anycnn import nn
from anycnn.kernels import native_bn, native_norm
from anycnn.kernels.dispatch import DECLINE
from anycnn.nn import functional as F

pytestmark = pytest.mark.usefixtures("native_on")

NAMES = ("y", "running mean", "running var", "mean", "inv_std", "dx", "dgamma", "dbeta")


def _pass(rng, shape, dtype, relu, addend, momentum=0.1, eps=1e-5):
    """A function computing one BatchNorm forward and backward on fixed data: every output
    in :data:`NAMES` order (whichever paths are on). Rows far from zero whose blocks' means
    differ (the float64 merge's between-block terms matter), a constant channel, a channel
    at exactly zero (signed zeros) and a negative gamma."""
    c = shape[-1]
    m = int(np.prod(shape[:-1]))
    x = (100.0 + rng.normal(0.0, 2.0, size=shape)).astype(dtype)
    x.reshape(m, c)[:, :] += np.linspace(0.0, 5.0, m, dtype=dtype)[:, None]
    x[..., 0] = 3.0
    x[..., 1] = -0.0
    gamma = rng.normal(size=c).astype(dtype)
    beta = rng.normal(size=c).astype(dtype)
    gamma[2] = -abs(gamma[2])
    beta[0] = 0.0
    rm, rv = rng.normal(size=c).astype(dtype), (rng.random(c) + 0.5).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    plus = rng.normal(size=shape).astype(dtype) if addend else None

    def run():
        y, ctx, new_mean, new_var = F.batch_norm_forward(x, gamma, beta, rm, rv, True, momentum,
                                                         eps, relu=relu, addend=plus)
        return (y, new_mean, new_var, ctx.mean, ctx.inv_std,
                *F.batch_norm_backward(dy, ctx, gamma))

    return run


def _assert_same_bits(got, want):
    for name, a, e in zip(NAMES, got, want):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        np.testing.assert_array_equal(a, e, err_msg=name)
        np.testing.assert_array_equal(np.signbit(a), np.signbit(e), err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 9, 7, 16), (2, 5, 5, 32), (1, 1, 2, 16), (130, 64)])
@pytest.mark.parametrize("relu, addend", [(False, False), (True, False), (True, True),
                                          (False, True)])
def test_compiled_arithmetic_gives_the_numpy_paths_bits(monkeypatch, rng, dtype, shape, relu,
                                                       addend):
    """Blocks of 50 rows (one block, several, a remainder of a few rows): the compiled
    statistics and coefficients give every output of the NumPy arithmetic bit for bit."""
    monkeypatch.setattr(native_norm, "MOMENT_ROWS", 50)
    monkeypatch.setattr(native_norm, "BLOCK_ROWS", 50)
    calls = []
    for name in ("forward", "backward"):
        kernel = getattr(native_bn, name)
        monkeypatch.setattr(native_bn, name,
                            lambda *a, _k=kernel, _n=name: calls.append(_n) or _k(*a))
    run = _pass(rng, shape, dtype, relu, addend)
    got = run()
    assert calls == ["forward", "backward"]
    monkeypatch.setattr(native_bn, "ENABLED", False)
    want = run()
    assert calls == ["forward", "backward"]
    _assert_same_bits(got, want)


@pytest.mark.parametrize("momentum, eps", [(0.0, 1e-3), (1.0, 1e-5), (0.3, 0.25)])
def test_momentum_and_eps_reach_the_kernel(monkeypatch, rng, momentum, eps):
    """The running statistics and ``inv_std`` follow ``momentum`` and ``eps`` as the NumPy
    path's do (one row count, several settings: no constant of one call reused for another)."""
    run = _pass(rng, (4, 6, 6, 16), np.float32, True, False, momentum, eps)
    got = run()
    monkeypatch.setattr(native_bn, "ENABLED", False)
    _assert_same_bits(got, run())


def test_a_training_layer_runs_its_passes_here(monkeypatch, rng):
    """A training BatchNorm2D → ReLU calls the kernels once each way; its running statistics
    and gradients equal those of the NumPy arithmetic, over two steps."""
    calls = []
    for name in ("forward", "backward"):
        kernel = getattr(native_bn, name)
        monkeypatch.setattr(native_bn, name,
                            lambda *a, _k=kernel, _n=name: calls.append(_n) or _k(*a))
    x = rng.normal(1.0, 2.0, size=(4, 8, 8, 32)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)

    def steps():
        model = nn.Sequential(nn.BatchNorm2D(32), nn.ReLU())
        out = []
        for _ in range(2):
            model.zero_grad()
            y = model(x)
            model.backward(dy)
            bn = model[0]
            out += [np.asarray(y), bn.running_mean.copy(), bn.running_var.copy(),
                    bn.weight.grad.copy(), bn.bias.grad.copy()]
        return out

    got = steps()
    assert calls == ["forward", "backward"] * 2
    monkeypatch.setattr(native_bn, "ENABLED", False)
    for a, e in zip(got, steps()):
        np.testing.assert_array_equal(a, e)


def test_declines_what_it_does_not_take(rng):
    """Eval mode, channels that do not fill a vector, mixed dtypes, a missing momentum and
    non-NumPy vectors are left to the caller's path."""
    x = rng.normal(size=(2, 4, 4, 16)).astype(np.float32)
    v = np.ones(16, np.float32)
    assert native_bn.batch_norm(x, v, v, v, v, True, 0.1, 1e-5) is not DECLINE
    assert native_bn.batch_norm(x, v, v, v, v, False, 0.1, 1e-5) is DECLINE
    assert native_bn.batch_norm(x[..., :3], v[:3], v[:3], v[:3], v[:3], True, 0.1,
                                1e-5) is DECLINE
    assert native_bn.batch_norm(x, v.astype(np.float64), v, v, v, True, 0.1, 1e-5) is DECLINE
    assert native_bn.batch_norm(x, v, v, v, v, True, None, 1e-5) is DECLINE
    assert native_bn.batch_norm(x, v.tolist(), v, v, v, True, 0.1, 1e-5) is DECLINE
    assert native_bn.batch_norm_backward(x, None, x, v, v, v, False) is DECLINE
    assert native_bn.batch_norm_backward(x, None, x, v, v.astype(np.float64), v,
                                         True) is DECLINE
