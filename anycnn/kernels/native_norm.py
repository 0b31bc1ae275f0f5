"""Compiled BatchNorm passes for NumPy rows ``(M, C)`` (Halide, compiled at first use).

BatchNorm's NumPy fast path (:mod:`anycnn.fastpath`) runs each pass as a few NumPy calls per
cache-sized chunk; these kernels do each pass in one sweep over the rows, a vector of channels
at a time, the row blocks shared between the threads:

- :func:`sums` — ``sum(rows, axis=0)``;
- :func:`squared_deviations` — ``sum((rows - mean)**2, axis=0)`` (no centred copy);
- :func:`normalize` — ``y = xhat * gamma + beta`` (plus a residual sum's other output; then
  ``max(y, 0)`` with ``relu``) for ``xhat = (rows - mean) * inv_std``;
- :func:`grad_sums` — ``sum(g, axis=0)`` and ``sum(g * xhat, axis=0)`` for ``g = dy``, or
  ``dy`` where the fused ReLU's output ``y`` is positive (``g`` is not stored);
- :func:`input_grad` — ``g * k1 - (xhat * k3 + k2)``, the input gradient;

``xhat`` is never stored: the backward passes take the input rows, the mean and ``inv_std``
and compute it again (the same expression, so the same values), one write of the activations
fewer each step.
- :func:`relu_sums` — ``sum(dy where y > 0, axis=0)`` (a bias gradient under a ReLU).

Sums are float32 (or float64) within a block of :data:`BLOCK_ROWS` rows and float64 over the
blocks, added in block order: repeatable, and within rounding of the NumPy path (tests compare
them). They apply when :func:`applies` (NumPy, a float dtype, C a multiple of the vector
lanes), under the switches of :mod:`anycnn.native`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import kernel_cache, native
from .dispatch import DECLINE, implements

#: rows per block (one task, one partial sum): 2048 rows of 16 float32 channels are 128 KiB
BLOCK_ROWS = 2048


def applies(rows: Any) -> bool:
    """Whether these kernels compute BatchNorm's passes over ``rows`` (M, C)."""
    return (isinstance(rows, np.ndarray) and rows.ndim == 2
            and native.available(np, rows.dtype)
            and rows.shape[1] % native.vector_lanes(rows.dtype) == 0 and rows.shape[0] > 0)


def _row_params(hl, t) -> tuple:
    """The (c, m) row operands every pass may read: ``a`` (the rows), ``h`` (a second array:
    the input, normalised by :func:`_normalised`) and ``y`` (the fused ReLU's output, for its
    mask)."""
    return hl.ImageParam(t, 2, "a"), hl.ImageParam(t, 2, "h"), hl.ImageParam(t, 2, "y")


def _normalised(value, mean, inv_std, c):
    """``xhat = (value - mean[c]) * inv_std[c]``: one expression for every pass."""
    return (value - mean[c]) * inv_std[c]


@kernel_cache.pipeline
def _sums_pipeline(dtype: np.dtype, squares: bool, product: bool, relu: bool, block: int):
    """part[c, b] = sum over rows r of block b (``block`` rows; rows past M count zero) of
    ``a[c, r]``, or of ``(a - mean)**2`` (``squares``), or the pair (g, g * h) with g = a, or
    a where ``y > 0`` (``relu``) (``product``)."""
    hl = native._halide()
    t = native._scalar_type(hl, dtype)
    lanes = native.vector_lanes(dtype)
    a, h, y = _row_params(hl, t)
    mean, inv_std = hl.ImageParam(t, 1, "mean"), hl.ImageParam(t, 1, "inv_std")
    c, b = hl.Var("c"), hl.Var("b")
    m = a.dim(1).extent()
    r = hl.RDom([hl.Range(0, block)])
    row = b * block + r.x
    safe = hl.min(row, m - 1)
    zero = hl.cast(t, 0)
    value = a[c, safe]
    if squares:
        value = (value - mean[c]) * (value - mean[c])
    if relu:
        value = hl.select(y[c, safe] > zero, value, zero)
    value = hl.select(row < m, value, zero)
    acc = hl.Func("acc")
    if product:
        acc[c, b] = hl.Tuple([zero, zero])
        xhat = _normalised(h[c, safe], mean, inv_std, c)
        acc[c, b] = hl.Tuple([acc[c, b][0] + value, acc[c, b][1] + value * xhat])
    else:
        acc[c, b] = zero
        acc[c, b] = acc[c, b] + value
    part = hl.Func("part")
    part[c, b] = acc[c, b]
    co, ci = hl.Var("co"), hl.Var("ci")
    part.split(c, co, ci, lanes).reorder(ci, co, b).vectorize(ci).parallel(b)
    acc.compute_at(part, co).vectorize(c, lanes)
    acc.update().reorder(c, r.x).vectorize(c, lanes)
    return part, {"a": a, "h": h, "y": y, "mean": mean, "inv_std": inv_std}, {}


