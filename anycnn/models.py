"""Named model presets.

A model is described by a small JSON-able *spec* ``{"name", "num_classes", "in_channels",
"image_size"}``; :func:`build_model` turns a spec into a :class:`~anycnn.module.Sequential`, and
checkpoints store the spec so a model can be rebuilt anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import ConfigError
from .layers import BatchNorm2D, Conv2D, Dense, Dropout, Flatten, GlobalAvgPool2D, MaxPool2D, ReLU
from .sequential import Sequential


def _pooled(size: int, times: int) -> int:
    for _ in range(times):
        size //= 2
    return size


def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> Sequential:
    """LeNet-5 with ReLU and max pooling: conv 5x5 (6, pad 2) → pool → conv 5x5 (16) → pool →
    dense 120 → 84 → classes."""
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
    ReLU → pool 2 → flatten → dense 128 → ReLU → dense classes (3136 → 128 at 28x28)."""
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


MODELS: dict[str, Callable[..., Sequential]] = {
    "lenet5": lenet5,
    "simple-cnn": simple_cnn,
    "bn-cnn": bn_cnn,
}


def model_spec(name: str, num_classes: int = 10, in_channels: int = 1,
               image_size: int = 28) -> dict[str, Any]:
    """A validated spec dict for :func:`build_model`."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    return {"name": name, "num_classes": int(num_classes), "in_channels": int(in_channels),
            "image_size": int(image_size)}


def build_model(spec: dict[str, Any] | str, **overrides: Any) -> Sequential:
    """Build a preset on the current backend from a spec dict or a model name.

    The model keeps its spec as ``model.model_spec``: :func:`anycnn.save` stores it, so
    :func:`anycnn.load_model` can rebuild the model, and :func:`anycnn.predict` knows the image
    shape ``(image_size, image_size, in_channels)`` it takes."""
    if isinstance(spec, str):
        spec = model_spec(spec, **overrides)
    else:
        spec = model_spec(**{**spec, **overrides})
    args = {k: v for k, v in spec.items() if k != "name"}
    model = MODELS[spec["name"]](**args)
    model.model_spec = spec
    return model
