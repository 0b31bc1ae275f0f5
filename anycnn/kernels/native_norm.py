"""Compiled BatchNorm passes for NumPy rows ``(M, C)`` (Halide, compiled at first use).

BatchNorm's NumPy fast path (:mod:`anycnn.fastpath`) runs each pass as a few NumPy calls per
cache-sized chunk; these kernels do each pass in one sweep over the rows, a vector of channels
at a time, the row blocks shared between the threads:

- :func:`sums` — ``sum(rows, axis=0)``;
- :func:`squared_deviations` — ``sum((rows - mean)**2, axis=0)`` (no centred copy);
- :func:`moments` — both, in one sweep: each block's sum and its squared deviations from its
  own mean (the block is read again from the cache), merged over the blocks in float64;
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

import functools
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


class _Column:
    """Row ``k`` of a pass's (K, C) per-channel parameters (one buffer for all of them, not
    one each: a kernel call packs a descriptor per buffer): ``column[c]`` is ``p[c, k]``."""

    def __init__(self, params, k: int) -> None:
        self.params, self.k = params, k

    def __getitem__(self, c):
        return self.params[c, self.k]


def _columns(hl, t, count: int) -> tuple:
    """The ImageParam ``p`` of ``count`` per-channel parameters (K, C) and its columns."""
    p = hl.ImageParam(t, 2, "p")
    return p, [_Column(p, k) for k in range(count)]


def _used(images: dict, *names: str) -> dict:
    """``images`` less those not named: a pipeline takes only the buffers it reads."""
    return {name: images[name] for name in names}


def _normalised(value, mean, inv_std, c):
    """``xhat = (value - mean[c]) * inv_std[c]``: one expression for every pass."""
    return (value - mean[c]) * inv_std[c]


def _affine(hl, value, mean, inv_std, gamma, beta, c):
    """``xhat * gamma[c] + beta[c]``, BatchNorm's output before its ReLU, in strict IEEE
    arithmetic (no fused multiply-add, no reordering): the normalising pass and the backward
    passes that take the ReLU's mask again from the input (``remask``) get the same bits."""
    return hl.strict_float(_normalised(value, mean, inv_std, c) * gamma[c] + beta[c])


#: rows per block of :func:`moments`, whose second read of the block comes from the cache
#: (2048 rows of 16 float32 channels are 128 KiB): measured on resnet20's BatchNorm sizes at
#: batch 32 and 128, 512 and 1024 rows were 2-4% slower in all, and up to 45% slower at
#: 2048 rows of 64 channels (four tasks for little work)
MOMENT_ROWS = 2048

#: independent partial sums per vector of channels in a block's reduction (rows k, k + K, ...
#: go to partial k): one chain of dependent adds ran at a quarter of the memory's speed
CHAINS = 4


