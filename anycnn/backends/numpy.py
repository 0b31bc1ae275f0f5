"""NumPy: the CPU backend, and ``auto``'s choice when no GPU answers."""

from __future__ import annotations

import os
from typing import Any

import array_api_compat

from .spec import BackendSpec

_allocator_tuned = False


def tune_host_allocator() -> bool:
    """Keep large freed buffers inside glibc's heap instead of returning them to the OS.

    Training allocates the same large temporaries every step; by default glibc serves each with
    a fresh ``mmap`` and unmaps it on free, so every step pays page faults again (measured to
    double step times). Raising the mmap and trim thresholds lets the memory be reused. Only
    for CPU backends on glibc; ``ANYCNN_TUNE_MALLOC=0`` turns it off. Returns True if applied.
    """
    global _allocator_tuned
    if _allocator_tuned or os.environ.get("ANYCNN_TUNE_MALLOC", "1") == "0":
        return _allocator_tuned
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        # serve every allocation from the heap (no per-buffer mmap), and keep freed memory
        ok = libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        return False
    _allocator_tuned = bool(ok)
    return _allocator_tuned


def _setup() -> None:
    tune_host_allocator()


def _owns_array(x: Any) -> bool:
    return array_api_compat.is_numpy_array(x)


SPEC = BackendSpec(
    name="numpy", namespace="array_api_compat.numpy", order=0,
    owns_namespace=array_api_compat.is_numpy_namespace, owns_array=_owns_array,
    install_note="or: pip install numpy", auto="fallback", setup=_setup)
