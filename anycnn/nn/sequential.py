"""The :class:`Sequential` container."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, ShapeError
from .fusion import execution_plan
from .layers import explain_flatten_mismatch
from .module import Module, add_gradients, residual_sum, spatial_size


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse. Children are named "0", "1", ...

    With ``fuse=True`` (default) exact rewrites from :mod:`anycnn.nn.fusion` run fusable layer
    sequences (e.g. Conv2D → ReLU → MaxPool2D) as one faster step; results are the same.
    ``backward(dy, input_grad=False)`` skips the first layer's input gradient (training does
    not need it) and then returns ``None``.

    When a Dense after a Flatten gets the wrong number of features (images of another size than
    the model was built for), its ShapeError also names the NHWC shape Flatten saw, the one the
    Dense expects, and the input image size that gives it (computed only when raised; the
    Flatten and the Dense must be in the same Sequential, whose input is taken as the images).
    """

    def __init__(self, *layers: Module, fuse: bool = True) -> None:
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise ConfigError(f"Sequential item {i} is {type(layer).__name__}, not a Module")
            setattr(self, str(i), layer)
        self.fuse = fuse
        self._plan: list[Any] | None = None

    @property
    def layers(self) -> list[Module]:
        return [m for _, m in self.named_children()]

    def __getitem__(self, i: int) -> Module:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def forward(self, x: Any) -> Any:
        return self._run(x)

    def forward_add(self, x: Any, addend: Any, relu: bool = False) -> Any:
        """:meth:`Module.forward_add`, the sum taken by the last layer."""
        return self._run(x, addend, relu)

    def _run(self, x: Any, addend: Any = None, relu: bool = False) -> Any:
        """The layers' forward (the last one's ``forward_add`` with an ``addend``)."""
        layers = self.layers
        self._plan = plan = execution_plan(layers) if self.fuse else layers
        images = x
        try:
            for i, step in enumerate(plan):
                if addend is None or i < len(plan) - 1:
                    x = step.forward(x)
                elif isinstance(step, Module):
                    return step.forward_add(x, addend, relu)
                else:
                    x = step.forward(x)
        except ShapeError as exc:  # costs nothing until raised
            note = explain_flatten_mismatch(layers, step, images)
            if note:
                exc.args = (f"{exc}{note}",)
            raise
        return x if addend is None else residual_sum(x, addend, relu)

    def output_hw(self, hw: tuple[int, int]) -> tuple[int, int] | None:
        return spatial_size(self.layers, hw)

    def backward(self, dy: Any, input_grad: bool = True) -> Any:
        if self._plan is None:
            raise RuntimeError("Sequential.backward called before forward")
        plan = self._plan
        for i in range(len(plan) - 1, -1, -1):
            dy = plan[i].backward(dy, input_grad=input_grad or i > 0)
        return dy

    def backward_add(self, dy: Any, addend: Any) -> Any:
        """:meth:`backward` plus ``addend``, added by the first layer
        (:meth:`Module.backward_add`)."""
        if self._plan is None:
            raise RuntimeError("Sequential.backward called before forward")
        plan = self._plan
        for i in range(len(plan) - 1, 0, -1):
            dy = plan[i].backward(dy, input_grad=True)
        if not plan:
            return add_gradients(dy, addend)
        if isinstance(plan[0], Module):
            return plan[0].backward_add(dy, addend)
        return add_gradients(plan[0].backward(dy, input_grad=True), addend)
