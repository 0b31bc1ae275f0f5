"""Compiled convolution kernels for NumPy arrays (Halide, compiled at first use), behind the shim.

The portable convolution is an im2col gather and one GEMM. On a CPU the gather, the GEMM's
skinny shapes (16-64 output channels) and the passes between them cost 2-3x what a direct
convolution costs. These kernels are direct convolutions: each computes a tile of output pixels
by output channels in vector registers, reading the NHWC input and the weights in place.

- :func:`conv2d` — forward ``(N, Ho, Wo, C_out)`` of a padded NHWC input (any kernel size and
  stride, no dilation, no groups).
- :func:`conv2d_input_grad` — the input gradient, as the same kernel over the output gradient
  (spread out by the stride, padded) with the kernel flipped and its channels swapped.
- :func:`conv2d_weight_grad` — ``(kh, kw, C_in, C_out)`` weight gradient, summed over images in
  cache-sized groups on all threads, then over the groups in a fixed order.

They are used for float32 and float64 NumPy arrays when the ``halide`` package is installed
(``pip install 'anycnn[fast]'``), unless ``ANYCNN_FASTPATH=0`` (every NumPy fast path off) or
``ANYCNN_NATIVE=0`` (only these kernels off). Results equal the portable path's up to rounding
(the sums run in another order); tests compare the two. Each kernel shape is compiled once per
process (about 0.1-0.8 s) and kept.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
from typing import Any

import numpy as np

from . import fastpath

#: vector lanes per dtype (512-bit registers); the kernels are correct on any CPU, this only
#: shapes their register tiles
_LANES = {np.dtype(np.float32): 16, np.dtype(np.float64): 8}

#: images summed into one weight-gradient part (their input and gradient stay in the L2 cache)
WEIGHT_GRAD_IMAGES = 4

#: whether the kernels are on; None: read ``ANYCNN_NATIVE`` and look for halide at first use
ENABLED: bool | None = None

_lock = threading.Lock()  # a pipeline's parameters are set, then it runs: one caller at a time


def available(xp: Any, dtype: Any = None) -> bool:
    """True when the compiled kernels apply to namespace ``xp`` (and ``dtype``, if given)."""
    global ENABLED
    if ENABLED is None:
        ENABLED = (os.environ.get("ANYCNN_NATIVE", "1") != "0"
                   and importlib.util.find_spec("halide") is not None)
    if not (ENABLED and fastpath.enabled(xp)):
        return False
    return dtype is None or np.dtype(dtype) in _LANES


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

    # the thread pool is made at the first parallel run and reads this then
    os.environ.setdefault("HL_NUM_THREADS", str(fastpath.num_threads()))
    return halide


def _tiles(dtype: np.dtype, cout: int) -> tuple[int, int, bool]:
    """(output channels per tile, vector lanes, whether the last tile needs a guard): two
    vectors of channels when they divide C_out. A guarded tile costs 2.5x (measured): it is
    used only when C_out is no multiple of the lanes."""
    lanes = _LANES[dtype]
    tile = 2 * lanes if cout % (2 * lanes) == 0 else lanes
    return tile, lanes, cout % tile != 0


def _divisor_tile(size: int, most: int) -> int:
    """The largest tile of at most ``most`` that divides ``size`` (no guarded tail)."""
    return next(t for t in range(min(most, size), 0, -1) if size % t == 0)


@functools.cache
def _forward_pipeline(dtype: np.dtype, channel_tile: int, lanes: int, guard: bool,
                      pixel_tile: int):
    """out[co, x, y, n] = bias[co] + sum_{ci, i, j} inp[ci, x*s + j, y*s + i, n] * w[co, ci, j, i]
    (Halide's axes are NumPy's reversed), tiles of ``pixel_tile`` pixels by ``channel_tile``
    channels accumulated in registers, rows of images shared between the threads."""
    hl = _halide()
    t = hl.Float(8 * dtype.itemsize)
    inp = hl.ImageParam(t, 4, "inp")
    wt = hl.ImageParam(t, 4, "wt")
    bias = hl.ImageParam(t, 1, "bias")
    stride = hl.Param(hl.Int(32), "stride")
    co, x, y, n = hl.Var("co"), hl.Var("x"), hl.Var("y"), hl.Var("n")
    r = hl.RDom([hl.Range(0, wt.dim(1).extent()), hl.Range(0, wt.dim(2).extent()),
                 hl.Range(0, wt.dim(3).extent())])
    acc = hl.Func("acc")
    acc[co, x, y, n] = bias[co]
    acc[co, x, y, n] += inp[r.x, x * stride + r.y, y * stride + r.z, n] * wt[co, r.x, r.y, r.z]
    out = hl.Func("out")
    out[co, x, y, n] = acc[co, x, y, n]

    xo, xi, coo, coi, row, rows = (hl.Var(v) for v in ("xo", "xi", "coo", "coi", "row", "rows"))
    cu, cv = hl.Var("cu"), hl.Var("cv")
    tail = hl.TailStrategy.GuardWithIf if guard else hl.TailStrategy.Auto
    out.split(co, coo, coi, channel_tile, tail).split(x, xo, xi, pixel_tile)
    out.reorder(coi, xi, coo, xo, y, n).fuse(y, n, row)
    out.split(row, rows, row, 4, hl.TailStrategy.GuardWithIf)
    out.vectorize(coi, lanes).unroll(xi).parallel(rows)
    acc.compute_at(out, coo).split(co, cu, cv, lanes, tail).reorder(cv, cu, x)
    acc.vectorize(cv).unroll(cu).unroll(x)
    acc.update().split(co, cu, cv, lanes, tail).reorder(cv, cu, x, r.x, r.y, r.z)
    acc.update().vectorize(cv).unroll(cu).unroll(x)
    out.compile_jit(hl.get_host_target())
    return out, inp, wt, bias, stride


@functools.cache
def _weight_grad_pipeline(dtype: np.dtype, channel_tile: int, lanes: int, guard: bool,
                          in_tile: int):
    """part[co, ci, j, i, g] = sum over images g*G .. g*G+G-1 (G = the ``images`` parameter) and
    output pixels of inp[ci, x*s + j, y*s + i, n] * dy[co, x, y, n]: tiles of ``in_tile`` input
    channels by ``channel_tile`` output channels accumulated in registers, one group of images
    per task."""
    hl = _halide()
    t = hl.Float(8 * dtype.itemsize)
    inp = hl.ImageParam(t, 4, "inp")
    dy = hl.ImageParam(t, 4, "dy")
    stride = hl.Param(hl.Int(32), "stride")
    co, ci, j, i, g = (hl.Var(v) for v in ("co", "ci", "j", "i", "g"))
    images = hl.Param(hl.Int(32), "images")
    r = hl.RDom([hl.Range(0, dy.dim(1).extent()), hl.Range(0, dy.dim(2).extent()),
                 hl.Range(0, images)])
    acc = hl.Func("acc")
    acc[co, ci, j, i, g] = hl.cast(t, 0)
    img = g * images + r.z
    acc[co, ci, j, i, g] += (inp[ci, r.x * stride + j, r.y * stride + i, img]
                             * dy[co, r.x, r.y, img])
    part = hl.Func("part")
    part[co, ci, j, i, g] = acc[co, ci, j, i, g]

    coo, coi, cio, cii, cu, cv = (hl.Var(v) for v in ("coo", "coi", "cio", "cii", "cu", "cv"))
    tail = hl.TailStrategy.GuardWithIf if guard else hl.TailStrategy.Auto
    part.split(co, coo, coi, channel_tile, tail).split(ci, cio, cii, in_tile)
    part.reorder(coi, cii, coo, cio, j, i, g).vectorize(coi, lanes).unroll(cii).parallel(g)
    acc.compute_at(part, coo).split(co, cu, cv, lanes, tail).reorder(cv, cu, ci)
    acc.vectorize(cv).unroll(cu).unroll(ci)
    acc.update().split(co, cu, cv, lanes, tail).reorder(cv, cu, ci, r.x, r.y, r.z)
    acc.update().vectorize(cv).unroll(cu).unroll(ci)
    part.compile_jit(hl.get_host_target())
    return part, inp, dy, stride, images


def padded(x: np.ndarray, pads: tuple[int, int, int, int]) -> np.ndarray:
    """NHWC ``x`` with zeros around H and W by (top, bottom, left, right) (``x`` if none)."""
    return fastpath.pad_hw(np, x, pads, 0.0) if any(pads) else x


def conv2d(padded: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
           stride: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """Convolution of the padded NHWC input ``(N, Hp, Wp, C_in)`` with ``weight``
    ``(kh, kw, C_in, C_out)`` plus ``bias`` ``(C_out,)`` (None: zero), at ``stride`` (equal in
    both axes): ``(N, Ho, Wo, C_out)`` for ``out_hw = (Ho, Wo)``."""
    hl = _halide()
    n, cout = padded.shape[0], weight.shape[3]
    if stride[0] != stride[1]:
        raise ValueError(f"native conv2d needs one stride for both axes, got {stride}")
    tile, lanes, guard = _tiles(padded.dtype, cout)
    pixels = min(8 if tile > lanes else 12, out_hw[1])
    out, inp, wt, b, s = _forward_pipeline(padded.dtype, tile, lanes, guard, pixels)
    if bias is None:
        bias = np.zeros(cout, dtype=padded.dtype)
    y = np.empty((n, *out_hw, cout), dtype=padded.dtype)
    with _lock:
        inp.set(hl.Buffer(np.ascontiguousarray(padded)))
        wt.set(hl.Buffer(np.ascontiguousarray(weight)))
        b.set(hl.Buffer(np.ascontiguousarray(bias, dtype=padded.dtype)))
        s.set(int(stride[0]))
        out.realize(hl.Buffer(y))
    return y


def conv2d_weight_grad(padded: np.ndarray, dy: np.ndarray, kernel: tuple[int, int],
                       stride: tuple[int, int]) -> np.ndarray:
    """Weight gradient ``(kh, kw, C_in, C_out)`` of :func:`conv2d` for its padded input
    ``(N, Hp, Wp, C_in)`` and output gradient ``dy`` ``(N, Ho, Wo, C_out)``."""
    hl = _halide()
    n, cin, cout = padded.shape[0], padded.shape[3], dy.shape[3]
    tile, lanes, guard = _tiles(padded.dtype, cout)
    pipeline = _weight_grad_pipeline(padded.dtype, tile, lanes, guard, _divisor_tile(cin, 8))
    per = WEIGHT_GRAD_IMAGES
    full = n // per * per
    parts = [_weight_grad_parts(pipeline, padded[:full], dy[:full], kernel, stride, per)
             if full else None,
             _weight_grad_parts(pipeline, padded[full:], dy[full:], kernel, stride, n - full)
             if full < n else None]
    return np.concatenate([p for p in parts if p is not None]).sum(axis=0)


def _weight_grad_parts(pipeline, padded: np.ndarray, dy: np.ndarray, kernel: tuple[int, int],
                       stride: tuple[int, int], per: int) -> np.ndarray:
    """The pipeline's parts ``(n/per, kh, kw, C_in, C_out)`` for ``per`` images each."""
    hl = _halide()
    part, inp, d, s, images = pipeline
    parts = np.empty((padded.shape[0] // per, *kernel, padded.shape[3], dy.shape[3]),
                     dtype=padded.dtype)
    with _lock:
        inp.set(hl.Buffer(np.ascontiguousarray(padded)))
        d.set(hl.Buffer(np.ascontiguousarray(dy)))
        s.set(int(stride[0]))
        images.set(per)
        part.realize(hl.Buffer(parts))
    return parts


def conv2d_input_grad(dy: np.ndarray, weight: np.ndarray, stride: tuple[int, int],
                      pads: tuple[int, int, int, int], in_hw: tuple[int, int]) -> np.ndarray:
    """Input gradient ``(N, H, W, C_in)`` of a convolution with ``weight``
    ``(kh, kw, C_in, C_out)``, ``stride`` and ``pads`` (top, bottom, left, right; each below the
    kernel size), for its output gradient ``dy`` ``(N, Ho, Wo, C_out)``.

    ``dy`` spread onto a grid with ``stride - 1`` zeros between its pixels (stride 1: as is),
    padded by ``k - 1 - pad`` before and by what makes the output ``in_hw`` after, convolved at
    stride 1 with the kernel flipped in space and its channel axes swapped. At stride 2 three
    quarters of the multiply-adds are with zeros; still faster than a column gradient and its
    scatter (measured), and stride-2 layers are few."""
    n, ho, wo, cout = dy.shape
    kh, kw, cin, _ = weight.shape
    s = stride[0]
    top, left = kh - 1 - pads[0], kw - 1 - pads[2]
    hg, wg = in_hw[0] + kh - 1, in_hw[1] + kw - 1
    if s == 1:
        grid = fastpath.pad_hw(np, dy, (top, hg - top - ho, left, wg - left - wo), 0.0)
    else:  # the last pixel lands at top + s*(ho - 1) <= H + pad_bottom - 1 < hg: all fit
        grid = np.zeros((n, hg, wg, cout), dtype=dy.dtype)
        grid[:, top:top + s * (ho - 1) + 1:s, left:left + s * (wo - 1) + 1:s] = dy
    flipped = np.ascontiguousarray(weight[::-1, ::-1].transpose(0, 1, 3, 2))
    return conv2d(grid, flipped, None, (1, 1), in_hw)
