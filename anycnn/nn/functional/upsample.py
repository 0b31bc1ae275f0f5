"""Upsampling of NHWC images by integer factors (nearest and bilinear), forward and backward."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from array_api_compat import device

from ...backend import namespace_of
from ..geometry import Pair, device_cache

# Upsampling by integer factors


def upsample_nearest_forward(x: Any, scale: Pair) -> Any:
    """Nearest-neighbour upsampling of NHWC ``x`` by integer ``scale`` (sh, sw): each pixel
    becomes an ``sh x sw`` block (PyTorch's ``mode="nearest"``)."""
    xp = namespace_of(x)
    n, h, w, c = x.shape
    sh, sw = scale
    blocks = xp.broadcast_to(xp.reshape(x, (n, h, 1, w, 1, c)), (n, h, sh, w, sw, c))
    return xp.reshape(blocks, (n, h * sh, w * sw, c))


def upsample_nearest_backward(dy: Any, scale: Pair) -> Any:
    """Input gradient of :func:`upsample_nearest_forward`: the sum over each block."""
    xp = namespace_of(dy)
    n, ho, wo, c = dy.shape
    sh, sw = scale
    return xp.sum(xp.reshape(dy, (n, ho // sh, sh, wo // sw, sw, c)), axis=(2, 4))


@lru_cache(maxsize=64)
def _linear_interpolation(size: int, scale: int) -> np.ndarray:
    """float64 ``(size*scale, size)``: row ``i`` holds the weights of PyTorch's linear
    interpolation with ``align_corners=False`` for output ``i``: source coordinate
    ``(i + 0.5)/scale - 0.5`` clamped to ``[0, size - 1]``, split between its two neighbours."""
    out = np.arange(size * scale)
    source = np.maximum((out + 0.5) / scale - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), size - 1)
    high = np.minimum(low + 1, size - 1)
    frac = source - low
    matrix = np.zeros((size * scale, size))
    np.add.at(matrix, (out, low), 1.0 - frac)
    np.add.at(matrix, (out, high), frac)
    matrix.flags.writeable = False
    return matrix


def _interpolation(x: Any, size: int, scale: int, transpose: bool) -> Any:
    """The :func:`_linear_interpolation` matrix (or its transpose) on ``x``'s device and dtype."""
    xp = namespace_of(x)
    host_dtype = np.float64 if xp.finfo(x.dtype).bits == 64 else np.float32

    def build() -> np.ndarray:
        m = _linear_interpolation(size, scale)
        return np.ascontiguousarray(m.T if transpose else m, dtype=host_dtype)

    key = ("lerp", size, scale, transpose, np.dtype(host_dtype).name)
    return device_cache.get(xp, device(x), key, build)


def _along_axes(x: Any, scale: Pair, transpose: bool) -> Any:
    """Apply the interpolation matrix of each spatial axis of NHWC ``x`` (or its transpose,
    for the backward pass) as a matrix product: first along W, then along H."""
    xp = namespace_of(x)
    n, h, w, c = x.shape
    sh, sw = scale
    w_in, h_in = (w // sw, h // sh) if transpose else (w, h)
    mw = _interpolation(x, w_in, sw, transpose)  # (W_out, W_in) or its transpose
    y = mw @ xp.reshape(x, (n * h, w, c))
    w2 = y.shape[1]
    mh = _interpolation(x, h_in, sh, transpose)
    y = mh @ xp.reshape(y, (n, h, w2 * c))
    return xp.reshape(y, (n, y.shape[1], w2, c))


def upsample_bilinear_forward(x: Any, scale: Pair) -> Any:
    """Bilinear upsampling of NHWC ``x`` by integer ``scale`` (PyTorch's ``mode="bilinear"``,
    ``align_corners=False``): one small dense ``(out, in)`` interpolation matrix per axis,
    applied by matrix products."""
    return _along_axes(x, scale, transpose=False)


def upsample_bilinear_backward(dy: Any, scale: Pair) -> Any:
    """Input gradient of :func:`upsample_bilinear_forward`: the transposed matrices (no
    scatter: the sums over the outputs that read an input pixel are in the products)."""
    return _along_axes(dy, scale, transpose=True)


# --------------------------------------------------------------------------------------------
