"""Layers: parameters plus a one-line call into :mod:`anycnn.nn.functional`.

Activations are NHWC ``(N, H, W, C)``. ``Conv2D.weight`` is ``(kh, kw, in/groups, out)``,
``ConvTranspose2D.weight`` is ``(kh, kw, in, out/groups)``, ``Dense.weight`` is ``(in, out)``;
norm layers have ``(C,)`` weight and bias. Options follow PyTorch (``stride``, ``padding``,
``dilation``, ``groups``, ``output_padding``, ``ceil_mode``, ``count_include_pad``, BatchNorm
``momentum``), so results can be compared with it.

Parameters are created on the current backend (:func:`anycnn.get_backend`) in ``dtype``
(float32 by default) from host draws of :mod:`anycnn.random`, so a seed gives identical weights on
every backend. Computation follows the dtype of inputs and parameters.

The branching containers
:class:`~anycnn.nn.containers.Residual`, :class:`~anycnn.nn.containers.Concat`
and :class:`~anycnn.nn.containers.Identity` are importable from here too.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from array_api_compat import device

from ..backend import dtype_name, namespace_of
from ..errors import ConfigError, ShapeError
from ..random import default_generator
from . import functional as F
from .containers import Concat, Identity, ModuleList, Residual  # noqa: F401 - re-exported
from .geometry import as_pair, conv_padding
from .init import get_initializer
from .module import Module, Parameter, check_addend, make_array, spatial_size

# --------------------------------------------------------------------------------------------
# Input checks shared by the layers


#: the (namespace, dtype) pairs found real floating: ``isdtype`` is asked once per pair, not
#: on every layer's every call
_FLOATING: set[tuple[Any, Any]] = set()


def check_float_input(layer: Module, x: Any, ndim: int, what: str) -> Any:
    """Check rank and floating dtype of ``x``; return its namespace."""
    xp = namespace_of(x)
    if x.ndim != ndim:
        raise ShapeError(f"{type(layer).__name__} expects a {ndim}-D {what} input, got shape "
                         f"{tuple(x.shape)}")
    key = (xp, x.dtype)
    if key not in _FLOATING:
        if not xp.isdtype(x.dtype, "real floating"):
            raise ShapeError(f"{type(layer).__name__} expects a floating-point input, got "
                             f"dtype {x.dtype}")
        _FLOATING.add(key)
    return xp


def check_channels(layer: Module, x: Any, expected: int, what: str = "channels") -> None:
    if x.shape[-1] != expected:
        raise ShapeError(
            f"{type(layer).__name__} expects {expected} {what} on the last axis, "
            f"got input shape {tuple(x.shape)} (activations are NHWC)")


def check_windows(layer: Module, x: Any, win: F.Windows) -> None:
    if min(win.out) < 1:
        raise ShapeError(
            f"{type(layer).__name__}: input of spatial size {tuple(x.shape[1:3])} is too small "
            f"for kernel {win.kernel} (dilation {win.dilation}, padding {win.pads})")


def check_param_dtype(layer: Module, x: Any, param: Any) -> None:
    """Refuse a float input whose dtype differs from the layer's parameters (torch would raise
    deep inside a matmul, NumPy would silently promote and later retype the weights)."""
    if type(x) is not type(param):
        namespace_of(x, param)  # two backends: report that, not their (incomparable) dtypes
    if x.dtype != param.dtype:
        namespace_of(x, param)  # two devices is the more basic mistake: report it first
        raise ShapeError(
            f"{type(layer).__name__} has {dtype_name(param)} parameters but got a "
            f"{dtype_name(x)} input; cast the input or the model (model.to({dtype_name(x)!r}))")


def gemm_flops(weight: Parameter, output_shape: tuple[int, ...]) -> int:
    """Forward FLOPs of a layer whose every output position (all axes but the last) is one
    matrix-vector product with ``weight``: 2 multiply-add FLOPs per weight element each."""
    return 2 * math.prod(weight.shape) * math.prod(output_shape[:-1])


def check_groups(layer: Module, in_channels: int, out_channels: int, groups: Any) -> int:
    """``groups`` as an int, after checking that it divides both channel counts."""
    if not isinstance(groups, int | np.integer) or isinstance(groups, bool) or groups < 1:
        raise ConfigError(f"{type(layer).__name__}: groups must be an int >= 1, got {groups!r}")
    groups = int(groups)
    bad = [f"{name} ({count})" for name, count in (("in_channels", in_channels),
                                                   ("out_channels", out_channels))
           if count % groups]
    if bad:
        raise ConfigError(f"{type(layer).__name__}: {' and '.join(bad)} must be divisible by "
                          f"groups ({groups})")
    return groups


def kernel_parameters(shape: tuple[int, ...], out_channels: int, fan_in: int, fan_out: int,
                      bias: bool, weight_init, bias_init, dtype: str,
                      rng: np.random.Generator | None) -> tuple[Parameter, Parameter | None]:
    """A convolution's ``weight`` of ``shape`` and (if ``bias``) its ``(out_channels,)`` bias,
    drawn in that order from ``rng`` (default: the global generator) by the initializers."""
    rng = rng or default_generator()
    weight = Parameter(make_array(get_initializer(weight_init)(shape, fan_in, fan_out, rng),
                                  dtype))
    bias_param = Parameter(make_array(
        get_initializer(bias_init)((out_channels,), fan_in, fan_out, rng), dtype)
    ) if bias else None
    return weight, bias_param


def _require_forward(layer: Module, ctx: Any) -> Any:
    if ctx is None:
        raise RuntimeError(f"{type(layer).__name__}.backward called before forward")
    return ctx


# --------------------------------------------------------------------------------------------
# Layers with parameters


class Conv2D(Module):
    """2-D convolution over NHWC input.

    Args:
        in_channels, out_channels: C_in and C_out.
        kernel_size, stride, dilation: int or (h, w) pair.
        padding: int, (h, w), ``'valid'`` or ``'same'`` (stride 1; extra bottom/right for even
            kernels), as in PyTorch.
        bias: learn a per-output-channel bias.
        groups: split the channels into this many groups convolved separately, as in PyTorch
            (both channel counts must be divisible by it; output channels
            ``g*C_out/groups ... (g+1)*C_out/groups - 1`` see input group ``g``).
            ``groups == in_channels`` is a depthwise convolution.
        weight_init / bias_init: initializer names or callables (default He-uniform / zeros).
        dtype: parameter dtype (default float32).

    Shapes: ``(N, H, W, C_in)`` → ``(N, Ho, Wo, C_out)``; ``weight`` is
    ``(kh, kw, C_in/groups, C_out)`` (PyTorch's is ``(C_out, C_in/groups, kh, kw)``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, weight_init="he_uniform", bias_init="zeros",
                 dtype: str = "float32", rng: np.random.Generator | None = None,
                 groups: int = 1) -> None:
        self.in_channels = as_pair(in_channels, "in_channels")[0]
        self.out_channels = as_pair(out_channels, "out_channels")[0]
        self.groups = check_groups(self, self.in_channels, self.out_channels, groups)
        self.kernel_size = as_pair(kernel_size, "kernel_size")
        self.stride = as_pair(stride, "stride")
        self.dilation = as_pair(dilation, "dilation")
        self.padding = padding
        self.pads = conv_padding(padding, self.kernel_size, self.stride, self.dilation)
        kh, kw = self.kernel_size
        self.weight, self.bias = kernel_parameters(
            (kh, kw, self.in_channels // self.groups, self.out_channels), self.out_channels,
            kh * kw * self.in_channels // self.groups, kh * kw * self.out_channels, bias,
            weight_init, bias_init, dtype, rng)
        self._ctx = None

    def check_input(self, x) -> None:
        """Raise ShapeError unless ``x`` is float NHWC with ``in_channels`` and big enough."""
        check_float_input(self, x, 4, "NHWC")
        check_channels(self, x, self.in_channels)
        check_param_dtype(self, x, self.weight.data)
        win = F.conv_windows(tuple(x.shape[1:3]), self.kernel_size, self.stride, self.pads,
                             self.dilation)
        check_windows(self, x, win)

    #: what the last input that passed :meth:`check_input` was (:meth:`_checked_input`)
    _checked: tuple | None = None

    def _checked_input(self, x) -> None:
        """:meth:`check_input`, skipped when ``x`` is of the array type, shape and dtype of the
        last input that passed it and the parameters' type, dtype and the geometry have not
        changed since (every input of a forward loop, every step of training)."""
        w = self.weight.data
        seen = (type(x), x.shape, x.dtype, type(w), w.dtype, self.in_channels,
                self.kernel_size, self.stride, self.pads, self.dilation)
        if seen != self._checked:  # compared in order: dtypes only of one array type
            self.check_input(x)
            self._checked = seen

    def forward(self, x, relu: bool = False):
        """The convolution of ``x``; with ``relu``, ``max(., 0)`` of it in the same pass (a
        fused Conv2D → ReLU step of eval mode, :mod:`anycnn.nn.inference`; the backward is
        then the convolution's of the ReLU's gradient)."""
        return self._forward(x, None, relu)

    def forward_add(self, x, addend, relu: bool = False):
        """The convolution of ``x`` plus ``addend`` (then ``max(., 0)`` with ``relu``) in one
        pass: the end of a residual body (:meth:`Module.forward_add`); the compiled kernels
        start their sums from ``addend``."""
        return self._forward(x, addend, relu)

    def _forward(self, x, addend, relu: bool):
        self._checked_input(x)
        if addend is not None:
            check_addend((x.shape[0], *self.output_hw(tuple(x.shape[1:3])),
                          self.out_channels), addend)
        y, self._ctx = F.conv2d_forward(x, self.weight.data,
                                        self.bias.data if self.bias else None,
                                        self.stride, self.pads, self.dilation, self.groups,
                                        addend=addend, relu=relu)
        return y

    def output_hw(self, hw):
        return F.conv_windows(hw, self.kernel_size, self.stride, self.pads, self.dilation).out

    def flops(self, input_shape, output_shape):
        """2 x kh*kw*C_in*C_out multiply-adds (the weight's size) per output position."""
        return gemm_flops(self.weight, output_shape)

    def backward(self, dy, input_grad: bool = True):
        return self._backward(dy, input_grad, None)

    def backward_add(self, dy, addend):
        """The input gradient plus ``addend``: the compiled kernels start their sums from it
        (no separate pass over the activations)."""
        return self._backward(dy, True, addend)

    def _backward(self, dy, input_grad: bool, addend):
        ctx = _require_forward(self, self._ctx)
        dx, dw, db = F.conv2d_backward(dy, ctx, self.weight.data, input_grad,
                                       bias_grad=self.bias is not None, addend=addend)
        self.weight.accumulate(dw)
        if self.bias is not None:
            self.bias.accumulate(db)
        return dx

    def extra_repr(self):
        groups = f", groups={self.groups}" if self.groups != 1 else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding!r}, dilation={self.dilation}"
                f"{groups}")


