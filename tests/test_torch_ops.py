"""torch's own operators (``anycnn.kernels.torch_ops``) agree with the portable path in float64:
convolutions (strides, symmetric and asymmetric padding, dilation, groups, depthwise) forward
and backward, with a ReLU and a residual addend (eval mode's folded and fused convolutions,
which must take torch's operator), the fused Conv2D → ReLU → MaxPool2D block, max and average
pooling (padding, ceil mode, ties), BatchNorm in training and eval (fused ReLU, residual
addend), a Trainer step; and they decline what is not theirs (other arrays, mixed dtypes,
``ANYCNN_FASTPATH=0``)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import anycnn
from anycnn.kernels import dispatch, torch_ops
from anycnn.kernels import threads as kthreads
from anycnn.nn import functional as F
from anycnn.nn.layers import AvgPool2D, Conv2D, MaxPool2D, ReLU
from anycnn.nn.sequential import Sequential

torch = pytest.importorskip("torch")

TOL = dict(rtol=1e-11, atol=1e-12)


@pytest.fixture
def on(monkeypatch):
    """The kernels on (these tests are about them, also under ``ANYCNN_FASTPATH=0``), torch's
    own operators taking torch tensors (not the compiled kernels: tests/test_torch_native.py),
    the torch backend current; ``on(fn)`` runs ``fn()`` with every kernel off (the portable
    path)."""
    from anycnn.kernels import torch_native

    monkeypatch.setattr(kthreads, "ENABLED", True)
    monkeypatch.setattr(torch_native, "_active", False)

    def portable(fn):
        monkeypatch.setattr(kthreads, "ENABLED", False)
        try:
            return fn()
        finally:
            monkeypatch.setattr(kthreads, "ENABLED", True)

    with anycnn.use_backend("torch"):
        yield portable


def t(a):
    """A float64 torch tensor of host array ``a``."""
    return torch.tensor(np.asarray(a), dtype=torch.float64)


def close(got, want):
    """Tuples of tensors (or None) equal up to float64 rounding, the same shapes."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert tuple(g.shape) == tuple(w.shape)
            np.testing.assert_allclose(g.numpy(), w.numpy(), **TOL)


CONV_CASES = [
    # (n, h, w, c_in, c_out, kernel, stride, pads, dilation, groups)
    (2, 9, 9, 4, 6, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),      # 'same'
    (3, 8, 10, 3, 5, (2, 2), (2, 2), (0, 1, 1, 0), (1, 1), 1),     # even kernel, asymmetric
    (2, 13, 12, 4, 4, (5, 3), (3, 2), (2, 1, 0, 2), (1, 1), 1),    # uneven everything
    (2, 11, 11, 3, 4, (3, 3), (1, 2), (2, 2, 2, 2), (2, 2), 1),    # dilation
    (2, 8, 8, 4, 6, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2),      # grouped
    (2, 9, 9, 4, 8, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 4),      # depthwise, multiplier 2
    (2, 8, 7, 4, 4, (3, 3), (1, 1), (0, 2, 1, 1), (1, 1), 4),      # depthwise, asymmetric
    (1, 6, 6, 4, 8, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1),      # 1x1 stride-2 shortcut
]


