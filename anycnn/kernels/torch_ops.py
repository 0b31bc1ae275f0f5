"""torch's own operators for torch tensors (oneDNN on a CPU, cuDNN on CUDA), behind the shim.

On a CPU the compiled kernels are offered torch tensors first
(:mod:`~anycnn.kernels.torch_native`): these operators take CUDA tensors, and on a CPU what the
compiled kernels decline (shapes they do not cover, float64 where they have no kernel, the
kernels off or compiled in memory).

The portable ops of :mod:`anycnn.nn.functional` run on torch tensors as array-API calls: every
convolution an im2col gather and a GEMM, every pooling a gather of its windows. torch brings
its own convolution, pooling and BatchNorm operators; the kernels here register with
:mod:`anycnn.kernels.dispatch` under the names the portable ops dispatch on and call them
through ``torch.ops.aten`` (no autograd graph: anycnn's hand-written backward contract is kept,
each backward kernel computes its gradients from what its forward kept):

- ``conv2d`` / ``conv2d_backward``: ``aten.convolution`` / ``aten.convolution_backward``, any
  stride, dilation and groups (depthwise included); asymmetric padding is applied explicitly
  (``constant_pad_nd``) and the input gradient cropped back.
- ``conv2d_epilogue``: a convolution with a ReLU and/or a residual addend (eval mode's
  ``ConvReLU``, folded BatchNorms, ``Conv2D.forward_add``) as ``aten.convolution`` and the
  sum and ReLU in place on its output.
- ``conv2d_relu_maxpool`` / ``pooled_gradient``: a fused ``Conv2D → ReLU → MaxPool2D`` block
  (:mod:`anycnn.nn.fusion`) as the convolution, ``aten.max_pool2d_with_indices`` and the bias
  and ReLU on the pooled map; its gradient through ``aten.threshold_backward`` (whose
  result also gives the bias gradient) and ``aten.max_pool2d_with_indices_backward``.
- ``max_pool2d`` / ``max_pool2d_backward``, ``avg_pool2d`` / ``avg_pool2d_backward``: pooling
  windows that torch's padding and ceil mode express (the layers' always are).
- ``batch_norm`` / ``batch_norm_backward``: ``aten.native_batch_norm`` and
  ``aten.native_batch_norm_backward`` (statistics not synchronised across ranks; a fused ReLU
  and a residual addend applied in place).
- ``relu_grad`` and ``add_relu``: one pass each (``aten.threshold_backward``; on a CPU
  ``aten._add_relu``, elsewhere an add and an in-place ReLU) instead of the portable
  expressions' casts and temporaries. Every sum followed by a ReLU here (a bias, a residual
  addend) is one such pass on a CPU (:func:`add_relu_`).

Layouts: anycnn's NHWC tensors permuted to NCHW are torch's ``channels_last`` views (no copy);
torch's channels-last kernels then write ``channels_last`` outputs, which permuted back are
NHWC-contiguous again. Weights ``(kh, kw, C_in/groups, C_out)`` are viewed as torch's
``(C_out, C_in/groups, kh, kw)``. Results equal the portable path's up to rounding
(``tests/test_torch_ops.py`` compares each kernel with the portable body in float64).

Each kernel declines (:data:`~anycnn.kernels.dispatch.DECLINE`) arrays that are not torch
tensors (told by their type, so torch is never imported here for other arrays, nor at
``import anycnn``), dtypes that differ between operands, and geometry it cannot express exactly;
``ANYCNN_FASTPATH=0`` declines every forward (the backward kernels still take the state their
own forward kept, which no other code can read). The same code serves CPU and CUDA tensors.

CuPy could use cuDNN the same way: a sibling module registering under the same names, declining
all but CuPy arrays, calling ``cupy.cudnn`` (``cupyx.cudnn`` in newer CuPy):
``convolution_forward`` / ``convolution_backward_data`` / ``convolution_backward_filter`` with
``d_layout=CUDNN_TENSOR_NHWC`` (anycnn's layout, no transposes) and the weight permuted to
``(C_out, kh, kw, C_in/groups)`` with ``w_layout=CUDNN_TENSOR_NHWC``, ``pooling_forward`` /
``pooling_backward`` (keeping the input and output instead of indices), and
``batch_normalization_forward_training`` / ``batch_normalization_backward`` for BatchNorm, and
listed in :data:`~anycnn.kernels.dispatch.KERNEL_MODULES`.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, NamedTuple

import array_api_compat

from .dispatch import DECLINE, implements
from .threads import switched_on


@functools.cache
def _torch() -> Any:
    """The torch module (imported only once a torch tensor has been seen: it is loaded)."""
    return importlib.import_module("torch")


def _aten() -> Any:
    return _torch().ops.aten


def takes(*arrays: Any) -> bool:
    """Whether these kernels compute a call on ``arrays``: they are on and every array given
    (None: an absent operand) is a torch tensor."""
    return switched_on() and all(a is None or array_api_compat.is_torch_array(a)
                                 for a in arrays)


def _same_float(*arrays: Any) -> bool:
    """Every array given has one floating dtype (torch's operators do not promote)."""
    present = [a for a in arrays if a is not None]
    return present[0].is_floating_point() and all(a.dtype == present[0].dtype for a in present)


def nchw(x: Any) -> Any:
    """An NHWC tensor as torch's NCHW (a ``channels_last`` view, no copy)."""
    return x.permute(0, 3, 1, 2)


def add_relu_(y: Any, addend: Any | None, relu: bool) -> Any:
    """``y + addend`` (None: ``y``), then the ReLU when ``relu``, in place in ``y`` (``addend``
    broadcastable to it). On a CPU the sum and the ReLU are one pass (``aten._add_relu_``, which
    torch has for CPU tensors only: measured 0.30 -> 0.17 ms on 64x32x32x16); the same values
    as the add and the ReLU apart."""
    if addend is None:
        return y.relu_() if relu else y
    if relu and y.is_cpu:
        return _aten()._add_relu_(y, addend)
    y = y.add_(addend)
    return y.relu_() if relu else y


def nhwc(y: Any) -> Any:
    """An NCHW result as NHWC-contiguous (a view of torch's ``channels_last`` output; a copy
    only when torch wrote another layout)."""
    return y.permute(0, 2, 3, 1).contiguous()


# --------------------------------------------------------------------------------------------
# Convolution


def _torch_weight(weight: Any) -> Any:
    """anycnn's ``(kh, kw, C_in/groups, C_out)`` weight as torch's ``(C_out, C_in/groups, kh, kw)``
    (a view)."""
    return weight.permute(3, 2, 0, 1)


def _conv_geometry(win: Any) -> tuple[list[int], tuple[int, int, int, int] | None] | None:
    """``(padding, explicit)`` of a convolution's windows for torch: the symmetric padding it
    passes to the operator, and the (top, bottom, left, right) padding to apply first when the
    pads are asymmetric (else None); None for windows that are not a plain convolution's."""
    if win.pool_order is not None or win.kernel_first:
        return None
    top, bottom, left, right = win.pads
    if top == bottom and left == right:
        return [top, left], None
    return [0, 0], (top, bottom, left, right)


def _pad(x: Any, explicit: tuple[int, int, int, int] | None, value: float = 0.0) -> Any:
    """NCHW ``x`` padded by (top, bottom, left, right) (None: unchanged)."""
    if explicit is None:
        return x
    top, bottom, left, right = explicit
    return _aten().constant_pad_nd(x, [left, right, top, bottom], value)


def _conv_nchw(x: Any, weight: Any, bias: Any, win: Any, groups: int, geometry) -> Any:
    padding, explicit = geometry
    return _aten().convolution(_pad(nchw(x), explicit), _torch_weight(weight), bias,
                               list(win.stride), padding, list(win.dilation), False, [0, 0],
                               groups)


def _conv_applies(x: Any, weight: Any, bias: Any, groups: int, *more: Any) -> bool:
    return (takes(x, weight, bias, *more) and x.ndim == 4 and weight.ndim == 4
            and _same_float(x, weight, bias, *more) and x.shape[3] == weight.shape[2] * groups
            and weight.shape[3] % groups == 0)


@implements("conv2d")
def conv2d(x: Any, weight: Any, bias: Any, win: Any, groups: int) -> Any:
    """Kernel of :func:`anycnn.nn.functional.conv.conv2d_forward`: ``(N, Ho, Wo, C_out)``."""
    geometry = _conv_geometry(win)
    if geometry is None or not _conv_applies(x, weight, bias, groups):
        return DECLINE
    return nhwc(_conv_nchw(x, weight, bias, win, groups, geometry))


@implements("conv2d_epilogue")
def conv2d_epilogue(x: Any, weight: Any, bias: Any, win: Any, groups: int, addend: Any,
                    relu: bool) -> Any:
    """Kernel of :func:`anycnn.nn.functional.conv.conv2d_forward` with an epilogue (eval
    mode's fused ``ConvReLU`` and a residual body's last convolution, folded or not):
    ``relu(conv(x) + bias + addend)`` ``(N, Ho, Wo, C_out)``, the ReLU only with ``relu`` and
    ``addend`` (NHWC, the output's shape) optional; the convolution's new output takes the sum
    and the ReLU in place."""
    geometry = _conv_geometry(win)
    if geometry is None or not _conv_applies(x, weight, bias, groups, addend):
        return DECLINE
    y = _conv_nchw(x, weight, bias, win, groups, geometry)
    if addend is not None:
        if tuple(addend.shape) != (y.shape[0], y.shape[2], y.shape[3], y.shape[1]):
            return DECLINE
        addend = nchw(addend)
    return nhwc(add_relu_(y, addend, relu))


@implements("conv2d_backward")
def conv2d_backward(dy: Any, x: Any, weight: Any, win: Any, groups: int, need_input_grad: bool,
                    bias_grad: bool, addend: Any = None) -> Any:
    """Kernel of :func:`anycnn.nn.functional.conv.conv2d_grads`: ``(dx or None, dweight,
    dbias or None)`` for the output gradient ``dy`` (N, Ho, Wo, C_out); ``dx`` plus ``addend``
    when one is given (the input gradient is then always computed)."""
    geometry = _conv_geometry(win)
    if (geometry is None or not _conv_applies(x, weight, None, groups, dy, addend)
            or dy.ndim != 4):
        return DECLINE
    padding, explicit = geometry
    need_input_grad = need_input_grad or addend is not None
    cout = weight.shape[3]
    # a contiguous weight: torch's fallback convolution (small shapes) allocates the weight
    # gradient like the weight and refuses a strided one ("grad_weight must be contiguous")
    dx, dweight, dbias = _aten().convolution_backward(
        nchw(dy), _pad(nchw(x), explicit), _torch_weight(weight).contiguous(),
        [cout] if bias_grad else None,
        list(win.stride), padding, list(win.dilation), False, [0, 0], groups,
        [need_input_grad, True, bias_grad])
    if need_input_grad:
        if explicit is not None:  # the gradient of the padded input: its interior
            top, _, left, _ = explicit
            h, w = win.in_hw
            dx = dx[:, :, top:top + h, left:left + w]
        dx = nhwc(dx)
        if addend is not None:
            dx = dx.add_(addend)  # dx is a new tensor
    return (dx if need_input_grad else None), dweight.permute(2, 3, 1, 0).contiguous(), (
        dbias if bias_grad else None)


class PooledBlock(NamedTuple):
    """What a fused block computed by :func:`conv2d_relu_maxpool` keeps for its gradient: the
    convolution's output (NCHW view), the maxima's indices, the block's output (NHWC) and the
    pooling window. ``shape`` is the block's output shape (what :mod:`anycnn.nn.fusion`
    reshapes the incoming gradient to)."""

    conv_out: Any
    indices: Any
    out: Any
    window: tuple[int, int]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.out.shape)


