"""The weight gradient of a stride-1 convolution, chunk by chunk of its input (Halide, NumPy).

:func:`anycnn.kernels.native.conv2d_weight_grad`'s general kernel sums one register tile (input
channels by output channels, one kernel tap) over all the output pixels of a group of images
before it moves to the next tile: each tile streams the group's output gradient and its padded
copy of the input again, from the L2 cache, and each multiply-add needs a load of its own
where the output channels fill one vector (16 -> 16 channels).

:func:`weight_grad` computes the same parts another way round, for stride 1:

- the sums run over the *input* pixels, read in place (no padded copy): input pixel ``p`` meets
  the gradient at output pixel ``p + pad - tap``, and a zero-padded copy of the gradient, made
  for each chunk (a few KiB), gives the zeros at the borders; gradient rows that are padding
  for a tap row are skipped;
- a register tile spans a row of kernel taps: ``in_tile`` input channels by ``kw`` taps by one
  vector of output channels (24 accumulators with 32 registers, 12 with 16; the gradient
  vectors of ``kw`` pixels take 3 more, where two vectors of channels would take 6 and spill:
  10-20% slower, measured). Going along a row of input pixels, each input value is broadcast
  once and meets ``kw`` gradient vectors, and each gradient vector is loaded once and serves
  ``kw`` consecutive input pixels: about a load per 3 multiply-adds, where the general kernel
  has one per 1-1.6;
- the pixels are taken a chunk at a time (:data:`CHUNK_PIXELS`: rows of one image, or whole
  images when an image is smaller): the chunk's input and gradient stay in the L1 cache while
  every tile and every tap row sums over it; each tile's sums over the chunk are then added
  to the part's weight gradient in memory.

Measured on one core of a Xeon with AVX-512 (CPU time, float32, batch 128, resnet20's 3x3
layers, minima of 15 alternating runs): 16 -> 16 channels at 32x32 4.0 ms against 4.6 for
the general kernel, 32 -> 32 at 16x16 3.6 against 4.4, 64 -> 64 at 8x8 3.5 against 5.0
(PyTorch's channels_last weight gradient there: 4.0, 3.6, 3.7); 3 -> 16 (a first layer)
level with the general kernel's tiles over all 9 taps.

Same parts, operands and layout as the general kernel (``part[g]`` sums the images of group
``g``; the caller sums the parts in order); only the order of the sums within a part differs
(rounding). Used where :func:`tiling` finds a tile (stride 1, a gradient given as an array,
not pooled); elsewhere the general kernel runs.
"""

from __future__ import annotations

import numpy as np

from . import kernel_cache
from .native import _halide, _scalar_type, registers

#: pixels per chunk, at most (whole rows of one image; or whole images, when one has fewer)
CHUNK_PIXELS = 512
#: accumulators in a register tile, at most, by the CPU's vector registers (32: AVX-512 and
#: NEON; 16: AVX2): the others hold the gradient vectors of ``kw`` pixels and the broadcast
#: input value. Measured with AVX2 code on the Xeon (one core, batch 128): 12 (4 input
#: channels by 3 taps) 7.3 / 7.4 / 6.2 ms for 16-16 / 32-32 / 64-64 against 8.8 / 9.5 / 10.1
#: for the general kernel's AVX2 tiles; 9 or 6 no faster than the general kernel. On an AMD
#: Zen 4 (AVX-512 as two 256-bit halves; one core, batch 32, medians of 3 x 41 interleaved
#: runs): 24 (8 x 3) 1.47 / 1.38 / 1.33 ms for 16-16 / 32-32 / 64-64, 12 (4 x 3) 1.44 / 1.37 /
#: 1.30, 48 (16 x 3) 2.2-3.6, chunks of 256 pixels 1.43 / 1.36 / 1.32, PyTorch channels_last
#: 1.62 / 1.55 / 1.53: no change there beats 24 by 3%, nor moves a training step
MOST_ACCUMULATORS = {32: 24, 16: 12}
#: input pixels of a row unrolled in the innermost loop
UNROLL = 4


