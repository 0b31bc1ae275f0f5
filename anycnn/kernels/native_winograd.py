"""Winograd F(2x2, 3x3) convolutions: the compiled kernels' 3x3 stride-1 layers with 4 in
place of 9 multiply-adds per output (NumPy, Halide).

A 3x3 correlation computes each 2x2 block of outputs from a 4x4 patch ``d`` of its (padded)
input; Winograd's minimal filtering writes it as

    Y = A^T [ sum over input channels of (G g G^T) * (B^T d B) ] A

with ``g`` the 3x3 kernel of one (output, input) channel pair, ``*`` elementwise on 4x4
matrices, and constant matrices whose entries are 0, 1, -1 and 1/2 (:data:`G`, :data:`BT`,
:data:`AT`; rows of ``d``, ``g`` and ``Y`` are image rows, columns image columns). The sum over
input channels of the 16 products is 16 independent matrix products ``U[a, b] V[a, b]``:
16 multiply-adds per 4 outputs and channel pair, against 36 for the direct kernel; the
transforms of ``d`` (adds only, once per input channel and block, shared by every output
channel) and of the sums (once per output channel and block) are the extra work.

The kernel (:func:`_pipeline`), for an NHWC input and one image's rows of blocks per task:

- ``U`` (C_out, C_in, 4, 4): the weights' transform, once per call (a few microseconds: the
  weights are small), or for an input gradient that of the flipped kernel with its channel axes
  swapped (``adjoint``: the input gradient of a stride-1 3x3 layer is such a convolution of its
  output gradient, see :func:`anycnn.kernels.native.conv2d_input_grad`);
- per block of :func:`tiling`'s ``blocks`` 2x2 output blocks along a row: the input's transform
  ``V`` (all input channels, vectors of channels), then for each tile of output channels the
  16 products accumulated in registers (``blocks`` x one or two vectors of channels, the input
  channels the reduction), then the output transform plus the bias (and an ``addend``, a ReLU,
  or a 2x2 max pool with the fused block's codes: :func:`anycnn.kernels.native._pooled`'s
  rules).

The weight gradient is the adjoint (:func:`_weight_grad_pipeline`): for each 2x2 block of the
output gradient ``dY`` and the 4x4 input patch ``d`` its outputs were computed from,
``M += (A dY A^T) * (B^T d B)`` per channel pair (16 products against 36 multiply-adds), summed
over a part's images a chunk of blocks at a time in register tiles of input by output
channels, then ``G^T M G`` is the part's 3x3 gradient. Same parts and operands as
:func:`anycnn.kernels.native.conv2d_weight_grad`'s other kernels. A fused Conv-ReLU-MaxPool
block's 2x2 pooling windows are these blocks: its gradients are computed from the pooled
gradient and the codes (the window's gradient is the pooled value at the coded tap), the
input gradient's input unpooled as it is read.

The output is written through a view (N, Ho/2, 2, Wo/2, 2, C) of the NHWC array: Halide's
axes (c, p, bx, q, by, n), ``x = 2 bx + p``, ``y = 2 by + q``; a pooled output is
(N, Ho//2, Wo//2, C) itself.

Measured (AMD EPYC Zen 4, one thread, batch 64, float32, resnet20's layers with a residual
addend and ReLU, medians of 15): 16 channels at 32x32 2.4 against the direct kernel's 3.4 ms,
32 at 16x16 2.0 against 3.2, 64 at 8x8 1.5 against 3.2; the weight gradient without addend
at batch 128 4.8 against :mod:`~anycnn.kernels.native_wgrad`'s 6.3 ms, 3.8 against 5.4, 3.3
against 5.0 (at batch 32: 0.91 against 1.40, 0.90 against 1.31, 0.92 against 1.29). Results
equal the direct kernel's up
to rounding (relative 1e-6 of the largest output in float32: the transforms' entries are
exact in binary); ``tests/test_native_winograd.py`` compares them with the portable path.
``ANYCNN_WINOGRAD=0`` keeps the direct kernels.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from . import kernel_cache, native

#: the kernel's transform, (4, 3): rows are the 4 points a 3-tap filter is evaluated at
G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
#: the input's transform, B^T (4, 4)
BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
#: the output's transform, A^T (2, 4)
AT = ((1, 1, 1, 0), (0, 1, -1, -1))

#: 2x2 output blocks of one row per task step at most (the register tile's rows: with one
#: vector of output channels, 4 measured fastest of 2, 4, 8 and 16 for 16 channels at 32x32 on
#: an AMD Zen 4; 8 accumulators in flight where one vector operation is whole, below)
MOST_BLOCKS = 4
#: output pixels (images x rows x columns) a call needs for these kernels, at least: below,
#: the kernel's transform and the threads' start outweigh the saved multiply-adds. resnet20's
#: eval forward (Zen 4, 2 threads, the kernels alternated in one process) at batch 1 took
#: 1.06-1.08x the direct kernels' time with every 3x3 layer on them, 1.07-1.10x from 1024
#: pixels (its 16-channel layers), 1.00-1.02x from 2048 (none; the A/B's own bias is 1.02x);
#: from 2048, batch 2 / 4 / 8: 0.95x / 0.93x / 0.84x
MIN_PIXELS = 2048
#: channel pairs (C_in * C_out) these kernels take at most: the kernel's transform (16 values
#: a pair) is read again for every block of output blocks, and past this it no longer stays in
#: the cache (2 threads, Zen 4: 256 -> 256 channels at 14x14 0.63-0.79x the direct
#: kernels' time; 512 -> 512 at 14x14 0.95-1.05x, 1024 -> 1024 at 8x8 1.05x)
MOST_CHANNEL_PAIRS = 256 * 256
#: the kernel's transform runs on the kernels' threads from this many channel pairs (C_in *
#: C_out) up; on one thread below (the threads' start cost more than 64 x 64 pairs' transform)
PARALLEL_TRANSFORM = 128 * 128
#: rows of 2x2 blocks per task (8 output rows, as the direct kernel's tasks)
BLOCK_ROWS = 4


def enabled() -> bool:
    """Whether these kernels replace the direct ones where they apply (``ANYCNN_WINOGRAD``,
    default on; read at each call: a test or a benchmark may switch it)."""
    return os.environ.get("ANYCNN_WINOGRAD", "1") != "0"


def suits(wshape: tuple, dtype: np.dtype, stride: int, spread: int, unpool: Any, pool: Any,
          out_hw: tuple, taps: tuple | None, images: int) -> bool:
    """Whether the forward (or input-gradient) convolution :func:`anycnn.kernels.native._forward`
    was given is one of these kernels': a 3x3 kernel at stride 1 over an unspread input (an
    input gradient's may be a pooled gradient under 2x2 pools), input and output channels
    filling whole vectors (the transforms run on vectors of them, with no guarded tail; a first
    layer's 1-3 channels stay with the direct kernels), all taps (an input gradient's:
    flipped), at most :data:`MOST_CHANNEL_PAIRS` channel pairs, whole 2x2 output blocks (an
    even output, or a 2x2 pool over it) and at least :data:`MIN_PIXELS` outputs per channel
    over the ``images``."""
    if wshape[:2] != (3, 3) or stride != 1 or spread != 1:
        return False
    if unpool is not None and (taps is None or tuple(unpool) != (2, 2)):
        return False
    lanes = native.vector_lanes(dtype)
    if wshape[2] % lanes or wshape[3] % lanes or wshape[2] * wshape[3] > MOST_CHANNEL_PAIRS:
        return False
    if not enabled() or min(out_hw) < 2 or images * out_hw[0] * out_hw[1] < MIN_PIXELS:
        return False
    if taps is not None and taps != (3, 3, 2, 2, 1):
        return False
    if pool is not None:
        return tuple(pool) == (2, 2)
    return out_hw[0] % 2 == 0 and out_hw[1] % 2 == 0


def _sum(hl, terms: list) -> Any:
    """The sum of ``(coefficient, expression)`` terms, coefficients 1 and -1 as adds and
    subtracts, zero terms left out."""
    total = None
    for c, e in terms:
        if c == 0:
            continue
        e = e if isinstance(e, hl.Expr) else hl.Expr(e)  # a Func's FuncRef
        if c not in (1, -1):
            c, e = 1, e * hl.cast(e.type(), c)
        if total is None:
            total = e if c == 1 else -e
        else:
            total = total + e if c == 1 else total - e
    return total


def _by_index(hl, values: dict, a, b) -> Any:
    """One expression of Vars ``a``, ``b`` choosing ``values[(ia, ib)]`` (a chain of selects:
    the loops over ``a`` and ``b`` are unrolled, so each copy keeps its own expression)."""
    chosen = None
    for (ia, ib), e in values.items():
        chosen = e if chosen is None else hl.select((a == ia) & (b == ib), e, chosen)
    return chosen


def _input_transform(hl, grid, c, b, a, bx, by, n):
    """``V[c, b, a, bx, by, n] = (B^T d B)[a, b]``, ``d`` the 4x4 patch of ``grid`` (the padded
    input, (c, x, y, n)) at (2 bx, 2 by): adds only, for the forward and the weight gradient."""
    v = hl.Func("V")
    v[c, b, a, bx, by, n] = _by_index(hl, {
        (ia, ib): _sum(hl, [(BT[ia][r] * BT[ib][s], grid[c, 2 * bx + s, 2 * by + r, n])
                            for r in range(4) for s in range(4)])
        for ia in range(4) for ib in range(4)}, a, b)
    return v


@kernel_cache.pipeline
def _pipeline(dtype: np.dtype, channels: tuple[int, int], tiling: tuple[int, int, int],
              addend: bool, relu: bool, pool: bool, codes: bool, adjoint: bool,
              unpool: bool):
    """The Winograd convolution (module docstring) for ``channels`` (C_in, C_out) known when
    it compiles, ``tiling`` (vectors of output channels per tile, blocks per tile, lanes);
    ``wt`` the weight (3, 3, C_in, C_out) in NumPy's order, or with ``adjoint`` the weight
    (3, 3, C_out, C_in) of the layer whose input gradient this is. With ``pool``, a 2x2 max pool
    of the ReLU'd sums (and with ``codes`` the fused block's codes); else the output's view
    (c, p, bx, q, by, n), plus ``addend`` (the same view) with ``addend``, then a ReLU with
    ``relu``. With ``unpool`` (an input gradient), the input is the pooled gradient ``dpool``
    and its ``code`` of a fused block under 2x2 pools, unpooled as it is read
    (:func:`anycnn.kernels.native._gradient_source`)."""
    hl = native._halide()
    t = native._scalar_type(hl, dtype)
    cin, cout = channels
    vectors, blocks, lanes = tiling
    top, left = hl.Param(hl.Int(32), "top"), hl.Param(hl.Int(32), "left")
    if unpool:
        source, images, extent = native._gradient_source(hl, t, (2, 2))
        images["dpool"].dim(0).set_bounds(0, cin)
    else:
        inp = hl.ImageParam(t, 4, "inp")
        source, images, extent = inp, {"inp": inp}, (inp.dim(1).extent(), inp.dim(2).extent())
        inp.dim(0).set_bounds(0, cin)
    grid, gc = native._spread_padded(hl, source, extent, 1, top, left)
    wt = hl.ImageParam(t, 4, "wt")
    step = 1
    for d, extent in enumerate((cin, cout, 3, 3) if adjoint else (cout, cin, 3, 3)):
        wt.dim(d).set_bounds(0, extent).set_stride(step)
        step *= extent
    bias, plus = hl.ImageParam(t, 1, "bias"), hl.ImageParam(t, 6, "addend")
    co, ci, a, b = hl.Var("co"), hl.Var("ci"), hl.Var("a"), hl.Var("b")
    bx, by, n, p, q = (hl.Var(v) for v in ("bx", "by", "n", "p", "q"))

    def tap(i: int, j: int):
        """The weight of output channel ``co``, input channel ``ci`` at kernel row i, column j."""
        return wt[ci, co, 2 - j, 2 - i] if adjoint else wt[co, ci, j, i]

    u = hl.Func("U")  # U[co, ci, b, a] = (G g G^T)[a, b]
    u[co, ci, b, a] = _by_index(hl, {
        (ia, ib): _sum(hl, [(G[ia][i] * G[ib][j], tap(i, j))
                        for i in range(3) for j in range(3)])
        for ia in range(4) for ib in range(4)}, a, b)
    v = _input_transform(hl, grid, ci, b, a, bx, by, n)
    rc = hl.RDom([hl.Range(0, cin)])
    acc = hl.Func("acc")
    acc[co, b, a, bx, by, n] = hl.cast(t, 0)
    acc[co, b, a, bx, by, n] += u[co, rc.x, b, a] * v[rc.x, b, a, bx, by, n]
    m = hl.Func("M")
    m[co, b, a, bx, by, n] = acc[co, b, a, bx, by, n]

    def block(ip: int, iq: int):
        """The output at (2 bx + ip, 2 by + iq): A^T M A, without the bias."""
        return _sum(hl, [(AT[iq][ia] * AT[ip][ib], m[co, ib, ia, bx, by, n])
                     for ia in range(4) for ib in range(4)])

    out = hl.Func("winograd")
    if pool:  # the window's taps row-major, as the direct kernels' pools
        value, code = native._pool_window(hl, [block(k % 2, k // 2) for k in range(4)],
                                          bias[co])
        out[co, bx, by, n] = hl.Tuple([value, code]) if codes else value
    else:
        z = _by_index(hl, {(ip, iq): block(ip, iq) for ip in range(2) for iq in range(2)},
                      p, q) + bias[co]
        if addend:
            z = z + plus[co, p, bx, q, by, n]
        out[co, p, bx, q, by, n] = native._relu_of(hl, z) if relu else z
        for d in (1, 3):
            out.output_buffer().dim(d).set_bounds(0, 2)
            plus.dim(d).set_bounds(0, 2)
    out.output_buffers()[0].dim(0).set_bounds(0, cout)

    cuo, cui, bxo, bxi, byo, byi, task = (hl.Var(v) for v in ("cuo", "cui", "bxo", "bxi",
                                                                "byo", "byi", "task"))
    ctile = vectors * lanes
    out.split(co, cuo, cui, ctile).split(bx, bxo, bxi, blocks)
    out.split(by, byo, byi, BLOCK_ROWS, hl.TailStrategy.GuardWithIf)
    if pool:
        out.reorder(cui, bxi, cuo, bxo, byi, byo, n)
    else:
        out.reorder(cui, p, q, bxi, cuo, bxo, byi, byo, n).unroll(p).unroll(q)
        out.bound(p, 0, 2).bound(q, 0, 2)
    out.vectorize(cui, lanes).fuse(byo, n, task).parallel(task)
    m.compute_at(out, cuo).reorder(co, bx, b, a).vectorize(co, lanes).unroll(bx)
    m.unroll(b).unroll(a)
    cu, cv = hl.Var("cu"), hl.Var("cv")
    acc.compute_at(m, b).split(co, cu, cv, lanes).reorder(cv, cu, bx, b, a)
    acc.vectorize(cv).unroll(cu).unroll(bx)
    acc.update().split(co, cu, cv, lanes).reorder(cv, cu, bx, rc.x, b, a)
    acc.update().vectorize(cv).unroll(cu).unroll(bx)
    v.compute_at(out, bxo).reorder(ci, b, a, bx).vectorize(ci, lanes).unroll(b).unroll(a)
    v.bound(a, 0, 4).bound(b, 0, 4)
    u.compute_root().reorder(co, b, a, ci).vectorize(co, lanes).unroll(b).unroll(a)
    if cin * cout >= PARALLEL_TRANSFORM:
        u.parallel(ci)
    u.bound(a, 0, 4).bound(b, 0, 4).bound(co, 0, cout).bound(ci, 0, cin)
    grid.compute_at(out, task).vectorize(gc, lanes, hl.TailStrategy.GuardWithIf)
    images = {**images, "wt": wt, "bias": bias}
    if addend:
        images["addend"] = plus
    return out, images, {"top": top, "left": left}


def tiling(dtype: Any, cout: int, blocks_per_row: int) -> tuple[int, int, int]:
    """``(vectors, blocks, lanes)`` of a register tile: two vectors of output channels where
    they divide C_out (32 channels at 16x16, Zen 4: 2.0 against 2.4 ms with one), by
    :data:`MOST_BLOCKS` blocks (fewer where a row has fewer; twice as many with one vector
    where a vector operation is whole, so 8 accumulators are in flight: an Intel AVX-512 CPU
    retires two a cycle, each waits 4 cycles)."""
    lanes = native.vector_lanes(dtype)
    vectors = 2 if cout % (2 * lanes) == 0 else 1
    most = MOST_BLOCKS
    if vectors == 1 and not native.halved_vectors() and native.registers().count >= 32:
        most *= 2
    return vectors, min(most, blocks_per_row), lanes


@functools.lru_cache(maxsize=native.MOST_PLANS)
def _plan(cpu: Any, halved: bool, dtype: np.dtype, channels: tuple[int, int], width: int,
          addend: bool, relu: bool, pool: bool, codes: bool, adjoint: bool,
          unpool: bool) -> tuple:
    """``(pipeline, zero bias)`` for one geometry, derived once (``cpu`` and ``halved`` are
    :func:`~anycnn.kernels.native.registers` and
    :func:`~anycnn.kernels.native.halved_vectors`, which the tiling reads)."""
    blocks_per_row = width // 2
    pipeline = _pipeline(dtype, channels, tiling(dtype, channels[1], blocks_per_row), addend,
                         relu, pool, codes, adjoint, unpool)
    return pipeline, np.zeros(channels[1], dtype=dtype)


def forward(arrays: dict, weight: np.ndarray, bias: np.ndarray | None, pads: tuple,
            out_hw: tuple[int, int], outputs: list[np.ndarray], pool: bool, relu: bool,
            adjoint: bool, unpool: bool) -> None:
    """:func:`anycnn.kernels.native._forward` for a geometry :func:`suits` accepts: ``arrays``
    the NHWC input ``"inp"`` (or with ``unpool`` the pooled gradient's ``"dpool"`` and
    ``"code"``; and ``"addend"``, shaped as the output), ``outputs`` the NHWC output
    (N, Ho, Wo, C) (or with ``pool`` the pooled output and, for two, its codes), the weight as
    :func:`_pipeline` takes it (``adjoint``: an input gradient's)."""
    dtype = outputs[0].dtype
    c_in, c_out = weight.shape[2:]
    channels = (c_out, c_in) if adjoint else (c_in, c_out)
    pipeline, zero = _plan(native.registers(), native.halved_vectors(), dtype, channels,
                           out_hw[1], "addend" in arrays, relu, pool,
                           pool and len(outputs) == 2, adjoint, unpool)
    if not pool:
        n, (ho, wo), c = outputs[0].shape[0], out_hw, channels[1]
        outputs = [outputs[0].reshape(n, ho // 2, 2, wo // 2, 2, c)]
        if "addend" in arrays:
            arrays = {**arrays, "addend": arrays["addend"].reshape(n, ho // 2, 2, wo // 2, 2, c)}
    bias = zero if bias is None else native.operand(bias, dtype)
    pipeline.run({**arrays, "wt": native.operand(weight), "bias": bias},
                 {"top": pads[0], "left": pads[2]}, outputs)


# --------------------------------------------------------------------------------------------
# The weight gradient: the same transforms, adjoint


#: V and W of one chunk of blocks take about this many bytes (float32), at most: the
#: register tiles of one (a, b) stream 1/16 of them from the L1 and L2 caches
CHUNK_BYTES = 1 << 19


#: a weight-gradient register tile's accumulators (input channels by one vector of output
#: channels), with 16 registers and with 32. Zen 4, one thread, batch 128, resnet20's layers
#: (16-16, 32-32, 64-64): 16 by one vector 4.8-5.3 / 4.0-4.2 / 3.1-3.2 ms, 8 by two 4.8-5.1 /
#: 4.1-4.3 / 3.4-3.6, 8 by one 4.8 / 4.2 / 4.4, 4 by two 5.3 / 4.2 / 4.7
WEIGHT_GRAD_ACCUMULATORS = {False: 8, True: 16}


def weight_grad_tiling(dtype: Any, channels: tuple[int, int], kernel: tuple[int, int],
                       stride: int, window: tuple[int, int] | None, n: int,
                       grad_hw: tuple[int, int], per: int, rest: int) -> tuple[int, int, int]:
    """``(in_tile, rows, images)`` of :func:`_weight_grad_pipeline` (input channels per register
    tile, by one vector of output channels; rows of 2x2 blocks and images per chunk), or () where
    it does not apply: not a 3x3 kernel at stride 1, an output gradient (``grad_hw``, pooled by
    ``window`` if given) that is not whole 2x2 blocks or 2x2 pools, fewer than
    :data:`MIN_PIXELS` outputs over the ``n`` images, channels that do not fill whole vectors or
    more than :data:`MOST_CHANNEL_PAIRS` pairs of them. ``per`` and ``rest``: the images of a
    whole part and of the last one (0: none), which ``images`` divides."""
    lanes = native.vector_lanes(dtype)
    cin, cout = channels
    if window is None:
        ho, wo = grad_hw
    else:
        ho, wo = 2 * grad_hw[0], 2 * grad_hw[1]  # the pooled windows: the blocks
    if (kernel != (3, 3) or stride != 1 or window not in (None, (2, 2)) or ho % 2 or wo % 2
            or min(ho, wo) < 2 or n * ho * wo < MIN_PIXELS or cin % lanes or cout % lanes
            or cin * cout > MOST_CHANNEL_PAIRS):
        return ()
    in_tile = native._divisor_tile(cin, WEIGHT_GRAD_ACCUMULATORS[native.registers().count >= 32])
    bytes_per_block = 16 * (cin + cout) * np.dtype(dtype).itemsize
    most = max(1, CHUNK_BYTES // bytes_per_block)
    by, bx = ho // 2, wo // 2
    rows = next(r for r in range(min(max(1, most // bx), by), 0, -1) if by % r == 0)
    images = 1
    if rows == by:  # whole images: as many as fit, dividing both parts' image counts
        fit = max(1, most // (bx * by))
        images = next(m for m in range(min(fit, per), 0, -1) if per % m == 0 and rest % m == 0)
    return in_tile, rows, images


@kernel_cache.pipeline
def _weight_grad_pipeline(dtype: np.dtype, channels: tuple[int, int],
                          tiling: tuple[int, int, int], pooled: bool):
    """part[co, ci, j, i, g] = the 3x3 stride-1 weight gradient summed over images g*G ..
    g*G+G-1 (G the ``images`` parameter), as the general weight-gradient pipeline's
    (:func:`anycnn.kernels.native._weight_grad_pipeline`: same operands, scalars and parts),
    by the adjoint of the forward's transforms: for each 2x2 block of the output gradient
    ``dY`` and the 4x4 input patch ``d`` it was computed from, ``M[co, ci] += (A dY A^T) *
    (B^T d B)`` (16 products per channel pair, against the direct kernel's 36
    multiply-adds for 4 outputs), and the part is ``G^T M G``. The sums over blocks run a
    chunk at a time (``tiling``: :func:`weight_grad_tiling`): the chunk's transforms are
    computed once, then every register tile of ``in_tile`` input channels by one vector of
    output channels sums over the chunk's blocks for each (a, b). With ``pooled``,
    the gradient is a fused block's pooled gradient ``dpool`` and ``code`` under 2x2 pools:
    a block is a pooling window, whose gradient is the pooled value at the tap its code names
    (none where the ReLU was off), so ``A dY A^T`` is that value times one of 4 sign patterns;
    past the last whole window the gradient is zero and has no block."""
    hl = native._halide()
    t = native._scalar_type(hl, dtype)
    cin, cout = channels
    in_tile, rows, per_chunk = tiling
    lanes = native.vector_lanes(dtype)
    inp = hl.ImageParam(t, 4, "inp")
    if pooled:
        dy, code = hl.ImageParam(t, 4, "dpool"), hl.ImageParam(hl.UInt(8), 4, "code")
        gradients, blocks_x, blocks_y = {"dpool": dy, "code": code}, dy.dim(1).extent(), \
            dy.dim(2).extent()
    else:
        dy = hl.ImageParam(t, 4, "dy")
        gradients, blocks_x, blocks_y = {"dy": dy}, dy.dim(1).extent() / 2, \
            dy.dim(2).extent() / 2
    images = hl.Param(hl.Int(32), "images")
    top, left = hl.Param(hl.Int(32), "top"), hl.Param(hl.Int(32), "left")
    grid, gc = native._spread_padded(hl, inp, (inp.dim(1).extent(), inp.dim(2).extent()), 1,
                                     top, left)
    c, a, b, bx, by, n = (hl.Var(v) for v in ("c", "a", "b", "bx", "by", "n"))
    v = _input_transform(hl, grid, c, b, a, bx, by, n)
    w = hl.Func("W")  # W[c, b, a, bx, by, n] = (A dY A^T)[a, b]
    if pooled:
        g, k = dy[c, bx, by, n], code[c, bx, by, n]
        zero = hl.cast(t, 0)

        def window(ia: int, ib: int):
            """(A dY A^T)[ia, ib] of a window holding ``g`` at the tap ``k`` names."""
            value = zero
            for tap in range(4):
                sign = AT[tap // 2][ia] * AT[tap % 2][ib]
                if sign:
                    value = hl.select(k == tap, g if sign == 1 else -g, value)
            return value

        w[c, b, a, bx, by, n] = _by_index(hl, {(ia, ib): window(ia, ib) for ia in range(4)
                                               for ib in range(4)}, a, b)
    else:
        w[c, b, a, bx, by, n] = _by_index(hl, {
            (ia, ib): _sum(hl, [(AT[q][ia] * AT[p][ib], dy[c, 2 * bx + p, 2 * by + q, n])
                                for q in range(2) for p in range(2)])
            for ia in range(4) for ib in range(4)}, a, b)
    co, ci, j, i, g, yc, nc = (hl.Var(v) for v in ("co", "ci", "j", "i", "g", "yc", "nc"))
    rp = hl.RDom([hl.Range(0, blocks_x), hl.Range(0, rows), hl.Range(0, per_chunk)])
    chunk = hl.Func("chunk")
    chunk[co, ci, b, a, yc, nc] = hl.cast(t, 0)
    row, image = yc * rows + rp.y, nc * per_chunk + rp.z
    chunk[co, ci, b, a, yc, nc] += (w[co, b, a, rp.x, row, image]
                                    * v[ci, b, a, rp.x, row, image])
    rc = hl.RDom([hl.Range(0, blocks_y / rows),
                  hl.Range(0, images / per_chunk)])
    m = hl.Func("M")
    m[co, ci, b, a, g] = hl.cast(t, 0)
    m[co, ci, b, a, g] += chunk[co, ci, b, a, rc.x, g * (images / per_chunk) + rc.y]
    part = hl.Func("part")
    part[co, ci, j, i, g] = _by_index(hl, {
        (ii, jj): _sum(hl, [(G[ia][ii] * G[ib][jj], m[co, ci, ib, ia, g])
                            for ia in range(4) for ib in range(4)])
        for ii in range(3) for jj in range(3)}, i, j)
    out = part.output_buffer()
    out.dim(0).set_bounds(0, cout)  # constant offsets in the tiles
    out.dim(1).set_bounds(0, cin).set_stride(cout)
    out.dim(2).set_bounds(0, 3).set_stride(cout * cin)
    out.dim(3).set_bounds(0, 3).set_stride(cout * cin * 3)
    inp.dim(0).set_bounds(0, cin)
    dy.dim(0).set_bounds(0, cout)

    part.reorder(co, ci, j, i, g).vectorize(co, lanes).unroll(j).unroll(i).parallel(g)
    m.compute_at(part, g).vectorize(co, lanes)
    coo, coi, cio, cii = (hl.Var(v) for v in ("coo", "coi", "cio", "cii"))
    update = m.update()  # chunks, then (a, b), then tiles
    update.split(co, coo, coi, lanes).split(ci, cio, cii, in_tile)
    update.reorder(coi, cii, coo, cio, b, a, rc.x, rc.y, g)
    update.vectorize(coi).unroll(cii)
    chunk.compute_at(m, coo).reorder(co, ci).vectorize(co, lanes).unroll(ci)
    chunk.update().reorder(co, ci, rp.x, rp.y, rp.z).vectorize(co, lanes).unroll(ci)
    for f in (v, w):
        f.compute_at(m, rc.x).reorder(c, b, a, bx, by, n).vectorize(c, lanes)
        f.unroll(b).unroll(a).bound(a, 0, 4).bound(b, 0, 4)
    grid.compute_at(m, rc.x).vectorize(gc, lanes, hl.TailStrategy.GuardWithIf)
    return part, {"inp": inp, **gradients}, {"images": images, "top": top, "left": left}


def weight_grad(dtype: np.dtype, channels: tuple[int, int], tiling: tuple[int, int, int],
                pooled: bool):
    """The compiled pipeline of :func:`_weight_grad_pipeline` (``channels`` (C_in, C_out),
    ``tiling`` of :func:`weight_grad_tiling`; ``pooled``: the gradient a fused block's 2x2
    pools give): run it as the general weight-gradient pipeline (same operands, scalars and
    parts)."""
    return _weight_grad_pipeline(dtype, tuple(channels), tuple(tiling), pooled)
