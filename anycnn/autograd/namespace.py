"""The Array API namespace of a :class:`~anycnn.autograd.variable.Variable`: the backend's
own namespace, with every function that takes or makes arrays recorded.

``anycnn.namespace_of(v)`` (or ``v.__array_namespace__()``) returns it, so forward code written
against the Array API is differentiated without a change:

- the functions of :mod:`anycnn.autograd.ops` (``mean sum max min exp log sqrt tanh abs
  maximum minimum where reshape permute_dims concat stack matmul expand_dims squeeze flip``,
  ``clip astype broadcast_to matrix_transpose square sin cos log1p expm1 negative``) record
  their vector-Jacobian product;
- ``var``, ``std`` and ``vecdot`` are composed of those;
- every other function runs on the plain arrays and returns constants: creation functions
  (``zeros``, ``ones_like``, ``arange``...), comparisons and logical functions, ``argmax``,
  ``sign``, ``floor``..., dtype queries. One that would need a gradient (a Variable that
  requires one among its arguments, and a floating result) and has none here raises a
  ``TypeError`` naming it, instead of silently cutting the graph.
"""

from __future__ import annotations

import functools
from typing import Any

from . import ops
from .mode import STATE
from .variable import TraceEntry, as_variable, needs_grad, unwrap_tree

_DIFFERENTIABLE = {
    name: getattr(ops, name) for name in (
        "add", "subtract", "multiply", "divide", "pow", "maximum", "minimum", "where",
        "negative", "abs", "clip", "astype", "matmul", "sum", "mean", "max", "min", "reshape",
        "permute_dims", "matrix_transpose", "expand_dims", "squeeze", "broadcast_to", "flip",
        "concat", "stack", "take")
}
_DIFFERENTIABLE.update({name: functools.partial(ops.unary, name) for name in ops._UNARY})

#: functions whose result has no gradient by nature (masks, indices, rounding, shapes of
#: other arrays): they take Variables that require gradients without complaint
_NO_GRADIENT = frozenset({
    "argmax", "argmin", "argsort", "sign", "floor", "ceil", "round", "trunc", "isnan",
    "isinf", "isfinite", "equal", "not_equal", "less", "less_equal", "greater",
    "greater_equal", "logical_and", "logical_or", "logical_not", "logical_xor", "all", "any",
    "nonzero", "count_nonzero", "zeros_like", "ones_like", "empty_like", "full_like",
    "searchsorted", "unique_values", "unique_counts", "unique_inverse", "unique_all",
    "isdtype", "result_type", "can_cast", "finfo", "iinfo", "signbit",
})


def _var(xp: Any, x: Any, axis: Any = None, correction: float = 0.0,
         keepdims: bool = False) -> Any:
    d = x - xp.mean(x, axis=axis, keepdims=True)
    count = ops.math.prod(x.shape[i] for i in ops._axes(axis, x.ndim))
    return xp.sum(d * d, axis=axis, keepdims=keepdims) / (count - correction)


def _std(xp: Any, x: Any, axis: Any = None, correction: float = 0.0,
         keepdims: bool = False) -> Any:
    return xp.sqrt(_var(xp, x, axis, correction, keepdims))


def _vecdot(xp: Any, a: Any, b: Any, axis: int = -1) -> Any:
    return xp.sum(a * b, axis=axis)


_COMPOSED = {"var": _var, "std": _std, "vecdot": _vecdot}


class RecordingNamespace:
    """The recording counterpart of one backend namespace (one instance per backend, so that
    ``array_api_compat.array_namespace`` sees a single namespace for many Variables)."""

    def __init__(self, xp: Any) -> None:
        self._xp = xp

    def __repr__(self) -> str:
        return f"<recording namespace of {getattr(self._xp, '__name__', self._xp)}>"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            return getattr(self._xp, name)
        if name in _DIFFERENTIABLE:
            fn = _DIFFERENTIABLE[name]
        elif name in _COMPOSED:
            fn = functools.partial(_COMPOSED[name], self)
        else:
            target = getattr(self._xp, name)
            if not callable(target) or isinstance(target, type):
                fn = target  # dtypes, constants (pi, inf, newaxis), classes
            else:
                fn = _constant_function(name, target, name in _NO_GRADIENT)
        setattr(self, name, fn)  # looked up once
        return fn


def _constant_function(name: str, target: Any, no_gradient: bool) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        if not no_gradient and any(needs_grad(a) for a in _flat(args, kwargs)):
            raise TypeError(
                f"xp.{name} has no gradient in anycnn's recorder; write it with the "
                "differentiable functions (see anycnn.autograd.namespace), detach its input "
                "(v.detach()) if no gradient should flow, or give the Module a backward")
        out = _wrapped(target(*(unwrap_tree(a) for a in args),
                              **{k: unwrap_tree(v) for k, v in kwargs.items()}))
        if STATE.trace is not None:
            STATE.trace.append(TraceEntry(name, args, out if isinstance(out, tuple) else (out,),
                                          dict(kwargs)))
        return out

    call.__name__ = name
    return call


def _flat(args: tuple, kwargs: dict) -> list[Any]:
    flat: list[Any] = []
    for a in (*args, *kwargs.values()):
        flat.extend(a if isinstance(a, list | tuple) else (a,))
    return flat


def _wrapped(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_wrapped(v) for v in value)
    return as_variable(value)


@functools.cache
def recording_namespace(xp: Any) -> RecordingNamespace:
    """The :class:`RecordingNamespace` of the backend namespace ``xp`` (one per ``xp``)."""
    return RecordingNamespace(xp)
