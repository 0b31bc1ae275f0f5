"""Exact rewrites that :class:`~anycnn.nn.sequential.Sequential` applies to runs of layers.

``BatchNorm2D → ReLU`` and ``Residual → ReLU`` apply the ReLU inside the pass that computes
their output (and its gradient inside their gradient pass): one pass over the activations
fewer each way, same values.

``Conv2D → ReLU → MaxPool2D`` is computed as ``relu(maxpool(conv(x)) + b)`` instead of
``maxpool(relu(conv(x) + b))``. Adding the per-channel bias and applying ReLU are monotone, so
they commute with the window maximum, and rounding is monotone too: the forward values are
identical, the bias add and ReLU touch a tensor ``kh*kw`` times smaller, and the gradients route
through the same maxima (up to which of two entries that round to the same value is "first").
The layers keep their parameters; only the execution is fused. When the pooling windows are
disjoint and unpadded (the usual 2x2, stride 2), the convolution computes only the positions
inside a window, already ordered as pooling planes, so pooling needs no gather and its gradient
no scatter.

Consecutive such blocks form one :class:`ConvPoolRun`, which takes each range of images through
all of them before the next range (depth first). Where the compiled kernels apply (NumPy with
halide, windows that tile the convolution's output), a block runs instead as one kernel each way
(:func:`anycnn.kernels.native.conv2d_relu_maxpool`): measured 1.5-1.7x faster ``simple-cnn`` steps.

In eval mode, ``Conv2D → ReLU`` applies the ReLU inside the convolution's pass
(:class:`~anycnn.nn.inference.ConvReLU`), and :mod:`anycnn.nn.inference` folds each
``Conv2D → BatchNorm2D`` pair into one convolution before these rewrites are matched.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from array_api_compat import device

from ..backend import namespace_of
from ..kernels.dispatch import DECLINE, attempt
from ..kernels.threads import map_batch
from . import functional as F
from .containers import Residual
from .inference import ConvReLU, DenseReLU, ReLUInside, inferring
from .layers import BatchNorm2D, Conv2D, MaxPool2D, ReLU
from .modes import fusion_suspended, suspended  # noqa: F401 - re-exported
from .module import Module


class ConvReluMaxPool:
    """One ``Conv2D``, ``ReLU``, ``MaxPool2D`` triple of a fused run (shapes as the layers).

    :meth:`forward_rows` and :meth:`backward_rows` compute a range of images when the pooling
    windows are disjoint and unpadded (see :meth:`windows`); :meth:`forward` and
    :meth:`backward` are the general path, layer by layer, for any other pooling.
    """

    pattern = (Conv2D, ReLU, MaxPool2D)

    @staticmethod
    def accepts(run: list[Module]) -> bool:
        """Whether this run of layers matching :attr:`pattern` can be fused: only ungrouped
        convolutions (grouped and depthwise ones run layer by layer)."""
        return run[0].groups == 1

    def __init__(self, conv: Conv2D, relu: ReLU, pool: MaxPool2D) -> None:
        self.conv, self.relu, self.pool = conv, relu, pool
        self._ctx: tuple | None = None

    def layers(self) -> list[Module]:
        """The layers this executor runs."""
        return [self.conv, self.relu, self.pool]

    def windows(self, in_hw: tuple[int, int]) -> F.Windows | None:
        """The convolution windows over an ``in_hw`` input in pool-plane order, when the pooling
        windows are disjoint and unpadded (then the pool needs no gather and its gradient no
        scatter); None otherwise (or when the input is too small: the general path says so)."""
        conv, pool = self.conv, self.pool
        conv_win = F.conv_windows(in_hw, conv.kernel_size, conv.stride, conv.pads, conv.dilation)
        if (min(conv_win.out) < 1 or pool.padding != (0, 0)
                or any(s < k for s, k in zip(pool.stride, pool.kernel_size))):
            return None
        pool_win = F.pool_windows(conv_win.out, pool.kernel_size, pool.stride, pool.padding,
                                  pool.ceil_mode)
        if any(pool_win.pads) or min(pool_win.out) < 1:
            return None
        return replace(conv_win, pool_order=(pool.kernel_size, pool.stride))

    def forward_compiled(self, x: Any) -> _CompiledStep | None:
        """The block on images ``x`` in one compiled kernel (``conv2d_relu_maxpool``, see
        :mod:`anycnn.kernels.dispatch`), and what its backward needs; None when no kernel
        computes it: the pooling windows must tile the output (kernel equal to stride,
        unpadded), and the kernel must take the convolution."""
        conv, pool = self.conv, self.pool
        if conv.groups != 1 or pool.kernel_size != pool.stride or self.windows(
                tuple(x.shape[1:3])) is None:
            return None
        win = F.conv_windows(tuple(x.shape[1:3]), conv.kernel_size, conv.stride, conv.pads,
                             conv.dilation)
        bias = None if conv.bias is None else conv.bias.data
        if inferring():  # no backward expected: the output alone, no codes written
            out = attempt("conv2d_relu_maxpool_eval", x, conv.weight.data, bias, win,
                          pool.kernel_size)
            if out is not DECLINE:
                return _CompiledStep(self, x, win, out, None)
        result = attempt("conv2d_relu_maxpool", x, conv.weight.data, bias, win,
                         pool.kernel_size)
        if result is DECLINE:
            return None
        out, code = result
        return _CompiledStep(self, x, win, out, code)

    def forward_rows(self, x: Any, win: F.Windows) -> tuple[Any, Any]:
        """Images ``x`` (n, H, W, C_in) through the block over pool-ordered ``win``:
        ``(out (n, Hq, Wq, C_out), mask (n, taps, Hq*Wq, C_out) bool)``, the mask marking
        each window's first maximum."""
        xp = namespace_of(x)
        conv = self.conv
        n, cout = x.shape[0], conv.out_channels
        taps = self.pool.kernel_size[0] * self.pool.kernel_size[1]
        rows = F.conv2d_rows(x, conv.weight.data, win)
        entries = xp.reshape(rows, (n, taps, -1, cout))  # pooling planes, no gather
        pooled, mask = F.window_max(entries)
        out = F.bias_relu(pooled, None if conv.bias is None else conv.bias.data)
        return xp.reshape(out, (n, *win.pooled_out, cout)), mask

    def backward_rows(self, x: Any, win: F.Windows, out: Any, mask: Any, dy: Any,
                      input_grad: bool) -> tuple[Any, Any, Any]:
        """Gradients of :meth:`forward_rows` for images ``x`` given its ``out`` and ``mask``
        and the output gradient ``dy`` (shaped as ``out``): ``(dx or None, dweight, dbias or
        None)``. The masked gradient is already in the convolution's (pool-ordered) row order."""
        xp = namespace_of(dy, x)
        conv = self.conv
        n, cout = x.shape[0], conv.out_channels
        dz = F.relu_grad(out, dy)
        dbias = None if conv.bias is None else F.column_sums(xp.reshape(dz, (-1, cout)))
        dz = xp.reshape(dz, (n, 1, -1, cout))
        d = xp.reshape(F.masked(mask, dz), (n, -1, cout))
        dx, dw, _ = F.conv2d_rows_backward(d, F.window_columns(x, win), conv.weight.data, win,
                                           input_grad, bias_grad=False)
        return dx, dw, dbias

    def forward(self, x: Any) -> Any:
        """The general path (any pooling): convolution, max pool over gathered windows, then
        bias and ReLU on the pooled map."""
        conv = self.conv
        conv.check_input(x)
        y, conv_ctx = F.conv2d_forward(x, conv.weight.data, None, conv.stride, conv.pads,
                                       conv.dilation)
        pooled, pool_ctx = F.max_pool2d_forward(y, self.pool._windows(y))
        out = F.bias_relu(pooled, None if conv.bias is None else conv.bias.data)
        self._ctx = (conv_ctx, pool_ctx, out)
        return out

    def backward(self, dy: Any, input_grad: bool = True) -> Any:
        if self._ctx is None:
            raise RuntimeError(_TWICE)
        conv_ctx, pool_ctx, out = self._ctx
        self._ctx = None
        conv = self.conv
        dz = F.relu_backward(dy, out)
        if conv.bias is not None:
            xp = namespace_of(dz)
            conv.bias.accumulate(F.column_sums(xp.reshape(dz, (-1, dz.shape[-1]))))
        dconv = F.max_pool2d_backward(dz, pool_ctx)
        dx, dw, _ = F.conv2d_backward(dconv, conv_ctx, conv.weight.data, input_grad,
                                      bias_grad=False)
        conv.weight.accumulate(dw)
        return dx


