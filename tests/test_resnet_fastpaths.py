"""The NumPy fast paths of a ResNet training step (BatchNorm's per-channel passes, the fused
BatchNorm → ReLU and Residual → ReLU runs) agree with the portable code within rounding, and
the portable code stays selectable (``fastpath.ENABLED``, ``ANYCNN_FASTPATH=0``)."""

from __future__ import annotations

import numpy as np
import pytest

from anycnn.kernels import fastpath, native
from anycnn.kernels import threads as kthreads
from anycnn.nn import functional as F
from tests.rounding import assert_rounding_close


def batch_norm_run(rng, shape, dtype, training: bool, relu: bool):
    """A function computing ``(y, running mean, running var, dx, dgamma, dbeta)`` of one
    BatchNorm forward and backward on fixed random data (whichever paths are on)."""
    c = shape[-1]
    x = rng.normal(1.5, 2.0, size=shape).astype(dtype)
    gamma = rng.normal(size=c).astype(dtype)
    beta = rng.normal(size=c).astype(dtype)
    rm, rv = rng.normal(size=c).astype(dtype), rng.random(c).astype(dtype) + 0.5
    dy = rng.normal(size=shape).astype(dtype)

    def run():
        y, ctx, m, v = F.batch_norm_forward(x, gamma, beta, rm, rv, training, 0.1, 1e-5,
                                            relu=relu)
        return (y, m, v, *F.batch_norm_backward(dy, ctx, gamma))

    return run


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def kernels(request, monkeypatch):
    """Every test twice: with the compiled kernels (:mod:`anycnn.native`, where halide is
    installed) and with the NumPy fast paths alone."""
    if request.param == "compiled" and not native.available(np):
        pytest.skip("the compiled kernels are off here (anycnn info says why)")
    monkeypatch.setattr(native, "ENABLED", request.param == "compiled")
    return request.param


@pytest.fixture
def split(monkeypatch):
    """Two threads, every call split, and chunks of a few rows (many chunks per shard)."""
    monkeypatch.setenv("ANYCNN_NUM_THREADS", "2")
    monkeypatch.setattr(kthreads, "MIN_PARALLEL_SIZE", 1)
    monkeypatch.setattr(fastpath, "CHANNEL_CHUNK", 40)


def _portable(monkeypatch, fn):
    monkeypatch.setattr(kthreads, "ENABLED", False)
    try:
        return fn()
    finally:
        monkeypatch.setattr(kthreads, "ENABLED", True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(6, 5, 7, 3), (37, 4)])
def test_batch_norm_fast_path_matches_portable(split, monkeypatch, rng, dtype, relu, training,
                                               shape):
    monkeypatch.setattr(kthreads, "ENABLED", True)
    run = batch_norm_run(rng, shape, dtype, training, relu)

    fast = run()
    slow = _portable(monkeypatch, run)
    for a, b in zip(fast, slow):
        assert_rounding_close(a, b)
    if relu:
        assert (fast[0] >= 0).all() and (fast[0] == 0).any()
    for a, b in zip(fast, run()):  # repeatable for a given thread count
        np.testing.assert_array_equal(a, b)


def test_per_channel_kernels_equal_their_portable_expressions(split, monkeypatch, rng):
    rows = rng.normal(size=(53, 6)).astype(np.float32)
    mean = rows.mean(axis=0)
    fast_sums = F.channel_sums(rows)
    assert fast_sums.dtype == np.float32
    assert_rounding_close(fast_sums, _portable(monkeypatch, lambda: F.channel_sums(rows)))
    centred, squares = F.centre_rows(rows, mean)
    np.testing.assert_array_equal(centred, rows - mean)  # elementwise: exact
    assert_rounding_close(squares, ((rows - mean) ** 2).sum(axis=0))


# --------------------------------------------------------------------------------------------
# Whole residual models: fused runs against the unfused layers, fast against portable


def _resnet(dtype, blocks=1, seed=3):
    import anycnn
    from anycnn.models import cifar_resnet

    anycnn.manual_seed(seed)
    model = cifar_resnet(blocks, num_classes=5, in_channels=2)
    if dtype != "float32":
        model.to(dtype)
    return model


