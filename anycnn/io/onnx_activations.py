"""ONNX forms of the activations of :mod:`anycnn.nn.activations` (used by
:mod:`anycnn.io.onnx`).

==============  ==============================================================================
anycnn          ONNX
==============  ==============================================================================
ReLU6           ``Clip`` (0, 6)
Hardsigmoid     ``HardSigmoid`` (``alpha`` 1/6, ``beta`` 0.5)
Hardswish       ``HardSwish``
SiLU            ``Sigmoid``, ``Mul`` (``x * sigmoid(x)``)
GELU            ``Gelu`` (``approximate``) from opset 20; below it the formula:
                ``0.5 x (1 + Erf(x / sqrt 2))``, or with ``Tanh`` for ``approximate="tanh"``
Softmax         ``Softmax`` over the layer's axis, moved to NCHW for 4-D input
==============  ==============================================================================

In a float64 graph, Hardsigmoid and Hardswish are written as ``Clip(x + 3, 0, 6) / 6`` (times
``x``) instead, as anycnn computes them: the ``HardSigmoid`` attributes are float32 and
onnxruntime has no double kernels for the two operators.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..nn.activations import GELU, Hardsigmoid, Hardswish, ReLU6, SiLU, Softmax
from ..nn.module import Module

#: the activation classes mapped here
ACTIVATIONS = (ReLU6, Hardsigmoid, Hardswish, SiLU, GELU, Softmax)
#: the first opset with the ``Gelu`` operator
GELU_OPSET = 20
#: NHWC axis -> the same axis of the graph's NCHW tensor
_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}


def emit_activation(b: Any, module: Module, x: str, ndim: int, scope: str) -> str:
    """Append the nodes computing ``module`` (one of :data:`ACTIVATIONS`) on the graph tensor
    ``x`` (``ndim`` axes; NCHW when 4-D, else anycnn's own layout); return the output's name."""

    def scalar(name: str, value: float) -> str:
        return b.scalar(name, value)

    def node(op: str, inputs: list[str], **attrs: Any) -> str:
        return b.node(op, inputs, scope, **attrs)

    def hard_gate() -> str:  # relu6(x + 3) / 6, as anycnn computes it
        shifted = node("Add", [x, scalar("three", 3.0)])
        clipped = node("Clip", [shifted, scalar("zero", 0.0), scalar("six", 6.0)])
        return node("Div", [clipped, scalar("six", 6.0)])

    native = b.dtype == np.float32
    if isinstance(module, ReLU6):
        return node("Clip", [x, scalar("zero", 0.0), scalar("six", 6.0)])
    if isinstance(module, Hardsigmoid):
        return node("HardSigmoid", [x], alpha=1.0 / 6.0, beta=0.5) if native else hard_gate()
    if isinstance(module, Hardswish):
        return node("HardSwish", [x]) if native else node("Mul", [x, hard_gate()])
    if isinstance(module, SiLU):
        return node("Mul", [x, node("Sigmoid", [x])])
    if isinstance(module, GELU):
        return _gelu(b, module.approximate, x, scalar, node)
    if isinstance(module, Softmax):
        axis = module.axis % ndim
        return node("Softmax", [x], axis=_NCHW_AXIS[axis] if ndim == 4 else axis)
    raise TypeError(f"not an activation of anycnn.nn.activations: {type(module).__name__}")


def _gelu(b: Any, approximate: str, x: str, scalar: Any, node: Any) -> str:
    if b.opset >= GELU_OPSET:
        return node("Gelu", [x], approximate=approximate)
    if approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = node("Mul", [node("Mul", [x, x]), x])
        inner = node("Add", [x, node("Mul", [cube, scalar("cubic", 0.044715)])])
        inner = node("Mul", [inner, scalar("sqrt_2_over_pi", math.sqrt(2.0 / math.pi))])
        cdf = node("Add", [node("Tanh", [inner]), scalar("one", 1.0)])
    else:  # 0.5 x (1 + erf(x / sqrt 2))
        cdf = node("Add", [node("Erf", [node("Mul", [x, scalar("sqrt_half",
                                                                 math.sqrt(0.5))])]),
                           scalar("one", 1.0)])
    return node("Mul", [node("Mul", [x, scalar("half", 0.5)]), cdf])
