"""Special functions from the array library itself, where it has them (the Array API has none).

``erf``: torch (``torch.special.erf``, CPU and CUDA), JAX (``jax.scipy.special.erf``), CuPy
(``cupyx.scipy.special.erf``) and NumPy when SciPy is installed (``scipy.special.erf``); every
other array (array-api-strict, NumPy without SciPy) gets the portable polynomial of
:func:`anycnn.nn.functional.activation.erf`. The library is imported only for its own arrays
(the array's type tells which), and ``ANYCNN_FASTPATH=0`` declines every call.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import array_api_compat

from .dispatch import DECLINE, implements
from .threads import switched_on


@functools.cache
def _library_erf(kind: str) -> Callable[[Any], Any] | None:
    """The library's erf for arrays of ``kind``, or None when it has none."""
    module, name = {"torch": ("torch.special", "erf"), "jax": ("jax.scipy.special", "erf"),
                    "cupy": ("cupyx.scipy.special", "erf"),
                    "numpy": ("scipy.special", "erf")}[kind]
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return None


def _kind(x: Any) -> str | None:
    if array_api_compat.is_torch_array(x):
        return "torch"
    if array_api_compat.is_jax_array(x):
        return "jax"
    if array_api_compat.is_cupy_array(x):
        return "cupy"
    if array_api_compat.is_numpy_array(x):
        return "numpy"
    return None


@implements("erf")
def erf(x: Any) -> Any:
    kind = _kind(x)
    if kind is None or not switched_on():
        return DECLINE
    library_erf = _library_erf(kind)
    return DECLINE if library_erf is None else library_erf(x)
