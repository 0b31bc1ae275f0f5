"""Convolutions (plain, grouped, depthwise, transposed) of NHWC images, forward and backward.

Layouts: ``x`` ``(N, H, W, C_in)``, ``weight`` ``(kh, kw, C_in/groups, C_out)`` (a transposed
convolution's ``(kh, kw, C_in, C_out/groups)``), ``bias`` ``(C_out,)``; row gradients
``(N, P, C_out)`` with ``P`` output positions in the windows' order. The portable path is an
im2col gather and one GEMM per group, run a cache-sized chunk of images at a time
(:func:`~anycnn.kernels.threads.map_batch`); :mod:`anycnn.kernels.dispatch` offers each whole
convolution to the compiled kernels first, and names the formulations measured faster on a
namespace (:func:`~anycnn.kernels.dispatch.prefers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import array_api_extra as xpx
from array_api_compat import device

from ...backend import namespace_of
from ...kernels.dispatch import DECLINE, attempt, overridable, prefers
from ...kernels.threads import map_batch
from ..geometry import Pair, conv_output_size
from .primitives import add, add_relu, bias_relu, column_sums, pad_hw, take_rows
from .windows import Windows, gather_windows, pad_nhwc, scatter_windows


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
    return _conv_windows(tuple(in_hw), tuple(kernel), tuple(stride), tuple(pads),
                         tuple(dilation))


@lru_cache(maxsize=256)
def _conv_windows(in_hw: Pair, kernel: Pair, stride: Pair, pads: tuple, dilation: Pair) -> Windows:
    """:func:`conv_windows` of tuples, kept per geometry: a model has a few, and one Windows
    (immutable) per geometry keeps its hash and the caches keyed on it warm."""
    out = (conv_output_size(in_hw[0], kernel[0], stride[0], pads[0] + pads[1], dilation[0]),
           conv_output_size(in_hw[1], kernel[1], stride[1], pads[2] + pads[3], dilation[1]))
    return Windows(in_hw, kernel, stride, dilation, pads, out, kernel_first=False)


def is_depthwise(weight: Any, groups: int) -> bool:
    """True for a convolution with one input channel per group (``groups == C_in``): computed
    as a multiply-and-sum over the kernel taps instead of GEMMs (see :func:`conv_columns`)."""
    return groups > 1 and weight.shape[2] == 1


def conv2d_forward(x: Any, weight: Any, bias: Any, stride: Pair, pads, dilation: Pair,
                   groups: int = 1, addend: Any = None, relu: bool = False):
    """NHWC convolution (cross-correlation, as in PyTorch), optionally grouped, with an
    optional epilogue: ``relu(conv(x) + bias + addend)``.

    Args:
        x: ``(N, H, W, C_in)``; weight: ``(kh, kw, C_in/groups, C_out)``, output channels
            ``g*C_out/groups ...`` belonging to group ``g`` (PyTorch's rule); bias: ``(C_out,)``
            or None. pads: (top, bottom, left, right).
        addend: None, or an array shaped as the output (a residual sum's other path), added
            in the same pass (the compiled kernels start their sums from it).
        relu: apply ``max(., 0)`` to the result in the same pass.
    Returns:
        ``(y, ctx)`` with ``y`` of shape ``(N, Ho, Wo, C_out)``. The backward is that of the
        convolution alone (a ReLU's gradient is the caller's to apply first).
    """
    kh, kw, _, cout = weight.shape
    win = conv_windows(tuple(x.shape[1:3]), (kh, kw), stride, pads, dilation)
    xp = namespace_of(x, weight, bias, addend)
    epilogue = addend is not None or relu
    if epilogue:
        y = attempt("conv2d_epilogue", x, weight, bias, win, groups, addend, relu)
    else:
        y = attempt("conv2d", x, weight, bias, win, groups)
    if y is not DECLINE:
        return y, ConvCtx(x, win, groups)
    plus = None if addend is None else xp.reshape(addend, (x.shape[0], win.positions, cout))

    def chunk(a: int, b: int):
        y = conv2d_rows(x[a:b, ...], weight, win, groups)
        if not epilogue:
            return (y if bias is None else y + bias),
        if plus is None:
            return bias_relu(y, bias),
        return add_relu(y if bias is None else y + bias, plus[a:b, ...], relu),

    y, = map_batch(xp, x.shape[0], conv_chunk_bytes(win, weight, groups), chunk,
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


@overridable
def conv_input_grad(d: Any, weight: Any, win: Windows, groups: int = 1) -> Any:
    """Input gradient ``(N, H, W, C_in)`` of :func:`conv2d_rows` for row gradients ``d``
    (N, P, C_out): one GEMM (per group) into the column gradient, then the col2im gather;
    depthwise: slice-adds per kernel tap. It is also a transposed convolution's forward pass.
    A dispatch point (the compiled kernel of :mod:`anycnn.kernels.native_narrow` takes few
    input channels)."""
    xp = namespace_of(d, weight)
    kh, kw, cg, cout = weight.shape
    n = d.shape[0]
    if is_depthwise(weight, groups):
        return _depthwise_input_grad(d, weight, win, groups)
    back = (_backward_windows(win, weight, groups)
            if prefers("input_grad_by_convolution", d, weight) else None)
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
    """:func:`conv_input_grad` of a stride-1 convolution as the convolution of the output
    gradient with the kernel flipped in space, in and out channels swapped: one gather of
    ``dy`` and one GEMM (inner size kh*kw*C_out) instead of the GEMM into the column gradient
    (inner size C_out), its col2im gather and the sum over the taps. The same sums up to
    rounding; used where measured faster (``prefers("input_grad_by_convolution")``)."""
    xp = namespace_of(d, weight)
    n, cout = d.shape[0], weight.shape[3]
    dy = xp.reshape(d, (n, *win.out, cout))
    rows = columns_times_weight(window_columns(dy, back), adjoint_weight(weight), back)
    return xp.reshape(rows, (n, *win.in_hw, weight.shape[2]))


def adjoint_weight(weight: Any) -> Any:
    """The weight ``(kh, kw, C_out, C_in)`` of the stride-1 convolution that carries a
    convolution's output gradient back to its input: ``weight`` ``(kh, kw, C_in, C_out)``
    flipped in space, its channel axes swapped."""
    xp = namespace_of(weight)
    return xp.permute_dims(xp.flip(weight, axis=(0, 1)), (0, 1, 3, 2))


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

    Consumes ``ctx`` (what it saved is released). See :func:`conv2d_grads`.
    """
    ctx = consume(ctx)
    xp = namespace_of(dy, weight)
    dy = xp.reshape(dy, (ctx.x.shape[0], *ctx.win.out, weight.shape[-1]))
    return conv2d_grads(dy, ctx.x, weight, ctx.win, ctx.groups, need_input_grad, bias_grad,
                        addend)


def conv2d_grads(dy: Any, x: Any, weight: Any, win: Windows, groups: int,
                 need_input_grad: bool, bias_grad: bool, addend: Any = None):
    """``(dx or None, dweight, dbias or None)`` of a convolution over ``win`` for the output
    gradient ``dy`` (N, Ho, Wo, C_out) and its input ``x``; ``dx`` plus ``addend`` when one
    is given.

    The compiled kernels are offered the whole call first (``dy`` may then also be a fused
    block's pooled gradient, which they alone take); a kernel may leave the input gradient to
    the portable :func:`conv_input_grad`. The portable path runs a chunk of images at a time
    (:func:`conv2d_rows_backward`), so the column gradient, ``kh*kw`` times the input, never
    exists for the whole batch at once.
    """
    grads = attempt("conv2d_backward", dy, x, weight, win, groups, need_input_grad, bias_grad,
                    addend)
    if grads is not DECLINE:
        dx, dweight, dbias = grads
        if dx is DECLINE:  # the kernel left the input gradient to the portable path
            dx = _chunked_input_grad(dy, weight, win, groups)
            dx = dx if addend is None else add(dx, addend)
        return dx, dweight, dbias
    if addend is not None:
        dx, dw, db = conv2d_grads(dy, x, weight, win, groups, True, bias_grad)
        return add(dx, addend), dw, db
    if need_input_grad:  # a compiled kernel may take the whole input gradient (few channels)
        dx = attempt("conv2d_input_grad", dy, weight, win, groups)
        if dx is not DECLINE:
            return (dx, *conv2d_grads(dy, x, weight, win, groups, False, bias_grad)[1:])
    xp = namespace_of(dy, weight)
    n = x.shape[0]
    d = xp.reshape(dy, (n, win.positions, weight.shape[-1]))
    shifted = (_shifted_weight_grad_applies(win, weight, groups)
               and prefers("shifted_weight_grad", d, x))

    def chunk(a: int, b: int):
        if shifted:
            return _conv_backward_shifted(d[a:b, ...], x[a:b, ...], weight, win,
                                          need_input_grad, bias_grad)
        return conv2d_rows_backward(d[a:b, ...], conv_columns(x[a:b, ...], win, groups),
                                    weight, win, need_input_grad, bias_grad, groups)

    return map_batch(xp, n, conv_chunk_bytes(win, weight, groups), chunk, ("cat", "sum", "sum"),
                     COL2IM_CHUNK_BYTES if need_input_grad else None)


def _chunked_input_grad(dy: Any, weight: Any, win: Windows, groups: int) -> Any:
    """:func:`conv_input_grad` of the output gradient ``dy`` (N, Ho, Wo, C_out), or of a fused
    block's pooled gradient (which has ``unpooled``; unpooled a chunk at a time), a chunk of
    images at a time (:func:`~anycnn.kernels.threads.map_batch`: cache-sized chunks on the
    library's threads, each GEMM on a one-thread BLAS): the input gradient a compiled kernel
    left to the portable path (measured for a 3 -> 16 channel first layer at batch 128, 32x32:
    30 ms over the whole batch on the calling thread, against 11). A compiled kernel for few
    input channels is offered the whole batch first (``conv2d_input_grad``)."""
    dx = attempt("conv2d_input_grad", dy, weight, win, groups)
    if dx is not DECLINE:
        return dx
    pooled = hasattr(dy, "unpooled")
    xp = namespace_of(dy.grad if pooled else dy, weight)
    n = (dy.grad if pooled else dy).shape[0]

    def chunk(a: int, b: int) -> tuple:
        d = dy.images(a, b).unpooled(win.out) if pooled else dy[a:b, ...]
        d = xp.reshape(d, (b - a, win.positions, weight.shape[-1]))
        return conv_input_grad(d, weight, win, groups),

    dx, = map_batch(xp, n, conv_chunk_bytes(win, weight, groups), chunk, ("cat",),
                    COL2IM_CHUNK_BYTES)
    return dx


#: the weight gradient by shifted GEMMs (no im2col) is used up to this C_in*C_out (NumPy):
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
    """Backward of a 'same' stride-1 convolution for images ``x`` (n, H, W, C_in) and
    row gradients ``d`` (n, P, C_out), without the input's im2col columns.

    The input padded by ``win.pads`` and the output gradient padded by ``k - 1 - pad`` are
    grids of one size (Hp, Wp); flattened over the chunk's images, tap (i, j)'s weight gradient
    is one GEMM ``x[g + off].T @ dy[g]`` between row ranges shifted by
    ``off = (i - k + 1 + top)*Wp + (j - k + 1 + left)`` (zeros in the padded gradient make the
    rows that wrap around a row or an image end count nothing). The padded gradient also gives
    the input gradient (:func:`_input_grad_by_convolution`'s windows). The same sums as the
    im2col path up to rounding; used where measured faster
    (``prefers("shifted_weight_grad")``)."""
    xp = namespace_of(d, x, weight)
    n, _, cout = d.shape
    kh, kw, cin, _ = weight.shape
    back = _backward_windows(win, weight, 1)
    hp, wp = back.padded
    grid = pad_hw(xp.reshape(d, (n, *win.out, cout)), back.pads, 0.0)
    g = xp.reshape(grid, (-1, cout))
    rows = xp.reshape(pad_hw(x, win.pads, 0.0), (-1, cin))
    bt, bl = back.pads[0], back.pads[2]
    lo = bt * wp + bl
    hi = (n - 1) * hp * wp + (win.out[0] - 1 + bt) * wp + win.out[1] + bl
    taps = [xp.matrix_transpose(rows[lo + off:hi + off, ...]) @ g[lo:hi, ...]
            for off in ((i - bt) * wp + (j - bl) for i in range(kh) for j in range(kw))]
    dweight = xp.reshape(xp.stack(taps), (kh, kw, cin, cout))
    dbias = column_sums(xp.reshape(d, (-1, cout))) if bias_grad else None
    dx = None
    if need_input_grad:
        cols = take_rows(xp.reshape(grid, (n, hp * wp, cout)), back.index(xp, device(d)))
        dx_rows = columns_times_weight(xp.reshape(cols, (n, back.positions, -1)),
                                       adjoint_weight(weight), back)
        dx = xp.reshape(dx_rows, (n, *win.in_hw, cin))
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

    y, = map_batch(xp, n, conv_chunk_bytes(win, conv_weight, groups), chunk, ("cat",),
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

    dx, dweight, dbias = map_batch(
        xp, n, conv_chunk_bytes(win, conv_weight, groups), chunk, ("cat", "sum", "sum"),
        COL2IM_CHUNK_BYTES)
    return (None if dx is None else xp.reshape(dx, x.shape)), dweight, dbias


# --------------------------------------------------------------------------------------------
# Pooling