def _conv_run(x, w, b, case, dy, input_grad=True, addend=None):
    stride, pads, dilation, groups = case[-4:]
    y, ctx = F.conv2d_forward(x, w, b, stride, pads, dilation, groups)
    if addend is None:
        return (y, *F.conv2d_backward(dy, ctx, w, input_grad, b is not None))
    return (y, *F.conv2d_backward(dy, ctx, w, input_grad, b is not None, addend=addend))


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_convolution_matches_the_portable_path(on, rng, case, bias):
    n, h, w_, cin, cout, kernel, stride, pads, dilation, groups = case
    x = t(rng.standard_normal((n, h, w_, cin)))
    w = t(rng.standard_normal((*kernel, cin // groups, cout)))
    b = t(rng.standard_normal(cout)) if bias else None
    win = F.conv_windows((h, w_), kernel, stride, pads, dilation)
    assert torch_ops.conv2d(x, w, b, win, groups) is not dispatch.DECLINE
    dy = t(rng.standard_normal((n, *win.out, cout)))
    got = _conv_run(x, w, b, case, dy)
    assert all(g is None or g.is_contiguous() for g in got)  # NHWC-contiguous outputs
    close(got, on(lambda: _conv_run(x, w, b, case, dy)))
    # no input gradient asked for
    got = _conv_run(x, w, b, case, dy, input_grad=False)
    assert got[1] is None
    close(got, on(lambda: _conv_run(x, w, b, case, dy, input_grad=False)))
    # a residual addend is added to the input gradient
    addend = t(rng.standard_normal(x.shape))
    close(_conv_run(x, w, b, case, dy, addend=addend),
          on(lambda: _conv_run(x, w, b, case, dy, addend=addend)))


@pytest.mark.parametrize("case", CONV_CASES)
def test_convolution_epilogue_matches_the_portable_path(on, rng, case):
    """A convolution with a ReLU and/or a residual addend (eval mode's fused and folded
    convolutions) computed by torch's operator equals the portable epilogue in float64; a
    negative bias puts outputs on both sides of the ReLU's zero."""
    n, h, w_, cin, cout, kernel, stride, pads, dilation, groups = case
    x = t(rng.standard_normal((n, h, w_, cin)))
    w = t(rng.standard_normal((*kernel, cin // groups, cout)))
    win = F.conv_windows((h, w_), kernel, stride, pads, dilation)
    addend = t(rng.standard_normal((n, *win.out, cout)))
    for b in (t(rng.standard_normal(cout) - 0.5), None):
        for plus, relu in ((None, True), (addend, False), (addend, True)):
            assert torch_ops.conv2d_epilogue(x, w, b, win, groups, plus,
                                             relu) is not dispatch.DECLINE

            def run(b=b, plus=plus, relu=relu):
                return F.conv2d_forward(x, w, b, stride, pads, dilation, groups, addend=plus,
                                        relu=relu)[0]

            got = run()
            assert got.is_contiguous()  # NHWC-contiguous
            if relu:
                assert float(got.min()) == 0.0 and float(got.max()) > 0.0
            close((got,), (on(run),))
    # what is not its kind: NumPy arrays, an addend of another dtype or shape
    assert torch_ops.conv2d_epilogue(x.numpy(), w.numpy(), None, win, groups, None,
                                     True) is dispatch.DECLINE
    assert torch_ops.conv2d_epilogue(x, w, None, win, groups, addend.float(),
                                     True) is dispatch.DECLINE
    assert torch_ops.conv2d_epilogue(x, w, None, win, groups, addend[:, :1],
                                     True) is dispatch.DECLINE


@pytest.mark.parametrize("name", ["resnet20", "resnet-mini", "bn-cnn", "resnet20-code"])
def test_eval_forward_takes_torchs_convolution(on, rng, monkeypatch, name):
    """Eval mode's forward (folded BatchNorms, ConvReLU, residual sums inside the last
    convolution, Conv-ReLU-MaxPool blocks, the models-as-code fold under no_grad) runs every
    (folded) convolution through torch's operator, never the portable im2col path, and
    equals the unfused, unfolded layer-by-layer forward in float64."""
    from anycnn.models import build_model, model_spec
    from anycnn.nn.functional import conv as conv_ops
    from anycnn.nn.layers import BatchNorm2D
    from anycnn.nn.modes import suspended

    anycnn.manual_seed(0)
    model = build_model(name)
    model.to("float64")
    g = np.random.default_rng(3)
    for bn in (m for m in model.modules() if type(m) is BatchNorm2D):  # not the identity
        c = bn.num_features
        bn.weight.data, bn.bias.data = t(g.normal(1.0, 0.5, c)), t(g.normal(0.0, 0.5, c))
        bn.running_mean, bn.running_var = t(g.normal(0.0, 0.5, c)), t(g.random(c) + 0.5)
    model.eval()
    spec = model_spec(name)
    side = 16 if spec["image_size"] == 32 else spec["image_size"]  # resnet20: smaller
    x = t(rng.standard_normal((2, side, side, spec["in_channels"])))
    with suspended():  # layer by layer: nothing fused, nothing folded
        want = model.forward(x)

    calls = []
    nchw_conv = torch_ops._conv_nchw
    monkeypatch.setattr(torch_ops, "_conv_nchw",
                        lambda *a: calls.append(a[1]) or nchw_conv(*a))

    def portable(*a, **k):
        raise AssertionError("a convolution took the portable im2col path")

    monkeypatch.setattr(conv_ops, "conv2d_rows", portable)
    with anycnn.no_grad():
        got = model.forward(x)
    convs = [m for m in model.modules() if type(m) is Conv2D]
    assert len(calls) == len(convs)
    folded = sum(1 for w in calls if not any(w is c.weight.data for c in convs))
    assert folded == len(calls)  # every convolution here is followed by a BatchNorm
    close((got,), (want,))


def _block(x, pool, with_bias, seed=0):
    anycnn.manual_seed(seed)
    model = Sequential(Conv2D(x.shape[3], 5, 3, padding=1, bias=with_bias), ReLU(), pool)
    model.to("float64")
    if with_bias:  # not the initial zeros: the bias moves maxima across the ReLU's zero
        model[0].bias.data = t(np.random.default_rng(seed).standard_normal(5))
    return model


@pytest.mark.parametrize("pool", [(2, 2), (3, 3), (2, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_conv_relu_maxpool_matches_the_portable_path(on, rng, pool, with_bias):
    """The fused block (kernel equal to stride: torch's operators) and with gaps (stride above
    the kernel: the portable pool-ordered path) match the layers run by the portable path; the
    zero region of the input gives ties in the windows, which go to the first maximum."""
    kernel, stride = pool
    x = rng.standard_normal((3, 10, 9, 2))
    x[:, :5, :4, :] = 0.0  # whole windows of equal convolution outputs
    x = t(x)

    def run():
        model = _block(x, MaxPool2D(kernel, stride), with_bias)
        y = model.forward(x)
        dy = t(np.random.default_rng(7).standard_normal(tuple(y.shape)))
        dx = model.backward(dy)
        conv = model.layers[0]
        return (y, dx, conv.weight.grad, None if conv.bias is None else conv.bias.grad)

    close(run(), on(run))


@pytest.mark.parametrize("layer", [
    lambda: MaxPool2D(2), lambda: MaxPool2D(3, 2, padding=1),
    lambda: MaxPool2D(3, 2, padding=1, ceil_mode=True), lambda: MaxPool2D(2, 3, ceil_mode=True),
    lambda: AvgPool2D(2), lambda: AvgPool2D(3, 2, padding=1),
    lambda: AvgPool2D(3, 2, padding=1, count_include_pad=False),
    lambda: AvgPool2D(3, 2, padding=1, ceil_mode=True),
    lambda: AvgPool2D(3, 2, padding=1, ceil_mode=True, count_include_pad=False),
    lambda: AvgPool2D((2, 3), (1, 2), padding=(1, 0)),
], ids=["max2", "max3s2p1", "max3s2p1ceil", "max2s3ceil", "avg2", "avg3s2p1",
        "avg3s2p1nopad", "avg3s2p1ceil", "avg3s2p1ceil-nopad", "avg2x3"])
def test_pooling_matches_the_portable_path(on, rng, layer):
    x = t(np.round(rng.standard_normal((2, 7, 8, 3)), 1))  # rounded: ties in the windows
    pool = layer()

    def run():
        y = pool.forward(x)
        dy = t(np.random.default_rng(3).standard_normal(tuple(y.shape)))
        return y, pool.backward(dy)

    got = run()
    assert torch_ops.pool_spec(pool._windows(x)) is not None  # torch's operators took it
    close(got, on(run))


def test_pooling_torch_cannot_express_is_declined(on, rng):
    """Padding above half the kernel (a direct call; the layers refuse it) is not torch's:
    the portable path computes it."""
    x = t(rng.standard_normal((1, 5, 5, 2)))
    win = F.pool_windows((5, 5), (2, 2), (2, 2), (2, 2), False)
    assert torch_ops.pool_spec(win) is None
    assert torch_ops.max_pool2d(x, win) is dispatch.DECLINE
    y, ctx = F.max_pool2d_forward(x, win)
    assert ctx.saved is None and ctx.mask is not None
    close((y,), on(lambda: (F.max_pool2d_forward(x, win)[0],)))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu, with_addend", [(False, False), (True, False), (True, True),
                                               (False, True)])
@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (17, 6)])
def test_batch_norm_matches_the_portable_path(on, rng, training, relu, with_addend, shape):
    c = shape[-1]
    x = t(rng.standard_normal(shape) * 3 + 1)
    gamma, beta = t(rng.standard_normal(c)), t(rng.standard_normal(c))
    rm, rv = t(rng.standard_normal(c)), t(rng.random(c) + 0.5)
    addend = t(rng.standard_normal(shape)) if with_addend else None
    dy = t(rng.standard_normal(shape))

    def run():
        y, ctx, m, v = F.batch_norm_forward(x, gamma, beta, rm, rv, training, 0.1, 1e-5,
                                            relu=relu, addend=addend)
        return (y, m, v, *F.batch_norm_backward(dy, ctx, gamma))

    assert torch_ops.batch_norm(x, gamma, beta, rm, rv, training, 0.1, 1e-5, relu,
                                addend) is not dispatch.DECLINE
    rm0, rv0 = rm.clone(), rv.clone()
    got = run()
    np.testing.assert_array_equal(rm.numpy(), rm0.numpy())  # running stats not written over
    np.testing.assert_array_equal(rv.numpy(), rv0.numpy())
    close(got, on(run))


def test_batch_norm_backward_after_the_kernels_went_off(on, rng, monkeypatch):
    """A context the torch kernel kept (input rows and mean) still gives the portable gradients
    when the kernels are off for the backward."""
    x = t(rng.standard_normal((4, 3, 3, 5)))
    gamma, beta = t(rng.standard_normal(5)), t(rng.standard_normal(5))
    dy = t(rng.standard_normal(x.shape))
    _, ctx, _, _ = F.batch_norm_forward(x, gamma, beta, t(np.zeros(5)), t(np.ones(5)), True,
                                        0.1, 1e-5, relu=True)
    got = on(lambda: F.batch_norm_backward(dy, ctx, gamma))
    _, ctx, _, _ = F.batch_norm_forward(x, gamma, beta, t(np.zeros(5)), t(np.ones(5)), True,
                                        0.1, 1e-5, relu=True)
    close(got, F.batch_norm_backward(dy, ctx, gamma))


def test_relu_grad_and_add_relu_match_the_portable_path(on, rng):
    y = t(np.round(rng.standard_normal((4, 5, 3)), 1))  # exact zeros too
    dy, z = t(rng.standard_normal((4, 5, 3))), t(rng.standard_normal((4, 5, 3)))
    close((F.relu_grad(y, dy), F.add_relu(y, z), F.add(y, z)),
          on(lambda: (F.relu_grad(y, dy), F.add_relu(y, z), F.add(y, z))))


def test_a_trainer_step_matches_the_portable_path(on):
    """One Trainer step of a model with every kernel here (convolutions, BatchNorm with its
    fused ReLU, residual blocks, pooling) gives the portable path's loss and parameters."""
    from anycnn.models import build_model
    from anycnn.optim.optimizers import SGD
    from anycnn.train.trainer import Trainer

    rng = np.random.default_rng(5)
    images = t(rng.random((6, 28, 28, 1)))
    labels = torch.tensor(rng.integers(0, 10, 6))

    def step(name):
        anycnn.manual_seed(0)
        model = build_model(name)
        model.to("float64")
        trainer = Trainer(model, SGD(model.parameters(), lr=0.1, momentum=0.9), progress=False)
        loss, _ = trainer.train_step(images, labels, check=True)
        return (loss, *(p.data for p in model.parameters()))

    for name in ("resnet-mini", "simple-cnn"):
        close(step(name), on(lambda n=name: step(n)))


def test_kernels_decline_what_is_not_theirs(on, rng):
    xn = rng.standard_normal((1, 5, 5, 2))
    wn = rng.standard_normal((3, 3, 2, 4))
    win = F.conv_windows((5, 5), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    assert torch_ops.conv2d(xn, wn, None, win, 1) is dispatch.DECLINE  # NumPy arrays
    x, w = t(xn), t(wn)
    assert torch_ops.conv2d(x, w.float(), None, win, 1) is dispatch.DECLINE  # mixed dtypes
    assert torch_ops.conv2d(x, w, None, win, 1) is not dispatch.DECLINE
    assert on(lambda: torch_ops.conv2d(x, w, None, win, 1)) is dispatch.DECLINE  # switched off
    pool = F.pool_windows((5, 5), (2, 2), (2, 2), (0, 0), False)
    assert torch_ops.max_pool2d(xn, pool) is dispatch.DECLINE
    assert torch_ops.pooled_gradient(x, object(), (2, 2)) is dispatch.DECLINE
    assert torch_ops.max_pool2d_backward(x, object(), pool) is dispatch.DECLINE
    ones = np.ones(2)
    assert torch_ops.batch_norm(xn, ones, ones, ones, ones, True, 0.1, 1e-5) is dispatch.DECLINE


def test_kernel_modules_load_without_importing_torch():
    """Dispatching NumPy calls loads the kernel modules without importing torch, and without
    torch's kernels (dispatch.ONLY_FOR); the first dispatch after torch is imported brings them
    in, first in line; importing them never imports torch."""
    code = ("import sys, numpy as np, anycnn\n"
            "from anycnn.kernels import dispatch\n"
            "from anycnn.nn import functional as F\n"
            "x = np.ones((1, 4, 4, 2)); w = np.ones((3, 3, 2, 2))\n"
            "F.conv2d_forward(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1))\n"
            "F.max_pool2d_forward(x, F.pool_windows((4, 4), (2, 2), (2, 2), (0, 0), False))\n"
            "assert 'anycnn.kernels.native' in sys.modules\n"
            "assert 'anycnn.kernels.torch_ops' not in sys.modules, 'torch kernels imported'\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "import torch\n"
            "xt = torch.ones((1, 4, 4, 2), dtype=torch.float64)\n"
            "wt = torch.ones((3, 3, 2, 2), dtype=torch.float64)\n"
            "y = F.conv2d_forward(xt, wt, None, (1, 1), (1, 1, 1, 1), (1, 1))[0]\n"
            "first = [k.__module__ for k in dispatch.kernels_for('conv2d')][:2]\n"
            "assert first == ['anycnn.kernels.torch_native', 'anycnn.kernels.torch_ops']\n"
            "ref = F.conv2d_forward(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1))[0]\n"
            "assert np.allclose(y.numpy(), ref)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "ANYCNN_BACKEND": "numpy"})
    assert out.returncode == 0, out.stderr


def test_a_one_channel_one_pixel_convolution_backward():
    """torch's fallback convolution for tiny shapes wants a contiguous weight gradient (found by
    tests/test_properties.py: 2x2 input, 2 channels, one 2x2 output channel)."""
    torch = pytest.importorskip("torch")
    from anycnn.kernels import torch_ops
    from anycnn.nn.functional.conv import conv_windows

    x = torch.rand(1, 2, 2, 2, dtype=torch.float64)
    w = torch.rand(2, 2, 2, 1, dtype=torch.float64)
    win = conv_windows((2, 2), (2, 2), (1, 1), (0, 0, 0, 0), (1, 1))
    dx, dw, db = torch_ops.conv2d_backward(torch.ones(1, 1, 1, 1, dtype=torch.float64), x, w,
                                           win, 1, True, True)
    assert torch.allclose(dw, x.permute(1, 2, 3, 0))  # dy = 1: the weight gradient is x
    assert torch.allclose(dx, w.permute(3, 0, 1, 2)) and float(db[0]) == 1.0
