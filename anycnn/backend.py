"""The backend shim: the one module that knows which array library anycnn runs on.

What it knows about each library comes from that library's description, a
:class:`~anycnn.backends.spec.BackendSpec` in :mod:`anycnn.backends` (one module per backend:
its namespace module, install hint, host copy, synchronisation, mutability, compile support,
devices, setup); this module tests no backend name.

Rules (tests check each one):

* ``ANYCNN_BACKEND`` is ``auto`` (default) or one of :func:`backend_names` (``numpy``, ``cupy``,
  ``torch``, ``array_api_strict``, ``jax``). It is read at first use, never at import.
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
import sys
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from . import backends as _specs
from .backends.numpy import tune_host_allocator
from .backends.spec import BackendSpec
from .errors import BackendError, BackendMismatchError, ShapeError

ENV_VAR = "ANYCNN_BACKEND"

log = logging.getLogger("anycnn")

__all__ = ["Backend", "BackendSpec", "asarray", "backend_help", "backend_label", "backend_names",
           "describe", "dtype_name", "get_backend", "namespace_of", "on_host", "probe_all",
           "require_in_place", "resolve", "synchronize", "to_numpy", "tune_host_allocator",
           "use_backend", "uses_gpu", "writes_in_place"]


def backend_names() -> tuple[str, ...]:
    """The names of every described backend (``"numpy"``, ``"cupy"``, ``"torch"``,
    ``"array_api_strict"``, ``"jax"``), in the order lists show them."""
    return tuple(s.name for s in _specs.all_specs())


def backend_help() -> str:
    """The help text of a ``--backend`` option, built from :func:`backend_names`."""
    return f"{' | '.join(backend_names())} | auto (default: ${ENV_VAR}, else auto)"


def __getattr__(name: str) -> Any:
    # BACKEND_NAMES and CHOICES list the package anycnn.backends: done on first use, not import
    if name == "BACKEND_NAMES":
        return backend_names()
    if name == "CHOICES":
        return ("auto", *backend_names())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def describe(name: str) -> BackendSpec:
    """The description of backend ``name`` (one of :func:`backend_names`).

    Raises:
        BackendError: no backend has that name.
    """
    spec = _specs.find(name)
    if spec is None:
        raise BackendError(f"unknown backend {name!r}; valid names: "
                           f"{', '.join(('auto', *backend_names()))}")
    return spec


@dataclass(frozen=True)
class Backend:
    """A resolved backend.

    Attributes:
        name: one of :func:`backend_names`.
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

    @property
    def spec(self) -> BackendSpec:
        """This backend's description (:mod:`anycnn.backends`)."""
        return describe(self.name)


def _auto_choice(role: str) -> BackendSpec:
    """The backend with ``auto`` role ``role`` (``"first"`` or ``"fallback"``)."""
    return next(s for s in _specs.all_specs() if s.auto == role)


def _cuda_device_count() -> tuple[int, str]:
    """(devices, reason text) from the device probe of ``auto``'s first choice (CuPy: CUDA
    devices); never raises."""
    return _auto_choice("first").count_devices()


def _make(name: str, reason: str) -> Backend:
    """Import backend ``name`` and build its :class:`Backend`; raises BackendError if unusable."""
    spec = describe(name)
    hint = spec.install_hint
    if spec.count_devices is not None:
        # auto's first choice is probed through _cuda_device_count (the one probe tests stub)
        count, why = (_cuda_device_count() if spec.auto == "first" else spec.count_devices())
        if count == 0:
            raise BackendError(f"backend {name!r} cannot be used: {why}. Fix: {hint}")
    module = spec.namespace
    try:
        xp = importlib.import_module(module)
    except ImportError as exc:
        raise BackendError(
            f"backend {name!r} cannot be used: {exc.name or module} is not installed. Fix: {hint}"
        ) from exc
    if spec.setup is not None:
        spec.setup()
    if spec.default_device is not None:
        device = spec.default_device(xp)
    else:
        device = array_api_compat.device(xp.empty(0))
    return Backend(name=name, xp=xp, device=device, reason=reason)


def resolve(requested: str) -> Backend:
    """Turn a backend request (``auto`` or a name) into a usable :class:`Backend`.

    Raises:
        BackendError: the name is unknown, or the named backend cannot be used here.
    """
    name = str(requested).strip().lower().replace("-", "_")
    choices = ("auto", *backend_names())
    if name not in choices:
        raise BackendError(
            f"unknown backend {requested!r}; valid names: {', '.join(choices)}"
        )
    if name != "auto":
        return _make(name, f"requested explicitly ({name})")
    count, why = _cuda_device_count()
    if count:
        backend = _make(_auto_choice("first").name, f"auto: {why}")
    else:
        fallback = _auto_choice("fallback").name
        backend = _make(fallback, f"auto: no usable GPU, using {fallback} ({why})")
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
    for name in backend_names():
        try:
            backend = _make(name, "probe")
        except BackendError as exc:
            rows.append({"name": name, "ok": False, "version": None, "device": None,
                         "detail": str(exc)})
            continue
        top = importlib.import_module(name)  # the top-level module, for its version
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
    spec = _specs.for_namespace(xp)
    if spec is not None:
        return spec.name
    return getattr(xp, "__name__", "unknown")


