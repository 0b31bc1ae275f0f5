"""Named model presets.

A model is described by a small JSON-able *spec* ``{"name", "num_classes", "in_channels",
"image_size"}``; :func:`build_model` turns a spec into a model, and checkpoints store the spec so
a model can be rebuilt anywhere. A preset's default input shape is its function's defaults
(28x28x1 for the MNIST-sized ones, 32x32x3 for ``resnet20``, 224x224x3 for torchvision's
ImageNet networks); ``num_classes`` defaults to the preset's own too (10, and ImageNet's 1000
for the torchvision networks: :func:`model_spec`).

The presets live in one module per family: :mod:`anycnn.models.presets` (the small
from-scratch networks), and :mod:`~anycnn.models.resnet`, :mod:`~anycnn.models.mobilenet`,
:mod:`~anycnn.models.efficientnet` and :mod:`~anycnn.models.convnext` (torchvision's
ImageNet classifiers with its tensor names; their base class is
:class:`~anycnn.models.backbone.Backbone`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from ..nn.module import Module
from .convnext import convnext_tiny
from .efficientnet import efficientnet_b0
from .mobilenet import mobilenet_v2, mobilenet_v3_large, mobilenet_v3_small
from .presets import (
    BasicBlock,
    CifarResNetCode,
    basic_block,
    bn_cnn,
    cifar_resnet,
    lenet5,
    resnet20,
    resnet20_code,
    resnet_mini,
    simple_cnn,
)
from .resnet import resnet18, resnet34, resnet50
from .sizes import MIN_IMAGE_SIZE, canonical_model_name, check_image_size

__all__ = ["MIN_IMAGE_SIZE", "MODELS", "BasicBlock", "CifarResNetCode", "basic_block", "bn_cnn",
           "build_model", "canonical_model_name", "check_image_size", "cifar_resnet",
           "convnext_tiny", "efficientnet_b0", "lenet5", "mobilenet_v2", "mobilenet_v3_large",
           "mobilenet_v3_small", "model_spec", "resnet18", "resnet20", "resnet20_code",
           "resnet34", "resnet50", "resnet_mini", "simple_cnn"]

MODELS: dict[str, Callable[..., Module]] = {
    "lenet5": lenet5,
    "simple-cnn": simple_cnn,
    "bn-cnn": bn_cnn,
    "resnet20": resnet20,
    "resnet-mini": resnet_mini,
    "resnet20-code": resnet20_code,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_small": mobilenet_v3_small,
    "mobilenet_v3_large": mobilenet_v3_large,
    "efficientnet_b0": efficientnet_b0,
    "convnext_tiny": convnext_tiny,
}


def model_spec(name: str, num_classes: int | None = None, in_channels: int | None = None,
               image_size: int | None = None) -> dict[str, Any]:
    """A validated spec dict for :func:`build_model`; ``num_classes``, ``in_channels`` and
    ``image_size`` default to the preset's own (its function's defaults: 10 classes for the
    small presets, ImageNet's 1000 classes and 224x224x3 for the torchvision
    architectures).

    ``name`` is matched in any case, with ``-`` and ``_`` alike (``"LeNet5"``,
    ``"mobilenet-v2"``); the spec holds the preset's own spelling (``"lenet5"``).

    Raises:
        ConfigError: an unknown name (the valid ones are listed).
        ShapeError: an ``image_size`` below the preset's minimum (:data:`MIN_IMAGE_SIZE`).
    """
    name = canonical_model_name(name, MODELS)
    defaults = inspect.signature(MODELS[name]).parameters
    if num_classes is None:
        num_classes = defaults["num_classes"].default
    if in_channels is None:
        in_channels = defaults["in_channels"].default
    if image_size is None:
        image_size = defaults["image_size"].default
    check_image_size(name, int(image_size))
    return {"name": name, "num_classes": int(num_classes), "in_channels": int(in_channels),
            "image_size": int(image_size)}


def build_model(spec: dict[str, Any] | str, **overrides: Any) -> Module:
    """Build a preset on the current backend from a spec dict or a model name.

    The model keeps its spec as ``model.model_spec``: :func:`anycnn.save` stores it, so
    :func:`anycnn.load_model` can rebuild the model, and :func:`anycnn.predict` knows the image
    shape ``(image_size, image_size, in_channels)`` it takes."""
    if "weights" in overrides:
        raise ConfigError("build_model makes fresh weights; for trained ones use "
                          "anycnn.pretrained(name, weights='imagenet', num_classes=K), or "
                          "anycnn.load_weights(model, 'imagenet' or PATH)")
    if isinstance(spec, str):
        spec = model_spec(spec, **overrides)
    else:
        spec = model_spec(**{**spec, **overrides})
    args = {k: v for k, v in spec.items() if k != "name"}
    model = MODELS[spec["name"]](**args)
    model.model_spec = spec
    return model
