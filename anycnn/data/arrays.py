"""The value types every dataset loader returns: :class:`ArrayDataset` (images and labels in
host memory) and :class:`Splits` (a dataset's train / validation / test splits).

Layouts: images ``np.uint8`` NHWC ``(N, H, W, C)`` (or float32 / float64 in ``[0, 1]`` for
arrays of your own), labels ``np.int64`` ``(N,)`` in ``[0, num_classes)``. These names are also
importable from :mod:`anycnn.data.datasets` and :mod:`anycnn.data`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError

#: dtypes :class:`ArrayDataset` accepts for images: ``uint8`` (0-255) or floats in ``[0, 1]``.
IMAGE_DTYPES = ("uint8", "float32", "float64")


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Images and labels held in host memory.

    Attributes:
        images: shape ``(N, H, W, C)`` (NHWC), either ``np.uint8`` (0-255; the DataLoader divides
            by 255) or ``np.float32`` / ``np.float64`` with every value in ``[0, 1]`` (the
            DataLoader uses them as they are, only cast to its dtype). Grayscale images may be
            given as ``(N, H, W)``: a channel axis is added (a view, ``images[..., None]``).
        labels: ``np.int64``, shape ``(N,)``, values in ``[0, num_classes)`` (class ids); or
            targets of shape ``(N, num_classes)`` with values in ``[0, 1]`` (stored as
            ``np.float32``): 0/1 rows for multi-label data (train with
            :class:`~anycnn.nn.losses.BCEWithLogits`), one-hot or soft rows for
            :class:`~anycnn.nn.losses.SoftmaxCrossEntropy`.
        num_classes: number of classes (labels).

    Raises:
        DataError: on construction, if the shapes, dtypes, counts, label values or float image
            values (outside ``[0, 1]``, NaN or infinite) are invalid. Images that look channels
            first (NCHW: ``(N, C, H, W)`` with ``C`` 1, 3 or 4 and ``H``, ``W`` above 4) are
            refused with the transpose that makes them NHWC.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        images, labels = np.asarray(self.images), np.asarray(self.labels)
        if images.ndim == 3:
            images = images[..., None]
        _check_images(images)
        if not images.dtype.isnative:  # big-endian floats: native order for every backend
            images = images.astype(images.dtype.newbyteorder("="))
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        if int(self.num_classes) < 1:
            raise DataError(f"num_classes must be positive, got {self.num_classes}")
        if labels.ndim == 2:
            labels = _check_targets(labels, int(self.num_classes))
        elif labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"labels must be integers of shape (N,) or targets of shape (N, "
                            f"num_classes); got {labels.dtype} of shape {labels.shape}")
        elif labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DataError(f"labels must lie in [0, {self.num_classes}); found values from "
                            f"{labels.min()} to {labels.max()}")
        else:
            labels = labels.astype(np.int64, copy=False)
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "num_classes", int(self.num_classes))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def multi_label(self) -> bool:
        """True when ``labels`` holds ``(N, num_classes)`` targets rather than class ids."""
        return self.labels.ndim == 2

    def __repr__(self) -> str:
        return (f"ArrayDataset(n={len(self)}, image_shape={self.image_shape}, "
                f"num_classes={self.num_classes})")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        return tuple(self.images.shape[1:])

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """The examples at ``indices`` (a copy), in that order."""
        return ArrayDataset(np.take(self.images, indices, axis=0),
                            np.take(self.labels, indices, axis=0), self.num_classes)


def _check_targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``(N, num_classes)`` targets as float32, refusing another width, a non-numeric dtype or
    values outside ``[0, 1]`` (NaN included)."""
    if labels.shape[1] != num_classes:
        raise DataError(f"targets of shape {labels.shape} need one column per class "
                        f"(num_classes={num_classes})")
    if not (np.issubdtype(labels.dtype, np.number) or labels.dtype == np.bool_):
        raise DataError(f"targets must be numbers in [0, 1], got dtype {labels.dtype}")
    targets = labels.astype(np.float32, copy=False)
    if targets.size and not (targets.min() >= 0 and targets.max() <= 1):
        raise DataError("targets must lie in [0, 1] (multi-label 0/1 or soft); found values "
                        f"from {np.nanmin(targets)} to {np.nanmax(targets)}"
                        + (" and NaN" if np.isnan(targets).any() else ""))
    return targets


def _check_images(images: np.ndarray) -> None:
    """Raise DataError unless ``images`` is NHWC ``uint8``, or float32/float64 in ``[0, 1]``."""
    if images.ndim != 4 or images.dtype.name not in IMAGE_DTYPES:
        raise DataError("images must be uint8 (0-255) or float32/float64 (in [0, 1]) of shape "
                        f"(N, H, W, C) or (N, H, W); got {images.dtype} of shape {images.shape}")
    _, c, h, w = images.shape  # read as NCHW: a small "channel" axis second, large last two
    if c in (1, 3, 4) and min(h, w) > 4:
        raise DataError(f"images of shape {images.shape} look channels first (NCHW, {c} "
                        f"channel(s) of {h}x{w}); anycnn wants channels last (NHWC). Fix: "
                        "images = np.transpose(images, (0, 2, 3, 1))")
    if images.dtype == np.uint8 or images.size == 0:
        return
    low, high = images.min(), images.max()
    if 0 <= low and high <= 1:  # False for NaN too
        return
    finite = np.isfinite(images)
    bad = images.size - np.count_nonzero(finite)
    found = (f"values from {images[finite].min()} to {images[finite].max()}"
             if bad < images.size else "no finite values")
    if bad:
        found += f" and {bad} NaN/infinite value(s)"
    raise DataError(f"float images must lie in [0, 1]; found {found}. Scale them first "
                    "(uint8 images are also accepted and divided by 255 when batched)")


@dataclass(frozen=True, eq=False)
class Splits:
    """A dataset's train / validation / test splits.

    Attributes:
        name: the dataset name (one of :data:`DATASETS`).
        train, val, test: :class:`ArrayDataset` each; ``test`` may be the same object as ``val``.
        source: where the files came from, in words (for logs).
        class_names: one display name per class.
    """

    name: str
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    source: str
    class_names: tuple[str, ...] = field(default=())

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    def __repr__(self) -> str:
        return (f"Splits(name={self.name!r}, train={len(self.train)}, val={len(self.val)}, "
                f"test={len(self.test)}, image_shape={self.image_shape}, source={self.source!r})")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        return self.train.image_shape
