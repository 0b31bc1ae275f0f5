"""Modes a model runs in for the length of a block: eval mode, its whole state preserved, and
fusion suspended. Functions of any object with the :class:`~anycnn.nn.module.Module` protocol
(``modules()``, ``eval()``, ``training``, ``parameters()``); they import no layer, so
:mod:`anycnn.nn.summarize` and :mod:`anycnn.nn.fusion` can share them without a circle."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """Run the block with every submodule of ``model`` in eval mode, then give each submodule
    back its own previous mode (also when the block raises)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def preserved_state(model: Any) -> Iterator[Any]:
    """Run the block, then put ``model`` back as it was (also when the block raises): every
    submodule's attributes (mode, what ``forward`` kept for ``backward``, buffers, attributes
    set on the instance such as a wrapped ``forward``), every parameter's ``data`` and ``grad``
    (the same array objects), and anycnn's global random generator. The block must not write
    into those arrays in place (anycnn's layers never do: they assign new arrays)."""
    from .. import random

    attributes = [(m, dict(vars(m))) for m in {id(m): m for m in model.modules()}.values()]
    params = {id(p): (p, p.data, p.grad) for p in model.parameters()}.values()
    rng_state = random.get_state()
    try:
        yield model
    finally:
        for m, saved in attributes:
            vars(m).clear()
            vars(m).update(saved)
        for p, data, grad in params:
            p.data, p.grad = data, grad
        random.set_state(rng_state)


_suspended = contextvars.ContextVar("anycnn_fusion_suspended", default=False)


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Within the block, :func:`execution_plan` fuses nothing: every layer's own ``forward`` and
    ``backward`` run (used by :func:`anycnn.summary`, which watches each layer's calls)."""
    token = _suspended.set(True)
    try:
        yield
    finally:
        _suspended.reset(token)


def fusion_suspended() -> bool:
    """Whether the calling context is inside :func:`suspended`."""
    return _suspended.get()
