"""PyTorch tensors: CPU, or CUDA when torch sees a GPU."""

from __future__ import annotations

from typing import Any

import array_api_compat

from .spec import BackendSpec


def _default_device(_xp: Any) -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _host_copy(x: Any) -> Any:
    return x.detach().cpu().numpy()


def _on_host(device: Any) -> bool:
    return getattr(device, "type", "cpu") == "cpu"


def _setup() -> None:
    """On a CPU, keep large freed buffers in glibc's heap (as the NumPy backend does): torch
    allocates its large temporaries with ``malloc`` too, and page faults on freshly mapped
    buffers made CPU training steps up to 1.5x slower (measured, simple-cnn)."""
    import torch

    if not torch.cuda.is_available():
        from .numpy import tune_host_allocator

        tune_host_allocator()


def _synchronize(device: Any) -> None:
    if not _on_host(device):
        import torch

        torch.cuda.synchronize()


SPEC = BackendSpec(
    name="torch", namespace="array_api_compat.torch", order=2,
    owns_namespace=array_api_compat.is_torch_namespace, owns_array=array_api_compat.is_torch_array,
    install_note="or: pip install 'anycnn[torch]'", default_device=_default_device,
    host_copy=_host_copy, on_host=_on_host, synchronize=_synchronize, contiguous_host=True,
    setup=_setup)
