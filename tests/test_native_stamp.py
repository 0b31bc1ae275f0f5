"""The input gradient of a fused one-channel ``Conv2D → ReLU → MaxPool2D`` block computed from
its pooled gradient (``anycnn.kernels.native_stamp``) agrees with the portable path within
rounding (simple-cnn's first block, 5x5 kernels, 3x3 and 2x1 pools, uneven padding, rows and
columns past the last window, dead windows, both float dtypes, on the kernels' threads and on
one), is the one simple-cnn uses, and declines what it does not take."""

from __future__ import annotations

import numpy as np
import pytest

import anycnn
from anycnn.kernels import native, native_stamp, threads
from anycnn.kernels.dispatch import DECLINE
from anycnn.models import build_model
from anycnn.nn.functional import conv as C
from tests.kernel_watch import watch
from tests.rounding import assert_rounding_close

pytestmark = pytest.mark.usefixtures("native_on")


def _watch(monkeypatch) -> list:
    """Count the kernel's calls (of native_stamp.input_grad)."""
    return watch(monkeypatch, native_stamp)


def _pooled(rng, n, hw, cout, k, pads, window, dtype):
    """A fused block's Pooled gradient (the forward's codes, a random pooled gradient), its
    weight, windows and the convolution's output gradient it stands for."""
    x = rng.normal(size=(n, *hw, 1)).astype(dtype)
    wt = rng.normal(size=(k, k, 1, cout)).astype(dtype)
    bias = rng.normal(size=cout).astype(dtype)  # some windows dead (code DEAD), some not
    win = C.conv_windows(hw, (k, k), (1, 1), pads, (1, 1))
    _, code = native.conv2d_relu_maxpool(x, wt, bias, 1, pads, win.out, window)
    pooled = native.Pooled(rng.normal(size=code.shape).astype(dtype), code, window)
    return pooled, wt, win, pooled.unpooled(win.out)


CASES = [
    # (n, (h, w), c_out, kernel, pads (top, bottom, left, right), pool window)
    (3, (28, 28), 32, 3, (1, 1, 1, 1), (2, 2)),   # simple-cnn's first block
    (2, (28, 28), 32, 5, (2, 2, 2, 2), (2, 2)),   # 5x5: 6x6 patches (3 vectors of 16)
    (2, (7, 9), 32, 3, (2, 0, 1, 2), (3, 3)),     # pool 3: rows and columns past the last window
    (2, (9, 7), 16, 3, (0, 0, 0, 0), (2, 2)),     # 'valid', odd sizes
    (1, (5, 6), 16, 2, (1, 0, 0, 1), (2, 1)),     # an even kernel, a 2x1 pool: 8-entry patches
    (2, (11, 13), 48, 4, (3, 0, 1, 2), (2, 2)),   # uneven padding, 48 channels
    (1, (4, 4), 16, 3, (1, 1, 1, 1), (2, 2)),     # narrower than a vector
]


@pytest.mark.parametrize("one_thread", [False, True], ids=["threads", "one-thread"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[1][0]}x{c[1][1]}-{c[2]}ch-k{c[3]}-p{c[5][0]}"
                                             f"{c[5][1]}" for c in CASES])
def test_matches_the_portable_input_gradient(monkeypatch, rng, case, dtype, one_thread):
    n, hw, cout, k, pads, window = case
    pooled, wt, win, dense = _pooled(rng, n, hw, cout, k, pads, window, dtype)
    assert (pooled.code == native.DEAD).any() and (pooled.code != native.DEAD).any()
    assert native_stamp.applies(pooled, wt, win, 1) is (window in native_stamp.WINDOWS)
    expected = C.conv_input_grad.portable(np.reshape(dense, (n, -1, cout)), wt, win)
    if one_thread:  # inside a batch-parallel region: the images on the calling thread
        monkeypatch.setattr(threads._region, "active", True, raising=False)
    result = native_stamp.input_grad(pooled, wt, pads, hw)  # any pool the kernel computes
    assert result.dtype == dtype and result.shape == (n, *hw, 1)
    assert_rounding_close(result, expected)
    if window in native_stamp.WINDOWS:  # the dispatch kernel
        assert_rounding_close(native_stamp.conv2d_input_grad_kernel(pooled, wt, win, 1), result)


