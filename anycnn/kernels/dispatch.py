"""The one dispatch point between the portable ops (:mod:`anycnn.nn.functional`) and the kernels.

The portable ops are written once against the Array API. Where a kernel may compute an op
faster on some namespace (the NumPy fast paths of :mod:`~anycnn.kernels.fastpath`, the compiled
Halide kernels of :mod:`~anycnn.kernels.native` and :mod:`~anycnn.kernels.native_norm`, also
for torch CPU tensors through :mod:`~anycnn.kernels.torch_native`, torch's own operators in
:mod:`~anycnn.kernels.torch_ops`), the op
asks this module first, by name, with its own arguments:

- :func:`overridable` wraps a portable function: each kernel registered under its name is
  offered the call in turn and either returns the result or :data:`DECLINE` (the arrays are
  not its kind, the shape does not suit it, the kernels are switched off); when every kernel
  declines, the portable body runs. ``op.portable`` is the body alone (tests compare the two).
- :func:`attempt` asks the kernels of a name whose portable counterpart is a longer piece of
  code in the caller; the caller runs it when the answer is :data:`DECLINE`.
- :func:`prefers` asks whether a portable formulation measured faster on the arrays' namespace
  should be used (for example an input gradient computed as a convolution on NumPy): a
  registered chooser answers True, or declines.

Kernels register with :func:`implements` in their own modules, which are imported at the first
dispatch (:data:`KERNEL_MODULES`), never at ``import anycnn``; a module serving one array
library's arrays only (:data:`ONLY_FOR`) waits until that library has been imported. A kernel
must return exactly what the portable function returns, up to rounding:
``tests/test_fastpath.py`` and ``tests/test_native.py`` compare them. ``ANYCNN_FASTPATH=0``
switches every kernel off, so the suite then runs the portable code alone on every backend.

This module knows no backend: it holds names and functions only.
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["DECLINE", "KERNEL_MODULES", "ONLY_FOR", "attempt", "implements", "overridable",
           "prefers"]

Fn = TypeVar("Fn", bound=Callable[..., Any])


class _Declined:
    """The type of :data:`DECLINE` (one instance, compared with ``is``)."""

    def __repr__(self) -> str:
        return "DECLINE"

    def __bool__(self) -> bool:  # never mistaken for a result in a truth test
        return False


#: what a kernel returns when it does not compute a call (the portable code then does)
DECLINE = _Declined()

#: the modules whose kernels register themselves, imported at the first dispatch, in order of
#: preference (a kernel that declines passes the call on): torch CPU tensors to the compiled
#: kernels, then torch's own operators (they take only torch tensors, and the state their
#: forward kept), then the compiled kernels
KERNEL_MODULES = ("anycnn.kernels.torch_native", "anycnn.kernels.torch_ops",
                  "anycnn.kernels.native",
                  "anycnn.kernels.native_norm", "anycnn.kernels.native_bn",
                  "anycnn.kernels.native_stamp",
                  "anycnn.kernels.native_narrow",
                  "anycnn.kernels.fastpath", "anycnn.kernels.special")

#: kernel modules that take one array library's arrays only → that library's module: such a
#: module is imported at the first dispatch after the library is (its arrays cannot exist
#: before), so a NumPy-only process never imports torch's kernels (1.6 ms of its first step;
#: about 4 ms where Python compiles the source, without ``.pyc`` files)
ONLY_FOR = {"anycnn.kernels.torch_native": "torch", "anycnn.kernels.torch_ops": "torch"}

_kernels: dict[str, tuple[Callable[..., Any], ...]] = {}
_loaded = False
_waiting: frozenset[str] = frozenset()  # the libraries whose kernel modules are not imported
_lock = threading.Lock()


def implements(name: str) -> Callable[[Fn], Fn]:
    """Register the decorated function as a kernel for the portable op (or choice) ``name``.

    The kernel takes the op's arguments and returns its result or :data:`DECLINE`. Kernels of
    one name are tried in the order of their modules in :data:`KERNEL_MODULES` (whatever order
    the modules happened to be imported in).
    """
    def register(kernel: Fn) -> Fn:
        _kernels[name] = (*_kernels.get(name, ()), kernel)
        return kernel

    return register


def _preference(kernel: Callable[..., Any]) -> int:
    module = getattr(kernel, "__module__", "")
    return KERNEL_MODULES.index(module) if module in KERNEL_MODULES else len(KERNEL_MODULES)


def _load() -> None:
    """Import the kernel modules not imported yet whose array library (if any) is loaded."""
    global _loaded, _waiting
    with _lock:
        if _loaded and not _arrived():
            return
        waiting = set()
        for module in KERNEL_MODULES:
            library = ONLY_FOR.get(module)
            if library is None or library in sys.modules:
                importlib.import_module(module)
            else:
                waiting.add(library)
        for name, kernels in _kernels.items():  # a stable sort: registration order within
            _kernels[name] = tuple(sorted(kernels, key=_preference))
        _waiting = frozenset(waiting)
        _loaded = True


def _arrived() -> bool:
    """Whether a library that kernel modules wait for has been imported."""
    modules = sys.modules
    for library in _waiting:  # a loop, not any(): this runs on every dispatch
        if library in modules:
            return True
    return False


def kernels_for(name: str) -> tuple[Callable[..., Any], ...]:
    """The kernels registered for ``name``, in the order they are tried."""
    if not _loaded or (_waiting and _arrived()):
        _load()
    return _kernels.get(name, ())


def attempt(name: str, *args: Any, **kwargs: Any) -> Any:
    """The first result a kernel for ``name`` gives for these arguments, or :data:`DECLINE`."""
    for kernel in kernels_for(name):
        result = kernel(*args, **kwargs)
        if result is not DECLINE:
            return result
    return DECLINE


def prefers(choice: str, *arrays: Any) -> bool:
    """Whether the formulation ``choice`` is the measured faster one for ``arrays``."""
    return attempt(choice, *arrays) is True


def overridable(portable: Fn) -> Fn:
    """Make ``portable`` (a function written against the Array API) a dispatch point named after
    it: registered kernels are offered each call first. ``.portable`` is the undecorated body."""
    name = portable.__name__

    @functools.wraps(portable)
    def op(*args: Any, **kwargs: Any) -> Any:
        result = attempt(name, *args, **kwargs)
        return portable(*args, **kwargs) if result is DECLINE else result

    op.portable = portable  # type: ignore[attr-defined]
    return op  # type: ignore[return-value]