_TWICE = ("fused Conv2D/ReLU/MaxPool2D backward called before forward, or called twice for one "
          "forward")


@dataclass
class _CompiledStep:
    """A block computed by the compiled kernel: its input, windows, output and codes (None
    after an inference's forward, which no backward follows: see
    :func:`~anycnn.nn.inference.inferring`)."""

    block: ConvReluMaxPool
    x: Any
    win: F.Windows
    out: Any
    code: Any

    def backward(self, dy: Any, input_grad: bool) -> Any:
        """Accumulates the block's parameter gradients; returns the input gradient (or None)."""
        conv = self.block.conv
        xp = namespace_of(dy)
        dy = xp.reshape(dy, self.code.shape)
        # the kernel that kept the code routes the gradient (and may sum the bias gradient
        # from the one it masked through the ReLU on the way: None leaves it to us)
        grad, dbias = attempt("pooled_gradient", dy, self.code, self.block.pool.kernel_size,
                              conv.bias is not None)
        if conv.bias is not None:
            if dbias is None:
                cout = self.code.shape[-1]
                dbias = F.relu_column_sums(xp.reshape(dy, (-1, cout)),
                                           xp.reshape(self.out, (-1, cout)))
            conv.bias.accumulate(dbias)
        dx, dw, _ = F.conv2d_grads(grad, self.x, conv.weight.data, self.win, 1, input_grad,
                                   bias_grad=False)
        conv.weight.accumulate(dw)
        return dx


