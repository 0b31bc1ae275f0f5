"""Losses and their gradients with respect to the prediction; softmax."""

from __future__ import annotations

from typing import Any

import array_api_extra as xpx

from ...backend import namespace_of


def softmax_cross_entropy_forward(logits: Any, labels: Any, label_smoothing: float = 0.0):
    """Mean cross-entropy of ``logits`` (N, K) against integer ``labels`` (N,).

    With label smoothing ``e`` the target is ``(1-e)*one_hot + e/K`` (PyTorch's definition).
    Returns ``(loss, dlogits)``: a 0-d array and the gradient of the mean loss.
    """
    xp = namespace_of(logits, labels)
    n, k = logits.shape
    shifted = logits - xp.max(logits, axis=1, keepdims=True)
    exp = xp.exp(shifted)
    total = xp.sum(exp, axis=1, keepdims=True)
    log_probs = shifted - xp.log(total)
    target = xpx.one_hot(labels, k, dtype=logits.dtype, xp=xp)
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / k
    loss = -xp.sum(target * log_probs) / n
    dlogits = (exp / total - target) * (1.0 / n)
    return loss, dlogits


def softmax(x: Any, axis: int = -1) -> Any:
    """Softmax along ``axis`` (stable: the maximum is subtracted first, so large logits do not
    overflow); the result sums to 1 along ``axis``."""
    xp = namespace_of(x)
    exp = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return exp / xp.sum(exp, axis=axis, keepdims=True)


def mse_forward(pred: Any, target: Any):
    """Mean squared error and its gradient with respect to ``pred``."""
    xp = namespace_of(pred, target)
    diff = pred - target
    size = 1
    for s in diff.shape:
        size *= s
    return xp.sum(diff * diff) / size, diff * (2.0 / size)
