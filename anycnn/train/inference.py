"""Predictions for images as users hold them: :func:`predict`, :func:`predict_proba`,
:func:`predict_topk`.

Single-label models (softmax cross-entropy: one class per image) get softmax probabilities,
each row summing to 1. Multi-label models (trained with a sigmoid loss such as
:class:`~anycnn.nn.losses.BCEWithLogits`: any number of labels per image) get each label's own
sigmoid probability with ``multi_label=True``; ``probability >= 0.5`` (or another threshold)
marks the labels present. :attr:`anycnn.io.checkpoint.Checkpoint.multi_label` says which a
checkpoint holds, and :func:`anycnn.load_model` marks the model it returns with it (its
``multi_label`` attribute): ``multi_label=None``, the default here, means "as the model is
marked" (False for a model without the mark, e.g. one built in code), so
``anycnn.predict_proba(anycnn.load_model(path)[0], images)`` gives a multi-label checkpoint's
sigmoids; pass ``multi_label=True``/``False`` to say it yourself.

Accepted images (channels last, as everywhere in anycnn):

* one image ``(H, W, C)``, or ``(H, W)`` for a one-channel model; or a batch ``(N, H, W, C)``;
* ``uint8`` pixels ``0..255``, scaled to ``[0, 1]`` exactly as the
  :class:`~anycnn.data.dataloader.DataLoader` does (``x.astype(dtype) / 255``, so the result is
  bit-identical to training batches), or floats already in ``[0, 1]`` (cast to the model's
  dtype, not rescaled); other dtypes are refused;
* host arrays (NumPy, or anything ``np.asarray`` takes), which are copied to the model's backend
  and device one batch at a time, or arrays of the model's own backend.

Outputs are host NumPy arrays, with the batch axis only when the input had one: ``(N, K)`` for a
batch, ``(K,)`` for a single image (``K`` classes). The model runs in eval mode; every
submodule's own mode is restored afterwards.

Wrong inputs raise :class:`~anycnn.errors.ShapeError` naming the shape the model takes, as far as
it is known: models from :func:`anycnn.models.build_model` or :func:`anycnn.load_model` know
``(H, W, C)`` (their ``model_spec``); a ``Sequential`` that starts with a ``Conv2D`` knows ``C``;
otherwise the model's own error is passed on, prefixed with the shape it was given.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from typing import Any

import array_api_compat
import array_api_compat.numpy as host_xp
import numpy as np

from ..autograd import no_grad
from ..backend import asarray, dtype_name, namespace_of, to_numpy
from ..data.augment import to_unit_range
from ..errors import ConfigError, ShapeError
from ..nn import functional as F
from ..nn.module import Module, eval_mode
from .metrics import check_top_k

Shape = tuple[int | None, int | None, int | None]


def expected_input(model: Module) -> Shape:
    """``(H, W, C)`` of the images ``model`` takes, ``None`` where unknown (see module doc)."""
    from ..models.backbone import Backbone

    spec = getattr(model, "model_spec", None)
    if isinstance(spec, dict):
        size, channels = spec.get("image_size"), spec.get("in_channels")
        if isinstance(size, int) and isinstance(channels, int):
            if isinstance(model, Backbone):  # fully convolutional: any size works
                return None, None, channels
            return size, size, channels
    from ..nn.layers import Conv2D
    from ..nn.sequential import Sequential

    first = model
    while isinstance(first, Sequential) and len(first):
        first = first[0]
    if isinstance(first, Conv2D):
        return None, None, first.in_channels
    return None, None, None


def _describe(shape: Shape) -> str:
    h, w, c = shape
    if h is not None and w is not None:
        return f"{(h, w, c)} images (H, W, C)"
    return f"images with {c} channel(s) on the last axis" if c is not None else "NHWC images"


def _reference(model: Module) -> Any:
    """An array of the model (its first parameter or buffer), or None for a stateless model."""
    return next(iter(model.state_dict().values()), None)


def _is_host(images: Any) -> bool:
    return (isinstance(images, np.ndarray | np.generic)
            or not array_api_compat.is_array_api_obj(images))


def _as_nhwc(images: Any, expected: Shape) -> tuple[Any, bool]:
    """``images`` as a 4-D view and whether it was a single image; checks rank and known sizes."""
    shape = tuple(images.shape)
    h, w, c = expected
    reshape = np.reshape if _is_host(images) else namespace_of(images).reshape
    if len(shape) == 2:
        if c not in (None, 1):
            raise ShapeError(f"predict: a 2-D array {shape} is one greyscale (H, W) image, but "
                             f"the model expects {_describe(expected)}")
        batch, single = reshape(images, (1, *shape, 1)), True
    elif len(shape) == 3:
        batch, single = reshape(images, (1, *shape)), True
    elif len(shape) == 4:
        batch, single = images, False
    else:
        raise ShapeError(f"predict: expected one image (H, W, C) or (H, W), or a batch "
                         f"(N, H, W, C); got an array of shape {shape}; the model expects "
                         f"{_describe(expected)}")
    n, ih, iw, ic = batch.shape
    if n == 0:
        raise ShapeError(f"predict: empty batch {shape}: nothing to predict")
    maybe_grey_batch = (len(shape) == 3 and c == 1 and shape[-1] != 1
                        and (h is None or shape[1:] == (h, w)))
    hint = (" (a 3-D array is one (H, W, C) image; for a batch of greyscale images add a "
            "channel axis: images[..., None])" if maybe_grey_batch else "")
    if (c is not None and ic != c) or (h is not None and (ih, iw) != (h, w)):
        raise ShapeError(f"predict: images of shape {shape} do not fit this model: it expects "
                         f"{_describe(expected)}{hint}")
    return batch, single


def _to_model_input(chunk: Any, model_dtype: str, ref: Any) -> Any:
    """One chunk of raw images → floats in the model's dtype, on the model's backend/device."""
    if _is_host(chunk):
        chunk = to_unit_range(host_xp, np.asarray(chunk), model_dtype)  # as the DataLoader
        if ref is None:  # a model without parameters: the current backend
            return asarray(chunk)
        xp = namespace_of(ref)
        return xp.asarray(np.ascontiguousarray(chunk), device=array_api_compat.device(ref))
    return to_unit_range(namespace_of(chunk), chunk, model_dtype)


def _check_dtype(images: Any) -> None:
    if _is_host(images):
        kind, name = images.dtype.kind, str(images.dtype)
        ok = name == "uint8" or kind == "f"
    else:
        xp = namespace_of(images)
        name = dtype_name(images) if images.dtype != xp.bool else "bool"
        ok = name == "uint8" or xp.isdtype(images.dtype, "real floating")
    if not ok:
        raise ShapeError(f"predict: images must be uint8 (0-255) or floating-point in [0, 1], "
                         f"got dtype {name}")


def _chunks(batch: Any, size: int) -> Iterator[Any]:
    n = batch.shape[0]
    for i in range(0, n, size):  # explicit `...` and in-bounds stops: array-api-strict insists
        yield batch[i:min(i + size, n), ...]


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= 1


def _logits(model: Module, images: Any, batch_size: int) -> tuple[np.ndarray, bool]:
    """Host logits ``(N, K)`` for ``images`` in any accepted form, and whether it was one image."""
    if not _positive_int(batch_size):
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if _is_host(images):
        images = np.asarray(images)
    _check_dtype(images)
    expected = expected_input(model)
    batch, single = _as_nhwc(images, expected)
    ref = _reference(model)
    model_dtype = dtype_name(ref) if ref is not None else "float32"
    outs = []
    with eval_mode(model), no_grad():
        for chunk in _chunks(batch, batch_size):
            x = _to_model_input(chunk, model_dtype, ref)
            try:
                outs.append(to_numpy(model.forward(x)))
            except ShapeError as exc:
                raise ShapeError(f"predict: images of shape {tuple(images.shape)} do not fit "
                                 f"this model (it expects {_describe(expected)}): {exc}") from exc
    return np.concatenate(outs, axis=0), single


def predict(model: Module, images: Any, batch_size: int = 256, *,
            probs: bool = False, multi_label: bool | None = None) -> np.ndarray:
    """Logits (or, with ``probs=True``, probabilities) for ``images``.

    Args:
        model: any :class:`~anycnn.nn.module.Module` mapping NHWC images to ``(N, K)`` logits.
        images: one image or a batch, ``uint8`` or float, host or backend (see module doc).
        batch_size: images per forward pass. An image's results do not depend on it, nor on
            the other images of its batch, beyond float rounding: the kernels (and BLAS) may
            sum in another order for another batch shape, so the last digits can differ
            (``batch_size=1`` gives every image the same numbers whatever else is predicted).
        probs: return probabilities instead of logits: softmax (stable; each row sums to 1),
            or with ``multi_label`` each label's sigmoid.
        multi_label: the model is multi-label (module doc): ``probs`` are per-label sigmoids;
            None: the model's ``multi_label`` mark (:func:`anycnn.load_model` sets it).

    Returns:
        Host ``np.ndarray`` in the model's dtype: ``(N, K)`` for a batch, ``(K,)`` for one image.

    Raises:
        ShapeError: wrong rank, channel count, size or dtype (the expected shape is named).
    """
    logits, single = _logits(model, images, batch_size)
    out = probabilities(logits, is_multi_label(model, multi_label)) if probs else logits
    return out[0] if single else out


def probabilities(logits: Any, multi_label: bool = False) -> np.ndarray:
    """Host probabilities of ``(N, K)`` ``logits``: softmax along the last axis (each row sums
    to 1), or with ``multi_label`` each entry's sigmoid (stable on both tails)."""
    if multi_label:
        x = np.asarray(logits)
        e = np.exp(-np.abs(x))
        return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)
    return np.asarray(F.softmax(logits, axis=-1))


