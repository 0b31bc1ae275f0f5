"""ResNet-18, -34 and -50 for ImageNet-sized images (He et al., 2016), with torchvision's
structure and tensor names, so torchvision's weights load name for name (``conv1.weight``,
``layer1.0.bn1.running_mean``, ``layer2.0.downsample.0.weight``, ``fc.bias``).

The stem is a 7x7 stride-2 convolution, BatchNorm, ReLU and a 3x3 stride-2 max pool (input
``/4``); four stages of 64, 128, 256, 512 channels (times 4 for the bottleneck blocks of
ResNet-50) halve the size at the first block of stages 2-4 (in the 3x3 convolution of a
bottleneck: "ResNet v1.5"), then a global average and one Dense layer. The blocks are
forward-only modules (their backward is derived); any image size from 32x32 up works (224x224
is ImageNet's).
"""

from __future__ import annotations

from typing import Any

from ..backend import namespace_of
from ..nn.layers import AdaptiveAvgPool2D, BatchNorm2D, Conv2D, Dense, MaxPool2D, ReLU
from ..nn.module import Module
from ..nn.sequential import Sequential
from .backbone import Backbone, fan_out_normal


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1,
          weight_init: Any = fan_out_normal) -> Conv2D:
    return Conv2D(in_channels, out_channels, kernel, stride=stride, padding=(kernel - 1) // 2,
                  bias=False, weight_init=weight_init)


def _downsample(in_channels: int, out_channels: int, stride: int,
                weight_init: Any = fan_out_normal) -> Sequential | None:
    """The projection shortcut (1x1 convolution + BatchNorm) where a block changes shape."""
    if stride == 1 and in_channels == out_channels:
        return None
    return Sequential(_conv(in_channels, out_channels, 1, stride, weight_init),
                      BatchNorm2D(out_channels))


class BasicBlock(Module):
    """The ResNet basic block as code, with torchvision's names (``conv1``, ``bn1``, ``relu``
    called twice, ``conv2``, ``bn2``, ``downsample``):
    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, both convolutions 3x3, the
    first with ``stride``. ``weight_init``: the convolutions' initializer (torchvision's
    Kaiming normal over the fan-out by default)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1,
                 weight_init: Any = fan_out_normal) -> None:
        self.conv1 = _conv(in_channels, channels, 3, stride, weight_init)
        self.bn1 = BatchNorm2D(channels)
        self.relu = ReLU()
        self.conv2 = _conv(channels, channels, 3, 1, weight_init)
        self.bn2 = BatchNorm2D(channels)
        self.downsample = _downsample(in_channels, channels, stride, weight_init)

    def forward(self, x: Any) -> Any:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class Bottleneck(Module):
    """The ResNet bottleneck block (ResNet-50): 1x1 down to ``channels``, 3x3 (with
    ``stride``), 1x1 up to ``4 * channels``, each followed by BatchNorm, ReLU after the
    first two and after the residual sum. Names as torchvision's (``conv1`` to ``conv3``,
    ``bn1`` to ``bn3``, ``downsample``)."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        out_channels = channels * self.expansion
        self.conv1 = _conv(in_channels, channels, 1)
        self.bn1 = BatchNorm2D(channels)
        self.conv2 = _conv(channels, channels, 3, stride)
        self.bn2 = BatchNorm2D(channels)
        self.conv3 = _conv(channels, out_channels, 1)
        self.bn3 = BatchNorm2D(out_channels)
        self.relu = ReLU()
        self.downsample = _downsample(in_channels, out_channels, stride)

    def forward(self, x: Any) -> Any:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet(Backbone):
    """An ImageNet ResNet (see the module docstring).

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        blocks_per_stage: blocks in each of the four stages (ResNet-18: ``(2, 2, 2, 2)``).
        num_classes, in_channels: the head's classes and the input's channels.

    Shapes: ``(N, H, W, in_channels)`` → ``(N, num_classes)`` logits.
    """

    head = "fc"
    stage_paths = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))

    def __init__(self, block: type[BasicBlock] | type[Bottleneck],
                 blocks_per_stage: tuple[int, int, int, int], num_classes: int = 1000,
                 in_channels: int = 3) -> None:
        self.conv1 = Conv2D(in_channels, 64, 7, stride=2, padding=3, bias=False,
                            weight_init=fan_out_normal)
        self.bn1 = BatchNorm2D(64)
        self.relu = ReLU()
        self.maxpool = MaxPool2D(3, 2, padding=1)
        channels = 64
        for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), blocks_per_stage), 1):
            stride = 1 if stage == 1 else 2
            layers = []
            for i in range(blocks):
                layers.append(block(channels, width, stride if i == 0 else 1))
                channels = width * block.expansion
            setattr(self, f"layer{stage}", Sequential(*layers))
        self.avgpool = AdaptiveAvgPool2D(1)
        self.fc = Dense(channels, num_classes, weight_init="torch_default",
                        bias_init="torch_default")

    def forward(self, x: Any) -> Any:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        return self.fc(namespace_of(x).reshape(x, (x.shape[0], -1)))


def resnet18(num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> ResNet:
    """ResNet-18: basic blocks ``(2, 2, 2, 2)``, 11.7 M parameters at 1000 classes."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)


def resnet34(num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> ResNet:
    """ResNet-34: basic blocks ``(3, 4, 6, 3)``, 21.8 M parameters at 1000 classes."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, in_channels)


def resnet50(num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> ResNet:
    """ResNet-50: bottleneck blocks ``(3, 4, 6, 3)``, 25.6 M parameters at 1000 classes."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels)
