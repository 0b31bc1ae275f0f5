"""Pure array operations and their backward passes, written once against the Array API.

Every ``*_forward`` returns ``(output, ctx)``; the matching ``*_backward(dy, ctx, ...)`` returns the
gradients. ``ctx`` holds only what the backward pass needs. The namespace ``xp`` is always taken
from the input arrays, so each operation runs wherever its data lives.

Layouts: images are NHWC ``(N, H, W, C)``; convolution weights are ``(kh, kw, C_in, C_out)``;
dense weights are ``(in, out)``. Scalars are Python floats so float32 stays float32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import array_api_extra as xpx
import numpy as np
from array_api_compat import device

from .. import fastpath, native, native_norm
from ..backend import namespace_of, to_numpy
from .geometry import (
    Pair,
    adjoint_index,
    adjoint_kernel,
    conv_output_size,
    device_cache,
    pool_output_size,
    window_index,
)

# --------------------------------------------------------------------------------------------
# Windows: im2col as one gather, col2im as its adjoint gather


@dataclass(frozen=True)
class Windows:
    """Geometry of sliding windows over one padded NHWC image size.

    ``pads`` is (top, bottom, left, right); ``padded`` is (Hp, Wp); ``out`` is (Ho, Wo).
    ``kernel_first`` orders the gathered entries (k, p) instead of (p, k).
    ``pool_order`` (pool kernel, pool stride), for disjoint pooling windows over the output,
    keeps only the output positions inside a pooling window and orders them (pool tap, pooled
    position): a convolution computed in that order hands its output to the max pool as window
    planes with no gather, and takes the pooled gradient back with no scatter.
    """

    in_hw: Pair
    kernel: Pair
    stride: Pair
    dilation: Pair
    pads: tuple[int, int, int, int]
    out: Pair
    kernel_first: bool
    pool_order: tuple[Pair, Pair] | None = None

    def __hash__(self) -> int:  # hashed on every cache lookup: compute it once
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.in_hw, self.kernel, self.stride, self.dilation, self.pads,
                           self.out, self.kernel_first, self.pool_order))
            object.__setattr__(self, "_hash", cached)
        return cached

    @property
    def padded(self) -> Pair:
        return (self.in_hw[0] + self.pads[0] + self.pads[1],
                self.in_hw[1] + self.pads[2] + self.pads[3])

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def pooled_out(self) -> Pair:
        """(Hq, Wq): pooled output size under ``pool_order``."""
        (kh, kw), (sh, sw) = self.pool_order
        return ((self.out[0] - kh) // sh + 1, (self.out[1] - kw) // sw + 1)

    @property
    def positions(self) -> int:
        if self.pool_order is None:
            return self.out[0] * self.out[1]
        (kh, kw), _ = self.pool_order
        return kh * kw * self.pooled_out[0] * self.pooled_out[1]

    def _host_index(self):
        idx = window_index(*self.padded, self.kernel, self.stride, self.dilation, self.out)
        if self.pool_order is not None:  # rows = output positions in (pool tap, pooled) order
            pool = window_index(*self.out, *self.pool_order, (1, 1), self.pooled_out)
            idx = idx[pool.T.reshape(-1)]
        return (idx.T if self.kernel_first else idx).reshape(-1)

    def index(self, xp: Any, device: Any) -> Any:
        """Forward gather index (L,) into the flattened padded image rows, on the device."""
        return device_cache.get(xp, device, ("win", self), self._host_index)

    def _host_adjoint(self) -> tuple[np.ndarray, int, bool]:
        """(flat (K*H*W,) read-major index, K, needs_zero_row) for the *interior* rows."""
        hp, wp = self.padded
        h, w = self.in_hw
        top, _, left, _ = self.pads
        forward = self._host_index()
        full = adjoint_index(forward, hp * wp)  # (Hp*Wp, K)
        rows = ((np.arange(h) + top)[:, None] * wp + (np.arange(w) + left)[None, :]).reshape(-1)
        inner = full[rows]  # (H*W, K)
        missing = inner == forward.size
        k = max(int((~missing).sum(axis=1).max(initial=0)), 1)
        inner = inner[:, :k]
        return np.ascontiguousarray(inner.T).reshape(-1), k, bool(missing[:, :k].any())

    def adjoint(self, xp: Any, device: Any) -> tuple[Any, int, bool]:
        """Adjoint gather plan on the device: ``(index, K, needs_zero_row)``.

        ``index`` (K*H*W,) lists, read-major, which window entry (row of the ``(N, L, C)``
        window array, or ``L`` = an appended zero row) is the t-th read of each real input row.
        """
        index = device_cache.get(xp, device, ("adj", self), lambda: _adjoint_plan(self)[0])
        _, k, zero = _adjoint_plan(self)
        return index, k, zero


@lru_cache(maxsize=256)
def _adjoint_plan(win: Windows) -> tuple[np.ndarray, int, bool]:
    return win._host_adjoint()


def pad_nhwc(x: Any, pads: tuple[int, int, int, int], value: float = 0.0) -> Any:
    """Pad the H and W axes of an NHWC array by (top, bottom, left, right) with ``value``."""
    if not any(pads):
        return x
    return fastpath.pad_hw(namespace_of(x), x, pads, value)


def gather_windows(x: Any, win: Windows, value: float = 0.0) -> Any:
    """im2col: NHWC ``x`` → ``(N, L, C)`` window entries, L = Ho*Wo*kh*kw (or kh*kw*Ho*Wo)."""
    xp = namespace_of(x)
    n, _, _, c = x.shape
    hp, wp = win.padded
    rows = xp.reshape(pad_nhwc(x, win.pads, value), (n, hp * wp, c))
    return fastpath.take_rows(xp, rows, win.index(xp, device(x)))


def scatter_windows(d: Any, win: Windows) -> Any:
    """col2im, the adjoint of :func:`gather_windows`: ``(N, L, C)`` → NHWC input gradient.

    A gather through :meth:`Windows.adjoint` (only rows inside the image, never the padding)
    followed by a sum over the K reads of each row. When some row is read fewer than K times
    (padding, strides, dilation) the gather needs a zero row at index ``L``: it is appended
    here unless ``d`` already has more than ``L`` rows (the convolution makes them for free).
    """
    xp = namespace_of(d)
    n, length, c = d.shape
    h, w = win.in_hw
    index, k, zero = win.adjoint(xp, device(d))
    if zero and length == win.positions * win.taps:
        d = xp.concat([d, xp.zeros((n, 1, c), dtype=d.dtype, device=device(d))], axis=1)
    gathered = fastpath.take_rows(xp, d, index)
    if k > 1:  # (N, K, H*W, C): summing over axis 1 adds K contiguous planes
        gathered = fastpath.sum_axis1(xp, xp.reshape(gathered, (n, k, h * w, c)))
    return xp.reshape(gathered, (n, h, w, c))


def column_sums(d: Any) -> Any:
    """Sum over the rows of a 2-D ``d`` (M, F) → (F,), as a GEMV (faster than ``sum(axis=0)``)."""
    xp = namespace_of(d)
    ones = xp.ones((1, d.shape[0]), dtype=d.dtype, device=device(d))
    return xp.reshape(fastpath.matmul(xp, ones, d), (d.shape[1],))


def relu_column_sums(d: Any, y: Any) -> Any:
    """Sum over the rows of ``d`` (M, F) where ``y`` (M, F), a ReLU's output, is positive:
    the bias gradient of a layer whose ReLU output is ``y`` → (F,)."""
    if native_norm.applies(d) and native_norm.applies(y):
        return native_norm.relu_sums(d, y)
    return column_sums(fastpath.relu_grad(namespace_of(d, y), y, d))


# --------------------------------------------------------------------------------------------
# Convolution


@dataclass
class ConvCtx:
    """What a convolution's backward pass needs: its input (as PyTorch saves). The window
    entries (im2col columns, kh*kw times the input) are gathered again there, a chunk at a
    time: measured on NumPy, as fast as storing them (even for 1-channel inputs), and far
    less memory."""

    x: Any  # (N, H, W, C_in)
    win: Windows
    groups: int = 1

    def columns(self, a: int, b: int) -> Any:
        """The window entries of images ``a:b`` in :func:`conv_columns`'s layout."""
        return conv_columns(self.x[a:b, ...], self.win, self.groups)


