"""What the torchvision-structured networks share: the :class:`Backbone` base class (the
classifier head and the stages a fine-tuning run freezes), their initializers, and the
channel rounding of the mobile networks."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..backend import dtype_name
from ..errors import ConfigError
from ..nn.layers import Dense
from ..nn.module import Module
from ..nn.sequential import Sequential

Initializer = Callable[[tuple[int, ...], int, int, np.random.Generator], np.ndarray]


def fan_out_normal(shape, fan_in, fan_out, rng):
    """N(0, 2 / fan_out) (Kaiming normal, ``mode="fan_out"``): torchvision's convolutions."""
    return rng.normal(0.0, math.sqrt(2.0 / fan_out), size=shape)


def normal(std: float) -> Initializer:
    """N(0, std²)."""
    def draw(shape, fan_in, fan_out, rng):
        return rng.normal(0.0, std, size=shape)
    return draw


def truncated_normal(std: float) -> Initializer:
    """N(0, std²) redrawn outside ±2 (the absolute bounds of PyTorch's ``trunc_normal_``,
    which for std 0.02 are 100 standard deviations: in effect a normal draw)."""
    def draw(shape, fan_in, fan_out, rng):
        values = rng.normal(0.0, std, size=shape)
        outside = np.abs(values) > 2.0
        while outside.any():
            values[outside] = rng.normal(0.0, std, size=int(outside.sum()))
            outside = np.abs(values) > 2.0
        return values
    return draw


def uniform_out(shape, fan_in, fan_out, rng):
    """U(-1/sqrt(out), 1/sqrt(out)) for a Dense ``(in, out)`` weight: EfficientNet's head."""
    bound = 1.0 / math.sqrt(shape[-1])
    return rng.uniform(-bound, bound, size=shape)


def make_divisible(value: float, divisor: int = 8) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``), and
    never more than 10% below ``value`` (the mobile networks' channel rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class Backbone(Module):
    """Base class of the pretrained-network architectures (:mod:`anycnn.models.resnet`,
    ``mobilenet``, ``efficientnet``, ``convnext``).

    Subclasses set two class attributes:

    - ``head``: the dotted path of the final :class:`~anycnn.nn.layers.Dense` (``"fc"``,
      ``"classifier.1"``), the classifier a fine-tuning run replaces;
    - ``stage_paths``: the dotted paths of the feature extractor's parts in forward order
      (ResNet: the stem ``conv1``/``bn1`` as one stage, then ``layer1`` to ``layer4``), the
      units ``--freeze N`` counts.
    """

    head: str = ""
    stage_paths: tuple[tuple[str, ...], ...] = ()

    def get_classifier(self) -> Dense:
        """The final Dense layer (the head)."""
        return self.get_submodule(self.head)

    def reset_classifier(self, num_classes: int, rng: np.random.Generator | None = None,
                         ) -> Dense:
        """Replace the head with a new ``Dense(in_features, num_classes)``
        (:func:`reset_classifier`) and return it."""
        return reset_classifier(self, num_classes, rng)

    def stages(self) -> list[list[Module]]:
        """The feature extractor's stages in forward order, each a list of modules."""
        return [[self.get_submodule(path) for path in paths] for paths in self.stage_paths]

    def get_submodule(self, path: str) -> Any:
        """The module at dotted ``path`` (``"layer1.0.conv1"``; indices into ``Sequential``)."""
        return submodule(self, path)


def submodule(model: Module, path: str) -> Any:
    """The module at dotted ``path`` below ``model`` (``"layer1.0.conv1"``, ``"classifier.1"``:
    indices into a ``Sequential``); ``""`` is ``model`` itself."""
    module: Any = model
    for part in path.split(".") if path else ():
        if isinstance(module, Sequential) and part.isdigit():
            module = module[int(part)]
        else:
            module = getattr(module, part)
    return module


def classifier_path(model: Module) -> str | None:
    """The dotted path of ``model``'s classifier: a :class:`Backbone`'s ``head``, the index
    of a ``Sequential``'s last ``Dense``, or None (no classifier anycnn can find)."""
    if isinstance(model, Backbone):
        return model.head
    if isinstance(model, Sequential):
        for i in range(len(model) - 1, -1, -1):
            if isinstance(model[i], Dense):
                return str(i)
    return None


def current_spec(model: Module) -> dict[str, Any] | None:
    """``model.model_spec`` with ``num_classes`` read from its classifier, so that a head
    replaced the PyTorch way (``model.fc = Dense(512, 3)``, ``model[-1] = Dense(84, 2)``)
    is what a checkpoint records; None without a spec."""
    spec = getattr(model, "model_spec", None)
    if not isinstance(spec, dict):
        return spec
    path = classifier_path(model)
    if path is None:
        return spec
    head = submodule(model, path)
    if isinstance(head, Dense) and head.out_features != spec.get("num_classes"):
        return {**spec, "num_classes": head.out_features}
    return spec


def reset_classifier(model: Module, num_classes: int,
                     rng: np.random.Generator | None = None) -> Dense:
    """Replace ``model``'s classifier (:func:`classifier_path`: a Backbone's head, or a
    ``Sequential``'s last ``Dense``) with a new ``Dense(in_features, num_classes)`` (PyTorch's
    default initialisation from ``rng``, the old head's dtype) and return it; the model's spec
    (if any) is updated to the new class count."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
    path = classifier_path(model)
    if path is None:
        raise ConfigError(f"{type(model).__name__} has no classifier to replace (a Dense at "
                          "the end of a Sequential, or one of the pretrained architectures)")
    old = submodule(model, path)
    new = Dense(old.in_features, num_classes, weight_init="torch_default",
                bias_init="torch_default", dtype=dtype_name(old.weight.data), rng=rng)
    parent_path, _, name = path.rpartition(".")
    parent = submodule(model, parent_path)
    if isinstance(parent, Sequential) and name.isdigit():
        parent[int(name)] = new
    else:
        setattr(parent, name, new)
    spec = getattr(model, "model_spec", None)
    if isinstance(spec, dict):
        model.model_spec = {**spec, "num_classes": num_classes}
    return new
