"""The NumPy kernels (the array-api-extra way): each registers with :mod:`anycnn.kernels.dispatch`
for the portable op of the same name in :mod:`anycnn.nn.functional` and returns the same values
(up to rounding), or declines for arrays that are not NumPy's or when ``ANYCNN_FASTPATH=0``.

- the elementwise kernels use NumPy calls written with ``out=`` (no cast passes, no stacks);
  outside a batch-parallel region (:func:`anycnn.kernels.threads.map_batch`), large calls are
  split along the batch axis over the library's threads, because NumPy runs ``take`` and
  reductions on one core while releasing the GIL;
- GEMMs run with the BLAS on one thread per caller (:func:`~anycnn.kernels.threads.
  one_blas_thread`), large ones split into shards over the threads;
- BatchNorm's per-channel passes run in cache-sized chunks, several operations per pass.

Tests check each kernel against the portable expression (``op.portable``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..backend import require_in_place
from .dispatch import DECLINE, implements
from .threads import (
    _parallel,
    _region,
    _run_shards,
    _split,
    num_threads,
    one_blas_thread,
    takes,
)

#: a GEMM with fewer multiply-adds than this runs unsplit (waking a sleeping helper thread
#: costs 20-90 us on the project machine; 2**23 multiply-adds take about 100 us on one core)
MIN_PARALLEL_MACS = 1 << 23

#: a GEMM with fewer multiply-adds than this runs as it is, the BLAS's threads left alone: BLAS
#: libraries compute products this small on the calling thread (OpenBLAS below 2**18), so
#: limiting them would only cost threadpoolctl's search of the loaded libraries at the first
#: call (4-5 ms of a new process's first step, measured; resnet20's only GEMM is its Dense)
SMALL_GEMM_MACS = 1 << 16


@implements("matmul")
def matmul(a: Any, b: Any) -> Any:
    """Kernel of :func:`~anycnn.nn.functional.primitives.matmul` (``a @ b``, 2-D).

    NumPy: the BLAS runs on one thread per caller (a product under :data:`SMALL_GEMM_MACS`
    multiply-adds is passed to the BLAS as it is: it runs one that small on the calling thread);
    a large product is split into row shards of ``a`` (column shards of ``b`` when N > M)
    computed on the library's threads. Every output element is one BLAS dot product of length
    K either way; which kernel the BLAS picks for a shard's shape may change its last bits, so
    results depend on the thread count (and are repeatable for a given one).
    """
    if not takes(a, b):
        return DECLINE
    m, n = a.shape[0], b.shape[1]
    if m * n * a.shape[1] < SMALL_GEMM_MACS:
        return a @ b
    threads = 0 if getattr(_region, "active", False) else min(num_threads(), max(m, n))
    with one_blas_thread():
        if threads < 2 or m * n * a.shape[1] < MIN_PARALLEL_MACS:
            return a @ b
        out = np.empty((m, n), dtype=np.result_type(a.dtype, b.dtype))
        if m >= n:
            _run_shards(threads, m, lambda i, j: np.matmul(a[i:j], b, out=out[i:j]))
        else:
            _run_shards(threads, n, lambda i, j: np.matmul(a, b[:, i:j], out=out[:, i:j]))
    return out


# --------------------------------------------------------------------------------------------
# Elementwise and gather kernels


@implements("pad_hw")
def pad_hw(x: Any, pads: tuple[int, int, int, int], value: float) -> Any:
    """Kernel of :func:`~anycnn.nn.functional.primitives.pad_hw`: only the border is filled,
    without ``np.pad``'s ~70 us of overhead."""
    if not takes(x):
        return DECLINE
    top, bottom, left, right = pads
    n, h, w, c = x.shape
    out = np.empty((n, h + top + bottom, w + left + right, c), dtype=x.dtype)
    out[:, :top] = value
    out[:, top + h:] = value
    out[:, top:top + h, :left] = value
    out[:, top:top + h, left + w:] = value
    out[:, top:top + h, left:left + w] = x
    return out


def update_rows(xp: Any, update: Callable[..., None], *arrays: Any) -> None:
    """Run ``update(*arrays)``, an in-place update of same-shaped arrays that treats every
    element alike (an optimizer step), on row shards of them in parallel when they are large
    (NumPy), else once on the whole arrays.

    Raises:
        BackendError: ``xp``'s arrays are immutable (JAX, dask): the update would do nothing.
    """
    require_in_place(xp, "fastpath.update_rows")
    shape = arrays[0].shape
    threads = _parallel(xp, math.prod(shape), shape[0] if shape else 1)
    if not threads:
        update(*arrays)
        return
    rows = [xp.reshape(a, (shape[0], -1)) for a in arrays]
    _run_shards(threads, shape[0], lambda a, b: update(*(r[a:b] for r in rows)))


