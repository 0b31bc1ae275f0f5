"""Compiled convolution kernels for NumPy arrays (Halide, built once per machine).

(BatchNorm's passes are compiled the same way, in :mod:`anycnn.kernels.native_norm`, under the
same switches.) The kernels at the end of this module register with :mod:`anycnn.kernels.dispatch`
for the portable convolutions of :mod:`anycnn.nn.functional.conv`, which they compute or decline.

The portable convolution is an im2col gather and one GEMM. On a CPU the gather, the GEMM's
skinny shapes (16-64 output channels) and the passes between them cost 2-3x what a direct
convolution costs. These kernels are direct convolutions: each computes a tile of output pixels
by output channels in vector registers, reading the NHWC input and the weights in place.

- :func:`conv2d` — forward ``(N, Ho, Wo, C_out)`` of an NHWC input, padded inside the kernel
  (any kernel size and stride, no dilation, no groups).
- :func:`conv2d_input_grad` — the input gradient, as the same kernel over the output gradient
  (padded) with the kernel flipped and its channels swapped; at a stride above 1, one such
  stride-1 kernel per phase of the input grid (for kernels at least as wide as the stride;
  else over the gradient spread out by the stride). Its sums can start from an ``addend`` (a
  residual block's other gradient), so that sum costs no pass of its own.
- :func:`conv2d_weight_grad` — ``(kh, kw, C_in, C_out)`` weight gradient, summed over images in
  cache-sized groups on all threads, then over the groups in a fixed order.
- :func:`conv2d_relu_maxpool` — a ``Conv2D → ReLU → MaxPool2D`` block whose pooling windows
  tile the output, as one kernel: each task computes its rows of the convolution into the
  cache and writes only the pooled output and a one-byte code per output (which tap was the
  maximum, or none where the ReLU is off). Both gradient kernels take the pooled gradient and
  the codes (:class:`Pooled`) and unpool them inside their tasks: the convolution's output and
  its gradient never reach memory.
- :func:`conv2d_epilogue` — :func:`conv2d` with a residual ``addend`` its sums start from and
  a ReLU applied to its tiles (eval mode's fused steps, :mod:`anycnn.nn.inference`).

Most 3x3 stride-1 layers run as Winograd convolutions instead, forward and both gradients
(:mod:`~anycnn.kernels.native_winograd`: its ``suits`` and ``weight_grad_tiling`` say where;
``ANYCNN_WINOGRAD=0`` keeps these direct kernels).

They are used for float32 and float64 NumPy arrays when the ``halide`` package is installed
(a dependency on the platforms it has wheels for; ``anycnn info`` says whether they are on),
unless ``ANYCNN_FASTPATH=0`` (every NumPy fast path off) or ``ANYCNN_NATIVE=0`` (only these
kernels off). Results equal the portable path's up to rounding (the sums run in another
order); ``tests/test_native.py`` compares the two. Each pipeline is compiled for one layer
geometry (channels, kernel size, stride: constants in its register tiles) once per machine
(0.1-0.8 s) and kept on disk (:mod:`~anycnn.kernels.kernel_cache`; once per process where no C
compiler links them). The kernels run on Halide's own thread pool, sized to
``ANYCNN_NUM_THREADS`` (or the usable CPUs) when it starts.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, NamedTuple

import numpy as np

from . import fastpath, kernel_cache, native_sum, threads
from .dispatch import DECLINE, implements

#: the dtypes the kernels compile for
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class Registers(NamedTuple):
    """The vector registers of the CPU Halide compiles for: they shape the register tiles (the
    kernels are correct with any tiles)."""

    bits: int   # one register: 512 with AVX-512, 256 with AVX2, 128 with NEON
    count: int  # how many: 32 with AVX-512 and NEON, 16 with AVX2


@functools.cache
def registers() -> Registers:
    """The host's :class:`Registers`, from Halide's host target (recorded in the kernel cache:
    see :func:`~anycnn.kernels.kernel_cache.host_target`). Tiles sized for AVX-512's 32
    registers spill on an AVX2 CPU's 16 (measured on an AMD EPYC without AVX-512: resnet20's
    training step 1.22x PyTorch eager with them)."""
    arch, *features = kernel_cache.host_target().split("-")
    if "avx512" in features:
        return Registers(512, 32)
    if arch == "arm":
        return Registers(128, 32)
    if "avx" in features:
        return Registers(256, 16)
    return Registers(128, 16)


@functools.cache
def halved_vectors() -> bool:
    """Whether the CPU runs each 512-bit vector operation as two 256-bit halves (AMD Zen 4:
    Halide's target feature ``avx512_zen4`` without ``avx512_zen5``), which changes the best
    tile of one vector of channels of the forward and input-gradient kernels
    (:func:`_pixel_tile`). Keyed off the target's features, never a CPU name; no other tile
    depends on it."""
    features = kernel_cache.host_target().split("-")[1:]
    return "avx512_zen4" in features and "avx512_zen5" not in features


#: :func:`vector_lanes` by (registers, dtype as given): a dict look-up, not a dtype
#: conversion, on every kernel's checks
_LANES: dict[tuple, int] = {}


def vector_lanes(dtype: Any) -> int:
    """Elements of ``dtype`` in one vector register (call once the kernels are available)."""
    key = (registers(), dtype)
    lanes = _LANES.get(key)
    if lanes is None:
        lanes = _LANES[key] = key[0].bits // (8 * np.dtype(dtype).itemsize)
    return lanes


def _most_tile_rows() -> int:
    """Rows a register tile holds at most, each row 2 vectors of output channels: 8 (16
    accumulators) with 32 registers, 6 (12) with 16, which leaves room for the weights and the
    broadcast operand. A row is an output pixel in the forward and input-gradient kernels and
    an input channel in the weight-gradient kernel."""
    return 8 if registers().count >= 32 else 6

#: images summed into one weight-gradient part, at least (their input and gradient stay in the
#: L2 cache) ...
WEIGHT_GRAD_IMAGES = 4
#: ... and at least this many output pixels, while there are 8 parts or more (measured at 8x8
#: pixels, 64 channels: 16 images a part 15% faster than 4; no gain from more at 16x16 and up)
WEIGHT_GRAD_PIXELS = 1024

#: whether the kernels are on; None: read ``ANYCNN_NATIVE`` and look for halide at first use
ENABLED: bool | None = None



def _off_reason() -> str | None:
    """Why the environment keeps these kernels off (``ANYCNN_NATIVE=0``, no halide), or None."""
    if os.environ.get("ANYCNN_NATIVE", "1") == "0":
        return "ANYCNN_NATIVE=0"
    if importlib.util.find_spec("halide") is None:
        return "halide is not installed: pip install halide"
    return None


def available(xp: Any, dtype: Any = None) -> bool:
    """True when the compiled kernels apply to namespace ``xp`` (and ``dtype``, if given)."""
    global ENABLED
    if ENABLED is None:
        ENABLED = _off_reason() is None
    if not (ENABLED and (threads.switched_on() if xp is np else threads.enabled(xp))):
        return False
    return dtype is None or dtype in DTYPES or np.dtype(dtype) in DTYPES


def describe() -> str:
    """One line for ``anycnn info``: whether the compiled kernels are on, and why not."""
    if os.environ.get("ANYCNN_FASTPATH", "1") == "0":
        return "off (ANYCNN_FASTPATH=0)"
    why = _off_reason()
    if why:
        return f"off ({why})"
    return f"on (halide, {threads.num_threads()} threads; {kernel_cache.describe()})"


def applies(x: Any, weight: Any, stride: tuple[int, int], pads: tuple[int, int, int, int],
            dilation: tuple[int, int], groups: int) -> bool:
    """Whether these kernels compute this convolution, forward and backward: NumPy arrays of
    one float dtype, no groups, no dilation, one stride for both axes, and padding within the
    kernel's reach (so the input gradient is a convolution too)."""
    if not (isinstance(x, np.ndarray) and isinstance(weight, np.ndarray)):
        return False
    kh, kw = weight.shape[:2]
    top, bottom, left, right = pads
    return (groups == 1 and tuple(dilation) == (1, 1) and stride[0] == stride[1]
            and x.dtype == weight.dtype and max(top, bottom) < kh and max(left, right) < kw
            and available(np, x.dtype) and channels_fill_vectors(weight.shape[3], x.dtype))


def channels_fill_vectors(channels: int, dtype: Any) -> bool:
    """Whether ``channels`` output channels fill whole vector registers of ``dtype``: the
    kernels tile over output channels, and a tile with a guarded tail is slower than the NumPy
    path (measured at batch 64 with AVX-512, float32: 1 -> 6 channels 5x5 at 28x28, forward
    4.7 ms against 2.2; 8 -> 8 3x3, 12.6 against 2.5 forward, 15.4 against 4.1 weight gradient),
    while every shape whose channels fill the vectors was faster than the NumPy path (1.1-5x,
    forward and both gradients, 16 to 64 channels, 8x8 to 32x32 pixels). Narrow layers are
    left to the NumPy path."""
    return channels % vector_lanes(dtype) == 0


def _halide():
    import halide

    return halide


def _scalar_type(hl, dtype: np.dtype):
    """Halide's float type for NumPy ``dtype``."""
    return hl.Float(8 * dtype.itemsize)


def operand(a: Any, dtype: Any = None) -> np.ndarray:
    """``a`` as a kernel reads it: C-contiguous (and of ``dtype``), and writeable (a Halide
    ``Buffer`` refuses read-only arrays: those are copied). The caller must hold the result
    until the kernel has run: a ``Buffer`` does not keep its array alive."""
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if a.flags.writeable else a.copy()


def _tiles(dtype: np.dtype, cout: int) -> tuple[int, int, bool]:
    """(output channels per tile, vector lanes, whether the last tile needs a guard): two
    vectors of channels when they divide C_out. A guarded tile costs 2.5x (measured): it is
    used only when C_out is no multiple of the lanes."""
    vector = vector_lanes(dtype)
    tile = 2 * vector if cout % (2 * vector) == 0 else vector
    return tile, vector, cout % tile != 0


def _pixel_tile(width: int, vectors: int = 2, halved: bool = False) -> int:
    """Output pixels per register tile for output rows of ``width`` and tiles of ``vectors``
    vectors of channels: with 32 registers 8 for two vectors (the best of 4-16, measured for
    16, 32 and 64 channels) and 16 for one (16 accumulators in flight: 16 channels 3x3 at
    32x32 10-20% faster than 8, measured on an Intel Xeon), or the largest tile down to 3/4
    of that which divides the row (no overlapping last tile: 10-14% faster at widths 14 and
    28, measured); with 16 registers 6 (see :func:`_most_tile_rows`). With ``halved`` (a CPU
    of :func:`halved_vectors`), 8 for one vector too: on an AMD Zen 4, resnet20's 16 channels
    3x3 at 32x32 (batch 64, one thread) took 3.5 against 4.0 ms forward with a residual addend
    and 3.3 against 3.4 without; its input gradient 3.5 against 4.1 ms with the residual
    gradient as addend, 3.3 against 3.5 without (medians of interleaved runs)."""
    most = _most_tile_rows()
    if vectors == 1 and registers().count >= 32 and not halved:
        most *= 2
    if width <= most:
        return width
    return next((t for t in range(most, most * 3 // 4 - 1, -1) if width % t == 0), most)


def _divisor_tile(size: int, most: int) -> int:
    """The largest tile of at most ``most`` that divides ``size`` (no guarded tail)."""
    return next(t for t in range(min(most, size), 0, -1) if size % t == 0)


def _spread_padded(hl, source, extent: tuple, spread: int, top, left):
    """The Func of ``source`` (c, x, y, n) of ``extent`` (width, height) spread out
    ``spread - 1`` zeros apart in x and y and shifted by (left, top), zero outside: the padded
    input of a convolution (spread 1) or the output gradient as its input gradient's convolution
    reads it (spread = stride)."""
    c, x, y, n = (hl.Var(v) for v in ("c", "x", "y", "n"))
    xs, ys = x - left, y - top
    w, h = extent
    inside = (xs >= 0) & (ys >= 0) & (xs < w * spread) & (ys < h * spread)
    if spread > 1:
        inside = inside & (xs % spread == 0) & (ys % spread == 0)
    value = source[c, hl.clamp(xs // spread, 0, w - 1), hl.clamp(ys // spread, 0, h - 1), n]
    value = value if isinstance(value, hl.Expr) else hl.Expr(value)  # a Func's FuncRef
    grid = hl.Func("grid")
    grid[c, x, y, n] = hl.select(inside, value, hl.cast(value.type(), 0))
    return grid, c


def _gradient_source(hl, t, window: tuple[int, int] | None) -> tuple:
    """The output gradient a backward kernel reads, ``(source, params, (width, height))``:
    the ImageParam ``dy`` (c, x, y, n), or for a fused ReLU and ``window`` max pool the Func
    unpooling ``dpool`` (the pooled gradient) by ``code`` (:func:`conv2d_relu_maxpool`): the
    gradient of the convolution's output, zero past the last whole window."""
    if window is None:
        dy = hl.ImageParam(t, 4, "dy")
        return dy, {"dy": dy}, (dy.dim(1).extent(), dy.dim(2).extent())
    ph, pw = window
    grad, code = hl.ImageParam(t, 4, "dpool"), hl.ImageParam(hl.UInt(8), 4, "code")
    c, x, y, n = (hl.Var(v) for v in ("c", "x", "y", "n"))
    tap = hl.cast(hl.UInt(8), (y % ph) * pw + x % pw)
    source = hl.Func("unpooled")
    source[c, x, y, n] = hl.select(code[c, x // pw, y // ph, n] == tap,
                                   grad[c, x // pw, y // ph, n], hl.cast(t, 0))
    return source, {"dpool": grad, "code": code}, (grad.dim(1).extent() * pw,
                                                   grad.dim(2).extent() * ph)


def _convolution(hl, t, grid, start, geometry: tuple[int, int, int, int, int],
                 adjoint: tuple[int, int, int, int, int] | None = None):
    """``(out, acc, rdom, (co, x, y, n), ImageParams, Params)`` of the convolution
    out[co, x, y, n] = start(co, x, y, n) + sum over (ci, j, i) of
    grid[ci, x*stride + j, y*stride + i, n] * wt[co, ci, j, i] (Halide's axes are NumPy's
    reversed), for ``geometry`` (C_in, C_out, kh, kw, stride) known when it compiles: the
    weights' layout, the reduction's extents and the stride are constants, so every operand of
    a register tile is a fixed offset from a few pointers (with them as run-time values the
    tile loops spilled their pointers to the stack at every tap).

    With ``adjoint`` (KH, KW, last row, last column, step), the ImageParam ``wt`` is the
    weight (KH, KW, C_out, C_in) in NumPy's order of the convolution whose input gradient this
    is (C_in and C_out as ``geometry`` names them here), and ``wt`` above is its taps
    ``(last row - step*i, last column - step*j)`` (flipped in space: all of them for
    ``(kh, kw, kh - 1, kw - 1, 1)``) with its channel axes swapped, computed once per call into
    a buffer of constant shape: no copy of the weight in Python (a NumPy copy per backward
    cost 20-70 us per layer in resnet20's step, measured)."""
    cin, cout, kh, kw, stride = geometry
    param = hl.ImageParam(t, 4, "wt")
    step = 1
    for d, extent in enumerate((cin, cout, *adjoint[1::-1]) if adjoint else (cout, cin, kw, kh)):
        param.dim(d).set_bounds(0, extent).set_stride(step)
        step *= extent
    co, x, y, n = hl.Var("co"), hl.Var("x"), hl.Var("y"), hl.Var("n")
    if adjoint:
        ci, j, i = hl.Var("ci"), hl.Var("j"), hl.Var("i")
        last_row, last_column, spacing = adjoint[2:]
        wt = hl.Func("adjoint")
        wt[co, ci, j, i] = param[ci, co, last_column - spacing * j, last_row - spacing * i]
        wt.bound(co, 0, cout).bound(ci, 0, cin).bound(j, 0, kw).bound(i, 0, kh)
        wt.compute_root()
    else:
        wt = param
    r = hl.RDom([hl.Range(0, cin), hl.Range(0, kw), hl.Range(0, kh)])
    acc = hl.Func("acc")
    acc[co, x, y, n] = start(co, x, y, n)
    acc[co, x, y, n] += grid[r.x, x * stride + r.y, y * stride + r.z, n] * wt[co, r.x, r.y, r.z]
    out = hl.Func("conv")
    out[co, x, y, n] = acc[co, x, y, n]
    return out, acc, r, (co, x, y, n), {"wt": param}, {}


#: the most kernel taps a register tile's step unrolls (a larger kernel's rows are a loop)
MOST_TAPS_UNROLLED = 25


def _register_tiles(hl, out, acc, r, loop, tiling: tuple, taps: int) -> tuple:
    """Schedule ``out`` (and ``acc`` inside it) as register tiles of ``pixel_tile`` pixels by
    ``channel_tile`` channels; the reduction runs over the input channels, each step all the
    kernel's taps unrolled (a fixed offset from the tile's pointers, the geometry being known
    when it compiles: 5-15% faster than 4 input channels unrolled inside a loop over the taps,
    measured for 3-64 channels 3x3; a row of taps at a time for kernels of more than
    :data:`MOST_TAPS_UNROLLED` taps); returns the loops outside the tiles, innermost first:
    (coo, xo)."""
    channel_tile, lanes, guard, pixel_tile = tiling
    co, x = loop[0], loop[1]
    xo, xi, coo, coi, cu, cv = (hl.Var(v) for v in ("xo", "xi", "coo", "coi", "cu", "cv"))
    tail = hl.TailStrategy.GuardWithIf if guard else hl.TailStrategy.Auto
    out.split(co, coo, coi, channel_tile, tail).split(x, xo, xi, pixel_tile)
    out.vectorize(coi, lanes).unroll(xi)
    acc.compute_at(out, coo).split(co, cu, cv, lanes, tail).reorder(cv, cu, x)
    acc.vectorize(cv).unroll(cu).unroll(x)
    acc.update().split(co, cu, cv, lanes, tail).reorder(cv, cu, x, r.y, r.z, r.x)
    acc.update().vectorize(cv).unroll(cu).unroll(x).unroll(r.y)
    if taps <= MOST_TAPS_UNROLLED:
        acc.update().unroll(r.z)
    return coo, coi, xo, xi


#: output rows of one image per task of the forward kernel
ROWS_PER_TASK = 8


@kernel_cache.pipeline
def _forward_pipeline(dtype: np.dtype, tiling: tuple, geometry: tuple, spread: int,
                      unpool: tuple[int, int] | None, pool: tuple[int, int] | None,
                      addend: bool, relu: bool = False, codes: bool = True,
                      adjoint: tuple[int, int, int, int, int] | None = None):
    """The convolution of :func:`_convolution` over ``grid`` = :func:`_spread_padded` of the
    input ``inp`` (or, with ``unpool``, of :func:`_gradient_source`: an input gradient's
    kernel reading a pooled gradient), plus ``bias`` (with ``addend``, plus the array
    ``addend`` shaped as the output and ``bias``); a task is :data:`ROWS_PER_TASK` rows of one
    image, which pads its own input rows. With ``relu`` (and no ``pool``), ``max(., 0)`` of
    that in the same tile, a NaN kept (:func:`conv2d_epilogue`). With ``pool`` (ph, pw), the
    output is the pair (relu(max over each ph x pw window + bias), code): see
    :func:`conv2d_relu_maxpool`; without ``codes``, the pooled output alone (an inference's
    block, which no backward follows). With ``adjoint``, the weight is that of the convolution
    whose input gradient this is (see :func:`_convolution`)."""
    hl = _halide()
    t = _scalar_type(hl, dtype)
    top, left = hl.Param(hl.Int(32), "top"), hl.Param(hl.Int(32), "left")
    if unpool is None:
        inp = hl.ImageParam(t, 4, "inp")
        source, images, extent = inp, {"inp": inp}, (inp.dim(1).extent(), inp.dim(2).extent())
    else:
        source, images, extent = _gradient_source(hl, t, unpool)
    # a forward 1x1 kernel has no padding (see :func:`applies`): its tiles read the input in
    # place, no padded copy of its rows (at stride 2 that copy was 4x the pixels read: 35%
    # of resnet20's 16->32 shortcut kernel, measured)
    direct = geometry[2:4] == (1, 1) and spread == 1 and unpool is None and adjoint is None
    grid, gc = (source, None) if direct else _spread_padded(hl, source, extent, spread, top,
                                                              left)
    bias, plus = hl.ImageParam(t, 1, "bias"), hl.ImageParam(t, 4, "addend")
    if addend:
        images["addend"] = plus

    def start(co, x, y, n):
        """Where each output's sum starts: the addend plus the bias (a zero bias for an input
        gradient's sums), or the bias (zero under a pool: the bias is added to the window's
        maximum)."""
        if addend:
            return plus[co, x, y, n] + bias[co]
        return hl.cast(t, 0) if pool else bias[co]

    conv, acc, r, loop, weights, scalars = _convolution(hl, t, grid, start, geometry, adjoint)
    co, x, y, n = loop
    yo, yi, task = hl.Var("yo"), hl.Var("yi"), hl.Var("task")
    taps = geometry[2] * geometry[3]
    if pool is None:
        out = _relu(hl, conv, loop) if relu else conv
        coo, coi, xo, xi = _register_tiles(hl, out, acc, r, loop, tiling, taps)
        out.split(y, yo, yi, ROWS_PER_TASK, hl.TailStrategy.GuardWithIf)
        out.reorder(coi, xi, coo, xo, yi, yo, n)
    else:
        out = _pooled(hl, conv, bias, pool, loop, codes)
        out.split(y, yo, yi, max(1, ROWS_PER_TASK // pool[0]), hl.TailStrategy.GuardWithIf)
        out.reorder(co, x, yi, yo, n).vectorize(co, tiling[1], hl.TailStrategy.GuardWithIf)
        coo, coi, xo, xi = _register_tiles(hl, conv, acc, r, loop, tiling, taps)
        conv.reorder(coi, xi, coo, xo, y, n).compute_at(out, task)
    out.fuse(yo, n, task).parallel(task)
    if direct:
        return out, {**images, **weights, "bias": bias}, {**scalars, "top": top, "left": left}
    # the padded input rows of a task, vectors of channels; with one input channel (a first
    # layer) vectors of pixels instead (channels would leave a scalar loop: 20% of simple-cnn's
    # first Conv-ReLU-MaxPool kernel, measured)
    across = grid.args()[1] if geometry[0] == 1 else gc
    grid.compute_at(out, task).vectorize(across, tiling[1], hl.TailStrategy.GuardWithIf)
    return out, {**images, **weights, "bias": bias}, {**scalars, "top": top, "left": left}


def _relu_of(hl, z):
    """``max(z, 0)`` of an Expr, a NaN kept (as NumPy's ``maximum``)."""
    zero = hl.cast(z.type(), 0)
    return hl.select(z > zero, z, hl.select(hl.is_nan(z), z, zero))


def _relu(hl, conv, loop):
    """``max(conv, 0)`` as a Func over ``loop`` (:func:`_relu_of`); ``conv`` is inlined into it,
    so the ReLU is applied to each register tile."""
    co, x, y, n = loop
    out = hl.Func("relu")
    out[co, x, y, n] = _relu_of(hl, hl.Expr(conv[co, x, y, n]))
    return out


#: the code of a pooled output whose ReLU is off (no gradient reaches any of its window)
DEAD = 255


def _pool_window(hl, taps: list, bias) -> tuple:
    """``(relu(max + bias), code)`` of one pooling window from its ``taps``' values (Exprs,
    row-major): ``code`` is the first tap holding the maximum, or :data:`DEAD` where the ReLU
    is off. A NaN in a window is its maximum (the first NaN), as in NumPy."""
    best, code = taps[0], hl.cast(hl.UInt(8), 0)
    for k, value in enumerate(taps[1:], 1):
        take = (value > best) | (hl.is_nan(value) & ~hl.is_nan(best))
        best = hl.select(take, value, best)
        code = hl.select(take, hl.cast(hl.UInt(8), k), code)
    z = best + bias
    return _relu_of(hl, z), hl.select(z > hl.cast(z.type(), 0), code,
                                      hl.cast(hl.UInt(8), DEAD))


def _pooled(hl, conv, bias, pool: tuple[int, int], loop, codes: bool = True):
    """(relu(max + bias), code) over the ``pool`` (ph, pw) windows of ``conv``
    (:func:`_pool_window`). Without ``codes``, the first item alone."""
    co, x, y, n = loop
    ph, pw = pool
    taps = [hl.Expr(conv[co, x * pw + k % pw, y * ph + k // pw, n]) for k in range(ph * pw)]
    value, code = _pool_window(hl, taps, bias[co])
    out = hl.Func("pooled")
    out[co, x, y, n] = hl.Tuple([value, code]) if codes else value
    return out


@kernel_cache.pipeline
def _weight_grad_pipeline(dtype: np.dtype, channel_tile: int, lanes: int, guard: bool,
                          in_tile: int, unpool: tuple[int, int] | None,
                          geometry: tuple[int, int, int, int, int], tap_axes: int = 0):
    """part[co, ci, j, i, g] = sum over images g*G .. g*G+G-1 (G = the ``images`` parameter) and
    output pixels of grid[ci, x*s + j, y*s + i, n] * dy[co, x, y, n] (``grid``:
    :func:`_spread_padded` of the input; ``dy``: :func:`_gradient_source`, unpooled once per
    task with ``unpool``): tiles of ``in_tile`` input channels by ``channel_tile`` output
    channels accumulated in registers (and, for ``tap_axes`` 1 or 2, by a row of the kernel's
    taps or all of them, each a row of the tile too, where the input channels are few); a task
    is one group of images, which pads its own input (measured as fast as a padded copy on one
    thread, and parallel). ``geometry`` (C_in, C_out, kh, kw, stride) is known when it compiles."""
    hl = _halide()
    t = _scalar_type(hl, dtype)
    inp = hl.ImageParam(t, 4, "inp")
    dy, images_in, (width, height) = _gradient_source(hl, t, unpool)
    cin, cout, kh, kw, stride = geometry
    images = hl.Param(hl.Int(32), "images")
    top, left = hl.Param(hl.Int(32), "top"), hl.Param(hl.Int(32), "left")
    grid, gc = _spread_padded(hl, inp, (inp.dim(1).extent(), inp.dim(2).extent()), 1, top,
                              left)
    co, ci, j, i, g = (hl.Var(v) for v in ("co", "ci", "j", "i", "g"))
    r = hl.RDom([hl.Range(0, width), hl.Range(0, height), hl.Range(0, images)])
    acc = hl.Func("acc")
    acc[co, ci, j, i, g] = hl.cast(t, 0)
    img = g * images + r.z
    acc[co, ci, j, i, g] += (grid[ci, r.x * stride + j, r.y * stride + i, img]
                             * dy[co, r.x, r.y, img])
    part = hl.Func("part")
    part[co, ci, j, i, g] = acc[co, ci, j, i, g]
    part.output_buffer().dim(0).set_bounds(0, cout)  # constant offsets in the tiles
    part.output_buffer().dim(1).set_bounds(0, cin).set_stride(cout)
    part.output_buffer().dim(2).set_bounds(0, kw).set_stride(cout * cin)
    part.output_buffer().dim(3).set_bounds(0, kh).set_stride(cout * cin * kw)
    inp.dim(0).set_bounds(0, cin)

    coo, coi, cio, cii, cu, cv = (hl.Var(v) for v in ("coo", "coi", "cio", "cii", "cu", "cv"))
    tail = hl.TailStrategy.GuardWithIf if guard else hl.TailStrategy.Auto
    part.split(co, coo, coi, channel_tile, tail).split(ci, cio, cii, in_tile)
    taps = [j, i][:tap_axes]  # the taps in a tile
    outer = [j, i][tap_axes:]
    part.reorder(coi, cii, *taps, coo, cio, *outer, g).vectorize(coi, lanes).unroll(cii)
    part.parallel(g)
    for v in taps:
        part.unroll(v)
    grid.compute_at(part, g).vectorize(gc, lanes, hl.TailStrategy.GuardWithIf)
    if unpool is not None:
        dy.compute_at(part, g).vectorize(dy.args()[0], lanes, hl.TailStrategy.GuardWithIf)
    acc.compute_at(part, coo).split(co, cu, cv, lanes, tail).reorder(cv, cu, ci, *taps)
    acc.vectorize(cv).unroll(cu).unroll(ci)
    acc.update().split(co, cu, cv, lanes, tail).reorder(cv, cu, ci, *taps, r.x, r.y, r.z)
    acc.update().vectorize(cv).unroll(cu).unroll(ci).unroll(r.x, 4)  # 4 pixels a row
    for v in taps:
        acc.unroll(v)
        acc.update().unroll(v)
    return part, {"inp": inp, **images_in}, {"images": images, "top": top,
                                             "left": left}


class Pooled(NamedTuple):
    """The output gradient of a convolution under a fused ReLU and max pool
    (:func:`conv2d_relu_maxpool`): ``grad`` (N, Hq, Wq, C_out), the gradient of the pooled
    output, and the forward's ``code`` of the same shape, over ``window`` (ph, pw) pools."""

    grad: np.ndarray
    code: np.ndarray
    window: tuple[int, int]

    def arrays(self, a: int = 0, b: int | None = None) -> dict[str, np.ndarray]:
        """The kernels' operands for images ``a:b``."""
        return {"dpool": operand(self.grad[a:b]), "code": operand(self.code[a:b])}

    def images(self, a: int, b: int) -> Pooled:
        """The gradient of images ``a:b``."""
        return Pooled(self.grad[a:b], self.code[a:b], self.window)

    def unpooled(self, out_hw: tuple[int, int]) -> np.ndarray:
        """The convolution's output gradient (N, Ho, Wo, C_out) as an array (NumPy): each
        pooled gradient at the tap its code names, zero at the other taps, where the ReLU was
        off and past the last whole window. One broadcast product writes the windows
        (``(code == tap) * grad``: 4x faster than a masked copy per tap, measured; an infinite
        gradient would give NaN at its window's other taps)."""
        g, (ph, pw) = self.grad, self.window
        n, hq, wq, c = g.shape
        d = np.empty((n, *out_hw, c), dtype=g.dtype)
        d[:, hq * ph:], d[:, :hq * ph, wq * pw:] = 0, 0
        windows = d[:, :hq * ph, :wq * pw].reshape(n, hq, ph, wq, pw, c)
        taps = np.arange(ph * pw, dtype=self.code.dtype).reshape(ph, 1, pw, 1)
        np.multiply(self.code[:, :, None, :, None, :] == taps, g[:, :, None, :, None, :],
                    out=windows)
        return d


def _gradient_arrays(dy: np.ndarray | Pooled, a: int, b: int) -> dict[str, np.ndarray]:
    """The weight gradient kernel's operands of an output gradient, for images ``a:b``."""
    return dy.arrays(a, b) if isinstance(dy, Pooled) else {"dy": operand(dy[a:b])}


#: plans held per geometry table at most (the least recently used goes: varying batch sizes)
MOST_PLANS = 256


@functools.lru_cache(maxsize=MOST_PLANS)
def _plan(cpu: Registers, halved: bool, dtype: np.dtype, wshape: tuple, stride: int,
          width: int, spread: int, unpool: tuple[int, int] | None,
          pool: tuple[int, int] | None, addend: bool, relu: bool, codes: bool,
          taps: tuple | None) -> tuple:
    """``(pipeline, zero bias)`` of :func:`_forward` for this geometry, derived once per
    geometry and ``cpu`` (:func:`registers`) and ``halved`` (:func:`halved_vectors`), which
    the tiling reads (part of the key: see :func:`_pixel_tile`); both
    are immutable (the zero bias is only read). With ``taps`` (rows, columns, last row, last
    column, step), of an input gradient's convolution by those taps of the weight, flipped,
    its channel axes swapped (:func:`_convolution`)."""
    kh, kw, cin, cout = wshape
    adjoint = None
    if taps is not None:
        adjoint, (kh, kw), cin, cout = (kh, kw, *taps[2:]), taps[:2], cout, cin
    tile, lanes, guard = _tiles(dtype, cout)
    if pool is not None:
        width = width // pool[1] * pool[1]
    ptile = _pixel_tile(width, tile // lanes, halved)
    pipeline = _forward_pipeline(dtype, (tile, lanes, guard, ptile),
                                 (cin, cout, kh, kw, stride), spread, unpool, pool,
                                 addend, relu, codes, *((adjoint,) if adjoint else ()))
    return pipeline, np.zeros(cout, dtype=dtype)


def _forward(arrays: dict, weight: np.ndarray, bias: np.ndarray | None, stride: int,
             pads: tuple, out_hw: tuple[int, int], outputs: list[np.ndarray], spread: int = 1,
             unpool: tuple[int, int] | None = None, pool: tuple[int, int] | None = None,
             relu: bool = False, taps: tuple | None = None) -> None:
    """Run :func:`_forward_pipeline` for input (or gradient) operands ``arrays`` (with an
    ``"addend"``: its sums start from that array plus the bias) into ``outputs``; with
    ``relu``, the ReLU of the result; with ``pool`` and one output, the pooled output
    without codes; with ``taps`` (rows, columns, last row, last column, step), the input
    gradient's convolution by those taps of ``weight``, flipped, channels swapped. The
    pipeline and tiling are derived once per geometry (:func:`_plan`); a geometry
    :func:`~anycnn.kernels.native_winograd.suits` goes to its Winograd kernel."""
    dtype = outputs[0].dtype
    if taps is None and weight.shape[:2] == (1, 1) and (pads[0] or pads[2]):
        raise ValueError("a 1x1 kernel takes no padding: it reads its input in place")
    if (pool is not None or outputs[0].flags.c_contiguous) and native_winograd.suits(
            weight.shape, dtype, stride, spread, unpool, pool, out_hw, taps,
            outputs[0].shape[0]):
        native_winograd.forward(arrays, weight, bias, pads, out_hw, outputs, pool is not None,
                                relu, taps is not None, unpool is not None)
        return
    pipeline, zero = _plan(registers(), halved_vectors(), dtype, weight.shape, stride,
                           out_hw[1], spread, unpool, pool, "addend" in arrays, relu,
                           pool is None or len(outputs) == 2, taps)
    weight = operand(weight)
    bias = zero if bias is None else operand(bias, dtype)
    pipeline.run({**arrays, "wt": weight, "bias": bias}, {"top": pads[0], "left": pads[2]},
                 outputs)


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: int,
           pads: tuple[int, int, int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """Convolution of NHWC ``x`` ``(N, H, W, C_in)`` with ``weight`` ``(kh, kw, C_in, C_out)``
    plus ``bias`` ``(C_out,)`` (None: zero) at ``stride``, ``x`` zero-padded by ``pads`` (top,
    bottom, left, right; the bottom and right ones follow from ``out_hw``):
    ``(N, Ho, Wo, C_out)`` for ``out_hw = (Ho, Wo)``."""
    y = np.empty((x.shape[0], *out_hw, weight.shape[3]), dtype=x.dtype)
    _forward({"inp": operand(x)}, weight, bias, stride, pads, out_hw, [y])
    return y


def conv2d_relu_maxpool(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                        stride: int, pads: tuple[int, int, int, int], out_hw: tuple[int, int],
                        window: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`conv2d` (output ``out_hw``) → ReLU → max pool over disjoint ``window`` (ph, pw)
    windows at stride ``window``, in one kernel, computed as ``relu(max(conv) + bias)`` (equal:
    the bias and the ReLU are monotone). Returns ``(out, code)``, both (N, Ho // ph, Wo // pw,
    C_out): ``code`` (uint8) is the row-major tap of the window's first maximum, or
    :data:`DEAD` where the ReLU is off: with :class:`Pooled` it is all the backward kernels
    need. The convolution's output never exists outside a task's cache."""
    ph, pw = window
    shape = (x.shape[0], out_hw[0] // ph, out_hw[1] // pw, weight.shape[3])
    out, code = np.empty(shape, dtype=x.dtype), np.empty(shape, dtype=np.uint8)
    _forward({"inp": operand(x)}, weight, bias, stride, pads, out_hw, [out, code],
             pool=tuple(window))
    return out, code


def conv2d_relu_maxpool_eval(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                             stride: int, pads: tuple[int, int, int, int],
                             out_hw: tuple[int, int], window: tuple[int, int]) -> np.ndarray:
    """The output of :func:`conv2d_relu_maxpool` without its codes: for an inference, which
    no backward follows (no code computed or written)."""
    ph, pw = window
    shape = (x.shape[0], out_hw[0] // ph, out_hw[1] // pw, weight.shape[3])
    out = np.empty(shape, dtype=x.dtype)
    _forward({"inp": operand(x)}, weight, bias, stride, pads, out_hw, [out], pool=tuple(window))
    return out


def input_grad_applies(weight: np.ndarray) -> bool:
    """Whether :func:`conv2d_input_grad` suits this weight: its C_in (the gradient's channels)
    fills whole vectors (:func:`channels_fill_vectors`). With one or three channels (a first
    layer) most lanes would idle (measured 300 ms against the im2col path's 2 for 1 channel):
    :mod:`~anycnn.kernels.native_narrow` has a kernel for those."""
    return channels_fill_vectors(weight.shape[2], weight.dtype)


def conv2d_input_grad(dy: np.ndarray | Pooled, weight: np.ndarray, stride: int,
                      pads: tuple[int, int, int, int], in_hw: tuple[int, int],
                      addend: np.ndarray | None = None) -> np.ndarray:
    """Input gradient ``(N, H, W, C_in)`` of :func:`conv2d` with ``weight``
    ``(kh, kw, C_in, C_out)``, ``stride`` and ``pads`` (each below the kernel size), for its
    output gradient ``dy`` ``(N, Ho, Wo, C_out)`` (or the :class:`Pooled` gradient of
    :func:`conv2d_relu_maxpool`, unpooled inside the kernel); plus ``addend`` (shaped as the
    result: a residual sum's other gradient), which the sums start from.

    It is a stride-1 convolution of ``dy`` spread out by the stride and padded by
    ``k - 1 - pad``, with the kernel flipped in space and its channel axes swapped. At a
    stride s above 1 most of those multiply-adds would be with zeros: where every input pixel
    is reached by a tap (a kernel at least s wide), the gradient is computed instead as s*s
    stride-1 convolutions of ``dy`` itself, one per phase of the input grid
    (:func:`_input_grad_phases`; measured 1.5-2x faster for resnet20's 3x3 stride-2 layers; a
    1x1 stride-2 layer's pixels are mostly out of reach, and zero-filling them phase by phase
    was slower than the spread kernel)."""
    kh, kw = weight.shape[:2]
    pooled = isinstance(dy, Pooled)
    if stride > 1 and not pooled and min(kh, kw) >= stride:
        return _input_grad_phases(dy, weight, stride, pads, in_hw, addend)
    window, arrays = (dy.window, dy.arrays()) if pooled else (None, {"inp": operand(dy)})
    lead = dy.grad if pooled else dy
    dx = np.empty((lead.shape[0], *in_hw, weight.shape[2]), dtype=lead.dtype)
    if addend is not None:
        arrays["addend"] = operand(addend, lead.dtype)
    _forward(arrays, weight, None, 1, (kh - 1 - pads[0], 0, kw - 1 - pads[2], 0), in_hw, [dx],
             spread=stride, unpool=window, taps=(kh, kw, kh - 1, kw - 1, 1))
    return dx


def _phase(r: int, pad: int, k: int, stride: int) -> tuple[slice, int]:
    """For input positions ``t = stride*q + r`` along one axis of a kernel ``k >= stride``
    wide: (the kernel taps that reach them, flipped: ``k0 + stride*m`` for the taps ``m`` of
    the phase, last first; the padding, possibly negative, of the stride-1 convolution of the
    output gradient that gives them). Tap ``k0 + stride*m`` reads output position
    ``q + (r + pad) // stride - m``."""
    k0 = (r + pad) % stride
    taps = len(range(k0, k, stride))  # at least one: k >= stride
    last = k0 + stride * (taps - 1)
    return slice(last, None if k0 == 0 else k0 - 1, -stride), taps - 1 - (r + pad) // stride


def _input_grad_phases(dy: np.ndarray, weight: np.ndarray, stride: int,
                       pads: tuple[int, int, int, int], in_hw: tuple[int, int],
                       addend: np.ndarray | None) -> np.ndarray:
    """:func:`conv2d_input_grad` at ``stride`` above 1: for each phase ``(ry, rx)``, the input
    pixels ``dx[:, ry::s, rx::s]`` are a stride-1 convolution of ``dy`` with the taps that
    reach them (:func:`_phase`), written in place (Halide writes strided outputs): every
    multiply-add is with a real gradient, a quarter of the spread-out kernel's at stride 2."""
    dx = np.empty((dy.shape[0], *in_hw, weight.shape[2]), dtype=dy.dtype)
    source = {"inp": operand(dy)}
    for ry in range(stride):
        rows, top = _phase(ry, pads[0], weight.shape[0], stride)
        for rx in range(stride):
            cols, left = _phase(rx, pads[2], weight.shape[1], stride)
            part = dx[:, ry::stride, rx::stride, :]
            plus = None if addend is None else addend[:, ry::stride, rx::stride, :]
            if part.size == 0:
                continue
            arrays = dict(source)
            if plus is not None:
                arrays["addend"] = plus if plus.flags.writeable else plus.copy()
            taps = (len(range(weight.shape[0])[rows]), len(range(weight.shape[1])[cols]),
                    rows.start, cols.start, stride)  # weight[rows, cols], channels swapped
            _forward(arrays, weight, None, 1, (top, 0, left, 0), part.shape[1:3], [part],
                     taps=taps)
    return dx


def _tap_axes(in_tile: int, cin: int, kernel: tuple[int, int], vectors: int) -> int:
    """How many of the kernel's axes a weight-gradient register tile of ``in_tile`` input
    channels (of ``cin``) by ``vectors`` vectors of output channels also spans: 2 (all kh * kw
    taps), 1 (a row of kw taps) or 0, the most that fit 24 accumulators where the input
    channels are few (3 -> 16 channels: 3 accumulators would wait on their sums), with 32
    registers; else 0."""
    if in_tile < cin or registers().count < 32:
        return 0
    kh, kw = kernel
    room = 24 // (in_tile * vectors)
    return 2 if kh * kw <= room else 1 if kw <= room else 0


def _images_per_part(n: int, pixels: int) -> int:
    """Images per weight-gradient part for ``n`` images of ``pixels`` output pixels each."""
    enough = -(-WEIGHT_GRAD_PIXELS // max(pixels, 1))
    return max(WEIGHT_GRAD_IMAGES, min(enough, n // 8))


@functools.lru_cache(maxsize=MOST_PLANS)
def _weight_grad_plan(cpus: tuple, dtype: np.dtype, x_shape: tuple, grad_shape: tuple,
                      window: tuple[int, int] | None, kernel: tuple[int, int],
                      stride: int, winograd: bool) -> tuple:
    """``(pipeline, images per part, images in whole parts)`` of :func:`conv2d_weight_grad`
    for this geometry, derived once per geometry and ``cpus`` (the :func:`registers` this
    module and :mod:`native_wgrad` see, which the tilings read: part of the key); with
    ``winograd`` (:func:`native_winograd.enabled`), a 3x3 stride-1 layer's Winograd kernel
    where it applies."""
    n, cin, cout = x_shape[0], x_shape[3], grad_shape[3]
    tile, lanes, guard = _tiles(dtype, cout)
    rows = _most_tile_rows()
    if tile == lanes and registers().count >= 32:
        rows *= 2  # one vector of channels: 16 accumulators (16 -> 16 channels 20% faster)
    in_tile = _divisor_tile(cin, rows)
    per = _images_per_part(n, grad_shape[1] * grad_shape[2])
    full = n // per * per
    from . import native_wgrad  # (it builds on this module)

    blocks = winograd and native_winograd.weight_grad_tiling(
        dtype, (cin, cout), kernel, stride, window, n, grad_shape[1:3], per, n - full)
    if blocks:  # 3x3 stride 1: Winograd's 16 products, not 36
        return native_winograd.weight_grad(dtype, (cin, cout), blocks, window is not None), \
            per, full
    chunking = native_wgrad.tiling(stride, window is not None, (cin, cout), lanes, kernel,
                                   x_shape[1:3], per, n - full)
    if chunking is not None:  # stride 1: chunks of the input, tiles over a row of taps
        pipeline = native_wgrad.weight_grad(dtype, lanes, (cin, cout, *kernel), chunking)
    else:
        pipeline = _weight_grad_pipeline(dtype, tile, lanes, guard, in_tile, window,
                                         (cin, cout, *kernel, stride),
                                         _tap_axes(in_tile, cin, kernel, tile // lanes))
    return pipeline, per, full


def conv2d_weight_grad(x: np.ndarray, dy: np.ndarray | Pooled, kernel: tuple[int, int],
                       stride: int, pads: tuple[int, int, int, int]) -> np.ndarray:
    """Weight gradient ``(kh, kw, C_in, C_out)`` of :func:`conv2d` for its input ``x``
    ``(N, H, W, C_in)`` and output gradient ``dy`` ``(N, Ho, Wo, C_out)`` (or :class:`Pooled`):
    a part per group of images (:func:`_images_per_part`), summed in order. The pipeline and
    parts are chosen once per geometry (:func:`_weight_grad_plan`)."""
    pooled = isinstance(dy, Pooled)
    grad = dy.grad if pooled else dy
    n, cin, cout = x.shape[0], x.shape[3], grad.shape[3]
    if n == 0:
        return np.zeros((*kernel, cin, cout), dtype=x.dtype)
    from . import native_wgrad  # (it builds on this module)

    window = dy.window if pooled else None
    pipeline, per, full = _weight_grad_plan((registers(), native_wgrad.registers()), x.dtype,
                                            x.shape, grad.shape, window, tuple(kernel), stride,
                                            native_winograd.enabled())
    parts = np.empty((full // per + (full < n), *kernel, cin, cout), dtype=x.dtype)
    for a, b, size, out in ((0, full, per, parts[:full // per]), (full, n, n - full, parts[-1:])):
        if b > a:  # the parts of whole groups, then one of the images left: one array
            pipeline.run({"inp": operand(x[a:b]), **_gradient_arrays(dy, a, b)},
                         {"images": size, "top": pads[0], "left": pads[2]}, [out])
    return native_sum.sum_parts(parts)  # parts.sum(axis=0), on the kernels' threads


def _column_sums(d: np.ndarray) -> np.ndarray:
    """``sum(d, axis=0)`` of rows ``d`` (M, C) as the GEMV ``ones @ d`` (the bias gradient)."""
    return np.reshape(fastpath.matmul(np.ones((1, d.shape[0]), dtype=d.dtype), d), (d.shape[1],))


# --------------------------------------------------------------------------------------------
# Dispatch kernels: the convolutions of anycnn.nn.functional.conv, computed here or declined


@implements("conv2d")
def conv2d_kernel(x: Any, weight: Any, bias: Any, win: Any, groups: int) -> Any:
    """The forward of :func:`anycnn.nn.functional.conv.conv2d_forward` over its windows
    ``win``, when :func:`applies`; else :data:`~anycnn.kernels.dispatch.DECLINE`."""
    if not applies(x, weight, win.stride, win.pads, win.dilation, groups):
        return DECLINE
    return conv2d(x, weight, bias, win.stride[0], win.pads, win.out)


@implements("conv2d_backward")
def conv2d_backward_kernel(dy: Any, x: Any, weight: Any, win: Any, groups: int,
                           need_input_grad: bool, bias_grad: bool, addend: Any = None) -> Any:
    """``(dx, dweight, dbias)`` of a convolution for NHWC ``dy`` (N, Ho, Wo, C_out), or the
    :class:`Pooled` gradient of a fused Conv-ReLU-MaxPool block, and its input ``x``, when
    :func:`applies` (else :data:`~anycnn.kernels.dispatch.DECLINE`). The input gradient's sums
    start from ``addend`` when one is given. ``dx`` is ``DECLINE`` when the input gradient
    kernel does not suit the weight (:func:`input_grad_applies`): the caller computes it."""
    pooled = isinstance(dy, Pooled)
    if not pooled and not applies(x, weight, win.stride, win.pads, win.dilation, groups):
        return DECLINE
    if pooled and bias_grad:
        raise ValueError("a Pooled gradient's bias gradient is relu_column_sums' to compute")
    dweight = conv2d_weight_grad(x, dy, win.kernel, win.stride[0], win.pads)
    dbias = _column_sums(np.reshape(dy, (-1, dy.shape[3]))) if bias_grad else None
    dx = None
    if need_input_grad and input_grad_applies(weight):
        dx = conv2d_input_grad(dy, weight, win.stride[0], win.pads, win.in_hw, addend)
    elif need_input_grad:
        dx = DECLINE
    return dx, dweight, dbias


@implements("conv2d_relu_maxpool")
def conv2d_relu_maxpool_kernel(x: Any, weight: Any, bias: Any, win: Any,
                               window: tuple[int, int]) -> Any:
    """``(out, code)`` of :func:`conv2d_relu_maxpool` for a convolution over ``win`` whose
    ``window`` pools tile its output, when :func:`applies` and the window has fewer than
    :data:`DEAD` taps; else :data:`~anycnn.kernels.dispatch.DECLINE`."""
    if window[0] * window[1] >= DEAD or not applies(x, weight, win.stride, win.pads,
                                                     win.dilation, 1):
        return DECLINE
    return conv2d_relu_maxpool(x, weight, bias, win.stride[0], win.pads, win.out, window)



@implements("conv2d_relu_maxpool_eval")
def conv2d_relu_maxpool_eval_kernel(x: Any, weight: Any, bias: Any, win: Any,
                                    window: tuple[int, int]) -> Any:
    """The output of :func:`conv2d_relu_maxpool_kernel` without its codes
    (:func:`conv2d_relu_maxpool_eval`: an inference's block), where that kernel applies; else
    :data:`~anycnn.kernels.dispatch.DECLINE`."""
    if window[0] * window[1] >= DEAD or not applies(x, weight, win.stride, win.pads,
                                                     win.dilation, 1):
        return DECLINE
    return conv2d_relu_maxpool_eval(x, weight, bias, win.stride[0], win.pads, win.out, window)


@implements("pooled_gradient")
def pooled_gradient(grad: Any, code: Any, window: tuple[int, int],
                    bias_grad: bool = False) -> tuple[Pooled, None]:
    """``(pooled, None)``: the :class:`Pooled` gradient of a block computed by
    :func:`conv2d_relu_maxpool_kernel` (its ``code``), for the pooled output's gradient
    ``grad``; the bias gradient is left to the caller (``relu_column_sums``' kernel sums it
    in one pass, and the convolution's backward kernel applies the ReLU's mask itself).
    Declines codes that are not NumPy arrays (another kernel's forward kept them)."""
    if not (isinstance(code, np.ndarray) and isinstance(grad, np.ndarray)):
        return DECLINE
    return Pooled(grad, code, tuple(window)), None


# --------------------------------------------------------------------------------------------
# A convolution's epilogue in its kernel (eval mode's fused steps, anycnn.nn.inference)


def conv2d_epilogue(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: int,
                    pads: tuple[int, int, int, int], out_hw: tuple[int, int],
                    addend: np.ndarray | None = None, relu: bool = False) -> np.ndarray:
    """:func:`conv2d` plus ``addend`` (shaped as the output, e.g. a residual block's shortcut;
    the sums start from it and the bias), then ``max(., 0)`` with ``relu``: one kernel, no
    pass over the output of its own."""
    y = np.empty((x.shape[0], *out_hw, weight.shape[3]), dtype=x.dtype)
    arrays = {"inp": operand(x)}
    if addend is not None:
        arrays["addend"] = operand(addend)
    _forward(arrays, weight, bias, stride, pads, out_hw, [y], relu=relu)
    return y


@implements("conv2d_epilogue")
def conv2d_epilogue_kernel(x: Any, weight: Any, bias: Any, win: Any, groups: int, addend: Any,
                           relu: bool) -> Any:
    """:func:`anycnn.nn.functional.conv.conv2d_forward` with an ``addend`` or ``relu``, as
    :func:`conv2d_epilogue`, when :func:`applies` (and the addend is a NumPy array of the
    input's dtype); else :data:`~anycnn.kernels.dispatch.DECLINE`."""
    if not applies(x, weight, win.stride, win.pads, win.dilation, groups) or (
            addend is not None and not (isinstance(addend, np.ndarray)
                                        and addend.dtype == x.dtype)):
        return DECLINE
    return conv2d_epilogue(x, weight, bias, win.stride[0], win.pads, win.out, addend, relu)


# --------------------------------------------------------------------------------------------
# A Dense layer's product, bias and ReLU (eval mode's fused Dense → ReLU)

#: the register tile of :func:`_dense_pipeline`: rows of ``x`` by vectors of output features
#: (16 accumulators), and the slice of the reduction it runs while its block of weights
#: stays in the L1 cache; a task is :data:`DENSE_ROW_BLOCK` rows by one column of tiles.
#: Measured (simple-cnn's 64 x 3136 @ 3136 x 128 and ReLU, 2 threads): 0.22-0.25 ms, against
#: 0.47 for the BLAS in two shards and 0.32 without the reduction in slices
DENSE_ROWS, DENSE_VECTORS, DENSE_K_BLOCK, DENSE_ROW_BLOCK = 4, 4, 64, 64


@kernel_cache.pipeline
def _dense_pipeline(dtype: np.dtype, features: tuple[int, int], lanes: int, relu: bool):
    """``out[j, i] = bias[j] + sum over k of x[k, i] * wt[j, k]`` (Halide's axes are NumPy's
    reversed: ``x`` (M, K), ``wt`` (K, N), ``out`` (M, N)), then ``max(., 0)`` with ``relu``
    (a NaN kept); ``features`` (K, N) known when it compiles. Each task owns
    :data:`DENSE_ROW_BLOCK` rows by :data:`DENSE_VECTORS` vectors of features: their sums
    stay in a buffer in the cache while the reduction runs in slices of
    :data:`DENSE_K_BLOCK`, each slice over all the task's register tiles."""
    hl = _halide()
    t = _scalar_type(hl, dtype)
    k, n = features
    x, wt, bias = hl.ImageParam(t, 2, "x"), hl.ImageParam(t, 2, "wt"), hl.ImageParam(t, 1, "bias")
    x.dim(0).set_bounds(0, k).set_stride(1)
    x.dim(1).set_stride(k)
    wt.dim(0).set_bounds(0, n).set_stride(1)
    wt.dim(1).set_bounds(0, k).set_stride(n)
    bias.dim(0).set_bounds(0, n)
    j, i = hl.Var("j"), hl.Var("i")
    r = hl.RDom([hl.Range(0, k)])
    acc = hl.Func("acc")
    acc[j, i] = bias[j]
    acc[j, i] += x[r.x, i] * wt[j, r.x]
    out = hl.Func("dense")
    z = hl.Expr(acc[j, i])
    out[j, i] = _relu_of(hl, z) if relu else z
    jo, ji, ib, ii, task = (hl.Var(v) for v in ("jo", "ji", "ib", "ii", "task"))
    out.split(j, jo, ji, DENSE_VECTORS * lanes)
    out.split(i, ib, ii, DENSE_ROW_BLOCK, hl.TailStrategy.GuardWithIf)
    out.reorder(ji, ii, ib, jo).vectorize(ji, lanes).fuse(ib, jo, task).parallel(task)
    acc.compute_at(out, task).vectorize(j, lanes)
    ko, ki, io, it, ju, jv = (hl.RVar("ko"), hl.RVar("ki"), hl.Var("io"), hl.Var("it"),
                              hl.Var("ju"), hl.Var("jv"))
    update = acc.update()
    update.split(r.x, ko, ki, DENSE_K_BLOCK).split(i, io, it, DENSE_ROWS,
                                                   hl.TailStrategy.GuardWithIf)
    update.split(j, ju, jv, lanes).reorder(jv, ju, it, ki, io, ko)
    update.vectorize(jv).unroll(ju).unroll(it)
    return out, {"x": x, "wt": wt, "bias": bias}, {}


def dense_applies(x: Any, weight: Any, bias: Any) -> bool:
    """Whether :func:`dense` computes ``x @ weight + bias``: NumPy ``x`` (M, K) and ``weight``
    (K, N) of one float dtype (``bias`` too), N a multiple of :data:`DENSE_VECTORS` vectors
    (the tile it was measured with; other widths stay with the BLAS), and a product of at
    least :data:`~anycnn.kernels.fastpath.SMALL_GEMM_MACS` multiply-adds."""
    if not (isinstance(x, np.ndarray) and isinstance(weight, np.ndarray) and x.ndim == 2
            and weight.ndim == 2 and x.dtype == weight.dtype and available(np, x.dtype)):
        return False
    if bias is not None and not (isinstance(bias, np.ndarray) and bias.dtype == x.dtype):
        return False
    (m, k), n = x.shape, weight.shape[1]
    return (k == weight.shape[0] and n % (DENSE_VECTORS * vector_lanes(x.dtype)) == 0
            and m * k * n >= fastpath.SMALL_GEMM_MACS)


def dense(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
          relu: bool = False) -> np.ndarray:
    """``x @ weight + bias`` for ``x`` (M, K), ``weight`` (K, N), ``bias`` (N,) or None, then
    ``max(., 0)`` with ``relu``: one kernel on Halide's threads, the bias and the ReLU in its
    tiles (see :func:`dense_applies` for where it applies)."""
    (m, k), n = x.shape, weight.shape[1]
    pipeline = _dense_pipeline(x.dtype, (k, n), vector_lanes(x.dtype), relu)
    out = np.empty((m, n), dtype=x.dtype)
    x, weight = operand(x), operand(weight)
    bias = np.zeros(n, dtype=x.dtype) if bias is None else operand(bias)
    pipeline.run({"x": x, "wt": weight, "bias": bias}, {}, [out])
    return out


@implements("linear_epilogue")
def linear_epilogue_kernel(x: Any, weight: Any, bias: Any, relu: bool) -> Any:
    """:func:`anycnn.nn.functional.linear.linear_forward` with its ReLU (eval mode's fused
    Dense → ReLU) as :func:`dense`, when :func:`dense_applies`; else
    :data:`~anycnn.kernels.dispatch.DECLINE`."""
    if not dense_applies(x, weight, bias):
        return DECLINE
    return dense(x, weight, bias, relu)


from . import native_winograd  # noqa: E402 - it builds on this module
