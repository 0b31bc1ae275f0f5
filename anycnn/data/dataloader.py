"""Mini-batches of an :class:`~anycnn.data.arrays.ArrayDataset` on the current backend.

Each batch is ``(x, y)``: ``x`` float ``(B, H, W, C)`` (NHWC) in ``[0, 1]``, ``y`` int64 ``(B,)``,
both on :func:`anycnn.backend.get_backend` as it is when iteration starts. ``x`` holds
``images / 255`` for ``uint8`` images, and float images (already in ``[0, 1]``) as they are, only
cast to the loader's dtype. The cast and the scaling are each correctly rounded, so batches are
bit-identical on every backend and in both modes:

* default: gather the batch on the host (``np.take``), scale it, copy it to the device;
* ``device_resident=True``: copy the whole dataset to the device once (first iteration; in its
  own dtype, so ``uint8`` images take a quarter of the memory of float32), then per batch move
  only the index vector and gather (``xp.take``) and scale on the device.

Shuffling is deterministic per epoch: epoch ``e`` uses the permutation drawn from
``np.random.default_rng([seed, e])``, so a resumed run sees the same order (call
:meth:`DataLoader.set_epoch` before iterating; the default is epoch 0).

Optional per-batch preprocessing (:mod:`anycnn.data.augment`): ``augment=Augment(crop, flip)`` and
``normalize=Normalize(mean, std)`` (or ``"auto"``: statistics of this loader's dataset), applied
in the order crop -> flip -> scale to ``[0, 1]`` -> normalise, where the batch is gathered (on
the host by default, on the device with ``device_resident``; with an augmentation the batch's
``(3, B)`` int64 crop/flip parameters cross the bus too). Crops and flips depend only on (seed,
epoch, batch number), so they too are the same on every backend, in both modes and after
:meth:`DataLoader.iter_from`. Validation and test loaders take the *training* loader's
``normalize`` and no ``augment``.

A random-resized crop (``augment=RandomResizedCrop(size, flip=...)``,
:mod:`anycnn.data.resized_crop`) resamples instead: scale -> resized crop and flip ->
normalise, always on the current backend's device (a host-gathered batch is copied there as
``uint8`` first), and the batches are ``(B, size, size, C)`` whatever the stored image size;
its boxes too depend only on (seed, epoch, batch number).

A composed augmentation (``augment=AugmentPipeline(...)``, :mod:`anycnn.data.pipeline`: crop or
random-resized crop, rotation, colour jitter, erasing, MixUp/CutMix) also runs on the device:
geometry -> scale -> rotation -> jitter -> normalise -> erasing -> mixing. With mixing, the
batches are ``(x, soft_targets)``, ``soft_targets`` float ``(B, K)`` in the loader's dtype
(train with :class:`~anycnn.nn.losses.SoftmaxCrossEntropy`, which takes soft targets);
mixing pairs images across the whole batch, so it cannot be sharded.

Data-parallel training (:mod:`anycnn.dist`): with ``shard=(rank, size)`` ``batch_size`` is the
*global* batch. Every rank derives the same order and the same batches; rank ``r`` takes the
contiguous share ``[B*r//size, B*(r+1)//size)`` of each batch of ``B`` examples (shares differ by
at most one example, and may be empty when ``B < size``), augmented with the parameters drawn for
the whole batch, so the ``size`` shares of a batch are exactly the single-process batch, cut.
``len(loader)`` is the number of global batches, the same on every rank.

Map-style datasets (:mod:`anycnn.data.mapstyle`): any object with ``__len__`` and
``__getitem__(i) -> (image, label)`` (an HWC image as a NumPy array or a PIL image, an integer
label) is batched too, in the same order (the permutations above) with the same augmentation and
scaling, so a batch depends on (seed, epoch, batch number) alone: not on ``num_workers``, and a
run resumed mid-epoch (:meth:`DataLoader.iter_from`) gets the very batches it would have had.
With ``num_workers=0`` the samples are read in the calling process, one batch at a time; with
``num_workers > 0`` worker processes (:mod:`anycnn.data.workers`) read them, and a prefetch
thread (:mod:`anycnn.data.prefetch`) preprocesses and copies up to two batches to the device
ahead of the step. An :class:`~anycnn.data.arrays.ArrayDataset` always takes the in-memory path
described above (no workers, no copies), whatever ``num_workers``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from typing import Any

import array_api_compat.numpy as host_xp
import numpy as np

from ..backend import Backend, asarray, get_backend
from ..errors import ConfigError
from .arrays import ArrayDataset
from .augment import Augment, Normalize, preprocess_record, to_unit_range
from .mapstyle import WorkerInfo, batch_seed, fetch, is_map_style, probe
from .pipeline import AugmentPipeline
from .prefetch import Prefetcher
from .resized_crop import RandomResizedCrop

_FLOAT_DTYPES = ("float32", "float64")
#: default ``worker_nice``: the workers' priority a little below the training process's
WORKER_NICE = 5


def share_of(n: int, rank: int, size: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous share of ``n`` examples split over
    ``size`` ranks: ``[n*rank//size, n*(rank+1)//size)`` (shares differ by at most one)."""
    return n * rank // size, n * (rank + 1) // size


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        bound = "a positive" if minimum == 1 else "a non-negative"
        raise ConfigError(f"{name} must be {bound} integer, got {value!r}")
    return int(value)


