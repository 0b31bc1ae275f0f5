"""Compiled convolution kernels for NumPy arrays (Halide, compiled at first use), behind the shim.

(BatchNorm's passes are compiled the same way, in :mod:`anycnn.native_norm`, under the same
switches.)

The portable convolution is an im2col gather and one GEMM. On a CPU the gather, the GEMM's
skinny shapes (16-64 output channels) and the passes between them cost 2-3x what a direct
convolution costs. These kernels are direct convolutions: each computes a tile of output pixels
by output channels in vector registers, reading the NHWC input and the weights in place.

- :func:`conv2d` — forward ``(N, Ho, Wo, C_out)`` of an NHWC input, padded inside the kernel
  (any kernel size and stride, no dilation, no groups).
- :func:`conv2d_input_grad` — the input gradient, as the same kernel over the output gradient
  (spread out by the stride, padded) with the kernel flipped and its channels swapped.
- :func:`conv2d_weight_grad` — ``(kh, kw, C_in, C_out)`` weight gradient, summed over images in
  cache-sized groups on all threads, then over the groups in a fixed order.

They are used for float32 and float64 NumPy arrays when the ``halide`` package is installed
(a dependency on the platforms it has wheels for; ``anycnn info`` says whether they are on),
unless ``ANYCNN_FASTPATH=0`` (every NumPy fast path off) or ``ANYCNN_NATIVE=0`` (only these
kernels off). Results equal the portable path's up to rounding (the sums run in another
order); ``tests/test_native.py`` compares the two. Each kernel shape is compiled once per
process (0.1-0.8 s) and kept. The kernels run on Halide's own thread pool, sized to
``ANYCNN_NUM_THREADS`` (or the usable CPUs) when it starts.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
from typing import Any

import numpy as np

from . import fastpath
from .nn.geometry import adjoint_kernel

#: vector lanes per dtype (512-bit registers); the kernels are correct on any CPU, this only
#: shapes their register tiles
_LANES = {np.dtype(np.float32): 16, np.dtype(np.float64): 8}

#: images summed into one weight-gradient part (their input and gradient stay in the L2 cache)
WEIGHT_GRAD_IMAGES = 4

#: whether the kernels are on; None: read ``ANYCNN_NATIVE`` and look for halide at first use
ENABLED: bool | None = None

_lock = threading.Lock()  # a pipeline's parameters are set, then it runs: one caller at a time


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
    if not (ENABLED and fastpath.enabled(xp)):
        return False
    return dtype is None or np.dtype(dtype) in _LANES


def describe() -> str:
    """One line for ``anycnn info``: whether the compiled kernels are on, and why not."""
    if os.environ.get("ANYCNN_FASTPATH", "1") == "0":
        return "off (ANYCNN_FASTPATH=0)"
    why = _off_reason()
    return f"off ({why})" if why else f"on (halide, {fastpath.num_threads()} threads)"


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
            and available(np, x.dtype))


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


_pool_started = False


def _realize(func, buffer) -> None:
    """``func.realize(buffer)``; the first call sizes Halide's thread pool, which reads
    ``HL_NUM_THREADS`` when it starts, to :func:`fastpath.num_threads` (unless the user set
    it), without leaving the variable for child processes to inherit."""
    global _pool_started
    if _pool_started:
        func.realize(buffer)
        return
    ours = "HL_NUM_THREADS" not in os.environ
    if ours:
        os.environ["HL_NUM_THREADS"] = str(fastpath.num_threads())
    try:
        func.realize(buffer)
    finally:
        if ours:
            os.environ.pop("HL_NUM_THREADS", None)
        _pool_started = True


def _tiles(dtype: np.dtype, cout: int) -> tuple[int, int, bool]:
    """(output channels per tile, vector lanes, whether the last tile needs a guard): two
    vectors of channels when they divide C_out. A guarded tile costs 2.5x (measured): it is
    used only when C_out is no multiple of the lanes."""
    lanes = _LANES[dtype]
    tile = 2 * lanes if cout % (2 * lanes) == 0 else lanes
    return tile, lanes, cout % tile != 0


def _pixel_tile(width: int) -> int:
    """Output pixels per register tile for output rows of ``width``: 8 (the best of 4-16,
    measured for 16, 32 and 64 channels), or 7 or 6 where that divides the row and 8 does not
    (no overlapping last tile: 10-14% faster at widths 14 and 28, measured)."""
    if width <= 8:
        return width
    return next((t for t in (8, 7, 6) if width % t == 0), 8)


def _divisor_tile(size: int, most: int) -> int:
    """The largest tile of at most ``most`` that divides ``size`` (no guarded tail)."""
    return next(t for t in range(min(most, size), 0, -1) if size % t == 0)


def _spread_padded(hl, inp, spread: int, top, left):
    """The Func of ``inp`` (c, x, y, n) spread out ``spread - 1`` zeros apart in x and y and
    shifted by (left, top), zero outside: the padded input of a convolution (spread 1) or the
    output gradient as its input gradient's convolution reads it (spread = stride)."""
    c, x, y, n = (hl.Var(v) for v in ("c", "x", "y", "n"))
    xs, ys = x - left, y - top
    w, h = inp.dim(1).extent(), inp.dim(2).extent()
    inside = (xs >= 0) & (ys >= 0) & (xs < w * spread) & (ys < h * spread)
    if spread > 1:
        inside = inside & (xs % spread == 0) & (ys % spread == 0)
    value = inp[c, hl.clamp(xs // spread, 0, w - 1), hl.clamp(ys // spread, 0, h - 1), n]
    grid = hl.Func("grid")
    grid[c, x, y, n] = hl.select(inside, value, hl.cast(value.type(), 0))
    return grid, c


#: output rows of one image per task of the forward kernel
ROWS_PER_TASK = 8


@functools.cache
def _forward_pipeline(dtype: np.dtype, channel_tile: int, lanes: int, guard: bool,
                      pixel_tile: int, spread: int):
    """out[co, x, y, n] = bias[co] + sum_{ci, i, j} grid[ci, x*s + j, y*s + i, n] * w[co, ci, j, i]
    (Halide's axes are NumPy's reversed; ``grid`` is :func:`_spread_padded` of the input):
    tiles of ``pixel_tile`` pixels by ``channel_tile`` channels accumulated in registers; a
    task is :data:`ROWS_PER_TASK` rows of one image, which pads its own input rows."""
    hl = _halide()
    t = _scalar_type(hl, dtype)
    inp = hl.ImageParam(t, 4, "inp")
    wt = hl.ImageParam(t, 4, "wt")
    bias = hl.ImageParam(t, 1, "bias")
    stride, top, left = (hl.Param(hl.Int(32), v) for v in ("stride", "top", "left"))
    grid, gc = _spread_padded(hl, inp, spread, top, left)
    co, x, y, n = hl.Var("co"), hl.Var("x"), hl.Var("y"), hl.Var("n")
    r = hl.RDom([hl.Range(0, wt.dim(1).extent()), hl.Range(0, wt.dim(2).extent()),
                 hl.Range(0, wt.dim(3).extent())])
    acc = hl.Func("acc")
    acc[co, x, y, n] = bias[co]
    acc[co, x, y, n] += grid[r.x, x * stride + r.y, y * stride + r.z, n] * wt[co, r.x, r.y, r.z]
    out = hl.Func("out")
    out[co, x, y, n] = acc[co, x, y, n]

    xo, xi, yo, yi, coo, coi, task, cu, cv = (
        hl.Var(v) for v in ("xo", "xi", "yo", "yi", "coo", "coi", "task", "cu", "cv"))
    tail = hl.TailStrategy.GuardWithIf if guard else hl.TailStrategy.Auto
    out.split(co, coo, coi, channel_tile, tail).split(x, xo, xi, pixel_tile)
    out.split(y, yo, yi, ROWS_PER_TASK, hl.TailStrategy.GuardWithIf)
    out.reorder(coi, xi, coo, xo, yi, yo, n).fuse(yo, n, task)
    out.vectorize(coi, lanes).unroll(xi).parallel(task)
    grid.compute_at(out, task).vectorize(gc, lanes, hl.TailStrategy.GuardWithIf)
    acc.compute_at(out, coo).split(co, cu, cv, lanes, tail).reorder(cv, cu, x)
    acc.vectorize(cv).unroll(cu).unroll(x)
    acc.update().split(co, cu, cv, lanes, tail).reorder(cv, cu, x, r.x, r.y, r.z)
    acc.update().vectorize(cv).unroll(cu).unroll(x).unroll(r.x, 4)  # 4 input channels
    out.compile_jit(hl.get_host_target())
    return out, inp, wt, bias, stride, top, left


@functools.cache
def _weight_grad_pipeline(dtype: np.dtype, channel_tile: int, lanes: int, guard: bool,
                          in_tile: int):
    """part[co, ci, j, i, g] = sum over images g*G .. g*G+G-1 (G = the ``images`` parameter) and
    output pixels of grid[ci, x*s + j, y*s + i, n] * dy[co, x, y, n] (``grid``:
    :func:`_spread_padded` of the input): tiles of ``in_tile`` input channels by
    ``channel_tile`` output channels accumulated in registers; a task is one group of images,
    which pads its own input (measured as fast as a padded copy on one thread, and parallel)."""
    hl = _halide()
    t = _scalar_type(hl, dtype)
    inp = hl.ImageParam(t, 4, "inp")
    dy = hl.ImageParam(t, 4, "dy")
    stride, images = hl.Param(hl.Int(32), "stride"), hl.Param(hl.Int(32), "images")
    top, left = hl.Param(hl.Int(32), "top"), hl.Param(hl.Int(32), "left")
    grid, gc = _spread_padded(hl, inp, 1, top, left)
    co, ci, j, i, g = (hl.Var(v) for v in ("co", "ci", "j", "i", "g"))
    r = hl.RDom([hl.Range(0, dy.dim(1).extent()), hl.Range(0, dy.dim(2).extent()),
                 hl.Range(0, images)])
    acc = hl.Func("acc")
    acc[co, ci, j, i, g] = hl.cast(t, 0)
    img = g * images + r.z
    acc[co, ci, j, i, g] += (grid[ci, r.x * stride + j, r.y * stride + i, img]
                             * dy[co, r.x, r.y, img])
    part = hl.Func("part")
    part[co, ci, j, i, g] = acc[co, ci, j, i, g]

    coo, coi, cio, cii, cu, cv = (hl.Var(v) for v in ("coo", "coi", "cio", "cii", "cu", "cv"))
    tail = hl.TailStrategy.GuardWithIf if guard else hl.TailStrategy.Auto
    part.split(co, coo, coi, channel_tile, tail).split(ci, cio, cii, in_tile)
    part.reorder(coi, cii, coo, cio, j, i, g).vectorize(coi, lanes).unroll(cii).parallel(g)
    grid.compute_at(part, g).vectorize(gc, lanes, hl.TailStrategy.GuardWithIf)
    acc.compute_at(part, coo).split(co, cu, cv, lanes, tail).reorder(cv, cu, ci)
    acc.vectorize(cv).unroll(cu).unroll(ci)
    acc.update().split(co, cu, cv, lanes, tail).reorder(cv, cu, ci, r.x, r.y, r.z)
    acc.update().vectorize(cv).unroll(cu).unroll(ci).unroll(r.x, 4)  # 4 pixels a row
    part.compile_jit(hl.get_host_target())
    return part, inp, dy, stride, images, top, left


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: int,
           pads: tuple[int, int, int, int], out_hw: tuple[int, int],
           spread: int = 1) -> np.ndarray:
    """Convolution of NHWC ``x`` ``(N, H, W, C_in)`` with ``weight`` ``(kh, kw, C_in, C_out)``
    plus ``bias`` ``(C_out,)`` (None: zero) at ``stride``, ``x`` zero-padded by ``pads`` (top,
    bottom, left, right; the bottom and right ones follow from ``out_hw``) and, for ``spread``
    above 1, spread out with ``spread - 1`` zeros between its pixels first:
    ``(N, Ho, Wo, C_out)`` for ``out_hw = (Ho, Wo)``."""
    hl = _halide()
    n, cout = x.shape[0], weight.shape[3]
    tile, lanes, guard = _tiles(x.dtype, cout)
    pixels = _pixel_tile(out_hw[1])
    out, inp, wt, b, s, top, left = _forward_pipeline(x.dtype, tile, lanes, guard, pixels,
                                                      spread)
    x, weight = operand(x), operand(weight)
    bias = np.zeros(cout, dtype=x.dtype) if bias is None else operand(bias, x.dtype)
    y = np.empty((n, *out_hw, cout), dtype=x.dtype)
    with _lock:
        inp.set(hl.Buffer(x))
        wt.set(hl.Buffer(weight))
        b.set(hl.Buffer(bias))
        s.set(int(stride))
        top.set(int(pads[0]))
        left.set(int(pads[2]))
        _realize(out, hl.Buffer(y))
    return y


def input_grad_applies(weight: np.ndarray) -> bool:
    """Whether :func:`conv2d_input_grad` suits this weight: its C_in (the gradient's channels)
    fills whole vectors. With one or three channels (a first layer) most lanes would idle, and
    the im2col path is far faster (measured 300 ms against 2 for 1 channel)."""
    return weight.shape[2] % _LANES[weight.dtype] == 0


def conv2d_input_grad(dy: np.ndarray, weight: np.ndarray, stride: int,
                      pads: tuple[int, int, int, int], in_hw: tuple[int, int]) -> np.ndarray:
    """Input gradient ``(N, H, W, C_in)`` of :func:`conv2d` (``spread`` 1) with ``weight``
    ``(kh, kw, C_in, C_out)``, ``stride`` and ``pads`` (each below the kernel size), for its
    output gradient ``dy`` ``(N, Ho, Wo, C_out)``.

    It is :func:`conv2d` at stride 1 of ``dy`` spread out by the stride and padded by
    ``k - 1 - pad``, with the kernel flipped in space and its channel axes swapped. At stride
    2, three quarters of the multiply-adds are with zeros; still faster than a column gradient
    and its scatter, and stride-2 layers are few."""
    kh, kw = weight.shape[:2]
    return conv2d(dy, adjoint_kernel(weight), None, 1, (kh - 1 - pads[0], 0, kw - 1 - pads[2], 0),
                  in_hw, spread=stride)


def conv2d_weight_grad(x: np.ndarray, dy: np.ndarray, kernel: tuple[int, int], stride: int,
                       pads: tuple[int, int, int, int]) -> np.ndarray:
    """Weight gradient ``(kh, kw, C_in, C_out)`` of :func:`conv2d` (``spread`` 1) for its input
    ``x`` ``(N, H, W, C_in)`` and output gradient ``dy`` ``(N, Ho, Wo, C_out)``: a part per
    group of :data:`WEIGHT_GRAD_IMAGES` images, summed in order."""
    n, cin, cout = x.shape[0], x.shape[3], dy.shape[3]
    if n == 0:
        return np.zeros((*kernel, cin, cout), dtype=x.dtype)
    tile, lanes, guard = _tiles(x.dtype, cout)
    pipeline = _weight_grad_pipeline(x.dtype, tile, lanes, guard, _divisor_tile(cin, 8))
    per = WEIGHT_GRAD_IMAGES
    full = n // per * per
    parts = [_weight_grad_parts(pipeline, x[a:b], dy[a:b], kernel, stride, size, pads)
             for a, b, size in ((0, full, per), (full, n, n - full)) if b > a]
    return np.concatenate(parts).sum(axis=0)


def _weight_grad_parts(pipeline, x: np.ndarray, dy: np.ndarray, kernel: tuple[int, int],
                       stride: int, per: int, pads: tuple[int, int, int, int]) -> np.ndarray:
    """The pipeline's parts ``(n/per, kh, kw, C_in, C_out)`` for ``per`` images each."""
    hl = _halide()
    part, inp, d, s, images, top, left = pipeline
    x, dy = operand(x), operand(dy)
    parts = np.empty((x.shape[0] // per, *kernel, x.shape[3], dy.shape[3]), dtype=x.dtype)
    with _lock:
        inp.set(hl.Buffer(x))
        d.set(hl.Buffer(dy))
        s.set(int(stride))
        images.set(per)
        top.set(int(pads[0]))
        left.set(int(pads[2]))
        _realize(part, hl.Buffer(parts))
    return parts
