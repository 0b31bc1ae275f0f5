"""BatchNorm's whole training pass on NumPy rows, its per-channel arithmetic compiled too.

:mod:`~anycnn.kernels.native_norm` sweeps the activations (moments, normalising, gradient sums,
input gradient); between those sweeps :func:`anycnn.nn.functional.norm.batch_norm_forward`
and ``batch_norm_backward`` did the per-channel arithmetic on (C,) vectors with NumPy: merging
the blocks' moments in float64, the mean, the variance, the running statistics, ``inv_std``,
packing the next pass's parameters; in the backward the gradient sums' merge and the input
gradient's coefficients. About 50 small NumPy calls per layer and step, each costing more in
Python than its arithmetic (and run with the caches cold from the sweep before).

Here each sweep that ends in such a stretch computes it too, in the same compiled call: the
sweep's per-block parts stay inside the pipeline, and a second stage on (C,) vectors
(:func:`_statistics_pipeline`, :func:`_coefficients_pipeline`) writes one block of
per-channel rows that the next sweep reads as its parameters as it is:

- forward (``batch_norm``): moments sweep and statistics → normalising sweep;
- backward (``batch_norm_backward``): gradient sums sweep and coefficients → input gradient
  sweep.

Two compiled calls each way, as before, and no NumPy arithmetic between them.

The same operations in the same order, in IEEE arithmetic (``strict_float``: no fused
multiply-add, nothing reordered; float64 merges summed block after block as NumPy's sum over
the first axis adds them): the results are those of the NumPy arithmetic bit for bit
(``tests/test_native_bn.py`` compares them). Used in training, without synchronised
statistics, where :func:`~anycnn.kernels.native_norm.applies` (else the caller's path runs).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from . import kernel_cache, native, native_norm
from .dispatch import DECLINE, implements
from .native_norm import PARAMS, _elementwise_pipeline, applies

#: whether the dispatch kernels below take BatchNorm's passes (tests of the paths they replace
#: switch them off)
ENABLED = True

#: rows of the per-channel block (K, C) the statistics and coefficients kernels write: the
#: next sweep's :data:`~anycnn.kernels.native_norm.PARAMS` parameter rows, then two more
#: (forward: the new running mean and variance; backward: dbeta and dgamma)
ROWS = PARAMS + 2

#: the forward block's rows: normalising parameters (mean, inv_std, gamma, beta copies; the
#: unused rows repeat the mean, as ``native_norm`` pads them), then the running statistics
MEAN, INV_STD, GAMMA, BETA, RUNNING_MEAN, RUNNING_VAR = 0, 1, 2, 3, PARAMS, PARAMS + 1
#: the backward block's rows: the input gradient's parameters (mean, inv_std, k1, k2, k3, the
#: forward's gamma and beta or the mean), then the parameter gradients
K1, K2, K3, AFFINE_GAMMA, AFFINE_BETA, DBETA, DGAMMA = 2, 3, 4, 5, 6, PARAMS, PARAMS + 1


def _merged(hl, blocks, value, name: str):
    """``f[c]``: the float64 sum of ``value(c, b)`` over the ``blocks`` blocks ``b``, added to
    zero in block order (as NumPy's ``sum(axis=0)`` of a (B, C) array adds them)."""
    r = hl.RDom([hl.Range(0, blocks)], f"r{name}")
    c = hl.Var("c")
    f = hl.Func(name)
    f[c] = hl.f64(0.0)
    f[c] = hl.strict_float(f[c] + value(c, r.x))
    return f


def _schedule(hl, out, part, merged: list, lanes: int) -> None:
    """The sweep's ``part`` (its own schedule: row blocks on the threads) first, then the
    merges, then ``out``, each a vector of channels at a time."""
    part.compute_root()
    c, k = out.args()
    out.reorder(c, k).vectorize(c, lanes)
    for f in merged:
        f.compute_root().vectorize(f.args()[0], lanes)
        f.update().vectorize(f.args()[0], lanes)


def _rows(hl, out, c, k, values: list) -> None:
    """``out[c, k] = values[k]`` (the last one for every row past them)."""
    expr = values[-1]
    for i in range(len(values) - 2, -1, -1):
        expr = hl.select(k == i, values[i], expr)
    out[c, k] = expr


@kernel_cache.pipeline
def _statistics_pipeline(dtype: np.dtype, block: int):
    """The forward block (:data:`ROWS`, C) of rows ``a`` (M, C): ``native_norm``'s moments
    sweep (blocks of ``block`` rows on the threads: each block's sum ``s``, squared deviations
    ``q`` and ``centre``), then from them, the running statistics, gamma, beta and ``consts``
    (float64: 1 - momentum, momentum, eps, M / (M - 1)) what ``native_norm.moments`` and
    ``batch_norm_forward`` computed with NumPy, op for op."""
    hl = native._halide()
    t = native._scalar_type(hl, dtype)
    f64 = hl.Float(64)
    lanes = native.vector_lanes(dtype)
    part, images, _ = native_norm._moments_pipeline.__wrapped__(dtype, block)
    m = images["a"].dim(1).extent()
    blocks = (m + block - 1) // block
    running_mean, running_var, gamma, beta = (
        hl.ImageParam(t, 1, name) for name in ("running_mean", "running_var", "gamma", "beta"))
    consts = hl.ImageParam(f64, 1, "consts")

    def s(c, b):
        return hl.cast(f64, part[c, b][0])

    total = _merged(hl, blocks, s, "total")

    def term(c, b):  # q + shift * (2 (s - n centre) + n shift), shift = centre - total / m
        n = hl.cast(f64, hl.min(m - b * block, block))
        ctr = hl.cast(f64, part[c, b][2])
        shift = ctr - total[c] / hl.cast(f64, m)
        return hl.cast(f64, part[c, b][1]) + shift * (hl.f64(2.0) * (s(c, b) - n * ctr)
                                                      + n * shift)

    squares = _merged(hl, blocks, term, "squares")
    c, k = hl.Var("c"), hl.Var("k")
    count = hl.cast(t, m)
    mean = hl.cast(t, total[c]) / count
    var = hl.cast(t, squares[c]) / count
    keep, take = hl.cast(t, consts[0]), hl.cast(t, consts[1])
    inv_std = hl.cast(t, 1.0) / hl.sqrt(var + hl.cast(t, consts[2]))
    new_mean = keep * running_mean[c] + take * mean
    new_var = keep * running_var[c] + take * (var * hl.cast(t, consts[3]))
    values = [mean, inv_std, gamma[c], beta[c]] + [mean] * (PARAMS - 4) + [new_mean, new_var]
    out = hl.Func("statistics")
    _rows(hl, out, c, k, [hl.strict_float(v) for v in values])
    _schedule(hl, out, part, [total, squares], lanes)
    images.update({"running_mean": running_mean, "running_var": running_var,
                   "gamma": gamma, "beta": beta, "consts": consts})
    return out, images, {}


@kernel_cache.pipeline
def _coefficients_pipeline(dtype: np.dtype, block: int, relu: bool, remask: bool):
    """The backward block (:data:`ROWS`, C): ``native_norm``'s gradient sums sweep over rows
    ``a`` (dy) and ``h`` (the input) by ``p`` (mean, inv_std, the forward's gamma and beta)
    (``relu``, ``remask``: its ReLU's mask read from ``y`` or taken again; blocks of ``block``
    rows on the threads), then from its parts, the current ``gamma`` and ``count`` what
    ``grad_sums`` and ``batch_norm_backward`` computed with NumPy, op for op. Rows 5 and 6
    are ``p``'s gamma and beta with ``remask`` (the input gradient takes the mask again from
    them), else the mean."""
    hl = native._halide()
    t = native._scalar_type(hl, dtype)
    f64 = hl.Float(64)
    lanes = native.vector_lanes(dtype)
    part, images, _ = native_norm._sums_pipeline.__wrapped__(dtype, False, True, relu, block,
                                                             remask)
    p = images["p"]
    blocks = (images["a"].dim(1).extent() + block - 1) // block
    gamma = hl.ImageParam(t, 1, "gamma")
    count = hl.Param(hl.Int(32), "count")
    d0 = _merged(hl, blocks, lambda c, b: hl.cast(f64, part[c, b][0]), "dbeta")
    d1 = _merged(hl, blocks, lambda c, b: hl.cast(f64, part[c, b][1]), "dgamma")
    c, k = hl.Var("c"), hl.Var("k")
    dbeta, dgamma = hl.cast(t, d0[c]), hl.cast(t, d1[c])
    mean, inv_std = p[c, 0], p[c, 1]
    scale = gamma[c] * inv_std
    n = hl.cast(t, count)
    tail = [p[c, 2], p[c, 3]] if remask else [mean, mean]
    values = [mean, inv_std, scale, scale * dbeta / n, scale * dgamma / n, *tail,
              dbeta, dgamma]
    out = hl.Func("coefficients")
    _rows(hl, out, c, k, [hl.strict_float(v) for v in values])
    _schedule(hl, out, part, [d0, d1], lanes)
    images["gamma"] = gamma
    return out, images, {"count": count}


@functools.lru_cache(maxsize=64)
def _consts(momentum: float, eps: float, m: int) -> np.ndarray:
    """``[1 - momentum, momentum, eps, m / (m - 1)]`` (float64), as the NumPy path computes
    them in Python floats: the statistics kernel's constants, kept per (momentum, eps, rows)
    and never written (left writeable: a Halide ``Buffer``, the in-memory kernels' operand,
    refuses read-only arrays)."""
    return np.array([1.0 - momentum, momentum, eps, m / max(m - 1, 1)], dtype=np.float64)


def _vectors(dtype: np.dtype, c: int, *arrays: Any) -> bool:
    """Whether every one of ``arrays`` is a NumPy vector (C,) of ``dtype``."""
    for a in arrays:
        if not (isinstance(a, np.ndarray) and a.dtype == dtype and a.shape == (c,)):
            return False
    return True


def forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, running_mean: np.ndarray,
            running_var: np.ndarray, momentum: float, eps: float, relu: bool,
            addend: np.ndarray | None) -> tuple:
    """BatchNorm's training forward on ``x`` (any shape whose last axis is C): ``(y, mean,
    inv_std, new running mean, new running variance, (gamma, beta) copies)``, ``y`` shaped as
    ``x`` (plus ``addend``, then ``max(., 0)`` with ``relu``); the vectors are rows of one
    block (:data:`ROWS`, C)."""
    dtype, c = x.dtype, x.shape[-1]
    rows = native.operand(x.reshape(-1, c))
    m, size, sweep = rows.shape[0], native_norm.MOMENT_ROWS, native_norm.BLOCK_ROWS
    block = np.empty((ROWS, c), dtype=dtype)
    _statistics_pipeline(dtype, size).run(
        {"a": rows, "running_mean": native.operand(running_mean),
         "running_var": native.operand(running_var), "gamma": native.operand(gamma),
         "beta": native.operand(beta), "consts": _consts(momentum, eps, m)}, {}, [block])
    arrays = {"a": rows, "p": block[:PARAMS]}
    if addend is not None:
        arrays["h"] = native.operand(addend.reshape(rows.shape))
    y = np.empty_like(rows)
    pipeline = _elementwise_pipeline(dtype, "normalize", relu, sweep, addend is not None)
    pipeline.run({name: arrays[name] for name in pipeline.images}, {}, [y])
    return (y.reshape(x.shape), block[MEAN], block[INV_STD], block[RUNNING_MEAN],
            block[RUNNING_VAR], (block[GAMMA], block[BETA]))