def tiling(stride: int, pooled: bool, channels: tuple[int, int], lanes: int,
           kernel: tuple[int, int], in_hw: tuple[int, int], per: int,
           rest: int) -> tuple[int, int, int] | None:
    """``(in_tile, rows, images)`` for :func:`weight_grad` (input channels per tile, input rows
    and images per chunk), or None where it does not apply: a stride above 1, a ``pooled``
    gradient, output channels (of ``channels``, (C_in, C_out)) that do not fill vectors of
    ``lanes``, or no tile of one vector of output channels by ``kw`` taps by a divisor of C_in
    within :data:`MOST_ACCUMULATORS` (with 16 registers: none that fills them; smaller tiles
    were no faster than the general kernel's there).
    ``per`` and ``rest``: the images of a whole part and of the last one (0: none), which
    ``images`` divides."""
    cin, cout = channels
    if stride != 1 or pooled or cout % lanes:
        return None
    kw, wide = kernel[1], registers().count >= 32
    most = MOST_ACCUMULATORS[32 if wide else 16]
    in_tile = next((t for t in range(min(most // kw, cin), 0, -1) if cin % t == 0), 0)
    if in_tile == 0 or not (wide or in_tile * kw == most):
        return None
    height, width = in_hw
    most = max(1, CHUNK_PIXELS // max(width, 1))
    rows = next(r for r in range(min(most, height), 0, -1) if height % r == 0)
    images = 1
    if rows == height:  # whole images: as many as fit, dividing both parts' image counts
        fit = max(1, CHUNK_PIXELS // max(height * width, 1))
        images = next(m for m in range(min(fit, per), 0, -1)
                      if per % m == 0 and rest % m == 0)
    return in_tile, rows, images


@kernel_cache.pipeline
def _chunked_pipeline(dtype: np.dtype, lanes: int, geometry: tuple[int, int, int, int],
              chunking: tuple[int, int, int]):
    """part[co, ci, j, i, g] = sum over images g*G .. g*G+G-1 (G = the ``images`` parameter)
    and input pixels (x, y) of inp[ci, x, y, n] * dyp[co, x + left - j, y + top - i, n]
    (``dyp``: the gradient ``dy``, zero outside it), for ``geometry`` (C_in, C_out, kh, kw)
    and ``chunking`` (``in_tile``, rows, images) of :func:`tiling`: chunks of that many input
    rows of that many images, each summed into every register tile of ``in_tile`` input
    channels by ``kw`` taps by one vector of ``lanes`` output channels, for each tap row. The
    input height must be a multiple of the rows, G of the images, C_out of the lanes."""
    hl = _halide()
    t = _scalar_type(hl, dtype)
    cin, cout, kh, kw = geometry
    in_tile, rows, per_chunk = chunking
    inp, dy = hl.ImageParam(t, 4, "inp"), hl.ImageParam(t, 4, "dy")
    width, height = dy.dim(1).extent(), dy.dim(2).extent()
    images = hl.Param(hl.Int(32), "images")
    top, left = hl.Param(hl.Int(32), "top"), hl.Param(hl.Int(32), "left")
    c, x, y, n = (hl.Var(v) for v in ("c", "x", "y", "n"))
    dyp = hl.Func("dyp")
    dyp[c, x, y, n] = hl.select(hl.likely((x >= 0) & (x < width) & (y >= 0) & (y < height)),
                                dy[c, hl.clamp(x, 0, width - 1), hl.clamp(y, 0, height - 1), n],
                                hl.cast(t, 0))
    co, ci, j, i, yc, nc, g = (hl.Var(v) for v in ("co", "ci", "j", "i", "yc", "nc", "g"))
    rp = hl.RDom([hl.Range(0, inp.dim(1).extent()), hl.Range(0, rows), hl.Range(0, per_chunk)])
    row, image = yc * rows + rp.y, nc * per_chunk + rp.z
    rp.where(row + top - i >= 0)  # a gradient row of padding: nothing to add
    rp.where(row + top - i < height)
    chunk = hl.Func("chunk")
    chunk[co, ci, j, i, yc, nc] = hl.cast(t, 0)
    chunk[co, ci, j, i, yc, nc] += (inp[ci, rp.x, row, image]
                                    * dyp[co, rp.x + left - j, row + top - i, image])
    rc = hl.RDom([hl.Range(0, inp.dim(2).extent() / rows), hl.Range(0, images / per_chunk)])
    part = hl.Func("part")
    part[co, ci, j, i, g] = hl.cast(t, 0)
    part[co, ci, j, i, g] += chunk[co, ci, j, i, rc.x, g * (images / per_chunk) + rc.y]
    out = part.output_buffer()
    out.dim(0).set_bounds(0, cout)  # constant offsets in the tiles
    out.dim(1).set_bounds(0, cin).set_stride(cout)
    out.dim(2).set_bounds(0, kw).set_stride(cout * cin)
    out.dim(3).set_bounds(0, kh).set_stride(cout * cin * kw)
    inp.dim(0).set_bounds(0, cin)
    dy.dim(0).set_bounds(0, cout)

    part.vectorize(co, lanes).parallel(g)
    coo, coi, cio, cii = (hl.Var(v) for v in ("coo", "coi", "cio", "cii"))
    update = part.update()  # chunks, then tap rows, then tiles
    update.split(co, coo, coi, lanes).split(ci, cio, cii, in_tile)
    update.reorder(coi, cii, j, coo, cio, i, rc.x, rc.y, g)
    update.vectorize(coi).unroll(cii).unroll(j).parallel(g)
    chunk.compute_at(part, coo).reorder(co, ci, j).vectorize(co).unroll(ci).unroll(j)
    step = chunk.update()  # along a row: each input value meets kw gradient vectors
    step.reorder(co, j, ci, rp.x, rp.y, rp.z)
    step.vectorize(co).unroll(j).unroll(ci).unroll(rp.x, UNROLL)
    dyp.compute_at(part, rc.x).vectorize(c, lanes, hl.TailStrategy.GuardWithIf)
    return part, {"inp": inp, "dy": dy}, {"images": images, "top": top, "left": left}


def weight_grad(dtype: np.dtype, lanes: int, geometry: tuple, chunking: tuple[int, int, int]):
    """The compiled pipeline of :func:`_chunked_pipeline` for vectors of ``lanes``, ``geometry``
    (C_in, C_out, kh, kw; C_out a multiple of the lanes) and ``chunking`` (:func:`tiling`):
    run it as the general weight-gradient pipeline (same operands, scalars and parts)."""
    return _chunked_pipeline(dtype, lanes, tuple(geometry), tuple(chunking))
