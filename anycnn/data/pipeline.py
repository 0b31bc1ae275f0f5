"""Composed training augmentation: :class:`AugmentPipeline`, what ``--augment`` builds when it
names more than a crop and a flip (e.g. ``rrc,flip,jitter=0.4,mixup=0.2``).

A :class:`~anycnn.data.dataloader.DataLoader` with a pipeline runs, on the current backend's
device, for each batch:

1. ``geometry`` — an :class:`~anycnn.data.augment.Augment` (padded crop, flip; on the stored
   pixels) or a :class:`~anycnn.data.resized_crop.RandomResizedCrop` (after step 2), or None;
2. scaling to ``[0, 1]`` in the loader's dtype;
3. ``rotate`` (:class:`~anycnn.data.rotation.RandomRotation`), then ``jitter``
   (:class:`~anycnn.data.color.ColorJitter`);
4. normalisation (the loader's ``normalize``);
5. ``erase`` (:class:`~anycnn.data.erasing.RandomErasing`);
6. ``mix`` (:class:`~anycnn.data.mixing.BatchMix`): the batch's labels become soft targets
   ``(B, K)``; train with :class:`~anycnn.nn.losses.SoftmaxCrossEntropy`, which takes soft targets.

**Randomness.** ``geometry`` draws exactly as on its own (from
:func:`~anycnn.data.augment.batch_generator`), so ``crop=4,flip`` gives the same batches inside
a pipeline as without one. Each other step draws from its own stream,
:func:`op_generator` ``(seed, epoch, batch, tag)`` (tags: rotate 1, jitter 2, erase 3, mix 4),
for the whole global batch. Every draw therefore depends on (seed, epoch, batch number) only:
a run resumed mid-epoch (:meth:`DataLoader.iter_from`) sees the same batches, and a step added
or removed leaves the others' draws unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from .color import ColorJitter
from .erasing import RandomErasing
from .mixing import BatchMix
from .rotation import RandomRotation

#: ``kind`` of an :class:`AugmentPipeline` in a preprocess record
KIND = "pipeline"


def op_generator(seed: int, epoch: int, batch: int, tag: int) -> np.random.Generator:
    """The host generator of step ``tag`` for batch ``batch`` of epoch ``epoch`` (module
    docstring); apart from :func:`~anycnn.data.augment.batch_generator`'s stream."""
    from .augment import STREAM_TAG

    return np.random.default_rng([seed, epoch, batch, STREAM_TAG, tag])


_STEPS = {"rotate": RandomRotation, "jitter": ColorJitter, "erase": RandomErasing,
          "mix": BatchMix}


@dataclass(frozen=True)
class AugmentPipeline:
    """Geometry, rotation, colour jitter, erasing and mixing, each optional (module
    docstring).

    Raises:
        ConfigError: a step of the wrong type, or no step at all.
    """

    geometry: Any = None
    rotate: RandomRotation | None = None
    jitter: ColorJitter | None = None
    erase: RandomErasing | None = None
    mix: BatchMix | None = None

    #: the loader runs a pipeline on the device, from the scaled batch on
    before_scaling = False

    def __post_init__(self) -> None:
        from .augment import Augment
        from .resized_crop import RandomResizedCrop

        if self.geometry is not None and not isinstance(self.geometry,
                                                        Augment | RandomResizedCrop):
            raise ConfigError(f"AugmentPipeline: geometry must be an Augment, a "
                              f"RandomResizedCrop or None, got {type(self.geometry).__name__}")
        if self.geometry is not None and not self.geometry.active:
            object.__setattr__(self, "geometry", None)
        for name, kind in _STEPS.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ConfigError(f"AugmentPipeline: {name} must be a {kind.__name__} or None, "
                                  f"got {type(value).__name__}")
        if not self.active:
            raise ConfigError("AugmentPipeline: no step given")

    @property
    def active(self) -> bool:
        return self.geometry is not None or any(getattr(self, n) is not None for n in _STEPS)

    def check_image_shape(self, height: int, width: int) -> None:
        """The geometry's check (e.g. a crop padding at most half the image)."""
        if self.geometry is not None:
            self.geometry.check_image_shape(height, width)

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        """The geometry's output size (the other steps keep the size)."""
        return self.geometry.output_shape(height, width) if self.geometry else (height, width)

    def draw_steps(self, seed: int, epoch: int, batch: int, count: int,
                   image_size: tuple[int, int]) -> dict[str, Any]:
        """Host draws of the non-geometry steps for a batch of ``count`` images of
        ``image_size`` ``(H, W)`` (the geometry's output size): ``{"rotate": (2, count),
        "jitter": (4, count), "erase": (5, count), "mix": MixDraw}`` for the steps present."""
        h, w = image_size
        out: dict[str, Any] = {}
        for name in ("rotate", "jitter"):
            step = getattr(self, name)
            if step is not None:
                out[name] = step.draw(op_generator(seed, epoch, batch, step.tag), count)
        for name in ("erase", "mix"):
            step = getattr(self, name)
            if step is not None:
                out[name] = step.draw(op_generator(seed, epoch, batch, step.tag), count, h, w)
        return out

    def to_record(self) -> dict[str, Any]:
        """JSON-able ``{"kind": "pipeline", "geometry": ... or null, "rotate": ..., ...}``."""
        record: dict[str, Any] = {"kind": KIND}
        record["geometry"] = self.geometry.to_record() if self.geometry else None
        for name in _STEPS:
            step = getattr(self, name)
            record[name] = step.to_record() if step is not None else None
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> AugmentPipeline:
        """The pipeline of :meth:`to_record` (raises TypeError/ConfigError when bad)."""
        from .augment import _read_augment

        geometry = record.get("geometry")
        steps = {name: (kind(**record[name]) if record.get(name) is not None else None)
                 for name, kind in _STEPS.items()}
        return cls(_read_augment(geometry) if geometry is not None else None, **steps)

    def spec(self) -> str:
        """The ``--augment`` text that gives this pipeline back
        (:func:`anycnn.data.augment.parse_augment`; an erasing's non-default ``scale`` and
        ``ratio`` have no spelling there)."""
        parts = [self.geometry.spec()] if self.geometry is not None else []
        parts += [getattr(self, n).spec() for n in _STEPS if getattr(self, n) is not None]
        return ",".join(parts)
