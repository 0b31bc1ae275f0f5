"""Elementwise activations and their backward passes (ctx: what the derivative needs), and
the softmax over the last axis.

Each ``*_forward(x)`` returns ``(y, ctx)``. For ReLU, leaky ReLU, sigmoid and tanh ctx is the
derivative ``dy/dx`` (or what gives it at no cost), so the backward is one product
(:func:`elementwise_backward`); the activations of the mobile and modern networks (ReLU6,
Hardsigmoid, Hardswish, SiLU, GELU) keep their input (and what the forward computed anyway)
and form the derivative in their ``*_backward``, so inference pays for none of it. The
formulas and their boundary conventions are PyTorch's (``torch.nn.functional``), so the
layers can be compared with it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from array_api_compat import device

from ...backend import namespace_of
from ...kernels.dispatch import overridable
from .loss import softmax
from .primitives import bias_relu, relu_grad

# Activations (ctx is whatever the derivative needs)


def relu_forward(x: Any):
    """``max(x, 0)``; ctx is the output (its sign gives the derivative)."""
    y = bias_relu(x, None)
    return y, y


def relu_backward(dy: Any, y: Any):
    namespace_of(dy, y)  # one backend, one device
    return relu_grad(y, dy)


def leaky_relu_forward(x: Any, negative_slope: float):
    xp = namespace_of(x)
    pos = xp.astype(x > 0, x.dtype)
    slope = pos + negative_slope * (1.0 - pos)
    return x * slope, slope


def sigmoid_forward(x: Any):
    xp = namespace_of(x)
    # stable on both tails: exp of a non-positive number only
    e = xp.exp(-xp.abs(x))
    y = xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return y, y * (1.0 - y)


def tanh_forward(x: Any):
    xp = namespace_of(x)
    y = xp.tanh(x)
    return y, 1.0 - y * y


def relu6_forward(x: Any):
    """``min(max(x, 0), 6)``; ctx is the input (the derivative, 1 strictly inside (0, 6), is
    formed only by a backward pass)."""
    return namespace_of(x).clip(x, 0.0, 6.0), x


def relu6_backward(dy: Any, x: Any):
    xp = namespace_of(dy, x)
    return dy * xp.astype((x > 0.0) & (x < 6.0), dy.dtype)


def hardsigmoid_forward(x: Any):
    """``relu6(x + 3) / 6``; ctx is the input (derivative 1/6 strictly inside (-3, 3))."""
    return namespace_of(x).clip(x + 3.0, 0.0, 6.0) / 6.0, x


def hardsigmoid_backward(dy: Any, x: Any):
    xp = namespace_of(dy, x)
    return dy * (xp.astype((x > -3.0) & (x < 3.0), dy.dtype) / 6.0)


def hardswish_forward(x: Any):
    """``x * relu6(x + 3) / 6``; ctx is the input (derivative 0 up to -3, ``x/3 + 1/2``
    strictly between -3 and 3, 1 from 3 on: PyTorch's convention at the two ends)."""
    return x * (namespace_of(x).clip(x + 3.0, 0.0, 6.0) / 6.0), x


def hardswish_backward(dy: Any, x: Any):
    xp = namespace_of(dy, x)
    middle = xp.astype((x > -3.0) & (x < 3.0), dy.dtype)
    above = xp.astype(x >= 3.0, dy.dtype)
    return dy * (middle * (x / 3.0 + 0.5) + above)


def silu_forward(x: Any):
    """``x * sigmoid(x)`` (swish); ctx is ``(x, sigmoid(x))``."""
    s, _ = sigmoid_forward(x)
    return x * s, (x, s)


def silu_backward(dy: Any, ctx):
    """``dy * s * (1 + x * (1 - s))``."""
    x, s = ctx
    return dy * (s * (1.0 + x * (1.0 - s)))


#: erf is approximated on [0, ERF_TOP) by one polynomial per interval of ERF_STEP (below);
#: past ERF_TOP it is 1 to float64 precision (1 - erf(6) < 2.2e-17)
ERF_STEP, ERF_TOP, ERF_DEGREE = 0.5, 6.0, 12


@functools.cache
def _erf_table() -> np.ndarray:
    """``(ERF_DEGREE + 1, intervals)`` float64 power-basis coefficients: on interval ``i``
    (``[i*ERF_STEP, (i+1)*ERF_STEP)``), with ``t = 2 * (a - i*ERF_STEP) / ERF_STEP - 1`` in
    [-1, 1], ``erf(a) = sum_k table[k, i] * t**k``. Fitted once per process by least squares at
    200 Chebyshev points of each interval against :func:`math.erf` (maximum error on the grid
    below 1e-15, measured)."""
    intervals = round(ERF_TOP / ERF_STEP)
    t = np.cos(np.pi * (np.arange(200) + 0.5) / 200)
    columns = []
    for i in range(intervals):
        a = i * ERF_STEP + (t + 1.0) * (ERF_STEP / 2.0)
        values = np.array([math.erf(v) for v in a])
        cheb = np.polynomial.chebyshev.chebfit(t, values, ERF_DEGREE)
        columns.append(np.polynomial.chebyshev.cheb2poly(cheb))
    return np.stack(columns, axis=1)


@overridable
def erf(x: Any) -> Any:
    """The error function, elementwise, in ``x``'s dtype (the Array API has none).

    Portable: one degree-12 polynomial per half-unit interval of ``|x|`` below 6 (gathered with
    ``take``, evaluated by Horner's rule), 1 beyond, odd symmetry; within a few float64 ulps
    of :func:`math.erf`. Libraries with their own (torch, JAX, CuPy, NumPy with SciPy) use it
    through :mod:`anycnn.kernels.special`."""
    xp = namespace_of(x)
    table = _erf_table()
    a = xp.abs(x)
    inside = a < ERF_TOP  # False for NaN and inf too
    a_in = xp.where(inside, a, xp.zeros_like(a))
    index = xp.astype(xp.floor(a_in / ERF_STEP), xp.int64)
    flat = xp.reshape(index, (-1,))
    t = a_in / (ERF_STEP / 2.0) - xp.astype(index, x.dtype) * 2.0 - 1.0
    coeffs = xp.asarray(table, dtype=x.dtype, device=device(x))
    y = xp.zeros_like(x)
    for k in range(table.shape[0] - 1, -1, -1):
        y = y * t + xp.reshape(xp.take(coeffs[k, :], flat), x.shape)
    y = xp.where(inside, y, xp.where(xp.isnan(a), a, xp.ones_like(a)))
    return xp.where(x < 0.0, -y, y)


_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


def gelu_forward(x: Any, approximate: str = "none"):
    """GELU, ``x * Phi(x)``: exact with ``erf`` (``approximate="none"``) or the tanh form
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (``"tanh"``), as PyTorch's. ctx is
    ``(x, Phi(x))`` (exact) or ``(x, tanh(...))`` (tanh form)."""
    xp = namespace_of(x)
    if approximate == "tanh":
        th = xp.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x))
        return 0.5 * x * (1.0 + th), (x, th)
    cdf = 0.5 * (1.0 + erf(x * _SQRT_HALF))
    return x * cdf, (x, cdf)


def gelu_backward(dy: Any, ctx, approximate: str = "none"):
    """Input gradient of :func:`gelu_forward`: ``Phi(x) + x * phi(x)`` (exact) or the tanh
    form's derivative, times ``dy``."""
    x, t = ctx
    xp = namespace_of(dy, x)
    if approximate == "tanh":
        d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)
        return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner)
    return dy * (t + x * (_INV_SQRT_2PI * xp.exp(-0.5 * x * x)))


def softmax_forward(x: Any, axis: int = -1):
    """:func:`~anycnn.nn.functional.loss.softmax` over ``axis``; ctx is the output."""
    y = softmax(x, axis)
    return y, y


def softmax_backward(dy: Any, y: Any, axis: int = -1):
    """``y * (dy - sum(dy * y))`` over ``axis``."""
    xp = namespace_of(dy, y)
    return y * (dy - xp.sum(dy * y, axis=axis, keepdims=True))


def elementwise_backward(dy: Any, derivative: Any):
    """Backward of any elementwise activation whose ctx is its derivative (or mask)."""
    return dy * derivative


# --------------------------------------------------------------------------------------------
# Batch normalisation over N, H, W of NHWC input (or N of (N, C) input)
