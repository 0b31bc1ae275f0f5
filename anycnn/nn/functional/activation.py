"""Elementwise activations and their backward passes (ctx: what the derivative needs)."""

from __future__ import annotations

from typing import Any

from ...backend import namespace_of
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


def elementwise_backward(dy: Any, derivative: Any):
    """Backward of any elementwise activation whose ctx is its derivative (or mask)."""
    return dy * derivative


# --------------------------------------------------------------------------------------------
# Batch normalisation over N, H, W of NHWC input (or N of (N, C) input)
