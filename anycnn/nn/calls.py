"""Module calls that keep their state per call, and the derived backward of forward-only
modules.

**Per-call state.** A layer keeps what its backward needs on the instance (``_ctx``...), which
is one forward's worth. Whoever runs one instance more than once before the backward passes
keeps each call's state with :func:`capture` and puts it back with :func:`restore` before that
call's backward: a recorded call (:func:`recorded_call`, a node of an autograd graph) always
does; a :class:`~anycnn.nn.sequential.Sequential` holding one layer twice does per step. The
state is every instance attribute but parameters, children, buffers (BatchNorm's running
statistics move on) and the mode, shallow-copied: no array is copied.

**Forward-only modules.** :func:`derive_backward` gives a class that defines ``forward`` and no
``backward`` a recorded forward and a derived backward. Called through the layer interface
(``forward(x)`` from a ``Sequential``, the ``Trainer``, ``check_gradients``) its forward wraps
the inputs as leaf Variables, records its code (:mod:`anycnn.autograd`) and keeps the graph
for ``backward(dy)``; inside another recorded forward it is simply part of that recording; with
gradients off (:func:`anycnn.no_grad`) its code still runs on Variables, so that the fusions of
:mod:`anycnn.nn.deferred` apply, but no graph is built and nothing is kept.
"""

from __future__ import annotations

import functools
from typing import Any

from ..autograd.mode import STATE, recording, unrecorded
from ..autograd.variable import (
    Variable,
    as_variable,
    backward,
    is_array,
    needs_grad,
    record_many,
    unwrap,
    unwrap_tree,
)
from ..backend import namespace_of
from .module import Module, Parameter

_NOT_STATE = frozenset({"training", "eval_pinned"})

State = list[tuple[Module, dict[str, Any]]]


def capture(module: Module) -> State:
    """The per-call state of ``module`` and every module inside it (see the module doc)."""
    saved = []
    for m in module.modules():
        skip = _NOT_STATE.union(m.buffer_names)
        saved.append((m, {k: v for k, v in vars(m).items()
                          if k not in skip and not isinstance(v, Parameter | Module)}))
    return saved


def restore(saved: State) -> None:
    """Put back what :func:`capture` kept."""
    for m, state in saved:
        vars(m).update(state)


def recorded_call(module: Module, inputs: tuple, kwargs: dict, forward: Any = None) -> Any:
    """``module(*inputs)`` as a node of an autograd graph (Variables out).

    A forward-only module's code joins the recording. Any other module runs its own forward on
    the plain arrays (unrecorded, so its parameters are plain arrays too), and
    :func:`record_module_call` makes it a node whose backward is ``module.backward``: built-in
    layers keep their hand-written (fused, compiled) backward, and one instance may be called
    any number of times. ``forward`` is the function to run (default: the module's
    ``forward`` attribute).
    """
    if module.autodiff:
        if STATE.recording is not None:  # inside another recorded forward: join it
            return module.forward(*(as_variable(a) for a in inputs), **kwargs)
        return _outermost_call(module, inputs, kwargs)
    if STATE.recording is not None:
        STATE.recording.called.append(module)
        fuse = _fusions().get(type(module)) if len(inputs) == 1 and not kwargs else None
        fused = fuse(module, inputs[0]) if fuse is not None else None
        if fused is not None:
            return fused
    raw = tuple(unwrap(a) for a in inputs)
    calls = module._calls  # a recorded call keeps its own state: not one backward(dy) needs
    with unrecorded():
        out = (forward or module.forward)(*raw, **kwargs)
    module._calls = calls
    several = isinstance(out, tuple | list)
    outs = tuple(out) if several else (out,)
    fill = outs if several else None  # the closure keeps a single output no longer

    def backward_of(gs: Any, needs: tuple[bool, ...], addend: Any) -> tuple[Any, ...]:
        if addend is not None:  # the input's gradient so far: added inside the backward pass
            return (module.backward_add(gs, addend),)
        if fill is not None:
            gs = tuple(g if g is not None else _zeros_like(o) for g, o in zip(gs, fill))
        wanted = any(needs[:len(inputs)])
        trainable = len(needs) > len(inputs)  # the parameters' marker came last
        dx = module.backward(gs, input_grad=wanted) if wanted or trainable else None
        if len(inputs) == 1:
            return (dx,)
        return tuple(dx) if dx is not None else (None,) * len(inputs)

    results = record_module_call(module, inputs, outs, backward_of)
    if len(inputs) == 1 and not several and results[0].creator is not None:
        results[0].creator.takes_addend = True
    return results if several else results[0]