@implements("conv2d_relu_maxpool")
def conv2d_relu_maxpool(x: Any, weight: Any, bias: Any, win: Any, window: tuple[int, int]) -> Any:
    """Kernel of a fused ``Conv2D → ReLU → MaxPool2D`` block whose ``window`` pools tile the
    convolution's output (unpadded, stride equal to the window): ``(out, code)``, ``out`` =
    ``relu(maxpool(conv(x)) + bias)`` (the same as the layers: adding the bias and the ReLU
    commute with the maximum) and ``code`` a :class:`PooledBlock`."""
    geometry = _conv_geometry(win)
    if geometry is None or not _conv_applies(x, weight, bias, 1):
        return DECLINE
    conv_out = _conv_nchw(x, weight, None, win, 1, geometry)
    window = [int(window[0]), int(window[1])]
    pooled, indices = _aten().max_pool2d_with_indices(conv_out, window, window, [0, 0], [1, 1],
                                                      False)
    out = nhwc(add_relu_(pooled, None if bias is None else bias.reshape(1, -1, 1, 1), True))
    return out, PooledBlock(conv_out, indices, out, tuple(window))


@implements("pooled_gradient")
def pooled_gradient(grad: Any, code: Any, window: tuple[int, int],
                    bias_grad: bool = False) -> Any:
    """``(dconv, dbias)`` when ``code`` is a :class:`PooledBlock`: the gradient ``dconv``
    ``(N, H, W, C_out)`` of a fused block's convolution output, for the gradient ``grad`` of
    the block's output (through the ReLU, then to each window's maximum), and with
    ``bias_grad`` the bias gradient ``dbias`` (C_out,) summed from the gradient masked
    through the ReLU (one mask for both: measured 0.3 ms less per simple-cnn block than the
    ReLU's column sums on their own), else None."""
    if not isinstance(code, PooledBlock):
        return DECLINE
    aten = _aten()
    through_relu = aten.threshold_backward(grad, code.out, 0)
    dbias = through_relu.reshape(-1, through_relu.shape[-1]).sum(0) if bias_grad else None
    w = list(code.window)
    return nhwc(aten.max_pool2d_with_indices_backward(
        nchw(through_relu), code.conv_out, w, w, [0, 0], [1, 1], False, code.indices)), dbias


