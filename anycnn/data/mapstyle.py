"""Map-style datasets: any object with ``__len__`` and ``__getitem__(i) -> (image, label)``.

A :class:`~anycnn.data.dataloader.DataLoader` batches such a dataset (in the calling process or
in worker processes, :mod:`anycnn.data.workers`) through the pieces here:

* :func:`collate` turns the samples of one batch into host arrays ``images (B, H, W, C)`` and
  ``labels int64 (B,)``. An image is a NumPy array ``(H, W, C)`` or ``(H, W)`` (grayscale: a
  channel axis is added), ``uint8`` (0-255) or ``float32``/``float64`` in ``[0, 1]``, or anything
  ``np.asarray`` turns into one (a PIL image, for instance); a label is an integer class id.
  Every image of a dataset has the shape and dtype of ``dataset[0]`` (:func:`probe`);
* :func:`seeded` runs one batch's ``__getitem__`` calls with Python's ``random`` and NumPy's
  global ``np.random`` (and torch's, when torch is imported already) seeded from
  ``np.random.SeedSequence([seed, epoch, batch, 0x6D6170])``: the loader's seed, the epoch, the
  batch's number in the epoch and a constant (ASCII "map") that keeps this stream apart from the
  shuffle's and the augmentation's. A dataset that draws random numbers per sample therefore
  gets the same ones whatever the worker count, and a run resumed mid-epoch gets them again. In
  the calling process (``num_workers=0``) the generators' previous states are restored after the
  batch. :func:`worker_info` tells a ``__getitem__`` which batch, epoch and worker it runs for,
  and the batch's seed (e.g. ``np.random.default_rng([info.seed, index])``).
"""

from __future__ import annotations

import contextlib
import numbers
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DataError

#: last word of the per-batch seed of a map-style dataset (ASCII "map"), see the module docstring
STREAM_TAG = 0x6D6170
_IMAGE_DTYPES = ("uint8", "float32", "float64")
_FAST_LABELS = frozenset({int, np.int64, np.int32, np.uint8, np.int16, np.uint16, np.uint32})


@dataclass(frozen=True)
class WorkerInfo:
    """What :func:`worker_info` returns while a batch of a map-style dataset is being built.

    Attributes:
        worker: the worker's number in ``[0, num_workers)``, or None in the calling process
            (``num_workers=0``).
        num_workers: the loader's ``num_workers``.
        seed: the batch's 64-bit seed (see the module docstring); the same for every worker
            count.
        epoch: the loader's epoch.
        batch: the batch's number in the epoch.
    """

    worker: int | None
    num_workers: int
    seed: int
    epoch: int
    batch: int


_current: WorkerInfo | None = None


def worker_info() -> WorkerInfo | None:
    """The :class:`WorkerInfo` of the batch being built when called from a map-style dataset's
    ``__getitem__`` under a :class:`~anycnn.data.dataloader.DataLoader` (in a worker or in the
    calling process); None anywhere else."""
    return _current


def is_map_style(dataset: Any) -> bool:
    """True when ``dataset`` has ``__len__`` and ``__getitem__``."""
    return hasattr(type(dataset), "__len__") and hasattr(type(dataset), "__getitem__")


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """The 64-bit seed of batch ``batch`` of epoch ``epoch`` (module docstring)."""
    words = np.random.SeedSequence([seed, epoch, batch, STREAM_TAG]).generate_state(2)
    return int(words[0]) << 32 | int(words[1])


@contextlib.contextmanager
def seeded(info: WorkerInfo, restore: bool) -> Iterator[None]:
    """Seed ``random``, ``np.random`` (and torch's generator if torch is imported) for the batch
    ``info`` describes, and publish ``info`` to :func:`worker_info`; with ``restore`` put the
    previous states back afterwards (the calling process)."""
    global _current
    torch = sys.modules.get("torch")
    saved = None
    if restore:
        saved = (random.getstate(), np.random.get_state(),  # noqa: NPY002 (the global one)
                 torch.random.get_rng_state() if torch is not None else None)
    random.seed(info.seed)
    np.random.seed(info.seed >> 32)  # noqa: NPY002 (the legacy generator takes 32 bits)
    if torch is not None:
        torch.manual_seed(info.seed)
    previous, _current = _current, info
    try:
        yield
    finally:
        _current = previous
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])  # noqa: NPY002
            if saved[2] is not None:
                torch.random.set_rng_state(saved[2])


def fetch(dataset: Any, index: Sequence[int], info: WorkerInfo, restore: bool,
          expect: tuple[tuple[int, ...], str] | None) -> tuple[np.ndarray, np.ndarray]:
    """``collate([dataset[i] for i in index])`` with the generators seeded for the batch
    (:func:`seeded`); ``expect`` is ``(image_shape, dtype)`` every image must have."""
    with seeded(info, restore):
        samples = [dataset[int(i)] for i in index]
    return collate(samples, index, expect)


