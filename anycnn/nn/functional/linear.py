"""Dense layers: ``x @ weight + bias`` for ``x`` ``(N, in)`` and ``weight`` ``(in, out)``."""

from __future__ import annotations

from typing import Any

from ...backend import namespace_of
from ...kernels.dispatch import DECLINE, attempt
from .primitives import bias_relu, column_sums, matmul

# Dense


def linear_forward(x: Any, weight: Any, bias: Any, relu: bool = False):
    """``x @ weight + bias`` with x ``(N, in)``, weight ``(in, out)``; ctx is x. With ``relu``,
    ``max(., 0)`` of it (eval mode's fused Dense → ReLU, :mod:`anycnn.nn.inference`): one
    compiled kernel where it applies (``linear_epilogue``), else the bias and the ReLU in one
    pass after the product; the backward is that of the Dense alone (a ReLU's gradient is the
    caller's to apply first)."""
    namespace_of(x, weight, bias)  # one backend, one device
    if relu:
        y = attempt("linear_epilogue", x, weight, bias, relu)
        if y is not DECLINE:
            return y, x
        return bias_relu(matmul(x, weight), bias), x
    y = matmul(x, weight)
    return (y + bias if bias is not None else y), x


def linear_backward(dy: Any, x: Any, weight: Any, need_input_grad: bool = True):
    """``(dx or None, dweight, dbias)`` of :func:`linear_forward`."""
    xp = namespace_of(dy, x, weight)
    dweight = matmul(xp.matrix_transpose(x), dy)
    dbias = column_sums(dy)
    dx = matmul(dy, xp.matrix_transpose(weight)) if need_input_grad else None
    return dx, dweight, dbias


# --------------------------------------------------------------------------------------------
