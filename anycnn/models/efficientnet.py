"""EfficientNet-B0 (Tan and Le, 2019) with torchvision's structure and tensor names
(``features.1.0.block.0.0.weight``, ``features.2.0.block.2.fc1.bias``, ``classifier.1.weight``),
so torchvision's weights load name for name.

``features``: a 3x3 stride-2 stem (32 channels, SiLU), seven stages of MBConv blocks, a 1x1
convolution to 1280 channels; then a global average and ``classifier`` (dropout, Dense). An
MBConv block expands with a 1x1 convolution (SiLU), filters with a depthwise 3x3 or 5x5
convolution (SiLU), gates the channels by squeeze-and-excitation, projects with a linear 1x1
convolution and, when its shape is unchanged, adds its input after stochastic depth (the drop
probability grows linearly with the block's index to 0.2). The blocks are forward-only modules.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from ..backend import namespace_of
from ..nn.activations import SiLU
from ..nn.blocks import SqueezeExcitation, conv_norm_act
from ..nn.layers import AdaptiveAvgPool2D, Dense, Dropout, StochasticDepth
from ..nn.module import Module
from ..nn.sequential import Sequential
from .backbone import Backbone, fan_out_normal, make_divisible, uniform_out

_conv_bn_act = partial(conv_norm_act, weight_init=fan_out_normal)

#: EfficientNet-B0's stages: (expansion, kernel, first stride, input and output channels, blocks)
B0_STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
             (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
             (6, 3, 1, 192, 320, 1))


class MBConv(Module):
    """The mobile inverted bottleneck with squeeze-and-excitation (see the module docstring);
    torchvision's names: ``block`` (the layers), ``stochastic_depth``."""

    def __init__(self, expand_ratio: int, kernel: int, stride: int, in_channels: int,
                 out_channels: int, drop_prob: float) -> None:
        self.use_res_connect = stride == 1 and in_channels == out_channels
        expanded = make_divisible(in_channels * expand_ratio)
        layers: list[Module] = []
        if expanded != in_channels:
            layers.append(_conv_bn_act(in_channels, expanded, 1, activation=SiLU))
        layers += [
            _conv_bn_act(expanded, expanded, kernel, stride, groups=expanded, activation=SiLU),
            SqueezeExcitation(expanded, max(1, in_channels // 4), activation=SiLU),
            _conv_bn_act(expanded, out_channels, 1, activation=None)]
        self.block = Sequential(*layers)
        self.stochastic_depth = StochasticDepth(drop_prob, "row")

    def forward(self, x: Any) -> Any:
        out = self.block(x)
        return self.stochastic_depth(out) + x if self.use_res_connect else out


class EfficientNet(Backbone):
    """EfficientNet-B0 (width and depth multipliers 1): 5.3 M parameters at 1000 classes.

    Args:
        num_classes, in_channels: the head's classes and the input's channels.
        dropout: the classifier's dropout (0.2).
        stochastic_depth_prob: the last block's drop probability (0.2); block ``i`` of ``n``
            drops with ``stochastic_depth_prob * i / n``.

    Shapes: ``(N, H, W, in_channels)`` → ``(N, num_classes)`` logits.
    """

    head = "classifier.1"

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.2,
                 stochastic_depth_prob: float = 0.2) -> None:
        layers: list[Module] = [_conv_bn_act(in_channels, B0_STAGES[0][3], 3, 2,
                                             activation=SiLU)]
        total = sum(stage[-1] for stage in B0_STAGES)
        index = 0
        for expand, kernel, stride, cin, cout, blocks in B0_STAGES:
            stage = []
            for i in range(blocks):
                stage.append(MBConv(expand, kernel, stride if i == 0 else 1,
                                    cin if i == 0 else cout, cout,
                                    stochastic_depth_prob * index / total))
                index += 1
            layers.append(Sequential(*stage))
        last = 4 * B0_STAGES[-1][4]
        layers.append(_conv_bn_act(B0_STAGES[-1][4], last, 1, activation=SiLU))
        self.features = Sequential(*layers)
        self.stage_paths = tuple((f"features.{i}",) for i in range(len(layers)))
        self.avgpool = AdaptiveAvgPool2D(1)
        self.classifier = Sequential(Dropout(dropout),
                                     Dense(last, num_classes, weight_init=uniform_out))

    def forward(self, x: Any) -> Any:
        x = self.avgpool(self.features(x))
        return self.classifier(namespace_of(x).reshape(x, (x.shape[0], -1)))


def efficientnet_b0(num_classes: int = 1000, in_channels: int = 3,
                    image_size: int = 224) -> EfficientNet:
    """EfficientNet-B0 (:class:`EfficientNet`)."""
    return EfficientNet(num_classes, in_channels)
