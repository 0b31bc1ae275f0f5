"""Branching containers: :class:`Residual`, :class:`Concat` and :class:`Identity`.

There is no autograd tape: a branching model is a tree of containers, and each container's
backward is the adjoint of its forward. ``Residual`` computes ``body(x) + shortcut(x)``, so its
backward sends ``dy`` down both paths and adds the two input gradients; ``Concat`` gives every
branch the same ``x`` and joins their outputs on the channel axis (the last one: NHWC), so its
backward hands each branch its channel range of ``dy`` and adds the input gradients. They nest in
each other and in :class:`~anycnn.nn.sequential.Sequential` (ResNet, Inception, DenseNet, U-Net),
and a ``Sequential`` body or branch runs its own fused fast paths (:mod:`anycnn.nn.fusion`).

With ``backward(dy, input_grad=False)`` (the container's input gradient is needed by nobody)
every path still runs its backward, for its parameter gradients, with ``input_grad=False``, and
the container returns ``None``.

Parameter names follow attribute access, so they are stable and dotted: a ``Residual``'s
children are ``body`` and ``shortcut`` (``"3.body.0.weight"`` is ``model[3].body[0].weight``),
a ``Concat``'s branches are ``"0"``, ``"1"``, ... as a ``Sequential``'s layers
(``"2.1.0.bias"`` is ``model[2][1][0].bias``). ``anycnn.io.interop`` exports the same names.
"""

from __future__ import annotations

from typing import Any

from ..backend import namespace_of
from ..errors import ConfigError, ShapeError
from .module import AddendShapeError, Module


def as_module(owner: str, what: str, value: Any) -> Module:
    """``value``, checked to be a Module (``owner``'s ``what``: "Sequential item 2")."""
    if not isinstance(value, Module):
        raise ConfigError(f"{owner} {what} is {type(value).__name__}, not a Module")
    return value


def _agreed_hw(sizes: list[tuple[int, int] | None]) -> tuple[int, int] | None:
    """The spatial size the paths of a container report, None when none knows or two differ
    (then the forward pass raises the ShapeError)."""
    known = {hw for hw in sizes if hw is not None}
    return known.pop() if len(known) == 1 else None


class Identity(Module):
    """Returns its input unchanged (any shape); its backward returns ``dy``."""

    def forward(self, x: Any) -> Any:
        return x

    def backward(self, dy: Any, input_grad: bool = True) -> Any:
        return dy if input_grad else None

    def output_hw(self, hw: tuple[int, int]) -> tuple[int, int] | None:
        return hw


