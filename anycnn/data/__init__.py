"""Data: datasets and their readers, the batch loader, and augmentation.

* :mod:`~anycnn.data.datasets` — ``load_dataset`` (MNIST, Fashion-MNIST, CIFAR, image folders,
  the bundled MNIST sample), ``ArrayDataset``, IDX reading and verified downloads;
* :mod:`~anycnn.data.cifar`, :mod:`~anycnn.data.imagefolder`, :mod:`~anycnn.data.images` —
  the CIFAR binary reader, image folders and image decoding (Pillow, imported when used;
  :mod:`~anycnn.data.png`: the quick path for plain PNG files);
* :mod:`~anycnn.data.multilabel` — ``load_multilabel_folder``: images listed in a labels file
  (``path,label1;label2``) with ``(N, K)`` multi-label targets;
* :mod:`~anycnn.data.arrays` (``ArrayDataset``, ``Splits``) and :mod:`~anycnn.data.sources`
  (dataset lookup, verified downloads) — the pieces those readers share; ``datasets`` dispatches
  to ``cifar`` and ``imagefolder`` by name, and neither imports it;
* :mod:`~anycnn.data.dataloader` — ``DataLoader``, batches on the current backend;
* :mod:`~anycnn.data.mapstyle` (map-style datasets: ``__getitem__``/``__len__``, collation,
  per-batch seeding, ``worker_info``), :mod:`~anycnn.data.workers` (the worker processes, and
  :mod:`~anycnn.data.priority`: how they ask to be scheduled) and
  :mod:`~anycnn.data.prefetch` (the thread that prepares batches ahead of the step);
* :mod:`~anycnn.data.augment` — ``Augment`` (crop, flip) and ``Normalize`` on the device;
* :mod:`~anycnn.data.pipeline` (``AugmentPipeline``) composing :mod:`~anycnn.data.rotation`
  (``RandomRotation``), :mod:`~anycnn.data.color` (``ColorJitter``),
  :mod:`~anycnn.data.erasing` (``RandomErasing``) and :mod:`~anycnn.data.mixing` (``BatchMix``:
  MixUp/CutMix with soft targets, for ``SoftmaxCrossEntropy``) — more augmentation on the device;
* :mod:`~anycnn.data.resized_crop` (``RandomResizedCrop``, resampled on the device) and
  :mod:`~anycnn.data.eval_transform` (``EvalTransform``: shorter side, centre crop, mean/std)
  — ImageNet-style preprocessing.

This folder also holds the bundled sample (``t10k-*-idx*-ubyte.gz``, the canonical MNIST test
set) as package data.
"""

from __future__ import annotations

from .._lazy import lazy_exports, names

_EXPORTS = {
    **names("arrays", "ArrayDataset", "Splits"),
    **names("datasets", "load_dataset", "read_idx"),
    **names("dataloader", "DataLoader"),
    **names("mapstyle", "WorkerInfo", "worker_info"),
    **names("augment", "Augment", "Normalize"),
    **names("resized_crop", "RandomResizedCrop"),
    **names("rotation", "RandomRotation"),
    **names("color", "ColorJitter"),
    **names("erasing", "RandomErasing"),
    **names("mixing", "BatchMix"),
    **names("pipeline", "AugmentPipeline"),
    **names("eval_transform", "EvalTransform"),
    **names("imagefolder", "ImageFolder", "load_image_folder"),
    **names("images", "load_image", "load_images"),
    **names("multilabel", "load_multilabel_folder"),
    **names("cifar", "load_cifar"),
}
_SUBMODULES = {m: m for m in ("arrays", "augment", "cifar", "color", "dataloader", "datasets",
                              "erasing", "eval_transform", "imagefolder", "images", "mapstyle",
                              "mixing", "multilabel", "pipeline", "png", "prefetch", "priority",
                              "resized_crop",
                              "rotation", "sources", "workers")}
__all__ = sorted([*_EXPORTS, *_SUBMODULES])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _SUBMODULES, globals())