def record_module_call(module: Module, inputs: tuple, outs: tuple, backward_of: Any
                       ) -> tuple[Variable, ...]:
    """Record a call of ``module`` that computed ``outs`` from ``inputs``: when something
    needs a gradient (an input, or one of its parameters, through :func:`trainable_marker`),
    its per-call state is captured, and the node's vector-Jacobian product restores it,
    releases the copy and runs ``backward_of(output_grads, needs, addend)``. Constants
    otherwise."""
    # the marker only makes a node (and a traced entry's input): none with gradients off
    marker = (None if not STATE.grad and STATE.trace is None else trainable_marker(module))
    vjp = None
    if STATE.grad and (marker is not None or any(needs_grad(a) for a in inputs)):
        state = capture(module)
        state[0][1]["_calls"] = 1  # this call, whatever the instance saw since

        def vjp(gs: Any, needs: tuple[bool, ...], addend: Any = None) -> tuple[Any, ...]:
            restore(state)
            state.clear()  # the instances hold it now, and release it as their backward runs
            return backward_of(gs, needs, addend)

    return record_many(outs, inputs if marker is None else (*inputs, marker), vjp,
                       type(module).__name__, {"module": module})


def _outermost_call(module: Module, inputs: tuple, kwargs: dict) -> Any:
    """``model(x)`` of a forward-only model, outside any recording: the graph of its code,
    with the plain inputs as leaves that want no gradient (``loss.backward()`` computes none
    for them), kept as well for the layer interface's ``model.backward(dy)`` (which asks)."""
    leaves = tuple(Variable(a, True) if is_array(a) and not isinstance(a, Variable) else a
                   for a in inputs)
    out = _keep_graph(module, module.forward, leaves, kwargs)
    for leaf, given in zip(leaves, inputs):
        if leaf is not given:
            leaf.requires_grad = False  # in the graph, but no gradient unless backward asks
    return out


def _keep_graph(module: Module, run: Any, leaves: tuple, kwargs: dict) -> Any:
    """``run(*leaves)`` recorded, its graph kept on ``module`` for ``backward(dy)`` (the last
    call's graph dropped first, so that two are never held at once); returns its output."""
    module._graph = None
    with recording() as rec:
        out = run(*leaves, **kwargs)
    check_reachable(module, rec)
    module._graph = Graph(leaves, out)
    return out


@functools.cache
def _fusions() -> dict[type, Any]:
    """Layer type -> its fused recording (:mod:`anycnn.nn.deferred`), which returns None
    where it does not apply (imported at the first recorded call: it imports the layers)."""
    from . import deferred

    return deferred.FUSIONS


def trainable_marker(module: Module) -> Variable | None:
    """The input that stands for ``module``'s parameters in its recorded call (so the node
    runs its backward when only they need gradients); None when all are frozen."""
    return _TRAINABLE if any(p.requires_grad for p in module.parameters()) else None


#: stands for "the module's own parameters" among a recorded call's inputs, so the node
#: records (and runs its backward) when only parameters need gradients
_TRAINABLE = Variable.__new__(Variable)
_TRAINABLE.data = None
_TRAINABLE._start(None, True)


def _zeros_like(out: Any) -> Any:
    return namespace_of(out).zeros_like(out)


def guard_forward(cls: type[Module]) -> None:
    """Make ``cls.forward`` (a module with its own backward) a recorded call when it meets a
    Variable or runs inside a recording: ``self.conv.forward(x)`` in a forward-only module
    then means ``self.conv(x)``. Elsewhere the forward runs as written."""
    layer_forward = cls.__dict__["forward"]

    @functools.wraps(layer_forward)
    def forward(self: Module, *args: Any, **kwargs: Any) -> Any:
        recorded = STATE.recording is not None
        if not recorded:  # a loop, not any() over a generator: every layer call passes here
            for a in args:
                if isinstance(a, Variable):
                    recorded = True
                    break
        if recorded:
            return recorded_call(self, args, kwargs,
                                 functools.partial(layer_forward, self))
        return layer_forward(self, *args, **kwargs)

    cls.forward = forward


# --------------------------------------------------------------------------------------------
# Forward-only modules


class Graph:
    """What a forward-only module's recorded forward keeps for its backward: the input leaves
    and the outputs (one Variable, or a tuple of them)."""

    __slots__ = ("leaves", "outputs")

    def __init__(self, leaves: tuple, outputs: Any) -> None:
        self.leaves, self.outputs = leaves, outputs