class ConvTranspose2D(Module):
    """2-D transposed convolution over NHWC input (PyTorch's ``ConvTranspose2d``): the adjoint
    of a convolution's input gradient, which upsamples by ``stride``.

    Args:
        in_channels, out_channels: C_in and C_out.
        kernel_size, stride, dilation: int or (h, w) pair.
        padding: int or (h, w): ``dilation*(kernel_size-1) - padding`` zeros are added around
            the (stride-dilated) input, as in PyTorch.
        output_padding: int or (h, w) extra rows/columns at the bottom/right of the output;
            each must be smaller than the stride or the dilation of its axis.
        bias, weight_init, bias_init, dtype: as :class:`Conv2D`.
        groups: as :class:`Conv2D` (input group ``g`` feeds output group ``g``).

    Output size per axis: ``(H - 1)*stride - 2*padding + dilation*(kernel_size - 1) +
    output_padding + 1``. Shapes: ``(N, H, W, C_in)`` → ``(N, Ho, Wo, C_out)``; ``weight`` is
    ``(kh, kw, C_in, C_out/groups)``; PyTorch's ``ConvTranspose2d.weight`` is
    ``(C_in, C_out/groups, kh, kw)``, the same tensor permuted by ``(2, 3, 0, 1)`` (which is its
    own inverse).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 output_padding=0, dilation=1, bias: bool = True, weight_init="he_uniform",
                 bias_init="zeros", dtype: str = "float32",
                 rng: np.random.Generator | None = None, groups: int = 1) -> None:
        self.in_channels = as_pair(in_channels, "in_channels")[0]
        self.out_channels = as_pair(out_channels, "out_channels")[0]
        self.groups = check_groups(self, self.in_channels, self.out_channels, groups)
        self.kernel_size = as_pair(kernel_size, "kernel_size")
        self.stride = as_pair(stride, "stride")
        self.padding = as_pair(padding, "padding", minimum=0)
        self.output_padding = as_pair(output_padding, "output_padding", minimum=0)
        self.dilation = as_pair(dilation, "dilation")
        if any(op >= s and op >= d for op, s, d in zip(self.output_padding, self.stride,
                                                        self.dilation)):
            raise ConfigError(
                f"ConvTranspose2D output_padding {self.output_padding} must be smaller than "
                f"the stride {self.stride} or the dilation {self.dilation} on each axis")
        kh, kw = self.kernel_size
        self.weight, self.bias = kernel_parameters(
            (kh, kw, self.in_channels, self.out_channels // self.groups), self.out_channels,
            kh * kw * self.in_channels // self.groups, kh * kw * self.out_channels, bias,
            weight_init, bias_init, dtype, rng)
        self._ctx = None

    def _windows(self, hw) -> F.Windows:
        return F.conv_transpose_windows(tuple(hw), self.kernel_size, self.stride, self.padding,
                                        self.output_padding, self.dilation)

    def output_hw(self, hw):
        return self._windows(hw).in_hw

    def flops(self, input_shape, output_shape):
        """2 x kh*kw*C_in*C_out/groups multiply-adds (the weight's size) per *input* position:
        each input pixel is spread over a kernel-sized patch of the output."""
        return gemm_flops(self.weight, input_shape)

    def forward(self, x):
        check_float_input(self, x, 4, "NHWC")
        check_channels(self, x, self.in_channels)
        check_param_dtype(self, x, self.weight.data)
        win = self._windows(x.shape[1:3])
        if min(win.in_hw) < 1:
            raise ShapeError(
                f"ConvTranspose2D: input of spatial size {tuple(x.shape[1:3])} gives an output "
                f"of size {win.in_hw} (padding {self.padding} too large for kernel "
                f"{self.kernel_size})")
        y, self._ctx = F.conv_transpose2d_forward(x, self.weight.data,
                                                  self.bias.data if self.bias else None, win,
                                                  self.groups)
        return y

    def backward(self, dy, input_grad: bool = True):
        ctx = _require_forward(self, self._ctx)
        dx, dw, db = F.conv_transpose2d_backward(dy, ctx, self.weight.data, input_grad,
                                                 self.bias is not None)
        self.weight.accumulate(dw)
        if self.bias is not None:
            self.bias.accumulate(db)
        return dx

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, "
                f"output_padding={self.output_padding}, dilation={self.dilation}"
                + (f", groups={self.groups}" if self.groups != 1 else ""))


class Dense(Module):
    """Fully connected layer ``y = x @ weight + bias``; ``weight`` is ``(in, out)``.

    Applies to the last axis of any input (as PyTorch's ``Linear``): ``(..., in_features)`` →
    ``(..., out_features)``, e.g. ``(N, in)`` → ``(N, out)``, or a channel MLP on NHWC
    activations ``(N, H, W, in)`` → ``(N, H, W, out)`` with no reshape. Defaults: He-uniform
    weight, zero bias.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 weight_init="he_uniform", bias_init="zeros", dtype: str = "float32",
                 rng: np.random.Generator | None = None) -> None:
        self.in_features = as_pair(in_features, "in_features")[0]
        self.out_features = as_pair(out_features, "out_features")[0]
        rng = rng or default_generator()
        shape = (self.in_features, self.out_features)
        self.weight = Parameter(make_array(get_initializer(weight_init)(
            shape, self.in_features, self.out_features, rng), dtype))
        self.bias = Parameter(make_array(get_initializer(bias_init)(
            (self.out_features,), self.in_features, self.out_features, rng), dtype)
        ) if bias else None
        self._x = None
        self._lead: tuple[int, ...] = ()

    def forward(self, x, relu: bool = False):
        """``x @ weight + bias``; with ``relu``, ``max(., 0)`` of it in the same pass (a fused
        Dense → ReLU step of eval mode, :mod:`anycnn.nn.inference`; the backward is then the
        Dense's of the ReLU's gradient)."""
        xp = namespace_of(x)  # an array, first
        if x.ndim < 1:
            raise ShapeError(f"Dense expects an input with a features axis, got shape "
                             f"{tuple(x.shape)}")
        check_float_input(self, x, x.ndim, "(..., features)")
        check_channels(self, x, self.in_features, "features")
        check_param_dtype(self, x, self.weight.data)
        lead = tuple(x.shape[:-1])
        if len(lead) != 1:  # any rank: rows of features, then the leading axes back
            x = xp.reshape(x, (-1, self.in_features))
        y, self._x = F.linear_forward(x, self.weight.data, self.bias.data if self.bias else None,
                                      relu)
        self._lead = lead
        return y if len(lead) == 1 else xp.reshape(y, (*lead, self.out_features))

    def flops(self, input_shape, output_shape):
        """2 x in*out multiply-adds per row."""
        return gemm_flops(self.weight, output_shape)

    def backward(self, dy, input_grad: bool = True):
        x = _require_forward(self, self._x)
        lead = self._lead
        if len(lead) != 1:
            dy = namespace_of(dy).reshape(dy, (-1, self.out_features))
        dx, dw, db = F.linear_backward(dy, x, self.weight.data, input_grad)
        self.weight.accumulate(dw)
        if self.bias is not None:
            self.bias.accumulate(db)
        if dx is not None and len(lead) != 1:
            dx = namespace_of(dx).reshape(dx, (*lead, self.in_features))
        return dx

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class BatchNorm2D(Module):
    """Batch normalisation per channel of NHWC input (PyTorch semantics).

    Training normalises with the batch mean and biased variance and updates
    ``running_mean``/``running_var`` (unbiased variance) with ``momentum``; eval uses the running
    statistics. ``weight`` (gamma) starts at 1, ``bias`` (beta) at 0. Also accepts ``(N, C)``.

    ``sync``: None (default), or a communicator (:mod:`anycnn.dist`) whose ranks train one model
    data-parallel: training statistics are then those of the global batch, summed over the
    ranks (PyTorch's ``SyncBatchNorm``; three small allreduces per layer and step). Set it with
    :func:`anycnn.dist.sync_batchnorm`. Evaluation uses the running statistics, which are the
    same on every rank with ``sync``.
    """

    buffer_names = ("running_mean", "running_var")
    sync: Any = None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 dtype: str = "float32") -> None:
        self.num_features = as_pair(num_features, "num_features")[0]
        if not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"BatchNorm2D momentum must be in [0, 1], got {momentum}")
        if not eps > 0:
            raise ConfigError(f"BatchNorm2D eps must be > 0, got {eps}")
        self.eps, self.momentum = float(eps), float(momentum)
        c = self.num_features
        self.weight = Parameter(make_array(np.ones(c), dtype))
        self.bias = Parameter(make_array(np.zeros(c), dtype))
        self.running_mean = make_array(np.zeros(c), dtype)
        self.running_var = make_array(np.ones(c), dtype)
        self._ctx = None

    def forward(self, x, relu: bool = False):
        """Normalised ``x``; with ``relu``, ``max(., 0)`` of it in the same pass (a fused
        BatchNorm2D → ReLU run, :mod:`anycnn.nn.fusion`; backward then goes through both)."""
        return self._forward(x, relu, None)

    def forward_add(self, x, addend, relu: bool = False):
        """Normalised ``x`` plus ``addend`` (then ``max(., 0)`` with ``relu``) in one pass: the
        end of a residual body (:meth:`Module.forward_add`)."""
        check_addend(x.shape, addend)
        return self._forward(x, relu, addend)

    def check_input(self, x) -> None:
        """Raise ShapeError unless ``x`` is float NHWC or (N, C) with ``num_features``
        channels (and more than one value per channel in training)."""
        if x.ndim not in (2, 4):
            raise ShapeError(f"BatchNorm2D expects NHWC or (N, C) input, got {tuple(x.shape)}")
        check_float_input(self, x, x.ndim, "NHWC")
        check_channels(self, x, self.num_features)
        check_param_dtype(self, x, self.weight.data)
        if self.training and x.shape[0] * (x.shape[1] * x.shape[2] if x.ndim == 4 else 1) < 2:
            raise ShapeError("BatchNorm2D needs more than one value per channel in training")

    def _forward(self, x, relu: bool, addend):
        self.check_input(x)
        y, self._ctx, rm, rv = F.batch_norm_forward(
            x, self.weight.data, self.bias.data, self.running_mean, self.running_var,
            self.training, self.momentum, self.eps, reduce=self._reduce(), relu=relu,
            addend=addend)
        self.running_mean, self.running_var = rm, rv
        return y

    def output_hw(self, hw):
        return hw

    def backward(self, dy, input_grad: bool = True):
        ctx = _require_forward(self, self._ctx)
        dx, dgamma, dbeta = F.batch_norm_backward(
            dy, ctx, self.weight.data, reduce=self._reduce() if ctx.training else None)
        self.weight.accumulate(dgamma)
        self.bias.accumulate(dbeta)
        return dx

    def _reduce(self):
        """The sum over ranks of synchronised statistics in training, else None."""
        if self.sync is None or self.sync.size == 1 or not self.training:
            return None
        return self.sync.allreduce_

    def extra_repr(self):
        sync = f", sync={self.sync.name} x {self.sync.size}" if self.sync is not None else ""
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}{sync}"


