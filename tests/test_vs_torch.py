"""Every layer, loss and optimizer against PyTorch autograd in float64 (tolerance 1e-8).

Runs on the backend under test; torch is only the reference here. Skipped where torch is absent.
"""

from __future__ import annotations

import numpy as np
import pytest

import anycnn
from anycnn import layers as L
from anycnn import losses, optim
from tests.layer_cases import case_id, conv_cases, pool_cases

torch = pytest.importorskip("torch")
TF = torch.nn.functional

TOL = dict(rtol=1e-8, atol=1e-8)


def nchw(a):
    return torch.tensor(np.ascontiguousarray(a.transpose(0, 3, 1, 2)), dtype=torch.float64,
                        requires_grad=True)


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def run(layer, x, dy):
    """Forward and backward of an anycnn layer on host arrays; returns host y, dx."""
    y = layer.forward(anycnn.asarray(x))
    dx = layer.backward(anycnn.asarray(dy))
    return anycnn.to_numpy(y), anycnn.to_numpy(dx)


@pytest.mark.parametrize("case", conv_cases(), ids=case_id)
def test_conv2d(backend, rng, case):
    n, h, w, c = case["shape"]
    layer = L.Conv2D(c, case["out"], case["kernel_size"], case["stride"], case["padding"],
                     case["dilation"], bias=case["bias"], dtype="float64")
    layer.weight.data = anycnn.asarray(rng.standard_normal(layer.weight.shape))
    if layer.bias is not None:
        layer.bias.data = anycnn.asarray(rng.standard_normal(layer.bias.shape))
    x = rng.standard_normal((n, h, w, c))
    xt = nchw(x)
    wt = torch.tensor(anycnn.to_numpy(layer.weight.data).transpose(3, 2, 0, 1),
                      requires_grad=True)
    bt = (torch.tensor(anycnn.to_numpy(layer.bias.data), requires_grad=True)
          if layer.bias is not None else None)
    yt = TF.conv2d(xt, wt, bt, case["stride"], case["padding"], case["dilation"])
    dy = rng.standard_normal(nhwc(yt).shape)
    yt.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))

    y, dx = run(layer, x, dy)
    np.testing.assert_allclose(y, nhwc(yt), **TOL)
    np.testing.assert_allclose(dx, nhwc(xt.grad), **TOL)
    np.testing.assert_allclose(anycnn.to_numpy(layer.weight.grad),
                               wt.grad.numpy().transpose(2, 3, 1, 0), **TOL)
    if bt is not None:
        np.testing.assert_allclose(anycnn.to_numpy(layer.bias.grad), bt.grad.numpy(), **TOL)


@pytest.mark.parametrize("case", pool_cases(), ids=case_id)
@pytest.mark.parametrize("kind", ["max", "avg_include", "avg_exclude"])
def test_pool2d(backend, rng, case, kind):
    opts = {k: case[k] for k in ("kernel_size", "stride", "padding", "ceil_mode")}
    if kind == "max":
        layer = L.MaxPool2D(**opts)
        ref = lambda t: TF.max_pool2d(t, **opts)  # noqa: E731
    else:
        include = kind == "avg_include"
        layer = L.AvgPool2D(**opts, count_include_pad=include)
        ref = lambda t: TF.avg_pool2d(t, **opts, count_include_pad=include)  # noqa: E731
    x = rng.standard_normal(case["shape"])
    xt = nchw(x)
    yt = ref(xt)
    dy = rng.standard_normal(nhwc(yt).shape)
    yt.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))
    y, dx = run(layer, x, dy)
    np.testing.assert_allclose(y, nhwc(yt), **TOL)
    np.testing.assert_allclose(dx, nhwc(xt.grad), **TOL)


def test_maxpool_ties_follow_torch(backend, rng):
    """Equal values in a window: the gradient goes to the first one, as in PyTorch."""
    x = np.round(rng.standard_normal((2, 6, 6, 2)))  # many ties
    xt = nchw(x)
    yt = TF.max_pool2d(xt, 2)
    dy = rng.standard_normal(nhwc(yt).shape)
    yt.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))
    _, dx = run(L.MaxPool2D(2), x, dy)
    np.testing.assert_allclose(dx, nhwc(xt.grad), **TOL)


