"""The small array operations the layers are built from, each a kernel dispatch point.

Each function here is its portable Array API expression; :func:`~anycnn.kernels.dispatch.
overridable` offers the call to the registered kernels first (on NumPy, the fast paths of
:mod:`anycnn.kernels.fastpath` write into preallocated arrays and split large calls over the
threads; see there), which return the same values up to rounding, or decline.

Layouts: ``x`` of :func:`take_rows` is ``(N, R, C)`` (rows of flattened images); NHWC images
elsewhere; per-channel vectors are ``(C,)``.
"""

from __future__ import annotations

from typing import Any

import array_api_extra as xpx
from array_api_compat import device

from ...backend import namespace_of
from ...kernels.dispatch import overridable


@overridable
def matmul(a: Any, b: Any) -> Any:
    """``a @ b`` for 2-D ``a`` (M, K) and ``b`` (K, N)."""
    return a @ b


@overridable
def take_rows(x: Any, index: Any) -> Any:
    """``take(x, index, axis=1)`` for ``x`` (N, R, C) and a 1-D integer ``index`` (L,):
    ``(N, L, C)``."""
    return namespace_of(x).take(x, index, axis=1)


@overridable
def sum_axis1(x: Any) -> Any:
    """The sum over axis 1 of ``x`` (N, K, ...): ``(N, ...)``."""
    return namespace_of(x).sum(x, axis=1)


@overridable
def pad_hw(x: Any, pads: tuple[int, int, int, int], value: float) -> Any:
    """NHWC ``x`` with its H and W axes padded by (top, bottom, left, right) with ``value``."""
    top, bottom, left, right = pads
    return xpx.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=value)


@overridable
def masked(mask: Any, x: Any) -> Any:
    """``mask * x`` for a boolean ``mask`` broadcastable against ``x`` along every axis but the
    first (both batch-first), in ``x``'s dtype."""
    return namespace_of(x).astype(mask, x.dtype) * x


@overridable
def bias_relu(x: Any, bias: Any) -> Any:
    """``maximum(x + bias, 0)`` for ``x`` (N, ..., C) and ``bias`` (C,) or None."""
    return namespace_of(x).maximum(x if bias is None else x + bias, 0.0)


@overridable
def add_relu(x: Any, y: Any, relu: bool = True) -> Any:
    """``maximum(x + y, 0)`` (a residual sum and its ReLU), or ``x + y`` when not ``relu``."""
    return namespace_of(x, y).maximum(x + y, 0.0) if relu else x + y


def add(x: Any, y: Any) -> Any:
    """``x + y`` for same-shaped ``x`` and ``y`` (a new array)."""
    return add_relu(x, y, relu=False)


@overridable
def relu_grad(y: Any, dy: Any) -> Any:
    """The gradient through a ReLU whose output is ``y``: ``dy`` where ``y > 0``, else 0."""
    return namespace_of(y, dy).astype(y > 0, dy.dtype) * dy


@overridable
def window_max(entries: Any) -> tuple[Any, Any]:
    """Maximum over axis 1 of ``entries`` (N, K, ...) and the boolean mask ``(N, K, ...)`` of
    the *first* tap reaching it in each window (ties go to the lowest k, as in PyTorch):
    ``(y, mask)``."""
    xp = namespace_of(entries)
    y = xp.max(entries, axis=1)
    taken = entries[:, 0, ...] == y
    firsts = [taken]
    for j in range(1, entries.shape[1]):
        first = (entries[:, j, ...] == y) & ~taken
        taken = taken | first
        firsts.append(first)
    return y, xp.stack(firsts, axis=1)


def column_sums(d: Any) -> Any:
    """Sum over the rows of a 2-D ``d`` (M, F) → (F,), as a GEMV (faster than ``sum(axis=0)``)."""
    xp = namespace_of(d)
    ones = xp.ones((1, d.shape[0]), dtype=d.dtype, device=device(d))
    return xp.reshape(matmul(ones, d), (d.shape[1],))


@overridable
def relu_column_sums(d: Any, y: Any) -> Any:
    """Sum over the rows of ``d`` (M, F) where ``y`` (M, F), a ReLU's output, is positive:
    the bias gradient of a layer whose ReLU output is ``y`` → (F,)."""
    return column_sums(relu_grad(y, d))