@implements("take_rows")
def take_rows(x: Any, index: Any) -> Any:
    """Kernel of :func:`~anycnn.nn.functional.primitives.take_rows` (``take(x, index, axis=1)``
    for ``x`` (N, R, C)): batch shards over the threads."""
    if not takes(x, index):
        return DECLINE
    out = np.empty((x.shape[0], index.shape[0], x.shape[2]), dtype=x.dtype)
    # mode="clip": with mode="raise" (the default) NumPy buffers `out`, 3-4x slower; the
    # indices are built in range by construction
    return _split(np, out, lambda a, b: np.take(x[a:b], index, 1, out[a:b], "clip"))


@implements("sum_axis1")
def sum_axis1(x: Any) -> Any:
    """Kernel of :func:`~anycnn.nn.functional.primitives.sum_axis1` (sum over axis 1)."""
    if not takes(x):
        return DECLINE
    out = np.empty((x.shape[0], *x.shape[2:]), dtype=x.dtype)
    return _split(np, out, lambda a, b: np.sum(x[a:b], 1, None, out[a:b]))


@implements("masked")
def masked(mask: Any, x: Any) -> Any:
    """Kernel of :func:`~anycnn.nn.functional.primitives.masked` (``mask * x``)."""
    if not takes(mask, x):
        return DECLINE
    out = np.empty(tuple(max(a, b) for a, b in zip(mask.shape, x.shape)), dtype=x.dtype)
    # bool * float multiplies without a cast pass
    return _split(np, out, lambda a, b: np.multiply(mask[a:b], x[a:b], out=out[a:b]))


@implements("bias_relu")
def bias_relu(x: Any, bias: Any) -> Any:
    """Kernel of :func:`~anycnn.nn.functional.primitives.bias_relu` (``max(x + bias, 0)``)."""
    if not takes(x, bias):
        return DECLINE
    out = np.empty(x.shape, dtype=x.dtype)

    def kernel(a: int, b: int) -> None:
        if bias is None:
            np.maximum(x[a:b], 0.0, out=out[a:b])
        else:
            np.add(x[a:b], bias, out=out[a:b])
            np.maximum(out[a:b], 0.0, out=out[a:b])

    return _split(np, out, kernel)


