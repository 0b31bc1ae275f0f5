"""The differentiable operations of the recorder, each with its vector-Jacobian product.

Every function takes Variables, backend arrays or Python scalars, computes its value with the
backend's own Array API namespace and records a node (:func:`~.variable.record`). Gradients
of broadcast operands are summed back to the operand's shape (:func:`unbroadcast`). These are
what :class:`~.variable.Variable`'s operators and the recording namespace
(:mod:`anycnn.autograd.namespace`) call. A node's vector-Jacobian product keeps only the
arrays it reads (an addition keeps none; a reshape keeps shapes, not its input), so arrays
nobody else holds are freed as the forward goes on.

Conventions at ties, as PyTorch's: ``maximum``/``minimum`` split the gradient equally between
equal operands, ``max``/``min`` reductions share it among the tied maxima, ``abs`` has gradient
0 at 0, ``clip`` passes the gradient where ``min <= x <= max``.
"""

from __future__ import annotations

import math
import operator
from typing import Any

from .variable import Deferred, Variable, add_arrays, record, unwrap


def _xp(*args: Any) -> Any:
    for a in args:
        if isinstance(a, Variable):
            return a.xp
    raise TypeError("no Variable among the arguments")  # pragma: no cover - callers ensure


def _shape(a: Any) -> tuple[int, ...] | None:
    """The shape of an array operand; None for a Python scalar (it gets no gradient)."""
    return tuple(a.shape) if hasattr(a, "shape") else None


def unbroadcast(xp: Any, g: Any, shape: tuple[int, ...] | None) -> Any:
    """``g`` summed over the axes broadcasting added to an operand of ``shape``."""
    if shape is None or tuple(g.shape) == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape)
                                      if n == 1 and g.shape[lead + i] != 1)
    if axes:
        g = xp.sum(g, axis=axes, keepdims=True)
    return xp.reshape(g, shape)


# --------------------------------------------------------------------------------------------
# Elementwise arithmetic


def parameter_value(a: Any) -> Any:
    """A :class:`~anycnn.nn.module.Parameter` operand as its value (its recorded leaf inside a
    forward); anything else as it is."""
    return a.data if getattr(type(a), "__anycnn_parameter__", False) else a


def _binary(a: Any, b: Any, fn: Any, grads: Any, name: str,
            keeps: tuple[str, ...] = ()) -> Variable:
    """``fn(A, B)`` with ``grads(g, A, B, out, needs) -> (dA, dB)`` before unbroadcasting;
    ``keeps`` names what ``grads`` reads (``"A"``, ``"B"``, ``"out"``): the rest is None."""
    a, b = parameter_value(a), parameter_value(b)
    xp = _xp(a, b)
    A, B = unwrap(a), unwrap(b)
    out = fn(A, B)
    sa, sb = _shape(A), _shape(B)
    kept = tuple(v if k in keeps else None for k, v in (("A", A), ("B", B), ("out", out)))

    def vjp(g: Any, needs: tuple[bool, ...]) -> tuple[Any, Any]:
        da, db = grads(g, *kept, needs)
        return (unbroadcast(xp, da, sa) if needs[0] else None,
                unbroadcast(xp, db, sb) if needs[1] else None)

    return record(out, (a, b), vjp, name)


def add(a: Any, b: Any) -> Variable:
    for d, other in ((a, b), (b, a)):  # a pending output whose pass can add ``other`` itself
        if isinstance(d, Deferred) and d.pending and d.plan is not None:
            fused = d.plan.absorb_add(d, other)
            if fused is not None:
                return fused
    return _binary(a, b, add_arrays, lambda g, A, B, out, n: (g, g), "add")


def subtract(a: Any, b: Any) -> Variable:
    return _binary(a, b, operator.sub, lambda g, A, B, out, n: (g, -g if n[1] else None),
                   "subtract")


def multiply(a: Any, b: Any) -> Variable:
    return _binary(a, b, operator.mul,
                   lambda g, A, B, out, n: (g * B if n[0] else None, g * A if n[1] else None),
                   "multiply", ("A", "B"))


def divide(a: Any, b: Any) -> Variable:
    return _binary(a, b, operator.truediv,
                   lambda g, A, B, out, n: (g / B if n[0] else None,
                                            -g * out / B if n[1] else None), "divide",
                   ("B", "out"))


