"""The compiled convolution kernels (``anycnn.native``) agree with the portable im2col path
within rounding, forward and backward, over kernel sizes, strides, asymmetric padding, channel
counts that do and do not fill a vector, both float dtypes and odd batch sizes; and they can be
turned off (``ANYCNN_NATIVE=0``, ``ANYCNN_FASTPATH=0``)."""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import anycnn
from anycnn.kernels import native
from anycnn.kernels import threads as kthreads
from anycnn.nn import functional as F
from tests.rounding import assert_rounding_close
from tests.test_resnet_fastpaths import batch_norm_run

HAVE_HALIDE = importlib.util.find_spec("halide") is not None


def _watch(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name``: the returned list gets each call's ``(args, kwargs)``."""
    calls, kernel = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append((a, kw)) or kernel(*a, **kw))
    return calls


def _conv(x, w, b, stride, pads, dy, input_grad=True):
    y, ctx = F.conv2d_forward(x, w, b, stride, pads, (1, 1))
    dx, dw, db = F.conv2d_backward(dy, ctx, w, input_grad)
    return y, dx, dw, db


CASES = [
    # (n, h, w, c_in, c_out, kernel, stride, pads)
    (3, 9, 9, 16, 16, 3, 1, (1, 1, 1, 1)),        # 'same', one vector of channels
    (2, 8, 10, 32, 64, 3, 1, (1, 1, 1, 1)),       # two vectors per tile, non-square
    (5, 11, 11, 16, 32, 3, 2, (1, 1, 1, 1)),      # stride 2 (input gradient from a spread grid)
    (4, 8, 8, 16, 32, 1, 2, (0, 0, 0, 0)),        # 1x1 stride-2 shortcut
    (1, 7, 6, 3, 10, 3, 1, (0, 0, 0, 0)),         # guarded channel tile, 'valid', batch 1
    (2, 6, 9, 8, 24, 2, 1, (0, 1, 1, 0)),         # even kernel, asymmetric 'same' padding
    (3, 13, 12, 16, 16, 5, 3, (2, 1, 0, 2)),      # kernel 5, stride 3, uneven padding
    (2, 5, 5, 1, 32, 3, 1, (1, 1, 1, 1)),         # one input channel (first layer)
    (2, 4, 14, 32, 64, 3, 1, (1, 1, 1, 1)),       # rows of 14: tiles of 7 pixels
    (1, 3, 12, 16, 16, 3, 1, (1, 1, 1, 1)),       # rows of 12: tiles of 6 pixels
    (2, 9, 8, 16, 16, 2, 2, (0, 0, 1, 0)),        # input gradient by phases, one tap each
    (2, 10, 9, 16, 32, 4, 2, (1, 2, 2, 1)),       # ... two taps each, uneven padding
]


@pytest.mark.usefixtures("native_on")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[3]}to{c[4]}k{c[5]}s{c[6]}" for c in CASES])
def test_native_convolution_matches_portable(monkeypatch, rng, dtype, case):
    n, h, w, cin, cout, k, s, pads = case
    x = rng.normal(size=(n, h, w, cin)).astype(dtype)
    wt = rng.normal(size=(k, k, cin, cout)).astype(dtype)
    b = rng.normal(size=cout).astype(dtype)
    # the kernels are exact for any channel count; which shapes they take is a speed rule
    # (test_narrow_layers_are_left_to_the_numpy_path)
    monkeypatch.setattr(native, "channels_fill_vectors", lambda channels, dtype: True)
    assert native.applies(x, wt, (s, s), pads, (1, 1), 1)
    ho = (h + pads[0] + pads[1] - k) // s + 1
    wo = (w + pads[2] + pads[3] - k) // s + 1
    dy = rng.normal(size=(n, ho, wo, cout)).astype(dtype)

    calls = _watch(monkeypatch, native, "conv2d")
    fast = _conv(x, wt, b, (s, s), pads, dy)
    assert calls, "the native kernel was not used"
    monkeypatch.setattr(native, "ENABLED", False)
    slow = _conv(x, wt, b, (s, s), pads, dy)
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), fast, slow):
        assert_rounding_close(a, e, err_msg=name)
    monkeypatch.setattr(native, "ENABLED", True)
    for a, e in zip(fast, _conv(x, wt, b, (s, s), pads, dy)):  # repeatable
        np.testing.assert_array_equal(a, e)