def is_multi_label(model: Any, multi_label: bool | None) -> bool:
    """``multi_label`` as given, or for None the model's ``multi_label`` mark (set by
    :func:`anycnn.load_model` from the checkpoint; False when absent)."""
    if multi_label is None:
        return getattr(model, "multi_label", False) is True
    return bool(multi_label)


def predict_proba(model: Module, images: Any, batch_size: int = 256, *,
                  multi_label: bool | None = None) -> np.ndarray:
    """Probabilities for ``images``: ``predict(model, images, batch_size, probs=True,
    multi_label=multi_label)`` (softmax, or per-label sigmoids for a multi-label model)."""
    return predict(model, images, batch_size, probs=True, multi_label=multi_label)


def predict_topk(model: Module, images: Any, k: int = 5, batch_size: int = 256, *,
                 multi_label: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most likely classes (or labels) of each image and their probabilities
    (softmax; per-label sigmoids with ``multi_label``, as :func:`predict`).

    Classes are ranked by logit, largest first; equal logits by class index, lowest first (so
    ``indices[..., 0]`` is ``predict(...).argmax(-1)``, ties included).

    Returns:
        ``(indices, probabilities)``: ``int64`` and the model's float dtype, both ``(N, k)`` for
        a batch or ``(k,)`` for one image, best first.

    Raises:
        ConfigError: ``k`` is not a positive integer or exceeds the number of classes.
        ShapeError: as :func:`predict`.
    """
    if not _positive_int(k):
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    logits, single = _logits(model, images, batch_size)
    (k,) = check_top_k(k, logits.shape[1])
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k].astype(np.int64)
    chosen = np.take_along_axis(probabilities(logits, is_multi_label(model, multi_label)), order,
                                axis=1)
    return (order[0], chosen[0]) if single else (order, chosen)