@kernel_cache.pipeline
def _elementwise_pipeline(dtype: np.dtype, kind: str, relu: bool, block: int, add: bool):
    """``normalize``: out = xhat * p2 + p3 (plus h with ``add``; then max(., 0) with ``relu``)
    for xhat of rows a by p0 = mean, p1 = inv_std (:func:`_normalised`). ``input_grad``:
    out = g * p2 - (xhat * p4 + p3) with g = a, or a where ``y > 0`` (``relu``), xhat of rows
    h by p0 and p1."""
    hl = native._halide()
    t = native._scalar_type(hl, dtype)
    lanes = native.vector_lanes(dtype)
    a, h, y = _row_params(hl, t)
    p = [hl.ImageParam(t, 1, f"p{i}") for i in range(5)]
    c, m = hl.Var("c"), hl.Var("m")
    zero = hl.cast(t, 0)
    out = hl.Func("out")
    if kind == "normalize":
        value = _normalised(a[c, m], p[0], p[1], c) * p[2][c] + p[3][c]
        value = value + h[c, m] if add else value
        out[c, m] = hl.max(value, zero) if relu else value
    else:
        g = hl.select(y[c, m] > zero, a[c, m], zero) if relu else a[c, m]
        out[c, m] = g * p[2][c] - (_normalised(h[c, m], p[0], p[1], c) * p[4][c] + p[3][c])
    mo, mi, co, ci = hl.Var("mo"), hl.Var("mi"), hl.Var("co"), hl.Var("ci")
    out.split(m, mo, mi, block, hl.TailStrategy.GuardWithIf)
    out.split(c, co, ci, lanes).reorder(ci, co, mi, mo).vectorize(ci).parallel(mo)
    return out, {"a": a, "h": h, "y": y, **{f"p{i}": v for i, v in enumerate(p)}}, {}