# --------------------------------------------------------------------------------------------
# Pooling


def _pool_size(size: int, kernel: int, stride: int, pad: int, ceil: bool) -> int:
    """torch's pooling output size along one axis."""
    out = (size + 2 * pad - kernel + (stride - 1 if ceil else 0)) // stride + 1
    if ceil and (out - 1) * stride >= size + pad:
        out -= 1
    return out


class PoolSpec(NamedTuple):
    """A pooling window geometry as torch's operators take it."""

    kernel: list[int]
    stride: list[int]
    padding: list[int]
    ceil_mode: bool


def pool_spec(win: Any) -> PoolSpec | None:
    """The torch pooling parameters giving exactly ``win``'s windows (anycnn's pooling windows:
    kernel-major, undilated, the top/left padding at most half the kernel, the bottom/right
    padding extended for ceil mode), or None when torch cannot express them."""
    if not win.kernel_first or win.pool_order is not None or tuple(win.dilation) != (1, 1):
        return None
    padding = [win.pads[0], win.pads[2]]
    if any(p > k // 2 for p, k in zip(padding, win.kernel)) or win.pads[1] < win.pads[0] or (
            win.pads[3] < win.pads[2]):
        return None
    for ceil in (False, True):
        if all(_pool_size(win.in_hw[i], win.kernel[i], win.stride[i], padding[i], ceil)
               == win.out[i] for i in range(2)):
            return PoolSpec(list(win.kernel), list(win.stride), padding, ceil)
    return None