@functools.cache
def _numpy_namespace() -> Any:
    import array_api_compat.numpy

    return array_api_compat.numpy


@functools.cache
def _torch_namespace() -> Any:
    import array_api_compat.torch

    return array_api_compat.torch


def _torch_tensors_namespace(arrays: tuple) -> Any:
    """array-api-compat's torch namespace when every array given (None entries aside) is a
    plain ``torch.Tensor`` and all sit on one device; else None (the generic checks decide:
    ~5 us a call for tensors, hundreds of calls a resnet20 step). torch is never imported."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    tensor, device = torch.Tensor, None
    for a in arrays:
        if a is None:
            continue
        if type(a) is not tensor:
            return None
        if device is None:
            device = a.device
        elif a.device != device:
            return None
    return None if device is None else _torch_namespace()


def namespace_of(*arrays: Any) -> Any:
    """The Array API namespace shared by ``arrays`` (``None`` entries are ignored).

    Raises:
        BackendMismatchError: the arrays come from two libraries or sit on two devices.
        ShapeError: one of them is not an array at all (a list, a string, ...).
    """
    numpy_seen = False  # the common case first, without the generic checks (~10x faster)
    for a in arrays:  # NumPy arrays and None only (no Variable among them)
        if type(a) is np.ndarray:
            numpy_seen = True
        elif a is not None:
            break
    else:
        if numpy_seen:
            return _numpy_namespace()
    xp = _torch_tensors_namespace(arrays)
    if xp is not None:
        return xp
    variables = [a for a in arrays if getattr(type(a), "__anycnn_variable__", False)]
    if variables:  # autograd Variables (maybe with plain arrays): their recording namespace
        namespace_of(*(a.data if getattr(type(a), "__anycnn_variable__", False) else a
                       for a in arrays))
        return variables[0].__array_namespace__()
    present = [a for a in arrays if a is not None]
    try:
        xp = array_api_compat.array_namespace(*present)
    except TypeError as exc:
        not_arrays = [a for a in present if not array_api_compat.is_array_api_obj(a)]
        if not_arrays:  # a list, a scalar, None-like...: say so instead of "mixed backends"
            raise ShapeError(
                f"expected an array (numpy, cupy, torch, array_api_strict or jax), got "
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
    if b.spec.contiguous_host:
        host = np.ascontiguousarray(host)  # e.g. torch cannot wrap negative-stride views
    return b.xp.asarray(host, device=b.device)


def to_numpy(x: Any) -> np.ndarray:
    """A host NumPy copy (or view, for NumPy input) of any backend's array.

    Raises:
        BackendError: ``x`` is an array this function cannot read back (e.g. a lazy, graph-
            building namespace's), instead of returning a meaningless object array.
    """
    if isinstance(x, np.ndarray | np.generic | int | float | bool | list | tuple):
        return np.asarray(x)
    if getattr(type(x), "__anycnn_variable__", False):  # an autograd Variable: its array
        return x.host()
    spec = _specs.for_array(x)
    if spec is not None and spec.host_copy is not None:
        return spec.host_copy(x)
    try:
        array_api_compat.array_namespace(x)
    except TypeError as exc:
        raise BackendError(f"cannot copy a {type(x).__module__}.{type(x).__qualname__} to the "
                           "host: it is not an array of a library array-api-compat knows") from exc
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
    namespace (the optimizers ask once per parameter and step). A backend's answer is its
    description's :attr:`~anycnn.backends.spec.BackendSpec.mutable`."""
    spec = _specs.for_namespace(xp)
    if spec is not None:
        return spec.mutable
    if array_api_compat.is_dask_namespace(xp):  # lazy arrays, no anycnn backend
        return False
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
    sync = b.spec.synchronize
    if sync is not None:
        sync(b.device)


def uses_gpu(backend: Backend | None = None) -> bool:
    """Whether ``backend`` (default: current) puts new arrays outside host memory (a GPU)."""
    b = backend or get_backend()
    return not b.spec.on_host(b.device)


def on_host(x: Any) -> bool:
    """True when array ``x`` lives in host memory (reading it back costs nothing); arrays of
    libraries without a description count as on the host when their device's name says CPU."""
    device = getattr(x, "device", None)
    spec = _specs.for_array(x)
    if spec is not None:
        return spec.on_host(device)
    return "cpu" in str(device if device is not None else "cpu").lower()
