"""Fusions in recorded graphs: a BatchNorm's output is computed when first needed, so that the
operations written after it in a forward-only module can join its normalising pass.

``relu(bn(x))``, ``bn(x) + s`` and ``relu(bn(x) + s)`` (a ResNet block's end) are what the
``Sequential`` fusions (:mod:`anycnn.nn.fusion`) run as one pass for the built-in containers;
written as code, the BatchNorm2D call returns a :class:`~anycnn.autograd.variable.Deferred`
instead of its output, ``+`` with a same-shaped array gives another one (the sum to be added
inside the pass), and a ReLU module called on one runs the whole chain as one BatchNorm pass
(``forward(x, relu=True)`` or ``forward_add(x, s, relu)``), with one node in the graph whose
backward is BatchNorm's own. Values and gradients are those of the unfused chain.

Anything else that reads a deferred output computes it on its own. One that was taken into a
fused pass and is read again later (``h = bn(x); y = relu(h); z = h * 2``) is computed once more
with the running statistics put back afterwards: each call moves them once, as without the
fusion. A deferred output nobody read is computed when the recording ends, so the statistics
always move; another call of the same BatchNorm computes the pending one first (their order of
updates is kept). Nothing is deferred while tracing (ONNX export) or inside
:func:`~anycnn.nn.modes.suspended`.
"""

from __future__ import annotations

from typing import Any

from ..autograd.mode import STATE, unrecorded
from ..autograd.variable import Deferred, Variable, unwrap
from .calls import record_module_call
from .functional.primitives import relu_grad
from .layers import BatchNorm2D, ReLU
from .modes import fusion_suspended


class _NormCall:
    """One BatchNorm2D call on ``x`` whose pass has not run; ``moved``: whether a pass of it
    has updated the running statistics already."""

    __slots__ = ("bn", "moved", "x")

    def __init__(self, bn: BatchNorm2D, x: Variable) -> None:
        self.bn, self.x, self.moved = bn, x, False


class _Plan:
    """What a deferred output would compute: the call, and the addend taken in so far."""

    __slots__ = ("addend", "call")

    def __init__(self, call: _NormCall, addend: Any = None) -> None:
        self.call, self.addend = call, addend

    def run(self, relu: bool) -> Variable:
        """The pass, recorded: ``bn(x)`` (+ ``addend``), then ReLU when ``relu``."""
        call, s = self.call, self.addend
        bn, x = call.bn, call.x
        saved = (bn.running_mean, bn.running_var) if call.moved else None
        raw_x = unwrap(x)
        with unrecorded():
            if s is None:
                y = type(bn).forward(bn, raw_x, relu=relu)
            else:
                y = bn.forward_add(raw_x, unwrap(s), relu=relu)
        if saved is not None:
            bn.running_mean, bn.running_var = saved
        call.moved = True
        masked_after = relu and s is not None  # BatchNorm masks its own ReLU without addend

        def backward_of(g: Any, needs: tuple[bool, ...], addend: Any) -> tuple[Any, ...]:
            if masked_after:
                g = relu_grad(y, g)
            dx = bn.backward(g, input_grad=needs[0])
            return (dx,) if s is None else (dx, g)

        return record_module_call(bn, (x,) if s is None else (x, s), (y,), backward_of)[0]

    def absorb_add(self, d: Deferred, other: Any) -> Deferred | None:
        """``d + other`` (``d`` this plan's pending output, without an addend yet, ``other``
        an array of the same shape): a deferred sum, added inside the BatchNorm pass; None
        where that does not apply (the caller adds as usual)."""
        if (self.addend is not None or not hasattr(other, "shape")
                or tuple(other.shape) != d.shape or _pending(other) is not None):
            return None
        d.absorbed = True
        return _deferred(_Plan(self.call, other), unwrap(other))


def _pending(value: Any) -> Deferred | None:
    if isinstance(value, Deferred) and value.pending and isinstance(value.plan, _Plan):
        return value
    return None


def _deferred(plan: _Plan, like: Any) -> Deferred:
    d = Deferred(lambda: plan.run(relu=False), like, plan)
    STATE.recording.deferred.append(d)
    return d


def defer_norm(bn: BatchNorm2D, x: Any) -> Deferred | None:
    """``bn(x)`` inside a recording, deferred (None where it is not: see the module doc)."""
    if fusion_suspended() or STATE.trace is not None or not isinstance(x, Variable):
        return None
    rec = STATE.recording
    for d in rec.deferred:  # an earlier call of this BatchNorm goes first
        if d.pending and not d.absorbed and d.plan.call.bn is bn:
            d.data  # noqa: B018 - computes it
    raw = unwrap(x)
    with unrecorded():  # its parameters as plain arrays
        bn.check_input(raw)  # a wrong input is refused here, not where it is computed
    return _deferred(_Plan(_NormCall(bn, x)), raw)


def relu_of_norm(relu: ReLU, x: Any) -> Variable | None:
    """``relu(x)`` for a pending BatchNorm output (or deferred sum): the ReLU inside its pass;
    else None."""
    d = _pending(x)
    if d is None or type(relu) is not ReLU:
        return None
    d.absorbed = True
    return d.plan.run(relu=True)


#: layer type -> its fused recording, for :func:`anycnn.nn.calls.recorded_call`
FUSIONS = {BatchNorm2D: defer_norm, ReLU: relu_of_norm}
