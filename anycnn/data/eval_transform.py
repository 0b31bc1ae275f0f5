"""The evaluation preprocessing of ImageNet-style models as plain data: :class:`EvalTransform`.

An image file becomes the model's input in four steps (torchvision's ``Resize(resize)``,
``CenterCrop(crop)``, ``ToTensor()``, ``Normalize(mean, std)``, channels last):

1. decode and convert to RGB (or grayscale) as :func:`anycnn.data.images.load_image` does;
2. resize keeping the aspect ratio so that the shorter side is ``resize`` pixels, with Pillow's
   ``interpolation`` filter (``"bilinear"``: antialiased when shrinking);
3. keep the centred ``crop x crop`` window (``crop <= resize``);
4. scale to ``[0, 1]`` (``/ 255``) and normalise ``(x - mean[c]) / std[c]`` per channel.

Steps 1-3 run on the host when the file is decoded (``anycnn predict``, and image folders
loaded with ``resize_shorter``, whose cache then holds ``crop x crop`` pixels), step 4 where the
batch is (:class:`~anycnn.data.augment.Normalize`), so ``anycnn evaluate`` on a folder and
``anycnn predict`` on its files give the same pixels.

The record form (:meth:`EvalTransform.to_record`, :meth:`EvalTransform.from_record`) is the
plain dict pretrained-weight metadata carries and checkpoints keep under
``config["preprocess"]["eval"]``::

    {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406],
     "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}

(``mean``/``std`` may be null: no normalisation).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from .augment import Normalize

#: ImageNet's per-channel mean and std in ``[0, 1]`` units (RGB), as torchvision's weights use
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: the keys of the record form, in order
RECORD_KEYS = ("resize", "crop", "mean", "std", "interpolation")


def _side(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"EvalTransform: {name} must be a positive integer (pixels), got "
                          f"{value!r}")
    return int(value)


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side, centre crop, scale and normalise (module docstring).

    Args:
        resize: the shorter side after resizing, ``R`` pixels.
        crop: the side of the centred square kept, ``S <= R`` pixels (the model's input size).
        mean, std: one value per channel in ``[0, 1]`` units, or both None (no
            normalisation); e.g. :data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`.
        interpolation: a Pillow filter name of :data:`anycnn.data.images.RESAMPLE_FILTERS`.

    Raises:
        ConfigError: a size that is not a positive integer, ``crop > resize``, only one of
            ``mean``/``std``, values :class:`~anycnn.data.augment.Normalize` refuses, an
            unknown filter.
    """

    resize: int
    crop: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        from .images import RESAMPLE_FILTERS

        resize, crop = _side("resize", self.resize), _side("crop", self.crop)
        if crop > resize:
            raise ConfigError(f"EvalTransform: crop {crop} is larger than resize {resize}; the "
                              "centre crop must fit in the resized shorter side")
        if (self.mean is None) != (self.std is None):
            raise ConfigError("EvalTransform: give both mean and std, or neither")
        if self.interpolation not in RESAMPLE_FILTERS:
            raise ConfigError(f"EvalTransform: unknown interpolation {self.interpolation!r}; "
                              f"valid names: {', '.join(RESAMPLE_FILTERS)}")
        object.__setattr__(self, "resize", resize)
        object.__setattr__(self, "crop", crop)
        if self.mean is not None:
            norm = Normalize(self.mean, self.std)
            object.__setattr__(self, "mean", norm.mean)
            object.__setattr__(self, "std", norm.std)

    @classmethod
    def imagenet(cls, resize: int = 256, crop: int = 224) -> EvalTransform:
        """torchvision's default for its ImageNet weights: shorter side 256, centre 224,
        ImageNet mean/std, bilinear."""
        return cls(resize, crop, IMAGENET_MEAN, IMAGENET_STD, "bilinear")

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> EvalTransform:
        """The transform of a record (module docstring); ``interpolation`` defaults to
        ``"bilinear"``, ``mean``/``std`` to None.

        Raises:
            ConfigError: not a mapping, missing ``resize``/``crop``, an unknown key, or values
                the constructor refuses.
        """
        if not isinstance(record, Mapping):
            raise ConfigError(f"an eval transform record must be an object with keys "
                              f"{', '.join(RECORD_KEYS)}; got {type(record).__name__}")
        unknown = sorted(set(record) - set(RECORD_KEYS))
        missing = [k for k in ("resize", "crop") if k not in record]
        if unknown or missing:
            what = (f"unknown key(s) {', '.join(map(str, unknown))}" if unknown
                    else f"no {' or '.join(missing)}")
            raise ConfigError(f"eval transform record {dict(record)!r}: {what}; expected "
                              f"{', '.join(RECORD_KEYS)}")
        mean, std = record.get("mean"), record.get("std")
        return cls(record["resize"], record["crop"],
                   None if mean is None else tuple(_list(mean)),
                   None if std is None else tuple(_list(std)),
                   record.get("interpolation", "bilinear"))

    def to_record(self) -> dict[str, Any]:
        """JSON-able ``{"resize", "crop", "mean", "std", "interpolation"}``."""
        return {"resize": self.resize, "crop": self.crop,
                "mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std),
                "interpolation": self.interpolation}

    @property
    def image_size(self) -> tuple[int, int]:
        """``(crop, crop)``: the ``(H, W)`` of the prepared images."""
        return self.crop, self.crop

    @property
    def normalize(self) -> Normalize | None:
        """The :class:`~anycnn.data.augment.Normalize` of step 4, or None."""
        return None if self.mean is None else Normalize(self.mean, self.std)

    def load(self, paths: Iterable[str | os.PathLike], channels: int = 3) -> np.ndarray:
        """Steps 1-3 for image files: ``uint8`` ``(N, crop, crop, channels)``.

        Raises:
            DataError: a file cannot be read (named).
        """
        from .images import load_images

        return load_images(paths, self.image_size, channels, self.interpolation,
                           resize_shorter=self.resize)

    def prepare(self, paths: Sequence[str | os.PathLike], channels: int = 3,
                dtype: str = "float32") -> np.ndarray:
        """All four steps: host ``(N, crop, crop, channels)`` floats of ``dtype``, normalised
        exactly as a :class:`~anycnn.data.dataloader.DataLoader` with this ``normalize``
        does (``uint8`` ``/ 255`` correctly rounded, then ``(x - mean) / std``)."""
        import array_api_compat.numpy as host_xp

        from .augment import to_unit_range

        x = to_unit_range(host_xp, self.load(paths, channels), dtype)
        norm = self.normalize
        return np.asarray(x if norm is None else norm.apply(x))


def _list(values: Any) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise ConfigError(f"EvalTransform: mean and std must be lists of numbers, got "
                          f"{values!r}")
    return list(values)
