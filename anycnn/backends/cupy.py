"""CuPy: NVIDIA GPUs; ``auto``'s first choice when a CUDA device answers."""

from __future__ import annotations

from typing import Any

import array_api_compat

from .spec import BackendSpec


def count_devices() -> tuple[int, str]:
    """(number of CUDA devices CuPy sees, reason text); never raises."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return 0, f"cupy is not importable ({type(exc).__name__}: {exc})"
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:
        return 0, f"cupy imported but no CUDA device answers ({type(exc).__name__}: {exc})"
    if count == 0:
        return 0, "cupy imported but reports 0 CUDA devices"
    return count, f"cupy {cupy.__version__} sees {count} CUDA device(s)"


def _host_copy(x: Any) -> Any:
    return x.get()


def _synchronize(_device: Any) -> None:
    import cupy

    cupy.cuda.get_current_stream().synchronize()


def _on_host(_device: Any) -> bool:
    return False


SPEC = BackendSpec(
    name="cupy", namespace="array_api_compat.cupy", order=1,
    owns_namespace=array_api_compat.is_cupy_namespace, owns_array=array_api_compat.is_cupy_array,
    install_note="needs an NVIDIA GPU and CUDA 12 driver", auto="first",
    count_devices=count_devices, host_copy=_host_copy, on_host=_on_host,
    synchronize=_synchronize)
