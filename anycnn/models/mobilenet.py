"""MobileNetV2 (Sandler et al., 2018) and MobileNetV3 small and large (Howard et al., 2019),
with torchvision's structure and tensor names (``features.0.0.weight``,
``features.1.conv.0.0.weight``, ``features.4.block.2.fc1.bias``, ``classifier.3.weight``), so
torchvision's weights load name for name.

Both are a ``features`` stack (a strided 3x3 stem, inverted-residual blocks, a 1x1 expansion)
followed by a global average and a ``classifier``. An inverted residual expands the channels
with a 1x1 convolution, filters each channel with a depthwise 3x3 or 5x5 convolution
(MobileNetV3 adds squeeze-and-excitation), projects back with a linear 1x1 convolution, and
adds its input when the shape is unchanged. The blocks are forward-only modules (their
backward is derived); any image size from 32x32 up works (224x224 is ImageNet's).
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

from ..backend import namespace_of
from ..nn.activations import Hardsigmoid, Hardswish, ReLU6
from ..nn.blocks import SqueezeExcitation, conv_norm_act
from ..nn.layers import AdaptiveAvgPool2D, BatchNorm2D, Conv2D, Dense, Dropout, ReLU
from ..nn.module import Module
from ..nn.sequential import Sequential
from .backbone import Backbone, fan_out_normal, make_divisible, normal

#: torchvision's convolution draw for these networks (Kaiming normal over the fan-out)
_conv_bn_act = partial(conv_norm_act, weight_init=fan_out_normal)


def _flat(x: Any) -> Any:
    """``(N, 1, 1, C)`` pooled features → ``(N, C)``."""
    return namespace_of(x).reshape(x, (x.shape[0], -1))


class InvertedResidualV2(Module):
    """MobileNetV2's block, ``conv`` as torchvision names it: [1x1 expansion (ReLU6) when
    ``expand_ratio != 1``], depthwise 3x3 (``stride``, ReLU6), linear 1x1 projection
    (``Conv2D`` then ``BatchNorm2D`` as separate entries), plus the input when ``stride == 1``
    and the channel count is unchanged."""

    def __init__(self, in_channels: int, out_channels: int, stride: int,
                 expand_ratio: int) -> None:
        hidden = round(in_channels * expand_ratio)
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_act(in_channels, hidden, 1, activation=ReLU6))
        layers += [_conv_bn_act(hidden, hidden, 3, stride, groups=hidden, activation=ReLU6),
                   Conv2D(hidden, out_channels, 1, bias=False, weight_init=fan_out_normal),
                   BatchNorm2D(out_channels)]
        self.conv = Sequential(*layers)

    def forward(self, x: Any) -> Any:
        out = self.conv(x)
        return out + x if self.use_res_connect else out


#: MobileNetV2's stages: (expansion t, channels c, blocks n, first stride s)
V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(Backbone):
    """MobileNetV2 (width multiplier 1): ``features`` (stem 3x3/2 to 32 channels, the 17
    inverted residuals of :data:`V2_STAGES`, 1x1 to 1280), global average, ``classifier``
    (``Dropout(0.2)``, ``Dense(1280, num_classes)``). 3.5 M parameters at 1000 classes.

    Shapes: ``(N, H, W, in_channels)`` → ``(N, num_classes)`` logits.
    """

    head = "classifier.1"

    def __init__(self, num_classes: int = 1000, in_channels: int = 3,
                 dropout: float = 0.2) -> None:
        channels = 32
        layers: list[Module] = [_conv_bn_act(in_channels, channels, 3, 2, activation=ReLU6)]
        for t, c, n, s in V2_STAGES:
            for i in range(n):
                layers.append(InvertedResidualV2(channels, c, s if i == 0 else 1, t))
                channels = c
        layers.append(_conv_bn_act(channels, 1280, 1, activation=ReLU6))
        self.features = Sequential(*layers)
        self.stage_paths = tuple((f"features.{i}",) for i in range(len(layers)))
        self.avgpool = AdaptiveAvgPool2D(1)
        self.classifier = Sequential(Dropout(dropout), Dense(1280, num_classes,
                                                             weight_init=normal(0.01)))

    def forward(self, x: Any) -> Any:
        return self.classifier(_flat(self.avgpool(self.features(x))))


class BlockV3(NamedTuple):
    """One MobileNetV3 block: input, kernel, expanded and output channels, squeeze-and-
    excitation, Hardswish (else ReLU), stride."""

    in_channels: int
    kernel: int
    expanded: int
    out_channels: int
    se: bool
    hardswish: bool
    stride: int


_V3_LARGE = (
    (16, 3, 16, 16, False, False, 1), (16, 3, 64, 24, False, False, 2),
    (24, 3, 72, 24, False, False, 1), (24, 5, 72, 40, True, False, 2),
    (40, 5, 120, 40, True, False, 1), (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2), (80, 3, 200, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1), (80, 3, 184, 80, False, True, 1),
    (80, 3, 480, 112, True, True, 1), (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2), (160, 5, 960, 160, True, True, 1),
    (160, 5, 960, 160, True, True, 1))
_V3_SMALL = (
    (16, 3, 16, 16, True, False, 2), (16, 3, 72, 24, False, False, 2),
    (24, 3, 88, 24, False, False, 1), (24, 5, 96, 40, True, True, 2),
    (40, 5, 240, 40, True, True, 1), (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1), (48, 5, 144, 48, True, True, 1),
    (48, 5, 288, 96, True, True, 2), (96, 5, 576, 96, True, True, 1),
    (96, 5, 576, 96, True, True, 1))
#: the MobileNetV3 block tables and the width of the classifier's hidden layer
V3_CONFIGS = {"large": (tuple(BlockV3(*b) for b in _V3_LARGE), 1280),
              "small": (tuple(BlockV3(*b) for b in _V3_SMALL), 1024)}
#: MobileNetV3's BatchNorm settings (eps, momentum)
V3_NORM = {"eps": 1e-3, "momentum": 0.01}


class InvertedResidualV3(Module):
    """MobileNetV3's block, ``block`` as torchvision names it: [1x1 expansion when the width
    changes], depthwise ``kernel`` x ``kernel`` (``stride``), [squeeze-and-excitation with a
    Hardsigmoid gate], linear 1x1 projection; plus the input when ``stride == 1`` and the
    channel count is unchanged."""

    def __init__(self, cfg: BlockV3) -> None:
        act = Hardswish if cfg.hardswish else ReLU
        self.use_res_connect = cfg.stride == 1 and cfg.in_channels == cfg.out_channels
        layers: list[Module] = []
        if cfg.expanded != cfg.in_channels:
            layers.append(_conv_bn_act(cfg.in_channels, cfg.expanded, 1, activation=act,
                                       **V3_NORM))
        layers.append(_conv_bn_act(cfg.expanded, cfg.expanded, cfg.kernel, cfg.stride,
                                   groups=cfg.expanded, activation=act, **V3_NORM))
        if cfg.se:
            layers.append(SqueezeExcitation(cfg.expanded, make_divisible(cfg.expanded // 4),
                                            scale_activation=Hardsigmoid))
        layers.append(_conv_bn_act(cfg.expanded, cfg.out_channels, 1, activation=None,
                                   **V3_NORM))
        self.block = Sequential(*layers)

    def forward(self, x: Any) -> Any:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class MobileNetV3(Backbone):
    """MobileNetV3 ``"large"`` or ``"small"`` (width multiplier 1): ``features`` (stem 3x3/2
    to 16 channels with Hardswish, the blocks of :data:`V3_CONFIGS`, 1x1 to six times the last
    width), global average, ``classifier`` (``Dense``, Hardswish, ``Dropout(0.2)``,
    ``Dense(.., num_classes)``). 5.5 M (large) and 2.5 M (small) parameters at 1000 classes.

    Shapes: ``(N, H, W, in_channels)`` → ``(N, num_classes)`` logits.
    """

    head = "classifier.3"

    def __init__(self, size: str = "large", num_classes: int = 1000, in_channels: int = 3,
                 dropout: float = 0.2) -> None:
        blocks, hidden = V3_CONFIGS[size]
        layers: list[Module] = [_conv_bn_act(in_channels, blocks[0].in_channels, 3, 2,
                                             activation=Hardswish, **V3_NORM)]
        layers += [InvertedResidualV3(cfg) for cfg in blocks]
        last = 6 * blocks[-1].out_channels
        layers.append(_conv_bn_act(blocks[-1].out_channels, last, 1, activation=Hardswish,
                                   **V3_NORM))
        self.features = Sequential(*layers)
        self.stage_paths = tuple((f"features.{i}",) for i in range(len(layers)))
        self.avgpool = AdaptiveAvgPool2D(1)
        self.classifier = Sequential(
            Dense(last, hidden, weight_init=normal(0.01)), Hardswish(), Dropout(dropout),
            Dense(hidden, num_classes, weight_init=normal(0.01)))

    def forward(self, x: Any) -> Any:
        return self.classifier(_flat(self.avgpool(self.features(x))))


def mobilenet_v2(num_classes: int = 1000, in_channels: int = 3,
                 image_size: int = 224) -> MobileNetV2:
    """MobileNetV2 (:class:`MobileNetV2`)."""
    return MobileNetV2(num_classes, in_channels)


def mobilenet_v3_large(num_classes: int = 1000, in_channels: int = 3,
                       image_size: int = 224) -> MobileNetV3:
    """MobileNetV3-Large (:class:`MobileNetV3`)."""
    return MobileNetV3("large", num_classes, in_channels)


def mobilenet_v3_small(num_classes: int = 1000, in_channels: int = 3,
                       image_size: int = 224) -> MobileNetV3:
    """MobileNetV3-Small (:class:`MobileNetV3`)."""
    return MobileNetV3("small", num_classes, in_channels)
