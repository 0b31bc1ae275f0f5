"""The compiled input gradient of a fused ``Conv2D → ReLU → MaxPool2D`` block with one input
channel, computed from the pooled gradient (NumPy, Halide).

A first block (1 -> 32 channels 3x3 under a 2x2 pool, simple-cnn's) hands its input gradient
the :class:`~anycnn.kernels.native.Pooled` gradient: one value and one code per pooled
position and channel, the code naming the window's tap that held the maximum (or none, where
the ReLU was off). :mod:`~anycnn.kernels.native_narrow` unpools it and computes the dense
transposed convolution, vectorised over each pixel's reduction: 3/4 of its multiply-adds are
with the zeros of taps that were not their window's maximum, and every output value ends with
a horizontal sum of a vector (together half its time, measured).

This kernel *stamps* each pooled value instead. A pooled position ``q`` (window rows
``ph*yq ..``, columns ``pw*xq ..``) reaches a patch of ``(ph + kh - 1) x (pw + kw - 1)`` input
pixels (rows from ``ph*yq - pad_top``); its value of channel ``co`` with code ``a`` (the
window's tap ``(ay, ax)``) adds

    patch[i, j] += g[q, co] * w[i - ay, j - ax, 0, co]   (zero outside the kernel)

so the patch is a sum over the channels of one scalar times one row of a table
``tab[co, a, i*Wp + j]`` chosen by the code (the dead code's row is zero): ``C_out``
multiply-adds of vectors holding the patch's entries (16 of them for 3x3 under 2x2: one
AVX-512 vector, two AVX2 ones), a quarter of the dense multiply-adds and no horizontal sum.
Each multiply-add loads its table row's offset (the code clamped, computed for the image
first in vectors), the pooled value (broadcast) and the row: bound by the loads, about 1.5
cycles each (measured). The patches of neighbouring windows overlap: they are added up in
``ny * nx`` passes (4 for 3x3 under 2x2), each over the windows of one class
(``xq mod nx``, ``yq mod ny``) whose patches do not overlap, a patch row of ``Wp`` entries
one vector (a first version summing the 4 entries that reach each input pixel with gathers
spent a third of its time there). A task is one image: its patches (12.5 KB for simple-cnn)
stay in the L1 cache. simple-cnn's block at batch 64, one thread, AVX-512: 0.31-0.40 ms
against native_narrow's 0.57-0.68 (see :data:`WINDOWS`).

- :func:`input_grad` — the kernel;
- :func:`applies` — the layers it takes;
- the dispatch kernel ``conv2d_input_grad`` (a whole batch's ``Pooled`` gradient), tried
  before :mod:`~anycnn.kernels.native_narrow`'s.

Compiled per geometry once per machine (:mod:`~anycnn.kernels.kernel_cache`). Results equal
the portable path's up to rounding (``tests/test_native_stamp.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import kernel_cache, native
from .dispatch import DECLINE, implements
from .threads import _region

#: pooled positions of one row per register tile (independent chains of multiply-adds; the
#: multiply-adds wait on their loads, not on each other: 4, 7 and 14 measured alike with
#: AVX-512, 7 fastest of 3, 4 and 7 compiled for AVX2, 14 of its 16 registers accumulators)
POSITION_TILE = 7


def _patch(kernel: tuple[int, int], window: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(ny, nx, Hp, Wp)``: patches covering one input pixel along each axis, and the
    patch's height and width rounded up to whole windows (``ny*ph``, ``nx*pw``)."""
    (kh, kw), (ph, pw) = kernel, window
    ny, nx = -(-(ph + kh - 1) // ph), -(-(pw + kw - 1) // pw)
    return ny, nx, ny * ph, nx * pw


@kernel_cache.pipeline
def _stamp_pipeline(dtype: np.dtype, cout: int, kernel: tuple[int, int],
                    window: tuple[int, int], entries: int, lanes: int, tile: int,
                    parallel: bool):
    """dx[0, x, y, n] (Halide's axes are NumPy's reversed) = sum over the patches ``(xq, yq)``
    covering pixel (x + left, y + top) of patch[e, xq, yq, n], ``e = i*Wp + j`` with
    ``i = y + top - ph*yq``, ``j = x + left - pw*xq``; patch[e, xq, yq, n] = sum over co of
    dpool[co, xq, yq, n] * tab[e + entries*(min(code[co, xq, yq, n], taps) + (taps+1)*co)],
    the table computed once per call from ``wt`` (NumPy (kh, kw, 1, C_out)):
    ``tab[co, ay*pw + ax, i*Wp + j] = wt[i - ay, j - ax, 0, co]`` inside the kernel, zero
    elsewhere and in row ``taps`` (the dead code, clamped to it)."""
    hl = native._halide()
    t = native._scalar_type(hl, dtype)
    ph, pw = window
    taps = ph * pw
    ny, nx, _, wp = _patch(kernel, window)
    top, left = hl.Param(hl.Int(32), "top"), hl.Param(hl.Int(32), "left")
    dpool = hl.ImageParam(t, 4, "dpool")
    code = hl.ImageParam(hl.UInt(8), 4, "code")
    wt = hl.ImageParam(t, 4, "wt")  # NumPy (kh, kw, 1, C_out)
    for image in (dpool, code):
        image.dim(0).set_bounds(0, cout).set_stride(1)
    kh, kw = kernel
    step = 1
    for d, extent in enumerate((cout, 1, kw, kh)):
        wt.dim(d).set_bounds(0, extent).set_stride(step)
        step *= extent
    wq, hq = dpool.dim(1).extent(), dpool.dim(2).extent()

    # the table (stamp_table), flattened: k = e + entries*(a + (taps + 1)*co)
    flat = hl.Var("flat")
    ei, ai, co = flat % entries, (flat / entries) % (taps + 1), flat / (entries * (taps + 1))
    ky, kx = ei / wp - ai / pw, ei % wp - ai % pw
    tab = hl.Func("tab")
    tab[flat] = hl.select((ai < taps) & (ky >= 0) & (ky < kh) & (kx >= 0) & (kx < kw),
                       wt[co, 0, hl.clamp(kx, 0, kw - 1), hl.clamp(ky, 0, kh - 1)],
                       hl.cast(t, 0))

    e, c, xq, yq, n = (hl.Var(v) for v in ("e", "c", "xq", "yq", "n"))
    offset = hl.Func("offset")  # [c, xq, yq, n]: the table row of each pooled value
    offset[c, xq, yq, n] = (hl.min(hl.cast(hl.Int(32), code[c, xq, yq, n]), taps)
                            + (taps + 1) * c) * entries
    r = hl.RDom([hl.Range(0, cout)])
    acc = hl.Func("acc")
    acc[e, xq, yq, n] = hl.cast(t, 0)
    row = hl.unsafe_promise_clamped(offset[r, xq, yq, n], 0, cout * (taps + 1) * entries - entries)
    acc[e, xq, yq, n] += dpool[r, xq, yq, n] * tab[e + row]
    patch = hl.Func("patch")
    patch[e, xq, yq, n] = acc[e, xq, yq, n]

    # the patches added up in padded coordinates (X, Y) = (x + left, y + top): those of one
    # class (xq mod nx, yq mod ny) do not overlap, so each class is one update whose rows of
    # Wp entries are vectors (no gather, no two writes of one address in flight)
    X, Y = hl.Var("X"), hl.Var("Y")
    hp = ny * ph
    summed = hl.Func("summed")
    summed[X, Y, n] = hl.cast(t, 0)
    classes = []
    for py in range(ny):
        for px in range(nx):
            rs = hl.RDom([hl.Range(0, wp), hl.Range(0, hp), hl.Range(0, (wq - px + nx - 1) / nx),
                          hl.Range(0, (hq - py + ny - 1) / ny)])
            classes.append(rs)
            qx, qy = rs[2] * nx + px, rs[3] * ny + py
            summed[qx * pw + rs[0], qy * ph + rs[1], n] += patch[rs[1] * wp + rs[0], qx, qy, n]
    x, y, ci = hl.Var("x"), hl.Var("y"), hl.Var("ci")
    out = hl.Func("dx")
    out[ci, x, y, n] = summed[x + left, y + top, n]

    qo, qi = hl.Var("qo"), hl.Var("qi")
    out.bound(ci, 0, 1)
    dx = out.output_buffer()
    dx.dim(0).set_bounds(0, 1).set_stride(1)
    dx.dim(1).set_stride(1)
    width = dx.dim(1).extent()
    out.reorder(ci, x, y, n).unroll(ci)
    if parallel:
        out.parallel(n)
    out.specialize(width >= lanes).vectorize(x, lanes, hl.TailStrategy.ShiftInwards)
    summed.compute_at(out, n).vectorize(X, lanes, hl.TailStrategy.GuardWithIf)
    for k, rs in enumerate(classes):
        summed.update(k).allow_race_conditions().vectorize(rs.x).unroll(rs.y)
    offset.compute_at(out, n).vectorize(c, lanes, hl.TailStrategy.GuardWithIf)
    patch.bound(e, 0, entries).compute_at(out, n).split(xq, qo, qi, tile,
                                                         hl.TailStrategy.ShiftInwards)
    patch.reorder(e, qi, qo, yq, n).vectorize(e, lanes).unroll(qi)
    acc.compute_at(patch, qo).vectorize(e, lanes).unroll(xq)
    acc.update().reorder(e, xq, r, yq, n).vectorize(e, lanes).unroll(xq).unroll(r)
    fo, fi = hl.Var("fo"), hl.Var("fi")
    tab.compute_root().bound(flat, 0, cout * (taps + 1) * entries).split(
        flat, fo, fi, entries).vectorize(fi, lanes)
    return out, {"dpool": dpool, "code": code, "wt": wt}, {"top": top, "left": left}


def applies(dy: Any, weight: Any, win: Any, groups: int) -> bool:
    """Whether :func:`input_grad` computes this input gradient: a
    :class:`~anycnn.kernels.native.Pooled` gradient of NumPy float32 or float64 arrays the
    kernels compile for, over one of :data:`WINDOWS`; one input channel; an ungrouped stride-1
    convolution without dilation, top and left padding below the kernel size; patches of at
    most :data:`MAX_ENTRIES` entries."""
    if not (isinstance(dy, native.Pooled) and isinstance(dy.grad, np.ndarray)
            and isinstance(weight, np.ndarray)) or tuple(dy.window) not in WINDOWS:
        return False
    kh, kw, cin, _ = weight.shape
    _, _, hp, wp = _patch((kh, kw), tuple(dy.window))
    return (groups == 1 and cin == 1 and tuple(win.stride) == (1, 1)
            and tuple(win.dilation) == (1, 1) and not win.kernel_first
            and win.pool_order is None and 0 <= win.pads[0] < kh and 0 <= win.pads[2] < kw
            and hp * wp <= MAX_ENTRIES and dy.grad.dtype == weight.dtype
            and native.available(np, weight.dtype))


#: the most patch entries (``Hp * Wp``) it takes (7x7 kernels under a 2x2 pool: 8x8)
MAX_ENTRIES = 64

#: the pooling windows it takes: where it was measured faster than
#: :mod:`~anycnn.kernels.native_narrow` (batch 64, one thread, AVX-512, ms, this kernel
#: against that one): under a 2x2 pool at 28x28, float32, 1 -> 32 3x3 0.31/0.64, 1 -> 16
#: 0.26/0.38, 1 -> 64 0.88/1.24, 1 -> 32 5x5 1.22/1.54, 1 -> 16 5x5 0.56/0.71, 1 -> 32 7x7
#: 1.63/2.84; at 32x32 0.63/0.83; float64 1 -> 32 0.96/1.26, 1 -> 16 0.55/0.68; 8 images 0.065/
#: 0.084; 8x8 images 0.065/0.080; larger images (a task's patches then leave the L1 cache)
#: 64x64 0.26/0.52 (8 images), 128x128 0.52/0.92 (4), 224x224 0.75/1.31 (2); both compiled
#: for AVX2 (8 lanes, 16 registers; run on the same Xeon), 1 -> 32 3x3 0.61/1.01. Under a
#: 3x3 pool (6x6 patches for a 3x3 kernel, whose rows of 6 entries are odd vectors) 0.90
#: against 0.63 at 27x27
WINDOWS = frozenset({(2, 2)})


def input_grad(dy: native.Pooled, weight: np.ndarray, pads: tuple[int, int, int, int],
               in_hw: tuple[int, int]) -> np.ndarray:
    """Input gradient ``(N, H, W, 1)``, ``in_hw = (H, W)``, of the stride-1 convolution with
    ``weight`` ``(kh, kw, 1, C_out)`` and ``pads`` (top, bottom, left, right) under a fused
    ReLU and max pool, for its :class:`~anycnn.kernels.native.Pooled` gradient ``dy``."""
    kh, kw, _, cout = weight.shape
    dtype = np.dtype(weight.dtype)
    lanes = native.vector_lanes(dtype)
    window = tuple(dy.window)
    n = dy.grad.shape[0]
    dx = np.empty((n, *in_hw, 1), dtype=dtype)
    if dx.size == 0:
        return dx
    _, _, hp, wp = _patch((kh, kw), window)
    entries = -(-hp * wp // lanes) * lanes
    wq = dy.grad.shape[2]
    tile = min(POSITION_TILE, wq)
    parallel = not getattr(_region, "active", False)
    pipeline = _stamp_pipeline(dtype, cout, (kh, kw), window, entries, lanes, tile, parallel)
    pipeline.run({**dy.arrays(), "wt": native.operand(weight)}, {"top": pads[0], "left": pads[2]},
                 [dx])
    return dx


@implements("conv2d_input_grad")
def conv2d_input_grad_kernel(dy: Any, weight: Any, win: Any, groups: int) -> Any:
    """The input gradient of a convolution over ``win`` for a fused block's whole ``Pooled``
    gradient ``dy``, when :func:`applies`; else :data:`~anycnn.kernels.dispatch.DECLINE`."""
    if not applies(dy, weight, win, groups):
        return DECLINE
    return input_grad(dy, weight, win.pads, win.in_hw)