@dataclass
class _Segment:
    """Consecutive blocks of a run computed together, image range by image range."""

    blocks: list[ConvReluMaxPool]
    wins: list[F.Windows]
    x: Any  # the segment's input (N, H, W, C)
    inner: list  # Pieces: the outputs of all blocks but the last (the next block's input)
    masks: list  # Pieces: each block's first-maximum mask
    out: Any  # the last block's output (N, Hq, Wq, C_out)
    chunk_bytes: int

    def output_of(self, k: int, a: int, b: int) -> Any:
        """Block ``k``'s output for images ``a:b``."""
        return self.out[a:b, ...] if k == len(self.blocks) - 1 else self.inner[k].part(a, b)

    def input_of(self, k: int, a: int, b: int) -> Any:
        """Block ``k``'s input for images ``a:b``."""
        return self.x[a:b, ...] if k == 0 else self.inner[k - 1].part(a, b)


class ConvPoolRun:
    """A run of consecutive ``Conv2D → ReLU → MaxPool2D`` blocks (one or more).

    Blocks whose pooling windows are disjoint and unpadded are computed together, depth
    first: each range of images goes through all of them before the next range, in one
    :func:`~anycnn.kernels.threads.map_batch` region per pass. On NumPy the range's activations are
    still in cache when the next block reads them, and the threads wait for each other once
    per pass instead of once per block (measured: 2-5% faster steps for ``simple-cnn``). Other
    blocks run on their own, layer by layer.
    """

    def __init__(self, blocks: list[ConvReluMaxPool]) -> None:
        self.blocks = blocks
        self._saved: list | None = None

    def layers(self) -> list[Module]:
        return [layer for block in self.blocks for layer in block.layers()]

    def forward(self, x: Any) -> Any:
        self._saved = None
        saved: list = []
        i = 0
        while i < len(self.blocks):
            self.blocks[i].conv.check_input(x)
            step = self.blocks[i].forward_compiled(x)
            if step is not None:
                x = step.out
                saved.append(step)
                i += 1
                continue
            segment = self._segment(x, i)
            if segment is None:  # this block's pooling needs the general path
                x = self.blocks[i].forward(x)
                saved.append(self.blocks[i])
                i += 1
            else:
                x = segment.out
                saved.append(segment)
                i += len(segment.blocks)
        self._saved = saved
        return x

    def _segment(self, x: Any, start: int) -> _Segment | None:
        """Run the longest pool-ordered segment of blocks from ``start`` on ``x``."""
        xp = namespace_of(x)
        blocks, wins = [], []
        probe = x
        for block in self.blocks[start:]:
            block.conv.check_input(probe)
            win = block.windows(tuple(probe.shape[1:3]))
            if win is None:
                break
            blocks.append(block)
            wins.append(win)
            # the next block checks a stand-in of this block's output (a broadcast zero: no
            # memory), so a mismatch is reported before anything runs, with the real shape
            probe = xp.broadcast_to(xp.zeros((), dtype=x.dtype, device=device(x)),
                                    (x.shape[0], *win.pooled_out, block.conv.out_channels))
        if not blocks:
            return None
        last = len(blocks) - 1

        def chunk(a: int, b: int):
            h, kept = x[a:b, ...], []
            for k, (block, win) in enumerate(zip(blocks, wins)):
                h, mask = block.forward_rows(h, win)
                kept += [None if k == last else h, mask]
            return (h, *kept)

        chunk_bytes = max(F.conv_chunk_bytes(w, blk.conv.weight.data)
                          for blk, w in zip(blocks, wins))
        out, *kept = map_batch(xp, x.shape[0], chunk_bytes, chunk,
                                        ("cat",) + ("keep",) * (2 * len(blocks)))
        return _Segment(blocks, wins, x, kept[0:-2:2], kept[1::2], out, chunk_bytes)

    def backward(self, dy: Any, input_grad: bool = True) -> Any:
        if self._saved is None:
            raise RuntimeError(_TWICE)
        saved, self._saved = self._saved, None
        for j in range(len(saved) - 1, -1, -1):
            need = input_grad or j > 0
            part = saved[j]
            if isinstance(part, _Segment):
                dy = _segment_backward(part, dy, need)
            else:
                dy = part.backward(dy, need)
        return dy