class _ChannelNorm(Module):
    """Shared parts of :class:`GroupNorm` and :class:`LayerNorm`: per-sample statistics (the
    same in training and eval), optional per-channel ``weight`` (ones) and ``bias`` (zeros)."""

    def __init__(self, num_channels: int, eps: float, affine: bool, dtype: str) -> None:
        self.num_channels = as_pair(num_channels, "num_channels")[0]
        if not eps > 0:
            raise ConfigError(f"{type(self).__name__} eps must be > 0, got {eps}")
        self.eps = float(eps)
        c = self.num_channels
        self.weight = Parameter(make_array(np.ones(c), dtype)) if affine else None
        self.bias = Parameter(make_array(np.zeros(c), dtype)) if affine else None
        self._ctx = None

    def _check(self, x) -> None:
        if x.ndim not in (2, 4):
            raise ShapeError(f"{type(self).__name__} expects NHWC or (N, C) input, got shape "
                             f"{tuple(x.shape)}")
        check_float_input(self, x, x.ndim, "NHWC")
        check_channels(self, x, self.num_channels)
        if self.weight is not None:
            check_param_dtype(self, x, self.weight.data)

    def _affine(self):
        return (None, None) if self.weight is None else (self.weight.data, self.bias.data)

    def output_hw(self, hw):
        return hw

    def backward(self, dy, input_grad: bool = True):
        ctx = _require_forward(self, self._ctx)
        dx, dweight, dbias = F.norm_backward(dy, ctx, self._affine()[0])
        if self.weight is not None:
            self.weight.accumulate(dweight)
            self.bias.accumulate(dbias)
        return dx