def test_an_empty_batch(rng):
    pooled, wt, _, _ = _pooled(rng, 1, (8, 8), 16, 3, (1, 1, 1, 1), (2, 2), np.float32)
    empty = native.Pooled(pooled.grad[:0], pooled.code[:0], (2, 2))
    assert native_stamp.input_grad(empty, wt, (1, 1, 1, 1), (8, 8)).shape == (0, 8, 8, 1)


def test_simple_cnn_uses_it_and_agrees_with_the_portable_path(monkeypatch, rng):
    """simple-cnn's first block (compiled forward, Pooled gradient) takes the kernel, and its
    input gradient equals the one with the compiled kernels off."""
    x = rng.random((3, 28, 28, 1)).astype(np.float32)
    grads = []
    for enabled in (True, False):
        monkeypatch.setattr(native, "ENABLED", enabled)
        calls = _watch(monkeypatch)
        anycnn.manual_seed(0)
        net = build_model("simple-cnn")
        y = net.forward(x)
        grads.append(net.backward(np.ones_like(y)))
        assert bool(calls) is enabled, calls
    assert_rounding_close(grads[0], grads[1])


def test_declines_what_it_does_not_take(monkeypatch, rng):
    pooled, wt, _, dense = _pooled(rng, 1, (8, 8), 16, 3, (1, 1, 1, 1), (2, 2), np.float32)

    def windows(stride=(1, 1), dilation=(1, 1), pads=(1, 1, 1, 1)):
        return C.conv_windows((8, 8), (3, 3), stride, pads, dilation)

    assert native_stamp.applies(pooled, wt, windows(), 1)
    assert not native_stamp.applies(dense, wt, windows(), 1)  # not a Pooled gradient
    assert not native_stamp.applies(pooled, wt, windows(stride=(2, 2)), 1)
    assert not native_stamp.applies(pooled, wt, windows(dilation=(2, 2)), 1)
    assert not native_stamp.applies(pooled, wt, windows(pads=(3, 3, 3, 3)), 1)
    assert not native_stamp.applies(pooled, wt, windows(), 2)
    assert not native_stamp.applies(pooled, wt.astype(np.float64), windows(), 1)  # mixed dtypes
    three = np.repeat(wt, 3, axis=2)  # three input channels: native_narrow's
    assert not native_stamp.applies(pooled, three, windows(), 1)
    assert not native_stamp.applies(pooled._replace(window=(2, 1)), wt, windows(), 1)
    big = rng.normal(size=(9, 9, 1, 16)).astype(np.float32)  # 10x10 patches: too many entries
    assert not native_stamp.applies(pooled, big, C.conv_windows((8, 8), (9, 9), (1, 1),
                                                                (4, 4, 4, 4), (1, 1)), 1)
    assert native_stamp.conv2d_input_grad_kernel(pooled, wt, windows(stride=(2, 2)), 1) is DECLINE
    monkeypatch.setattr(native, "ENABLED", False)  # the compiled kernels' switches
    assert not native_stamp.applies(pooled, wt, windows(), 1)


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=["simple-cnn", "valid-odd"])
def test_the_avx2_build_matches(rng, case):
    """Compiled for AVX2 (8 float32 lanes, 16 registers: two vectors per patch, the tile's 14
    accumulators), on a host that runs AVX2 code: the same result as the portable path."""
    from anycnn.kernels import kernel_cache

    if not {"x86", "64", "linux", "avx2"} <= set(kernel_cache.host_target().split("-")):
        pytest.skip("the host is no x86-64 Linux running AVX2 code")
    import halide as hl

    n, hw, cout, k, pads, window = case
    pooled, wt, win, dense = _pooled(rng, n, hw, cout, k, pads, window, np.float32)
    func, images, params = native_stamp._stamp_pipeline.__wrapped__(
        np.dtype(np.float32), cout, (k, k), window, 16, 8,
        min(native_stamp.POSITION_TILE, pooled.grad.shape[2]), True)
    func.compile_jit(hl.Target("x86-64-linux-avx-avx2-f16c-fma-sse41"))
    arrays = {**pooled.arrays(), "wt": native.operand(wt)}
    for name, a in arrays.items():
        images[name].set(hl.Buffer(a))
    params["top"].set(pads[0])
    params["left"].set(pads[2])
    dx = np.empty((n, *hw, 1), np.float32)
    func.realize(hl.Buffer(dx))
    expected = C.conv_input_grad.portable(np.reshape(dense, (n, -1, cout)), wt, win)
    assert_rounding_close(dx, expected)