def _block_sums(rows: np.ndarray, squares: bool = False, mean: Any = None, x: Any = None,
                inv_std: Any = None, y: np.ndarray | None = None) -> np.ndarray:
    """float64 sums over the row blocks of the ``_sums_pipeline`` parts: (C,), or (2, C) with
    the products of ``rows`` and ``xhat`` of ``x`` (by ``mean`` and ``inv_std``)."""
    dtype = rows.dtype
    product = x is not None
    m, c = rows.shape
    rows = native.operand(rows)
    zeros = np.zeros(c, dtype=dtype)
    arrays = {"a": rows, "h": native.operand(x) if product else rows,
              "y": native.operand(y) if y is not None else rows,
              "mean": zeros if mean is None else native.operand(mean, dtype),
              "inv_std": zeros if inv_std is None else native.operand(inv_std, dtype)}
    outs = [np.empty((-(-m // BLOCK_ROWS), c), dtype=dtype) for _ in range(2 if product else 1)]
    _sums_pipeline(dtype, squares, product, y is not None, BLOCK_ROWS).run(arrays, {}, outs)
    total = [o.astype(np.float64).sum(axis=0) for o in outs]
    return np.stack(total) if product else total[0]


def sums(rows: np.ndarray) -> np.ndarray:
    """``sum(rows, axis=0)`` (C,) in ``rows``' dtype."""
    return _block_sums(rows).astype(rows.dtype)


def squared_deviations(rows: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``sum((rows - mean)**2, axis=0)`` (C,)."""
    return _block_sums(rows, squares=True, mean=mean).astype(rows.dtype)


def grad_sums(dy: np.ndarray, y: np.ndarray | None, x: np.ndarray, mean: Any,
              inv_std: Any) -> tuple[Any, Any]:
    """``(sum(g, axis=0), sum(g * xhat, axis=0))`` for ``g = dy``, or ``dy`` where ``y > 0``,
    and ``xhat = (x - mean) * inv_std``."""
    total = _block_sums(dy, mean=mean, x=x, inv_std=inv_std, y=y).astype(dy.dtype)
    return total[0], total[1]


def relu_sums(dy: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``sum(dy where y > 0, axis=0)`` (C,): the bias gradient under a ReLU whose output is
    ``y``."""
    return _block_sums(dy, y=y).astype(dy.dtype)


def _elementwise(kind: str, a: np.ndarray, h: np.ndarray | None, y: np.ndarray | None,
                 params: list[Any], relu: bool, add: bool = False) -> np.ndarray:
    """The ``_elementwise_pipeline`` of ``kind`` over rows ``a``: a new array shaped as it."""
    a = native.operand(a)  # each held until the run ends (native.operand)
    params = [native.operand(v, a.dtype) for v in params]
    params += [params[0]] * (5 - len(params))
    arrays = {"a": a, "h": native.operand(h) if h is not None else a,
              "y": native.operand(y) if y is not None else a,
              **{f"p{i}": v for i, v in enumerate(params)}}
    out = np.empty_like(a)
    _elementwise_pipeline(a.dtype, kind, relu, BLOCK_ROWS, add).run(arrays, {}, [out])
    return out


def normalize(rows: np.ndarray, mean: Any, inv_std: Any, gamma: Any, beta: Any,
              relu: bool, addend: np.ndarray | None = None) -> np.ndarray:
    """``y = xhat * gamma + beta`` (plus ``addend``, rows shaped as ``rows``; then
    ``max(y, 0)`` with ``relu``) for ``xhat = (rows - mean) * inv_std``."""
    return _elementwise("normalize", rows, addend, None, [mean, inv_std, gamma, beta], relu,
                        addend is not None)


def input_grad(dy: np.ndarray, y: np.ndarray | None, x: np.ndarray, mean: Any, inv_std: Any,
               k1: Any, k2: Any, k3: Any) -> np.ndarray:
    """``g * k1 - (xhat * k3 + k2)`` for ``g = dy``, or ``dy`` where ``y > 0``, and
    ``xhat = (x - mean) * inv_std``."""
    return _elementwise("input_grad", dy, x, y, [mean, inv_std, k1, k2, k3], y is not None)


# --------------------------------------------------------------------------------------------
# Dispatch kernels: BatchNorm's passes of anycnn.nn.functional.norm, computed here or declined


@implements("batch_norm_from_rows")
def _from_rows(rows: Any) -> Any:
    """BatchNorm over ``rows`` keeps the input rows and the mean, not ``xhat``, when these
    kernels compute its passes (each normalises again as it reads)."""
    return applies(rows) or DECLINE


@implements("channel_sums")
def _channel_sums(rows: Any) -> Any:
    return sums(rows) if applies(rows) else DECLINE


@implements("squared_deviations")
def _squared_deviations(rows: Any, mean: Any) -> Any:
    return squared_deviations(rows, mean) if applies(rows) else DECLINE


@implements("relu_column_sums")
def _relu_column_sums(d: Any, y: Any) -> Any:
    return relu_sums(d, y) if applies(d) and applies(y) else DECLINE


@implements("normalize_from_rows")
def _normalize(rows: Any, mean: Any, inv_std: Any, gamma: Any, beta: Any, relu: bool,
               addend: Any = None) -> Any:
    return normalize(rows, mean, inv_std, gamma, beta, relu, addend) if applies(rows) else DECLINE


@implements("grad_sums_from_rows")
def _grad_sums(dy: Any, y: Any, x: Any, mean: Any, inv_std: Any) -> Any:
    return grad_sums(dy, y, x, mean, inv_std) if applies(dy) else DECLINE


@implements("input_grad_from_rows")
def _input_grad(dy: Any, y: Any, x: Any, mean: Any, inv_std: Any, k1: Any, k2: Any,
                k3: Any) -> Any:
    return input_grad(dy, y, x, mean, inv_std, k1, k2, k3) if applies(dy) else DECLINE
