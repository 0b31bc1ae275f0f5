"""Optimizers (:mod:`~anycnn.optim.optimizers`: ``SGD``, ``Adam``, ``AdamW``, with parameter
groups), helpers that build parameter groups (:mod:`~anycnn.optim.groups`: ``decay_groups``,
``split_groups``) and learning-rate schedules (:mod:`~anycnn.optim.schedules`: ``Constant``,
``StepDecay``, ``Cosine``)."""

from __future__ import annotations

from .._lazy import lazy_exports, names

_EXPORTS = {
    **names("optimizers", "Optimizer", "SGD", "Adam", "AdamW"),
    **names("groups", "decay_groups", "split_groups"),
    **names("schedules", "Constant", "StepDecay", "Cosine", "make_schedule"),
}
_SUBMODULES = {m: m for m in ("optimizers", "groups", "schedules")}
__all__ = sorted([*_EXPORTS, *_SUBMODULES])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _SUBMODULES, globals())
