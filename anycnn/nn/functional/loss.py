"""Losses and their gradients with respect to the prediction; softmax."""

from __future__ import annotations

import math
from typing import Any

import array_api_extra as xpx

from ...backend import namespace_of


def softmax_cross_entropy_forward(logits: Any, labels: Any, label_smoothing: float = 0.0,
                                  weight: Any = None):
    """Mean cross-entropy of ``logits`` (N, K) against ``labels``, with PyTorch's semantics.

    ``labels`` is either ``(N,)`` integer class ids or ``(N, K)`` floating targets (one-hot or
    soft: each row a distribution over the classes, typically summing to 1). With label
    smoothing ``e`` the target ``t`` becomes ``(1-e)*t + e/K`` (PyTorch's definition).
    ``weight`` (K,) rescales class ``c``'s term: the per-example loss is
    ``-sum_c weight[c] * t[i, c] * log_softmax(logits)[i, c]``. The mean divides by
    ``sum_i weight[labels[i]]`` for class ids (PyTorch's weighted mean) and by ``N`` for
    floating targets (as PyTorch does for probability targets).

    Returns ``(loss, dlogits)``: a 0-d array and the gradient of the mean loss, ``(N, K)``:
    ``(s_i * softmax(logits)_i - a_i) / D`` with ``a_ic = weight[c] * t_ic``, ``s_i = sum_c
    a_ic`` and ``D`` the divisor above (``softmax - t`` over ``N`` without weights).
    """
    xp = namespace_of(logits, labels)
    n, k = logits.shape
    shifted = logits - xp.max(logits, axis=1, keepdims=True)
    exp = xp.exp(shifted)
    total = xp.sum(exp, axis=1, keepdims=True)
    log_probs = shifted - xp.log(total)
    class_ids = labels.ndim == 1
    target = (xpx.one_hot(labels, k, dtype=logits.dtype, xp=xp) if class_ids
              else xp.astype(labels, logits.dtype))
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / k
    if weight is None:
        loss = -xp.sum(target * log_probs) / n
        if class_ids:  # the target rows sum to 1
            return loss, (exp / total - target) * (1.0 / n)
        scaled = target
        divisor = n
    else:
        scaled = target * weight[None, :]
        divisor = (xp.sum(xp.take(weight, labels, axis=0)) if class_ids else n)
        loss = -xp.sum(scaled * log_probs) / divisor
    mass = xp.sum(scaled, axis=1, keepdims=True)
    return loss, (mass * (exp / total) - scaled) / divisor


def _softplus(x: Any, xp: Any) -> Any:
    """``log(1 + exp(x))`` without overflow: ``max(x, 0) + log1p(exp(-|x|))``."""
    return xp.maximum(x, xp.zeros_like(x)) + xp.log1p(xp.exp(-xp.abs(x)))


def _sigmoid(x: Any, xp: Any) -> Any:
    """``1 / (1 + exp(-x))`` without overflow for large ``|x|``."""
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def bce_with_logits_forward(logits: Any, targets: Any, weight: Any = None,
                            pos_weight: Any = None):
    """Mean binary cross-entropy of ``sigmoid(logits)`` against ``targets`` (same shape, any
    rank; floats in ``[0, 1]``), computed from the logits (stable for any magnitude).

    Element loss ``w * (p * t * softplus(-x) + (1 - t) * softplus(x))`` = PyTorch's
    ``binary_cross_entropy_with_logits``: ``pos_weight`` ``p`` (broadcast along the last axis,
    one per class) weighs the positive term, ``weight`` ``w`` (broadcast likewise) the whole
    element; the mean is over all elements. Returns ``(loss, dlogits)`` with
    ``dlogits = w * ((1 - t) * sigmoid(x) - p * t * sigmoid(-x)) / numel``.
    """
    xp = namespace_of(logits, targets)
    t = xp.astype(targets, logits.dtype)
    size = math.prod(logits.shape)
    positive = t if pos_weight is None else t * pos_weight
    loss_el = positive * _softplus(-logits, xp) + (1.0 - t) * _softplus(logits, xp)
    grad = (1.0 - t) * _sigmoid(logits, xp) - positive * _sigmoid(-logits, xp)
    if weight is not None:
        loss_el, grad = loss_el * weight, grad * weight
    return xp.sum(loss_el) / size, grad * (1.0 / size)


def sigmoid_focal_forward(logits: Any, targets: Any, alpha: float = 0.25, gamma: float = 2.0):
    """Mean sigmoid focal loss (Lin et al. 2017), as ``torchvision.ops.sigmoid_focal_loss`` with
    ``reduction="mean"``: for ``p = sigmoid(x)``, ``ce = bce_with_logits(x, t)`` per element,
    ``p_t = p*t + (1-p)*(1-t)`` and ``a_t = alpha*t + (1-alpha)*(1-t)`` (no ``a_t`` when
    ``alpha < 0``), the element loss is ``a_t * ce * (1 - p_t) ** gamma``, averaged over all
    elements. ``logits`` and ``targets`` have the same shape (any rank).

    Returns ``(loss, dlogits)``; with ``m = 1 - p_t``, ``d/dx = a_t * ((p - t) * m**gamma +
    gamma * ce * m**(gamma-1) * (1 - 2t) * p * (1 - p))`` over the element count.
    """
    xp = namespace_of(logits, targets)
    t = xp.astype(targets, logits.dtype)
    size = math.prod(logits.shape)
    p = _sigmoid(logits, xp)
    ce = t * _softplus(-logits, xp) + (1.0 - t) * _softplus(logits, xp)
    m = 1.0 - (p * t + (1.0 - p) * (1.0 - t))
    m = xp.maximum(m, xp.zeros_like(m))  # rounding can leave -1e-17
    focus = m ** gamma if gamma else xp.ones_like(m)
    loss_el = ce * focus
    grad = (p - t) * focus
    if gamma:
        # m ** (gamma - 1) at m = 0 (p is exactly 0 or 1 there, so p * (1 - p) = 0 too)
        safe = xp.where(m > 0, m, xp.ones_like(m))
        grad = grad + gamma * ce * safe ** (gamma - 1.0) * (1.0 - 2.0 * t) * (p * (1.0 - p))
    if alpha >= 0:
        a_t = alpha * t + (1.0 - alpha) * (1.0 - t)
        loss_el, grad = loss_el * a_t, grad * a_t
    return xp.sum(loss_el) / size, grad * (1.0 / size)


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
