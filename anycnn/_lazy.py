"""Lazy re-exports for anycnn's packages: a package names what it offers, and a name's module is
imported on first access (so ``import anycnn`` and its subpackages load no array library and read
no environment variable)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str], submodules: dict[str, str],
                 namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list]]:
    """``(__getattr__, __dir__)`` for ``package``.

    Args:
        package: the package's ``__name__``.
        exports: public name -> module (relative to ``package``, e.g. ``"nn.layers"``) that
            defines it.
        submodules: attribute name -> module (relative to ``package``) it stands for.
        namespace: the package's ``globals()``; a resolved name is cached there.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        elif name in submodules:
            value = importlib.import_module(f".{submodules[name]}", package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports, *submodules})

    return __getattr__, __dir__


def names(module: str, *public: str) -> dict[str, str]:
    """``{name: module}`` for each of ``public`` (to build an ``exports`` table)."""
    return dict.fromkeys(public, module)