@pytest.mark.usefixtures("native_on")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_narrow_layers_are_left_to_the_numpy_path(rng, dtype):
    """A convolution whose output channels do not fill whole vector registers (LeNet's 6, a
    3 -> 10 layer) runs on the NumPy path, forward and backward, where the guarded channel
    tiles measured slower; one that fills them (16, 32, 64 float32 channels) runs compiled. An
    input gradient whose C_in does not fill the vectors is left to the portable path, which
    then computes it a cache-sized chunk at a time on the library's threads."""
    lanes = native.vector_lanes(dtype)
    x = rng.normal(size=(2, 8, 8, 1)).astype(dtype)
    for cout, taken in ((6, False), (lanes + 2, False), (lanes, True), (4 * lanes, True)):
        wt = rng.normal(size=(3, 3, 1, cout)).astype(dtype)
        assert native.applies(x, wt, (1, 1), (1, 1, 1, 1), (1, 1), 1) is taken, cout
    assert not native.input_grad_applies(np.zeros((3, 3, 3, lanes), dtype))
    assert native.input_grad_applies(np.zeros((3, 3, lanes, lanes), dtype))


@pytest.mark.usefixtures("native_on")
@pytest.mark.parametrize("regs", [native.Registers(512, 32), native.Registers(256, 16),
                                  native.Registers(128, 32)], ids=["avx512", "avx2", "neon"])
