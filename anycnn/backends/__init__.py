"""One description (:class:`~anycnn.backends.spec.BackendSpec`) per array backend.

Every module of this package except :mod:`~anycnn.backends.spec` describes one backend in a
``SPEC`` record; the registry below finds them by listing the package, so adding a backend is
one module here plus its requirements file ``backends/NAME.txt``. Listing imports only these
small modules, never an array library. :mod:`anycnn.backend` is the one reader.
"""

from __future__ import annotations

import functools
import pkgutil
from importlib import import_module  # bound now: tests stub importlib.import_module
from typing import Any

from .spec import BackendSpec

__all__ = ["BackendSpec", "all_specs", "find", "for_array", "for_namespace"]


@functools.cache
def all_specs() -> tuple[BackendSpec, ...]:
    """Every backend described in this package, in :attr:`BackendSpec.order`."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name == "spec" or info.name.startswith("_"):
            continue
        found.append(import_module(f"{__name__}.{info.name}").SPEC)
    return tuple(sorted(found, key=lambda s: (s.order, s.name)))


@functools.cache
def _by_name() -> dict[str, BackendSpec]:
    return {s.name: s for s in all_specs()}


def find(name: str) -> BackendSpec | None:
    """The description of backend ``name``, or None if there is none."""
    return _by_name().get(name)


def for_namespace(xp: Any) -> BackendSpec | None:
    """The description of the backend whose namespace ``xp`` is, or None."""
    return next((s for s in all_specs() if s.owns_namespace(xp)), None)


def for_array(x: Any) -> BackendSpec | None:
    """The description of the backend array ``x`` belongs to, or None."""
    return next((s for s in all_specs() if s.owns_array(x)), None)