def pow(a: Any, b: Any) -> Variable:
    xp = _xp(a, b)

    def grads(g, A, B, out, n):
        da = db = None
        if n[0]:
            da = g * (2 * A) if isinstance(B, int | float) and B == 2 else g * B * A ** (B - 1)
        if n[1]:
            db = g * out * xp.log(A)
        return da, db

    return _binary(a, b, operator.pow, grads, "pow", ("A", "B", "out"))


def maximum(a: Any, b: Any) -> Variable:
    return _extremum(a, b, True)


def minimum(a: Any, b: Any) -> Variable:
    return _extremum(a, b, False)


def _extremum(a: Any, b: Any, larger: bool) -> Variable:
    xp = _xp(a, b)

    def grads(g, A, B, out, n):
        wins = (A > B) if larger else (A < B)
        share = xp.astype(wins, g.dtype) + 0.5 * xp.astype(A == B, g.dtype)
        return (g * share if n[0] else None, g * (1 - share) if n[1] else None)

    fn = xp.maximum if larger else xp.minimum
    return _binary(a, b, lambda A, B: fn(A, _as_array(xp, B, A)), grads,
                   "maximum" if larger else "minimum", ("A", "B"))


def _as_array(xp: Any, value: Any, like: Any) -> Any:
    """A Python scalar as a 0-d array of ``like``'s dtype (for functions that need arrays)."""
    if hasattr(value, "shape"):
        return value
    return xp.asarray(value, dtype=like.dtype, device=_device(like))


def _device(a: Any) -> Any:
    from array_api_compat import device

    return device(a)


def where(condition: Any, a: Any, b: Any) -> Variable:
    xp = _xp(a, b)
    C, A, B = unwrap(condition), unwrap(a), unwrap(b)
    ref = A if hasattr(A, "shape") else B
    A, B = _as_array(xp, A, ref), _as_array(xp, B, ref)
    out = xp.where(C, A, B)
    sa, sb = _shape(unwrap(a)), _shape(unwrap(b))

    def vjp(g, needs):
        zero = xp.zeros_like(g)
        return (None, unbroadcast(xp, xp.where(C, g, zero), sa) if needs[1] else None,
                unbroadcast(xp, xp.where(C, zero, g), sb) if needs[2] else None)

    return record(out, (condition, a, b), vjp, "where")


# --------------------------------------------------------------------------------------------
# Unary functions: the derivative from the input ``A`` or the output ``out``

_UNARY = {  # name: (forward, derivative, what the derivative reads)
    "negative": (lambda xp, A: -A, lambda xp, g, A, out: -g, ()),
    "exp": (lambda xp, A: xp.exp(A), lambda xp, g, A, out: g * out, ("out",)),
    "expm1": (lambda xp, A: xp.expm1(A), lambda xp, g, A, out: g * (out + 1), ("out",)),
    "log": (lambda xp, A: xp.log(A), lambda xp, g, A, out: g / A, ("A",)),
    "log1p": (lambda xp, A: xp.log1p(A), lambda xp, g, A, out: g / (A + 1), ("A",)),
    "sqrt": (lambda xp, A: xp.sqrt(A), lambda xp, g, A, out: g / (2 * out), ("out",)),
    "square": (lambda xp, A: A * A, lambda xp, g, A, out: g * (2 * A), ("A",)),
    "tanh": (lambda xp, A: xp.tanh(A), lambda xp, g, A, out: g * (1 - out * out), ("out",)),
    "sin": (lambda xp, A: xp.sin(A), lambda xp, g, A, out: g * xp.cos(A), ("A",)),
    "cos": (lambda xp, A: xp.cos(A), lambda xp, g, A, out: -g * xp.sin(A), ("A",)),
    "abs": (lambda xp, A: xp.abs(A), lambda xp, g, A, out: g * xp.sign(A), ("A",)),
}


def unary(name: str, a: Variable) -> Variable:
    """The elementwise function ``name`` of :data:`_UNARY`."""
    forward, derivative, keeps = _UNARY[name]
    xp = a.xp
    out = forward(xp, a.data)
    A = a.data if "A" in keeps else None
    kept_out = out if "out" in keeps else None
    return record(out, (a,), lambda g, needs: (derivative(xp, g, A, kept_out),), name)


def negative(a: Variable) -> Variable:
    return unary("negative", a)


