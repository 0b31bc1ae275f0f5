"""torch CPU tensors through the compiled kernels (behind the shim): the NumPy backend's speed.

On a CPU, the compiled Halide kernels of :mod:`~anycnn.kernels.native`, ``native_norm``,
``native_bn``, ``native_stamp`` and ``native_narrow`` outrun torch's own operators (oneDNN) for
the layers they cover: resnet20's training step on the NumPy backend took 0.73-0.8x PyTorch
channels_last's, and the torch backend, on torch's operators (:mod:`~anycnn.kernels.torch_ops`),
ran at PyTorch's speed. The kernels here register under the same names as the compiled ones,
ahead of torch's operators: a call whose tensors are all torch CPU tensors is offered to the
compiled kernels on zero-copy NumPy views of those tensors (``Tensor.numpy()``), and their
NumPy results come back as tensors on the same memory (``torch.from_numpy``). What the
compiled kernels decline (a shape they do not take, a dtype without kernels) goes on to torch's
operators, then to the portable code, as before. The backward kernels take what the portable
ops' contracts name (inputs, outputs, statistics: any kernel's forward gives the same), except
a fused block's pooling codes, which differ between kernels: each ``pooled_gradient`` kernel
declines the other's, so a block's backward goes the way its forward went.

Two pools of threads on the same cores fight (Halide's and torch's OpenMP team, measured in
:mod:`~anycnn.kernels.openmp_tasks`), so these kernels take calls only once the compiled
kernels' parallel loops run on torch's OpenMP threads
(:func:`~anycnn.kernels.openmp_tasks.share_threads`); where that cannot be done (kernels
compiled in memory: no C compiler, ``ANYCNN_KERNEL_CACHE=0``), or where the compiled kernels
are off (``ANYCNN_NATIVE=0``, ``ANYCNN_FASTPATH=0``), every call declines and torch's operators
take it, as before. CUDA tensors always decline (torch's operators run them: cuDNN).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from . import dispatch
from .dispatch import DECLINE, implements

__all__ = ["COMPILED_MODULES", "NAMES", "active"]

#: the modules of compiled kernels whose calls torch CPU tensors are offered
COMPILED_MODULES = ("anycnn.kernels.native", "anycnn.kernels.native_norm",
                    "anycnn.kernels.native_bn", "anycnn.kernels.native_stamp",
                    "anycnn.kernels.native_narrow")

#: the dispatch names the compiled kernels register under (a test checks the list is whole)
NAMES = ("batch_norm", "batch_norm_backward", "batch_norm_from_rows", "channel_moments",
         "channel_sums", "conv2d", "conv2d_backward", "conv2d_epilogue", "conv2d_input_grad",
         "conv2d_relu_maxpool", "conv2d_relu_maxpool_eval", "conv_input_grad",
         "grad_sums_from_rows", "input_grad_from_rows", "linear_epilogue",
         "normalize_from_rows", "pooled_gradient", "relu_column_sums", "relu_grad",
         "squared_deviations")


@functools.cache
def _torch() -> Any:
    """The torch module (this module is imported only once torch is)."""
    return importlib.import_module("torch")


_active: bool | None = None  # decided at the first call with torch CPU tensors


def active() -> bool:
    """Whether torch CPU tensors go to the compiled kernels in this process: the kernels are
    on and their parallel loops run on torch's OpenMP threads (decided once)."""
    global _active
    if _active is None:
        from . import native, openmp_tasks

        _active = native.available(np) and openmp_tasks.share_threads("torch")
    return _active


class _Elsewhere(Exception):
    """An operand the compiled kernels cannot read in place (a CUDA tensor, bfloat16)."""


def _as_numpy(a: Any) -> Any:
    """``a`` with its torch CPU tensors (also inside plain tuples and lists) as NumPy views."""
    torch = _torch()
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu":
            raise _Elsewhere
        try:
            return (a.detach() if a.requires_grad else a).numpy()
        except (TypeError, RuntimeError) as e:  # no NumPy dtype (bfloat16), a conjugate view
            raise _Elsewhere from e
    if type(a) is tuple or type(a) is list:
        return type(a)(map(_as_numpy, a))
    return a


def _as_torch(a: Any) -> Any:
    """``a`` with its NumPy arrays (also inside plain tuples and lists) as torch tensors on
    the same memory."""
    if isinstance(a, np.ndarray):
        return _torch().from_numpy(a if a.flags.writeable else a.copy())
    if type(a) is tuple or type(a) is list:
        return type(a)(map(_as_torch, a))
    return a


def _has_tensor(args: tuple, kwargs: dict) -> bool:
    tensor = _torch().Tensor
    return (any(isinstance(a, tensor) for a in args)
            or any(isinstance(a, tensor) for a in kwargs.values()))


def _offer(name: str) -> Callable[..., Any]:
    """The kernel registered under ``name``: the call on NumPy views, offered to the compiled
    kernels of that name in their order, the first result as tensors; else DECLINE."""

    def kernel(*args: Any, **kwargs: Any) -> Any:
        if not (_has_tensor(args, kwargs) and active()):
            return DECLINE
        try:
            views = tuple(map(_as_numpy, args))
            named = {key: _as_numpy(value) for key, value in kwargs.items()}
        except _Elsewhere:
            return DECLINE
        for compiled in dispatch.kernels_for(name):
            if compiled.__module__ in COMPILED_MODULES:
                result = compiled(*views, **named)
                if result is not DECLINE:
                    return _as_torch(result)
        return DECLINE

    kernel.__name__ = kernel.__qualname__ = f"compiled_{name}"
    kernel.__doc__ = f"``{name}`` on torch CPU tensors by the compiled kernels."
    return kernel


for _name in NAMES:
    implements(_name)(_offer(_name))