def test_register_tiles_follow_the_cpu_and_stay_exact(monkeypatch, rng, regs):
    """The tiles are sized from the CPU's vector registers (AVX-512's tiles spill on AVX2), and
    every CPU's tiles compute the same convolutions (Halide compiles each for this host)."""
    monkeypatch.setattr(native, "registers", lambda: regs)
    lanes = regs.bits // 32
    assert native.vector_lanes(np.float32) == lanes
    assert native.vector_lanes(np.float64) == lanes // 2
    tile, vector, guard = native._tiles(np.dtype(np.float32), 4 * lanes)
    assert (tile, vector, guard) == (2 * lanes, lanes, False)
    for width in (8, 12, 14, 16, 28, 32):  # 2 vectors x pixels: 3/4 of the registers at most
        assert 2 * native._pixel_tile(width) <= regs.count * 3 // 4
    for case in (CASES[1], CASES[2], CASES[10]):
        n, h, w, cin, cout, k, s, pads = case
        x = rng.normal(size=(n, h, w, cin)).astype(np.float32)
        wt = rng.normal(size=(k, k, cin, cout)).astype(np.float32)
        b = rng.normal(size=cout).astype(np.float32)
        ho = (h + pads[0] + pads[1] - k) // s + 1
        dy = rng.normal(size=(n, ho, (w + pads[2] + pads[3] - k) // s + 1, cout))
        dy = dy.astype(np.float32)
        fast = _conv(x, wt, b, (s, s), pads, dy)
        monkeypatch.setattr(native, "ENABLED", False)
        slow = _conv(x, wt, b, (s, s), pads, dy)
        for name, a, e in zip(("y", "dx", "dweight", "dbias"), fast, slow):
            assert_rounding_close(a, e, err_msg=f"{case}: {name}")
        monkeypatch.setattr(native, "ENABLED", True)


@pytest.mark.usefixtures("native_on")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", [32, 12, 7])
def test_halved_vector_tiles_match_portable(monkeypatch, rng, dtype, width):
    """The forward tiles of a CPU that runs 512-bit operations as two 256-bit halves (AMD Zen
    4, :func:`native.halved_vectors`), forced on here whatever the CPU: one vector of channels
    by 8 pixels at most (16 elsewhere), forward and input gradient, equal to the portable path
    forward, backward and with eval mode's addend and ReLU in the kernel."""
    monkeypatch.setattr(native, "registers", lambda: native.Registers(512, 32))
    monkeypatch.setattr(native, "halved_vectors", lambda: True)
    native._plan.cache_clear()
    assert native._pixel_tile(32, 1, True) == 8 and native._pixel_tile(32, 1) == 16
    built = _watch(monkeypatch, native, "_forward_pipeline")
    cout = native.vector_lanes(dtype)  # one vector of channels
    x = rng.normal(size=(2, 5, width, 16)).astype(dtype)
    wt = rng.normal(size=(3, 3, 16, cout)).astype(dtype)
    b = rng.normal(size=cout).astype(dtype)
    plus = rng.normal(size=(2, 5, width, cout)).astype(dtype)
    dy = rng.normal(size=(2, 5, width, cout)).astype(dtype)
    pads = (1, 1, 1, 1)
    fast = _conv(x, wt, b, (1, 1), pads, dy)
    eval_mode = native.conv2d_epilogue(x, wt, b, 1, pads, (5, width), plus, True)
    tiles = {a[1][3] for a, _ in built if len(a) < 10}  # forward pipelines (no adjoint)
    assert tiles == {native._pixel_tile(width, 1, True)} and max(tiles) <= 8, tiles
    tile, lanes, _ = native._tiles(np.dtype(dtype), 16)  # the input gradient's C_out: 16
    assert {a[1][3] for a, _ in built if len(a) == 10} == {
        native._pixel_tile(width, tile // lanes, True)}
    monkeypatch.setattr(native, "ENABLED", False)
    slow = _conv(x, wt, b, (1, 1), pads, dy)
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), fast, slow):
        assert_rounding_close(a, e, err_msg=f"{name}")
    assert_rounding_close(eval_mode, np.maximum(slow[0] + plus, 0), err_msg="epilogue")
    native._plan.cache_clear()


@pytest.mark.usefixtures("native_on")
def test_one_by_one_forward_reads_in_place_and_takes_no_padding(rng):
    """A forward 1x1 kernel reads its input in place (no padded copy): it equals the sums
    it computes, and refuses padding (which :func:`native.applies` never hands it)."""
    x = rng.normal(size=(2, 5, 7, 16)).astype(np.float32)
    w = rng.normal(size=(1, 1, 16, 32)).astype(np.float32)
    y = native.conv2d(x, w, None, 2, (0, 0, 0, 0), (3, 4))
    assert_rounding_close(y, np.einsum("nhwc,cd->nhwd", x[:, ::2, ::2], w[0, 0]))
    with pytest.raises(ValueError, match="no padding"):
        native.conv2d(x, w, None, 1, (1, 1, 1, 1), (7, 9))


@pytest.mark.usefixtures("native_on")
def test_weight_gradient_sums_image_groups_and_the_remainder(rng, monkeypatch):
    """Batches that are, and are not, a multiple of the images per weight-gradient part."""
    monkeypatch.setattr(native, "WEIGHT_GRAD_IMAGES", 3)
    monkeypatch.setattr(native, "WEIGHT_GRAD_PIXELS", 1)
    assert native._images_per_part(7, 36) == 3
    monkeypatch.setattr(native, "WEIGHT_GRAD_PIXELS", 1024)  # 8x8: 16 images a part
    assert native._images_per_part(128, 64) == 16 and native._images_per_part(64, 64) == 8
    assert native._images_per_part(128, 1024) == 3
    monkeypatch.setattr(native, "WEIGHT_GRAD_PIXELS", 1)
    for n in (1, 3, 7):
        x = rng.normal(size=(n, 6, 6, 16))
        dy = rng.normal(size=(n, 6, 6, 16))
        expected = np.einsum("nhwc,nhwd->cd",
                             np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))[:, 1:7, 2:8], dy)
        got = native.conv2d_weight_grad(x, dy, (3, 3), 1, (1, 1, 1, 1))
        assert_rounding_close(got[1, 2], expected)