def abs(a: Variable) -> Variable:
    return unary("abs", a)


def clip(a: Variable, min: Any = None, max: Any = None) -> Variable:
    xp, A = a.xp, a.data
    lo, hi = unwrap(min), unwrap(max)
    out = xp.clip(A, lo, hi)

    def vjp(g, needs):
        keep = xp.ones_like(g)
        if lo is not None:
            keep = keep * xp.astype(A >= lo, g.dtype)
        if hi is not None:
            keep = keep * xp.astype(A <= hi, g.dtype)
        return (g * keep,)

    return record(out, (a,), vjp, "clip", {"min": lo, "max": hi})


def astype(a: Variable, dtype: Any, copy: bool = True) -> Variable:
    xp, was = a.xp, a.dtype
    out = xp.astype(a.data, dtype)
    if not xp.isdtype(out.dtype, "real floating"):
        return record(out, (a,), lambda g, needs: (None,), "astype", {"dtype": dtype})
    return record(out, (a,), lambda g, needs: (xp.astype(g, was),), "astype",
                  {"dtype": dtype})


# --------------------------------------------------------------------------------------------
# Matrix product


def matmul(a: Any, b: Any) -> Variable:
    a, b = parameter_value(a), parameter_value(b)
    xp = _xp(a, b)
    A, B = unwrap(a), unwrap(b)
    out = xp.matmul(A, B)

    def vjp(g, needs):
        A2 = A if A.ndim > 1 else xp.reshape(A, (1, -1))
        B2 = B if B.ndim > 1 else xp.reshape(B, (-1, 1))
        g2 = xp.reshape(g, xp.matmul(A2, B2).shape) if (A.ndim == 1 or B.ndim == 1) else g
        da = db = None
        if needs[0]:
            da = xp.reshape(unbroadcast(xp, xp.matmul(g2, xp.matrix_transpose(B2)),
                                        tuple(A2.shape)), A.shape)
        if needs[1]:
            db = xp.reshape(unbroadcast(xp, xp.matmul(xp.matrix_transpose(A2), g2),
                                        tuple(B2.shape)), B.shape)
        return da, db

    return record(out, (a, b), vjp, "matmul")


# --------------------------------------------------------------------------------------------
# Reductions


