"""The Winograd F(2x2, 3x3) kernels (``anycnn.kernels.native_winograd``) agree with the
portable im2col path within rounding: the forward, the eval epilogue (residual addend, ReLU),
the fused ReLU and 2x2 max pool with its codes, the stride-1 input gradient (with an addend)
and the weight gradient (parts and chunks), both also from a fused block's pooled gradient,
over both float dtypes, 'same' and 'valid' and uneven padding, one and two vectors of output
channels, rows of blocks that a register tile does not divide, each CPU's tiles; they are the
kernels resnet20 and simple-cnn use; they decline what they do not take (small calls
included); ``ANYCNN_WINOGRAD=0`` keeps the direct kernels."""

from __future__ import annotations

import numpy as np
import pytest

import anycnn
from anycnn.kernels import native, native_winograd
from anycnn.models import build_model
from anycnn.nn import functional as F
from tests.rounding import assert_rounding_close

pytestmark = pytest.mark.usefixtures("native_on", "any_size")


@pytest.fixture
def any_size(monkeypatch):
    """Small test shapes take the kernels too (see test_small_calls_keep_the_direct_kernels)."""
    monkeypatch.setattr(native_winograd, "MIN_PIXELS", 0)
    native._weight_grad_plan.cache_clear()
    yield
    native._weight_grad_plan.cache_clear()


@pytest.fixture
def calls(monkeypatch) -> list:
    """Each Winograd kernel call's (input channels, output channels, adjoint, pool)."""
    seen, kernel = [], native_winograd.forward

    def counted(arrays, weight, bias, pads, out_hw, outputs, pool, relu, adjoint, *unpool):
        seen.append((*weight.shape[2:], adjoint, pool))
        return kernel(arrays, weight, bias, pads, out_hw, outputs, pool, relu, adjoint, *unpool)

    monkeypatch.setattr(native_winograd, "forward", counted)
    return seen


def _reference_conv(x, wt, b, pads):
    """The 3x3 stride-1 correlation in float64, by shifted products (no kernel involved)."""
    top, bottom, left, right = pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
    ho, wo = xp.shape[1] - 2, xp.shape[2] - 2
    y = np.zeros((x.shape[0], ho, wo, wt.shape[3])) + b
    for i in range(3):
        for j in range(3):
            y += xp[:, i:i + ho, j:j + wo] @ wt[i, j].astype(np.float64)
    return y


def _reference_input_grad(dy, wt, pads):
    """The input gradient of a 'same' 3x3 layer in float64: the flipped kernel, channel axes
    swapped, over the output gradient."""
    return _reference_conv(dy, np.transpose(wt[::-1, ::-1], (0, 1, 3, 2)), 0.0, pads)


def _reference_weight_grad(x, dy, pads):
    """The 3x3 stride-1 weight gradient (3, 3, C_in, C_out) in float64."""
    xp = np.pad(x.astype(np.float64), ((0, 0), pads[:2], pads[2:], (0, 0)))
    ho, wo = dy.shape[1:3]
    return np.stack([np.stack([np.einsum("nhwc,nhwd->cd", xp[:, i:i + ho, j:j + wo], dy)
                               for j in range(3)]) for i in range(3)])


def _operands(rng, case, dtype):
    """``(x, weight, bias)`` of a case (n, h, w, c_in, c_out, ...)."""
    n, h, w, cin, cout = case[:5]
    return (rng.normal(size=(n, h, w, cin)).astype(dtype),
            rng.normal(size=(3, 3, cin, cout)).astype(dtype), rng.normal(size=cout).astype(dtype))


CASES = [
    # (n, h, w, c_in, c_out, pads)
    (3, 8, 8, 16, 16, (1, 1, 1, 1)),      # resnet20's stage 3 shape, one vector of channels
    (2, 6, 10, 32, 64, (1, 1, 1, 1)),     # two vectors per tile, non-square
    (2, 10, 10, 16, 32, (0, 0, 0, 0)),    # 'valid': 8x8 outputs
    (1, 14, 14, 32, 64, (1, 1, 1, 1)),    # 7 blocks a row: tiles of 4 overlap at the end
    (2, 9, 7, 16, 16, (1, 0, 2, 1)),      # uneven padding, odd input, even output (8 x 8)
    (2, 32, 32, 16, 16, (1, 1, 1, 1)),    # resnet20's first stage
]
IDS = [f"{c[1]}x{c[2]}-{c[3]}to{c[4]}-p{''.join(map(str, c[5]))}" for c in CASES]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_input_gradient_match_portable(monkeypatch, rng, calls, dtype, case):
    _n, h, w, _cin, _cout, pads = case
    x, wt, b = _operands(rng, case, dtype)
    y, ctx = F.conv2d_forward(x, wt, b, (1, 1), pads, (1, 1))
    dy = rng.normal(size=y.shape).astype(dtype)
    dx, dw, db = F.conv2d_backward(dy, ctx, wt, True)
    used = [c[2] for c in calls]
    assert used.count(False) == 1, calls  # the forward
    even = h % 2 == 0 and w % 2 == 0
    assert used.count(True) == (1 if even else 0), calls  # an even input's gradient
    assert_rounding_close(y, _reference_conv(x, wt, b, pads).astype(dtype), err_msg="y")
    monkeypatch.setattr(native, "ENABLED", False)
    ry, rctx = F.conv2d_forward(x, wt, b, (1, 1), pads, (1, 1))
    rdx, rdw, rdb = F.conv2d_backward(dy, rctx, wt, True)
    for name, got, want in (("y", y, ry), ("dx", dx, rdx), ("dw", dw, rdw), ("db", db, rdb)):
        assert_rounding_close(got, want, err_msg=name)


