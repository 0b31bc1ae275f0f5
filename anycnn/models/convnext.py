"""ConvNeXt-Tiny (Liu et al., 2022) with torchvision's structure and tensor names
(``features.0.0.weight``, ``features.1.0.block.3.weight``, ``features.1.0.layer_scale``,
``classifier.2.bias``), so torchvision's weights load name for name.

``features``: a 4x4 stride-4 "patchify" convolution and a LayerNorm, then four stages of
ConvNeXt blocks (96, 192, 384, 768 channels; 3, 3, 9, 3 blocks) with a LayerNorm and a 2x2
stride-2 convolution between stages; then a global average and ``classifier`` (LayerNorm,
flatten, Dense). A block is a depthwise 7x7 convolution, a LayerNorm over the channels, a
channel MLP (Dense to 4x, GELU, Dense back, applied to NHWC activations directly: the
channels are the last axis, so torchvision's two permutations are identities here), a learned
per-channel scale (layer scale, 1e-6 at start), stochastic depth, and the residual add. The
blocks are forward-only modules.
"""

from __future__ import annotations

from typing import Any

from ..nn.activations import GELU
from ..nn.containers import Identity
from ..nn.layers import AdaptiveAvgPool2D, Conv2D, Dense, Flatten, LayerNorm, StochasticDepth
from ..nn.module import Module, Parameter, make_array
from ..nn.sequential import Sequential
from .backbone import Backbone, truncated_normal

#: ConvNeXt's LayerNorm epsilon
EPS = 1e-6
#: ConvNeXt-Tiny's stages: (channels, blocks)
TINY_STAGES = ((96, 3), (192, 3), (384, 9), (768, 3))
_draw = truncated_normal(0.02)


class CNBlock(Module):
    """One ConvNeXt block (see the module docstring): ``x + drop(layer_scale * block(x))``;
    ``block`` holds the depthwise convolution at 0, LayerNorm at 2, the two Dense layers at 3
    and 5 and GELU at 4 (1 and 6 are identities where torchvision permutes the axes).
    ``layer_scale`` is ``(C,)`` here and ``(C, 1, 1)`` in torchvision's files."""

    def __init__(self, dim: int, layer_scale: float = 1e-6, drop_prob: float = 0.0) -> None:
        self.block = Sequential(
            Conv2D(dim, dim, 7, padding=3, groups=dim, weight_init=_draw), Identity(),
            LayerNorm(dim, eps=EPS), Dense(dim, 4 * dim, weight_init=_draw), GELU(),
            Dense(4 * dim, dim, weight_init=_draw), Identity())
        self.layer_scale = Parameter(make_array([layer_scale] * dim, "float32"))
        self.stochastic_depth = StochasticDepth(drop_prob, "row")

    def torch_parameter_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of own parameter ``name`` in a torchvision file (``(C, 1, 1)``)."""
        return (*shape, 1, 1) if name == "layer_scale" else shape

    def forward(self, x: Any) -> Any:
        return self.stochastic_depth(self.layer_scale * self.block(x)) + x


class ConvNeXt(Backbone):
    """ConvNeXt-Tiny: 28.6 M parameters at 1000 classes.

    Args:
        num_classes, in_channels: the head's classes and the input's channels.
        stochastic_depth_prob: the last block's drop probability (0.1); block ``i`` of ``n``
            drops with ``stochastic_depth_prob * i / (n - 1)``.
        layer_scale: the layer scales' starting value (1e-6).

    Shapes: ``(N, H, W, in_channels)`` → ``(N, num_classes)`` logits.
    """

    head = "classifier.2"

    def __init__(self, num_classes: int = 1000, in_channels: int = 3,
                 stochastic_depth_prob: float = 0.1, layer_scale: float = 1e-6,
                 stages: tuple[tuple[int, int], ...] = TINY_STAGES) -> None:
        first = stages[0][0]
        layers: list[Module] = [Sequential(
            Conv2D(in_channels, first, 4, stride=4, weight_init=_draw), LayerNorm(first, eps=EPS))]
        total = sum(blocks for _, blocks in stages)
        index = 0
        for i, (dim, blocks) in enumerate(stages):
            stage = []
            for _ in range(blocks):
                stage.append(CNBlock(dim, layer_scale,
                                     stochastic_depth_prob * index / (total - 1.0)))
                index += 1
            layers.append(Sequential(*stage))
            if i + 1 < len(stages):
                layers.append(Sequential(LayerNorm(dim, eps=EPS),
                                         Conv2D(dim, stages[i + 1][0], 2, stride=2,
                                                weight_init=_draw)))
        last = stages[-1][0]
        self.features = Sequential(*layers)
        self.stage_paths = tuple((f"features.{i}",) for i in range(len(layers)))
        self.avgpool = AdaptiveAvgPool2D(1)
        self.classifier = Sequential(LayerNorm(last, eps=EPS), Flatten(),
                                     Dense(last, num_classes, weight_init=_draw))

    def forward(self, x: Any) -> Any:
        return self.classifier(self.avgpool(self.features(x)))


def convnext_tiny(num_classes: int = 1000, in_channels: int = 3,
                  image_size: int = 224) -> ConvNeXt:
    """ConvNeXt-Tiny (:class:`ConvNeXt`)."""
    return ConvNeXt(num_classes, in_channels)