class GroupNorm(_ChannelNorm):
    """Group normalisation of NHWC (or ``(N, C)``) input, as PyTorch's ``nn.GroupNorm``: each
    sample's C channels form ``num_groups`` consecutive groups, each normalised over its
    channels and all positions (biased variance, ``eps`` inside the square root), then scaled
    by ``weight`` and shifted by ``bias`` (both ``(C,)``, when ``affine``)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, dtype: str = "float32") -> None:
        groups = as_pair(num_groups, "num_groups")[0]
        if as_pair(num_channels, "num_channels")[0] % groups:
            raise ConfigError(f"GroupNorm: num_channels ({num_channels}) must be divisible by "
                              f"num_groups ({groups})")
        super().__init__(num_channels, eps, affine, dtype)
        self.num_groups = groups

    def forward(self, x):
        self._check(x)
        y, self._ctx = F.group_norm_forward(x, *self._affine(), self.num_groups, self.eps)
        return y

    def extra_repr(self):
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, "
                f"affine={self.weight is not None}")


class LayerNorm(_ChannelNorm):
    """Layer normalisation over the channel axis of NHWC (or ``(N, C)``) input: each
    position's C values are normalised on their own (ConvNeXt's LayerNorm; in PyTorch,
    ``nn.LayerNorm(C)`` applied to channels-last data), then scaled by ``weight`` and shifted
    by ``bias`` (both ``(C,)``, when ``affine``)."""

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 dtype: str = "float32") -> None:
        super().__init__(num_channels, eps, affine, dtype)

    def forward(self, x):
        self._check(x)
        y, self._ctx = F.layer_norm_forward(x, *self._affine(), self.eps)
        return y

    def extra_repr(self):
        return f"{self.num_channels}, eps={self.eps}, affine={self.weight is not None}"


# --------------------------------------------------------------------------------------------
# Pooling and reshaping


class _Pool2D(Module):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False) -> None:
        self.kernel_size = as_pair(kernel_size, "kernel_size")
        self.stride = as_pair(stride if stride is not None else kernel_size, "stride")
        self.padding = as_pair(padding, "padding", minimum=0)
        if any(p > k // 2 for p, k in zip(self.padding, self.kernel_size)):
            raise ConfigError(
                f"{type(self).__name__} padding {self.padding} must be at most half the kernel "
                f"size {self.kernel_size}")
        self.ceil_mode = bool(ceil_mode)
        self._ctx = None

    def _windows(self, x) -> F.Windows:
        check_float_input(self, x, 4, "NHWC")
        win = F.pool_windows(tuple(x.shape[1:3]), self.kernel_size, self.stride, self.padding,
                             self.ceil_mode)
        check_windows(self, x, win)
        return win

    def output_hw(self, hw):
        return F.pool_windows(hw, self.kernel_size, self.stride, self.padding, self.ceil_mode).out

    def extra_repr(self):
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, ceil_mode={self.ceil_mode}")


class MaxPool2D(_Pool2D):
    """Max pooling over NHWC input (padding counts as -inf; ties go to the first maximum)."""

    def forward(self, x):
        y, self._ctx = F.max_pool2d_forward(x, self._windows(x))
        return y

    def backward(self, dy, input_grad: bool = True):
        return F.max_pool2d_backward(dy, _require_forward(self, self._ctx))


class AvgPool2D(_Pool2D):
    """Average pooling over NHWC input; ``count_include_pad`` as in PyTorch."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True) -> None:
        super().__init__(kernel_size, stride, padding, ceil_mode)
        self.count_include_pad = bool(count_include_pad)

    def forward(self, x):
        y, self._ctx = F.avg_pool2d_forward(x, self._windows(x), self.count_include_pad)
        return y

    def backward(self, dy, input_grad: bool = True):
        return F.avg_pool2d_backward(dy, _require_forward(self, self._ctx))


