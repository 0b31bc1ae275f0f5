"""Whether the gradients an optimizer applies were averaged over the ranks of a launch.

Under ``mpiexec`` (or ``srun``) each rank computes gradients on its own share of the data; a
step that applies them without averaging trains a different model on every rank, silently. The
``Trainer`` averages them itself (:meth:`~anycnn.train.parallel.DataParallel.exchange`); a
hand-written loop calls :func:`anycnn.dist.average_gradients`. Both mark the gradients they
wrote here, and :meth:`Optimizer.step <anycnn.optim.optimizers.Optimizer.step>` warns once per
process when it is about to apply unmarked gradients as one of several ranks.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

from ..launcher import launcher_size

_averaged: dict[int, Any] = {}  # id -> gradient array (kept, so that the id is not reused)
_warned = False


def mark_averaged(params: list[Any]) -> None:
    """Record that the current gradients of ``params`` are averages over the ranks."""
    _averaged.clear()
    _averaged.update((id(p.grad), p.grad) for p in params if p.grad is not None)


@functools.cache
def _ranks() -> int:
    return launcher_size() or 1


def check_averaged(params: list[Any]) -> None:
    """Warn (once per process) when this process is one of several ranks and some gradient of
    ``params`` was not averaged over them."""
    global _warned
    if _warned or _ranks() < 2:
        return
    if all(id(p.grad) in _averaged for p in params if p.grad is not None):
        return
    _warned = True
    warnings.warn(
        f"this process is one of {_ranks()} ranks, but the optimizer is applying gradients "
        "that were not averaged over them: every rank trains its own model. Call "
        "anycnn.dist.average_gradients(model) after backward (the Trainer does it itself)",
        RuntimeWarning, stacklevel=3)


def replace_gradient(p: Any, grad: Any) -> None:
    """Set ``p.grad = grad``, a new array computed from the current one (gradient clipping):
    it stays marked as averaged when the old one was."""
    old = p.grad
    p.grad = grad
    if old is not None and _averaged.get(id(old)) is old:
        del _averaged[id(old)]
        _averaged[id(grad)] = grad