class DataLoader:
    """Iterate over ``dataset`` in batches of ``batch_size``; ``len(loader)`` is the batch count.

    Args:
        dataset: the examples: an :class:`~anycnn.data.arrays.ArrayDataset` (host NHWC images,
            ``uint8`` or floats in ``[0, 1]``; ``int64`` labels), or a map-style dataset
            (``__len__`` and ``__getitem__(i) -> (image, label)``, see the module docstring).
        batch_size: examples per batch (the last one may be smaller unless ``drop_last``).
        shuffle: visit the examples in a per-epoch permutation instead of in order.
        seed: selects the permutations (with the epoch number).
        drop_last: skip a final batch smaller than ``batch_size``.
        device_resident: keep the whole dataset on the device and gather batches there.
        dtype: ``"float32"`` (default) or ``"float64"`` for ``x``.
        augment: random crop/flip of each training batch (:class:`~anycnn.data.augment.Augment`,
            or :class:`~anycnn.data.resized_crop.RandomResizedCrop`), a composed
            :class:`~anycnn.data.pipeline.AugmentPipeline`, or None.
        normalize: a :class:`~anycnn.data.augment.Normalize`, ``"auto"`` (computed once from this
            loader's images, see :meth:`Normalize.from_images`), or None.
        shard: ``(rank, size)``: yield only rank ``rank``'s share of each batch (see the module
            docstring); None (default) yields whole batches. :meth:`set_shard` changes it.
        num_workers: worker processes reading a map-style dataset (0, the default: read in the
            calling process); the workers start at the first iteration and live until
            :meth:`close` (or the loader's end). Ignored for an ``ArrayDataset``.
        worker_nice: added to the workers' nice value (``os.nice``, where the platform has
            it), 0 to 19; above 0 the workers also ask Linux for 0.1 ms time slices
            (:mod:`anycnn.data.priority`). The default 5 lowers their priority a little, so
            the training step's threads win a contended core at once while a worker that
            falls behind still gets its share; 0 schedules the workers as the calling process.

    Raises:
        ConfigError: an argument is out of range, the crop is too large for the images,
            ``normalize`` has another channel count than the images, or a map-style dataset
            is combined with ``device_resident`` or ``normalize="auto"``.
        DataError: ``dataset[0]`` of a map-style dataset is not an ``(image, label)`` pair of
            the accepted kinds.
    """

    def __init__(self, dataset: ArrayDataset, batch_size: int, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, device_resident: bool = False,
                 dtype: str = "float32", augment: Any = None,
                 normalize: Normalize | str | None = None,
                 shard: tuple[int, int] | None = None, num_workers: int = 0,
                 worker_nice: int = WORKER_NICE) -> None:
        self._map_style = not isinstance(dataset, ArrayDataset)
        if self._map_style and (not is_map_style(dataset) or hasattr(dataset, "__array__")
                                or hasattr(dataset, "__array_namespace__")):
            raise ConfigError(f"dataset must be an ArrayDataset or a map-style dataset (with "
                              f"__len__ and __getitem__(i) returning (image, label)), got "
                              f"{type(dataset).__name__}; wrap arrays as "
                              "ArrayDataset(images, labels, num_classes)")
        if dtype not in _FLOAT_DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(_FLOAT_DTYPES)}, got {dtype!r}")
        self.dataset = dataset
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.device_resident = bool(device_resident)
        self.dtype = dtype
        self.epoch = 0
        self.num_workers = _check_int("num_workers", num_workers, 0)
        self.worker_nice = _check_int("worker_nice", worker_nice, 0)
        if self.worker_nice > 19:
            raise ConfigError(f"worker_nice must be at most 19 (the lowest priority), got "
                              f"{worker_nice!r}")
        self._pool: Any = None  # WorkerPool of a map-style dataset, started when first needed
        self._active: Prefetcher | None = None
        self._sample: tuple[Any, ...] | None = None  # mapstyle.probe: shape, dtype, K
        if self._map_style:
            _check_map_options(self.device_resident, normalize)
            self._sample = probe(dataset, self.seed)
        #: ``(H, W, C)`` of one image (of ``dataset[0]`` for a map-style dataset; None if empty)
        self.image_shape = (dataset.image_shape if not self._map_style else
                            None if self._sample is None else tuple(self._sample[0]))
        self.augment = _check_augment(augment, self)
        self.normalize = _check_normalize(normalize, dataset, self.image_shape)
        if (self._map_style and isinstance(self.augment, AugmentPipeline) and self.augment.mix
                and not isinstance(getattr(dataset, "num_classes", None), numbers.Integral)):
            raise ConfigError("MixUp/CutMix need the class count: give the map-style dataset a "
                              "num_classes attribute (an int)")
        self._resident: tuple[Backend, Any, Any] | None = None  # (backend, images, labels)
        self.shard: tuple[int, int] | None = None
        if shard is not None:
            self.set_shard(*shard)

    @property
    def preprocess(self) -> dict[str, Any]:
        """This loader's preprocessing as JSON-able data (what checkpoints record; see
        :func:`anycnn.data.augment.preprocess_record`)."""
        return preprocess_record(self.augment, self.normalize,
                                 multi_label=bool(getattr(self.dataset, "multi_label", False)))

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s permutation for the following iterations."""
        self.epoch = _check_int("epoch", epoch, 0)

    def set_shard(self, rank: int, size: int) -> None:
        """Yield rank ``rank``'s share of each global batch from now on (``size`` 1: whole
        batches)."""
        size = _check_int("shard size", size, 1)
        if size > 1 and isinstance(self.augment, AugmentPipeline) and self.augment.mix:
            raise ConfigError("MixUp/CutMix pair images across the whole batch and cannot be "
                              "sharded over several ranks; train on one process or drop "
                              "mixup/cutmix")
        rank = _check_int("shard rank", rank, 0)
        if rank >= size:
            raise ConfigError(f"shard rank must be below the shard size {size}, got {rank}")
        self.shard = None if size == 1 else (rank, size)

    def share(self, n: int) -> tuple[int, int]:
        """``(start, stop)``: this loader's share of a global batch of ``n`` examples."""
        return (0, n) if self.shard is None else share_of(n, *self.shard)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self) -> np.ndarray:
        """The int64 example indices of the current epoch, in visiting order."""
        return self._order_of(self.epoch)

    def _order_of(self, epoch: int) -> np.ndarray:
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(n).astype(np.int64)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[tuple[Any, Any]]:
        """The current epoch's batches from batch number ``start`` on (to resume mid-epoch);
        the skipped batches are not built."""
        start = _check_int("start", start, 0)
        if start > len(self):
            raise ConfigError(f"start must be at most {len(self)} (the number of batches), "
                              f"got {start}")
        return self._generate(start)

    def _plan(self, order: Any, start: int) -> Iterator[tuple[int, Any, tuple[int, int, int]]]:
        """``(batch number, example indices, (lo, hi, whole))`` of each batch from ``start``."""
        n = len(self.dataset)
        for b in range(start, len(self)):
            first = b * self.batch_size
            whole = min(first + self.batch_size, n) - first
            lo, hi = self.share(whole)
            yield b, order[first + lo:first + hi], (lo, hi, whole)

    def _generate(self, start: int) -> Iterator[tuple[Any, Any]]:
        backend = get_backend()
        if self._map_style:
            yield from self._map_batches(backend, start)
            return
        order = self.order()
        if self.device_resident:  # one upload of the epoch's order, then slices on the device
            order = asarray(order, backend=backend)
        for b, index, share in self._plan(order, start):
            if self.device_resident:
                yield self._device_batch(backend, b, index, share)
            else:
                yield self._host_batch(backend, b, index, share)

    def _map_batches(self, backend: Backend, start: int) -> Iterator[tuple[Any, Any]]:
        """A map-style dataset's batches: read in this process, or by the workers with the
        prefetch thread preparing and copying them (module docstring)."""
        self._stop_prefetch()
        plan, seed, epoch = list(self._plan(self.order(), start)), self.seed, self.epoch
        if self.num_workers == 0:
            for b, index, share in plan:
                info = WorkerInfo(None, 0, batch_seed(seed, epoch, b), epoch, b)
                raw, labels = fetch(self.dataset, index, info, True, self._sample)
                yield self._host_batch(backend, b, (raw, labels), share)
            return
        if not plan:
            return
        if self._pool is None or self._pool.closed:
            from .workers import WorkerPool

            self._pool = WorkerPool(self.dataset, self.num_workers, self._sample,
                                    self.worker_nice)
        pool = self._pool

        following = [(b, index) for b, index, _ in self._plan(self._order_of(epoch + 1), 0)]

        def produce(stop):
            results = pool.batches([(b, index) for b, index, _ in plan], seed, epoch, stop,
                                   then=(following, seed, epoch + 1))
            for (b, _, share), batch in zip(plan, results, strict=True):
                yield self._host_batch(backend, b, batch, share)

        self._active = Prefetcher(produce, depth=2)
        yield from self._active

    def _stop_prefetch(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None

    def close(self) -> None:
        """Stop a prefetch in progress and end the worker processes (a later iteration starts
        new ones). Also called by ``with DataLoader(...) as loader:`` on leaving the block."""
        self._stop_prefetch()
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> DataLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _host_batch(self, backend: Backend, b: int, index: np.ndarray | tuple[Any, Any],
                    share: tuple[int, int, int]) -> tuple[Any, Any]:
        """Batch ``b`` gathered on the host at ``index`` (or given as host ``(images,
        labels)``), prepared, on ``backend``."""
        if isinstance(index, tuple):
            raw, labels = index
        else:
            raw = np.take(self.dataset.images, index, axis=0)
            labels = np.take(self.dataset.labels, index, axis=0)
        y = asarray(labels, backend=backend)
        if self.augment is not None and not self.augment.before_scaling:  # resample there
            return self._prepare(backend.xp, asarray(raw, backend=backend), b, backend,
                                 share, y)
        x = self._prepare(host_xp, raw, b, None, share)
        return asarray(x, backend=backend), y

    def _device_batch(self, backend: Backend, b: int, index: Any,
                      share: tuple[int, int, int]) -> tuple[Any, Any]:
        if self._resident is None or self._resident[0] != backend:
            self._resident = (backend, asarray(self.dataset.images, backend=backend),
                              asarray(self.dataset.labels, backend=backend))
        _, images, labels = self._resident
        xp = backend.xp
        y = xp.take(labels, index, axis=0)
        if isinstance(self.augment, AugmentPipeline):
            return self._prepare(xp, xp.take(images, index, axis=0), b, backend, share, y)
        x = self._prepare(xp, xp.take(images, index, axis=0), b, backend, share)
        return x, y

    def _prepare(self, xp: Any, raw: Any, b: int, backend: Backend | None,
                 share: tuple[int, int, int], labels: Any = None) -> Any:
        """Batch number ``b``'s gathered images ``raw`` (B, H, W, C), on the host
        (``backend`` None) or on ``backend``'s device: augmented, scaled, normalised.
        ``share`` is ``(start, stop, whole)``: ``raw`` holds examples ``start:stop`` of the
        ``whole`` examples of the global batch (augmentation is drawn for all of them).
        With ``labels`` (the batch's, on the device) returns ``(x, targets)``."""
        pipeline = self.augment if isinstance(self.augment, AugmentPipeline) else None
        geometry = pipeline.geometry if pipeline is not None else self.augment
        params = None
        lo, hi, whole = share
        if geometry is not None:
            params = geometry.draw(self.seed, self.epoch, b, whole,
                                   self.image_shape[:2])[:, lo:hi]
            if backend is not None:
                params = asarray(params, backend=backend)
            if geometry.before_scaling:
                raw = geometry.apply(raw, params)
        x = to_unit_range(xp, raw, self.dtype)
        if params is not None and not geometry.before_scaling:
            x = geometry.apply(x, params)
        steps = {}
        if pipeline is not None:
            steps = pipeline.draw_steps(self.seed, self.epoch, b, whole, x.shape[1:3])
            for name in ("rotate", "jitter"):
                if name in steps:
                    x = getattr(pipeline, name).apply(
                        x, asarray(steps[name][:, lo:hi], backend=backend))
        x = x if self.normalize is None else self.normalize.apply(x)
        if "erase" in steps:
            x = pipeline.erase.apply(x, asarray(steps["erase"][:, lo:hi], backend=backend))
        if labels is None:
            return x
        if "mix" in steps:
            return pipeline.mix.apply(x, labels, steps["mix"], self.dataset.num_classes)
        return x, labels

    def __repr__(self) -> str:
        return (f"DataLoader(n={len(self.dataset)}, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, "
                f"device_resident={self.device_resident}, dtype={self.dtype!r}, "
                f"augment={self.augment!r}, normalize={self.normalize!r}, shard={self.shard}, "
                f"num_workers={self.num_workers}, worker_nice={self.worker_nice})")


def _check_map_options(device_resident: bool, normalize: Any) -> None:
    """Refuse the options that need all images in memory with a map-style dataset."""
    if device_resident:
        raise ConfigError("device_resident=True copies an ArrayDataset to the device; a "
                          "map-style dataset is read batch by batch (drop device_resident)")
    if isinstance(normalize, str) and normalize == "auto":
        raise ConfigError('normalize="auto" computes statistics over an ArrayDataset\'s images; '
                          "for a map-style dataset pass Normalize(mean, std) (e.g. "
                          "Normalize.from_images on a sample of its images)")


def _check_augment(augment: Any, dataset: Any) -> Augment | None:
    """``augment`` checked against ``dataset.image_shape`` (a dataset, or a loader)."""
    if augment is None:
        return None
    if not isinstance(augment, Augment | RandomResizedCrop | AugmentPipeline):
        raise ConfigError(f"augment must be an anycnn.data.augment.Augment, an "
                          f"anycnn.data.resized_crop.RandomResizedCrop, an "
                          f"anycnn.data.pipeline.AugmentPipeline or None, got "
                          f"{type(augment).__name__}")
    if dataset.image_shape is not None:  # None: an empty map-style dataset
        h, w, _ = dataset.image_shape
        augment.check_image_shape(h, w)
    return augment if augment.active else None


def _check_normalize(normalize: Any, dataset: Any,
                     image_shape: tuple[int, ...] | None) -> Normalize | None:
    if normalize is None:
        return None
    if isinstance(normalize, str) and normalize == "auto":
        return Normalize.from_images(dataset.images)
    if not isinstance(normalize, Normalize):
        raise ConfigError("normalize must be an anycnn.data.augment.Normalize, 'auto' or None, "
                          f"got "
                          f"{normalize!r}")
    if image_shape is None:
        return normalize
    channels = image_shape[2]
    if normalize.channels != channels:
        raise ConfigError(f"normalize has {normalize.channels} mean/std value(s) but the images "
                          f"have {channels} channel(s)")
    return normalize