WGRAD_CASES = [
    # (n, h, w, c_in, c_out, pads): parts of 4 images and one of the rest; chunks of block
    # rows (32x32) and of whole images (8x8)
    (9, 8, 8, 64, 64, (1, 1, 1, 1)),
    (6, 32, 32, 16, 16, (1, 1, 1, 1)),
    (5, 10, 10, 16, 32, (0, 0, 0, 0)),
    (3, 9, 7, 32, 16, (1, 0, 2, 1)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", WGRAD_CASES, ids=[f"n{c[0]}-{c[1]}x{c[2]}-{c[3]}to{c[4]}"
                                                   for c in WGRAD_CASES])
def test_weight_gradient_matches_portable(monkeypatch, rng, dtype, case):
    _n, _h, _w, cin, cout, pads = case
    planned, kernel = [], native_winograd.weight_grad
    monkeypatch.setattr(native_winograd, "weight_grad",
                        lambda *a: planned.append(a[1]) or kernel(*a))
    native._weight_grad_plan.cache_clear()
    x, wt, _ = _operands(rng, case, dtype)
    y, ctx = F.conv2d_forward(x, wt, None, (1, 1), pads, (1, 1))
    dy = rng.normal(size=y.shape).astype(dtype)
    dw = F.conv2d_backward(dy, ctx, wt, False)[1]
    assert planned == [(cin, cout)]
    assert_rounding_close(dw, _reference_weight_grad(x, dy, pads).astype(dtype))
    monkeypatch.setattr(native, "ENABLED", False)
    rdw = F.conv2d_backward(dy, F.conv2d_forward(x, wt, None, (1, 1), pads, (1, 1))[1], wt,
                            False)[1]
    assert_rounding_close(dw, rdw)
    native._weight_grad_plan.cache_clear()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES[:4], ids=IDS[:4])
def test_epilogue_and_input_gradient_addend(rng, calls, dtype, case):
    _n, h, w, _cin, _cout, pads = case
    x, wt, b = _operands(rng, case, dtype)
    ref = _reference_conv(x, wt, b, pads)
    addend = rng.normal(size=ref.shape).astype(dtype)
    got = native.conv2d_epilogue(x, wt, b, 1, pads, ref.shape[1:3], addend, relu=True)
    assert_rounding_close(got, np.maximum(ref + addend, 0).astype(dtype))
    if pads == (1, 1, 1, 1):  # the input gradient's sums start from an addend too
        dy = rng.normal(size=ref.shape).astype(dtype)
        plus = rng.normal(size=x.shape).astype(dtype)
        dx = native.conv2d_input_grad(dy, wt, 1, pads, (h, w), plus)
        assert_rounding_close(dx, (_reference_input_grad(dy, wt, pads) + plus).astype(dtype))
    assert len(calls) == (2 if pads == (1, 1, 1, 1) else 1)