class Residual(Module):
    """``y = body(x) + shortcut(x)``, or ``body(x) + x`` when ``shortcut`` is None.

    Args:
        body: the residual path, usually a ``Sequential`` (e.g. conv, BN, ReLU, conv, BN).
        shortcut: a module mapping ``x`` to the body's output shape (e.g. a strided 1x1
            ``Conv2D`` and a ``BatchNorm2D`` where the block changes size or channels); None
            (default) is the identity, kept as an :class:`Identity` child named ``shortcut``.

    Shapes: any input the body takes; both paths must give the same output shape, else a
    ``ShapeError`` names both shapes.
    """

    def __init__(self, body: Module, shortcut: Module | None = None) -> None:
        self.body = as_module("Residual", "body", body)
        self.shortcut = Identity() if shortcut is None else as_module(
            "Residual", "shortcut", shortcut)

    def forward(self, x: Any, relu: bool = False) -> Any:
        """``body(x) + shortcut(x)``; with ``relu``, ``max(., 0)`` of it in the same pass (a
        fused Residual → ReLU run, :mod:`anycnn.nn.fusion`)."""
        s = self.shortcut.forward(x)
        try:  # the body's last layer may add the shortcut inside its own pass
            return self.body.forward_add(x, s, relu)
        except AddendShapeError as exc:
            raise ShapeError(self._mismatch(tuple(x.shape), exc.shape, tuple(s.shape))) from None

    def _mismatch(self, x_shape: tuple, body: tuple, short: tuple) -> str:
        if not isinstance(self.shortcut, Identity):
            return (f"Residual: for input {x_shape} the body gives {body} but the shortcut "
                    f"gives {short}; both paths must give the same shape")
        text = (f"Residual: the body maps input {x_shape} to {body}, but the identity shortcut "
                f"keeps {short}; pass a shortcut that maps the input to the body's shape")
        if len(body) == 4 and len(x_shape) == 4:
            stride = max(1, -(-x_shape[1] // body[1])) if body[1] else 1
            text += (f", e.g. Sequential(Conv2D({x_shape[3]}, {body[3]}, 1, stride={stride}, "
                     f"bias=False), BatchNorm2D({body[3]}))")
        return text

    def backward(self, dy: Any, input_grad: bool = True) -> Any:
        """The shortcut's gradient, then the body's with it added by the body's first layer
        (a compiled convolution starts its input gradient's sums from it: no pass of its own)."""
        if not input_grad:
            self.shortcut.backward(dy, False)
            self.body.backward(dy, False)
            return None
        return self.body.backward_add(dy, self.shortcut.backward(dy, True))

    def output_hw(self, hw: tuple[int, int]) -> tuple[int, int] | None:
        return _agreed_hw([self.body.output_hw(hw), self.shortcut.output_hw(hw)])


class Concat(Module):
    """Every branch gets the same input; their outputs are concatenated on the last axis
    (channels, NHWC). Branches are named ``"0"``, ``"1"``, ... and indexed as ``concat[i]``.

    Shapes: ``(N, H, W, C)`` → ``(N, H', W', C_0 + C_1 + ...)`` where branch ``i`` gives
    ``(N, H', W', C_i)``; branches must agree on every axis but the last, else a
    ``ShapeError`` names the two branches and their shapes. Backward hands branch ``i`` the
    channels ``C_0 + ... + C_{i-1}`` up to (excluding) ``... + C_i`` of ``dy``.
    """

    def __init__(self, *branches: Module) -> None:
        if not branches:
            raise ConfigError("Concat needs at least one branch")
        for i, branch in enumerate(branches):
            setattr(self, str(i), as_module("Concat", f"branch {i}", branch))
        self._widths: list[int] | None = None

    @property
    def branches(self) -> list[Module]:
        return [m for _, m in self.named_children()]

    def __getitem__(self, i: int) -> Module:
        return self.branches[i]

    def __len__(self) -> int:
        return len(self.branches)

    def forward(self, x: Any) -> Any:
        outs = [branch.forward(x) for branch in self.branches]
        first = tuple(outs[0].shape)
        for i, y in enumerate(outs[1:], 1):
            shape = tuple(y.shape)
            if len(shape) != len(first) or shape[:-1] != first[:-1]:
                raise ShapeError(
                    f"Concat: for input {tuple(x.shape)} branch 0 gives {first} but branch {i} "
                    f"gives {shape}; branches must agree on every axis but the last "
                    "(channels, NHWC)")
        self._widths = [int(y.shape[-1]) for y in outs]
        if len(outs) == 1:
            return outs[0]
        return namespace_of(*outs).concat(outs, axis=-1)

    def backward(self, dy: Any, input_grad: bool = True) -> Any:
        if self._widths is None:
            raise RuntimeError("Concat.backward called before forward")
        dx, start = None, 0
        for branch, width in zip(self.branches, self._widths):
            d = branch.backward(dy[..., start:start + width], input_grad)
            start += width
            if input_grad:
                dx = d if dx is None else dx + d
        return dx

    def output_hw(self, hw: tuple[int, int]) -> tuple[int, int] | None:
        return _agreed_hw([branch.output_hw(hw) for branch in self.branches])


class ModuleList(Module):
    """A list of modules whose parameters the owner finds (``self.blocks = ModuleList([...])``
    in a model written as code, as PyTorch's ``nn.ModuleList``): children ``"0"``, ``"1"``,
    ...; indexing, ``len``, iteration and :meth:`append`. It has no forward of its own: the
    owner's ``forward`` calls its items."""

    def __init__(self, modules: Any = ()) -> None:
        for module in modules:
            self.append(module)

    def append(self, module: Module) -> ModuleList:
        setattr(self, str(len(self)), as_module("ModuleList", f"item {len(self)}", module))
        return self

    def __getitem__(self, i: int) -> Module:
        return [m for _, m in self.named_children()][i]

    def __len__(self) -> int:
        return sum(1 for _ in self.named_children())

    def __iter__(self) -> Any:
        return (m for _, m in self.named_children())

    def forward(self, x: Any) -> Any:
        raise TypeError("a ModuleList has no forward: call its items in your forward "
                        "(for block in self.blocks: x = block(x)), or use a Sequential")

    def backward(self, dy: Any, input_grad: bool = True) -> Any:
        raise TypeError("a ModuleList has no backward: it is never called itself")