def _unfused(model):
    from anycnn.nn.sequential import Sequential

    for m in model.modules():
        if isinstance(m, Sequential):
            m.fuse = False
    return model


def _step(model, x, labels):
    """Forward and backward of one training step: output, input gradient, parameter
    gradients, running statistics (host arrays)."""
    import anycnn
    from anycnn.nn.losses import SoftmaxCrossEntropy

    model.train()
    model.zero_grad()
    loss = SoftmaxCrossEntropy()
    y = model.forward(anycnn.asarray(x))
    loss.forward(y, anycnn.asarray(labels))
    dx = model.backward(loss.backward())
    out = [y, dx] + [p.grad for p in model.parameters()] + [b for _, b in model.named_buffers()]
    return [anycnn.to_numpy(a) for a in out]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_resnet_runs_match_unfused_layers(backend, rng, dtype):
    """Every backend: BatchNorm2D → ReLU (stem and bodies) and Residual → ReLU (each block)
    run fused, with the values of the layer-by-layer computation."""
    from anycnn.nn.fusion import BatchNormReLU, ResidualReLU

    x = rng.standard_normal((4, 12, 12, 2)).astype(dtype)
    labels = rng.integers(0, 5, 4)
    fused, plain = _resnet(dtype), _unfused(_resnet(dtype))
    got, want = _step(fused, x, labels), _step(plain, x, labels)
    kinds = [type(s) for s in fused._plan]
    assert kinds.count(ResidualReLU) == 3 and BatchNormReLU in kinds
    assert isinstance(fused[3].body._plan[1], BatchNormReLU)  # inside a residual body
    for a, b in zip(got, want):
        assert_rounding_close(a, b)


@pytest.mark.numpy_only  # the whole step under use_backend("numpy"): the same in every session
@pytest.mark.parametrize("threads", ["1", "2"])
def test_resnet_step_fast_path_matches_portable(monkeypatch, rng, threads):
    """NumPy: a whole fused resnet step with the fast paths (threads, many chunks) against the
    portable code, and repeatable bit for bit."""
    import anycnn

    monkeypatch.setenv("ANYCNN_NUM_THREADS", threads)
    monkeypatch.setattr(kthreads, "MIN_PARALLEL_SIZE", 1)
    monkeypatch.setattr(fastpath, "CHANNEL_CHUNK", 100)
    monkeypatch.setattr(kthreads, "CACHE_CHUNK_BYTES", 1)
    x = rng.standard_normal((5, 16, 16, 2))
    labels = rng.integers(0, 5, 5)
    with anycnn.use_backend("numpy"):
        monkeypatch.setattr(kthreads, "ENABLED", True)
        fast, again = _step(_resnet("float64", 2), x, labels), _step(_resnet("float64", 2), x,
                                                                     labels)
        slow = _portable(monkeypatch, lambda: _step(_resnet("float64", 2), x, labels))
    for a, b, c in zip(fast, again, slow):
        np.testing.assert_array_equal(a, b)
        assert_rounding_close(a, c)


def test_fused_resnet_block_passes_finite_differences(backend, rng):
    import anycnn
    from anycnn import layers as L
    from anycnn.models import basic_block
    from anycnn.nn.sequential import Sequential
    from tests.test_gradcheck import check_layer

    anycnn.manual_seed(2)
    block = Sequential(L.Conv2D(2, 3, 3, padding=1, bias=False), L.BatchNorm2D(3), L.ReLU(),
                       *basic_block(3, 4, stride=2), *basic_block(4, 4))
    block.to("float64")
    check_layer(block, rng.standard_normal((3, 6, 6, 2)), rng, directions=2)