class PoolState(NamedTuple):
    """What a pooling kernel keeps for its backward: its input (NCHW view: torch's backward
    operators take its shape and layout), the maxima's indices (None for average pooling),
    the parameters and, for average pooling, ``count_include_pad``."""

    x: Any
    indices: Any
    spec: PoolSpec
    count_include_pad: bool = True


def _pool_applies(x: Any, win: Any) -> PoolSpec | None:
    if not takes(x) or x.ndim != 4 or not x.is_floating_point():
        return None
    return pool_spec(win)


@implements("max_pool2d")
def max_pool2d(x: Any, win: Any) -> Any:
    """Kernel of :func:`anycnn.nn.functional.pool.max_pool2d_forward`: ``(y, state)`` (a
    :class:`PoolState`); ties go to the first maximum in row-major window order, as in the
    portable path."""
    spec = _pool_applies(x, win)
    if spec is None:
        return DECLINE
    xc = nchw(x)
    y, indices = _aten().max_pool2d_with_indices(xc, spec.kernel, spec.stride, spec.padding,
                                                 [1, 1], spec.ceil_mode)
    return nhwc(y), PoolState(xc, indices, spec)


@implements("max_pool2d_backward")
def max_pool2d_backward(dy: Any, state: Any, win: Any) -> Any:
    """Input gradient of :func:`max_pool2d` from its ``state``."""
    if not isinstance(state, PoolState) or state.indices is None:
        return DECLINE
    s = state.spec
    return nhwc(_aten().max_pool2d_with_indices_backward(
        nchw(dy), state.x, s.kernel, s.stride, s.padding, [1, 1], s.ceil_mode, state.indices))


@implements("avg_pool2d")
def avg_pool2d(x: Any, win: Any, count_include_pad: bool) -> Any:
    """Kernel of :func:`anycnn.nn.functional.pool.avg_pool2d_forward`: ``(y, state)`` (a
    :class:`PoolState`); torch divides by the window sizes anycnn does (PyTorch's rule)."""
    spec = _pool_applies(x, win)
    if spec is None:
        return DECLINE
    xc = nchw(x)
    y = _aten().avg_pool2d(xc, spec.kernel, spec.stride, spec.padding, spec.ceil_mode,
                           bool(count_include_pad), None)
    return nhwc(y), PoolState(xc, None, spec, bool(count_include_pad))


@implements("avg_pool2d_backward")
def avg_pool2d_backward(dy: Any, state: Any, win: Any) -> Any:
    """Input gradient of :func:`avg_pool2d` from its ``state``."""
    if not isinstance(state, PoolState) or state.indices is not None:
        return DECLINE
    s = state.spec
    return nhwc(_aten().avg_pool2d_backward(nchw(dy), state.x, s.kernel, s.stride, s.padding,
                                            s.ceil_mode, state.count_include_pad, None))


