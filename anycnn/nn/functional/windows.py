"""Sliding windows over NHWC images: im2col as one gather, col2im as its adjoint gather.

A :class:`Windows` holds the geometry of one layer's windows over one input size; its gather
indices are built once on the host (:mod:`anycnn.nn.geometry`) and cached per device.
:func:`gather_windows` turns ``(N, H, W, C)`` into window entries ``(N, L, C)``;
:func:`scatter_windows` is its adjoint. Written once against the Array API.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from array_api_compat import device

from ...backend import namespace_of
from ..geometry import Pair, adjoint_index, device_cache, window_index
from .primitives import pad_hw, sum_axis1, take_rows

# --------------------------------------------------------------------------------------------
# Windows: im2col as one gather, col2im as its adjoint gather


@dataclass(frozen=True)
class Windows:
    """Geometry of sliding windows over one padded NHWC image size.

    ``pads`` is (top, bottom, left, right); ``padded`` is (Hp, Wp); ``out`` is (Ho, Wo).
    ``kernel_first`` orders the gathered entries (k, p) instead of (p, k).
    ``pool_order`` (pool kernel, pool stride), for disjoint pooling windows over the output,
    keeps only the output positions inside a pooling window and orders them (pool tap, pooled
    position): a convolution computed in that order hands its output to the max pool as window
    planes with no gather, and takes the pooled gradient back with no scatter.
    """

    in_hw: Pair
    kernel: Pair
    stride: Pair
    dilation: Pair
    pads: tuple[int, int, int, int]
    out: Pair
    kernel_first: bool
    pool_order: tuple[Pair, Pair] | None = None

    def __hash__(self) -> int:  # hashed on every cache lookup: compute it once
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.in_hw, self.kernel, self.stride, self.dilation, self.pads,
                           self.out, self.kernel_first, self.pool_order))
            object.__setattr__(self, "_hash", cached)
        return cached

    @property
    def padded(self) -> Pair:
        return (self.in_hw[0] + self.pads[0] + self.pads[1],
                self.in_hw[1] + self.pads[2] + self.pads[3])

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def pooled_out(self) -> Pair:
        """(Hq, Wq): pooled output size under ``pool_order``."""
        (kh, kw), (sh, sw) = self.pool_order
        return ((self.out[0] - kh) // sh + 1, (self.out[1] - kw) // sw + 1)

    @property
    def positions(self) -> int:
        if self.pool_order is None:
            return self.out[0] * self.out[1]
        (kh, kw), _ = self.pool_order
        return kh * kw * self.pooled_out[0] * self.pooled_out[1]

    def _host_index(self):
        idx = window_index(*self.padded, self.kernel, self.stride, self.dilation, self.out)
        if self.pool_order is not None:  # rows = output positions in (pool tap, pooled) order
            pool = window_index(*self.out, *self.pool_order, (1, 1), self.pooled_out)
            idx = idx[pool.T.reshape(-1)]
        return (idx.T if self.kernel_first else idx).reshape(-1)

    def index(self, xp: Any, device: Any) -> Any:
        """Forward gather index (L,) into the flattened padded image rows, on the device."""
        return device_cache.get(xp, device, ("win", self), self._host_index)

    def _host_adjoint(self) -> tuple[np.ndarray, int, bool]:
        """(flat (K*H*W,) read-major index, K, needs_zero_row) for the *interior* rows."""
        hp, wp = self.padded
        h, w = self.in_hw
        top, _, left, _ = self.pads
        forward = self._host_index()
        full = adjoint_index(forward, hp * wp)  # (Hp*Wp, K)
        rows = ((np.arange(h) + top)[:, None] * wp + (np.arange(w) + left)[None, :]).reshape(-1)
        inner = full[rows]  # (H*W, K)
        missing = inner == forward.size
        k = max(int((~missing).sum(axis=1).max(initial=0)), 1)
        inner = inner[:, :k]
        return np.ascontiguousarray(inner.T).reshape(-1), k, bool(missing[:, :k].any())

    def adjoint(self, xp: Any, device: Any) -> tuple[Any, int, bool]:
        """Adjoint gather plan on the device: ``(index, K, needs_zero_row)``.

        ``index`` (K*H*W,) lists, read-major, which window entry (row of the ``(N, L, C)``
        window array, or ``L`` = an appended zero row) is the t-th read of each real input row.
        """
        index = device_cache.get(xp, device, ("adj", self), lambda: _adjoint_plan(self)[0])
        _, k, zero = _adjoint_plan(self)
        return index, k, zero


@lru_cache(maxsize=256)
def _adjoint_plan(win: Windows) -> tuple[np.ndarray, int, bool]:
    return win._host_adjoint()


def pad_nhwc(x: Any, pads: tuple[int, int, int, int], value: float = 0.0) -> Any:
    """Pad the H and W axes of an NHWC array by (top, bottom, left, right) with ``value``."""
    if not any(pads):
        return x
    return pad_hw(x, pads, value)


def gather_windows(x: Any, win: Windows, value: float = 0.0) -> Any:
    """im2col: NHWC ``x`` → ``(N, L, C)`` window entries, L = Ho*Wo*kh*kw (or kh*kw*Ho*Wo)."""
    xp = namespace_of(x)
    n, _, _, c = x.shape
    hp, wp = win.padded
    rows = xp.reshape(pad_nhwc(x, win.pads, value), (n, hp * wp, c))
    return take_rows(rows, win.index(xp, device(x)))


def scatter_windows(d: Any, win: Windows) -> Any:
    """col2im, the adjoint of :func:`gather_windows`: ``(N, L, C)`` → NHWC input gradient.

    A gather through :meth:`Windows.adjoint` (only rows inside the image, never the padding)
    followed by a sum over the K reads of each row. When some row is read fewer than K times
    (padding, strides, dilation) the gather needs a zero row at index ``L``: it is appended
    here unless ``d`` already has more than ``L`` rows (the convolution makes them for free).
    """
    xp = namespace_of(d)
    n, length, c = d.shape
    h, w = win.in_hw
    index, k, zero = win.adjoint(xp, device(d))
    if zero and length == win.positions * win.taps:
        d = xp.concat([d, xp.zeros((n, 1, c), dtype=d.dtype, device=device(d))], axis=1)
    gathered = take_rows(d, index)
    if k > 1:  # (N, K, H*W, C): summing over axis 1 adds K contiguous planes
        gathered = sum_axis1(xp.reshape(gathered, (n, k, h * w, c)))
    return xp.reshape(gathered, (n, h, w, c))
