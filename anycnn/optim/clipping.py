"""Gradient clipping, with PyTorch's rules (``torch.nn.utils.clip_grad_norm_`` and
``clip_grad_value_``): call between ``backward`` and ``optimizer.step``, or pass
``Trainer(..., clip_grad_norm=..., clip_grad_value=...)``.

Both read and write ``param.grad`` of the parameters that have one (frozen ones have none) and
stay on the device: the total norm is a 0-d array, and nothing is read back to the host unless
``error_if_nonfinite`` asks for it. The clipped gradients are new arrays (``param.grad = ...``),
so they work on backends whose arrays are immutable (JAX) and inside a compiled step.
"""

from __future__ import annotations

import math
from typing import Any

from ..backend import namespace_of, to_numpy
from ..errors import ConfigError, TrainingError
from ..nn.module import Module, Parameter
from .averaging import replace_gradient


def _gradients(params: Any, caller: str) -> list[Parameter]:
    """The Parameters of ``params`` (a Module, one Parameter, or an iterable) that have a
    gradient, each once."""
    if isinstance(params, Module):
        params = params.parameters()
    elif isinstance(params, Parameter):
        params = [params]
    try:
        items = list(params)
    except TypeError:
        raise ConfigError(f"{caller} takes a model or an iterable of Parameters, got "
                          f"{type(params).__name__}") from None
    seen: set[int] = set()
    out = []
    for i, p in enumerate(items):
        if not isinstance(p, Parameter):
            raise ConfigError(f"{caller} expects Parameters, got {type(p).__name__} at "
                              f"position {i}")
        if p.grad is not None and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _check_limit(caller: str, name: str, value: Any) -> float:
    ok = (isinstance(value, int | float) and not isinstance(value, bool)
          and math.isfinite(value) and value > 0)
    if not ok:
        raise ConfigError(f"{caller}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _norm_type(value: Any) -> float:
    if isinstance(value, str) and value.lower() == "inf":
        return math.inf
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    if not ok:
        raise ConfigError(f"clip_grad_norm_: norm_type must be a number > 0 or inf, got "
                          f"{value!r}")
    return float(value)


def _norm(xp: Any, g: Any, p: float) -> Any:
    """The ``p``-norm of every element of ``g`` (a 0-d array)."""
    if p == math.inf:
        return xp.max(xp.abs(g))
    if p == 2.0:
        return xp.sqrt(xp.sum(g * g))
    if p == 1.0:
        return xp.sum(xp.abs(g))
    return xp.sum(xp.abs(g) ** p) ** (1.0 / p)


def grad_norm(params: Any, norm_type: float | str = 2.0) -> Any:
    """The ``norm_type``-norm of all the gradients of ``params`` together (as if concatenated
    into one vector): a 0-d array on their device, or ``0.0`` when none has a gradient."""
    grads = [p.grad for p in _gradients(params, "grad_norm")]
    p = _norm_type(norm_type)
    if not grads:
        return 0.0
    xp = namespace_of(*grads)
    dtype = xp.result_type(*(g.dtype for g in grads))
    norms = xp.stack([xp.astype(_norm(xp, g, p), dtype) for g in grads])
    return _norm(xp, norms, p)


def clip_grad_norm_(params: Any, max_norm: float, norm_type: float | str = 2.0, *,
                    error_if_nonfinite: bool = False) -> Any:
    """Scale the gradients of ``params`` so that their total norm is at most ``max_norm``.

    As PyTorch: the total norm ``n`` is that of all gradients together (:func:`grad_norm`),
    and every gradient is multiplied by ``min(max_norm / (n + 1e-6), 1)``.

    Args:
        params: a model, or an iterable of Parameters (those without a gradient are skipped).
        max_norm: the largest total norm (> 0).
        norm_type: the norm's order (``2.0``; ``inf`` or ``"inf"`` for the largest
            absolute value).
        error_if_nonfinite: raise :class:`~anycnn.errors.TrainingError` when the total norm
            is NaN or infinite (reads it back to the host: a GPU waits).

    Returns:
        The total norm before clipping (a 0-d array on the gradients' device; ``0.0`` when no
        parameter has a gradient).

    Raises:
        ConfigError: a bad ``max_norm`` or ``norm_type``, or something that is not a
            Parameter.
    """
    max_norm = _check_limit("clip_grad_norm_", "max_norm", max_norm)
    params = _gradients(params, "clip_grad_norm_")
    total = grad_norm(params, norm_type)
    if not params:
        return total
    if error_if_nonfinite and not math.isfinite(float(to_numpy(total))):
        raise TrainingError(f"clip_grad_norm_: the total norm of the gradients is "
                            f"{float(to_numpy(total))}; the update is not applied")
    xp = namespace_of(total)
    coef = xp.clip(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        replace_gradient(p, p.grad * xp.astype(coef, p.grad.dtype))
    return total


def clip_grad_value_(params: Any, clip_value: float) -> None:
    """Clip every gradient element of ``params`` to ``[-clip_value, clip_value]``.

    Args:
        params: a model, or an iterable of Parameters (those without a gradient are skipped).
        clip_value: the largest absolute value (> 0).

    Raises:
        ConfigError: a bad ``clip_value``, or something that is not a Parameter.
    """
    clip_value = _check_limit("clip_grad_value_", "clip_value", clip_value)
    for p in _gradients(params, "clip_grad_value_"):
        xp = namespace_of(p.grad)
        replace_gradient(p, xp.clip(p.grad, -clip_value, clip_value))
