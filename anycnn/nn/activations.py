"""The activations of the mobile and modern networks (MobileNet, EfficientNet, ConvNeXt):
``ReLU6``, ``Hardsigmoid``, ``Hardswish``, ``SiLU``, ``GELU`` and ``Softmax``.

Each is one elementwise function of any-rank input (``Softmax``: over one axis) with PyTorch's
formula and boundary conventions and a hand-written backward (the forward keeps its input; the
derivative is formed by the backward, so inference pays for none of it): a call is one node of
a recorded model. ``ReLU``, ``LeakyReLU``,
``Sigmoid`` and ``Tanh`` live in :mod:`anycnn.nn.layers`.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from . import functional as F
from .layers import _Elementwise, _require_forward
from .module import Module


class _Activation(_Elementwise):
    """An activation whose ``_apply`` returns ``(y, ctx)`` and whose ``_grad(dy, ctx)`` forms
    the input gradient."""

    def _grad(self, dy, ctx):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dy, input_grad: bool = True):
        return self._grad(dy, _require_forward(self, self._derivative))


class ReLU6(_Activation):
    """``min(max(x, 0), 6)`` (MobileNetV2)."""

    def _apply(self, x):
        return F.relu6_forward(x)

    def _grad(self, dy, ctx):
        return F.relu6_backward(dy, ctx)


class Hardsigmoid(_Activation):
    """``relu6(x + 3) / 6``, the piecewise-linear sigmoid of MobileNetV3's
    squeeze-and-excitation."""

    def _apply(self, x):
        return F.hardsigmoid_forward(x)

    def _grad(self, dy, ctx):
        return F.hardsigmoid_backward(dy, ctx)


class Hardswish(_Activation):
    """``x * relu6(x + 3) / 6`` (MobileNetV3)."""

    def _apply(self, x):
        return F.hardswish_forward(x)

    def _grad(self, dy, ctx):
        return F.hardswish_backward(dy, ctx)


class SiLU(_Activation):
    """``x * sigmoid(x)``, also called swish (EfficientNet)."""

    def _apply(self, x):
        return F.silu_forward(x)

    def _grad(self, dy, ctx):
        return F.silu_backward(dy, ctx)


class GELU(_Activation):
    """Gaussian error linear unit ``x * Phi(x)`` (ConvNeXt, transformers).

    Args:
        approximate: ``"none"`` (exact, through the error function) or ``"tanh"`` (the tanh
            approximation), as PyTorch's ``nn.GELU``.
    """

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ConfigError(f"GELU approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def _apply(self, x):
        return F.gelu_forward(x, self.approximate)

    def _grad(self, dy, ctx):
        return F.gelu_backward(dy, ctx, self.approximate)

    def extra_repr(self):
        return "" if self.approximate == "none" else f"approximate={self.approximate!r}"


class Softmax(Module):
    """Softmax over ``axis`` (default the last: the classes of ``(N, classes)`` logits, or the
    channels of NHWC maps): non-negative outputs that sum to 1 along it. For training a
    classifier, feed logits to :class:`~anycnn.nn.losses.SoftmaxCrossEntropy` instead (one
    stable step); this layer is for probabilities at the end of a model or attention-like
    weights inside one."""

    def __init__(self, axis: int = -1) -> None:
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise ConfigError(f"Softmax axis must be an int, got {axis!r}")
        self.axis = axis
        self._y = None

    def output_hw(self, hw):
        return hw

    def forward(self, x: Any) -> Any:
        if not -x.ndim <= self.axis < x.ndim:
            raise ConfigError(f"Softmax axis {self.axis} is out of range for input shape "
                              f"{tuple(x.shape)}")
        y, self._y = F.softmax_forward(x, self.axis)
        return y

    def backward(self, dy: Any, input_grad: bool = True) -> Any:
        return F.softmax_backward(dy, _require_forward(self, self._y), self.axis)

    def extra_repr(self):
        return f"axis={self.axis}"
