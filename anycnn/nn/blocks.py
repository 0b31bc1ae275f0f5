"""Building blocks of the mobile and modern networks, with torchvision's structure and tensor
names (so a torchvision ``state_dict`` maps onto them name for name):

- :func:`conv_norm_act`: convolution → BatchNorm → activation as a ``Sequential``
  (torchvision's ``Conv2dNormActivation``: tensors ``0.weight``, ``1.running_mean``, ...);
- :class:`SqueezeExcitation`: channel attention (Hu et al., 2018), torchvision's
  ``ops.SqueezeExcitation`` (tensors ``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ``fc2.bias``).

Activations are NHWC; both are written as forward-only code, so their backward is derived.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from .layers import AdaptiveAvgPool2D, BatchNorm2D, Conv2D, ReLU, Sigmoid
from .module import Module
from .sequential import Sequential


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                  groups: int = 1, activation: Callable[[], Module] | None = ReLU,
                  eps: float = 1e-5, momentum: float = 0.1, dilation: int = 1,
                  weight_init: Any = "he_uniform", dtype: str = "float32") -> Sequential:
    """``Sequential(Conv2D (no bias, "same"-style padding (k-1)//2 * dilation), BatchNorm2D,
    activation())``; ``activation=None`` leaves the activation out (a linear projection).
    ``eps`` and ``momentum`` are the BatchNorm's (PyTorch semantics), ``weight_init`` the
    convolution's initializer."""
    if kernel_size % 2 != 1:
        raise ConfigError(f"conv_norm_act needs an odd kernel_size, got {kernel_size}")
    padding = (kernel_size - 1) // 2 * dilation
    layers: list[Module] = [
        Conv2D(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
               dilation=dilation, groups=groups, bias=False, weight_init=weight_init,
               dtype=dtype),
        BatchNorm2D(out_channels, eps=eps, momentum=momentum, dtype=dtype)]
    if activation is not None:
        layers.append(activation())
    return Sequential(*layers)


class SqueezeExcitation(Module):
    """Squeeze-and-excitation: ``x * gate(fc2(act(fc1(mean over H, W of x))))`` per channel.

    Args:
        channels: C of the input (and output).
        squeeze_channels: width of the bottleneck between ``fc1`` and ``fc2`` (1x1
            convolutions with bias).
        activation: the bottleneck's activation class (default :class:`ReLU`; EfficientNet
            uses ``SiLU``).
        scale_activation: the gate (default :class:`Sigmoid`; MobileNetV3 uses
            ``Hardsigmoid``).

    Shapes: ``(N, H, W, C)`` → ``(N, H, W, C)``.
    """

    def __init__(self, channels: int, squeeze_channels: int,
                 activation: Callable[[], Module] = ReLU,
                 scale_activation: Callable[[], Module] = Sigmoid,
                 dtype: str = "float32") -> None:
        self.avgpool = AdaptiveAvgPool2D(1)
        self.fc1 = Conv2D(channels, squeeze_channels, 1, dtype=dtype,
                          weight_init="torch_default", bias_init="torch_default")
        self.fc2 = Conv2D(squeeze_channels, channels, 1, dtype=dtype,
                          weight_init="torch_default", bias_init="torch_default")
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x: Any) -> Any:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * scale
