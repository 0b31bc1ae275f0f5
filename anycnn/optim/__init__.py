"""Optimizers (:mod:`~anycnn.optim.optimizers`: ``SGD``, ``Adam``, ``AdamW``, ``RMSprop``, with
parameter groups), helpers that build parameter groups (:mod:`~anycnn.optim.groups`:
``decay_groups``, ``split_groups``), learning-rate schedules (:mod:`~anycnn.optim.schedules`:
``Constant``, ``StepDecay``, ``Cosine``, ``OneCycle``, ``ReduceLROnPlateau``), gradient
clipping (:mod:`~anycnn.optim.clipping`: ``clip_grad_norm_``, ``clip_grad_value_``,
``grad_norm``) and a moving average of the weights (:mod:`~anycnn.optim.ema`: ``EMA``)."""

from __future__ import annotations

from .._lazy import lazy_exports, names

_EXPORTS = {
    **names("optimizers", "Optimizer", "SGD", "Adam", "AdamW", "RMSprop"),
    **names("groups", "decay_groups", "split_groups"),
    **names("schedules", "Constant", "StepDecay", "Cosine", "OneCycle", "ReduceLROnPlateau",
            "make_schedule"),
    **names("clipping", "clip_grad_norm_", "clip_grad_value_", "grad_norm"),
    **names("ema", "EMA"),
}
_SUBMODULES = {m: m for m in ("optimizers", "groups", "schedules", "clipping", "ema")}
__all__ = sorted([*_EXPORTS, *_SUBMODULES])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _SUBMODULES, globals())
