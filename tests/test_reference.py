"""Conv and pooling forward passes against direct-loop float64 references (no torch needed)."""

from __future__ import annotations

import numpy as np
import pytest

import anycnn
from anycnn import layers as L
from anycnn.nn.geometry import conv_padding, pool_output_size
from tests.layer_cases import case_id, conv_cases, pool_cases


def conv_reference(x, w, b, stride, pads, dilation):
    """Direct-loop NHWC cross-correlation; pads = (top, bottom, left, right)."""
    n, h, wd, c = x.shape
    kh, kw, _, f = w.shape
    xp = np.zeros((n, h + pads[0] + pads[1], wd + pads[2] + pads[3], c))
    xp[:, pads[0]:pads[0] + h, pads[2]:pads[2] + wd] = x
    ho = (xp.shape[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (xp.shape[2] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = np.zeros((n, ho, wo, f))
    for i in range(ho):
        for j in range(wo):
            for a in range(kh):
                for bb in range(kw):
                    patch = xp[:, i * stride[0] + a * dilation[0], j * stride[1] + bb * dilation[1]]
                    y[:, i, j] += patch @ w[a, bb]
    return y + (b if b is not None else 0.0)


def pool_reference(x, kernel, stride, padding, ceil_mode, mode, count_include_pad=True):
    """Direct-loop pooling with PyTorch's window and divisor rules."""
    n, h, w, c = x.shape
    ho = pool_output_size(h, kernel[0], stride[0], padding[0], ceil_mode)
    wo = pool_output_size(w, kernel[1], stride[1], padding[1], ceil_mode)
    y = np.zeros((n, ho, wo, c))
    for i in range(ho):
        for j in range(wo):
            h0, w0 = i * stride[0] - padding[0], j * stride[1] - padding[1]
            h1, w1 = min(h0 + kernel[0], h + padding[0]), min(w0 + kernel[1], w + padding[1])
            pool_size = (h1 - h0) * (w1 - w0)
            hs, ws, he, we = max(h0, 0), max(w0, 0), min(h1, h), min(w1, w)
            window = x[:, hs:he, ws:we]
            if mode == "max":
                y[:, i, j] = window.max(axis=(1, 2))
            else:
                divisor = pool_size if count_include_pad else (he - hs) * (we - ws)
                y[:, i, j] = window.sum(axis=(1, 2)) / divisor
    return y


@pytest.mark.parametrize("case", conv_cases(), ids=case_id)
def test_conv_matches_direct_loops(backend, rng, case):
    n, h, w, c = case["shape"]
    layer = L.Conv2D(c, case["out"], case["kernel_size"], case["stride"], case["padding"],
                     case["dilation"], bias=case["bias"], dtype="float64")
    if layer.bias is not None:
        layer.bias.data = anycnn.asarray(rng.standard_normal(layer.bias.shape))
    x = rng.standard_normal((n, h, w, c))
    y = anycnn.to_numpy(layer.forward(anycnn.asarray(x)))
    pads = conv_padding(case["padding"], case["kernel_size"], case["stride"], case["dilation"])
    ref = conv_reference(x, anycnn.to_numpy(layer.weight.data),
                         anycnn.to_numpy(layer.bias.data) if layer.bias else None,
                         case["stride"], pads, case["dilation"])
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", pool_cases(), ids=case_id)
@pytest.mark.parametrize("mode, include", [("max", True), ("avg", True), ("avg", False)])
def test_pool_matches_direct_loops(backend, rng, case, mode, include):
    opts = {k: case[k] for k in ("kernel_size", "stride", "padding", "ceil_mode")}
    layer = L.MaxPool2D(**opts) if mode == "max" else L.AvgPool2D(**opts,
                                                                  count_include_pad=include)
    x = rng.standard_normal(case["shape"])
    y = anycnn.to_numpy(layer.forward(anycnn.asarray(x)))
    ref = pool_reference(x, layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode,
                         mode, include)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


def test_same_padding_keeps_size_with_extra_bottom_right(backend, rng):
    """'same' with an even kernel pads one more row/column at the bottom/right (PyTorch)."""
    layer = L.Conv2D(1, 1, (2, 4), padding="same", bias=False, dtype="float64")
    x = rng.standard_normal((1, 5, 6, 1))
    y = anycnn.to_numpy(layer.forward(anycnn.asarray(x)))
    assert y.shape == (1, 5, 6, 1)
    ref = conv_reference(x, anycnn.to_numpy(layer.weight.data), None, (1, 1), (0, 1, 1, 2),
                         (1, 1))
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


def test_pool_output_sizes_match_torch():
    torch = pytest.importorskip("torch")
    for size in range(2, 10):
        for k in range(1, 4):
            for s in range(1, 4):
                for p in range(0, k // 2 + 1):
                    for ceil in (False, True):
                        if size + 2 * p < k:
                            continue
                        ref = torch.nn.functional.max_pool2d(
                            torch.zeros(1, 1, size, size), k, s, p, ceil_mode=ceil).shape[-1]
                        assert pool_output_size(size, k, s, p, ceil) == ref, (size, k, s, p, ceil)