@pytest.mark.usefixtures("native_on")
def test_not_used_where_it_does_not_apply(rng):
    x = rng.normal(size=(2, 6, 6, 4)).astype(np.float32)
    w = rng.normal(size=(3, 3, 4, 4 * native.vector_lanes(np.float32))).astype(np.float32)
    assert native.applies(x, w, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert not native.applies(x, w, (1, 1), (1, 1, 1, 1), (2, 2), 1)      # dilation
    assert not native.applies(x, w[:, :, :2], (1, 1), (1, 1, 1, 1), (1, 1), 2)  # groups
    assert not native.applies(x, w, (1, 2), (1, 1, 1, 1), (1, 1), 1)      # two strides
    assert not native.applies(x, w, (1, 1), (3, 3, 3, 3), (1, 1), 1)      # pad >= kernel
    assert not native.applies(x, w.astype(np.float64), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert not native.applies(x.astype(np.float16), w.astype(np.float16), (1, 1),
                              (1, 1, 1, 1), (1, 1), 1)


@pytest.mark.usefixtures("native_on")
@pytest.mark.parametrize("env", ["ANYCNN_NATIVE", "ANYCNN_FASTPATH"])
def test_environment_turns_the_kernels_off(env):
    code = ("import numpy as np; from anycnn.kernels import native; "
            "print(native.available(np), native.describe())")
    out = subprocess.run([sys.executable, "-c", code], env={**_clean_env(), env: "0"},
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("False off"), out
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(),
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("True on"), out


def _clean_env():
    return {k: v for k, v in os.environ.items() if k not in ("ANYCNN_NATIVE", "ANYCNN_FASTPATH")}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64", "arm64"),
                    reason="halide is a dependency only where it has wheels")
def test_installed_where_it_is_a_dependency(monkeypatch):
    monkeypatch.delenv("ANYCNN_NATIVE", raising=False)
    monkeypatch.delenv("ANYCNN_FASTPATH", raising=False)
    monkeypatch.setattr(native, "ENABLED", None)  # read the environment and look again
    monkeypatch.setattr(kthreads, "ENABLED", None)
    assert HAVE_HALIDE and native.available(np, np.float32)


@pytest.mark.usefixtures("native_on")
def test_strided_views_in_and_out(rng):
    """Inputs and output gradients that are views (a Concat's channel slices) are read as the
    values they show: the kernels get contiguous copies that live until they have run."""
    whole = rng.normal(size=(4, 12, 12, 48)).astype(np.float32)
    grads = rng.normal(size=(4, 12, 12, 48)).astype(np.float32)
    x, dy = whole[..., 8:24], grads[..., 16:32]
    assert not x.flags.c_contiguous and not dy.flags.c_contiguous
    w = rng.normal(size=(3, 3, 16, 16)).astype(np.float32)
    b = rng.normal(size=16).astype(np.float32)
    for _ in range(3):  # freed temporaries get reused by the next allocations
        fast = _conv(x, w, b, (1, 1), (1, 1, 1, 1), dy)
        expected = _conv(np.ascontiguousarray(x), w, b, (1, 1), (1, 1, 1, 1),
                         np.ascontiguousarray(dy))
        for name, a, e in zip(("y", "dx", "dweight", "dbias"), fast, expected):
            np.testing.assert_array_equal(a, e, err_msg=name)


@pytest.mark.usefixtures("native_on")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(3, 9, 7, 16), (2, 5, 5, 32)])
@pytest.mark.parametrize("whole", [True, False])
def test_native_batch_norm_matches_numpy_and_portable(monkeypatch, rng, dtype, relu, training,
                                                      shape, whole):
    """The compiled BatchNorm passes (``anycnn.native_norm``, blocks of 50 rows: several
    blocks and a remainder; in training ``whole``, as one pass with its per-channel arithmetic
    compiled too, ``anycnn.native_bn``) against the NumPy fast path and the portable
    expressions."""
    from anycnn.kernels import native_bn, native_norm

    monkeypatch.setattr(native_norm, "BLOCK_ROWS", 50)
    monkeypatch.setattr(native_bn, "ENABLED", whole)
    run = batch_norm_run(rng, shape, dtype, training, relu)
    assert native_norm.applies(np.zeros((1, shape[-1]), dtype))
    calls = (_watch(monkeypatch, native_bn, "backward") if whole and training
             else _watch(monkeypatch, native_norm, "_block_sums"))
    compiled = run()
    assert calls, "the compiled BatchNorm passes were not used"
    monkeypatch.setattr(native, "ENABLED", False)
    numpy_fast = run()
    monkeypatch.setattr(kthreads, "ENABLED", False)
    portable = run()
    for name, a, b, e in zip(("y", "mean", "var", "dx", "dgamma", "dbeta"), compiled,
                             numpy_fast, portable):
        assert_rounding_close(a, e, err_msg=name)
        assert_rounding_close(b, e, err_msg=name)