def _segment_backward(seg: _Segment, dy: Any, input_grad: bool) -> Any:
    """Gradients of a segment, depth first over the same image ranges as its forward pass;
    accumulates the blocks' parameter gradients and returns the input gradient (or None)."""
    xp = namespace_of(dy, seg.out)
    blocks = seg.blocks
    dy = xp.reshape(dy, seg.out.shape)

    def chunk(a: int, b: int):
        d, grads = dy[a:b, ...], []
        for k in range(len(blocks) - 1, -1, -1):
            d, dw, dbias = blocks[k].backward_rows(
                seg.input_of(k, a, b), seg.wins[k], seg.output_of(k, a, b), seg.masks[k].part(a, b),
                d, input_grad or k > 0)
            grads = [dw, dbias, *grads]
        return (d, *grads)

    dx, *grads = map_batch(
        xp, seg.out.shape[0], seg.chunk_bytes, chunk, ("cat",) + ("sum",) * (2 * len(blocks)),
        F.COL2IM_CHUNK_BYTES)
    for k, block in enumerate(blocks):
        block.conv.weight.accumulate(grads[2 * k])
        if grads[2 * k + 1] is not None:
            block.conv.bias.accumulate(grads[2 * k + 1])
    return dx


class BatchNormReLU:
    """A ``BatchNorm2D → ReLU`` run: the ReLU is applied inside BatchNorm's normalising pass
    and its gradient inside BatchNorm's gradient pass (:func:`F.batch_norm_forward` with
    ``relu=True``). Exact: the same elementwise operations on the same values."""

    pattern = (BatchNorm2D, ReLU)

    @staticmethod
    def accepts(run: list[Module]) -> bool:
        return True

    def __init__(self, bn: BatchNorm2D, relu: ReLU) -> None:
        self.bn, self.relu = bn, relu

    def layers(self) -> list[Module]:
        return [self.bn, self.relu]

    def forward(self, x: Any) -> Any:
        return self.bn.forward(x, relu=True)

    def backward(self, dy: Any, input_grad: bool = True) -> Any:
        return self.bn.backward(dy, input_grad)


class ResidualReLU(ReLUInside):
    """A ``Residual → ReLU`` run (a ResNet block): the sum of the two paths and its ReLU in one
    pass (:func:`anycnn.nn.functional.primitives.add_relu`); exact."""

    pattern = (Residual, ReLU)

    @staticmethod
    def accepts(run: list[Module]) -> bool:
        return True


#: tried in order at each position: Conv2D → ReLU → MaxPool2D before an eval-mode Conv2D →
#: ReLU (:class:`~anycnn.nn.inference.ConvReLU`); an eval-mode Dense → ReLU
#: (:class:`~anycnn.nn.inference.DenseReLU`)
FUSIONS = (ConvReluMaxPool, ConvReLU, BatchNormReLU, ResidualReLU, DenseReLU)




def execution_plan(layers: list[Module]) -> list[Any]:
    """``layers`` with every fusable sequence replaced by its fused executor, and consecutive
    convolution blocks grouped into one :class:`ConvPoolRun` (``layers`` unchanged inside
    :func:`suspended`)."""
    if fusion_suspended():
        return list(layers)
    plan: list[Any] = []
    i, n = 0, len(layers)
    while i < n:
        first = type(layers[i])
        for fusion in FUSIONS:
            pattern = fusion.pattern
            if pattern[0] is not first:  # most positions: no fusion starts with this layer
                continue
            end = i + len(pattern)
            run = layers[i:end]
            if end <= n and all(
                    type(layer) is kind for layer, kind in zip(run, pattern)
            ) and fusion.accepts(run):
                plan.append(fusion(*run))
                i = end
                break
        else:
            plan.append(layers[i])
            i += 1
    return _group_runs(plan)


def _group_runs(plan: list[Any]) -> list[Any]:
    """Consecutive fused convolution blocks become one :class:`ConvPoolRun`."""
    grouped: list[Any] = []
    for step in plan:
        if isinstance(step, ConvReluMaxPool):
            if grouped and isinstance(grouped[-1], ConvPoolRun):
                grouped[-1].blocks.append(step)
                continue
            step = ConvPoolRun([step])
        grouped.append(step)
    return grouped
