"""The compiled input gradient of a convolution with few input channels (NumPy, Halide).

A first layer (1 or 3 input channels, 6-32 output channels) has an input gradient with one to
three channels per pixel: :mod:`~anycnn.kernels.native`'s kernels, which hold output channels
in the vector lanes, would leave most lanes idle, and the portable path (a GEMM into the
column gradient, then the col2im gather and, under a fused max pool, the unpooled gradient
written first) cost up to 10x the layer's forward pass (measured at batch 64 on an Intel Xeon
with AVX-512, 2 threads: 1 -> 32 channels 3x3 under a fused pool 10.3 ms against 1.0; 3 -> 32
19.2 against 2.7; LeNet's 1 -> 6 5x5 2.6 against 2.6). Vectorising over pixels instead reads
the NHWC gradient with strided gathers (a prototype was 1.5-5x slower than the NumPy path).
Other layers with input channels that do not fill the vectors (LeNet's second layer, 6 -> 16)
gain too: see :data:`MAX_INPUT_CHANNELS`.

This kernel vectorises over the *reduction*. For each input pixel and channel ``ci``,

    dx[n, y, x, ci] = sum over ky, kx, co of
                      g[n, y + pt - ky, x + pl - kx, co] * w[ky, kx, ci, co]

(``pt``, ``pl``: the top and left padding) is a sum over the ``kh`` kernel rows of one
contiguous run of ``kw * C_out`` gradient entries (row ``y + pt - ky``, pixels
``x + pl - kw + 1 .. x + pl``, all channels) times that kernel row flipped: vectors of those
runs are multiplied into one vector accumulator per pixel, summed across its lanes once at the
end (``kh*kw*C_out / lanes`` multiply-adds and one horizontal sum per output value). A task is
:data:`ROWS_PER_TASK` rows of one image (on one thread, a whole small image: see
:data:`SERIAL_TASK_BYTES`), which first copies the rows of the gradient it reads, padded, into
its cache: the dense gradient, or under a fused ``Conv2D → ReLU → MaxPool2D``
block (:class:`~anycnn.kernels.native.Pooled`) the pooled gradient unpooled by its codes there,
so the unpooled gradient never reaches memory; a portable fused block's row gradient in
pool-plane order (pooling windows that tile the output) is put in raster order there too, one
vector of a pixel's channels at a time (a NumPy copy first, in runs of ``C_out`` entries, cost
0.22 against 0.18 ms for 32 images of LeNet's first layer, one thread).

- :func:`input_grad` — the kernel, for a dense gradient (N, Ho, Wo, C_out), a ``Pooled`` one,
  or rows (N, P, C_out) in the order of pooling windows tiling the output (``pool_order``);
- :func:`applies` — the layers it takes: NumPy float32/float64, no groups, stride 1, no
  dilation, top and left padding below the kernel size, at most :data:`MAX_INPUT_CHANNELS`
  input channels that do not fill a vector (those that do have
  :func:`~anycnn.kernels.native.conv2d_input_grad`);
- the dispatch kernels ``conv2d_input_grad`` (a whole batch's gradient, dense or pooled: a
  one-channel block's under a 2x2 pool is :mod:`~anycnn.kernels.native_stamp`'s, tried first) and
  ``conv_input_grad`` (a chunk's row gradient, in the windows' order, pool-ordered included) of
  :mod:`anycnn.nn.functional.conv`.

Under the switches of :mod:`~anycnn.kernels.native` (``ANYCNN_NATIVE=0``,
``ANYCNN_FASTPATH=0``), compiled once per machine (:mod:`~anycnn.kernels.kernel_cache`).
Results equal the portable path's up to rounding (``tests/test_native_narrow.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import kernel_cache, native, native_planar
from .dispatch import DECLINE, implements
from .threads import _region

#: output rows of one image per task
ROWS_PER_TASK = 8

#: a kernel run on one thread (inside a batch-parallel region) takes a whole image per task
#: when the task's padded gradient rows fit this many bytes (about an L1 data cache): fewer
#: rows copied twice at the tasks' edges. Measured on one thread, a 32-image chunk of LeNet's
#: training step, AVX-512: its 1 -> 6 5x5 (24 KiB) 0.144 ms against 0.156 with 8-row tasks;
#: its 6 -> 16 5x5 (20 KiB) 0.54 against 0.69
SERIAL_TASK_BYTES = 32 << 10

#: the most input channels this kernel takes (one accumulator per channel and pixel of a tile,
#: the channel loop unrolled); with more, they fill AVX-512's float32 vectors, or the layer is
#: wide. Measured faster than the portable path at every count tried (one thread, AVX-512):
#: LeNet's second layer, 6 -> 16 5x5 at 14x14 under a fused pool, 0.73 ms against 2.16 at
#: batch 64; with 32 images of gradient rows in pool-plane order (LeNet's first block's):
#: 1 -> 6 5x5 at 28x28 0.39 against 2.6; 6 -> 8 3x3 at 14x14 0.16 against 0.32; 8 -> 16 3x3 at
#: 28x28 0.94 against 7.8; 12 -> 16 3x3 at 14x14 0.34 against 5.1; 15 -> 32 0.80 against 2.8;
#: 24 -> 32 1.35 against 5.2
MAX_INPUT_CHANNELS = 16


def _tile(cin: int) -> int:
    """Pixels per register tile: 2 for one input channel, else 1 (each pixel holds one
    accumulator per input channel; the out-of-order core overlaps the pixels' chains of
    multiply-adds, and wider tiles or two accumulators per pixel were no faster, measured on
    one thread at batch 64, AVX-512: 1 -> 32 3x3 under a pool 0.54 ms against 0.61-0.85;
    3 -> 16 3x3 0.75 against 0.97-1.26; 3 -> 32 under a pool 1.53-1.61 either way)."""
    return 2 if cin == 1 else 1


@kernel_cache.pipeline
def _input_grad_pipeline(dtype: np.dtype, cin: int, cout: int, kernel: tuple[int, int],
                         lanes: int, source: str, window: tuple[int, int] | None,
                         pixel_tile: int, parallel: bool = True,
                         task_rows: int = ROWS_PER_TASK):
    """dx[ci, x, y, n] = sum over ky < kh and k < spans*lanes of
    grid[x*C + k, y + ky, n] * wf[k, ci, ky] (Halide's axes are NumPy's reversed): ``grid`` is
    the output gradient padded by (``top``, ``left``) = (kh - 1 - pad_top, kw - 1 - pad_left),
    flattened over (pixel, channel) (``dy``, NumPy (N, Ho, Wo*C_out)), or with ``window`` the
    gradient unpooled from ``dpool`` and ``code`` (4-D, read as [co, x + k // C, ...]: C_out
    is then a multiple of ``lanes``); ``wf`` is :func:`flipped_weight`. ``lanes`` entries of
    ``k`` are one vector; a task is ``task_rows`` rows of one image (:func:`_task_rows`)."""
    hl = native._halide()
    t = native._scalar_type(hl, dtype)
    kh, kw = kernel
    spans = -(-kw * cout // lanes)  # vectors of one kernel row (kw*C_out entries, zero-filled)
    top, left = hl.Param(hl.Int(32), "top"), hl.Param(hl.Int(32), "left")
    wf = hl.ImageParam(t, 3, "wf")
    f, c, x, y, n = (hl.Var(v) for v in ("f", "c", "x", "y", "n"))
    zero = hl.cast(t, 0)
    grid = hl.Func("grid")
    params = {"top": top, "left": left}
    if source == "dense":
        dy = hl.ImageParam(t, 3, "dy")
        images = {"dy": dy}
        width, height = dy.dim(0).extent(), dy.dim(1).extent()
        fs, ys = f - left * cout, y - top
        inside = (fs >= 0) & (ys >= 0) & (fs < width) & (ys < height)
        grid[f, y, n] = hl.select(inside, dy[hl.clamp(fs, 0, width - 1),
                                             hl.clamp(ys, 0, height - 1), n], zero)
        inner = f
    elif source == "poolorder":  # (pool tap, pooled position) rows of windows tiling the output
        ph, pw = window
        rows = hl.ImageParam(t, 5, "rows")  # [c, wq, hq, tap, n]
        images = {"rows": rows}
        height = rows.dim(2).extent() * ph
        grid[f, y, n] = zero
        rr = hl.RDom([hl.Range(0, cout), hl.Range(0, rows.dim(1).extent() * pw)])
        ys = hl.clamp(y - top, 0, height - 1)
        value = rows[rr.x, rr.y / pw, ys / ph, (ys % ph) * pw + rr.y % pw, n]
        grid[(rr.y + left) * cout + rr.x, y, n] = hl.select(
            (y - top >= 0) & (y - top < height), value, zero)
        inner = f
    else:
        unpooled, images, (width, height) = native._gradient_source(hl, t, window)
        xs, ys = x - left, y - top
        inside = (xs >= 0) & (ys >= 0) & (xs < width) & (ys < height)
        value = hl.Expr(unpooled[c, hl.clamp(xs, 0, width - 1), hl.clamp(ys, 0, height - 1),
                                 n])
        grid[c, x, y, n] = hl.select(inside, value, zero)
        inner = c
    lane, ci = hl.Var("lane"), hl.Var("ci")
    r = hl.RDom([hl.Range(0, spans), hl.Range(0, kh)])
    k = r.x * lanes + lane
    if source != "pooled":
        g = grid[x * cout + k, y + r.y, n]
    else:  # vector r.x of a row: channels (r.x % per)*lanes + lane of pixel x + r.x // per
        per = cout // lanes
        g = grid[(r.x % per) * lanes + lane, x + r.x / per, y + r.y, n]
    acc = hl.Func("acc")  # one vector per (ci, pixel)
    acc[lane, ci, x, y, n] = zero
    acc[lane, ci, x, y, n] += g * wf[k, ci, r.y]
    rl = hl.RDom([hl.Range(0, lanes)])
    total = hl.Func("total")  # its horizontal sum
    total[ci, x, y, n] = zero
    total[ci, x, y, n] += acc[rl, ci, x, y, n]
    out = hl.Func("dx")
    out[ci, x, y, n] = total[ci, x, y, n]

    yo, yi, xo, xi, task = (hl.Var(v) for v in ("yo", "yi", "xo", "xi", "task"))
    guard = hl.TailStrategy.GuardWithIf
    out.bound(ci, 0, cin)
    out.split(y, yo, yi, task_rows, guard).split(x, xo, xi, pixel_tile, guard)
    out.reorder(ci, xi, xo, yi, yo, n).unroll(ci).unroll(xi).fuse(yo, n, task)
    if parallel:
        out.parallel(task)
    grid.compute_at(out, task).vectorize(inner, lanes, guard)
    if source == "poolorder":
        rxo, rxi = hl.RVar("rxo"), hl.RVar("rxi")
        grid.update().allow_race_conditions().split(rr.y, rxo, rxi, window[1]).unroll(
            rxi).vectorize(rr.x)
    acc.compute_at(out, xo).vectorize(lane).unroll(ci).unroll(x)
    acc.update().reorder(lane, ci, x, r.x, r.y).vectorize(lane).unroll(ci).unroll(x)
    acc.update().unroll(r.x)
    if kh * spans <= 64:  # the kernel rows too (measured 10-20% faster at 3x3 and 5x5)
        acc.update().unroll(r.y)
    total.compute_at(out, xo).unroll(ci).unroll(x)
    total.update().reorder(rl, ci, x).atomic().vectorize(rl).unroll(ci).unroll(x)
    return out, {**images, "wf": wf}, params


def _task_rows(parallel: bool, in_hw: tuple[int, int], kernel: tuple[int, int], cout: int,
               itemsize: int) -> int:
    """Output rows per task: :data:`ROWS_PER_TASK`, or on one thread (not ``parallel``) the
    whole image (rounded up to a multiple of :data:`ROWS_PER_TASK`, so few variants compile)
    where its padded gradient fits :data:`SERIAL_TASK_BYTES`."""
    (h, w), (kh, kw) = in_hw, kernel
    if parallel or (h + kh - 1) * (w + kw - 1) * cout * itemsize > SERIAL_TASK_BYTES:
        return ROWS_PER_TASK
    return -(-h // ROWS_PER_TASK) * ROWS_PER_TASK


def flipped_weight(weight: np.ndarray, lanes: int) -> np.ndarray:
    """The kernel's weight operand ``(kh, C_in, spans*lanes)`` of ``weight``
    ``(kh, kw, C_in, C_out)``: ``wf[i, ci, u*C_out + co] = weight[kh-1-i, kw-1-u, ci, co]``
    (flipped in space, each kernel row's taps and channels as one run), zero past ``kw*C_out``
    up to whole vectors of ``lanes``."""
    kh, kw, cin, cout = weight.shape
    spans = -(-kw * cout // lanes)
    wf = np.zeros((kh, cin, spans * lanes), dtype=weight.dtype)
    wf[:, :, :kw * cout] = weight[::-1, ::-1].transpose(0, 2, 1, 3).reshape(kh, cin, kw * cout)
    return wf


def applies(dy: Any, weight: Any, win: Any, groups: int) -> bool:
    """Whether :func:`input_grad` computes this input gradient: NumPy arrays of one float dtype
    the kernels compile for (``dy`` an array or a :class:`~anycnn.kernels.native.Pooled`), the
    kernels on, an ungrouped stride-1 convolution without dilation, padding at the top and left
    below the kernel size, and 1 to :data:`MAX_INPUT_CHANNELS` input channels that do not fill
    a vector (:func:`~anycnn.kernels.native.input_grad_applies` takes those)."""
    grad = dy.grad if isinstance(dy, native.Pooled) else dy
    if not (isinstance(grad, np.ndarray) and isinstance(weight, np.ndarray)):
        return False
    kh, kw, cin, _ = weight.shape
    return (groups == 1 and tuple(win.stride) == (1, 1) and tuple(win.dilation) == (1, 1)
            and not win.kernel_first and 0 <= win.pads[0] < kh and 0 <= win.pads[2] < kw
            and grad.dtype == weight.dtype and native.available(np, grad.dtype)
            and cin <= MAX_INPUT_CHANNELS and not native.input_grad_applies(weight))


def input_grad(dy: np.ndarray | native.Pooled, weight: np.ndarray,
               pads: tuple[int, int, int, int], in_hw: tuple[int, int],
               pool_order: tuple | None = None, pooled_out: tuple | None = None) -> np.ndarray:
    """Input gradient ``(N, H, W, C_in)``, ``in_hw = (H, W)``, of the stride-1 convolution
    with ``weight`` ``(kh, kw, C_in, C_out)`` and ``pads`` (top, bottom, left, right; top and
    left below the kernel size), for its output gradient ``dy`` ``(N, Ho, Wo, C_out)`` or the
    :class:`~anycnn.kernels.native.Pooled` gradient of a fused block (unpooled inside the
    kernel, one task's rows at a time), or with ``pool_order`` (``((ph, pw), (ph, pw))``,
    windows tiling the output) and ``pooled_out`` (Hq, Wq) its rows (N, ph*pw*Hq*Wq, C_out)
    in (pool tap, pooled position) order, put in raster order inside the kernel."""
    kh, kw, cin, cout = weight.shape
    dtype = np.dtype(weight.dtype)
    lanes = native.vector_lanes(dtype)
    pooled = isinstance(dy, native.Pooled)
    n = (dy.grad if pooled else dy).shape[0]
    dx = np.empty((n, *in_hw, cin), dtype=dtype)
    if dx.size == 0:
        return dx
    scalars = {"top": kh - 1 - pads[0], "left": kw - 1 - pads[2]}
    if pooled:
        source, window, arrays = "pooled", tuple(dy.window), dy.arrays()
    elif pool_order is not None:
        source, window = "poolorder", tuple(pool_order[0])
        (ph, pw), (hq, wq) = window, pooled_out
        arrays = {"rows": native.operand(np.reshape(dy, (n, ph * pw, hq, wq, cout)))}
    else:
        source, window = "dense", None
        arrays = {"dy": native.operand(np.reshape(dy, (n, dy.shape[1], -1)))}
    parallel = not getattr(_region, "active", False)
    pipeline = _input_grad_pipeline(dtype, cin, cout, (kh, kw), lanes, source, window,
                                    _tile(cin), parallel,
                                    _task_rows(parallel, in_hw, (kh, kw), cout, dtype.itemsize))
    wf = flipped_weight(native.operand(weight), lanes)
    pipeline.run({**arrays, "wf": wf}, scalars, [dx])
    return dx


def _dense(d: np.ndarray, win: Any) -> np.ndarray:
    """The row gradient ``d`` (N, P, C_out) in ``win``'s order as the NHWC output gradient
    (N, Ho, Wo, C_out): a reshape, or under ``win.pool_order`` (disjoint pooling windows, rows
    in (pool tap, pooled position) order) one copy into the windows' places, zero outside any
    window. Used for windows with gaps: the kernel reads rows of windows that tile the output
    in place (``source="poolorder"``; a gather per vector there was slower than this copy, 0.50
    against 0.39 ms, 32 images, LeNet's 1 -> 6: the rows are scattered a pixel's channels at a
    time instead)."""
    n, _, c = d.shape
    if win.pool_order is None:
        return np.reshape(d, (n, *win.out, c))
    (ph, pw), (sh, sw) = win.pool_order
    hq, wq = win.pooled_out
    planes = np.reshape(d, (n, ph, pw, hq, wq, c)).transpose(0, 3, 1, 4, 2, 5)
    if (sh, sw) == (ph, pw) and (hq * ph, wq * pw) == tuple(win.out):
        return np.reshape(planes, (n, *win.out, c))  # the windows tile the output
    (ho, wo), span = win.out, (hq * sh, wq * sw)  # the last stride may reach past the output
    dense = np.zeros((n, max(ho, span[0]), max(wo, span[1]), c), dtype=d.dtype)
    places = dense[:, :span[0], :span[1]].reshape(n, hq, sh, wq, sw, c)
    places[:, :, :ph, :, :pw] = planes
    return dense[:, :ho, :wo]


# --------------------------------------------------------------------------------------------
# Dispatch kernels (anycnn.nn.functional.conv)


@implements("conv2d_input_grad")
def conv2d_input_grad_kernel(dy: Any, weight: Any, win: Any, groups: int) -> Any:
    """The input gradient of a convolution over ``win`` for its whole output gradient ``dy``
    (N, Ho, Wo, C_out), or a fused block's ``Pooled`` gradient, when :func:`applies`; else
    :data:`~anycnn.kernels.dispatch.DECLINE`."""
    if (not applies(dy, weight, win, groups) or win.pool_order is not None
            or (not isinstance(dy, native.Pooled) and dy.ndim != 4)):
        return DECLINE
    return input_grad(dy, weight, win.pads, win.in_hw)


@implements("conv_input_grad")
def conv_input_grad_kernel(d: Any, weight: Any, win: Any, groups: int = 1) -> Any:
    """:func:`anycnn.nn.functional.conv.conv_input_grad` of row gradients ``d``
    (N, P, C_out) in ``win``'s order (pool-ordered ones made dense first, :func:`_dense`),
    when :func:`applies`; else :data:`~anycnn.kernels.dispatch.DECLINE`."""
    if not applies(d, weight, win, groups) or d.ndim != 3:
        return DECLINE
    if native_planar.applies(d, weight, win, groups):  # one input channel: over pixels
        return native_planar.input_grad(d, weight, win, not getattr(_region, "active", False))
    if _tiles(win):  # read in place (copied into each task's padded rows)
        return input_grad(d, weight, win.pads, win.in_hw, win.pool_order, win.pooled_out)
    return input_grad(_dense(d, win), weight, win.pads, win.in_hw)


def _tiles(win: Any) -> bool:
    """Whether ``win`` orders its rows by pooling windows that tile the output (kernel
    equal to stride, no output position outside a window)."""
    if win.pool_order is None:
        return False
    (ph, pw), (sh, sw) = win.pool_order
    hq, wq = win.pooled_out
    return ((sh, sw) == (ph, pw) and (hq * ph, wq * pw) == tuple(win.out)
            and win.pads[3] < win.kernel[1])
