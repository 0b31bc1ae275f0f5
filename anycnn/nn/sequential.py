"""The :class:`Sequential` container."""

from __future__ import annotations

from typing import Any

from ..autograd.mode import STATE, enable_grad
from ..autograd.variable import unwrap
from ..errors import ShapeError
from .calls import capture, check_single_call, restore
from .containers import as_module
from .fusion import execution_plan
from .inference import (
    EvalPlan,
    enter_tree,
    folding_off,
    inference_layers,
    inferring,
    leave_tree,
    release,
    tree_in_eval,
    unfolded,
)
from .layers import explain_flatten_mismatch
from .modes import fusion_suspended
from .module import Module, add_gradients, residual_sum, spatial_size

#: ``isinstance(value, Module)`` as a C callable (for ``filter``)
_is_module = Module.__instancecheck__


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse. Children are named "0", "1", ...

    With ``fuse=True`` (default) exact rewrites from :mod:`anycnn.nn.fusion` run fusable layer
    sequences (e.g. Conv2D → ReLU → MaxPool2D) as one faster step; results are the same. In
    eval mode each Conv2D → BatchNorm2D pair runs as one convolution with the BatchNorm folded
    in, the ReLU and a residual sum after it in the convolution's pass
    (:mod:`anycnn.nn.inference`); the layers' parameters are not changed.
    ``backward(dy, input_grad=False)`` skips the first layer's input gradient (training does
    not need it) and then returns ``None``; the layers before the first one with a trainable
    parameter (a frozen backbone, see :meth:`Module.freeze`) then run no backward at all.

    One layer instance may appear several times (weight sharing, or one ``ReLU`` reused): its
    state is then kept per position (no fusion in such a ``Sequential``). A backward after
    several training-mode forwards raises: it cannot tell which forward ``dy`` belongs to.

    When a Dense after a Flatten gets the wrong number of features (images of another size than
    the model was built for), its ShapeError also names the NHWC shape Flatten saw, the one the
    Dense expects, and the input image size that gives it (computed only when raised; the
    Flatten and the Dense must be in the same Sequential, whose input is taken as the images).
    """

    def __init__(self, *layers: Module, fuse: bool = True) -> None:
        for i, layer in enumerate(layers):
            setattr(self, str(i), as_module("Sequential", f"item {i}", layer))
        self.fuse = fuse
        self._plan: list[Any] | None = None
        self._states: list[Any] | None = None  # per-position state when a layer repeats
        self._replay: tuple | None = None  # a folded forward's arguments, for its backward

    @property
    def layers(self) -> list[Module]:
        if type(self).named_children is Module.named_children:  # read on every forward
            return list(filter(_is_module, vars(self).values()))
        return [m for _, m in self.named_children()]

    def __getitem__(self, i: int | slice) -> Module:
        """Layer ``i``; a slice is a ``Sequential`` of those layers (the same instances, so
        ``model[:-1]`` is the backbone of ``model``)."""
        if isinstance(i, slice):
            return Sequential(*self.layers[i], fuse=self.fuse)
        return self.layers[i]

    def __setitem__(self, i: int, layer: Module) -> None:
        """Replace layer ``i`` (``model[-1] = Dense(84, 2)``: a new head); its name stays."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"Sequential index {i} out of range for {n} layers")
        setattr(self, str(i % n), as_module("Sequential", f"item {i % n}", layer))
        self._plan = self._states = None

    def append(self, layer: Module) -> Sequential:
        """Add ``layer`` at the end (named by its position); returns the Sequential."""
        n = len(self)
        setattr(self, str(n), as_module("Sequential", f"item {n}", layer))
        self._plan = self._states = None
        return self

    def __len__(self) -> int:
        return len(self.layers)

    def forward(self, x: Any) -> Any:
        return self._run(x)

    def forward_add(self, x: Any, addend: Any, relu: bool = False) -> Any:
        """:meth:`Module.forward_add`, the sum taken by the last layer."""
        return self._run(x, addend, relu)

    def _run(self, x: Any, addend: Any = None, relu: bool = False) -> Any:
        """The layers' forward (the last one's ``forward_add`` with an ``addend``)."""
        evaluating = tree_in_eval()
        if evaluating is not None:  # inside another Sequential's forward: its answer
            return self._run_steps(x, addend, relu, evaluating)
        token = enter_tree(self)
        try:
            y = self._run_steps(x, addend, relu, tree_in_eval())
            if inferring():  # its steps kept nothing: a backward runs the forward again
                self._replay = (x, addend, relu)
            return y
        finally:
            leave_tree(token)

    def _run_steps(self, x: Any, addend: Any, relu: bool, evaluating: bool) -> Any:
        """:meth:`_run`, BatchNorm folded into the convolutions when ``evaluating`` (the
        outermost Sequential of this forward and everything in it are in eval mode)."""
        layers = self.layers
        self._replay = None
        # an eval plan is kept (and reused) only where folds and fusions run as usual
        keeps = evaluating and self.fuse and not folding_off() and not fusion_suspended()
        kept = self._derived if keeps else None
        if kept is not None and kept.valid(layers):  # the eval plan of the last forward
            plan, states = kept.plan, None
            if kept.folded:
                self._replay = (x, addend, relu)
        else:
            plan, kept, states = self._new_plan(x, addend, relu, layers, evaluating, keeps)
        self._plan = plan
        self._states = states
        if self.training and STATE.grad:
            self._calls += 1
        # an inference (no_grad, eval mode) keeps no backward state: each activation is freed
        # once read (measured: resnet20's forward 8-11% faster, its memory reused in cache)
        forget = states is None and inferring()
        images = x
        try:
            for i, step in enumerate(plan):
                if addend is None or i < len(plan) - 1:
                    x = step.forward(x)
                elif isinstance(step, Module):
                    x = step.forward_add(x, addend, relu)
                    addend = None
                else:
                    x = step.forward(x)
                if states is not None:
                    states.append(capture(step))
                elif forget:
                    if kept is None:
                        release(step)
                    else:
                        kept.release(i)
        except ShapeError as exc:  # costs nothing until raised
            note = explain_flatten_mismatch(layers, step, images)
            if note:
                exc.args = (f"{exc}{note}",)
            raise
        if forget:
            self._replay = None  # the outermost Sequential's input is kept instead
        return x if addend is None else residual_sum(x, addend, relu)

    def _new_plan(self, x: Any, addend: Any, relu: bool, layers: list[Module],
                  evaluating: bool, keeps: bool) -> tuple[list[Any], EvalPlan | None,
                                                          list | None]:
        """The steps of a forward of ``layers`` (folded when ``evaluating``, fused):
        ``(plan, the EvalPlan kept for the next forward (in _derived) when ``keeps``, else
        None, states: a list when a layer repeats)``."""
        repeats = len({id(m) for m in layers}) < len(layers)
        if repeats:
            return layers, None, []
        if not self.fuse:
            return layers, None, None
        steps = inference_layers(layers) if evaluating else layers
        if steps is not layers:
            self._replay = (x, addend, relu)
        plan = execution_plan(steps)
        if keeps:
            kept = self._derived = EvalPlan(list(layers), plan, steps is not layers)
            return plan, kept, None
        return plan, None, None

    def output_hw(self, hw: tuple[int, int]) -> tuple[int, int] | None:
        return spatial_size(self.layers, hw)

    def _begin_backward(self) -> list[Any]:
        if self._plan is None:
            raise RuntimeError("Sequential.backward called before forward")
        check_single_call(self)
        if self._replay is not None:  # a folded eval-mode forward, or an inference: again
            x, addend, relu = self._replay  # unfolded and keeping the layers' state, for their
            with unfolded(), enable_grad():  # own backward (anycnn.nn.inference)
                self._run(x, addend, relu)
        return self._plan

    def _step_backward(self, i: int, dy: Any, input_grad: bool) -> Any:
        if self._states is not None:
            restore(self._states[i])
        return self._plan[i].backward(dy, input_grad=input_grad)

    def backward(self, dy: Any, input_grad: bool = True) -> Any:
        plan = self._begin_backward()
        dy = unwrap(dy)
        first = 0 if input_grad else _first_trainable(plan)
        for i in range(len(plan) - 1, first - 1, -1):
            dy = self._step_backward(i, dy, input_grad or i > first)
        return dy if input_grad else None

    def backward_add(self, dy: Any, addend: Any) -> Any:
        """:meth:`backward` plus ``addend``, added by the first layer
        (:meth:`Module.backward_add`)."""
        plan = self._begin_backward()
        for i in range(len(plan) - 1, 0, -1):
            dy = self._step_backward(i, dy, True)
        if not plan:
            return add_gradients(dy, addend)
        if self._states is not None:
            restore(self._states[0])
        if isinstance(plan[0], Module):
            return plan[0].backward_add(dy, addend)
        return add_gradients(plan[0].backward(dy, input_grad=True), addend)


def _first_trainable(plan: list[Any]) -> int:
    """The position of the first step of ``plan`` with a parameter that requires a gradient
    (``len(plan)`` when none has): the steps before it need no backward when the input
    gradient is not wanted."""
    for i, step in enumerate(plan):
        if any(p.requires_grad for m in _modules_of(step) for p in m.parameters()):
            return i
    return len(plan)


def _modules_of(step: Any) -> list[Module]:
    """The layers a plan step runs (itself, or those of a fused executor)."""
    if isinstance(step, Module):
        return [step]
    return step.layers()