def backward(dy: np.ndarray, out: np.ndarray | None, x: np.ndarray, mean: np.ndarray,
             inv_std: np.ndarray, gamma: np.ndarray, count: int,
             affine: tuple | None) -> tuple:
    """BatchNorm's training backward: ``(dx, dgamma, dbeta)`` for ``dy`` (any shape whose last
    axis is C), the input rows ``x``, the ``mean`` and ``inv_std`` the forward normalised with
    over ``count`` rows and, for a fused ReLU, its output ``out`` or (``affine``) the forward's
    (gamma, beta), from which its mask is taken again."""
    dtype, c = dy.dtype, dy.shape[-1]
    rows = native.operand(dy.reshape(-1, c))
    h = native.operand(x.reshape(rows.shape))
    size = native_norm.BLOCK_ROWS
    arrays = {"a": rows, "h": h, "gamma": native.operand(gamma)}
    relu = out is not None or affine is not None
    if out is not None and affine is None:
        arrays["y"] = native.operand(out.reshape(rows.shape))
    tail = affine if affine is not None else (mean, mean)
    arrays["p"] = np.array([mean, inv_std, *tail], dtype=dtype)
    block = np.empty((ROWS, c), dtype=dtype)
    pipeline = _coefficients_pipeline(dtype, size, relu, affine is not None)
    pipeline.run({name: arrays[name] for name in pipeline.images}, {"count": count}, [block])
    arrays["p"] = block[:PARAMS]
    dx = np.empty_like(rows)
    pipeline = (_elementwise_pipeline(dtype, "input_grad", True, size, False, True)
                if affine is not None
                else _elementwise_pipeline(dtype, "input_grad", relu, size, False))
    pipeline.run({name: arrays[name] for name in pipeline.images}, {}, [dx])
    return dx.reshape(dy.shape), block[DGAMMA], block[DBETA]