@pytest.mark.usefixtures("native_on")
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_backward_after_the_kernels_went_off(monkeypatch, rng, relu):
    """The compiled forward keeps the input rows, not ``xhat``; a backward without the kernels
    (turned off in between) normalises them itself."""
    shape = (3, 5, 4, 16)
    x = rng.normal(1.0, 2.0, size=shape)
    gamma, beta, dy = rng.normal(size=16), rng.normal(size=16), rng.normal(size=shape)

    def forward():
        return F.batch_norm_forward(x, gamma, beta, np.zeros(16), np.ones(16), True, 0.1, 1e-5,
                                    relu=relu)[:2]

    _, ctx = forward()
    assert ctx.mean is not None  # the compiled forward ran
    monkeypatch.setattr(native, "ENABLED", False)
    got = F.batch_norm_backward(dy, ctx, gamma)
    want = F.batch_norm_backward(dy, forward()[1], gamma)
    for a, e in zip(got, want):
        assert_rounding_close(a, e)


@pytest.mark.usefixtures("native_on")
def test_read_only_and_empty_batches(rng):
    """Read-only arrays (a memory-mapped dataset, a frozen weight) are read, not refused; an
    empty batch gives empty outputs and zero weight gradients."""
    from anycnn.kernels import native_norm

    x = rng.normal(size=(2, 6, 6, 16)).astype(np.float32)
    w = rng.normal(size=(3, 3, 16, 16)).astype(np.float32)
    dy = rng.normal(size=(2, 6, 6, 16)).astype(np.float32)
    expected = _conv(x, w, None, (1, 1), (1, 1, 1, 1), dy)
    for a in (x, w, dy):
        a.flags.writeable = False
    for got, e in zip(_conv(x, w, None, (1, 1), (1, 1, 1, 1), dy), expected):
        if e is not None:
            np.testing.assert_array_equal(got, e)
    rows = x.reshape(-1, 16)
    np.testing.assert_array_equal(native_norm.sums(rows), native_norm.sums(rows.copy()))

    empty = np.zeros((0, 6, 6, 16), np.float32)
    y, dx, dw, db = _conv(empty, w, None, (1, 1), (1, 1, 1, 1), empty)
    assert y.shape == dx.shape == (0, 6, 6, 16)
    assert not dw.any() and dw.shape == w.shape and not db.any()


BLOCKS = [
    # (n, h, w, c_in, c_out, kernel, conv stride, padding, pool, bias)
    (3, 14, 14, 32, 64, 3, 1, 1, 2, True),       # simple-cnn's second block
    (2, 12, 12, 1, 32, 3, 1, 1, 2, True),        # one input channel: im2col input gradient
    (2, 7, 9, 16, 16, 3, 1, 1, 2, True),         # odd sizes: the last row and column unpooled
    (2, 12, 12, 16, 48, 3, 1, 1, 3, False),      # 3x3 windows, no bias
    (2, 10, 10, 16, 16, 3, 2, 1, (2, 1), True),  # strided convolution, 2x1 windows
    (1, 8, 8, 16, 10, 3, 1, 1, 2, True),         # guarded channel tile
]