def derive_backward(cls: type[Module]) -> None:
    """Make ``cls`` (which defines ``forward`` and no ``backward``) forward-only: wrap its
    ``forward`` and give it the derived backward."""
    user_forward = cls.__dict__["forward"]

    @functools.wraps(user_forward)
    def forward(self: Module, *args: Any, **kwargs: Any) -> Any:
        if STATE.recording is not None:  # part of the recording around it
            return user_forward(self, *(as_variable(a) for a in args), **kwargs)
        if not STATE.grad:  # recorded for the fusions only: no graph, nothing kept
            with recording():
                return unwrap_tree(user_forward(self, *(as_variable(a) for a in args),
                                                **kwargs))
        leaves = tuple(Variable(a, True) if is_array(a) else a for a in args)
        out = _keep_graph(self, functools.partial(user_forward, self), leaves, kwargs)
        if self.training:
            self._calls += 1
        return unwrap_tree(out)

    cls.forward = forward
    cls.backward = derived_backward
    cls.autodiff = True


def derived_backward(self: Module, dy: Any, input_grad: bool = True) -> Any:
    """The backward of a forward-only module's last forward: parameters' gradients added to
    ``.grad``; returns the input gradient (a tuple for several inputs; None without
    ``input_grad``).

    Raises:
        RuntimeError: no forward to go back through (none yet, or its backward already ran),
            or several training-mode forwards since the last backward.
    """
    graph = getattr(self, "_graph", None)
    name = type(self).__name__
    if graph is None:
        raise RuntimeError(f"{name}.backward called before forward, or twice for one forward "
                           "(each forward pass is backpropagated once)")
    check_single_call(self)
    self._graph = None
    outs = graph.outputs if isinstance(graph.outputs, tuple | list) else (graph.outputs,)
    dys = tuple(dy) if isinstance(graph.outputs, tuple | list) else (dy,)
    if len(dys) != len(outs):
        raise RuntimeError(f"{name}.backward got {len(dys)} gradients for {len(outs)} outputs")
    leaves = [a for a in graph.leaves if isinstance(a, Variable)]
    for leaf in leaves:
        leaf.requires_grad, leaf.grad = input_grad, None
    live = [(o, d) for o, d in zip(outs, dys)
            if isinstance(o, Variable) and o.requires_grad and d is not None]
    if live:
        backward([o for o, _ in live], [d for _, d in live])
    if not input_grad:
        return None
    grads = tuple(leaf.grad if leaf.grad is not None else leaf.xp.zeros_like(leaf.data)
                  for leaf in leaves)
    return grads[0] if len(grads) == 1 else grads


def check_reachable(model: Module, rec: Any) -> None:
    """Warn once per model when its recorded forward called modules or read parameters that
    are not among its attributes (kept in a plain list or dict): their parameters are missing
    from ``parameters()``, ``state_dict`` and checkpoints, so no optimizer trains them."""
    if getattr(model, "_reachability_checked", False):
        return
    model._reachability_checked = True
    own = {id(m) for m in model.modules()}
    params = {id(p) for p in model.parameters()}
    lost = [type(m).__name__ for m in rec.called if id(m) not in own]
    lost += ["a Parameter" for leaf in rec.leaves.values()
             if leaf.param is not None and id(leaf.param) not in params]
    if lost:
        import warnings

        warnings.warn(
            f"{type(model).__name__}.forward uses {', '.join(sorted(set(lost)))} that "
            f"{type(model).__name__} does not hold as an attribute (a plain list or dict?): "
            "their parameters are not in parameters() or state_dict, so optimizers and "
            "checkpoints miss them. Keep layers in attributes or an anycnn.nn.ModuleList",
            UserWarning, stacklevel=4)


def check_single_call(module: Module) -> None:
    """Refuse a backward after several training-mode ``forward`` calls of ``module`` (it
    cannot tell which one ``dy`` belongs to); reset the count. Calls as ``module(x)`` do not
    count: each keeps its own state in the graph of its output."""
    calls, module._calls = module._calls, 0
    if calls > 1:
        raise RuntimeError(
            f"{type(module).__name__}.backward: the module ran forward {calls} times in "
            "training mode since its last backward, and backward(dy) cannot tell which one dy "
            "belongs to. Run backward after each forward, evaluate under anycnn.no_grad() or "
            "in eval mode, or keep each call's graph: out = model(x) gives a Variable, and "
            "loss_fn(out, y).backward() goes back through that call")
