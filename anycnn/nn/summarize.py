"""Model summaries: each layer's output shape, parameter count and forward FLOPs, with totals.

:func:`summary` runs one forward pass on zeros of batch 1 (in eval mode, unfused) with every
submodule's ``forward`` temporarily wrapped on the instance to record the shapes it sees; the
model is then put back exactly as it was (:func:`anycnn.nn.modes.preserved_state`), also when the
pass raises. Rows follow :meth:`Module.named_children` depth first, so they work through any
nesting of containers. FLOPs come from each module's :meth:`Module.flops` (2 per multiply-add
of convolutions and dense layers; elementwise work counts 0), summed over a container's tree.

Containers that run some of their layers through a fused executor should build it with
:func:`anycnn.nn.fusion.execution_plan`,
which the pass turns off (:func:`anycnn.nn.modes.suspended`),
so that each layer's own ``forward`` runs and is seen; a module whose ``forward`` the pass does
not call gets a row without output shape (``-``) and no FLOPs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from array_api_compat import device

from ..backend import get_backend, namespace_of
from ..errors import ConfigError
from .modes import eval_mode, preserved_state, suspended

#: a :class:`~anycnn.nn.module.Module` (typed loosely: :meth:`Module.summary` imports this
#: module, never the other way round)
Module = Any

#: one recorded call: (input shape, output shape), both with the batch axis
Call = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class SummaryRow:
    """One module of the tree.

    ``output_shape`` has ``None`` for the batch axis (``None`` as a whole when the module did
    not run in the pass); ``params`` and ``flops`` (forward, per image) include the module's
    children.
    """

    name: str
    type: str
    depth: int
    output_shape: tuple[int | None, ...] | None
    params: int
    flops: int


@dataclass(frozen=True)
class Summary:
    """The result of :func:`summary`; ``str()`` is the table.

    Totals: ``trainable_params`` (elements of parameters that require gradients),
    ``non_trainable_params`` (buffer elements such as BatchNorm running statistics, and frozen
    parameters), ``total_params`` (both), ``param_bytes``
    (their storage), ``flops`` (forward FLOPs per image) and ``activation_bytes`` (the outputs
    of the layers without children, for one image).
    """

    model_type: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int | None, ...]
    rows: tuple[SummaryRow, ...]
    trainable_params: int
    non_trainable_params: int
    param_bytes: int
    flops: int
    activation_bytes: int

    @property
    def total_params(self) -> int:
        return self.trainable_params + self.non_trainable_params

    def __str__(self) -> str:
        header = ("Layer (type)", "Output shape", "Params", "FLOPs")
        cells = [("  " * r.depth + (f"{r.name} ({r.type})" if r.name else r.type),
                  _shape_text(r.output_shape), f"{r.params:,}", f"{r.flops:,}")
                 for r in self.rows]
        widths = [max(len(row[i]) for row in [header, *cells]) for i in range(4)]

        def line(row: tuple[str, ...]) -> str:
            return "  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]),
                              *(c.rjust(w) for c, w in zip(row[2:], widths[2:]))]).rstrip()

        rule = "-" * len(line(header))
        return "\n".join([
            f"{self.model_type} on input {_shape_text((None, *self.input_shape))}",
            rule, line(header), rule, *map(line, cells), rule,
            f"Total params: {self.total_params:,} ({_size_text(self.param_bytes)})",
            f"Trainable params: {self.trainable_params:,}",
            f"Non-trainable params: {self.non_trainable_params:,}",
            f"Forward FLOPs per image: {self.flops:,} ({_flops_text(self.flops)})",
            f"Activations per image: {_size_text(self.activation_bytes)}"])


def summary(model: Module, input_shape: tuple[int, ...]) -> Summary:
    """Summarise ``model`` for per-image ``input_shape`` (no batch axis, e.g. ``(28, 28, 1)``).

    The pass runs on the backend, device and floating dtype of the model's parameters (the
    current backend and float32 for a model without any).

    Raises:
        ConfigError: ``input_shape`` is not a sequence of positive integers.
        ShapeError: the model refuses that input (as its forward does).
    """
    shape = _input_shape(input_shape)
    y, trace = _trace(model, shape)
    calls: dict[int, list[Call]] = {}
    for m, call in trace:
        calls.setdefault(id(m), []).append(call)
    named = list(_named_modules(model))
    rows = tuple(SummaryRow(
        name=name, type=type(m).__name__, depth=depth,
        output_shape=(None, *calls[id(m)][0][1][1:]) if id(m) in calls else None,
        params=_count(p.shape for p in _unique_params(m)),
        flops=_tree_flops(m, calls)) for name, depth, m in named)
    buffers = [b for _, b in model.named_buffers()]
    arrays = [*(p.data for p in _unique_params(model)), *buffers]
    return Summary(
        model_type=type(model).__name__, input_shape=shape,
        output_shape=(None, *tuple(y.shape)[1:]), rows=rows,
        trainable_params=_count(p.shape for p in _unique_params(model) if p.requires_grad),
        non_trainable_params=_count(tuple(b.shape) for b in buffers)
        + _count(p.shape for p in _unique_params(model) if not p.requires_grad),
        param_bytes=sum(math.prod(a.shape) * _itemsize(a) for a in arrays),
        flops=_tree_flops(model, calls),
        activation_bytes=sum(math.prod(out[1:]) * _itemsize(y) for m, (_, out) in trace
                             if not any(True for _ in m.named_children())))


def call_flops(model: Module, input_shape: tuple[int, ...]) -> list[int]:
    """Forward FLOPs per image of each module call of one pass (each module's own work, see
    :meth:`Module.flops`), in the order the calls returned: children before their container,
    layers in execution order. Their sum is :attr:`Summary.flops`."""
    _, trace = _trace(model, _input_shape(input_shape))
    return [m.flops(*call) for m, call in trace]


# --------------------------------------------------------------------------------------------
# The recording pass


def _trace(model: Module, shape: tuple[int, ...]) -> tuple[Any, list[tuple[Module, Call]]]:
    """One forward pass on zeros of batch 1 (eval mode, unfused) with every submodule's
    ``forward`` wrapped: the output and ``(module, (input shape, output shape))`` of each call in
    the order the calls returned. The model is restored afterwards, also on error."""
    trace: list[tuple[Module, Call]] = []
    with preserved_state(model), eval_mode(model), suspended():
        for m in _unique_modules(model):
            m.forward = _recording(m, m.forward, trace)
        y = model.forward(_zeros(model, (1, *shape)))
    return y, trace


def _recording(module: Module, forward: Callable[..., Any],
               trace: list[tuple[Module, Call]]) -> Callable[..., Any]:
    """``forward`` that also appends ``(module, (input shape, output shape))`` to ``trace``
    when a call returns."""

    def wrapper(x: Any, *args: Any, **kwargs: Any) -> Any:
        y = forward(x, *args, **kwargs)
        if hasattr(x, "shape") and hasattr(y, "shape"):  # else: not an array, not a row
            trace.append((module, (tuple(x.shape), tuple(y.shape))))
        return y

    return wrapper


def _zeros(model: Module, shape: tuple[int, ...]) -> Any:
    """Zeros of ``shape`` where the model's first floating parameter lives, in its dtype."""
    for p in model.parameters():
        xp = namespace_of(p.data)
        if xp.isdtype(p.data.dtype, "real floating"):
            return xp.zeros(shape, dtype=p.data.dtype, device=device(p.data))
    backend = get_backend()
    return backend.xp.zeros(shape, dtype=backend.xp.float32, device=backend.device)