class GlobalAvgPool2D(Module):
    """Mean over H and W: ``(N, H, W, C)`` → ``(N, C)``."""

    def __init__(self) -> None:
        self._shape = None

    def forward(self, x):
        check_float_input(self, x, 4, "NHWC")
        y, self._shape = F.global_avg_pool_forward(x)
        return y

    def backward(self, dy, input_grad: bool = True):
        return F.global_avg_pool_backward(dy, _require_forward(self, self._shape))


class AdaptiveAvgPool2D(Module):
    """Average pooling to a fixed output size, as PyTorch's ``nn.AdaptiveAvgPool2d``: output
    cell ``i`` of an axis of input size ``n`` and output size ``m`` averages input rows
    ``floor(i*n/m)`` to ``ceil((i+1)*n/m) - 1``.

    Args:
        output_size: int or (h, w) pair (``1``: the global average, keeping the 1x1 axes).

    Shapes: ``(N, H, W, C)`` → ``(N, oh, ow, C)``; any input size works.
    """

    def __init__(self, output_size=1) -> None:
        self.output_size = as_pair(output_size, "output_size")
        self._ctx = None

    def output_hw(self, hw):
        return self.output_size

    def forward(self, x):
        check_float_input(self, x, 4, "NHWC")
        y, self._ctx = F.adaptive_avg_pool_forward(x, self.output_size)
        return y

    def backward(self, dy, input_grad: bool = True):
        return F.adaptive_avg_pool_backward(dy, _require_forward(self, self._ctx))

    def extra_repr(self):
        return f"output_size={self.output_size}"