@implements("add_relu")
def add_relu(x: Any, y: Any, relu: bool = True) -> Any:
    """Kernel of :func:`~anycnn.nn.functional.primitives.add_relu` for same-shaped ``x`` and
    ``y``: one new array, the ReLU applied in place while its rows are in cache, large sums
    split over the threads."""
    if not takes(x, y) or x.shape != y.shape:
        return DECLINE
    out = np.empty(x.shape, dtype=np.result_type(x.dtype, y.dtype))
    rows = out.reshape(out.shape[0], -1) if out.ndim else out.reshape(1, 1)
    xr, yr = x.reshape(rows.shape), y.reshape(rows.shape)
    step = max(1, CHANNEL_CHUNK // max(rows.shape[1], 1))

    def kernel(a: int, b: int) -> None:
        for i in range(a, b, step):
            o = rows[i:min(i + step, b)]
            np.add(xr[i:i + o.shape[0]], yr[i:i + o.shape[0]], out=o)
            if relu:
                np.maximum(o, 0.0, out=o)

    _split(np, rows, kernel)
    return out


@implements("relu_grad")
def relu_grad(y: Any, dy: Any) -> Any:
    """Kernel of :func:`~anycnn.nn.functional.primitives.relu_grad`."""
    if not takes(y, dy):
        return DECLINE
    out = np.empty(dy.shape, dtype=dy.dtype)
    return _split(np, out, lambda a, b: np.multiply(np.greater(y[a:b], 0), dy[a:b],
                                                    out=out[a:b]))


@implements("window_max")
def window_max(entries: Any) -> tuple[Any, Any]:
    """Kernel of :func:`~anycnn.nn.functional.primitives.window_max` (window maxima and the
    first-maximum masks, PyTorch's tie rule)."""
    if not takes(entries):
        return DECLINE
    n, k = entries.shape[0], entries.shape[1]
    y = np.empty((n, *entries.shape[2:]), dtype=entries.dtype)
    mask = np.empty(entries.shape, dtype=bool)

    def kernel(a: int, b: int) -> None:
        e, top, m = entries[a:b], y[a:b], mask[a:b]
        if k == 1:
            np.copyto(top, e[:, 0])
        else:  # a chain of pairwise maxima is faster than np.max over axis 1 (measured)
            np.maximum(e[:, 0], e[:, 1], out=top)
            for j in range(2, k):
                np.maximum(top, e[:, j], out=top)
        np.equal(e[:, 0], top, out=m[:, 0])
        taken = m[:, 0].copy() if k > 2 else m[:, 0]
        for j in range(1, k):
            np.equal(e[:, j], top, out=m[:, j])
            np.greater(m[:, j], taken, out=m[:, j])  # bools: a > b is a & ~b
            if j < k - 1:
                np.logical_or(taken, m[:, j], out=taken)

    _split(np, mask, kernel)
    return y, mask


# --------------------------------------------------------------------------------------------
# Per-channel passes (BatchNorm): rows (M, C) of channels-last data, in cache-sized chunks

#: elements of one chunk of a per-channel pass: the chunk and its temporaries stay in the L1/L2
#: caches, so a pass of several operations reads and writes main memory once
CHANNEL_CHUNK = 1 << 15


def _channel_rows(c: int) -> int:
    """Rows per chunk of a per-channel pass over (M, c) rows."""
    return max(1, CHANNEL_CHUNK // c)


@functools.lru_cache(maxsize=64)
def _ones_row(rows: int, dtype: str) -> np.ndarray:
    out = np.ones((1, rows), dtype=dtype)
    out.flags.writeable = False
    return out


def _tile(v: Any, rows: int) -> np.ndarray:
    """Per-channel ``v`` (C,) repeated for ``rows`` rows, flat: the operand of a flat chunk (a
    plain 1-D loop is faster than broadcasting over rows of a few channels, measured)."""
    return np.tile(np.asarray(v), rows)


def _over_row_chunks(rows: Any, chunk: Callable[[int, int], Any]) -> Any:
    """Run ``chunk(a, b)`` over cache-sized row ranges of ``rows`` (M, C), the ranges shared out
    between the threads in contiguous shards; the float64 sum of the results (or None).

    Chunks start at a shard's first row; the sums depend on the thread count (grouping),
    and are repeatable for a given one."""
    m, c = rows.shape
    r = _channel_rows(c)

    def shard(a0: int, b0: int) -> Any:
        total = None
        for a in range(a0, b0, r):
            part = chunk(a, min(a + r, b0))
            if part is not None:
                total = part.astype(np.float64) if total is None else total + part
        return total

    threads = _parallel(np, m * c, m)
    parts = _run_shards(threads, m, shard) if threads else [shard(0, m)]
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


@implements("channel_sums")
def channel_sums(rows: Any) -> Any:
    """Kernel of :func:`~anycnn.nn.functional.norm.channel_sums`: GEMVs ``ones @ chunk``
    summed in float64, ~7x faster than ``sum(axis=0)`` over 16 channels (measured)."""
    if not takes(rows):
        return DECLINE
    dtype = rows.dtype
    ones = _ones_row(_channel_rows(rows.shape[1]), dtype.name)
    total = _over_row_chunks(rows, lambda a, b: ones[:, :b - a] @ rows[a:b])
    if total is None:  # no rows
        return np.zeros(rows.shape[1], dtype=dtype)
    return total.reshape(-1).astype(dtype)


@implements("centre_rows")
def centre_rows(rows: Any, mean: Any) -> tuple[Any, Any]:
    """Kernel of :func:`~anycnn.nn.functional.norm.centre_rows`: one pass in chunks."""
    if not takes(rows, mean):
        return DECLINE
    c = rows.shape[1]
    r = _channel_rows(c)
    dtype = rows.dtype
    ones = _ones_row(r, dtype.name)
    mean_t = _tile(mean, r)
    flat_in = rows.reshape(-1)
    centred = np.empty_like(rows)
    flat_out = centred.reshape(-1)

    def chunk(a: int, b: int) -> Any:
        k = (b - a) * c
        out = flat_out[a * c:a * c + k]
        np.subtract(flat_in[a * c:a * c + k], mean_t[:k], out=out)
        sq = np.multiply(out, out)
        return ones[:, :b - a] @ sq.reshape(b - a, c)

    total = _over_row_chunks(rows, chunk)
    if total is None:  # no rows
        return centred, np.zeros(c, dtype=dtype)
    return centred, total.reshape(-1).astype(dtype)


@implements("normalize_rows")
def normalize_rows(centred: Any, inv_std: Any, gamma: Any, beta: Any,
                   relu: bool) -> tuple[Any, Any]:
    """Kernel of :func:`~anycnn.nn.functional.norm.normalize_rows`: ``xhat`` is written over
    ``centred`` (which must be owned), one pass in chunks."""
    if not takes(centred, inv_std, gamma, beta):
        return DECLINE
    c = centred.shape[1]
    r = _channel_rows(c)
    inv_t, gamma_t, beta_t = _tile(inv_std, r), _tile(gamma, r), _tile(beta, r)
    y = np.empty_like(centred)
    flat_x, flat_y = centred.reshape(-1), y.reshape(-1)

    def chunk(a: int, b: int) -> None:
        k = (b - a) * c
        xh, out = flat_x[a * c:a * c + k], flat_y[a * c:a * c + k]
        np.multiply(xh, inv_t[:k], out=xh)
        np.multiply(xh, gamma_t[:k], out=out)
        np.add(out, beta_t[:k], out=out)
        if relu:
            np.maximum(out, 0.0, out=out)

    _over_row_chunks(centred, chunk)
    return centred, y


@implements("norm_grad_sums")
def norm_grad_sums(dy: Any, xhat: Any, out: Any = None) -> tuple[Any, Any, Any]:
    """Kernel of :func:`~anycnn.nn.functional.norm.norm_grad_sums`: one pass in chunks (``g``
    is a new array when ``out`` is given, else ``dy`` itself)."""
    if not takes(dy, xhat, out):
        return DECLINE
    c = dy.shape[1]
    r = _channel_rows(c)
    dtype = dy.dtype
    ones = _ones_row(r, dtype.name)
    g = dy if out is None else np.empty_like(dy)

    def chunk(a: int, b: int) -> Any:
        if out is not None:
            np.multiply(np.greater(out[a:b], 0), dy[a:b], out=g[a:b])
        gc = g[a:b]
        sums = np.empty((2, c), dtype=np.float64)
        sums[0] = ones[:, :b - a] @ gc
        sums[1] = ones[:, :b - a] @ np.multiply(gc, xhat[a:b])
        return sums

    total = _over_row_chunks(dy, chunk)
    total = np.zeros((2, c), dtype=dtype) if total is None else total.astype(dtype)
    return g, total[0], total[1]


@implements("norm_input_grad")
def norm_input_grad(g: Any, xhat: Any, scale: Any, dsum: Any, gsum: Any, count: int,
                    owned: bool = False) -> Any:
    """Kernel of :func:`~anycnn.nn.functional.norm.norm_input_grad`: one pass in chunks as
    ``g * scale - (xhat * (scale * gsum / count) + scale * dsum / count)`` (the same up to
    rounding), written over ``g`` when ``owned``."""
    if not takes(g, xhat, scale, dsum, gsum):
        return DECLINE
    c = g.shape[1]
    r = _channel_rows(c)
    k1 = _tile(scale, r)
    k2 = _tile(scale * dsum / count, r)
    k3 = _tile(scale * gsum / count, r)
    dx = g if owned else np.empty_like(g)
    flat_g, flat_x, flat_d = g.reshape(-1), xhat.reshape(-1), dx.reshape(-1)

    def chunk(a: int, b: int) -> None:
        k = (b - a) * c
        s = slice(a * c, a * c + k)
        t = np.multiply(flat_x[s], k3[:k])
        np.add(t, k2[:k], out=t)
        np.multiply(flat_g[s], k1[:k], out=flat_d[s])
        np.subtract(flat_d[s], t, out=flat_d[s])

    _over_row_chunks(g, chunk)
    return dx


# --------------------------------------------------------------------------------------------
# Formulations measured faster on NumPy (dispatch.prefers)


@implements("input_grad_by_convolution")
def _input_grad_by_convolution(d: Any, weight: Any) -> Any:
    """A stride-1 input gradient as the convolution of the output gradient (one gather of
    ``dy``, kh*kw*C_out entries per input pixel, and one GEMM of inner size kh*kw*C_out)
    instead of the column gradient (kh*kw*C_in entries per input pixel), its col2im gather and
    the sum over the taps: fewer passes and a better shaped GEMM on NumPy where C_out <= C_in
    (measured: resnet20 step ~20% faster). Where C_out > C_in (a first layer, a widening
    layer) the column gradient is the smaller one: measured at batch 64, 28x28, 3x3, whole
    batch: 1 -> 32 channels 14.5 ms against 1.8, 3 -> 16 7.3 against 2.5, 16 -> 32 17.7
    against 10.9; 16 -> 16 7.3 against 9.4, 32 -> 16 8.5 against 33."""
    return (takes(d, weight) and weight.shape[3] <= weight.shape[2]) or DECLINE


@implements("shifted_weight_grad")
def _shifted_weight_grad(d: Any, x: Any) -> Any:
    """A 'same' stride-1 weight gradient of few channels by shifted GEMMs over the padded grids
    (no im2col columns): measured faster on NumPy up to ``SHIFTED_MAX_CHANNELS``."""
    return takes(d, x) or DECLINE
