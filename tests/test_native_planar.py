"""The input gradient of a one-channel convolution under a max pool, vectorised over pixels
(``anycnn.kernels.native_planar``), agrees with the portable path within rounding (pool-plane
rows of windows that tile the output: LeNet's first layer at 28x28 and 32x32, uneven padding,
odd heights, 3x3 and 3x2 pools, ties in the pool), is the one LeNet uses, and declines what
it does not take."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import anycnn
from anycnn.kernels import native, native_narrow, native_planar, threads
from anycnn.kernels.dispatch import DECLINE
from anycnn.models import build_model
from anycnn.nn.functional import conv as C
from tests.kernel_watch import watch
from tests.rounding import assert_rounding_close

pytestmark = pytest.mark.usefixtures("native_on")


@pytest.fixture
def sixteen_lanes():
    """The kernel takes 16-lane vectors only (float32 on AVX-512)."""
    if native.vector_lanes(np.float32) != 16:
        pytest.skip("the pixel-vectorised kernel needs 16 float32 lanes")


def _watch(monkeypatch) -> list:
    """Count the kernel's calls (of native_planar.input_grad)."""
    return watch(monkeypatch, native_planar)


def _window(hw, k, pads, pool):
    return replace(C.conv_windows(hw, (k, k), (1, 1), pads, (1, 1)), pool_order=(pool, pool))


CASES = [
    # (n, (h, w), c_out, kernel, pads (top, bottom, left, right), pool window)
    (3, (28, 28), 6, 5, (2, 2, 2, 2), (2, 2)),    # LeNet's first layer
    (2, (32, 32), 6, 5, (2, 2, 2, 2), (2, 2)),    # LeNet at 32x32
    (2, (32, 32), 6, 5, (0, 0, 0, 0), (2, 2)),    # 'valid': the output narrower than the input
    (2, (32, 32), 6, 5, (2, 2, 4, 4), (2, 2)),    # the output wider than the input
    (2, (25, 28), 4, 5, (4, 1, 3, 1), (2, 2)),    # odd height, uneven padding
    (1, (9, 24), 5, 3, (1, 0, 2, 2), (2, 2)),     # few rows, padding past the kernel's middle
    (2, (12, 36), 3, 3, (2, 0, 1, 1), (3, 3)),    # a 3x3 pool
    (2, (14, 26), 1, 4, (3, 1, 1, 2), (3, 2)),    # an even kernel, a 3x2 pool, one channel
]


@pytest.mark.parametrize("one_thread", [False, True], ids=["threads", "one-thread"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[1][0]}x{c[1][1]}-{c[2]}ch-k{c[3]}-p{c[5][0]}"
                                             f"{c[5][1]}" for c in CASES])
def test_matches_the_portable_input_gradient(monkeypatch, rng, sixteen_lanes, case,
                                             one_thread):
    n, hw, cout, k, pads, pool = case
    win = _window(hw, k, pads, pool)
    wt = rng.normal(size=(k, k, 1, cout)).astype(np.float32)
    d = rng.normal(size=(n, win.positions, cout)).astype(np.float32)
    assert native_planar.applies(d, wt, win, 1)
    expected = C.conv_input_grad.portable(d, wt, win)
    if one_thread:  # inside a batch-parallel region
        monkeypatch.setattr(threads._region, "active", True, raising=False)
    calls = _watch(monkeypatch)
    result = native_narrow.conv_input_grad_kernel(d, wt, win, 1)
    assert calls and result.shape == (n, *hw, 1) and result.dtype == np.float32
    assert_rounding_close(result, expected)
    assert_rounding_close(C.conv_input_grad(d, wt, win), expected)  # the dispatch point


def test_an_empty_batch(sixteen_lanes):
    win = _window((28, 28), 5, (2, 2, 2, 2), (2, 2))
    wt = np.ones((5, 5, 1, 6), np.float32)
    dx = native_planar.input_grad(np.zeros((0, win.positions, 6), np.float32), wt, win, True)
    assert dx.shape == (0, 28, 28, 1)


def test_lenet_uses_it_and_ties_in_the_pool_agree(monkeypatch, rng, sixteen_lanes):
    """LeNet's input gradient goes through the kernel and equals the one with the compiled
    kernels off, on binary images with equal weights: many pooling windows hold equal
    maxima, and the gradient reaches the position the portable pool chose."""
    x = (rng.random((4, 28, 28, 1)) < 0.5).astype(np.float32)
    grads = []
    for enabled in (True, False):
        monkeypatch.setattr(native, "ENABLED", enabled)
        calls = _watch(monkeypatch)
        anycnn.manual_seed(0)
        net = build_model("lenet5")
        conv = net.layers[0]
        conv.weight.data[...] = 0.1  # every window sum a multiple of 0.1: ties
        conv.bias.data[...] = 0.0
        y = net.forward(x)
        grads.append(net.backward(np.ones_like(y)))
        assert bool(calls) is enabled
    assert np.count_nonzero(grads[1]) > 0
    assert_rounding_close(grads[0], grads[1])


def test_declines_what_it_does_not_take(monkeypatch, rng, sixteen_lanes):
    win = _window((28, 28), 5, (2, 2, 2, 2), (2, 2))
    wt = rng.normal(size=(5, 5, 1, 6)).astype(np.float32)
    d = np.zeros((2, win.positions, 6), np.float32)
    assert native_planar.applies(d, wt, win, 1)
    assert not native_planar.applies(d.astype(np.float64), wt.astype(np.float64), win, 1)
    assert not native_planar.applies(d, wt.astype(np.float64), win, 1)  # mixed dtypes
    assert not native_planar.applies(d, wt, win, 2)
    two_in = rng.normal(size=(5, 5, 2, 6)).astype(np.float32)
    assert not native_planar.applies(d, two_in, win, 1)
    many = native_planar.MAX_OUTPUT_CHANNELS + 1
    assert not native_planar.applies(np.zeros((2, win.positions, many), np.float32),
                                     rng.normal(size=(5, 5, 1, many)).astype(np.float32),
                                     win, 1)
    assert not native_planar.applies(d, wt, replace(win, pool_order=None), 1)
    assert not native_planar.applies(d[:, :, None], wt, win, 1)  # not rows
    gaps = _window((27, 27), 5, (2, 2, 2, 2), (2, 2))  # a row and a column past the windows
    assert not native_planar.applies(np.zeros((1, gaps.positions, 6), np.float32), wt, gaps, 1)
    narrow = _window((16, 16), 5, (2, 2, 2, 2), (2, 2))  # 8 columns per phase
    assert not native_planar.applies(np.zeros((1, narrow.positions, 6), np.float32), wt,
                                     narrow, 1)
    strided = replace(win, pool_order=((2, 2), (3, 3)))
    assert not native_planar.applies(d, wt, strided, 1)
    monkeypatch.setattr(native, "ENABLED", False)  # the compiled kernels' switches
    assert not native_planar.applies(d, wt, win, 1)


def test_float64_takes_the_narrow_kernel(monkeypatch, rng):
    """float64 (8 lanes) is left to native_narrow's kernel: the same result."""
    win = _window((28, 28), 5, (2, 2, 2, 2), (2, 2))
    wt = rng.normal(size=(5, 5, 1, 6))
    d = rng.normal(size=(2, win.positions, 6))
    calls = _watch(monkeypatch)
    result = native_narrow.conv_input_grad_kernel(d, wt, win, 1)
    assert result is not DECLINE and not calls
    assert_rounding_close(result, C.conv_input_grad.portable(d, wt, win))
