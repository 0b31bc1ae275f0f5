"""Exact rewrites that :class:`~anycnn.sequential.Sequential` applies to runs of layers.

``Conv2D → ReLU → MaxPool2D`` is computed as ``relu(maxpool(conv(x)) + b)`` instead of
``maxpool(relu(conv(x) + b))``. Adding the per-channel bias and applying ReLU are monotone, so
they commute with the window maximum, and rounding is monotone too: the forward values are
identical, the bias add and ReLU touch a tensor ``kh*kw`` times smaller, and the gradients route
through the same maxima (up to which of two entries that round to the same value is "first").
The layers keep their parameters; only the execution is fused. When the pooling windows are
disjoint and unpadded (the usual 2x2, stride 2), the convolution computes only the positions
inside a window, already ordered as pooling planes, so pooling needs no gather and its gradient
no scatter.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from . import fastpath
from . import functional as F
from .backend import namespace_of
from .layers import Conv2D, MaxPool2D, ReLU
from .module import Module


class ConvReluMaxPool:
    """Fused execution of a ``Conv2D``, ``ReLU``, ``MaxPool2D`` triple (shapes as the layers)."""

    pattern = (Conv2D, ReLU, MaxPool2D)

    def __init__(self, conv: Conv2D, relu: ReLU, pool: MaxPool2D) -> None:
        self.conv, self.relu, self.pool = conv, relu, pool
        self._ctx: tuple | None = None

    def _pool_ordered(self, conv_win: F.Windows) -> F.Windows | None:
        """The convolution windows in pool-plane order, when the pooling windows are disjoint
        and unpadded (then the pool needs no gather and its gradient no scatter)."""
        pool = self.pool
        if pool.padding != (0, 0) or any(s < k for s, k in zip(pool.stride, pool.kernel_size)):
            return None
        pool_win = F.pool_windows(conv_win.out, pool.kernel_size, pool.stride, pool.padding,
                                  pool.ceil_mode)
        if any(pool_win.pads) or min(pool_win.out) < 1:
            return None
        return replace(conv_win, pool_order=(pool.kernel_size, pool.stride))

    def forward(self, x: Any) -> Any:
        conv = self.conv
        conv.check_input(x)
        bias = None if conv.bias is None else conv.bias.data
        win = self._pool_ordered(F.conv_windows(tuple(x.shape[1:3]), conv.kernel_size,
                                                conv.stride, conv.pads, conv.dilation))
        if win is None:
            y, conv_ctx = F.conv2d_forward(x, conv.weight.data, None, conv.stride, conv.pads,
                                           conv.dilation)
            pooled, pool_ctx = F.max_pool2d_forward(y, self.pool._windows(y))
            out = fastpath.bias_relu(namespace_of(pooled), pooled, bias)
            self._ctx = (conv_ctx, pool_ctx, out)
            return out
        xp = namespace_of(x)
        n, cout = x.shape[0], conv.out_channels
        taps = self.pool.kernel_size[0] * self.pool.kernel_size[1]

        def chunk(a: int, b: int):
            rows = F.conv2d_rows(x[a:b, ...], conv.weight.data, win)
            entries = xp.reshape(rows, (b - a, taps, -1, cout))  # pooling planes, no gather
            pooled, mask = fastpath.window_max(xp, entries)
            return fastpath.bias_relu(xp, pooled, bias), mask

        # the masks stay in per-chunk pieces: backward walks the same chunks (no copy)
        out, mask = fastpath.map_batch(
            xp, n, F.conv_chunk_bytes(win, conv.weight.data), chunk, ("cat", "keep"))
        self._ctx = (F.ConvCtx(x, win), mask, out)
        return xp.reshape(out, (n, *win.pooled_out, cout))

    def backward(self, dy: Any, input_grad: bool = True) -> Any:
        if self._ctx is None:
            raise RuntimeError("fused Conv2D/ReLU/MaxPool2D backward called before forward, or "
                               "called twice for one forward")
        conv_ctx, pool_ctx, out = self._ctx
        self._ctx = None
        conv = self.conv
        weight = conv.weight.data
        if isinstance(pool_ctx, F.MaxPoolCtx):
            dz = F.relu_backward(dy, out)
            if conv.bias is not None:
                xp = namespace_of(dz)
                conv.bias.accumulate(F.column_sums(xp.reshape(dz, (-1, dz.shape[-1]))))
            dconv = F.max_pool2d_backward(dz, pool_ctx)
            dx, dw, _ = F.conv2d_backward(dconv, conv_ctx, weight, input_grad, bias_grad=False)
            conv.weight.accumulate(dw)
            return dx
        # pool-ordered rows: the masked gradient is already the convolution's row order
        xp = namespace_of(dy, weight)
        n, cout = out.shape[0], out.shape[-1]
        dy = xp.reshape(dy, out.shape)
        conv_ctx = F.consume(conv_ctx)
        win = conv_ctx.win

        def chunk(a: int, b: int):
            dz = fastpath.relu_grad(xp, out[a:b, ...], dy[a:b, ...])
            dbias = None if conv.bias is None else F.column_sums(xp.reshape(dz, (-1, cout)))
            dz = xp.reshape(dz, (b - a, 1, -1, cout))
            d = xp.reshape(fastpath.masked(xp, pool_ctx.part(a, b), dz), (b - a, -1, cout))
            dx, dw, _ = F.conv2d_rows_backward(d, conv_ctx.columns(a, b), weight, win,
                                               input_grad, bias_grad=False)
            return dx, dw, dbias

        dx, dw, dbias = fastpath.map_batch(
            xp, n, F.conv_chunk_bytes(win, weight), chunk, ("cat", "sum", "sum"),
            F.COL2IM_CHUNK_BYTES if input_grad else None)
        conv.weight.accumulate(dw)
        if dbias is not None:
            conv.bias.accumulate(dbias)
        return dx


FUSIONS = (ConvReluMaxPool,)


def execution_plan(layers: list[Module]) -> list[Any]:
    """``layers`` with every fusable run replaced by its fused executor."""
    plan: list[Any] = []
    i = 0
    while i < len(layers):
        for fusion in FUSIONS:
            run = layers[i:i + len(fusion.pattern)]
            if len(run) == len(fusion.pattern) and all(
                    type(layer) is kind for layer, kind in zip(run, fusion.pattern)):
                plan.append(fusion(*run))
                i += len(run)
                break
        else:
            plan.append(layers[i])
            i += 1
    return plan