def _input_shape(input_shape: Any) -> tuple[int, ...]:
    try:
        shape = tuple(int(n) for n in input_shape)
        valid = len(shape) > 0 and all(n >= 1 and n == m for n, m in zip(shape, input_shape))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ConfigError(f"input_shape must be positive integers per image without the batch "
                          f"axis, e.g. (28, 28, 1); got {input_shape!r}")
    return shape


# --------------------------------------------------------------------------------------------
# Walking the tree


def _named_modules(model: Module) -> Iterator[tuple[str, int, Module]]:
    """``(dotted name, depth, module)`` depth first; the model itself only when it is a leaf."""

    def walk(module: Module, prefix: str, depth: int) -> Iterator[tuple[str, int, Module]]:
        for name, child in module.named_children():
            yield prefix + name, depth, child
            yield from walk(child, f"{prefix}{name}.", depth + 1)

    rows = list(walk(model, "", 0))
    yield from rows or [("", 0, model)]


def _unique_modules(model: Module) -> list[Module]:
    return list({id(m): m for m in model.modules()}.values())


def _unique_params(module: Module) -> list[Any]:
    return list({id(p): p for p in module.parameters()}.values())


def _tree_flops(module: Module, calls: dict[int, list[Call]]) -> int:
    """Forward FLOPs of every call of ``module`` and its descendants (shared ones once)."""
    return sum(m.flops(*call) for m in _unique_modules(module) for call in calls.get(id(m), ()))


def _count(shapes: Any) -> int:
    return sum(math.prod(shape) for shape in shapes)


def _itemsize(array: Any) -> int:
    xp = namespace_of(array)
    return xp.finfo(array.dtype).bits // 8 if xp.isdtype(array.dtype, "real floating") else (
        xp.iinfo(array.dtype).bits // 8 if xp.isdtype(array.dtype, "integral") else 1)


# --------------------------------------------------------------------------------------------
# Text


def _shape_text(shape: tuple[int | None, ...] | None) -> str:
    return "-" if shape is None else "(" + ", ".join(map(str, shape)) + ")"


def _size_text(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _flops_text(flops: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops}"