def test_global_avg_pool(backend, rng):
    x = rng.standard_normal((3, 5, 4, 2))
    xt = nchw(x)
    yt = xt.mean(dim=(2, 3))
    dy = rng.standard_normal((3, 2))
    yt.backward(torch.tensor(dy))
    y, dx = run(L.GlobalAvgPool2D(), x, dy)
    np.testing.assert_allclose(y, yt.detach().numpy(), **TOL)
    np.testing.assert_allclose(dx, nhwc(xt.grad), **TOL)


@pytest.mark.parametrize("bias", [True, False])
def test_dense(backend, rng, bias):
    layer = L.Dense(7, 4, bias=bias, dtype="float64")
    x = rng.standard_normal((5, 7))
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(anycnn.to_numpy(layer.weight.data).T, requires_grad=True)
    bt = torch.tensor(anycnn.to_numpy(layer.bias.data), requires_grad=True) if bias else None
    yt = TF.linear(xt, wt, bt)
    dy = rng.standard_normal((5, 4))
    yt.backward(torch.tensor(dy))
    y, dx = run(layer, x, dy)
    np.testing.assert_allclose(y, yt.detach().numpy(), **TOL)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **TOL)
    np.testing.assert_allclose(anycnn.to_numpy(layer.weight.grad), wt.grad.numpy().T, **TOL)
    if bias:
        np.testing.assert_allclose(anycnn.to_numpy(layer.bias.grad), bt.grad.numpy(), **TOL)


@pytest.mark.parametrize("layer, ref", [
    (L.ReLU, TF.relu),
    (lambda: L.LeakyReLU(0.2), lambda t: TF.leaky_relu(t, 0.2)),
    (L.Sigmoid, torch.sigmoid),
    (L.Tanh, torch.tanh),
], ids=["relu", "leaky_relu", "sigmoid", "tanh"])
def test_activations(backend, rng, layer, ref):
    x = rng.standard_normal((2, 3, 4, 5)) * 4
    xt = torch.tensor(x, requires_grad=True)
    yt = ref(xt)
    dy = rng.standard_normal(x.shape)
    yt.backward(torch.tensor(dy))
    y, dx = run(layer(), x, dy)
    np.testing.assert_allclose(y, yt.detach().numpy(), **TOL)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **TOL)


