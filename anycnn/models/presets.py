"""The small from-scratch presets: MNIST-sized (``lenet5``, ``simple-cnn``, ``bn-cnn``,
``resnet-mini``) and CIFAR-sized (``resnet20``, ``resnet20-code``).

The residual presets are the CIFAR ResNets of He et al. (2016, section 4.2): a 3x3 convolution
with 16 channels, stages of basic blocks (two 3x3 convolutions with BatchNorm around a
:class:`~anycnn.nn.containers.Residual`, ReLU after the sum) with 16, 32, 64 channels, stride 2 at
the first block of the later stages, a strided 1x1 convolution + BatchNorm shortcut where a block
changes shape ("option B"), global average pooling and one Dense layer. They are fully
convolutional: any image size works (``image_size`` only records the intended one).
"""

from __future__ import annotations

from typing import Any

from ..nn.containers import Residual
from ..nn.layers import (
    BatchNorm2D,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool2D,
    MaxPool2D,
    ReLU,
)
from ..nn.module import Module
from ..nn.sequential import Sequential
from .resnet import BasicBlock
from .sizes import check_image_size


def _pooled(size: int, times: int) -> int:
    for _ in range(times):
        size //= 2
    return size


def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> Sequential:
    """LeNet-5 with ReLU and max pooling: conv 5x5 (6, pad 2) → pool → conv 5x5 (16) → pool →
    dense 120 → 84 → classes. Takes images of at least 12x12."""
    check_image_size("lenet5", image_size)
    side = (_pooled(image_size, 1) - 4) // 2
    return Sequential(
        Conv2D(in_channels, 6, 5, padding=2), ReLU(), MaxPool2D(2),
        Conv2D(6, 16, 5), ReLU(), MaxPool2D(2),
        Flatten(),
        Dense(16 * side * side, 120), ReLU(),
        Dense(120, 84), ReLU(),
        Dense(84, num_classes),
    )


def simple_cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> Sequential:
    """The reference workload: conv 3x3 (32, pad 1) → ReLU → pool 2 → conv 3x3 (64, pad 1) →
    ReLU → pool 2 → flatten → dense 128 → ReLU → dense classes (3136 → 128 at 28x28). Takes
    images of at least 4x4."""
    check_image_size("simple-cnn", image_size)
    side = _pooled(image_size, 2)
    return Sequential(
        Conv2D(in_channels, 32, 3, padding=1), ReLU(), MaxPool2D(2),
        Conv2D(32, 64, 3, padding=1), ReLU(), MaxPool2D(2),
        Flatten(),
        Dense(64 * side * side, 128), ReLU(),
        Dense(128, num_classes),
    )


def bn_cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> Sequential:
    """A batch-normalised CNN with dropout and global average pooling (stronger, slower)."""
    return Sequential(
        Conv2D(in_channels, 32, 3, padding=1, bias=False), BatchNorm2D(32), ReLU(),
        Conv2D(32, 32, 3, padding=1, bias=False), BatchNorm2D(32), ReLU(), MaxPool2D(2),
        Conv2D(32, 64, 3, padding=1, bias=False), BatchNorm2D(64), ReLU(),
        Conv2D(64, 64, 3, padding=1, bias=False), BatchNorm2D(64), ReLU(), MaxPool2D(2),
        GlobalAvgPool2D(), Dropout(0.2), Dense(64, num_classes),
    )


def basic_block(in_channels: int, out_channels: int, stride: int = 1) -> list[Module]:
    """A ResNet basic block as two layers, ``[Residual(...), ReLU()]``: the body is conv 3x3
    (stride) → BN → ReLU → conv 3x3 → BN; the shortcut is the identity, or a strided 1x1
    convolution + BN when the block changes the channel count or the size."""
    body = Sequential(
        Conv2D(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        BatchNorm2D(out_channels), ReLU(),
        Conv2D(out_channels, out_channels, 3, padding=1, bias=False), BatchNorm2D(out_channels),
    )
    shortcut = None
    if stride != 1 or in_channels != out_channels:
        shortcut = Sequential(Conv2D(in_channels, out_channels, 1, stride=stride, bias=False),
                              BatchNorm2D(out_channels))
    return [Residual(body, shortcut), ReLU()]


def cifar_resnet(blocks_per_stage: int, num_classes: int = 10,
                 in_channels: int = 3) -> Sequential:
    """The CIFAR ResNet with ``6 * blocks_per_stage + 2`` weighted layers: a flat
    ``Sequential`` of conv, BN, ReLU, then ``Residual``, ``ReLU`` pairs (3 stages of 16, 32, 64
    channels), global average pooling and a Dense layer. Parameter names are dotted paths,
    e.g. ``"3.body.0.weight"`` (first block, first convolution) and ``"9.shortcut.0.weight"``."""
    layers: list[Module] = [Conv2D(in_channels, 16, 3, padding=1, bias=False), BatchNorm2D(16),
                            ReLU()]
    channels = 16
    for stage, width in enumerate((16, 32, 64)):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            layers += basic_block(channels, width, stride)
            channels = width
    return Sequential(*layers, GlobalAvgPool2D(), Dense(channels, num_classes))


def resnet20(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> Sequential:
    """ResNet-20 for CIFAR-sized images (32x32x3 → 8x8x64 before pooling): 3 stages of 3 basic
    blocks, about 0.27 M parameters."""
    return cifar_resnet(3, num_classes, in_channels)


def resnet_mini(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> Sequential:
    """ResNet-8 for MNIST-sized images (28x28x1 → 7x7x64 before pooling): 3 stages of one basic
    block, about 78 k parameters; about 600 training images/s on 2 CPU cores (NumPy), so under
    two minutes per Fashion-MNIST epoch."""
    return cifar_resnet(1, num_classes, in_channels)


class CifarResNetCode(Module):
    """:func:`cifar_resnet` written as code: ``conv1``/``bn1``/``relu``, stages ``layer1`` to
    ``layer3`` (``Sequential`` of :class:`~anycnn.models.resnet.BasicBlock`), ``avgpool``,
    ``fc`` (torchvision's names). The models-as-code path, measured against the
    ``Sequential`` preset."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10,
                 in_channels: int = 3) -> None:
        self.conv1 = Conv2D(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = BatchNorm2D(16)
        self.relu = ReLU()
        channels = 16
        for stage, width in enumerate((16, 32, 64), 1):
            blocks = []
            for block in range(blocks_per_stage):
                blocks.append(BasicBlock(channels, width, 2 if stage > 1 and block == 0 else 1,
                                         weight_init="he_uniform"))
                channels = width
            setattr(self, f"layer{stage}", Sequential(*blocks))
        self.avgpool = GlobalAvgPool2D()
        self.fc = Dense(channels, num_classes)

    def forward(self, x: Any) -> Any:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x))


def resnet20_code(num_classes: int = 10, in_channels: int = 3,
                  image_size: int = 32) -> CifarResNetCode:
    """ResNet-20 written as a forward-only module (:class:`CifarResNetCode`): the same
    network as ``resnet20`` with torchvision's parameter names; its backward is derived."""
    return CifarResNetCode(3, num_classes, in_channels)