class Upsample2D(Module):
    """Upsampling of NHWC input by integer factors (PyTorch's ``nn.Upsample`` with
    ``scale_factor``; ``"bilinear"`` is ``align_corners=False``, edges clamped). No parameters.

    Args:
        scale_factor: int or (h, w) pair of ints >= 1 (integral floats such as 2.0 are accepted).
        mode: ``"nearest"`` (each pixel becomes a block) or ``"bilinear"``.

    Shapes: ``(N, H, W, C)`` → ``(N, H*sh, W*sw, C)``.
    """

    MODES = ("nearest", "bilinear")

    def __init__(self, scale_factor=2, mode: str = "nearest") -> None:
        pair = tuple(scale_factor) if isinstance(scale_factor, tuple | list) else (
            scale_factor, scale_factor)
        pair = tuple(int(v) if isinstance(v, float) and v.is_integer() else v for v in pair)
        try:
            self.scale_factor = as_pair(pair, "scale_factor")
        except ConfigError:
            raise ConfigError(f"Upsample2D scale_factor must be an integer >= 1 or a pair of "
                              f"them, got {scale_factor!r}") from None
        if mode not in self.MODES:
            raise ConfigError(f"Upsample2D mode must be one of {', '.join(self.MODES)}; "
                              f"got {mode!r}")
        self.mode = mode
        self._ctx = None

    def output_hw(self, hw):
        return hw[0] * self.scale_factor[0], hw[1] * self.scale_factor[1]

    def forward(self, x):
        check_float_input(self, x, 4, "NHWC")
        self._ctx = True
        if self.mode == "nearest":
            return F.upsample_nearest_forward(x, self.scale_factor)
        return F.upsample_bilinear_forward(x, self.scale_factor)

    def backward(self, dy, input_grad: bool = True):
        _require_forward(self, self._ctx)
        if self.mode == "nearest":
            return F.upsample_nearest_backward(dy, self.scale_factor)
        return F.upsample_bilinear_backward(dy, self.scale_factor)

    def extra_repr(self):
        return f"scale_factor={self.scale_factor}, mode={self.mode!r}"


