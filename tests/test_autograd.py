"""Forward-only modules (``forward`` written, ``backward`` derived) against PyTorch autograd in
float64 (tolerance 1e-8): outputs, input gradients and every parameter gradient, on the
backend under test. Each model's torch twin is written with torch's own operators from the
same parameter values; the anycnn model is run both through the layer interface
(``forward``/``backward``) and PyTorch-style (``model(x)`` → ``Variable`` → ``.backward()``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import anycnn
from anycnn import layers as L
from anycnn.autograd import Variable
from anycnn.nn.containers import Residual
from anycnn.nn.module import Module, Parameter
from anycnn.nn.sequential import Sequential

torch = pytest.importorskip("torch")
TF = torch.nn.functional
TOL = dict(rtol=1e-8, atol=1e-8)


def param(rng, *shape):
    return Parameter(anycnn.asarray(rng.standard_normal(shape)))


# --------------------------------------------------------------------------------------------
# torch twins of anycnn's layers (NHWC kept: permute around torch's NCHW operators)


def t_conv(x, w, b=None, padding=0, groups=1):
    y = TF.conv2d(x.permute(0, 3, 1, 2), w.permute(3, 2, 0, 1), b, padding=padding,
                  groups=groups)
    return y.permute(0, 2, 3, 1)


def t_layer_norm(x, w, b, eps=1e-5):
    return TF.layer_norm(x, (x.shape[-1],), w, b, eps)


def gelu_tanh(xp, h):
    return 0.5 * h * (1 + xp.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))


def sigmoid(xp, s):
    return 1 / (1 + xp.exp(-s))


# --------------------------------------------------------------------------------------------
# The models: (anycnn module, torch function of (params by name, *inputs), input shapes)


class SqueezeExcite(Module):
    """conv → ReLU → channel gate from a two-layer MLP of the spatial mean, plus the input."""

    def __init__(self, c=4, r=2):
        self.conv = L.Conv2D(c, c, 3, padding=1, dtype="float64")
        self.fc1, self.fc2 = L.Dense(c, r, dtype="float64"), L.Dense(r, c, dtype="float64")
        self.relu = L.ReLU()

    def forward(self, x):
        xp = anycnn.namespace_of(x)
        h = self.relu(self.conv(x))
        s = self.fc2(self.relu(self.fc1(xp.mean(h, axis=(1, 2)))))
        return self.relu(h * sigmoid(xp, s)[:, None, None, :] + x)


def t_squeeze_excite(p, x):
    h = torch.relu(t_conv(x, p["conv.weight"], p["conv.bias"], padding=1))
    s = torch.relu(h.mean(dim=(1, 2)) @ p["fc1.weight"] + p["fc1.bias"])
    s = s @ p["fc2.weight"] + p["fc2.bias"]
    return torch.relu(h * torch.sigmoid(s)[:, None, None, :] + x)


class Siamese(Module):
    """Two inputs through one shared encoder; compared by product and absolute difference."""

    def __init__(self):
        self.encoder = Sequential(L.Conv2D(3, 4, 3, dtype="float64"), L.ReLU(),
                                  L.GlobalAvgPool2D(), L.Dense(4, 5, dtype="float64"))

    def forward(self, a, b):
        xp = anycnn.namespace_of(a)
        ea, eb = self.encoder(a), self.encoder(b)
        return xp.concat([ea * eb, xp.abs(ea - eb)], axis=-1)


def t_siamese(p, a, b):
    def enc(x):
        h = torch.relu(t_conv(x, p["encoder.0.weight"], p["encoder.0.bias"])).mean(dim=(1, 2))
        return h @ p["encoder.3.weight"] + p["encoder.3.bias"]
    ea, eb = enc(a), enc(b)
    return torch.cat([ea * eb, (ea - eb).abs()], dim=-1)


class ChannelShuffle(Module):
    """Grouped conv, channels shuffled between its two groups, grouped conv again."""

    def __init__(self):
        self.c1 = L.Conv2D(4, 4, 3, padding=1, groups=2, dtype="float64")
        self.c2 = L.Conv2D(4, 4, 1, groups=2, dtype="float64")

    def forward(self, x):
        xp = anycnn.namespace_of(x)
        h = self.c1(x)
        n, hh, ww, c = h.shape
        h = xp.reshape(xp.permute_dims(xp.reshape(h, (n, hh, ww, 2, c // 2)), (0, 1, 2, 4, 3)),
                       (n, hh, ww, c))
        return self.c2(h)


def t_channel_shuffle(p, x):
    h = t_conv(x, p["c1.weight"], p["c1.bias"], padding=1, groups=2)
    n, hh, ww, c = h.shape
    h = h.reshape(n, hh, ww, 2, c // 2).permute(0, 1, 2, 4, 3).reshape(n, hh, ww, c)
    return t_conv(h, p["c2.weight"], p["c2.bias"], groups=2)


class SplitRMS(Module):
    """Split the channels: one half convolved, the other RMS-normalised with a learned gain;
    concatenated, then a max-minus-min spread per position."""

    def __init__(self, rng):
        self.conv = L.Conv2D(2, 3, 3, padding=1, dtype="float64")
        self.gain = param(rng, 2)

    def forward(self, x):
        xp = anycnn.namespace_of(x)
        a, b = x[..., :2], x[..., 2:]
        b = b / xp.sqrt(xp.mean(b * b, axis=-1, keepdims=True) + 1e-6) * self.gain.data
        h = xp.concat([self.conv(a), b], axis=-1)
        spread = xp.max(h, axis=-1, keepdims=True) - xp.min(h, axis=-1, keepdims=True)
        return h * spread


def t_split_rms(p, x):
    a, b = x[..., :2], x[..., 2:]
    b = b / torch.sqrt((b * b).mean(dim=-1, keepdim=True) + 1e-6) * p["gain"]
    h = torch.cat([t_conv(a, p["conv.weight"], p["conv.bias"], padding=1), b], dim=-1)
    return h * (h.amax(dim=-1, keepdim=True) - h.amin(dim=-1, keepdim=True))


class ConvNeXtBlock(Module):
    """Depthwise 7x7 conv, LayerNorm, a matmul MLP (GELU, tanh form) and a layer scale."""

    def __init__(self, rng, c=4):
        self.dw = L.Conv2D(c, c, 7, padding=3, groups=c, dtype="float64")
        self.norm = L.LayerNorm(c, dtype="float64")
        self.w1, self.b1 = param(rng, c, 4 * c), param(rng, 4 * c)
        self.w2, self.b2 = param(rng, 4 * c, c), param(rng, c)
        self.gamma = param(rng, c)

    def forward(self, x):
        xp = anycnn.namespace_of(x)
        h = self.norm(self.dw(x))
        h = gelu_tanh(xp, h @ self.w1.data + self.b1.data) @ self.w2.data + self.b2.data
        return x + self.gamma.data * h


def t_convnext(p, x):
    h = t_layer_norm(t_conv(x, p["dw.weight"], p["dw.bias"], padding=3, groups=x.shape[-1]),
                     p["norm.weight"], p["norm.bias"])
    h = TF.gelu(h @ p["w1"] + p["b1"], approximate="tanh") @ p["w2"] + p["b2"]
    return x + p["gamma"] * h


class DenseTwice(Module):
    """One Dense applied twice (tied weights) around a tanh."""

    def __init__(self):
        self.fc = L.Dense(6, 6, dtype="float64")

    def forward(self, x):
        xp = anycnn.namespace_of(x)
        return self.fc(xp.tanh(self.fc(x)))


def t_dense_twice(p, x):
    def fc(h):
        return h @ p["fc.weight"] + p["fc.bias"]
    return fc(torch.tanh(fc(x)))


class EveryOperation(Module):
    """The operators and namespace functions the guide lists, in one graph."""

    def __init__(self, rng):
        self.w = param(rng, 3, 3)

    def forward(self, x):
        xp = anycnn.namespace_of(x)
        h = x @ self.w.data                               # (N, H, W, 3)
        pos = xp.where(h > 0, h, 0.1 * h)                 # mask from a comparison
        a = xp.exp(-xp.abs(pos)) + xp.log(1 + pos * pos) - xp.sqrt(pos * pos + 1.0) / 2
        b = xp.maximum(a, xp.tanh(h)) * xp.minimum(a, 0.5) ** 2
        c = xp.flip(xp.permute_dims(b, (0, 2, 1, 3)), axis=1)       # (N, W, H, 3)
        d = xp.stack([xp.sum(c, axis=1), xp.max(c, axis=1), xp.min(c, axis=1)], axis=-1)
        e = xp.squeeze(xp.expand_dims(xp.reshape(d, (d.shape[0], -1)), axis=1), axis=1)
        f = xp.mean(xp.reshape(e, (e.shape[0], 3, -1)), axis=-1)      # (N, 3)
        return f[:, None, None, :] - x / (2.0 + f[:, None, None, :1])


def t_every(p, x):
    h = x @ p["w"]
    pos = torch.where(h > 0, h, 0.1 * h)
    a = torch.exp(-pos.abs()) + torch.log(1 + pos * pos) - torch.sqrt(pos * pos + 1.0) / 2
    b = torch.maximum(a, torch.tanh(h)) * torch.minimum(a, torch.tensor(0.5,
                                                                       dtype=a.dtype)) ** 2
    c = torch.flip(b.permute(0, 2, 1, 3), dims=(1,))
    d = torch.stack([c.sum(dim=1), c.amax(dim=1), c.amin(dim=1)], dim=-1)
    e = d.reshape(d.shape[0], -1)[:, None].squeeze(1)
    f = e.reshape(e.shape[0], 3, -1).mean(dim=-1)
    return f[:, None, None, :] - x / (2.0 + f[:, None, None, :1])


def shared_relu_sequential():
    relu = L.ReLU()
    return Sequential(L.Dense(5, 6, dtype="float64"), relu, L.Dense(6, 4, dtype="float64"),
                      relu)


def t_shared_relu(p, x):
    return torch.relu(torch.relu(x @ p["0.weight"] + p["0.bias"]) @ p["2.weight"]
                      + p["2.bias"])


def forward_only_in_residual():
    return Residual(Sequential(L.Conv2D(4, 4, 3, padding=1, dtype="float64"),
                               SqueezeExcite()))


def t_forward_only_in_residual(p, x):
    h = t_conv(x, p["body.0.weight"], p["body.0.bias"], padding=1)
    sub = {k[len("body.1."):]: v for k, v in p.items() if k.startswith("body.1.")}
    return t_squeeze_excite(sub, h) + x


CASES = {
    "squeeze_excite": (lambda rng: SqueezeExcite(), t_squeeze_excite, [(2, 5, 5, 4)]),
    "siamese": (lambda rng: Siamese(), t_siamese, [(2, 6, 6, 3), (2, 6, 6, 3)]),
    "channel_shuffle": (lambda rng: ChannelShuffle(), t_channel_shuffle, [(2, 5, 4, 4)]),
    "split_rms": (SplitRMS, t_split_rms, [(2, 4, 5, 4)]),
    "convnext_block": (ConvNeXtBlock, t_convnext, [(2, 8, 8, 4)]),
    "dense_twice": (lambda rng: DenseTwice(), t_dense_twice, [(3, 6)]),
    "every_operation": (EveryOperation, t_every, [(2, 4, 5, 3)]),
    "shared_relu_sequential": (lambda rng: shared_relu_sequential(), t_shared_relu, [(3, 5)]),
    "forward_only_in_residual": (lambda rng: forward_only_in_residual(),
                                 t_forward_only_in_residual, [(2, 5, 5, 4)]),
}


def _torch_reference(model, fn, xs, dy):
    params = {name: torch.tensor(anycnn.to_numpy(p.data), requires_grad=True)
              for name, p in model.named_parameters()}
    txs = [torch.tensor(x, requires_grad=True) for x in xs]
    y = fn(params, *txs)
    y.backward(torch.tensor(dy))
    return (y.detach().numpy(), [t.grad.numpy() for t in txs],
            {name: t.grad.numpy() for name, t in params.items()})


def _assert_grads(model, expected):
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        np.testing.assert_allclose(anycnn.to_numpy(p.grad), expected[name], **TOL,
                                   err_msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_autograd(backend, case):
    build, reference, shapes = CASES[case]
    rng = np.random.default_rng(7)
    model = build(rng)
    xs = [rng.standard_normal(s) for s in shapes]
    with anycnn.no_grad():
        y_shape = tuple(model.forward(*[anycnn.asarray(x) for x in xs]).shape)
    dy = rng.standard_normal(y_shape)
    y_ref, dx_ref, grads_ref = _torch_reference(model, reference, xs, dy)

    # the layer interface: forward, then backward(dy)
    y = model.forward(*[anycnn.asarray(x) for x in xs])
    np.testing.assert_allclose(anycnn.to_numpy(y), y_ref, **TOL)
    dx = model.backward(anycnn.asarray(dy))
    dxs = dx if isinstance(dx, tuple) else (dx,)
    assert len(dxs) == len(xs)
    for got, want in zip(dxs, dx_ref):
        np.testing.assert_allclose(anycnn.to_numpy(got), want, **TOL)
    _assert_grads(model, grads_ref)

    # PyTorch style: model(x) is a Variable; a scalar of it backpropagates (grads add up)
    model.zero_grad()
    leaves = [Variable(anycnn.asarray(x), requires_grad=True) for x in xs]
    out = model(*leaves)
    assert isinstance(out, Variable)
    xp = anycnn.namespace_of(out)
    xp.sum(out * anycnn.asarray(dy)).backward()
    for leaf, want in zip(leaves, dx_ref):
        np.testing.assert_allclose(anycnn.to_numpy(leaf.grad), want, **TOL)
    _assert_grads(model, grads_ref)