def _block_run(rng, dtype, case, zeros=False):
    """A function computing ``(y, dx, dweight, dbias)`` of one Conv2D → ReLU → MaxPool2D
    block, forward and backward, on fixed random data (``zeros``: a zero border, so whole
    windows tie at exactly zero, as MNIST's background does)."""
    from anycnn.nn import Conv2D, MaxPool2D, ReLU, Sequential

    n, h, w, cin, cout, k, s, p, pool, bias = case
    x = rng.normal(size=(n, h, w, cin)).astype(dtype)
    if zeros:
        x[:, :4] = 0
    model = Sequential(Conv2D(cin, cout, k, stride=s, padding=p, bias=bias), ReLU(),
                       MaxPool2D(pool))
    conv = model.layers[0]
    conv.weight.data = rng.normal(size=conv.weight.shape).astype(dtype)
    if bias:
        conv.bias.data = rng.normal(size=cout).astype(dtype)
    dy = None

    def run():
        nonlocal dy
        conv.weight.grad = None
        if bias:
            conv.bias.grad = None
        y = model(x)
        if dy is None:
            dy = np.random.default_rng(1).normal(size=y.shape).astype(dtype)
        dx = model.backward(dy)
        return y, dx, conv.weight.grad, conv.bias.grad if bias else np.zeros(1, dtype)

    return run


@pytest.mark.usefixtures("native_on")
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", BLOCKS, ids=[f"{c[3]}to{c[4]}s{c[6]}p{c[8]}" for c in BLOCKS])
def test_compiled_conv_relu_maxpool_matches_portable(monkeypatch, rng, dtype, case, zeros):
    """The one-kernel Conv-ReLU-MaxPool block (and its backward from the pooled gradient and
    the window codes) against the fused im2col block and the layer-by-layer portable path."""
    monkeypatch.setattr(native, "channels_fill_vectors", lambda channels, dtype: True)
    run = _block_run(rng, dtype, case, zeros)
    calls = _watch(monkeypatch, native, "conv2d_relu_maxpool")
    compiled = run()
    assert calls, "the compiled block was not used"
    monkeypatch.setattr(native, "ENABLED", False)
    for path in ("im2col", "portable"):
        monkeypatch.setattr(kthreads, "ENABLED", path == "im2col")
        for name, a, e in zip(("y", "dx", "dweight", "dbias"), compiled, run()):
            assert_rounding_close(a, e, err_msg=f"{name} vs {path}")
    monkeypatch.setattr(native, "ENABLED", True)
    monkeypatch.setattr(kthreads, "ENABLED", True)
    for a, e in zip(compiled, run()):  # repeatable
        np.testing.assert_array_equal(a, e)


@pytest.mark.usefixtures("native_on")
def test_compiled_block_codes_and_unpooling(rng):
    """The codes name each window's first maximum (row-major), 255 where the ReLU is off; a
    NaN is its window's maximum; unpooling puts each gradient at its code's tap."""
    x = np.zeros((1, 2, 4, 1), np.float32)
    x[0, :, :, 0] = [[1, 3, 2, 2], [3, 0, 2, -1]]  # windows: tie 3,3 → tap 1; tie 2,2 → tap 0
    w = np.ones((1, 1, 1, 16), np.float32)
    b = np.zeros(16, np.float32)
    b[1] = -5.0  # channel 1: the ReLU is off everywhere
    out, code = native.conv2d_relu_maxpool(x, w, b, 1, (0, 0, 0, 0), (2, 4), (2, 2))
    assert out.shape == code.shape == (1, 1, 2, 16) and code.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0, :, 0], [3, 2])
    np.testing.assert_array_equal(code[0, 0, :, 0], [1, 0])
    assert (code[..., 1] == native.DEAD).all() and (out[..., 1] == 0).all()
    grad = np.arange(32, dtype=np.float32).reshape(1, 1, 2, 16) + 1
    d = native.Pooled(grad, code, (2, 2)).unpooled((2, 4))
    np.testing.assert_array_equal(d[0, :, :, 0], [[0, 1, 17, 0], [0, 0, 0, 0]])
    assert not d[..., 1].any()
    x[0, 1, 1, 0] = np.nan
    out, code = native.conv2d_relu_maxpool(x, w, b, 1, (0, 0, 0, 0), (2, 4), (2, 2))
    assert np.isnan(out[0, 0, 0, 0]) and out[0, 0, 1, 0] == 2