# --------------------------------------------------------------------------------------------
# BatchNorm


def _channels_second(x: Any) -> Any:
    """NHWC as NCHW (a view); (N, C) rows as they are."""
    return nchw(x) if x.ndim == 4 else x


def _channels_last(y: Any) -> Any:
    return nhwc(y) if y.ndim == 4 else y


@implements("batch_norm")
def batch_norm(x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any,
               training: bool, momentum: float, eps: float, relu: bool = False,
               addend: Any = None) -> Any:
    """Kernel of :func:`anycnn.nn.functional.norm.batch_norm_forward` without synchronised
    statistics, for ``x`` NHWC or (N, C): ``(y, mean, inv_std, new_running_mean,
    new_running_var)`` with ``y`` shaped as ``x`` (plus ``addend``, then the ReLU when
    ``relu``), ``mean`` and ``inv_std`` (C,) those ``y`` was normalised with. The running
    statistics are updated on copies (torch's operator updates them in place)."""
    if (not takes(x, gamma, beta, running_mean, running_var, addend) or x.ndim not in (2, 4)
            or momentum is None or not _same_float(x, gamma, beta, running_mean, running_var,
                                                   addend)):
        return DECLINE
    aten = _aten()
    if training:
        running_mean, running_var = running_mean.clone(), running_var.clone()
        y, mean, inv_std = aten.native_batch_norm(_channels_second(x), gamma, beta,
                                                  running_mean, running_var, True,
                                                  float(momentum), float(eps))
    else:
        y, _, _ = aten.native_batch_norm(_channels_second(x), gamma, beta, running_mean,
                                         running_var, False, float(momentum), float(eps))
        mean, inv_std = running_mean, 1.0 / _torch().sqrt(running_var + eps)
    y = add_relu_(_channels_last(y), addend, relu)
    return y, mean, inv_std, running_mean, running_var


@implements("batch_norm_backward")
def batch_norm_backward(dy: Any, out: Any, x: Any, mean: Any, inv_std: Any, gamma: Any,
                        training: bool, affine: Any = None) -> Any:
    """Kernel of :func:`anycnn.nn.functional.norm.batch_norm_backward` without synchronised
    statistics: ``(dx, dgamma, dbeta)`` for ``dy`` (NHWC or (N, C)), the input ``x`` and, when
    a ReLU was fused, its output ``out`` (both any shape of ``dy``'s size), and the ``mean`` and
    ``inv_std`` the forward normalised with. In eval mode ``dx = g * gamma * inv_std``.
    ``affine`` (the forward's gamma and beta, another kernel's way to the ReLU's mask) is not
    needed: ``out`` is read."""
    if (not takes(dy, out, x, mean, inv_std, gamma) or dy.ndim not in (2, 4)
            or not _same_float(dy, out, x, mean, inv_std, gamma)):
        return DECLINE
    aten = _aten()
    g = dy if out is None else aten.threshold_backward(dy, out.reshape(dy.shape), 0)
    dx, dgamma, dbeta = aten.native_batch_norm_backward(
        _channels_second(g), _channels_second(x.reshape(dy.shape)), gamma, None, None, mean,
        inv_std, True, 0.0, [bool(training), True, True])
    dx = _channels_last(dx) if training else g * (gamma * inv_std)
    return dx, dgamma, dbeta


# --------------------------------------------------------------------------------------------
# Elementwise


@implements("relu_grad")
def relu_grad(y: Any, dy: Any) -> Any:
    """Kernel of :func:`anycnn.nn.functional.primitives.relu_grad` for same-shaped tensors:
    ``dy`` where ``y > 0``, else 0, in one pass."""
    if not takes(y, dy) or y.shape != dy.shape or not _same_float(y, dy):
        return DECLINE
    return _aten().threshold_backward(dy, y, 0)


@implements("add_relu")
def add_relu(x: Any, y: Any, relu: bool = True) -> Any:
    """Kernel of :func:`anycnn.nn.functional.primitives.add_relu` for same-shaped tensors: the
    sum and the ReLU (one pass on a CPU, :func:`add_relu_`)."""
    if not takes(x, y) or x.shape != y.shape or not _same_float(x, y):
        return DECLINE
    if relu and x.is_cpu:
        return _aten()._add_relu(x, y)  # one pass (see add_relu_)
    out = _torch().add(x, y)
    return out.relu_() if relu else out
