"""array-api-strict: the portability referee (CPU; rejects anything outside the standard)."""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

from .spec import BackendSpec


def _owns_array(x: Any) -> bool:
    return type(x).__module__.startswith("array_api_strict")


def _host_copy(x: Any) -> Any:
    import array_api_strict

    return np.asarray(x.to_device(array_api_strict.Device("CPU_DEVICE")))


def _on_host(device: Any) -> bool:
    """Its CPU device; its other devices stand for accelerators in tests."""
    import array_api_strict

    return device == array_api_strict.Device("CPU_DEVICE")


SPEC = BackendSpec(
    name="array_api_strict", namespace="array_api_strict", order=3,
    owns_namespace=array_api_compat.is_array_api_strict_namespace, owns_array=_owns_array,
    host_copy=_host_copy, on_host=_on_host)