# --------------------------------------------------------------------------------------------
# Dispatch kernels: anycnn.nn.functional.norm's whole BatchNorm passes


@implements("batch_norm")
def batch_norm(x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any,
               training: bool, momentum: float, eps: float, relu: bool = False,
               addend: Any = None) -> Any:
    """Kernel of :func:`anycnn.nn.functional.norm.batch_norm_forward` (no synchronised
    statistics) in training, where the compiled BatchNorm passes apply to the rows of NumPy
    ``x`` and every vector is a NumPy (C,) of ``x``'s dtype: :func:`forward`. Declines eval
    mode (the caller's path), a ``momentum`` of None and row counts past int32."""
    if not (ENABLED and training and isinstance(x, np.ndarray) and x.ndim >= 2
            and momentum is not None):
        return DECLINE
    c = x.shape[-1]
    if not (_vectors(x.dtype, c, gamma, beta, running_mean, running_var)
            and applies(x.reshape(-1, c)) and x.size // c < 2**31):
        return DECLINE
    if addend is not None and not (isinstance(addend, np.ndarray) and addend.dtype == x.dtype
                                   and addend.size == x.size):
        return DECLINE
    return forward(x, gamma, beta, running_mean, running_var, float(momentum), float(eps),
                   relu, addend)


@implements("batch_norm_backward")
def batch_norm_backward(dy: Any, out: Any, x: Any, mean: Any, inv_std: Any, gamma: Any,
                        training: bool, affine: Any = None) -> Any:
    """Kernel of :func:`anycnn.nn.functional.norm.batch_norm_backward` (no synchronised
    statistics) after a training forward that kept the input rows ``x`` and the ``mean``,
    where the compiled passes apply: :func:`backward` over all of ``dy``'s rows."""
    if not (ENABLED and training and isinstance(dy, np.ndarray) and dy.ndim >= 2):
        return DECLINE
    c = dy.shape[-1]
    if not (_vectors(dy.dtype, c, mean, inv_std, gamma) and applies(dy.reshape(-1, c))
            and isinstance(x, np.ndarray) and x.dtype == dy.dtype and x.size == dy.size
            and dy.size // c < 2**31):
        return DECLINE
    if out is not None and not (isinstance(out, np.ndarray) and out.dtype == dy.dtype
                                and out.size == dy.size):
        return DECLINE
    if affine is not None and not _vectors(dy.dtype, c, *affine):
        return DECLINE
    return backward(dy, out, x, mean, inv_std, gamma, dy.size // c, affine)