def _axes(axis: Any, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def _kept(g: Any, xp: Any, shape: tuple[int, ...], axes: tuple[int, ...],
          keepdims: bool) -> Any:
    """A reduction's gradient with the reduced axes back as size 1 (ready to broadcast)."""
    if keepdims:
        return g
    return xp.reshape(g, tuple(1 if i in axes else n for i, n in enumerate(shape)))


def sum(a: Variable, axis: Any = None, dtype: Any = None,
        keepdims: bool = False) -> Variable:
    xp, A = a.xp, a.data
    out = xp.sum(A, axis=axis, dtype=dtype, keepdims=keepdims)
    shape, axes, was = tuple(A.shape), _axes(axis, A.ndim), A.dtype
    return record(out, (a,), lambda g, needs: (
        xp.astype(xp.broadcast_to(_kept(g, xp, shape, axes, keepdims), shape), was),),
        "sum", {"axes": axes, "keepdims": keepdims})


def mean(a: Variable, axis: Any = None, keepdims: bool = False) -> Variable:
    xp, A = a.xp, a.data
    out = xp.mean(A, axis=axis, keepdims=keepdims)
    shape, axes = tuple(A.shape), _axes(axis, A.ndim)
    count = math.prod(shape[i] for i in axes)
    return record(out, (a,), lambda g, needs: (
        xp.broadcast_to(_kept(g, xp, shape, axes, keepdims) / count, shape),), "mean",
        {"axes": axes, "keepdims": keepdims})


def max(a: Variable, axis: Any = None, keepdims: bool = False) -> Variable:
    return _reduce_extremum(a, axis, keepdims, True)


def min(a: Variable, axis: Any = None, keepdims: bool = False) -> Variable:
    return _reduce_extremum(a, axis, keepdims, False)


def _reduce_extremum(a: Variable, axis: Any, keepdims: bool, larger: bool) -> Variable:
    xp, A = a.xp, a.data
    fn = xp.max if larger else xp.min
    out = fn(A, axis=axis, keepdims=keepdims)
    shape, axes = tuple(A.shape), _axes(axis, A.ndim)

    def vjp(g, needs):
        hit = xp.astype(A == _kept(out, xp, shape, axes, keepdims), A.dtype)
        ties = xp.sum(hit, axis=axes, keepdims=True)
        return (_kept(g, xp, shape, axes, keepdims) * hit / ties,)

    return record(out, (a,), vjp, "max" if larger else "min",
                  {"axes": axes, "keepdims": keepdims})


# --------------------------------------------------------------------------------------------
# Shapes and layout


def reshape(a: Variable, shape: Any, copy: Any = None) -> Variable:
    xp, was = a.xp, tuple(a.shape)
    out = xp.reshape(a.data, tuple(shape))
    return record(out, (a,), lambda g, needs: (xp.reshape(g, was),), "reshape",
                  {"shape": tuple(shape)})


def permute_dims(a: Variable, axes: Any) -> Variable:
    xp, A = a.xp, a.data
    axes = tuple(int(i) % A.ndim for i in axes)
    inverse = tuple(sorted(range(len(axes)), key=axes.__getitem__))
    out = xp.permute_dims(A, axes)
    return record(out, (a,), lambda g, needs: (xp.permute_dims(g, inverse),), "permute_dims",
                  {"axes": axes})


def matrix_transpose(a: Variable) -> Variable:
    xp = a.xp
    out = xp.matrix_transpose(a.data)
    return record(out, (a,), lambda g, needs: (xp.matrix_transpose(g),), "matrix_transpose")


def expand_dims(a: Variable, axis: int = 0) -> Variable:
    xp, was = a.xp, tuple(a.shape)
    out = xp.expand_dims(a.data, axis=axis)
    return record(out, (a,), lambda g, needs: (xp.reshape(g, was),), "expand_dims",
                  {"axis": axis % out.ndim})


def squeeze(a: Variable, axis: Any) -> Variable:
    xp, was = a.xp, tuple(a.shape)
    out = xp.squeeze(a.data, axis=axis)
    return record(out, (a,), lambda g, needs: (xp.reshape(g, was),), "squeeze",
                  {"axes": _axes(axis, len(was))})


def broadcast_to(a: Variable, shape: Any) -> Variable:
    xp, was = a.xp, tuple(a.shape)
    out = xp.broadcast_to(a.data, tuple(shape))
    return record(out, (a,), lambda g, needs: (unbroadcast(xp, g, was),),
                  "broadcast_to", {"shape": tuple(shape)})


def flip(a: Variable, axis: Any = None) -> Variable:
    xp = a.xp
    out = xp.flip(a.data, axis=axis)
    return record(out, (a,), lambda g, needs: (xp.flip(g, axis=axis),), "flip",
                  {"axes": _axes(axis, out.ndim)})


def concat(arrays: Any, axis: int | None = 0) -> Variable:
    arrays = list(arrays)
    xp = _xp(*arrays)
    raw = [unwrap(a) for a in arrays]
    if axis is None:
        return concat([reshape(a, (-1,)) if isinstance(a, Variable) else xp.reshape(a, (-1,))
                       for a in arrays], 0)
    out = xp.concat(raw, axis=axis)
    ax = axis % out.ndim
    bounds = [0]
    for r in raw:
        bounds.append(bounds[-1] + int(r.shape[ax]))

    def vjp(g, needs):
        lead = (slice(None),) * ax
        return tuple(g[(*lead, slice(lo, hi))] if need else None
                     for lo, hi, need in zip(bounds, bounds[1:], needs))

    return record(out, arrays, vjp, "concat", {"axis": ax})


def stack(arrays: Any, axis: int = 0) -> Variable:
    arrays = list(arrays)
    xp = _xp(*arrays)
    out = xp.stack([unwrap(a) for a in arrays], axis=axis)
    ax = axis % out.ndim

    def vjp(g, needs):
        lead = (slice(None),) * ax
        return tuple(g[(*lead, i)] if need else None for i, need in enumerate(needs))

    return record(out, arrays, vjp, "stack", {"axis": ax})


def take(a: Variable, indices: Any, axis: int | None = None) -> Variable:
    """``take(a, indices, axis)`` (1-D integer ``indices``; repeats allowed): the gradient of
    each input row is the sum over the positions that took it, computed as a product with the
    one-hot matrix of ``indices`` (exact, on every backend, no scatter)."""
    xp, A = a.xp, a.data
    idx = unwrap(indices)
    if axis is None:
        if A.ndim != 1:
            raise TypeError("take without axis needs a 1-D array (the Array API's rule)")
        axis = 0
    axis %= A.ndim
    out = xp.take(A, idx, axis=axis)
    n, dev = int(A.shape[axis]), _device(A)

    def vjp(g, needs):
        onehot = xp.astype(xp.reshape(idx, (-1, 1)) == xp.arange(n, dtype=idx.dtype,
                                                                 device=dev), g.dtype)
        order = (axis, *(i for i in range(g.ndim) if i != axis))
        moved = xp.permute_dims(g, order)
        rest = tuple(moved.shape[1:])
        rows = xp.matmul(xp.matrix_transpose(onehot), xp.reshape(moved, (moved.shape[0], -1)))
        back = sorted(range(len(order)), key=order.__getitem__)
        return (xp.permute_dims(xp.reshape(rows, (n, *rest)), tuple(back)),)

    return record(out, (a,), vjp, "take", {"axis": axis, "indices": idx})


def _integer_index(xp: Any, k: Any, like: Any) -> Any:
    """An integer index given as a list, a tuple or an integer array, as a 1-D array of
    ``like``'s backend; None for anything else (ints, slices, None, masks...)."""
    if isinstance(k, list | tuple):
        return xp.asarray(k, dtype=xp.int64, device=_device(like))
    if hasattr(k, "dtype") and not xp.isdtype(k.dtype, "bool"):
        return k
    return None


def _gather(a: Variable, arrays: list[Any]) -> Variable:
    """``a[i0, i1, ..., :, ...]`` for 1-D integer arrays on the leading axes (NumPy's pointwise
    advanced indexing, e.g. ``z[xp.arange(n), labels]``), through :func:`take` on the leading
    axes flattened."""
    A = a.data
    k = len(arrays)
    lead = tuple(int(n) for n in A.shape[:k])
    flat = arrays[-1]
    stride = 1
    for i in range(k - 2, -1, -1):
        stride *= lead[i + 1]
        flat = flat + arrays[i] * stride
    shaped = reshape(a, (math.prod(lead), *A.shape[k:])) if k > 1 else a
    return take(shaped, flat, axis=0)


def getitem(a: Variable, key: Any) -> Variable:
    """``a[key]`` for keys of ints, slices, ``None``, ``...`` and boolean masks (the gradient
    is scattered back into zeros of ``a``'s shape: ``array_api_extra.at``, so JAX too), and of
    1-D integer arrays or lists on the leading axes, or one such array on any axis with full
    slices around it (through :func:`take`: repeated indices add up)."""
    import array_api_extra as xpx

    xp, A = a.xp, a.data
    parts = key if isinstance(key, tuple) else (key,)
    parts = tuple(unwrap(k) for k in parts)
    ints = [_integer_index(xp, k, A) for k in parts]
    if any(i is not None for i in ints):
        full = [(isinstance(k, slice) and k == slice(None)) or k is Ellipsis for k in parts]
        arrays = [i for i in ints if i is not None]
        if all(i.ndim == 1 for i in arrays):
            n = len(arrays)
            if all(i is not None for i in ints[:n]) and all(full[n:]):
                return _gather(a, arrays)
            if n == 1 and all(f or i is not None for f, i in zip(full, ints)) and not any(
                    k is Ellipsis for k in parts):
                return take(a, arrays[0], axis=next(i for i, k in enumerate(ints)
                                                    if k is not None))
        raise TypeError("indexing a Variable with integer arrays is differentiable for 1-D "
                        "arrays on the leading axes (x[rows, cols]) or one array between full "
                        "slices (x[:, idx]); use xp.take, slices or a boolean mask")
    out = A[parts if isinstance(key, tuple) else parts[0]]
    plain = tuple(k for k in parts if k is not None)  # where the values sit in ``a``
    shape = tuple(A[plain].shape) if len(plain) != len(parts) else tuple(out.shape)
    whole, dtype, dev = tuple(A.shape), A.dtype, _device(A)

    def vjp(g, needs):
        zeros = xp.zeros(whole, dtype=dtype, device=dev)
        return (xpx.at(zeros, plain).set(xp.reshape(g, shape)),)

    return record(out, (a,), vjp, "getitem", {"key": parts})