def _block_reduction(hl, t, block: int, m, value, width: int = 1):
    """``f[c, b]``: the sum over the rows ``row`` of block ``b`` (``block`` rows; those at or
    past ``m`` count zero) of ``value(c, row, b)`` (an Expr, or a list of ``width`` Exprs for
    a Tuple), kept as :data:`CHAINS` partial sums (interleaved rows) added at the end;
    schedule it with :func:`_schedule_reduction`. Returns ``(f, partials)``."""
    c, k, b = hl.Var("c"), hl.Var("k"), hl.Var("b")
    rr = hl.RDom([hl.Range(0, -(-block // CHAINS))], "rr")
    local = rr.x * CHAINS + k
    row = b * block + local
    zero = hl.cast(t, 0)
    terms = value(c, hl.min(row, m - 1), b)
    terms = terms if isinstance(terms, list) else [terms]
    inside = (local < block) & (row < m)
    terms = [hl.select(inside, v, zero) for v in terms]
    partial = hl.Func("partial")
    if width == 1:
        partial[c, k, b] = zero
        partial[c, k, b] = partial[c, k, b] + terms[0]
    else:
        partial[c, k, b] = hl.Tuple([zero] * width)
        partial[c, k, b] = hl.Tuple([partial[c, k, b][i] + terms[i] for i in range(width)])
    rk = hl.RDom([hl.Range(0, CHAINS)], "rk")
    f = hl.Func("reduced")
    if width == 1:
        f[c, b] = zero
        f[c, b] = f[c, b] + partial[c, rk.x, b]
    else:
        f[c, b] = hl.Tuple([zero] * width)
        f[c, b] = hl.Tuple([f[c, b][i] + partial[c, rk.x, b][i] for i in range(width)])
    return f, (partial, rr, rk)


def _schedule_reduction(f, partials, part, co, lanes: int) -> None:
    """Compute ``f`` (:func:`_block_reduction`) per vector of channels ``co`` of ``part``, its
    partial sums in registers, their rows in order."""
    partial, rr, rk = partials
    c, k = partial.args()[0], partial.args()[1]
    partial.compute_at(part, co).vectorize(c, lanes).unroll(k)
    partial.update().reorder(c, k, rr.x).vectorize(c, lanes).unroll(k)
    f.compute_at(part, co).vectorize(f.args()[0], lanes)
    f.update().reorder(f.args()[0], rk.x).vectorize(f.args()[0], lanes).unroll(rk.x)


@kernel_cache.pipeline
def _sums_pipeline(dtype: np.dtype, squares: bool, product: bool, relu: bool, block: int,
                  remask: bool = False):
    """part[c, b] = sum over rows r of block b (``block`` rows; rows past M count zero) of
    ``a[c, r]``, or of ``(a - mean)**2`` (``squares``), or the pair (g, g * h) with g = a, or
    a where ``y > 0`` (``relu``) (``product``); with ``remask``, a where BatchNorm's output
    before its ReLU, :func:`_affine` of ``h`` by ``gamma`` and ``beta``, is positive (``y``
    is not read)."""
    hl = native._halide()
    t = native._scalar_type(hl, dtype)
    lanes = native.vector_lanes(dtype)
    a, h, y = _row_params(hl, t)
    p, (mean, inv_std, gamma, beta) = _columns(hl, t, 4)
    zero = hl.cast(t, 0)

    def value(c, row, b):
        v = a[c, row]
        if squares:
            v = (v - mean[c]) * (v - mean[c])
        if remask:
            v = hl.select(_affine(hl, h[c, row], mean, inv_std, gamma, beta, c) > zero, v, zero)
        elif relu:
            v = hl.select(y[c, row] > zero, v, zero)
        if product:
            return [v, v * _normalised(h[c, row], mean, inv_std, c)]
        return v

    acc, partials = _block_reduction(hl, t, block, a.dim(1).extent(), value,
                                     2 if product else 1)
    c, b = hl.Var("c"), hl.Var("b")
    part = hl.Func("part")
    part[c, b] = acc[c, b]
    co, ci = hl.Var("co"), hl.Var("ci")
    part.split(c, co, ci, lanes).reorder(ci, co, b).vectorize(ci).parallel(b)
    _schedule_reduction(acc, partials, part, co, lanes)
    names = ["a"] + ["h"] * (product or remask) + ["y"] * (relu and not remask)
    names += ["p"] * (squares or product or remask)
    return part, _used({"a": a, "h": h, "y": y, "p": p}, *names), {}


@kernel_cache.pipeline
def _moments_pipeline(dtype: np.dtype, block: int):
    """(sum, squared deviations, centre)[c, b] of row block b (``block`` rows; those past M are
    left out): ``s = sum(a)``, ``centre = s / n_b`` over its ``n_b`` rows and
    ``q = sum((a - centre)**2)``, the block read a second time while it is in the cache."""
    hl = native._halide()
    t = native._scalar_type(hl, dtype)
    lanes = native.vector_lanes(dtype)
    a = hl.ImageParam(t, 2, "a")
    m = a.dim(1).extent()
    total, total_partials = _block_reduction(hl, t, block, m, lambda c, row, b: a[c, row])
    c, b = hl.Var("c"), hl.Var("b")
    centre = hl.Func("centre")
    centre[c, b] = total[c, b] / hl.cast(t, hl.min(m - b * block, block))

    def deviation(c, row, b):
        d = a[c, row] - centre[c, b]
        return d * d

    squares, square_partials = _block_reduction(hl, t, block, m, deviation)
    part = hl.Func("part")
    part[c, b] = hl.Tuple([total[c, b], squares[c, b], centre[c, b]])
    co, ci = hl.Var("co"), hl.Var("ci")
    part.split(c, co, ci, lanes).reorder(ci, co, b).vectorize(ci).parallel(b)
    _schedule_reduction(total, total_partials, part, co, lanes)
    centre.compute_at(part, co).vectorize(c, lanes)
    _schedule_reduction(squares, square_partials, part, co, lanes)
    return part, {"a": a}, {}


#: per-channel parameters of :func:`_elementwise_pipeline` (p0 ... p6)
PARAMS = 7


@kernel_cache.pipeline
def _elementwise_pipeline(dtype: np.dtype, kind: str, relu: bool, block: int, add: bool,
                          remask: bool = False):
    """``normalize``: out = xhat * p2 + p3 (plus h with ``add``; then max(., 0) with ``relu``)
    for xhat of rows a by p0 = mean, p1 = inv_std (:func:`_normalised`). ``input_grad``:
    out = g * p2 - (xhat * p4 + p3) with g = a, or a where ``y > 0`` (``relu``), xhat of rows
    h by p0 and p1. ``relu_grad``: out = a where y > 0, else a * p0 with p0 = 0 (a ReLU's
    gradient as the portable product ``(y > 0) * a`` gives it: an infinite or NaN ``a`` where
    ``y <= 0`` gives NaN; a zero the compiler cannot see, or it would fold the product)."""
    hl = native._halide()
    t = native._scalar_type(hl, dtype)
    lanes = native.vector_lanes(dtype)
    a, h, y = _row_params(hl, t)
    params, p = _columns(hl, t, PARAMS)
    c, m = hl.Var("c"), hl.Var("m")
    zero = hl.cast(t, 0)
    out = hl.Func("out")
    if kind == "relu_grad":
        out[c, m] = hl.select(y[c, m] > zero, a[c, m], a[c, m] * p[0][c])
    elif kind == "normalize":
        value = _affine(hl, a[c, m], p[0], p[1], p[2], p[3], c)
        value = value + h[c, m] if add else value
        out[c, m] = hl.max(value, zero) if relu else value
    else:
        if remask:  # the mask again from the input rows, by gamma p5 and beta p6
            on = _affine(hl, h[c, m], p[0], p[1], p[5], p[6], c) > zero
            g = hl.select(on, a[c, m], zero)
        else:
            g = hl.select(y[c, m] > zero, a[c, m], zero) if relu else a[c, m]
        out[c, m] = g * p[2][c] - (_normalised(h[c, m], p[0], p[1], c) * p[4][c] + p[3][c])
    mo, mi, co, ci = hl.Var("mo"), hl.Var("mi"), hl.Var("co"), hl.Var("ci")
    out.split(m, mo, mi, block, hl.TailStrategy.GuardWithIf)
    out.split(c, co, ci, lanes).reorder(ci, co, mi, mo).vectorize(ci).parallel(mo)
    names = {"relu_grad": ["a", "y"], "normalize": ["a"] + ["h"] * add}.get(
        kind, ["a", "h"] + ["y"] * (relu and not remask))
    return out, _used({"a": a, "h": h, "y": y, "p": params}, *names, "p"), {}


def _run(pipeline: kernel_cache.Pipeline, arrays: dict, outputs: list) -> None:
    """Run ``pipeline`` on those of ``arrays`` it takes (:func:`_used`)."""
    pipeline.run({name: arrays[name] for name in pipeline.images}, {}, outputs)


def _block_sums(rows: np.ndarray, squares: bool = False, mean: Any = None, x: Any = None,
                inv_std: Any = None, y: np.ndarray | None = None,
                affine: tuple | None = None) -> np.ndarray:
    """float64 sums over the row blocks of the ``_sums_pipeline`` parts: (C,), or (2, C) with
    the products of ``rows`` and ``xhat`` of ``x`` (by ``mean`` and ``inv_std``); ``affine``
    ``(gamma, beta)``: masked where BatchNorm's output of ``x`` before its ReLU is positive."""
    dtype = rows.dtype
    product = x is not None
    m, c = rows.shape
    rows = native.operand(rows)
    zeros = np.zeros(c, dtype=dtype)
    columns = [mean, inv_std, *(affine or (None, None))]
    arrays = {"a": rows, "h": native.operand(x) if x is not None else rows,
              "y": native.operand(y) if y is not None else rows,
              "p": np.array([zeros if v is None else v for v in columns], dtype=dtype)}
    outs = [np.empty((-(-m // BLOCK_ROWS), c), dtype=dtype) for _ in range(2 if product else 1)]
    if affine is not None:
        _run(_sums_pipeline(dtype, squares, product, True, BLOCK_ROWS, True), arrays, outs)
    else:
        _run(_sums_pipeline(dtype, squares, product, y is not None, BLOCK_ROWS), arrays, outs)
    total = [o.astype(np.float64).sum(axis=0) for o in outs]
    return np.stack(total) if product else total[0]


def sums(rows: np.ndarray) -> np.ndarray:
    """``sum(rows, axis=0)`` (C,) in ``rows``' dtype."""
    return _block_sums(rows).astype(rows.dtype)


def squared_deviations(rows: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``sum((rows - mean)**2, axis=0)`` (C,)."""
    return _block_sums(rows, squares=True, mean=mean).astype(rows.dtype)


def moments(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sum(rows, axis=0), sum((rows - mean)**2, axis=0))`` (each (C,), ``rows``' dtype) for
    ``mean = sum / M``, in one sweep over ``rows`` (M, C): per block of :data:`MOMENT_ROWS`
    rows its sum ``s_b`` and its squared deviations ``q_b`` from its own centre ``c_b``
    (float32 within the block, as :func:`sums`), then in float64 (Chan et al.'s pairwise
    merge) ``sum_b q_b + 2 (c_b - mean) (s_b - n_b c_b) + n_b (c_b - mean)**2`` — exact
    for any centre; the block's own mean keeps each term small."""
    m, c = rows.shape
    dtype = rows.dtype
    a = native.operand(rows)
    blocks = -(-m // MOMENT_ROWS)
    outs = [np.empty((blocks, c), dtype=dtype) for _ in range(3)]
    _moments_pipeline(dtype, MOMENT_ROWS).run({"a": a}, {}, outs)
    s, q, centre = (o.astype(np.float64) for o in outs)
    n = _block_counts(m, MOMENT_ROWS)
    total = s.sum(axis=0)
    shift = centre - total / m
    squares = (q + shift * (2.0 * (s - n * centre) + n * shift)).sum(axis=0)
    return total.astype(dtype), squares.astype(dtype)


@functools.lru_cache(maxsize=64)
def _block_counts(m: int, block: int) -> np.ndarray:
    """The rows of each ``block``-row block of ``m`` rows, float64 (blocks, 1), read-only
    (kept per (m, block): a model has a few row counts)."""
    counts = np.minimum(m - block * np.arange(-(-m // block)), block)
    counts = counts.astype(np.float64)[:, None]
    counts.flags.writeable = False
    return counts


def grad_sums(dy: np.ndarray, y: np.ndarray | None, x: np.ndarray, mean: Any,
              inv_std: Any, affine: tuple | None = None) -> tuple[Any, Any]:
    """``(sum(g, axis=0), sum(g * xhat, axis=0))`` for ``g = dy``, or ``dy`` where ``y > 0``,
    and ``xhat = (x - mean) * inv_std``; with ``affine`` ``(gamma, beta)`` (those the forward
    normalised by), ``y`` is not read: its sign is taken again from ``xhat * gamma + beta``,
    the same bits as the forward's (:func:`_affine`)."""
    total = _block_sums(dy, mean=mean, x=x, inv_std=inv_std, y=y,
                        affine=affine).astype(dy.dtype)
    return total[0], total[1]


def relu_sums(dy: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``sum(dy where y > 0, axis=0)`` (C,): the bias gradient under a ReLU whose output is
    ``y``."""
    return _block_sums(dy, y=y).astype(dy.dtype)


def _elementwise(kind: str, a: np.ndarray, h: np.ndarray | None, y: np.ndarray | None,
                 params: list[Any], relu: bool, add: bool = False,
                 remask: bool = False) -> np.ndarray:
    """The ``_elementwise_pipeline`` of ``kind`` over rows ``a``: a new array shaped as it."""
    a = native.operand(a)  # each held until the run ends (native.operand)
    columns = list(params) + [params[0]] * (PARAMS - len(params))
    arrays = {"a": a, "h": native.operand(h) if h is not None else a,
              "y": native.operand(y) if y is not None else a,
              "p": np.array(columns, dtype=a.dtype)}  # (PARAMS, C), one buffer
    out = np.empty_like(a)
    if remask:
        _run(_elementwise_pipeline(a.dtype, kind, True, BLOCK_ROWS, add, True), arrays, [out])
    else:
        _run(_elementwise_pipeline(a.dtype, kind, relu, BLOCK_ROWS, add), arrays, [out])
    return out


def normalize(rows: np.ndarray, mean: Any, inv_std: Any, gamma: Any, beta: Any,
              relu: bool, addend: np.ndarray | None = None) -> np.ndarray:
    """``y = xhat * gamma + beta`` (plus ``addend``, rows shaped as ``rows``; then
    ``max(y, 0)`` with ``relu``) for ``xhat = (rows - mean) * inv_std``."""
    return _elementwise("normalize", rows, addend, None, [mean, inv_std, gamma, beta], relu,
                        addend is not None)


def input_grad(dy: np.ndarray, y: np.ndarray | None, x: np.ndarray, mean: Any, inv_std: Any,
               k1: Any, k2: Any, k3: Any, affine: tuple | None = None) -> np.ndarray:
    """``g * k1 - (xhat * k3 + k2)`` for ``g = dy``, or ``dy`` where ``y > 0``, and
    ``xhat = (x - mean) * inv_std``; ``affine`` as for :func:`grad_sums` (``y`` not read)."""
    if affine is not None:
        return _elementwise("input_grad", dy, x, None, [mean, inv_std, k1, k2, k3, *affine],
                            True, remask=True)
    return _elementwise("input_grad", dy, x, y, [mean, inv_std, k1, k2, k3], y is not None)


@functools.lru_cache(maxsize=64)
def _zero_params(dtype: np.dtype, c: int) -> np.ndarray:
    """:func:`relu_grad`'s parameters, all zero (PARAMS, C), kept per (dtype, C): only ever
    read (left writeable: a Halide ``Buffer``, the in-memory kernels' operand, refuses
    read-only arrays)."""
    return np.zeros((PARAMS, c), dtype)


def relu_grad(y: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """``(y > 0) * dy`` for rows ``y`` and ``dy`` (M, C) of one dtype: a new array (M, C)."""
    zeros = _zero_params(dy.dtype, dy.shape[1])
    a = native.operand(dy)
    out = np.empty_like(a)
    pipeline = _elementwise_pipeline(a.dtype, "relu_grad", False, BLOCK_ROWS, False)
    pipeline.run({"a": a, "y": native.operand(y), "p": zeros}, {}, [out])
    return out


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


@implements("channel_moments")
def _channel_moments(rows: Any) -> Any:
    return moments(rows) if applies(rows) else DECLINE


@implements("relu_grad")
def _relu_grad(y: Any, dy: Any) -> Any:
    """The gradient through a ReLU whose output is ``y`` (any shape whose last axis
    :func:`applies`), in one compiled pass: ``dy`` shaped."""
    if not (isinstance(y, np.ndarray) and isinstance(dy, np.ndarray) and y.ndim >= 2
            and y.shape == dy.shape and y.dtype == dy.dtype):
        return DECLINE
    rows = dy.reshape(-1, dy.shape[-1])
    if not applies(rows):
        return DECLINE
    return relu_grad(y.reshape(rows.shape), rows).reshape(dy.shape)


@implements("relu_column_sums")
def _relu_column_sums(d: Any, y: Any) -> Any:
    return relu_sums(d, y) if applies(d) and applies(y) else DECLINE


@implements("normalize_from_rows")
def _normalize(rows: Any, mean: Any, inv_std: Any, gamma: Any, beta: Any, relu: bool,
               addend: Any = None) -> Any:
    return normalize(rows, mean, inv_std, gamma, beta, relu, addend) if applies(rows) else DECLINE


@implements("grad_sums_from_rows")
def _grad_sums(dy: Any, y: Any, x: Any, mean: Any, inv_std: Any, affine: Any = None) -> Any:
    return grad_sums(dy, y, x, mean, inv_std, affine) if applies(dy) else DECLINE


@implements("input_grad_from_rows")
def _input_grad(dy: Any, y: Any, x: Any, mean: Any, inv_std: Any, k1: Any, k2: Any,
                k3: Any, affine: Any = None) -> Any:
    return input_grad(dy, y, x, mean, inv_std, k1, k2, k3, affine) if applies(dy) else DECLINE