def window_columns(x: Any, win: Windows) -> Any:
    """im2col of a convolution: NHWC ``x`` → ``(N, P, kh*kw*C_in)``, one row of window
    entries per output position (P = ``win.positions``, in ``win``'s order)."""
    return namespace_of(x).reshape(gather_windows(x, win), (x.shape[0], win.positions, -1))


def conv_windows(in_hw: Pair, kernel: Pair, stride: Pair, pads, dilation: Pair) -> Windows:
    """The :class:`Windows` of a convolution (entries ordered position-major)."""
    out = (conv_output_size(in_hw[0], kernel[0], stride[0], pads[0] + pads[1], dilation[0]),
           conv_output_size(in_hw[1], kernel[1], stride[1], pads[2] + pads[3], dilation[1]))
    return Windows(in_hw, kernel, stride, dilation, tuple(pads), out, kernel_first=False)


def is_depthwise(weight: Any, groups: int) -> bool:
    """True for a convolution with one input channel per group (``groups == C_in``): computed
    as a multiply-and-sum over the kernel taps instead of GEMMs (see :func:`conv_columns`)."""
    return groups > 1 and weight.shape[2] == 1


def conv2d_forward(x: Any, weight: Any, bias: Any, stride: Pair, pads, dilation: Pair,
                   groups: int = 1):
    """NHWC convolution (cross-correlation, as in PyTorch), optionally grouped.

    Args:
        x: ``(N, H, W, C_in)``; weight: ``(kh, kw, C_in/groups, C_out)``, output channels
            ``g*C_out/groups ...`` belonging to group ``g`` (PyTorch's rule); bias: ``(C_out,)``
            or None. pads: (top, bottom, left, right).
    Returns:
        ``(y, ctx)`` with ``y`` of shape ``(N, Ho, Wo, C_out)``.
    """
    kh, kw, _, cout = weight.shape
    win = conv_windows(tuple(x.shape[1:3]), (kh, kw), stride, pads, dilation)
    xp = namespace_of(x, weight, bias)
    if native.applies(x, weight, stride, win.pads, dilation, groups):
        y = native.conv2d(x, weight, bias, stride[0], win.pads, win.out)
        return y, ConvCtx(x, win, groups)

    def chunk(a: int, b: int):
        y = conv2d_rows(x[a:b, ...], weight, win, groups)
        return (y if bias is None else y + bias),

    y, = fastpath.map_batch(xp, x.shape[0], conv_chunk_bytes(win, weight, groups), chunk,
                            ("cat",))
    return xp.reshape(y, (x.shape[0], *win.out, cout)), ConvCtx(x, win, groups)


def conv_chunk_bytes(win: Windows, weight: Any, groups: int = 1) -> int:
    """Working set per image of a convolution's forward or backward (for chunking): the
    columns and their gradient plus the output, or for a depthwise convolution (no columns)
    the padded input, the output, its gradient and one temporary of its size."""
    kh, kw, cin, cout = weight.shape
    if is_depthwise(weight, groups):
        hp, wp = win.padded
        return (2 * hp * wp * groups + 4 * win.positions * cout) * _itemsize(weight)
    return (win.positions + 1) * (2 * kh * kw * cin * groups + cout) * _itemsize(weight)


def _itemsize(a: Any) -> int:
    return namespace_of(a).finfo(a.dtype).bits // 8


def conv2d_rows(x: Any, weight: Any, win: Windows, groups: int = 1):
    """Convolution without bias as rows ``(N, P, C_out)``, P = ``win.positions`` in ``win``'s
    order (an im2col gather and one GEMM; grouped: one gather and a GEMM per group;
    depthwise: a multiply-add per kernel tap, no gather)."""
    return columns_times_weight(conv_columns(x, win, groups), weight, win, groups)


def conv_columns(x: Any, win: Windows, groups: int = 1) -> Any:
    """What a convolution multiplies its weights with, from NHWC ``x``:

    * ``groups == 1``: the im2col entries ``(N, P, kh*kw*C_in)`` (:func:`window_columns`);
    * grouped: ``(G, N*P, kh*kw*C_in/G)``, one GEMM operand per group, from one gather (the
      input is made group-major first: kh*kw times less data to move than the columns);
    * depthwise (``groups == C_in``): the padded input ``(N, Hp, Wp, C_in)``, whose strided
      slices are the kernel taps (:func:`_tap_slices`; no gather).
    """
    xp = namespace_of(x)
    n, h, w, c = x.shape
    if groups == 1:
        return window_columns(x, win)
    if groups == c:
        return pad_nhwc(x, win.pads)
    cg = c // groups
    major = xp.permute_dims(xp.reshape(x, (n, h, w, groups, cg)), (3, 0, 1, 2, 4))
    cols = window_columns(xp.reshape(major, (groups * n, h, w, cg)), win)
    return xp.reshape(cols, (groups, n * win.positions, win.taps * cg))