@pytest.mark.parametrize(("kernel", "pads", "dilation", "stride"), [
    ((3, 3), (1, 1, 1, 1), (1, 1), (1, 1)),
    ((3, 2), (0, 0, 0, 0), (1, 1), (1, 1)),
    ((2, 2), (0, 1, 0, 1), (1, 1), (1, 1)),  # 'same' for an even kernel
    ((3, 3), (2, 2, 1, 0), (2, 1), (1, 1)),
    ((1, 1), (0, 0, 0, 0), (1, 1), (1, 1)),
    ((3, 3), (1, 1, 1, 1), (1, 1), (2, 2)),  # strided: the col2im path on both
])
def test_conv_input_grad_by_convolution_matches_portable(monkeypatch, rng, kernel, pads,
                                                         dilation, stride):
    """Stride-1 convolutions take their input gradient as the convolution of ``dy`` with the
    flipped kernel on NumPy; the portable path scatters the column gradient (col2im)."""
    monkeypatch.setattr(kthreads, "ENABLED", True)
    x = rng.standard_normal((3, 7, 6, 4))
    w = rng.standard_normal((*kernel, 4, 5))
    win = F.conv_windows((7, 6), kernel, stride, pads, dilation)
    assert (F._backward_windows(win, w, 1) is not None) == (stride == (1, 1))
    y, ctx = F.conv2d_forward(x, w, None, stride, pads, dilation)
    dy = rng.standard_normal(y.shape)

    def grads():
        return F.conv2d_backward(dy, F.ConvCtx(x, ctx.win), w, True, False)[:2]

    fast, slow = grads(), _portable(monkeypatch, grads)
    for a, b in zip(fast, slow):
        assert_rounding_close(a, b)


def test_batch_norm_of_an_empty_batch_in_eval(monkeypatch):
    """Eval mode on zero images: empty outputs and zero parameter gradients on both paths."""
    x = np.zeros((0, 3, 3, 2), dtype=np.float32)
    ones, zeros = np.ones(2, np.float32), np.zeros(2, np.float32)

    def run():
        y, ctx, _, _ = F.batch_norm_forward(x, ones, zeros, zeros, ones, False, 0.1, 1e-5,
                                            relu=True)
        return (y, *F.batch_norm_backward(x, ctx, ones))

    monkeypatch.setattr(kthreads, "ENABLED", True)
    for a, b in zip(run(), _portable(monkeypatch, run)):
        np.testing.assert_array_equal(a, b)
    assert F.channel_sums(x.reshape(0, 2)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize(("cin", "cout", "kernel", "pads"), [
    (4, 5, (3, 3), (1, 1, 1, 1)),
    (3, 2, (2, 3), (0, 1, 1, 1)),  # even kernel, 'same' (extra bottom row)
    (2, 6, (1, 1), (0, 0, 0, 0)),
    (16, 16, (3, 3), (1, 1, 1, 1)),
])
@pytest.mark.parametrize("bias", [False, True])
def test_shifted_weight_gradient_matches_portable(monkeypatch, rng, cin, cout, kernel, pads,
                                                  bias):
    """Few-channel 'same' stride-1 convolutions: NumPy's weight gradient from shifted GEMMs
    over the padded grids (no im2col) against the portable im2col path; many chunks."""
    monkeypatch.setattr(kthreads, "ENABLED", True)
    monkeypatch.setattr(kthreads, "CACHE_CHUNK_BYTES", 1)
    monkeypatch.setenv("ANYCNN_NUM_THREADS", "2")
    x = rng.standard_normal((5, 6, 7, cin))
    w = rng.standard_normal((*kernel, cin, cout))
    win = F.conv_windows((6, 7), kernel, (1, 1), pads, (1, 1))
    assert F._shifted_weight_grad_applies(win, w, 1)
    y, ctx = F.conv2d_forward(x, w, None, (1, 1), pads, (1, 1))
    dy = rng.standard_normal(y.shape)

    def grads():
        return F.conv2d_backward(dy, F.ConvCtx(x, ctx.win), w, True, bias)

    fast, slow = grads(), _portable(monkeypatch, grads)
    assert (fast[2] is None) == (not bias)
    for a, b in zip(fast, slow):
        if b is not None:
            assert_rounding_close(a, b)