@pytest.mark.usefixtures("native_on")
def test_compiled_block_not_used_for_overlapping_or_padded_pools(rng):
    from anycnn.nn import Conv2D, MaxPool2D, ReLU
    from anycnn.nn.fusion import ConvReluMaxPool

    x = rng.normal(size=(2, 9, 9, 16)).astype(np.float32)
    conv = Conv2D(16, 16, 3, padding=1)
    assert ConvReluMaxPool(conv, ReLU(), MaxPool2D(2)).forward_compiled(x) is not None
    for pool in (MaxPool2D(3, stride=2), MaxPool2D(2, padding=1), MaxPool2D(3, stride=4),
                 MaxPool2D(2, ceil_mode=True)):
        assert ConvReluMaxPool(conv, ReLU(), pool).forward_compiled(x) is None, pool
    dilated = ConvReluMaxPool(Conv2D(16, 16, 3, dilation=2), ReLU(), MaxPool2D(2))
    assert dilated.forward_compiled(x) is None


@pytest.mark.usefixtures("native_on")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("projection", [False, True])
def test_residual_input_gradient_starts_from_the_shortcut_gradient(monkeypatch, rng, dtype,
                                                                    projection):
    """A Residual's backward hands the shortcut's gradient to the body's first convolution,
    whose compiled input gradient starts its sums from it: equal to the portable sum."""
    from anycnn.nn import BatchNorm2D, Conv2D, ReLU, Residual, Sequential

    def block():
        # no bias before a BatchNorm: its gradient is zero up to rounding noise
        body = Sequential(Conv2D(16, 16, 3, stride=2 if projection else 1, padding=1,
                                 bias=False),
                          BatchNorm2D(16), ReLU(), Conv2D(16, 16, 3, padding=1))
        shortcut = (Sequential(Conv2D(16, 16, 1, stride=2, bias=False), BatchNorm2D(16))
                    if projection else None)
        model = Residual(body, shortcut)
        for p in model.parameters():
            p.data = rng.normal(size=p.shape).astype(dtype)
        return model

    model = block()
    x = rng.normal(size=(3, 8, 8, 16)).astype(dtype)
    with anycnn.no_grad():
        dy = rng.normal(size=model(x).shape).astype(dtype)

    def run():
        for p in model.parameters():
            p.grad = None
        y = model(x)
        return [y, model.backward(dy)] + [p.grad for p in model.parameters()]

    calls = _watch(monkeypatch, native, "conv2d_input_grad")
    compiled = run()
    assert any(len(a) > 5 and a[5] is not None for a, _ in calls), (
        "no input gradient started from an addend")
    monkeypatch.setattr(native, "ENABLED", False)
    for a, e in zip(compiled, run()):
        assert_rounding_close(a, e)
    monkeypatch.setattr(native, "ENABLED", True)
    model(x)
    assert model.backward(dy, input_grad=False) is None


def test_backward_add_defaults_add_after(rng):
    """Modules without a way to start from the addend add it after; an empty Sequential
    passes the gradient through plus the addend."""
    from anycnn.nn import ReLU, Sequential

    x, dy, a = (rng.normal(size=(2, 3, 3, 4)) for _ in range(3))
    relu = ReLU()
    relu(x)
    np.testing.assert_array_equal(relu.backward_add(dy, a), dy * (x > 0) + a)
    empty = Sequential()
    empty(x)
    np.testing.assert_array_equal(empty.backward_add(dy, a), dy + a)
