"""Calling an ahead-of-time compiled Halide pipeline on NumPy arrays, at little cost per call.

A compiled pipeline is a C function taking a ``halide_buffer_t`` descriptor per array (its
ImageParams, then its outputs) and an int32 per scalar Param, between them in the builder's
order (:mod:`~anycnn.kernels.kernel_cache`). A training step makes hundreds of such calls, many
on small arrays, so the Python work around each one counts.

:class:`Calls` keeps, per thread, one :class:`Plan` per geometry of the arrays (shapes,
strides, dtypes) and values of the scalars: the descriptors packed once into a block of
memory, and the ctypes arguments made once. A call then finds its plan by that key, writes the
arrays' addresses into the descriptors' host fields and calls the function. A plan is only
reused for arrays of the geometry it was packed from; plans are per thread because threads
(:func:`~anycnn.kernels.threads.map_batch`) run the same pipeline on arrays of the same
geometry at once, each writing its own addresses.

Measured (Intel Xeon with AVX-512, CPython 3.11, NumPy 2.4; medians, time over the bare ctypes
call): the Python side of a call of LeNet's first-layer input-gradient kernel (3 arrays, 2
scalars) went from 13.7 us (descriptors packed and ctypes arguments made at every call, the
addresses read through ``a.ctypes``) to 4.0 us; BatchNorm's elementwise kernel (8 arrays) from
28.0 to 6.7 us. What is left is mostly the arrays' addresses (about 0.6 us each).

The layout (Halide's ``HalideRuntime.h``): ``halide_buffer_t`` is device (u64),
device_interface (pointer), host (pointer), flags (u64), type (code u8, bits u8, lanes u16),
dimensions (i32), dim (pointer), padding (pointer): 56 bytes, 7 words.
``halide_dimension_t`` is min, extent, stride (i32 each) and flags (u32): 16 bytes. Halide's
axes are NumPy's reversed, strides counted in elements.
"""

from __future__ import annotations

import ctypes
import functools
import struct
import threading
from typing import Any

import numpy as np

__all__ = ["Calls", "Plan", "address", "descriptors"]

_BUFFER = struct.Struct("=QQQQBBHiQQ")
_DIMENSION = struct.Struct("=iiiI")
_BUFFER_WORDS, _DIMENSION_WORDS, _HOST_WORD = 7, 2, 2  # sizes and the host field, in words
_TYPE_CODES = {"i": 0, "u": 1, "f": 2}

#: the most plans one pipeline keeps per thread; past it they are dropped (and made again as
#: calls need them): a process that sees ever new shapes does not grow without bound
PLANS_PER_THREAD = 64


@functools.cache
def _dimensions(nd: int) -> struct.Struct:
    """``nd`` packed ``halide_dimension_t``."""
    return struct.Struct("=" + "iiiI" * nd)


def descriptors(arrays: list[np.ndarray]) -> Any:
    """``halide_buffer_t`` descriptors of arrays of ``arrays``' shapes, strides and dtypes,
    their host pointers null: a ctypes block of 64-bit words holding the descriptors
    (:data:`_BUFFER_WORDS` each, in order), then their dimensions, which the descriptors point
    to. The block must outlive every use of the descriptors."""
    dims = sum(a.ndim for a in arrays)
    block = (ctypes.c_uint64 * (_BUFFER_WORDS * len(arrays) + _DIMENSION_WORDS * dims))()
    base = ctypes.addressof(block)
    at = _BUFFER.size * len(arrays)
    for k, a in enumerate(arrays):
        nd, size = a.ndim, a.itemsize
        strides = [s // size for s in a.strides]
        if a.size == 0:  # NumPy gives an empty array zero strides; Halide wants them dense
            strides = [int(np.prod(a.shape[i + 1:])) for i in range(nd)]
        _BUFFER.pack_into(block, _BUFFER.size * k, 0, 0, 0, 0, _TYPE_CODES[a.dtype.kind],
                          8 * size, 1, nd, base + at, 0)
        _dimensions(nd).pack_into(block, at, *(v for i in range(nd - 1, -1, -1)
                                                for v in (0, a.shape[i], strides[i], 0)))
        at += _DIMENSION.size * nd
    return block


_from_buffer, _addressof = ctypes.c_char.from_buffer, ctypes.addressof


def address(a: np.ndarray) -> int:
    """The address of ``a``'s first element: through the buffer protocol where ``a`` is
    C-contiguous, writeable and not empty (0.6 us), else through ``a.ctypes`` (1-1.7 us)."""
    try:
        return _addressof(_from_buffer(a))
    except (TypeError, ValueError, BufferError):
        return a.ctypes.data


class Plan:
    """One call geometry of a compiled function: ``block``, the :func:`descriptors` of its
    arrays; ``hosts``, the indices of their host words in ``block``; ``args``, the function's
    ctypes arguments (the descriptors' addresses, ``scalars`` as int32 after the first
    ``images`` of them)."""

    __slots__ = ("args", "block", "hosts")

    def __init__(self, arrays: list[np.ndarray], images: int, scalars: tuple) -> None:
        self.block = descriptors(arrays)
        self.hosts = range(_HOST_WORD, _BUFFER_WORDS * len(arrays), _BUFFER_WORDS)
        base = ctypes.addressof(self.block)
        pointers = [ctypes.c_void_p(base + _BUFFER.size * k) for k in range(len(arrays))]
        self.args = (*pointers[:images], *(ctypes.c_int32(int(v)) for v in scalars),
                     *pointers[images:])


class Calls:
    """Calls of the compiled ``function`` (ctypes, returning an int) whose first ``images``
    buffer arguments precede its scalars, with this thread's :class:`Plan` for each geometry.
    """

    def __init__(self, function: Any, images: int) -> None:
        self.function, self.images = function, images
        self._local = threading.local()  # .plans: {(geometry, scalars): Plan}

    def __call__(self, arrays: list[np.ndarray], scalars: tuple) -> int:
        """``function``'s result on ``arrays`` (its inputs, then its outputs; held by the
        caller until this returns) and ``scalars`` (ints, in order)."""
        key = (tuple([(a.shape, a.strides, a.dtype) for a in arrays]), scalars)
        try:
            plans = self._local.plans
        except AttributeError:
            plans = self._local.plans = {}
        plan = plans.get(key)
        if plan is None:
            if len(plans) >= PLANS_PER_THREAD:
                plans.clear()
            plan = plans[key] = Plan(arrays, self.images, scalars)
        block = plan.block
        for word, a in zip(plan.hosts, arrays):
            block[word] = address(a)
        return self.function(*plan.args)

    def plans(self) -> dict:
        """This thread's plans, by ``(geometry, scalars)`` (for tests)."""
        return getattr(self._local, "plans", {})
