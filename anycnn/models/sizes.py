"""The smallest square image each preset takes, and model names in any spelling.

A preset's smallest input is set by its downsampling: ``lenet5``'s second 5x5 convolution and
two 2x2 poolings need 12x12 images (``(12 // 2 - 4) // 2 = 1``), ``simple-cnn``'s and
``bn-cnn``'s two 2x2 poolings need 4x4, and ``convnext_tiny``'s stride-4 stem and three
stride-2 downsamplings (none padded) need 32x32. The other presets pad every strided layer and
end in a global average pooling: any size from 1x1 works (their ``image_size`` only records
the intended one).
"""

from __future__ import annotations

from ..errors import ConfigError, ShapeError

#: preset name -> the smallest ``image_size`` it takes (presets not listed take any size >= 1)
MIN_IMAGE_SIZE: dict[str, int] = {"lenet5": 12, "simple-cnn": 4, "bn-cnn": 4,
                                  "convnext_tiny": 32}


def check_image_size(name: str, image_size: int) -> None:
    """Refuse an ``image_size`` (the side of the square ``H x W`` input) that preset ``name``
    cannot take.

    Raises:
        ShapeError: naming the size and the preset's minimum, e.g. "lenet5 takes images of at
            least 12x12; image_size 8 (8x8) is too small".
    """
    minimum = MIN_IMAGE_SIZE.get(name, 1)
    if image_size < minimum:
        raise ShapeError(f"{name} takes images of at least {minimum}x{minimum}; image_size "
                         f"{image_size} ({image_size}x{image_size}) is too small")


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def canonical_model_name(name: str, names) -> str:
    """``name`` as spelt in ``names`` (the presets' names), matched in any case and with ``-``
    and ``_`` alike (``LeNet5`` -> ``lenet5``, ``mobilenet-v2`` -> ``mobilenet_v2``).

    Raises:
        ConfigError: no preset has that name (the valid ones are listed).
    """
    if isinstance(name, str):
        if name in names:
            return name
        for known in names:
            if _key(known) == _key(name):
                return known
    raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(names)}")