class Flatten(Module):
    """``(N, ...)`` → ``(N, prod(...))`` in C order (for NHWC: h, then w, then channel)."""

    def __init__(self) -> None:
        self._shape = None

    def forward(self, x):
        xp = namespace_of(x)
        if x.ndim < 2:
            raise ShapeError(f"Flatten expects at least 2-D input, got shape {tuple(x.shape)}")
        self._shape = tuple(x.shape)
        return xp.reshape(x, (x.shape[0], -1))

    def backward(self, dy, input_grad: bool = True):
        return namespace_of(dy).reshape(dy, _require_forward(self, self._shape))


_MAX_SIDE = 1 << 14  # largest input side tried when explaining a Flatten → Dense mismatch


def explain_flatten_mismatch(layers: list[Module], failed: Module, model_input: Any) -> str:
    """The input image size a model expects, when ``failed`` (one of ``layers``, run in order on
    the NHWC ``model_input``) is a Dense that just got the wrong number of features from a
    Flatten before it (with only elementwise layers between). Returns text to append to the
    Dense's error, or "" when that is not the case. Only called when the error is raised.

    Example: "; after Flatten that is 8x8x64 = 4096 features from 32x32x1 input images, but
    this Dense expects 7x7x64 = 3136: the model expects 28x28x1 images (any size from 28x28 to
    31x31 fits)". The size comes from inverting the layers' :meth:`Module.output_hw` one axis
    at a time (output sizes never decrease with the input size); when the expected features
    factor into several grids, a square one is named first.
    """
    i = next((k for k, layer in enumerate(layers) if layer is failed), 0)
    j = i - 1
    while j >= 0 and isinstance(layers[j], _Elementwise):
        j -= 1
    flatten = layers[j] if j >= 0 else None
    if (not isinstance(failed, Dense) or not isinstance(flatten, Flatten)
            or flatten._shape is None or len(flatten._shape) != 4 or model_input.ndim != 4):
        return ""
    _, h, w, c = flatten._shape
    _, in_h, in_w, in_c = (int(n) for n in model_input.shape)
    text = (f"; after Flatten that is {h}x{w}x{c} = {h * w * c} features from "
            f"{in_h}x{in_w}x{in_c} input images")
    want, before = failed.in_features, layers[:j]
    if want % c:
        return f"{text}, but this Dense expects {want}, not a multiple of {c} channels"
    if spatial_size(before, (in_h, in_w)) != (h, w):  # a layer whose geometry is unknown
        return f"{text}, but this Dense expects {want}"
    positions = want // c
    divisors = [a for a in range(1, math.isqrt(positions) + 1) if positions % a == 0]
    pairs = {(a, positions // a) for a in divisors} | {(positions // a, a) for a in divisors}
    heights = _inverse(lambda n: spatial_size(before, (n, in_w)), 0)
    widths = _inverse(lambda n: spatial_size(before, (in_h, n)), 1)
    # Several (rows, columns) may multiply to the positions: try square first (most models
    # are built for square images), then the closest to the input's aspect ratio.
    for a, b in sorted(pairs, key=lambda p: (p[0] != p[1], abs(math.log(p[0] * w / (p[1] * h))),
                                             p)):
        rows, cols = heights(a), widths(b)
        if rows and cols:
            (h0, h1), (w0, w1) = rows, cols
            fits = f" (any size from {h0}x{w0} to {h1}x{w1} fits)" if (h0, w0) != (h1, w1) else ""
            return (f"{text}, but this Dense expects {a}x{b}x{c} = {want}: the model expects "
                    f"{h0}x{w0}x{in_c} images{fits}")
    return f"{text}, but this Dense expects {want} = {positions} positions x {c} channels"


def _inverse(size_after, axis: int):
    """For one axis: a function from an output side to the smallest and largest input side
    ``n`` with ``size_after(n)[axis]`` equal to it (or None). Output sides never decrease with
    ``n``, so the scan stops past the target; its results are kept for the next target."""
    outs: list[int | None] = []

    def sides_giving(target: int) -> tuple[int, int] | None:
        while len(outs) < _MAX_SIDE and (not outs or outs[-1] is None or outs[-1] <= target):
            hw = size_after(len(outs) + 1)
            outs.append(None if hw is None else hw[axis])
        sides = [n for n, out in enumerate(outs, 1) if out == target]
        return (sides[0], sides[-1]) if sides else None

    return sides_giving


# --------------------------------------------------------------------------------------------
# Activations and dropout


class _Elementwise(Module):
    """An activation whose forward returns ``(y, derivative)``."""

    def __init__(self) -> None:
        self._derivative = None

    def _apply(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def output_hw(self, hw):
        return hw

    def forward(self, x):
        xp = namespace_of(x)
        if not xp.isdtype(x.dtype, "real floating"):
            raise ShapeError(f"{type(self).__name__} expects a floating-point input, "
                             f"got dtype {x.dtype}")
        y, self._derivative = self._apply(x)
        return y

    def backward(self, dy, input_grad: bool = True):
        return F.elementwise_backward(dy, _require_forward(self, self._derivative))


class ReLU(_Elementwise):
    """``max(x, 0)``."""

    def _apply(self, x):
        return F.relu_forward(x)

    def backward(self, dy, input_grad: bool = True):
        return F.relu_backward(dy, _require_forward(self, self._derivative))


class LeakyReLU(_Elementwise):
    """``x`` where positive, else ``negative_slope * x``."""

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.negative_slope = float(negative_slope)

    def _apply(self, x):
        return F.leaky_relu_forward(x, self.negative_slope)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"


class Sigmoid(_Elementwise):
    """``1 / (1 + exp(-x))``, computed stably on both tails."""

    def _apply(self, x):
        return F.sigmoid_forward(x)


class Tanh(_Elementwise):
    """``tanh(x)``."""

    def _apply(self, x):
        return F.tanh_forward(x)


class Dropout(_Elementwise):
    """Inverted dropout: in training zero each value with probability ``p`` and scale the rest
    by ``1/(1-p)``; identity in eval. Masks come from the seeded host RNG."""

    def __init__(self, p: float = 0.5, rng: np.random.Generator | None = None) -> None:
        super().__init__()
        if not (isinstance(p, int | float) and 0.0 <= p < 1.0):
            raise ConfigError(f"Dropout p must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.rng = rng

    def _apply(self, x):
        if not self.training or self.p == 0.0:
            return x, 1.0
        rng = self.rng or default_generator()
        keep = (rng.random(tuple(x.shape)) >= self.p) * (1.0 / (1.0 - self.p))
        scale = namespace_of(x).asarray(keep.astype(dtype_name(x)), device=device(x))
        return x * scale, scale

    def extra_repr(self):
        return f"p={self.p}"


class StochasticDepth(_Elementwise):
    """Stochastic depth (Huang et al., 2016) for the residual branch of a block, as torchvision's
    ``StochasticDepth``: in training, each sample's branch (``mode="row"``) or the whole batch's
    (``"batch"``) is dropped with probability ``p`` and kept ones are scaled by ``1/(1-p)``;
    identity in eval. Apply it to the branch before the residual add. Masks come from the
    seeded host RNG (as :class:`Dropout`'s)."""

    MODES = ("row", "batch")

    def __init__(self, p: float, mode: str = "row",
                 rng: np.random.Generator | None = None) -> None:
        super().__init__()
        if not (isinstance(p, int | float) and 0.0 <= p <= 1.0):
            raise ConfigError(f"StochasticDepth p must be in [0, 1], got {p!r}")
        if mode not in self.MODES:
            raise ConfigError(f"StochasticDepth mode must be 'row' or 'batch', got {mode!r}")
        self.p, self.mode, self.rng = float(p), mode, rng

    def _apply(self, x):
        if not self.training or self.p == 0.0:
            return x, 1.0
        rng = self.rng or default_generator()
        rows = x.shape[0] if self.mode == "row" else 1
        keep = (rng.random(rows) >= self.p).astype(np.float64)
        if self.p < 1.0:
            keep /= 1.0 - self.p
        shape = (rows,) + (1,) * (x.ndim - 1)
        scale = namespace_of(x).asarray(keep.reshape(shape).astype(dtype_name(x)),
                                        device=device(x))
        return x * scale, scale

    def extra_repr(self):
        return f"p={self.p}, mode={self.mode!r}"
