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

**Eval-mode inference** (gradients off, :func:`anycnn.no_grad`: what ``predict`` and
``evaluate`` run): a ``Conv2D`` call is deferred too, so that ``bn(conv(x))`` runs as one
convolution with the BatchNorm folded in (:func:`anycnn.nn.inference.folded`), and the ReLU
and residual sum after it join that convolution's pass: a code-written ResNet block
``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut)`` is two kernels, as the ``Sequential``
preset's. A convolution output read by anything else is computed on its own.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import device

from ..autograd.mode import STATE, unrecorded
from ..autograd.variable import Deferred, Variable, unwrap
from ..backend import namespace_of
from .calls import record_module_call
from .functional.primitives import relu_grad
from .inference import foldable, folded, folding_off
from .layers import BatchNorm2D, Conv2D, ReLU
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


class _ConvPlan:
    """An eval-mode convolution not run yet (gradients off): ``conv`` (the layer, or the
    folded stand-in once a BatchNorm took it in), its input ``x`` and the ``addend`` taken in
    so far."""

    __slots__ = ("addend", "conv", "like", "x")

    def __init__(self, conv: Conv2D, x: Variable, like: Any, addend: Any = None) -> None:
        self.conv, self.x, self.like, self.addend = conv, x, like, addend

    def run(self, relu: bool) -> Variable:
        """The convolution (+ ``addend``), then ReLU when ``relu``, in one pass."""
        s = self.addend
        with unrecorded():
            raw = unwrap(self.x)
            if s is None:
                y = self.conv.forward(raw, relu=relu)
            else:
                y = self.conv.forward_add(raw, unwrap(s), relu=relu)
        inputs = (self.x,) if s is None else (self.x, s)
        return record_module_call(self.conv, inputs, (y,), None)[0]

    def absorb_add(self, d: Deferred, other: Any) -> Deferred | None:
        """``d + other``: a deferred sum the convolution starts from (see :class:`_Plan`)."""
        if (self.addend is not None or not hasattr(other, "shape")
                or tuple(other.shape) != d.shape or _pending(other) is not None):
            return None
        d.absorbed = True
        return _deferred_conv(_ConvPlan(self.conv, self.x, self.like, other))


def _deferred_conv(plan: _ConvPlan) -> Deferred:
    """A Deferred output of ``plan`` (its shape and dtype from ``plan.like``)."""
    d = Deferred(lambda: plan.run(relu=False), plan.like, plan)
    STATE.recording.deferred.append(d)
    return d


def defer_conv(conv: Conv2D, x: Any) -> Deferred | None:
    """``conv(x)`` inside a recording with gradients off in eval mode, deferred (so that a
    BatchNorm2D can fold into it); None elsewhere."""
    if (STATE.grad or conv.training or type(conv) is not Conv2D or fusion_suspended()
            or folding_off() or STATE.trace is not None or not isinstance(x, Variable)):
        return None
    raw = unwrap(x)
    with unrecorded():
        conv.check_input(raw)  # a wrong input is refused here, not where it is computed
    xp = namespace_of(raw)
    out = (raw.shape[0], *conv.output_hw(tuple(raw.shape[1:3])), conv.out_channels)
    like = xp.broadcast_to(xp.zeros((), dtype=raw.dtype, device=device(raw)), out)
    return _deferred_conv(_ConvPlan(conv, x, like))


def _pending_conv(value: Any) -> Deferred | None:
    if isinstance(value, Deferred) and value.pending and isinstance(value.plan, _ConvPlan):
        return value
    return None


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
    conv = _pending_conv(x)
    if (conv is not None and conv.plan.addend is None and type(conv.plan.conv) is Conv2D
            and foldable(conv.plan.conv, bn)):  # eval mode: one folded convolution
        conv.absorbed = True
        plan = conv.plan
        return _deferred_conv(_ConvPlan(folded(plan.conv, bn), plan.x, plan.like))
    rec = STATE.recording
    for d in rec.deferred:  # an earlier call of this BatchNorm goes first
        if d.pending and not d.absorbed and isinstance(d.plan, _Plan) and d.plan.call.bn is bn:
            d.data  # noqa: B018 - computes it
    raw = unwrap(x)
    with unrecorded():  # its parameters as plain arrays
        bn.check_input(raw)  # a wrong input is refused here, not where it is computed
    return _deferred(_Plan(_NormCall(bn, x)), raw)


def relu_of_norm(relu: ReLU, x: Any) -> Variable | None:
    """``relu(x)`` for a pending BatchNorm output (or deferred sum): the ReLU inside its pass;
    else None."""
    d = _pending(x)
    if d is None:
        d = _pending_conv(x)
    if d is None or type(relu) is not ReLU:
        return None
    d.absorbed = True
    return d.plan.run(relu=True)


#: layer type -> its fused recording, for :func:`anycnn.nn.calls.recorded_call`
FUSIONS = {BatchNorm2D: defer_norm, ReLU: relu_of_norm, Conv2D: defer_conv}