def probe(dataset: Any, seed: int) -> tuple[tuple[int, int, int], str] | None:
    """``((H, W, C), dtype)`` of ``dataset[0]``'s image (checked as :func:`collate` does), or
    None for an empty dataset. ``dataset[0]`` is read as in batch 0 of epoch 0 of a loader with
    this ``seed``, in the calling process (:func:`seeded`, the generators restored after).

    Raises:
        DataError: ``dataset[0]`` is not an ``(image, label)`` pair of the accepted kinds.
    """
    if len(dataset) == 0:
        return None
    with seeded(WorkerInfo(None, 0, batch_seed(seed, 0, 0), 0, 0), restore=True):
        sample = dataset[0]
    image, label = _check_sample(sample, 0)
    collate([(image, label)], [0])  # the value range of float images
    return image.shape, image.dtype.name


def collate(samples: Sequence[Any], index: Sequence[int],
            expect: tuple[tuple[int, ...], str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stack ``samples`` (``dataset[i]`` for ``i`` in ``index``) into ``images (B, H, W, C)``
    and ``labels int64 (B,)``.

    Raises:
        DataError: a sample is not an ``(image, label)`` pair, an image has another rank, dtype
            or shape than ``expect`` (or than the first sample), a float image leaves
            ``[0, 1]``, or a label is not an integer; the dataset index is named.
    """
    images, labels = [], np.empty(len(samples), np.int64)
    shape = dtype = None
    if expect is not None:
        shape, dtype = tuple(expect[0]), np.dtype(expect[1])
    for k, (sample, i) in enumerate(zip(samples, index, strict=True)):
        if shape is not None and type(sample) is tuple and len(sample) == 2:  # the fast path
            image, label = sample
            if (type(image) is np.ndarray and image.dtype == dtype
                    and type(label) in _FAST_LABELS):
                if image.shape == shape:
                    images.append(image)
                    labels[k] = label
                    continue
                if shape[2] == 1 and image.shape == shape[:2]:  # grayscale (H, W)
                    images.append(image.reshape(shape))
                    labels[k] = label
                    continue
        image, labels[k] = _check_sample(sample, int(i))
        if expect is None:
            expect = (image.shape, image.dtype.name)
            shape, dtype = image.shape, image.dtype
        if image.shape != tuple(expect[0]) or image.dtype.name != expect[1]:
            raise DataError(f"dataset[{int(i)}] is a {image.dtype.name} image of shape "
                            f"{image.shape}, but dataset[0] is {expect[1]} of shape "
                            f"{tuple(expect[0])}: every image of a map-style dataset needs the "
                            "same shape and dtype (resize or crop them in __getitem__)")
        images.append(image)
    if not images:
        shape, dtype = expect or ((0, 0, 0), "uint8")
        return np.empty((0, *shape), dtype), labels
    batch = np.stack(images)
    if batch.dtype != np.uint8 and not (0 <= batch.min() and batch.max() <= 1):  # NaN: False
        bad = next(int(i) for img, i in zip(images, index, strict=True)
                   if not (0 <= img.min() and img.max() <= 1))
        raise DataError(f"dataset[{bad}] is a float image with values outside [0, 1] (or NaN): "
                        "float images must lie in [0, 1]; uint8 images (0-255) are divided by "
                        "255 by the loader")
    return batch, labels


def _check_sample(sample: Any, i: int) -> tuple[np.ndarray, int]:
    """``(image (H, W, C), label)`` of ``dataset[i]``, or a DataError naming what is wrong."""
    if not isinstance(sample, tuple | list) or len(sample) != 2:
        raise DataError(f"dataset[{i}] must be an (image, label) pair, got "
                        f"{type(sample).__name__}")
    image, label = sample
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.dtype.name not in _IMAGE_DTYPES:
        raise DataError(f"dataset[{i}]'s image must be (H, W, C) or (H, W), uint8 (0-255) or "
                        f"float32/float64 in [0, 1]; got {type(image).__name__} of dtype "
                        f"{array.dtype} and shape {array.shape}")
    c, h, w = array.shape
    if c in (1, 3, 4) and min(h, w) > 4:
        raise DataError(f"dataset[{i}]'s image of shape {array.shape} looks channels first "
                        f"(CHW); anycnn wants channels last (HWC). Fix: return "
                        "np.transpose(image, (1, 2, 0))")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if isinstance(label, np.ndarray) and label.ndim == 0:
        label = label[()]
    if isinstance(label, bool | np.bool_) or not isinstance(label, numbers.Integral):
        raise DataError(f"dataset[{i}]'s label must be an integer class id, got "
                        f"{type(label).__name__} {label!r}")
    return array, int(label)
