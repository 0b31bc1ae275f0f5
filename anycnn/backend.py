"""The backend shim: the one module that knows which array library anycnn runs on.

Rules (tests check each one):

* ``ANYCNN_BACKEND`` is one of ``auto`` (default), ``numpy``, ``cupy``, ``torch`` or
  ``array_api_strict``. It is read at first use, never at import.
* ``auto`` takes CuPy when it imports *and* a CUDA device answers, else NumPy, and records why in
  :attr:`Backend.reason` (also logged on the ``anycnn`` logger and shown by ``anycnn info``).
* An explicit name never falls back: if it cannot be used, :class:`~anycnn.errors.BackendError` says
  which backend, why, and how to fix it. An unknown name lists the valid ones.
* A backend module is imported only when it is asked for, so NumPy users never import cupy or torch.
* Everything else in anycnn takes its namespace from its input arrays (:func:`namespace_of`), so
  operations follow their data; mixing arrays of two backends or devices is a
  :class:`~anycnn.errors.BackendMismatchError`, never a silent copy.
* Host copies happen only at the edges, through :func:`to_numpy` and :func:`asarray`.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from .errors import BackendError, BackendMismatchError, ShapeError

ENV_VAR = "ANYCNN_BACKEND"
BACKEND_NAMES = ("numpy", "cupy", "torch", "array_api_strict", "jax")
CHOICES = ("auto", *BACKEND_NAMES)

_INSTALL_HINT = {
    "numpy": "pip install -r backends/numpy.txt  (or: pip install numpy)",
    "cupy": "pip install -r backends/cupy.txt  (needs an NVIDIA GPU and CUDA 12 driver)",
    "torch": "pip install -r backends/torch.txt  (or: pip install 'anycnn[torch]')",
    "array_api_strict": "pip install -r backends/array_api_strict.txt",
    "jax": "pip install -r backends/jax.txt  (or: pip install 'jax[cpu]')",
}

log = logging.getLogger("anycnn")


@dataclass(frozen=True)
class Backend:
    """A resolved backend.

    Attributes:
        name: one of :data:`BACKEND_NAMES`.
        xp: the Array API namespace (``array_api_compat.numpy``, ``array_api_strict``, ...).
        device: the device new arrays are put on (``xp``'s own device object).
        reason: why this backend was chosen, in words (for logs and ``anycnn info``).
    """

    name: str
    xp: Any
    device: Any
    reason: str

    def __repr__(self) -> str:
        return f"Backend(name={self.name!r}, device={self.device!r})"


def _cuda_device_count() -> tuple[int, str]:
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


def _make(name: str, reason: str) -> Backend:
    """Import backend ``name`` and build its :class:`Backend`; raises BackendError if unusable."""
    hint = _INSTALL_HINT[name]
    if name == "cupy":
        count, why = _cuda_device_count()
        if count == 0:
            raise BackendError(f"backend 'cupy' cannot be used: {why}. Fix: {hint}")
        module = "array_api_compat.cupy"
    elif name == "array_api_strict":
        module = "array_api_strict"
    elif name == "jax":
        module = "jax.numpy"  # JAX's own namespace follows the Array API standard
    else:
        module = f"array_api_compat.{name}"
    try:
        xp = importlib.import_module(module)
    except ImportError as exc:
        raise BackendError(
            f"backend {name!r} cannot be used: {exc.name or module} is not installed. Fix: {hint}"
        ) from exc
    if name == "jax":
        import jax

        # anycnn's float64 (gradient checks, dtype="float64" models) must stay float64
        jax.config.update("jax_enable_x64", True)
    if name == "torch":
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = array_api_compat.device(xp.empty(0))
    if name == "numpy":
        tune_host_allocator()
    return Backend(name=name, xp=xp, device=device, reason=reason)


def resolve(requested: str) -> Backend:
    """Turn a backend request (``auto`` or a name) into a usable :class:`Backend`.

    Raises:
        BackendError: the name is unknown, or the named backend cannot be used here.
    """
    name = str(requested).strip().lower().replace("-", "_")
    if name not in CHOICES:
        raise BackendError(
            f"unknown backend {requested!r}; valid names: {', '.join(CHOICES)}"
        )
    if name != "auto":
        return _make(name, f"requested explicitly ({name})")
    count, why = _cuda_device_count()
    if count:
        backend = _make("cupy", f"auto: {why}")
    else:
        backend = _make("numpy", f"auto: no usable GPU, using numpy ({why})")
    log.info("anycnn backend %s (%s)", backend.name, backend.reason)
    return backend


_current: Backend | None = None


def get_backend() -> Backend:
    """The current backend, resolving ``ANYCNN_BACKEND`` on first use."""
    global _current
    if _current is None:
        _current = resolve(os.environ.get(ENV_VAR, "auto") or "auto")
    return _current


class use_backend:
    """Switch the current backend now; as a context manager, switch back on exit.

    >>> use_backend("numpy")              # doctest: +SKIP
    >>> with use_backend("torch") as b:   # doctest: +SKIP
    ...     ...
    """

    def __init__(self, name: str) -> None:
        global _current
        self._previous = _current
        self.backend = resolve(name)
        _current = self.backend

    def __enter__(self) -> Backend:
        return self.backend

    def __exit__(self, *exc_info: object) -> None:
        global _current
        _current = self._previous


def probe_all() -> list[dict[str, Any]]:
    """Availability of every backend, for ``anycnn info``: name, ok, version, device, detail."""
    rows = []
    for name in BACKEND_NAMES:
        try:
            backend = _make(name, "probe")
        except BackendError as exc:
            rows.append({"name": name, "ok": False, "version": None, "device": None,
                         "detail": str(exc)})
            continue
        top = importlib.import_module(name)
        rows.append({"name": name, "ok": True, "version": getattr(top, "__version__", "?"),
                     "device": str(backend.device), "detail": "available"})
    return rows


def backend_label(x: Any) -> str:
    """The backend name (``"numpy"``, ``"cupy"``, ``"torch"``, ``"array_api_strict"``,
    ``"jax"``) of the library an array belongs to; another library's namespace or module name
    otherwise (for messages and checkpoint metadata)."""
    if type(x) is np.ndarray:
        return "numpy"
    try:
        xp = array_api_compat.array_namespace(x)
    except TypeError:
        return type(x).__module__.split(".")[0]
    for name, check in (("numpy", array_api_compat.is_numpy_namespace),
                        ("cupy", array_api_compat.is_cupy_namespace),
                        ("torch", array_api_compat.is_torch_namespace),
                        ("array_api_strict", array_api_compat.is_array_api_strict_namespace),
                        ("jax", array_api_compat.is_jax_namespace)):
        if check(xp):
            return name
    return getattr(xp, "__name__", "unknown")


@functools.cache
def _numpy_namespace() -> Any:
    import array_api_compat.numpy

    return array_api_compat.numpy


def namespace_of(*arrays: Any) -> Any:
    """The Array API namespace shared by ``arrays`` (``None`` entries are ignored).

    Raises:
        BackendMismatchError: the arrays come from two libraries or sit on two devices.
        ShapeError: one of them is not an array at all (a list, a string, ...).
    """
    present = [a for a in arrays if a is not None]
    if present and all(type(a) is np.ndarray for a in present):
        return _numpy_namespace()  # the common case, without the generic checks (~10x faster)
    try:
        xp = array_api_compat.array_namespace(*present)
    except TypeError as exc:
        not_arrays = [a for a in present if not array_api_compat.is_array_api_obj(a)]
        if not_arrays:  # a list, a scalar, None-like...: say so instead of "mixed backends"
            raise ShapeError(
                f"expected an array (numpy, cupy, torch or array_api_strict), got "
                f"{type(not_arrays[0]).__name__}; convert it first with anycnn.asarray"
            ) from exc
        labels = sorted({backend_label(a) for a in present})
        raise BackendMismatchError(
            f"arrays from different backends mixed in one call: {' and '.join(labels)}; "
            "move them to one backend first (anycnn.asarray / anycnn.to_numpy)"
        ) from exc
    devices = []
    for a in present:
        try:
            d = array_api_compat.device(a)
        except AttributeError as exc:  # a Python scalar next to arrays
            raise ShapeError(f"expected an array, got {type(a).__name__}; convert it first "
                             "with anycnn.asarray") from exc
        if d is None:  # a traced array (jax.jit) has no device: it follows the others
            continue
        if all(d != other for other in devices):
            devices.append(d)
    if len(devices) > 1:
        raise BackendMismatchError(
            f"arrays on different devices mixed in one call: {devices[0]} and {devices[1]}"
        )
    return xp


def asarray(data: Any, dtype: Any = None, backend: Backend | None = None) -> Any:
    """Copy host data (a NumPy array, list, scalar) onto ``backend`` (default: current one).

    The dtype is kept unless ``dtype`` is given (a NumPy dtype or the name ``"float32"``, ...).
    """
    b = backend or get_backend()
    host = np.asarray(data)
    if dtype is not None:
        host = host.astype(dtype, copy=False)
    if b.name == "torch":
        host = np.ascontiguousarray(host)  # torch cannot wrap negative-stride views
    return b.xp.asarray(host, device=b.device)


def to_numpy(x: Any) -> np.ndarray:
    """A host NumPy copy (or view, for NumPy input) of any backend's array.

    Raises:
        BackendError: ``x`` is an array this function cannot read back (e.g. a lazy, graph-
            building namespace's), instead of returning a meaningless object array.
    """
    if isinstance(x, np.ndarray | np.generic | int | float | bool | list | tuple):
        return np.asarray(x)
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    try:
        xp = array_api_compat.array_namespace(x)
    except TypeError as exc:
        raise BackendError(f"cannot copy a {type(x).__module__}.{type(x).__qualname__} to the "
                           "host: it is not an array of a library array-api-compat knows") from exc
    if array_api_compat.is_array_api_strict_namespace(xp):
        import array_api_strict

        return np.asarray(x.to_device(array_api_strict.Device("CPU_DEVICE")))
    try:  # JAX and other libraries that implement __array__ or DLPack
        host = np.asarray(x)
    except Exception as exc:
        raise BackendError(f"cannot copy a {type(x).__module__}.{type(x).__qualname__} to the "
                           f"host: {exc}") from exc
    if host.dtype == object:
        raise BackendError(
            f"cannot copy a {type(x).__module__}.{type(x).__qualname__} to the host: NumPy "
            "made an object array of it (the library offers neither __array__ nor DLPack "
            "with data, e.g. a graph-building namespace)")
    return host


@functools.cache
def writes_in_place(xp: Any) -> bool:
    """Whether in-place operators (``a -= b``, ``a[i] = v``) change the arrays of namespace
    ``xp`` (NumPy, CuPy, torch, array-api-strict), or only rebind the name to a new array (JAX,
    dask: there an in-place update would silently do nothing). Unknown namespaces are probed
    once: an alias of a zero array is incremented and the original read back. Cached per
    namespace (the optimizers ask once per parameter and step)."""
    c = array_api_compat
    if c.is_jax_namespace(xp) or c.is_dask_namespace(xp):
        return False
    if (c.is_numpy_namespace(xp) or c.is_cupy_namespace(xp) or c.is_torch_namespace(xp)
            or c.is_array_api_strict_namespace(xp)):
        return True
    return _probe_in_place(xp)


def _probe_in_place(xp: Any) -> bool:
    try:
        a = xp.zeros(1)
        alias = a
        alias += 1
        return bool(float(to_numpy(a)[0]) == 1.0)
    except Exception:
        return False


def require_in_place(xp: Any, what: str) -> None:
    """Refuse an in-place update of ``xp``'s arrays when they are immutable (the guard that
    turns a silent no-op into an error).

    Raises:
        BackendError: ``xp`` does not write in place.
    """
    if not writes_in_place(xp):
        raise BackendError(f"{what} updates arrays in place, but {getattr(xp, '__name__', xp)} "
                           "arrays are immutable (a -= b makes a new array): use the "
                           "functional update path")


_DTYPE_NAMES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8",
                "bool")


def dtype_name(x: Any) -> str:
    """The standard name (``"float32"``, ...) of an array's dtype, on any backend."""
    xp = namespace_of(x)
    for name in _DTYPE_NAMES:
        if x.dtype == getattr(xp, name, None):
            return name
    raise TypeError(f"unsupported dtype {x.dtype}")


def synchronize(backend: Backend | None = None) -> None:
    """Wait until queued device work of ``backend`` (default: current) is done (GPU timing)."""
    b = backend or get_backend()
    if b.name == "cupy":
        import cupy

        cupy.cuda.get_current_stream().synchronize()
    elif b.name == "torch" and getattr(b.device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize()
