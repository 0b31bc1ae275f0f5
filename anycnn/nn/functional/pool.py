"""Pooling of NHWC images (max, average, global and adaptive average), forward and backward.

Max pooling gathers the windows into ``K`` contiguous planes ``(N, K, P, C)`` and reduces over
them; its backward multiplies the first-maximum masks in and scatters back (col2im as a
gather). Ties go to the first maximum in row-major window order, as in PyTorch.

Max and average pooling are offered to the kernels first (:mod:`anycnn.kernels.dispatch`,
``max_pool2d`` and ``avg_pool2d``): a kernel that computes the forward returns what its own
backward (``max_pool2d_backward``, ``avg_pool2d_backward``) needs, kept in the context's
``saved``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import device

from ...backend import namespace_of
from ...kernels.dispatch import DECLINE, attempt
from ..geometry import Pair, device_cache, pool_output_size
from .primitives import masked, window_max
from .windows import Windows, gather_windows, scatter_windows


def pool_windows(in_hw: Pair, kernel: Pair, stride: Pair, padding: Pair,
                 ceil_mode: bool) -> Windows:
    """The :class:`Windows` of a pooling layer (entries ordered kernel-major).

    The bottom/right padding is extended so that ceil-mode windows fit.
    """
    out = tuple(pool_output_size(in_hw[i], kernel[i], stride[i], padding[i], ceil_mode)
                for i in range(2))
    extra = [max(padding[i], (out[i] - 1) * stride[i] + kernel[i] - in_hw[i] - padding[i])
             for i in range(2)]
    pads = (padding[0], extra[0], padding[1], extra[1])
    return Windows(in_hw, kernel, stride, (1, 1), pads, out, kernel_first=True)


@dataclass
class MaxPoolCtx:
    mask: Any  # bool (N, K, P, C): the first maximum of each window (None: see ``saved``)
    win: Windows
    saved: Any = None  # what the kernel that computed the forward keeps for its backward


def _kernel_backward(name: str, dy: Any, saved: Any, win: Windows) -> Any:
    """The input gradient from the kernel that kept ``saved`` in the forward."""
    dx = attempt(name, dy, saved, win)
    if dx is DECLINE:
        raise RuntimeError(f"no kernel takes the {type(saved).__name__} its forward kept "
                           f"({name})")
    return dx


def max_pool2d_forward(x: Any, win: Windows):
    """Max pooling of NHWC ``x`` over ``win`` (padding is -inf); ``(y, ctx)``.

    Ties go to the first maximum in row-major window order, as in PyTorch. The windows are
    gathered into K contiguous planes (faster than strided slices, measured), so the maximum
    and the masks are plane-wise operations. A kernel (``max_pool2d``) is offered the call
    first.
    """
    got = attempt("max_pool2d", x, win)
    if got is not DECLINE:
        y, saved = got
        return y, MaxPoolCtx(None, win, saved)
    xp = namespace_of(x)
    n, _, _, c = x.shape
    entries = xp.reshape(gather_windows(x, win, value=-float("inf")),
                         (n, win.taps, win.positions, c))
    y, mask = window_max(entries)
    return xp.reshape(y, (n, *win.out, c)), MaxPoolCtx(mask, win)


def max_pool2d_backward(dy: Any, ctx: MaxPoolCtx):
    """Input gradient of :func:`max_pool2d_forward`."""
    if ctx.saved is not None:
        return _kernel_backward("max_pool2d_backward", dy, ctx.saved, ctx.win)
    xp = namespace_of(dy)
    n, _, _, c = dy.shape
    d = masked(ctx.mask, xp.reshape(dy, (n, 1, ctx.win.positions, c)))
    return scatter_windows(xp.reshape(d, (n, -1, c)), ctx.win)


def _window_counts(win: Windows, include_pad: bool):
    """float64 (P,) number of elements each average-pooling window divides by (PyTorch rule)."""
    counts = []
    for axis in range(2):
        size, k, s = win.in_hw[axis], win.kernel[axis], win.stride[axis]
        pad = win.pads[2 * axis]
        start = np.arange(win.out[axis]) * s - pad
        end = np.minimum(start + k, size + pad)
        if not include_pad:
            start, end = np.maximum(start, 0), np.minimum(end, size)
        counts.append(end - start)
    return (counts[0][:, None] * counts[1][None, :]).reshape(-1).astype(np.float64)


@dataclass
class AvgPoolCtx:
    inv_count: Any  # (1, 1, P, 1) reciprocal window sizes (None: see ``saved``)
    win: Windows
    saved: Any = None  # what the kernel that computed the forward keeps for its backward


def avg_pool2d_forward(x: Any, win: Windows, count_include_pad: bool = True):
    """Average pooling of NHWC ``x`` over ``win`` (zero padding); ``(y, ctx)``. A kernel
    (``avg_pool2d``) is offered the call first."""
    got = attempt("avg_pool2d", x, win, count_include_pad)
    if got is not DECLINE:
        y, saved = got
        return y, AvgPoolCtx(None, win, saved)
    xp = namespace_of(x)
    n, _, _, c = x.shape
    inv = device_cache.get(xp, device(x), ("avg", win, count_include_pad),
                           lambda: 1.0 / _window_counts(win, count_include_pad))
    inv = xp.reshape(xp.astype(inv, x.dtype), (1, 1, win.positions, 1))
    entries = xp.reshape(gather_windows(x, win), (n, win.taps, win.positions, c))
    y = xp.sum(entries, axis=1, keepdims=True) * inv
    return xp.reshape(y, (n, *win.out, c)), AvgPoolCtx(inv, win)


def avg_pool2d_backward(dy: Any, ctx: AvgPoolCtx):
    """Input gradient of :func:`avg_pool2d_forward`."""
    if ctx.saved is not None:
        return _kernel_backward("avg_pool2d_backward", dy, ctx.saved, ctx.win)
    xp = namespace_of(dy)
    n, _, _, c = dy.shape
    share = xp.reshape(dy, (n, 1, ctx.win.positions, c)) * ctx.inv_count
    d = xp.broadcast_to(share, (n, ctx.win.taps, ctx.win.positions, c))
    return scatter_windows(xp.reshape(d, (n, -1, c)), ctx.win)


def global_avg_pool_forward(x: Any):
    """Mean over H and W: ``(N, H, W, C)`` → ``(N, C)``, each image's sum over its pixels as
    one GEMV (``ones (1, H*W) @ x (H*W, C)``, as :func:`~.primitives.column_sums`): on NumPy
    4x faster than ``mean`` over two axes (resnet20's 128 x 8 x 8 x 64: 0.044 against 0.19 ms,
    measured), the same values up to the order of the sums."""
    xp = namespace_of(x)
    n, h, w, c = x.shape
    ones = xp.ones((1, h * w), dtype=x.dtype, device=device(x))
    sums = xp.matmul(ones, xp.reshape(x, (n, h * w, c)))
    return xp.reshape(sums, (n, c)) / (h * w), x.shape


def global_avg_pool_backward(dy: Any, in_shape):
    """Input gradient of :func:`global_avg_pool_forward`."""
    xp = namespace_of(dy)
    n, h, w, c = in_shape
    share = xp.reshape(dy, (n, 1, 1, c)) * (1.0 / (h * w))
    return share * xp.ones(in_shape, dtype=dy.dtype, device=device(dy))


@functools.cache
def adaptive_pool_matrix(size: int, out: int) -> np.ndarray:
    """``(out, size)`` float64 averaging weights of adaptive pooling along one axis: row ``i``
    is ``1/len`` on input rows ``floor(i*size/out)`` to ``ceil((i+1)*size/out) - 1``."""
    matrix = np.zeros((out, size))
    for i in range(out):
        start, stop = (i * size) // out, -((-(i + 1) * size) // out)
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


def adaptive_avg_pool_forward(x: Any, output_size: tuple[int, int]):
    """Adaptive average pooling of NHWC ``x`` to ``output_size``: ``(N, H, W, C)`` →
    ``(N, oh, ow, C)``, as two small matrix products (rows, then columns); ctx is the input
    shape and the two ``(out, in)`` matrices (None for the global average)."""
    xp = namespace_of(x)
    n, h, w, c = (int(s) for s in x.shape)
    oh, ow = output_size
    if (oh, ow) == (1, 1):
        return xp.mean(x, axis=(1, 2), keepdims=True), (tuple(x.shape), None, None)
    rows = xp.asarray(adaptive_pool_matrix(h, oh), dtype=x.dtype, device=device(x))
    cols = xp.asarray(adaptive_pool_matrix(w, ow), dtype=x.dtype, device=device(x))
    t = xp.matmul(rows, xp.reshape(x, (n, h, w * c)))
    y = xp.matmul(cols, xp.reshape(t, (n * oh, w, c)))
    return xp.reshape(y, (n, oh, ow, c)), (tuple(x.shape), rows, cols)


def adaptive_avg_pool_backward(dy: Any, ctx):
    """Input gradient of :func:`adaptive_avg_pool_forward` (the transposed products)."""
    shape, rows, cols = ctx
    xp = namespace_of(dy)
    n, _, w, c = shape
    if rows is None:
        return global_avg_pool_backward(xp.reshape(dy, (n, c)), shape)
    oh, ow = dy.shape[1], dy.shape[2]
    t = xp.matmul(xp.matrix_transpose(cols), xp.reshape(dy, (n * oh, ow, c)))
    dx = xp.matmul(xp.matrix_transpose(rows), xp.reshape(t, (n, oh, w * c)))
    return xp.reshape(dx, shape)