def columns_times_weight(cols: Any, weight: Any, win: Windows, groups: int = 1) -> Any:
    """The convolution rows ``(N, P, C_out)`` from :func:`conv_columns` ``cols``."""
    xp = namespace_of(cols, weight)
    if groups == 1:
        n, p, k = cols.shape
        y = xp.reshape(cols, (n * p, k)) @ xp.reshape(weight, (k, weight.shape[3]))
        return xp.reshape(y, (n, p, weight.shape[3]))
    if is_depthwise(weight, groups):
        return _depthwise_rows(cols, weight, win)
    return _channels_last(cols @ _group_weights(weight, groups), cols.shape[1] // win.positions)


def conv_weight_grad(d: Any, cols: Any, weight: Any, win: Windows, groups: int = 1) -> Any:
    """Weight gradient of :func:`columns_times_weight` for row gradients ``d`` (N, P, C_out)."""
    xp = namespace_of(d, cols, weight)
    n, p, cout = d.shape
    if groups == 1:
        k = cols.shape[2]
        dweight = xp.matrix_transpose(xp.reshape(cols, (n * p, k))) @ xp.reshape(d, (n * p, cout))
        return xp.reshape(dweight, weight.shape)
    if is_depthwise(weight, groups):
        return _depthwise_weight_grad(d, cols, weight, win)
    dg = xp.reshape(_group_rows(d, groups), (groups, n * p, cout // groups))
    return _ungroup_weights(xp.matrix_transpose(cols) @ dg, weight.shape)


def conv_input_grad(d: Any, weight: Any, win: Windows, groups: int = 1) -> Any:
    """Input gradient ``(N, H, W, C_in)`` of :func:`conv2d_rows` for row gradients ``d``
    (N, P, C_out): one GEMM (per group) into the column gradient, then the col2im gather;
    depthwise: slice-adds per kernel tap. It is also a transposed convolution's forward pass."""
    xp = namespace_of(d, weight)
    kh, kw, cg, cout = weight.shape
    n = d.shape[0]
    if is_depthwise(weight, groups):
        return _depthwise_input_grad(d, weight, win, groups)
    back = _backward_windows(win, weight, groups) if fastpath.enabled(xp) else None
    if back is not None:
        return _input_grad_by_convolution(d, weight, win, back)
    og = cout // groups
    d = xp.reshape(_group_rows(d, groups), (groups * n, win.positions, og)) if groups > 1 else d
    if win.adjoint(xp, device(d))[2]:
        # col2im needs a zero row after each image's window entries: append one zero output
        # position to d, whose GEMM row gives kh*kw zero entries (far cheaper than appending
        # to the kh*kw times larger column gradient)
        d = xp.concat([d, xp.zeros((d.shape[0], 1, og), dtype=d.dtype, device=device(d))],
                      axis=1)
    if groups == 1:
        dcols = xp.reshape(d, (-1, cout)) @ xp.matrix_transpose(
            xp.reshape(weight, (kh * kw * cg, cout)))
        return scatter_windows(xp.reshape(dcols, (n, -1, cg)), win)
    dcols = xp.reshape(d, (groups, -1, og)) @ xp.matrix_transpose(_group_weights(weight, groups))
    dx = scatter_windows(xp.reshape(dcols, (groups * n, -1, cg)), win)  # (G*N, H, W, C/G)
    h, w = win.in_hw
    dx = xp.permute_dims(xp.reshape(dx, (groups, n, h, w, cg)), (1, 2, 3, 0, 4))
    return xp.reshape(dx, (n, h, w, groups * cg))


def _backward_windows(win: Windows, weight: Any, groups: int) -> Windows | None:
    """For a stride-1 ungrouped convolution in raster order whose padding is at most the
    kernel's reach: the windows of the convolution of its output gradient (padded by
    ``dilation*(k - 1) - pad``) that gives its input gradient; else None."""
    if groups != 1 or win.stride != (1, 1) or win.pool_order is not None or win.kernel_first:
        return None
    (kh, kw), (dh, dw) = win.kernel, win.dilation
    top, bottom, left, right = win.pads
    pads = (dh * (kh - 1) - top, dh * (kh - 1) - bottom, dw * (kw - 1) - left,
            dw * (kw - 1) - right)
    if min(pads) < 0:
        return None
    back = conv_windows(win.out, win.kernel, (1, 1), pads, win.dilation)
    # a transposed convolution's windows may leave input rows unread (output_padding)
    return back if back.out == win.in_hw else None


def _input_grad_by_convolution(d: Any, weight: Any, win: Windows, back: Windows) -> Any:
    """NumPy fast path of :func:`conv_input_grad` for a stride-1 convolution: the convolution
    of the output gradient with the kernel flipped in space, in and out channels swapped.
    One gather of ``dy`` and one GEMM (inner size kh*kw*C_out) instead of the GEMM into the
    column gradient (inner size C_out), its col2im gather and the sum over the taps: fewer
    passes over kh*kw times the input, and a better shaped GEMM (measured: resnet20 step
    ~20% faster). The same sums up to rounding."""
    n, cout = d.shape[0], weight.shape[3]
    flipped = adjoint_kernel(weight)
    dy = np.reshape(d, (n, *win.out, cout))
    rows = columns_times_weight(window_columns(dy, back), flipped, back)
    return np.reshape(rows, (n, *win.in_hw, weight.shape[2]))


def _group_weights(weight: Any, groups: int) -> Any:
    """``(kh, kw, C_in/G, C_out)`` → ``(G, kh*kw*C_in/G, C_out/G)`` (one matrix per group)."""
    xp = namespace_of(weight)
    kh, kw, cg, cout = weight.shape
    return xp.permute_dims(xp.reshape(weight, (kh * kw * cg, groups, cout // groups)), (1, 0, 2))


def _ungroup_weights(dweight: Any, shape: tuple[int, ...]) -> Any:
    """Inverse of :func:`_group_weights`: ``(G, K, C_out/G)`` → ``shape``."""
    xp = namespace_of(dweight)
    return xp.reshape(xp.permute_dims(dweight, (1, 0, 2)), shape)


def _channels_last(rows: Any, n: int) -> Any:
    """Per-group rows ``(G, N*P, C_out/G)`` → ``(N, P, C_out)`` (group-major channels)."""
    xp = namespace_of(rows)
    g, m, og = rows.shape
    split = xp.reshape(rows, (g, n, m // n, og))
    return xp.reshape(xp.permute_dims(split, (1, 2, 0, 3)), (n, m // n, g * og))


def _group_rows(d: Any, groups: int) -> Any:
    """Inverse of :func:`_channels_last`: ``(N, P, C_out)`` → ``(G, N, P, C_out/G)``."""
    xp = namespace_of(d)
    n, p, cout = d.shape
    return xp.permute_dims(xp.reshape(d, (n, p, groups, cout // groups)), (2, 0, 1, 3))


def _tap_slices(win: Windows) -> list[tuple[slice, slice]]:
    """For each kernel tap ``(i, j)`` (row-major), the (rows, columns) slices of the padded
    input that it reads at every output position (stops inside the array, as strict needs)."""
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = win.kernel, win.stride, win.dilation, win.out
    return [(slice(i * dh, i * dh + sh * (ho - 1) + 1, sh),
             slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)) for i in range(kh) for j in range(kw)]


def _depthwise_rows(padded: Any, weight: Any, win: Windows) -> Any:
    """Depthwise convolution of the padded input ``(N, Hp, Wp, C)`` with ``weight``
    ``(kh, kw, 1, C*m)``: ``(N, P, C*m)``, output channel ``c*m + j`` from input channel ``c``;
    a multiply-add of a strided slice per kernel tap."""
    xp = namespace_of(padded, weight)
    n, c = padded.shape[0], padded.shape[3]
    w = xp.reshape(weight, (win.taps, c, weight.shape[3] // c))
    y = None
    for t, (rows, cols) in enumerate(_tap_slices(win)):
        term = xp.expand_dims(padded[:, rows, cols, :], axis=4) * w[t, ...]
        y = term if y is None else y + term
    return xp.reshape(y, (n, win.positions, weight.shape[3]))


def _depthwise_weight_grad(d: Any, padded: Any, weight: Any, win: Windows) -> Any:
    """Weight gradient of :func:`_depthwise_rows` for ``d`` (N, P, C*m): per tap, a GEMV
    column sum of slice * d (measured 4x faster than ``xp.sum`` over three axes)."""
    xp = namespace_of(d, padded, weight)
    n, c, cout = d.shape[0], padded.shape[3], weight.shape[3]
    d5 = xp.reshape(d, (n, *win.out, c, cout // c))
    dw = [column_sums(xp.reshape(xp.expand_dims(padded[:, rows, cols, :], axis=4) * d5,
                                 (-1, cout))) for rows, cols in _tap_slices(win)]
    return xp.reshape(xp.stack(dw), weight.shape)


def _depthwise_input_grad(d: Any, weight: Any, win: Windows, groups: int) -> Any:
    """Input gradient ``(N, H, W, C)`` of :func:`_depthwise_rows` for ``d`` (N, P, C*m): each
    tap's share is added into its strided slice of a zero padded image (a slice holds no index
    twice, so ``xpx.at(...).add`` is exact), then the padding is cut off."""
    xp = namespace_of(d, weight)
    n, cout = d.shape[0], weight.shape[3]
    hp, wp = win.padded
    c, m = groups, cout // groups
    w = xp.reshape(weight, (win.taps, c, m))
    d5 = xp.reshape(d, (n, *win.out, c, m))
    dx = xp.zeros((n, hp, wp, c), dtype=d.dtype, device=device(d))
    for t, (rows, cols) in enumerate(_tap_slices(win)):
        share = d5 * w[t, ...]
        share = xp.reshape(share, share.shape[:4]) if m == 1 else xp.sum(share, axis=4)
        dx = xpx.at(dx, (slice(None), rows, cols, slice(None))).add(share)
    top, _, left, _ = win.pads
    h, w_in = win.in_hw
    return dx[:, top:top + h, left:left + w_in, :]


#: bytes of column gradient (and its gathered copy) formed at once in convolution backward on
#: backends without a cache-sized fast path (it bounds the peak memory)
COL2IM_CHUNK_BYTES = 32 << 20


def conv2d_backward(dy: Any, ctx: ConvCtx, weight: Any, need_input_grad: bool = True,
                    bias_grad: bool = True, addend: Any = None):
    """Gradients of :func:`conv2d_forward`: ``(dx or None, dweight, dbias or None)``; ``dx``
    plus ``addend`` (shaped as ``dx``: a residual sum's other gradient) when one is given.

    Consumes ``ctx`` (what it saved is released). Runs a chunk of images at a time
    (:func:`conv2d_rows_backward`), so the column gradient, ``kh*kw`` times the input, never
    exists for the whole batch at once.
    """
    xp = namespace_of(dy, weight)
    ctx = consume(ctx)
    n = ctx.x.shape[0]
    win = ctx.win
    if native.applies(ctx.x, weight, win.stride, win.pads, win.dilation, ctx.groups):
        return conv2d_backward_native(xp.reshape(dy, (n, *win.out, weight.shape[-1])), ctx.x,
                                      weight, win, need_input_grad, bias_grad, addend)
    if addend is not None:
        dx, dw, db = conv2d_backward(dy, ctx, weight, True, bias_grad)
        return fastpath.add(xp, dx, addend), dw, db
    d = xp.reshape(dy, (n, ctx.win.positions, weight.shape[-1]))

    shifted = fastpath.enabled(xp) and _shifted_weight_grad_applies(ctx.win, weight, ctx.groups)

    def chunk(a: int, b: int):
        if shifted:
            return _conv_backward_shifted(d[a:b, ...], ctx.x[a:b, ...], weight, ctx.win,
                                          need_input_grad, bias_grad)
        return conv2d_rows_backward(d[a:b, ...], ctx.columns(a, b), weight, ctx.win,
                                    need_input_grad, bias_grad, ctx.groups)

    return fastpath.map_batch(xp, n, conv_chunk_bytes(ctx.win, weight, ctx.groups), chunk,
                              ("cat", "sum", "sum"),
                              COL2IM_CHUNK_BYTES if need_input_grad else None)


def conv2d_backward_native(dy: Any, x: Any, weight: Any, win: Windows, need_input_grad: bool,
                           bias_grad: bool, addend: Any = None):
    """:func:`conv2d_backward` by the compiled kernels (:mod:`anycnn.native`) for NHWC ``dy``
    (N, Ho, Wo, C_out), or the :class:`~anycnn.native.Pooled` gradient of a fused
    Conv-ReLU-MaxPool block, and the saved input ``x``; the input gradient's sums start from
    ``addend`` when one is given."""
    pooled = isinstance(dy, native.Pooled)
    if pooled and bias_grad:
        raise ValueError("a Pooled gradient's bias gradient is relu_column_sums' to compute")
    dweight = native.conv2d_weight_grad(x, dy, win.kernel, win.stride[0], win.pads)
    dbias = column_sums(np.reshape(dy, (-1, dy.shape[3]))) if bias_grad else None
    dx = None
    if need_input_grad and native.input_grad_applies(weight):
        dx = native.conv2d_input_grad(dy, weight, win.stride[0], win.pads, win.in_hw, addend)
    elif need_input_grad:
        d = dy.unpooled(win.out) if pooled else dy
        dx = conv_input_grad(np.reshape(d, (d.shape[0], win.positions, -1)), weight, win)
        dx = dx if addend is None else fastpath.add(np, dx, addend)
    return dx, dweight, dbias


#: the NumPy weight gradient by shifted GEMMs (no im2col) is used up to this C_in*C_out:
#: measured per chunk of 6 images, 3x3 'same', one thread: 16x16 channels 0.46 ms against
#: 0.64 ms (the columns' gather and their GEMM); 32x32 equal, 64x64 1.6 against 1.2 ms
SHIFTED_MAX_CHANNELS = 16 * 16


def _shifted_weight_grad_applies(win: Windows, weight: Any, groups: int) -> bool:
    """Whether :func:`_conv_backward_shifted` computes this convolution's backward: stride 1,
    no dilation, 'same' padding (the padded input and the padded output gradient are grids of
    one size), few channels, ungrouped, raster order."""
    kh, kw, cin, cout = weight.shape
    top, bottom, left, right = win.pads
    return (groups == 1 and win.stride == (1, 1) and win.dilation == (1, 1)
            and win.pool_order is None and not win.kernel_first
            and top + bottom == kh - 1 and left + right == kw - 1
            and 1 < cin and cin * cout <= SHIFTED_MAX_CHANNELS)


def _conv_backward_shifted(d: Any, x: Any, weight: Any, win: Windows, need_input_grad: bool,
                           bias_grad: bool):
    """NumPy backward of a 'same' stride-1 convolution for images ``x`` (n, H, W, C_in) and
    row gradients ``d`` (n, P, C_out), without the input's im2col columns.

    The input padded by ``win.pads`` and the output gradient padded by ``k - 1 - pad`` are
    grids of one size (Hp, Wp); flattened over the chunk's images, tap (i, j)'s weight gradient
    is one GEMM ``x[g + off].T @ dy[g]`` between row ranges shifted by
    ``off = (i - k + 1 + top)*Wp + (j - k + 1 + left)`` (zeros in the padded gradient make the
    rows that wrap around a row or an image end count nothing). The padded gradient also gives
    the input gradient (:func:`_input_grad_by_convolution`'s windows). The same sums as the
    im2col path up to rounding."""
    n, _, cout = d.shape
    kh, kw, cin, _ = weight.shape
    back = _backward_windows(win, weight, 1)
    hp, wp = back.padded
    grid = fastpath.pad_hw(np, np.reshape(d, (n, *win.out, cout)), back.pads, 0.0)
    padded = fastpath.pad_hw(np, x, win.pads, 0.0)
    g = np.reshape(grid, (-1, cout))
    rows = np.reshape(padded, (-1, cin))
    bt, bl = back.pads[0], back.pads[2]
    lo = bt * wp + bl
    hi = (n - 1) * hp * wp + (win.out[0] - 1 + bt) * wp + win.out[1] + bl
    dweight = np.empty((kh, kw, cin, cout), dtype=np.result_type(d.dtype, x.dtype))
    for i in range(kh):
        for j in range(kw):
            off = (i - bt) * wp + (j - bl)
            np.matmul(rows[lo + off:hi + off].T, g[lo:hi], out=dweight[i, j])
    dbias = column_sums(np.reshape(d, (-1, cout))) if bias_grad else None
    dx = None
    if need_input_grad:
        flipped = adjoint_kernel(weight)
        cols = fastpath.take_rows(np, np.reshape(grid, (n, hp * wp, cout)),
                                  back.index(np, device(d)))
        dx_rows = columns_times_weight(np.reshape(cols, (n, back.positions, -1)), flipped, back)
        dx = np.reshape(dx_rows, (n, *win.in_hw, cin))
    return dx, dweight, dbias


def consume(ctx: ConvCtx) -> ConvCtx:
    """A copy of ``ctx`` for one backward pass; ``ctx`` itself is emptied (a second backward
    for the same forward raises, as PyTorch's freed graph)."""
    if ctx.x is None:
        raise RuntimeError("convolution backward called twice for one forward")
    taken = ConvCtx(ctx.x, ctx.win, ctx.groups)
    ctx.x = None
    return taken


def conv2d_rows_backward(d: Any, cols: Any, weight: Any, win: Windows, need_input_grad: bool,
                         bias_grad: bool, groups: int = 1):
    """Gradients of :func:`conv2d_rows` for row gradients ``d`` (N, P, C_out) and the input's
    :func:`conv_columns` ``cols``: ``(dx (N, H, W, C_in) or None, dweight, dbias (C_out,) or
    None)``."""
    xp = namespace_of(d, weight)
    n, p, cout = d.shape
    dbias = column_sums(xp.reshape(d, (n * p, cout))) if bias_grad else None
    dweight = conv_weight_grad(d, cols, weight, win, groups)
    dx = conv_input_grad(d, weight, win, groups) if need_input_grad else None
    return dx, dweight, dbias


# --------------------------------------------------------------------------------------------
# Transposed convolution: the adjoint of a convolution's input gradient


def conv_transpose_windows(in_hw: Pair, kernel: Pair, stride: Pair, padding: Pair,
                           output_padding: Pair, dilation: Pair) -> Windows:
    """The :class:`Windows` of the convolution whose input gradient is the transposed one.

    That convolution reads the transposed convolution's *output*, of size
    ``(in - 1)*stride - 2*padding + dilation*(kernel - 1) + output_padding + 1`` per axis
    (PyTorch's), and has one window per position of its *input* ``in_hw``.
    """
    out = tuple((in_hw[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1)
                + output_padding[i] + 1 for i in range(2))
    pads = (padding[0], padding[0], padding[1], padding[1])
    return Windows(out, kernel, stride, dilation, pads, tuple(in_hw), kernel_first=False)


def _conv_view(weight: Any) -> Any:
    """A transposed convolution's ``(kh, kw, C_in, C_out/G)`` weight as the weight
    ``(kh, kw, C_out/G, C_in)`` of the (grouped) convolution it is the adjoint of."""
    return namespace_of(weight).permute_dims(weight, (0, 1, 3, 2))


def conv_transpose2d_forward(x: Any, weight: Any, bias: Any, win: Windows, groups: int = 1):
    """NHWC transposed convolution (PyTorch's ``conv_transpose2d``), optionally grouped.

    Args:
        x: ``(N, H, W, C_in)`` with ``(H, W) == win.out``; weight: ``(kh, kw, C_in, C_out/G)``,
            input channels ``g*C_in/G ...`` feeding output channels ``g*C_out/G ...``;
            bias: ``(C_out,)`` or None; win: :func:`conv_transpose_windows`.
    Returns:
        ``(y, ctx)``, ``y`` of shape ``(N, Ho, Wo, C_out)`` with ``(Ho, Wo) == win.in_hw``.
    """
    xp = namespace_of(x, weight, bias)
    conv_weight = _conv_view(weight)
    n, cin = x.shape[0], x.shape[3]
    rows = xp.reshape(x, (n, win.positions, cin))

    def chunk(a: int, b: int):
        y = conv_input_grad(rows[a:b, ...], conv_weight, win, groups)
        return (y if bias is None else y + bias),

    y, = fastpath.map_batch(xp, n, conv_chunk_bytes(win, conv_weight, groups), chunk, ("cat",),
                            COL2IM_CHUNK_BYTES)
    return y, ConvCtx(x, win, groups)


def conv_transpose2d_backward(dy: Any, ctx: ConvCtx, weight: Any, need_input_grad: bool = True,
                              bias_grad: bool = True):
    """Gradients of :func:`conv_transpose2d_forward`: ``(dx or None, dweight, dbias or None)``.

    The input gradient is the convolution of ``dy`` (:func:`conv_columns` and
    :func:`columns_times_weight`); the weight gradient is that convolution's weight gradient
    with ``x`` as its output gradient, from the same columns.
    """
    xp = namespace_of(dy, weight)
    ctx = consume(ctx)
    x, win, groups = ctx.x, ctx.win, ctx.groups
    n, cin, cout = x.shape[0], x.shape[3], dy.shape[3]
    conv_weight = _conv_view(weight)

    def chunk(a: int, b: int):
        cols = conv_columns(dy[a:b, ...], win, groups)
        rows = xp.reshape(x[a:b, ...], (b - a, win.positions, cin))
        dconv = conv_weight_grad(rows, cols, conv_weight, win, groups)
        dx = columns_times_weight(cols, conv_weight, win, groups) if need_input_grad else None
        dbias = column_sums(xp.reshape(dy[a:b, ...], (-1, cout))) if bias_grad else None
        return dx, _conv_view(dconv), dbias

    dx, dweight, dbias = fastpath.map_batch(
        xp, n, conv_chunk_bytes(win, conv_weight, groups), chunk, ("cat", "sum", "sum"),
        COL2IM_CHUNK_BYTES)
    return (None if dx is None else xp.reshape(dx, x.shape)), dweight, dbias


# --------------------------------------------------------------------------------------------
# Pooling


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
    mask: Any  # bool (N, K, P, C): the first maximum of each window
    win: Windows


def max_pool2d_forward(x: Any, win: Windows):
    """Max pooling of NHWC ``x`` over ``win`` (padding is -inf); ``(y, ctx)``.

    Ties go to the first maximum in row-major window order, as in PyTorch. The windows are
    gathered into K contiguous planes (faster than strided slices, measured), so the maximum
    and the masks are plane-wise operations.
    """
    xp = namespace_of(x)
    n, _, _, c = x.shape
    entries = xp.reshape(gather_windows(x, win, value=-float("inf")),
                         (n, win.taps, win.positions, c))
    y, mask = fastpath.window_max(xp, entries)
    return xp.reshape(y, (n, *win.out, c)), MaxPoolCtx(mask, win)


def max_pool2d_backward(dy: Any, ctx: MaxPoolCtx):
    """Input gradient of :func:`max_pool2d_forward`."""
    xp = namespace_of(dy)
    n, _, _, c = dy.shape
    d = fastpath.masked(xp, ctx.mask, xp.reshape(dy, (n, 1, ctx.win.positions, c)))
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
    inv_count: Any  # (1, 1, P, 1) reciprocal window sizes
    win: Windows


def avg_pool2d_forward(x: Any, win: Windows, count_include_pad: bool = True):
    """Average pooling of NHWC ``x`` over ``win`` (zero padding); ``(y, ctx)``."""
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
    xp = namespace_of(dy)
    n, _, _, c = dy.shape
    share = xp.reshape(dy, (n, 1, ctx.win.positions, c)) * ctx.inv_count
    d = xp.broadcast_to(share, (n, ctx.win.taps, ctx.win.positions, c))
    return scatter_windows(xp.reshape(d, (n, -1, c)), ctx.win)


def global_avg_pool_forward(x: Any):
    """Mean over H and W: ``(N, H, W, C)`` → ``(N, C)``."""
    xp = namespace_of(x)
    return xp.mean(x, axis=(1, 2)), x.shape


def global_avg_pool_backward(dy: Any, in_shape):
    """Input gradient of :func:`global_avg_pool_forward`."""
    xp = namespace_of(dy)
    n, h, w, c = in_shape
    share = xp.reshape(dy, (n, 1, 1, c)) * (1.0 / (h * w))
    return share * xp.ones(in_shape, dtype=dy.dtype, device=device(dy))


# --------------------------------------------------------------------------------------------
# Upsampling by integer factors


def upsample_nearest_forward(x: Any, scale: Pair) -> Any:
    """Nearest-neighbour upsampling of NHWC ``x`` by integer ``scale`` (sh, sw): each pixel
    becomes an ``sh x sw`` block (PyTorch's ``mode="nearest"``)."""
    xp = namespace_of(x)
    n, h, w, c = x.shape
    sh, sw = scale
    blocks = xp.broadcast_to(xp.reshape(x, (n, h, 1, w, 1, c)), (n, h, sh, w, sw, c))
    return xp.reshape(blocks, (n, h * sh, w * sw, c))


def upsample_nearest_backward(dy: Any, scale: Pair) -> Any:
    """Input gradient of :func:`upsample_nearest_forward`: the sum over each block."""
    xp = namespace_of(dy)
    n, ho, wo, c = dy.shape
    sh, sw = scale
    return xp.sum(xp.reshape(dy, (n, ho // sh, sh, wo // sw, sw, c)), axis=(2, 4))


@lru_cache(maxsize=64)
def _linear_interpolation(size: int, scale: int) -> np.ndarray:
    """float64 ``(size*scale, size)``: row ``i`` holds the weights of PyTorch's linear
    interpolation with ``align_corners=False`` for output ``i``: source coordinate
    ``(i + 0.5)/scale - 0.5`` clamped to ``[0, size - 1]``, split between its two neighbours."""
    out = np.arange(size * scale)
    source = np.maximum((out + 0.5) / scale - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), size - 1)
    high = np.minimum(low + 1, size - 1)
    frac = source - low
    matrix = np.zeros((size * scale, size))
    np.add.at(matrix, (out, low), 1.0 - frac)
    np.add.at(matrix, (out, high), frac)
    matrix.flags.writeable = False
    return matrix


def _interpolation(x: Any, size: int, scale: int, transpose: bool) -> Any:
    """The :func:`_linear_interpolation` matrix (or its transpose) on ``x``'s device and dtype."""
    xp = namespace_of(x)
    host_dtype = np.float64 if xp.finfo(x.dtype).bits == 64 else np.float32

    def build() -> np.ndarray:
        m = _linear_interpolation(size, scale)
        return np.ascontiguousarray(m.T if transpose else m, dtype=host_dtype)

    key = ("lerp", size, scale, transpose, np.dtype(host_dtype).name)
    return device_cache.get(xp, device(x), key, build)


def _along_axes(x: Any, scale: Pair, transpose: bool) -> Any:
    """Apply the interpolation matrix of each spatial axis of NHWC ``x`` (or its transpose,
    for the backward pass) as a matrix product: first along W, then along H."""
    xp = namespace_of(x)
    n, h, w, c = x.shape
    sh, sw = scale
    w_in, h_in = (w // sw, h // sh) if transpose else (w, h)
    mw = _interpolation(x, w_in, sw, transpose)  # (W_out, W_in) or its transpose
    y = mw @ xp.reshape(x, (n * h, w, c))
    w2 = y.shape[1]
    mh = _interpolation(x, h_in, sh, transpose)
    y = mh @ xp.reshape(y, (n, h, w2 * c))
    return xp.reshape(y, (n, y.shape[1], w2, c))


def upsample_bilinear_forward(x: Any, scale: Pair) -> Any:
    """Bilinear upsampling of NHWC ``x`` by integer ``scale`` (PyTorch's ``mode="bilinear"``,
    ``align_corners=False``): one small dense ``(out, in)`` interpolation matrix per axis,
    applied by matrix products."""
    return _along_axes(x, scale, transpose=False)


def upsample_bilinear_backward(dy: Any, scale: Pair) -> Any:
    """Input gradient of :func:`upsample_bilinear_forward`: the transposed matrices (no
    scatter: the sums over the outputs that read an input pixel are in the products)."""
    return _along_axes(dy, scale, transpose=True)


# --------------------------------------------------------------------------------------------
# Dense


def linear_forward(x: Any, weight: Any, bias: Any):
    """``x @ weight + bias`` with x ``(N, in)``, weight ``(in, out)``; ctx is x."""
    y = fastpath.matmul(namespace_of(x, weight, bias), x, weight)
    return (y + bias if bias is not None else y), x


def linear_backward(dy: Any, x: Any, weight: Any, need_input_grad: bool = True):
    """``(dx or None, dweight, dbias)`` of :func:`linear_forward`."""
    xp = namespace_of(dy, x, weight)
    dweight = fastpath.matmul(xp, xp.matrix_transpose(x), dy)
    dbias = column_sums(dy)
    dx = fastpath.matmul(xp, dy, xp.matrix_transpose(weight)) if need_input_grad else None
    return dx, dweight, dbias


# --------------------------------------------------------------------------------------------
# Activations (ctx is whatever the derivative needs)


def relu_forward(x: Any):
    """``max(x, 0)``; ctx is the output (its sign gives the derivative)."""
    y = fastpath.bias_relu(namespace_of(x), x, None)
    return y, y


def relu_backward(dy: Any, y: Any):
    return fastpath.relu_grad(namespace_of(dy, y), y, dy)


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


@dataclass
class BatchNormCtx:
    xhat: Any  # normalised input, (M, C) rows of the channels-last input; with ``mean``, the
    # input rows themselves (the compiled kernels normalise them again as they read them)
    inv_std: Any
    count: int  # values per channel the statistics were taken over (all ranks')
    training: bool
    share: float = 1.0  # this rank's part of ``count`` (synchronised statistics)
    out: Any = None  # the output (M, C) when a ReLU was applied to it (``relu=True``)
    mean: Any = None  # the mean ``xhat`` holds the input rows around (compiled kernels)


def batch_norm_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps,
                       reduce=None, relu=False, addend=None):
    """PyTorch ``batch_norm`` on channels-last input, followed by a ReLU when ``relu``.

    ``addend`` (shaped as ``x``; a residual sum's shortcut output) is added to the normalised
    values before the ReLU, in the same pass. The ReLU's mask is then not kept: the backward
    takes the gradient of the sum, already through its ReLU, as a residual block computes it.

    In training, normalises with the batch statistics and returns updated running statistics
    (``running_var`` uses the unbiased batch variance); in eval, uses the running statistics.
    Returns ``(y, ctx, new_running_mean, new_running_var)``.

    ``reduce`` (training only; data-parallel synchronised statistics): a function that sums a
    1-D array over every rank (a communicator's ``allreduce_``). The mean and the variance are
    then those of all ranks' batches together: two calls, ``(C + 1,)`` (sums and count) and
    ``(C,)`` (squared deviations from the global mean), plus one host read of the count.

    The per-channel passes are :mod:`anycnn.fastpath` kernels (NumPy: GEMV sums and one
    cache-sized chunk at a time, the ReLU inside the same pass); the portable expressions
    are in their docstrings.
    """
    xp = namespace_of(x, gamma, beta, running_mean, running_var)
    c = x.shape[-1]
    rows = xp.reshape(x, (-1, c))
    compiled = native_norm.applies(rows)
    count = rows.shape[0]
    share = 1.0
    if training:
        sums = native_norm.sums(rows) if compiled else fastpath.channel_sums(xp, rows)
        if reduce is not None:
            local = count
            total = reduce(xp.concat([sums, xp.full((1,), float(count), dtype=x.dtype,
                                                    device=device(x))]))
            count = round(float(to_numpy(total[-1])))
            sums = total[:-1]
            share = local / count
        mean = sums / count
        if compiled:  # no centred copy: the normalising pass subtracts the mean itself
            centred, squares = rows, native_norm.squared_deviations(rows, mean)
        else:
            centred, squares = fastpath.centre_rows(xp, rows, mean)
        if reduce is not None:
            squares = reduce(squares)
        var = squares / count
        unbiased = var * (count / max(count - 1, 1))
        running_mean = (1.0 - momentum) * running_mean + momentum * mean
        running_var = (1.0 - momentum) * running_var + momentum * unbiased
    else:
        mean = running_mean
        centred = rows if compiled else rows - running_mean
        var = running_var
    inv_std = 1.0 / xp.sqrt(var + eps)
    plus = None if addend is None else xp.reshape(addend, rows.shape)
    masked = relu and plus is None  # the ReLU's mask belongs to this layer's backward
    if compiled:  # xhat is not stored: the backward kernels compute it again from the rows
        y = native_norm.normalize(rows, mean, inv_std, gamma, beta, relu, plus)
        ctx = BatchNormCtx(rows, inv_std, count, training, share, y if masked else None, mean)
    else:
        xhat, y = fastpath.normalize_rows(xp, centred, inv_std, gamma, beta, masked)
        if plus is not None:
            y = fastpath.add_relu(xp, y, plus, relu)
        ctx = BatchNormCtx(xhat, inv_std, count, training, share, y if masked else None)
    return xp.reshape(y, x.shape), ctx, running_mean, running_var


def batch_norm_backward(dy, ctx: BatchNormCtx, gamma, reduce=None):
    """``(dx, dgamma, dbeta)`` of :func:`batch_norm_forward` (through its ReLU, if it had one).

    With ``reduce`` (the forward's; synchronised statistics), ``dy`` is the gradient of this
    rank's *mean* loss, and the objective is the global batch's mean loss, i.e. each rank's loss
    weighted by its share ``w`` of the batch (how :mod:`anycnn.train.parallel` combines the
    ranks' gradients). One call sums ``(2C,)``: ``w * dbeta`` and ``w * dgamma`` of every rank;
    ``dx`` is the global objective's input gradient divided by ``w`` (the trainer multiplies
    every rank's parameter gradients by ``w``), ``dgamma``/``dbeta`` are this rank's own.
    """
    xp = namespace_of(dy, gamma)
    c = dy.shape[-1]
    rows = xp.reshape(dy, (-1, c))
    compiled = ctx.mean is not None and native_norm.applies(rows)
    if ctx.mean is not None and not compiled:  # the kernels went off since the forward
        ctx = replace(ctx, xhat=(ctx.xhat - ctx.mean) * ctx.inv_std, mean=None)
    if compiled:  # the ReLU's gradient is applied inside both passes, never stored
        g = None
        dbeta, dgamma = native_norm.grad_sums(rows, ctx.out, ctx.xhat, ctx.mean, ctx.inv_std)
    else:
        g, dbeta, dgamma = fastpath.norm_grad_sums(xp, rows, ctx.xhat, ctx.out)
    scale = gamma * ctx.inv_std
    if not ctx.training:
        if compiled:
            zero = xp.zeros_like(scale)
            dx = native_norm.input_grad(rows, ctx.out, ctx.xhat, ctx.mean, ctx.inv_std, scale,
                                        zero, zero)
            return xp.reshape(dx, dy.shape), dgamma, dbeta
        return xp.reshape(g * scale, dy.shape), dgamma, dbeta
    dsum, gsum = dbeta, dgamma
    if reduce is not None:
        w = ctx.share
        total = reduce(xp.concat([dbeta * w, dgamma * w]))
        dsum, gsum = total[:c] / w, total[c:] / w
    if compiled:
        dx = native_norm.input_grad(rows, ctx.out, ctx.xhat, ctx.mean, ctx.inv_std, scale,
                                    scale * dsum / ctx.count, scale * gsum / ctx.count)
    else:
        dx = fastpath.norm_input_grad(xp, g, ctx.xhat, scale, dsum, gsum, ctx.count,
                                      owned=ctx.out is not None)
    return xp.reshape(dx, dy.shape), dgamma, dbeta


# --------------------------------------------------------------------------------------------
# Per-sample normalisation: GroupNorm and LayerNorm over the channels of NHWC input


@dataclass
class NormCtx:
    xhat: Any  # normalised input, shaped as the input
    inv_std: Any  # 1/sqrt(var + eps), shaped as the statistics of the view
    view: tuple[int, ...]  # the shape the statistics are taken in
    axes: tuple[int, ...]  # ... over these axes of it


def group_norm_forward(x: Any, weight: Any, bias: Any, groups: int, eps: float):
    """PyTorch's ``group_norm`` on channels-last ``x`` (N, ..., C): each sample's channels are
    split into ``groups`` consecutive groups, each normalised over its channels and all
    positions; then ``* weight + bias`` per channel (both ``(C,)`` or None). ``(y, ctx)``."""
    xp = namespace_of(x)
    c = x.shape[-1]
    view = (x.shape[0], -1, groups, c // groups)  # (N, positions, G, C/G)
    return _normalize(xp.reshape(x, view), (1, 3), weight, bias, eps, x.shape)


def layer_norm_forward(x: Any, weight: Any, bias: Any, eps: float):
    """Layer normalisation of each position's C values of channels-last ``x`` (N, ..., C)
    (ConvNeXt's LayerNorm; torch's ``layer_norm`` over the last axis); ``(y, ctx)``."""
    return _normalize(x, (x.ndim - 1,), weight, bias, eps, x.shape)


def _normalize(view: Any, axes: tuple[int, ...], weight: Any, bias: Any, eps: float, shape):
    """Normalise ``view`` over ``axes`` (biased variance), reshape to ``shape`` and apply the
    per-channel affine transform when ``weight`` is given."""
    xp = namespace_of(view, weight, bias)
    mean = xp.mean(view, axis=axes, keepdims=True)
    centred = view - mean
    var = xp.mean(centred * centred, axis=axes, keepdims=True)
    inv_std = 1.0 / xp.sqrt(var + eps)
    xhat = xp.reshape(centred * inv_std, shape)
    y = xhat if weight is None else xhat * weight + bias
    return y, NormCtx(xhat, inv_std, tuple(view.shape), axes)


def norm_backward(dy: Any, ctx: NormCtx, weight: Any):
    """``(dx, dweight or None, dbias or None)`` of :func:`group_norm_forward` or
    :func:`layer_norm_forward`."""
    xp = namespace_of(dy, weight)
    outer = tuple(range(dy.ndim - 1))
    dweight = dbias = None
    dxhat = dy
    if weight is not None:
        dweight = xp.sum(dy * ctx.xhat, axis=outer)
        dbias = xp.sum(dy, axis=outer)
        dxhat = dy * weight
    g = xp.reshape(dxhat, ctx.view)
    xhat = xp.reshape(ctx.xhat, ctx.view)
    dx = ctx.inv_std * (g - xp.mean(g, axis=ctx.axes, keepdims=True)
                        - xhat * xp.mean(g * xhat, axis=ctx.axes, keepdims=True))
    return xp.reshape(dx, dy.shape), dweight, dbias


# --------------------------------------------------------------------------------------------
# Losses


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
