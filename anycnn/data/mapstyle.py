"""Map-style datasets: any object with ``__len__`` and ``__getitem__(i) -> (image, label)``.

A :class:`~anycnn.data.dataloader.DataLoader` batches such a dataset (in the calling process or
in worker processes, :mod:`anycnn.data.workers`) through the pieces here:

* :func:`collate` turns the samples of one batch into host arrays ``images (B, H, W, C)`` and
  ``labels int64 (B,)``. An image is a NumPy array ``(H, W, C)`` or ``(H, W)`` (grayscale: a
  channel axis is added), ``uint8`` (0-255) or ``float32``/``float64`` in ``[0, 1]``, or anything
  ``np.asarray`` turns into one (a PIL image, for instance); a label is an integer class id, or
  a vector of ``K`` targets in ``[0, 1]`` (multi-label or soft targets, as an
  :class:`~anycnn.data.arrays.ArrayDataset`'s ``(N, K)`` labels; batched as float32 ``(B, K)``).
  Every image of a dataset has the shape and dtype of ``dataset[0]``, and every label its kind
  (:func:`probe`);
* :func:`fetch` reads one batch: ``dataset[i]`` for each index, or one
  ``dataset.__getitems__(indices)`` call where the dataset's class defines it (PyTorch's
  loader calls it too), returning the list of pairs; a dataset reading image files can then
  decode the batch together (:func:`anycnn.data.images.load_images`);
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
          expect: tuple[tuple[int, ...], str, int | None] | None) -> tuple[np.ndarray, np.ndarray]:
    """``collate([dataset[i] for i in index])`` with the generators seeded for the batch
    (:func:`seeded`); ``expect`` is what :func:`probe` returned for ``dataset[0]``. A dataset
    whose class defines ``__getitems__(indices)`` (as PyTorch's loader also calls it) gets the
    batch's indices in one call and returns the list of their ``(image, label)`` pairs.

    Raises:
        DataError: ``__getitems__`` returned something else than one pair per index (and
            :func:`collate`'s errors).
    """
    getitems = getattr(type(dataset), "__getitems__", None)
    with seeded(info, restore):
        if getitems is None:
            samples = [dataset[int(i)] for i in index]
        else:  # the whole batch at once (e.g. decoded together)
            samples = getitems(dataset, [int(i) for i in index])
            if not isinstance(samples, Sequence) or len(samples) != len(index):
                raise DataError(f"{type(dataset).__name__}.__getitems__ of {len(index)} indices "
                                f"must return a list of as many (image, label) pairs, got "
                                f"{_describe(samples)}")
    return collate(samples, index, expect)


def _describe(value: Any) -> str:
    if isinstance(value, Sequence):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__


def probe(dataset: Any, seed: int) -> tuple[tuple[int, int, int], str, int | None] | None:
    """``((H, W, C), dtype, K)`` of ``dataset[0]`` (its image's shape and dtype, its target
    vector's length or None for a class id; checked as :func:`collate` does), or None for an
    empty dataset. ``dataset[0]`` is read as in batch 0 of epoch 0 of a loader with
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
    return image.shape, image.dtype.name, _width(label)


def collate(samples: Sequence[Any], index: Sequence[int],
            expect: tuple[tuple[int, ...], str, int | None] | None = None,
            ) -> tuple[np.ndarray, np.ndarray]:
    """Stack ``samples`` (``dataset[i]`` for ``i`` in ``index``) into ``images (B, H, W, C)``
    and ``labels``: int64 ``(B,)`` class ids, or float32 ``(B, K)`` targets.

    Raises:
        DataError: a sample is not an ``(image, label)`` pair, an image has another rank, dtype
            or shape than ``expect`` (or than the first sample), a float image leaves
            ``[0, 1]``, or a label is neither an integer nor a vector of numbers in ``[0, 1]``,
            or not of the kind (and length) of the first; the dataset index is named.
    """
    images, labels = [], []
    shape = dtype = None
    if expect is not None:
        shape, dtype = tuple(expect[0]), np.dtype(expect[1])
    for sample, i in zip(samples, index, strict=True):
        if (shape is not None and expect[2] is None and type(sample) is tuple
                and len(sample) == 2):  # the fast path: an ndarray and an int
            image, label = sample
            if (type(image) is np.ndarray and image.dtype == dtype
                    and type(label) in _FAST_LABELS):
                if image.shape == shape:
                    images.append(image)
                    labels.append(label)
                    continue
                if shape[2] == 1 and image.shape == shape[:2]:  # grayscale (H, W)
                    images.append(image.reshape(shape))
                    labels.append(label)
                    continue
        image, label = _check_sample(sample, int(i))
        if expect is None:
            expect = (image.shape, image.dtype.name, _width(label))
            shape, dtype = image.shape, image.dtype
        if _width(label) != expect[2]:
            raise DataError(f"dataset[{int(i)}]'s label is {_kind(_width(label))}, but "
                            f"dataset[0]'s is {_kind(expect[2])}: every label of a map-style "
                            "dataset needs the same kind")
        labels.append(label)
        if image.shape != tuple(expect[0]) or image.dtype.name != expect[1]:
            raise DataError(f"dataset[{int(i)}] is a {image.dtype.name} image of shape "
                            f"{image.shape}, but dataset[0] is {expect[1]} of shape "
                            f"{tuple(expect[0])}: every image of a map-style dataset needs the "
                            "same shape and dtype (resize or crop them in __getitem__)")
        images.append(image)
    width = None if expect is None else expect[2]
    if width is None:
        labels = np.array(labels, np.int64)
    else:
        labels = np.stack(labels) if labels else np.empty((0, width), np.float32)
    if not images:
        shape, dtype = ((0, 0, 0), "uint8") if expect is None else expect[:2]
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
    return array, _check_label(label, i)


def _check_label(label: Any, i: int) -> int | np.ndarray:
    """``label`` as an int class id or a float32 ``(K,)`` target vector, or a DataError."""
    if isinstance(label, np.ndarray) and label.ndim == 0:
        label = label[()]
    if isinstance(label, numbers.Integral) and not isinstance(label, bool | np.bool_):
        return int(label)
    if isinstance(label, list | tuple | np.ndarray):
        targets = np.asarray(label)
        if (targets.ndim == 1 and targets.size
                and (np.issubdtype(targets.dtype, np.number) or targets.dtype == np.bool_)):
            targets = targets.astype(np.float32)
            if not (targets.min() >= 0 and targets.max() <= 1):  # NaN: False
                raise DataError(f"dataset[{i}]'s targets must lie in [0, 1] (multi-label 0/1 "
                                f"or soft targets); got {label!r}")
            return targets
    raise DataError(f"dataset[{i}]'s label must be an integer class id or a vector of targets "
                    f"in [0, 1], got {type(label).__name__} {label!r}")


def _width(label: int | np.ndarray) -> int | None:
    return None if isinstance(label, int) else len(label)


def _kind(width: int | None) -> str:
    return "a class id" if width is None else f"a vector of {width} targets"
