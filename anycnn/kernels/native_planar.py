"""The compiled input gradient of a one-channel convolution under a max pool, vectorised over
pixels (NumPy, Halide).

LeNet's first layer (1 -> 6 channels, 5x5) under its 2x2 max pool hands its input gradient
the row gradient of the fused block in pool-plane order (:mod:`anycnn.nn.fusion`): rows
``(N, ph*pw*Hq*Wq, C_out)``, the pooled windows' taps as planes, zero where a tap was not its
window's maximum. :func:`~anycnn.kernels.native_narrow.input_grad` vectorises over each
pixel's reduction (``kw*C_out`` contiguous entries per kernel row) and ends every output value
with a horizontal sum of one vector (half its time, measured). This kernel vectorises over the
output pixels instead, so no value ends with a horizontal sum: the output columns of one phase
``s`` modulo ``pw`` (``x = pw*m + s``) read, for each kernel tap ``kx``, one tap column of the
pool planes (``(s + kx - left) mod pw``) at one offset, contiguous in ``m`` once each image's
planes are copied channel-major (one dense load and shuffles per pool-plane row: Halide stages
the six strided loads). Per output row, ``kh*kw*C_out`` multiply-adds of a vector of ``Wq``
lanes per phase, at about the machine's multiply-add rate (measured): 3/4 of them multiply
the zeros of positions that were not their window's maximum, but a scatter of each pooled
value (4x fewer multiply-adds) has no uniform vector form (where a value lands depends on its
window's maximum), and a scalar one costs more than these vectors (about 30 000 scalar
multiply-adds with a load and a store each per 28x28 image, against 8 400 vector ones).

- :func:`input_grad` — the kernel;
- :func:`applies` — the layers it takes (see :func:`applies`).

Compiled per layer geometry (image width, kernel, channels, pool window, padding) once per
machine (:mod:`~anycnn.kernels.kernel_cache`). Results equal the portable path's up to
rounding (``tests/test_native_planar.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import kernel_cache, native

#: output rows per register tile: ``pw`` phases times this many rows are the independent
#: chains of multiply-adds (measured at batch 32, LeNet's 1 -> 6, one thread, AVX-512: 2 rows
#: 0.108 ms, 4 rows 0.111, 1 row 0.145; the kernel rows unrolled too, 0.119-0.147)
TILE_ROWS = 2

#: the most output channels it takes, and the fewest columns per phase: measured at batch 32,
#: one thread, AVX-512, float32, 1 -> C_out under a 2x2 pool (ms, this kernel against
#: native_narrow's): 28x28 5x5 C_out 4 0.075/0.119, 6 0.111/0.141, 8 0.184/0.163, 10
#: 0.234/0.257, 16 0.405/0.258; 3x3 6 0.068/0.106, 8 0.121/0.091, 12 0.186/0.153, 32
#: 0.57/0.31; 1 -> 6 5x5 at 32x32 0.130/0.174, 24x24 0.097/0.109, 16x16 0.062/0.058,
#: 12x12 0.057/0.039
MAX_OUTPUT_CHANNELS = 6
MIN_PHASE_WIDTH = 12


@kernel_cache.pipeline
def _planar_pipeline(dtype: np.dtype, cout: int, kernel: tuple[int, int],
                     window: tuple[int, int], width: int, pooled_width: int, left: int,
                     lanes: int, parallel: bool):
    """dx[0, x, y, n] (Halide's axes are NumPy's reversed) of one input channel: for
    ``x = pw*m + s``, sum over ky, kx, co of plane[m + o, co, tx, y + ky, n] *
    wt[co, 0, kw-1-kx, kh-1-ky] with ``e = s + kx - left``, ``o = e div pw``,
    ``tx = e mod pw``; ``plane`` is the pool-plane rows ``rows`` [c, wq, hq, tap, n]
    channel-major, zero outside the output (rows shifted down by ``top``)."""
    hl = native._halide()
    t = native._scalar_type(hl, dtype)
    kh, kw = kernel
    ph, pw = window
    wq = pooled_width
    zero = hl.cast(t, 0)
    top = hl.Param(hl.Int(32), "top")
    rows = hl.ImageParam(t, 5, "rows")
    rows.dim(0).set_bounds(0, cout).set_stride(1)
    rows.dim(1).set_bounds(0, wq).set_stride(cout)
    rows.dim(2).set_stride(cout * wq)
    wt = hl.ImageParam(t, 4, "wt")  # NumPy (kh, kw, 1, C_out)
    step = 1
    for d, extent in enumerate((cout, 1, kw, kh)):
        wt.dim(d).set_bounds(0, extent).set_stride(step)
        step *= extent
    hq = rows.dim(2).extent()
    offsets = [(s + kx - left) // pw for s in range(pw) for kx in range(kw)]
    pad = max(0, -min(offsets))  # plane columns left of the output

    mm, co, tx, yy, n = (hl.Var(v) for v in ("mm", "co", "tx", "yy", "n"))
    plane = hl.Func("plane")  # [mm, co, tx, yy, n]: column mm - pad of tap column tx
    # every column a vector of acc reads is written (garbage there could be subnormal: slow);
    # only the columns left and right of the copied ones are zeroed first (zeroing every
    # column cost 4% more, measured)
    columns = max(-(-(width // pw) // lanes) * lanes + max(offsets), wq) + pad
    plane[mm, co, tx, yy, n] = hl.undef(t)
    borders = []
    for lo, hi in ((0, pad), (pad + wq, columns)):
        if hi > lo:
            borders.append(hl.RDom([hl.Range(lo, hi - lo)]))
            plane[borders[-1], co, tx, yy, n] = zero
    ys = yy - top
    inside = (ys >= 0) & (ys < hq * ph)
    ysc = hl.clamp(ys, 0, hq * ph - 1)
    piece = min(lanes, 1 << (wq.bit_length() - 1))  # columns copied per vector
    starts = sorted({*range(0, wq - piece + 1, piece), wq - piece})
    rx = hl.RDom([hl.Range(0, piece)])
    for start in starts:  # the last piece shifted inwards (columns written twice alike)
        plane[rx + start + pad, co, tx, yy, n] = hl.select(
            inside, rows[co, rx + start, ysc / ph, (ysc % ph) * pw + tx, n], zero)

    m, s, y = hl.Var("m"), hl.Var("s"), hl.Var("y")
    r = hl.RDom([hl.Range(0, cout), hl.Range(0, kw), hl.Range(0, kh)])
    e = s + r.y - left
    acc = hl.Func("acc")  # [m, s, y, n]
    acc[m, s, y, n] = zero
    acc[m, s, y, n] += (plane[m + e / pw + pad, r.x, e % pw, y + r.z, n]
                        * wt[r.x, 0, kw - 1 - r.y, kh - 1 - r.z])

    x, ci = hl.Var("x"), hl.Var("ci")
    out = hl.Func("dx")
    out[ci, x, y, n] = acc[x / pw, x % pw, y, n]

    xm, xs, yo, yi = (hl.Var(v) for v in ("xm", "xs", "yo", "yi"))
    out.bound(ci, 0, 1).bound(x, 0, width)
    dx = out.output_buffer()
    dx.dim(0).set_bounds(0, 1).set_stride(1)
    dx.dim(1).set_bounds(0, width).set_stride(1)
    dx.dim(2).set_stride(width)
    out.split(y, yo, yi, TILE_ROWS, hl.TailStrategy.ShiftInwards)
    out.split(x, xm, xs, pw).reorder(ci, xs, xm, yi, yo, n).unroll(ci).unroll(xs)
    out.vectorize(xm, width // pw).unroll(yi)
    if parallel:
        out.parallel(n)
    plane.bound(mm, 0, columns).compute_at(out, n)
    for k, rb in enumerate(borders):
        plane.update(k).reorder(rb, co, tx, yy, n).unroll(rb).unroll(co).unroll(tx)
    for k in range(len(starts)):
        plane.update(len(borders) + k).reorder(rx, co, tx, yy, n).vectorize(rx).unroll(
            co).unroll(tx)
    acc.compute_at(out, yo).reorder(m, s, y, n).vectorize(m, lanes, hl.TailStrategy.RoundUp)
    acc.unroll(s).unroll(y)
    acc.update().reorder(m, s, y, r.x, r.y, r.z, n).vectorize(m, lanes, hl.TailStrategy.RoundUp)
    acc.update().unroll(s).unroll(y).unroll(r.x).unroll(r.y)  # a loop over the kernel rows
    return out, {"rows": rows, "wt": wt}, {"top": top}


def applies(d: Any, weight: Any, win: Any, groups: int) -> bool:
    """Whether :func:`input_grad` takes this input gradient: NumPy float row gradients ``d``
    (N, P, C_out) in the order of pooling windows that tile the output (``win.pool_order``),
    where it was measured faster than :mod:`~anycnn.kernels.native_narrow`: one input channel,
    at most :data:`MAX_OUTPUT_CHANNELS`, vectors of 16 lanes (float32 on AVX-512; float64 was
    2x slower there), an input width a multiple of the pool's whose phases (``W / pw``
    columns) fill :data:`MIN_PHASE_WIDTH` to 16 lanes; an ungrouped stride-1 convolution
    without dilation, top and left padding below the kernel size, and at least
    :data:`TILE_ROWS` input rows."""
    if not (isinstance(d, np.ndarray) and isinstance(weight, np.ndarray)) or d.ndim != 3:
        return False
    kh, kw, cin, cout = weight.shape
    if (groups != 1 or cin != 1 or cout > MAX_OUTPUT_CHANNELS or win.pool_order is None
            or tuple(win.stride) != (1, 1) or tuple(win.dilation) != (1, 1)
            or win.kernel_first or not (0 <= win.pads[0] < kh and 0 <= win.pads[2] < kw)
            or d.dtype != weight.dtype or not native.available(np, d.dtype)
            or native.vector_lanes(d.dtype) != 16):
        return False
    (ph, pw), (sh, sw) = win.pool_order
    hq, wq = win.pooled_out
    h, w = win.in_hw
    return ((sh, sw) == (ph, pw) and (hq * ph, wq * pw) == tuple(win.out)
            and w % pw == 0 and MIN_PHASE_WIDTH <= w // pw <= 16 and h >= TILE_ROWS)


def input_grad(d: np.ndarray, weight: np.ndarray, win: Any, parallel: bool) -> np.ndarray:
    """Input gradient ``(N, H, W, 1)`` of the convolution over ``win`` (see :func:`applies`)
    for its row gradient ``d`` (N, ph*pw*Hq*Wq, C_out) in (pool tap, pooled position) order;
    ``parallel``: images on the kernels' threads."""
    kh, kw, _, cout = weight.shape
    dtype = np.dtype(weight.dtype)
    n = d.shape[0]
    (ph, pw), _ = win.pool_order
    hq, wq = win.pooled_out
    dx = np.empty((n, *win.in_hw, 1), dtype=dtype)
    if dx.size == 0:
        return dx
    pipeline = _planar_pipeline(dtype, cout, (kh, kw), (ph, pw), win.in_hw[1], wq,
                                kw - 1 - win.pads[2], native.vector_lanes(dtype), parallel)
    rows = native.operand(np.reshape(d, (n, ph * pw, hq, wq, cout)))
    pipeline.run({"rows": rows, "wt": native.operand(weight)}, {"top": kh - 1 - win.pads[0]},
                 [dx])
    return dx