@pytest.mark.parametrize("shape", [(4, 3, 5, 3), (1, 2, 3, 3), (6, 3)])
def test_batchnorm_train_and_eval(backend, rng, shape):
    c = shape[-1]
    layer = L.BatchNorm2D(c, momentum=0.3, dtype="float64")
    layer.weight.data = anycnn.asarray(rng.standard_normal(c))
    layer.bias.data = anycnn.asarray(rng.standard_normal(c))
    ref = torch.nn.BatchNorm1d(c, momentum=0.3) if len(shape) == 2 else \
        torch.nn.BatchNorm2d(c, momentum=0.3)
    ref = ref.double()
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(anycnn.to_numpy(layer.weight.data)))
        ref.bias.copy_(torch.tensor(anycnn.to_numpy(layer.bias.data)))
    to_t = nchw if len(shape) == 4 else (lambda a: torch.tensor(a, requires_grad=True))
    from_t = nhwc if len(shape) == 4 else (lambda t: t.detach().numpy())
    for _ in range(2):  # two training steps: running statistics accumulate
        x = rng.standard_normal(shape) * 3 + 1
        xt = to_t(x)
        ref.zero_grad()
        yt = ref(xt)
        dy = rng.standard_normal(shape)
        yt.backward(to_t(dy).detach())
        layer.zero_grad()
        y, dx = run(layer, x, dy)
        np.testing.assert_allclose(y, from_t(yt), **TOL)
        np.testing.assert_allclose(dx, from_t(xt.grad), **TOL)
        np.testing.assert_allclose(anycnn.to_numpy(layer.weight.grad), ref.weight.grad.numpy(),
                                   **TOL)
        np.testing.assert_allclose(anycnn.to_numpy(layer.bias.grad), ref.bias.grad.numpy(), **TOL)
    np.testing.assert_allclose(anycnn.to_numpy(layer.running_mean), ref.running_mean.numpy(),
                               **TOL)
    np.testing.assert_allclose(anycnn.to_numpy(layer.running_var), ref.running_var.numpy(), **TOL)
    layer.eval()
    ref.eval()
    x = rng.standard_normal(shape)
    xt = to_t(x)
    yt = ref(xt)
    dy = rng.standard_normal(shape)
    yt.backward(to_t(dy).detach())
    y, dx = run(layer, x, dy)
    np.testing.assert_allclose(y, from_t(yt), **TOL)
    np.testing.assert_allclose(dx, from_t(xt.grad), **TOL)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_cross_entropy(backend, rng, smoothing):
    logits = rng.standard_normal((6, 5)) * 10
    labels = rng.integers(0, 5, 6)
    lt = torch.tensor(logits, requires_grad=True)
    ref = TF.cross_entropy(lt, torch.tensor(labels), label_smoothing=smoothing)
    ref.backward()
    loss_fn = losses.SoftmaxCrossEntropy(label_smoothing=smoothing)
    loss = loss_fn.forward(anycnn.asarray(logits), anycnn.asarray(labels))
    np.testing.assert_allclose(float(anycnn.to_numpy(loss)), ref.item(), **TOL)
    np.testing.assert_allclose(anycnn.to_numpy(loss_fn.backward()), lt.grad.numpy(), **TOL)


def test_cross_entropy_is_stable_for_huge_logits(backend):
    logits = np.array([[1000.0, -1000.0, 0.0], [-800.0, 800.0, 0.0]])
    loss = losses.SoftmaxCrossEntropy().forward(anycnn.asarray(logits),
                                                anycnn.asarray(np.array([0, 0])))
    ref = TF.cross_entropy(torch.tensor(logits), torch.tensor([0, 0]))
    assert np.isfinite(float(anycnn.to_numpy(loss)))
    np.testing.assert_allclose(float(anycnn.to_numpy(loss)), ref.item(), **TOL)


def test_mse(backend, rng):
    p, t = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    pt = torch.tensor(p, requires_grad=True)
    ref = TF.mse_loss(pt, torch.tensor(t))
    ref.backward()
    loss_fn = losses.MSELoss()
    loss = loss_fn.forward(anycnn.asarray(p), anycnn.asarray(t))
    np.testing.assert_allclose(float(anycnn.to_numpy(loss)), ref.item(), **TOL)
    np.testing.assert_allclose(anycnn.to_numpy(loss_fn.backward()), pt.grad.numpy(), **TOL)


OPTIMIZERS = [
    (lambda p: optim.SGD(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    (lambda p: optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2)),
    (lambda p: optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True)),
    (lambda p: optim.Adam(p, lr=0.01, weight_decay=1e-3),
     lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3)),
    (lambda p: optim.AdamW(p, lr=0.01, betas=(0.8, 0.99)),
     lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.8, 0.99))),
]


@pytest.mark.parametrize("make, make_ref", OPTIMIZERS,
                         ids=["sgd", "sgd_momentum_wd", "sgd_nesterov", "adam_l2", "adamw"])
def test_optimizers_follow_torch(backend, rng, make, make_ref):
    w0 = rng.standard_normal((3, 4))
    param = anycnn.Parameter(anycnn.asarray(w0))
    ref = torch.tensor(w0, requires_grad=True)
    opt, opt_ref = make([param]), make_ref([ref])
    for _ in range(5):
        g = rng.standard_normal((3, 4))
        param.grad = anycnn.asarray(g)
        ref.grad = torch.tensor(g)
        opt.step()
        opt_ref.step()
    np.testing.assert_allclose(anycnn.to_numpy(param.data), ref.detach().numpy(), **TOL)