POOL_CASES = [
    (2, 14, 14, 32, 64, (1, 1, 1, 1)),    # simple-cnn's second block: 7x7 pooled
    (2, 9, 11, 16, 16, (1, 1, 1, 1)),     # odd outputs: the last row and column not pooled
    (3, 8, 8, 16, 32, (0, 0, 0, 0)),      # 'valid'
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", POOL_CASES, ids=[f"{c[1]}x{c[2]}-{c[4]}" for c in POOL_CASES])
def test_fused_relu_maxpool_and_codes(rng, calls, dtype, case):
    n, _h, _w, _cin, cout, pads = case
    x, wt, b = _operands(rng, case, dtype)
    conv = _reference_conv(x, wt, b, pads)
    ho, wo = conv.shape[1:3]
    out, code = native.conv2d_relu_maxpool(x, wt, b, 1, pads, (ho, wo), (2, 2))
    alone = native.conv2d_relu_maxpool_eval(x, wt, b, 1, pads, (ho, wo), (2, 2))
    assert [c[3] for c in calls] == [True, True]
    windows = conv[:, :ho // 2 * 2, :wo // 2 * 2].reshape(n, ho // 2, 2, wo // 2, 2, cout)
    windows = windows.transpose(0, 1, 3, 5, 2, 4).reshape(n, ho // 2, wo // 2, cout, 4)
    best = windows.max(axis=-1)
    assert_rounding_close(out, np.maximum(best, 0).astype(dtype))
    np.testing.assert_array_equal(alone, out)
    live = best > 0
    assert live.any() and (~live).any()
    np.testing.assert_array_equal(code[~live], native.DEAD)
    # a live window's code names a tap holding its maximum (up to rounding: a near tie may
    # name the other tap)
    taken = np.take_along_axis(windows, code[..., None].astype(np.intp) % 4, axis=-1)[..., 0]
    scale = np.abs(conv).max() * 256 * np.finfo(dtype).eps
    assert np.all(np.abs(taken - best)[live] <= scale)


def test_declines_what_it_does_not_take(rng, calls, monkeypatch):
    x = rng.normal(size=(2, 9, 9, 16)).astype(np.float32)
    wt = rng.normal(size=(3, 3, 16, 16)).astype(np.float32)
    native.conv2d(x, wt, None, 1, (1, 1, 1, 1), (9, 9))           # odd output
    native.conv2d(x, wt, None, 2, (1, 1, 1, 1), (5, 5))           # stride 2
    native.conv2d_input_grad(rng.normal(size=(2, 5, 5, 16)).astype(np.float32), wt, 2,
                             (1, 1, 1, 1), (9, 9))                # its phases
    wide = rng.normal(size=(3, 3, 16, native_winograd.MOST_CHANNEL_PAIRS // 16 + 16))
    native.conv2d(x[:, :8, :8].copy(), wide.astype(np.float32), None, 1, (1, 1, 1, 1),
                  (8, 8))                                         # too many channel pairs
    five = rng.normal(size=(5, 5, 16, 16)).astype(np.float32)
    native.conv2d(x, five, None, 1, (2, 2, 2, 2), (9, 9))         # 5x5
    native.conv2d(x[..., :8], wt[:, :, :8], None, 1, (1, 1, 1, 1), (8, 8))  # 8 < 16 channels
    assert calls == []
    native.conv2d(x[:, :8, :8].copy(), wt, None, 1, (1, 1, 1, 1), (8, 8))
    assert len(calls) == 1
    monkeypatch.setenv("ANYCNN_WINOGRAD", "0")
    native.conv2d(x[:, :8, :8].copy(), wt, None, 1, (1, 1, 1, 1), (8, 8))
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", POOL_CASES, ids=[f"{c[1]}x{c[2]}-{c[4]}" for c in POOL_CASES])
def test_pooled_gradients(monkeypatch, rng, calls, dtype, case):
    """A fused block's gradients from its pooled gradient and codes (unpooled inside the
    kernels): the weight gradient always, the input gradient where the input is whole 2x2
    blocks; both equal float64 references computed from the unpooled gradient."""
    _n, h, w, cin, cout, pads = case
    planned, kernel = [], native_winograd.weight_grad
    monkeypatch.setattr(native_winograd, "weight_grad",
                        lambda *a: planned.append(a[3:]) or kernel(*a))
    native._weight_grad_plan.cache_clear()
    x, wt, b = _operands(rng, case, dtype)
    ho, wo = h + pads[0] + pads[1] - 2, w + pads[2] + pads[3] - 2
    out, code = native.conv2d_relu_maxpool(x, wt, b, 1, pads, (ho, wo), (2, 2))
    pooled = native.Pooled(rng.normal(size=out.shape).astype(dtype), code, (2, 2))
    dense = pooled.unpooled((ho, wo)).astype(np.float64)
    calls.clear()
    dw = native.conv2d_weight_grad(x, pooled, (3, 3), 1, pads)
    assert planned == [(True,)]
    assert_rounding_close(dw, _reference_weight_grad(x, dense, pads).astype(dtype))
    if pads == (1, 1, 1, 1) and h % 2 == 0 and w % 2 == 0:
        dx = native.conv2d_input_grad(pooled, wt, 1, pads, (h, w))
        assert calls == [(cin, cout, True, False)]  # the layer's weight, used adjoint
        assert_rounding_close(dx, _reference_input_grad(dense, wt, pads).astype(dtype))
    native._weight_grad_plan.cache_clear()


@pytest.mark.parametrize("registers, halved", [((256, 16), False), ((512, 32), True),
                                               ((512, 32), False)],
                         ids=["avx2", "zen4", "avx512"])
def test_each_cpus_tiles_match(rng, calls, monkeypatch, registers, halved):
    """The tiles chosen for AVX2 (8 float32 lanes, 16 registers), for a CPU that halves its
    512-bit vectors, and for AVX-512: the same results (compiled for this host, which runs
    them all), forward with addend, input gradient and weight gradient."""
    monkeypatch.setattr(native, "registers", lambda: native.Registers(*registers))
    monkeypatch.setattr(native, "halved_vectors", lambda: halved)
    native._weight_grad_plan.cache_clear()
    n, h, w, cin, cout = 5, 8, 12, 16, 32
    x, wt, b = _operands(rng, (n, h, w, cin, cout), np.float32)
    ref = _reference_conv(x, wt, b, (1, 1, 1, 1))
    addend = rng.normal(size=ref.shape).astype(np.float32)
    got = native.conv2d_epilogue(x, wt, b, 1, (1, 1, 1, 1), (h, w), addend, relu=False)
    assert_rounding_close(got, (ref + addend).astype(np.float32))
    dy = rng.normal(size=ref.shape).astype(np.float32)
    dx = native.conv2d_input_grad(dy, wt, 1, (1, 1, 1, 1), (h, w))
    same = (1, 1, 1, 1)
    assert_rounding_close(dx, _reference_input_grad(dy, wt, same).astype(np.float32))
    dw = native.conv2d_weight_grad(x, dy, (3, 3), 1, same)
    assert_rounding_close(dw, _reference_weight_grad(x, dy, same).astype(np.float32))
    assert len(calls) == 2
    native._weight_grad_plan.cache_clear()


def test_small_calls_keep_the_direct_kernels(rng, calls, monkeypatch):
    """Below MIN_PIXELS outputs per channel (a batch of one small image) the kernel's
    transform and the threads' start outweigh the saved multiply-adds: the direct kernels run,
    forward and weight gradient."""
    monkeypatch.setattr(native_winograd, "MIN_PIXELS", 256)
    planned, kernel = [], native_winograd.weight_grad
    monkeypatch.setattr(native_winograd, "weight_grad",
                        lambda *a: planned.append(a[1]) or kernel(*a))
    wt = rng.normal(size=(3, 3, 16, 16)).astype(np.float32)
    for n, side, taken in ((3, 8, False), (4, 8, True), (1, 16, True)):  # 192, 256, 256 pixels
        native._weight_grad_plan.cache_clear()
        calls.clear()
        planned.clear()
        x = rng.normal(size=(n, side, side, 16)).astype(np.float32)
        y = native.conv2d(x, wt, None, 1, (1, 1, 1, 1), (side, side))
        native.conv2d_weight_grad(x, y, (3, 3), 1, (1, 1, 1, 1))
        assert (len(calls), len(planned)) == ((1, 1) if taken else (0, 0)), (n, side)


def test_a_changed_kernel_is_caught(rng, monkeypatch):
    """The comparison above can fail: a wrong output transform entry is caught. (The wrong
    kernel is compiled in memory, never kept: its key would be the right kernel's.)"""
    monkeypatch.setenv("ANYCNN_KERNEL_CACHE", "0")
    monkeypatch.setattr(native_winograd, "AT", ((1, 1, 1, 0), (0, 1, -1, 1)))
    native_winograd._plan.cache_clear()
    native_winograd._pipeline.cache_clear()
    try:
        x = rng.normal(size=(1, 4, 4, 16)).astype(np.float32)
        wt = rng.normal(size=(3, 3, 16, 16)).astype(np.float32)
        got = native.conv2d(x, wt, None, 1, (1, 1, 1, 1), (4, 4))
        want = _reference_conv(x, wt, 0.0, (1, 1, 1, 1)).astype(np.float32)
        with pytest.raises(AssertionError):
            assert_rounding_close(got, want)
    finally:
        native_winograd._plan.cache_clear()
        native_winograd._pipeline.cache_clear()


@pytest.mark.parametrize("name, expected", [
    ("resnet20", {(16, 16, False, False): 6, (32, 32, False, False): 5,
                  (64, 64, False, False): 5}),
    ("simple-cnn", {(32, 64, False, True): 1}),
])
def test_the_models_use_it(rng, calls, name, expected):
    """resnet20: every 3x3 stride-1 layer but the 3-channel stem; simple-cnn: the second
    block (its first has one input channel)."""
    model = build_model(name)
    model.eval()
    shape = (4, 32, 32, 3) if name == "resnet20" else (4, 28, 28, 1)
    with anycnn.no_grad():
        model.forward(anycnn.asarray(rng.random(shape, dtype=np.float32)))
    counts = {}
    for c in calls:
        counts[c] = counts.get(c, 0) + 1
    assert counts == expected
