"""Window geometry: option parsing, output sizes, and the gather indices of im2col and its adjoint.

All of this is host work on small integers. The index arrays are built once per shape with NumPy
(cached), then copied once to each backend/device that asks for them (also cached), so the training
loop never rebuilds or re-uploads them.

Layouts (NHWC activations):

* A padded image is flattened to ``(Hp*Wp, C)`` rows; position ``(r, c)`` is row ``r*Wp + c``.
* :func:`window_index` gives, for each output position ``p = oh*Wo + ow`` and kernel offset
  ``k = i*kw + j``, the flat input row ``idx[p, k]`` that the window reads.
* :func:`adjoint_index` inverts such an index: ``G[s, t]`` lists the (flattened) window entries
  that read input row ``s``, padded with ``L`` (one past the end: a zero row appended by the
  caller). Summing ``d[G]`` over ``t`` is exactly the scatter-add (col2im) of ``d``, done as a
  gather, with no duplicate-index scatter needed.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

from ..errors import ConfigError

Pair = tuple[int, int]


def as_pair(value: Any, name: str, minimum: int = 1) -> Pair:
    """Normalise an int or a pair of ints to a pair, checking each is an int >= ``minimum``."""
    pair = tuple(value) if isinstance(value, tuple | list) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int | np.integer) and not isinstance(v, bool)
                                 for v in pair):
        raise ConfigError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ConfigError(f"{name} must be >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def conv_padding(padding: Any, kernel: Pair, stride: Pair, dilation: Pair) -> tuple[int, ...]:
    """Padding (top, bottom, left, right) for a convolution, with PyTorch's meaning.

    ``'valid'`` is no padding; ``'same'`` (stride 1 only) keeps the size, putting the extra row or
    column of an even kernel at the bottom/right; an int or pair pads both sides equally.
    """
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return (0, 0, 0, 0)
        if mode != "same":
            raise ConfigError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        if stride != (1, 1):
            raise ConfigError("padding='same' is only supported with stride 1 (as in PyTorch)")
        out = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    ph, pw = as_pair(padding, "padding", minimum=0)
    return (ph, ph, pw, pw)


def conv_output_size(size: int, kernel: int, stride: int, pad_total: int, dilation: int) -> int:
    """PyTorch's ``floor((size + pad_total - dilation*(kernel-1) - 1) / stride) + 1``."""
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def pool_output_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size; with ``ceil_mode`` the last window must start inside the
    input or its left padding."""
    span = size + 2 * pad - kernel
    out = (math.ceil(span / stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


@lru_cache(maxsize=256)
def window_index(hp: int, wp: int, kernel: Pair, stride: Pair, dilation: Pair,
                 out: Pair) -> np.ndarray:
    """int64 ``(Ho*Wo, kh*kw)``: flat row of the padded ``(hp, wp)`` input read by each window
    entry (see the module docstring)."""
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel, stride, dilation, out
    rows = (np.arange(ho) * sh)[:, None, None, None] + (np.arange(kh) * dh)[None, None, :, None]
    cols = (np.arange(wo) * sw)[None, :, None, None] + (np.arange(kw) * dw)[None, None, None, :]
    idx = rows * wp + cols  # (ho, wo, kh, kw)
    idx = np.ascontiguousarray(idx.reshape(ho * wo, kh * kw), dtype=np.int64)
    idx.flags.writeable = False
    return idx


def adjoint_index(flat_index: np.ndarray, size: int) -> np.ndarray:
    """int64 ``(size, K)`` gather index that inverts ``flat_index`` (values in ``[0, size)``).

    Entry ``[s, t]`` is the position in ``flat_index`` of the ``t``-th read of row ``s``, or
    ``len(flat_index)`` (a zero row) when row ``s`` is read fewer than ``K`` times.
    """
    n = flat_index.size
    counts = np.bincount(flat_index, minlength=size)
    k = max(int(counts.max(initial=0)), 1)
    order = np.argsort(flat_index, kind="stable")
    starts = np.cumsum(counts) - counts
    rank = np.arange(n) - np.repeat(starts, counts)
    gather = np.full((size, k), n, dtype=np.int64)
    gather[flat_index[order], rank] = order
    gather.flags.writeable = False
    return gather


class DeviceCache:
    """Copies of host index arrays on each backend/device, made once and reused."""

    def __init__(self) -> None:
        self._arrays: dict[tuple, Any] = {}

    def get(self, xp: Any, device: Any, key: tuple, build) -> Any:
        """The device copy of ``build()`` for ``key``; ``build`` runs at most once per device.

        ``device`` None (a value traced by ``jax.jit``) is not cached: the copy made inside a
        trace is part of that trace and must not outlive it."""
        if device is None:
            return xp.asarray(build())
        full_key = (key, xp.__name__, str(device))
        arr = self._arrays.get(full_key)
        if arr is None:
            host = build()
            if "torch" in xp.__name__:
                host = np.array(host)  # torch warns on read-only buffers
            arr = xp.asarray(host, device=device)
            self._arrays[full_key] = arr
        return arr


device_cache = DeviceCache()
