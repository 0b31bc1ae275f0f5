"""JAX arrays (``jax.numpy``): immutable arrays, float64 enabled, compiled training steps."""

from __future__ import annotations

from typing import Any

import array_api_compat

from .spec import BackendSpec


def _setup() -> None:
    import jax

    # anycnn's float64 (gradient checks, dtype="float64" models) must stay float64
    jax.config.update("jax_enable_x64", True)


def _on_host(device: Any) -> bool:
    return getattr(device, "platform", "cpu") == "cpu"


SPEC = BackendSpec(
    name="jax", namespace="jax.numpy",  # JAX's own namespace follows the Array API standard
    order=4, owns_namespace=array_api_compat.is_jax_namespace,
    owns_array=array_api_compat.is_jax_array, install_note="or: pip install 'jax[cpu]'",
    mutable=False, compiles=True, setup=_setup, on_host=_on_host)
