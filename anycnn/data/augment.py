"""Per-batch preprocessing on the batch's own backend: :class:`Augment` (random crop with padding,
horizontal flip) and :class:`Normalize` (per-channel mean/std).

A :class:`~anycnn.data.dataloader.DataLoader` applies them to each gathered batch, in this order:

1. **crop** (``Augment(crop=p)``): the batch ``(B, H, W, C)`` is padded by ``p`` pixels on each
   side of both spatial axes (with zeros, torchvision's default, or with ``padding_mode="edge"``
   by repeating the border pixels), and each image keeps the ``H x W`` window at its own random
   offset ``(dy, dx)``, ``0 <= dy, dx <= 2p``; the output has the input's shape;
2. **flip** (``Augment(flip=True)``): each image is mirrored left-right with probability 1/2;
3. **scale** to the loader's dtype: ``uint8`` divided by 255; float images (taken to be in
   ``[0, 1]``) only cast. Crop and flip act on the stored pixels before that, so float images are
   padded with ``0.0`` (or their edge) exactly like ``uint8`` ones;
4. **normalise** (``Normalize(mean, std)``): ``(x - mean[c]) / std[c]`` per channel ``c``, in the
   loader's dtype, ``mean``/``std`` in the units of step 3 (``[0, 1]``, like torchvision).

A crop (with or without flip) is one gather: the per-image offsets and flips make a flat int64
index (built on the device from three ``(B,)`` vectors) into the padded batch, read with one
``xp.take``; a flip alone is ``xp.where(mask, xp.flip(x, axis=2), x)``. No Python loop runs over
the images. Copies and the correctly rounded ``/ 255``, ``- mean`` and ``/ std`` give the same
bits on every backend.

Randomness is drawn on the host, per batch, from ``np.random.default_rng([seed, epoch, batch,
0x617567])`` (the loader's seed, the epoch, the batch's number in the epoch, a constant that keeps
this stream apart from the shuffle's ``[seed, epoch]``): first ``dy`` then ``dx`` (each
``integers(0, 2p + 1, B)``, only with a crop), then the flips (``integers(0, 2, B)``, 1 = mirror,
only with ``flip``). A batch's augmentation therefore depends on (seed, epoch, batch) alone: every
backend, both loader modes, and a run resumed mid-epoch (:meth:`DataLoader.iter_from`) see the
same crops and flips.

The ImageNet-style pair lives beside this module: the training augmentation
:class:`~anycnn.data.resized_crop.RandomResizedCrop` (random-resized crop and flip, resampled on
the device; a loader applies it after step 3, to ``[0, 1]`` floats) and the evaluation geometry
:class:`~anycnn.data.eval_transform.EvalTransform` (shorter side, centre crop, mean/std).

Checkpoints written by :class:`~anycnn.train.Trainer` record both under ``config["preprocess"]``
(:func:`preprocess_record`, which for ``anycnn train`` also holds the image size, channels and
class names, and the evaluation transform; read back with :func:`read_preprocess` and
:func:`read_eval_transform`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import array_api_compat
import array_api_extra as xpx
import numpy as np
from array_api_compat import array_namespace, device

from ..errors import CheckpointError, ConfigError

#: last word of the per-batch seed (ASCII "aug"), see the module docstring
STREAM_TAG = 0x617567
PADDING_MODES = ("zeros", "edge")


def batch_generator(seed: int, epoch: int, batch: int) -> np.random.Generator:
    """The host generator of batch number ``batch`` of epoch ``epoch`` (module docstring)."""
    return np.random.default_rng([seed, epoch, batch, STREAM_TAG])


@dataclass(frozen=True)
class Augment:
    """Random crop with padding and random horizontal flip (see the module docstring).

    Args:
        crop: padding ``p`` in pixels (0: no crop); at most half the image's height and width
            (checked by :meth:`check_image_shape`).
        flip: mirror each image left-right with probability 1/2.
        padding_mode: ``"zeros"`` (default, as torchvision's ``RandomCrop``) or ``"edge"``.

    Raises:
        ConfigError: ``crop`` is not an integer >= 0, ``flip`` not a bool, or an unknown
            ``padding_mode``.
    """

    crop: int = 0
    flip: bool = False
    padding_mode: str = "zeros"

    #: applied to the stored pixels, before the scaling to ``[0, 1]`` (copies of pixels)
    before_scaling = True

    def __post_init__(self) -> None:
        if isinstance(self.crop, bool) or not isinstance(self.crop, numbers.Integral) \
                or self.crop < 0:
            raise ConfigError(f"Augment: crop (the padding in pixels) must be an integer >= 0, "
                              f"got {self.crop!r}")
        if not isinstance(self.flip, (bool, np.bool_)):
            raise ConfigError(f"Augment: flip must be True or False, got {self.flip!r}")
        if self.padding_mode not in PADDING_MODES:
            raise ConfigError(f"Augment: padding_mode must be one of {', '.join(PADDING_MODES)}, "
                              f"got {self.padding_mode!r}")
        object.__setattr__(self, "crop", int(self.crop))
        object.__setattr__(self, "flip", bool(self.flip))

    @property
    def active(self) -> bool:
        """False when this does nothing (no crop, no flip)."""
        return bool(self.crop or self.flip)

    def check_image_shape(self, height: int, width: int) -> None:
        """Refuse a crop padding above half of ``height`` or ``width`` (a window would then be
        mostly padding)."""
        limit = min(height, width) // 2
        if self.crop > limit:
            raise ConfigError(f"Augment: crop={self.crop} is too large for {height}x{width} "
                              f"images: the padding must be at most {limit} (half the smaller "
                              "side)")

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)``: crops and flips keep the image size."""
        return height, width

    def draw(self, seed: int, epoch: int, batch: int, size: int,
             image_size: Sequence[int] | None = None) -> np.ndarray:
        """Host int64 ``(3, size)``: rows ``dy``, ``dx`` (in ``[0, 2 * crop]``) and flip (0/1)
        of the ``size`` images of that batch, drawn as the module docstring says
        (``image_size`` is not needed)."""
        rng = batch_generator(seed, epoch, batch)
        params = np.zeros((3, size), dtype=np.int64)
        if self.crop:
            params[0] = rng.integers(0, 2 * self.crop + 1, size)
            params[1] = rng.integers(0, 2 * self.crop + 1, size)
        if self.flip:
            params[2] = rng.integers(0, 2, size)
        return params

    def apply(self, images: Any, params: Any) -> Any:
        """Crop and flip ``images`` ``(B, H, W, C)`` (any dtype, any backend) with ``params``
        (int64 ``(3, B)`` from :meth:`draw`, on the same device); returns ``(B, H, W, C)`` of
        the same dtype.

        With a crop: one ``xp.take`` over the flattened (zero-padded) batch, the flips folded
        into its index. A flip alone: ``xp.where(flip, xp.flip(x, axis=2), x)`` (1.6x faster
        than the gather on NumPy, see BENCHMARKS.md)."""
        xp = array_namespace(images, params)
        dev = device(images)
        b, h, w, c = images.shape
        p = self.crop
        dy, dx, flip = params[0, :], params[1, :], params[2, :]
        if not p:
            return xp.where(xp.reshape(flip == 1, (b, 1, 1, 1)), xp.flip(images, axis=2),
                            images)
        jj = xp.arange(w, dtype=xp.int64, device=dev)
        cols = dx[:, None] + jj[None, :] + flip[:, None] * (w - 1 - 2 * jj)[None, :]  # (B, W)
        rows = dy[:, None] + xp.arange(h, dtype=xp.int64, device=dev)[None, :]  # (B, H)
        if self.padding_mode == "zeros":
            source = xp.zeros((b, h + 2 * p, w + 2 * p, c), dtype=images.dtype, device=dev)
            source = xpx.at(source)[:, p:p + h, p:p + w, :].set(images)  # ours: in place
        else:  # edge: index the unpadded batch, clamping to the border
            source = images
            rows = xp.clip(rows - p, 0, h - 1)
            cols = xp.clip(cols - p, 0, w - 1)
        hs, ws = source.shape[1], source.shape[2]
        first_row = xp.arange(b, dtype=xp.int64, device=dev) * hs
        row_start = (first_row[:, None] + rows) * ws  # (B, H)
        pixel = row_start[:, :, None] + cols[:, None, :]  # (B, H, W)
        if c == 1:
            flat = pixel
        else:
            flat = pixel[:, :, :, None] * c + xp.arange(c, dtype=xp.int64, device=dev)
        out = xp.take(xp.reshape(source, (-1,)), xp.reshape(flat, (-1,)), axis=0)
        return xp.reshape(out, (b, h, w, c))

    def to_record(self) -> dict[str, Any]:
        """JSON-able ``{"crop": int, "flip": bool, "padding_mode": str}``."""
        return {"crop": self.crop, "flip": self.flip, "padding_mode": self.padding_mode}

    def spec(self) -> str:
        """The ``--augment`` text that gives this object back (:func:`parse_augment`)."""
        parts = ([f"crop={self.crop}"] if self.crop else []) + (["flip"] if self.flip else [])
        if self.crop and self.padding_mode != "zeros":
            parts.append(f"pad={self.padding_mode}")
        return ",".join(parts) or "none"


def _finite_floats(name: str, values: Any) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise ConfigError(f"Normalize: {name} must be a sequence of numbers, one per channel, "
                          f"got {values!r}")
    items = values.reshape(-1).tolist() if isinstance(values, np.ndarray) else list(values)
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ConfigError(f"Normalize: {name} must hold finite numbers, got {v!r} in "
                              f"{values!r}")
        out.append(float(v))
    if not out:
        raise ConfigError(f"Normalize: {name} is empty; give one value per channel")
    return tuple(out)


def to_unit_range(xp: Any, raw: Any, dtype: str) -> Any:
    """Images ``raw`` (..., C) as ``dtype`` floats in ``[0, 1]``: ``uint8`` pixels divided by
    255 (one correctly rounded division, so bit-identical on every backend), float images only
    cast (no copy when already of that dtype). The pixel scaling of the DataLoader, ``predict``
    and ``anycnn predict``; normalisation (:class:`Normalize`) comes after it."""
    if raw.dtype == xp.uint8 and array_api_compat.is_jax_namespace(xp):
        # XLA turns a division by a constant into a multiplication by its reciprocal, which is
        # not correctly rounded (126 of the 256 values differ): gather the exact quotients
        exact = np.arange(256, dtype=np.float64).astype(dtype) / np.asarray(255, dtype)
        table = xp.asarray(exact, device=device(raw))
        flat = xp.astype(xp.reshape(raw, (-1,)), xp.int32)
        return xp.reshape(xp.take(table, flat), raw.shape)
    x = xp.astype(raw, getattr(xp, dtype), copy=False)
    return x / 255 if raw.dtype == xp.uint8 else x


@dataclass(frozen=True)
class Normalize:
    """Per-channel normalisation ``(x - mean[c]) / std[c]`` of images scaled to ``[0, 1]``.

    Args:
        mean, std: one number per channel, in ``[0, 1]`` units (e.g. CIFAR-10's
            ``(0.4914, 0.4822, 0.4465)``); ``std`` > 0.

    Raises:
        ConfigError: not sequences of finite numbers, lengths differ, or a ``std`` <= 0.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        mean, std = _finite_floats("mean", self.mean), _finite_floats("std", self.std)
        if len(mean) != len(std):
            raise ConfigError(f"Normalize: mean has {len(mean)} values but std has {len(std)}; "
                              "give one of each per channel")
        bad = [s for s in std if s <= 0]
        if bad:
            raise ConfigError(f"Normalize: std must be > 0, got {bad[0]!r} in {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "_on_device", {})  # (namespace, device, dtype) -> (mean, std)

    @property
    def channels(self) -> int:
        return len(self.mean)

    @classmethod
    def from_images(cls, images: np.ndarray, chunk: int = 4096) -> Normalize:
        """Mean and (population, ``ddof=0``) standard deviation per channel of host images
        ``(N, H, W, C)`` in ``[0, 1]`` units, computed in float64 a chunk of images at a time
        (memory-mapped data stays on disk). ``uint8`` statistics are exact up to the last
        rounding (pixel-value histograms, integer sums); float images are taken as they are.

        Raises:
            ConfigError: no images, or a channel is constant (its std would be 0).
        """
        images = np.asarray(images) if not isinstance(images, np.ndarray) else images
        if images.ndim != 4 or images.shape[0] == 0:
            raise ConfigError(f"Normalize.from_images needs a non-empty (N, H, W, C) array, "
                              f"got shape {images.shape}")
        c = images.shape[3]
        count = images.shape[0] * images.shape[1] * images.shape[2]
        if images.dtype == np.uint8:
            hist = np.zeros((c, 256), dtype=np.int64)
            for start in range(0, images.shape[0], chunk):
                part = images[start:start + chunk]
                for ch in range(c):
                    hist[ch] += np.bincount(part[..., ch].reshape(-1), minlength=256)
            values = np.arange(256, dtype=object)
            mean, std = [], []
            for ch in range(c):
                s1 = int((hist[ch].astype(object) * values).sum())  # exact Python integers
                s2 = int((hist[ch].astype(object) * values * values).sum())
                mean.append(s1 / (count * 255))
                std.append(math.sqrt((count * s2 - s1 * s1) / (count * count)) / 255)
        else:
            total = np.zeros(c)
            for start in range(0, images.shape[0], chunk):
                total += images[start:start + chunk].sum(axis=(0, 1, 2), dtype=np.float64)
            m = total / count
            sq = np.zeros(c)
            for start in range(0, images.shape[0], chunk):
                d = images[start:start + chunk].astype(np.float64) - m
                sq += (d * d).sum(axis=(0, 1, 2))
            mean, std = m.tolist(), np.sqrt(sq / count).tolist()
        flat = [ch for ch, s in enumerate(std) if not s > 0]
        if flat:
            raise ConfigError(f"Normalize: channel {flat[0]} of the images is constant (std 0); "
                              "give mean and std yourself or do not normalise")
        return cls(tuple(mean), tuple(std))

    def apply(self, x: Any) -> Any:
        """``x`` float ``(..., C)`` on any backend, normalised in its own dtype (same shape)."""
        xp = array_namespace(x)
        if x.shape[-1] != self.channels:
            raise ConfigError(f"Normalize has {self.channels} channel(s) but the images have "
                              f"{x.shape[-1]}")
        key = (xp.__name__, str(device(x)), str(x.dtype))
        if key not in self._on_device:  # copied to each device once, not per batch
            host_dtype = np.float32 if x.dtype == xp.float32 else np.float64
            self._on_device[key] = tuple(
                xp.asarray(np.asarray(v, dtype=host_dtype), device=device(x))
                for v in (self.mean, self.std))
        mean, std = self._on_device[key]
        return (x - mean) / std

    def to_record(self) -> dict[str, list[float]]:
        """JSON-able ``{"mean": [...], "std": [...]}`` (floats, one per channel)."""
        return {"mean": list(self.mean), "std": list(self.std)}


#: version of the preprocess record's image keys (``version`` in :func:`preprocess_record`):
#: 1 stretches images to ``image_size``; 2 (records with an ``eval`` transform) resizes the
#: shorter side and centre-crops instead
PREPROCESS_VERSION = 1
EVAL_PREPROCESS_VERSION = 2


def image_record(image_size: Sequence[int], channels: int,
                 class_names: Sequence[Any]) -> dict[str, Any]:
    """The image keys of a preprocess record (:func:`preprocess_record`): images of another
    size are resized to ``image_size`` ``[H, W]`` (bilinear), converted to ``channels`` (1
    grayscale, 3 RGB) and divided by 255 (``scale``); ``class_names`` name the classes."""
    h, w = image_size
    return {"version": PREPROCESS_VERSION, "image_size": [int(h), int(w)],
            "channels": int(channels), "resize": "bilinear", "scale": 255,
            "class_names": list(class_names)}


def preprocess_record(augment: Any, normalize: Normalize | None, data: Any = None,
                      eval_transform: Any = None, multi_label: bool | None = None
                      ) -> dict[str, Any]:
    """What a checkpoint's ``config["preprocess"]`` holds::

        {"augment": {"crop": 4, "flip": true, "padding_mode": "zeros"}
                    or {"kind": "random_resized_crop", "size": 224, "scale": [0.08, 1.0],
                        "ratio": [0.75, 1.333...], "flip": true}
                    or {"kind": "pipeline", "geometry": one of the two above or null,
                        "rotate": {...} or null, "jitter": ..., "erase": ..., "mix": ...}
                    or null,
         "normalize": {"mean": [m0, ...], "std": [s0, ...]} or null}

    ``augment`` (an :class:`Augment` or a
    :class:`~anycnn.data.resized_crop.RandomResizedCrop`) is for the record (only training
    augments); ``normalize`` must be applied to every image the model sees, after scaling to
    ``[0, 1]``.

    With ``data`` (the :class:`~anycnn.data.arrays.Splits` the model is trained on; what
    ``anycnn train`` records), the record starts with :func:`image_record`'s keys for the shape
    of its validation images (the model's input) and its class names, so that ``anycnn
    predict`` prepares image files the same way. With ``eval_transform`` (an
    :class:`~anycnn.data.eval_transform.EvalTransform` whose mean/std are ``normalize``'s), it
    is recorded under ``"eval"`` and ``version`` is 2: images are resized by their shorter side
    and centre-cropped to ``image_size`` instead of stretched.

    A multi-label model (``multi_label`` true, or by default ``data``'s training split holding
    ``(N, K)`` targets) adds ``"multi_label": true``: ``anycnn predict`` and ``evaluate`` then
    report per-label sigmoid probabilities. A record without the key (every single-label
    record, and those written before it existed) means single-label.

    Raises:
        ConfigError: the eval transform's mean/std are not ``normalize``'s.
    """
    record = {}
    if data is not None:
        h, w, c = data.val.image_shape
        record = image_record((h, w), c, data.class_names)
    record["augment"] = augment.to_record() if augment is not None and augment.active else None
    record["normalize"] = normalize.to_record() if normalize is not None else None
    if multi_label is None:
        multi_label = data is not None and bool(getattr(data.train, "multi_label", False))
    if multi_label:
        record["multi_label"] = True
    if eval_transform is not None:
        mine = eval_transform.normalize
        if (mine.to_record() if mine is not None else None) != record["normalize"]:
            raise ConfigError("preprocess_record: the eval transform's mean/std differ from "
                              "normalize; the record would contradict itself")
        record["eval"] = eval_transform.to_record()
        if data is not None:
            record["version"] = EVAL_PREPROCESS_VERSION
            record["resize"] = eval_transform.interpolation
    return record


def read_preprocess(record: Any) -> tuple[Any, Normalize | None]:
    """``(augment, normalize)`` from a :func:`preprocess_record` (``None``: neither, as in
    checkpoints written before preprocessing existed); ``augment`` is an :class:`Augment`, a
    :class:`~anycnn.data.resized_crop.RandomResizedCrop` or None.

    Raises:
        CheckpointError: the record is malformed.
    """
    if record is None:
        return None, None
    try:
        if not isinstance(record, dict):
            raise TypeError(f"expected an object, got {type(record).__name__}")
        aug, norm = record.get("augment"), record.get("normalize")
        augment = _read_augment(aug) if aug is not None else None
        normalize = Normalize(norm["mean"], norm["std"]) if norm is not None else None
    except (TypeError, KeyError, ConfigError) as exc:
        raise CheckpointError(f"malformed preprocess record in the checkpoint: {exc}") from exc
    return augment, normalize


def _read_augment(record: Any) -> Any:
    """An augmentation from its ``to_record`` form (raises TypeError/ConfigError when bad)."""
    if not isinstance(record, dict):
        raise TypeError(f"augment: expected an object, got {type(record).__name__}")
    if "kind" not in record:
        return Augment(**record)
    from .pipeline import KIND as PIPELINE
    from .pipeline import AugmentPipeline
    from .resized_crop import KIND, RandomResizedCrop

    kind, rest = record["kind"], {k: v for k, v in record.items() if k != "kind"}
    if kind == PIPELINE:
        return AugmentPipeline.from_record(rest)
    if kind != KIND:
        raise ConfigError(f"unknown augmentation kind {kind!r}")
    return RandomResizedCrop(**rest)


def read_eval_transform(record: Any) -> Any:
    """The :class:`~anycnn.data.eval_transform.EvalTransform` of a :func:`preprocess_record`
    (its ``"eval"`` entry), or None when it has none (records that stretch images to
    ``image_size``, and checkpoints written before it existed).

    Raises:
        CheckpointError: the entry is malformed, or its mean/std contradict ``normalize``.
    """
    if not isinstance(record, dict) or record.get("eval") is None:
        return None
    from .eval_transform import EvalTransform

    try:
        transform = EvalTransform.from_record(record["eval"])
        _, normalize = read_preprocess(record)
    except ConfigError as exc:
        raise CheckpointError(f"malformed preprocess record in the checkpoint: {exc}") from exc
    mine = transform.normalize
    if (mine.to_record() if mine else None) != (normalize.to_record() if normalize else None):
        raise CheckpointError("malformed preprocess record in the checkpoint: the eval "
                              "transform's mean/std differ from its normalize entry")
    return transform


def default_augment(image_shape: tuple[int, int, int]) -> Augment | None:
    """What ``--augment auto`` picks: crop (padding 4) and flip for 32x32 RGB images (CIFAR's
    recipe), nothing for other shapes (e.g. 28x28 grayscale digits, where a flip changes the
    class)."""
    return Augment(crop=4, flip=True) if tuple(image_shape) == (32, 32, 3) else None


def default_normalize(image_shape: tuple[int, int, int]) -> bool:
    """Whether ``anycnn train`` normalises when ``--normalize`` is not given: with the training
    split's statistics for 32x32 RGB images, not for other shapes (whose earlier results stay
    as they were)."""
    return tuple(image_shape) == (32, 32, 3)


def parse_augment(spec: str, image_shape: tuple[int, int, int] | None = None,
                  output_size: int | None = None) -> Any:
    """``--augment`` text as an :class:`Augment`, a
    :class:`~anycnn.data.resized_crop.RandomResizedCrop`, or None (for ``none``).

    ``spec`` is ``none``, ``auto`` (:func:`default_augment`, needs ``image_shape``) or items
    separated by commas:

    * padded crops: ``crop`` (padding 1/8 of the image side, at least 1: 4 for 32x32, 3 for
      28x28; needs ``image_shape``), ``crop=P`` (padding ``P``), ``pad=zeros`` or ``pad=edge``;
    * random-resized crops (ImageNet-style): ``rrc`` (output side ``output_size``, else the
      image's smaller side), ``rrc=S``, and optionally ``scale=LO:HI`` (area share, default
      ``0.08:1``) and ``ratio=LO:HI`` (aspect ratio, default ``0.75:1.3333``);
    * ``flip`` with either;
    * device steps (:mod:`anycnn.data.pipeline`): ``rotate=D`` (random rotation within ``D``
      degrees), ``jitter=V`` (brightness, contrast and saturation strength ``V``; ``jitter``
      alone: 0.4) or ``brightness=V``, ``contrast=V``, ``saturation=V``, and ``hue=H``;
      ``erase=P`` (random erasing with probability ``P``; ``erase`` alone: 0.5);
      ``mixup=A`` / ``cutmix=A`` (Beta ``alpha``; alone: 0.2 and 1.0).

    With any device step the result is an :class:`~anycnn.data.pipeline.AugmentPipeline`
    holding the crop (or random-resized crop) as its geometry; without one, the crop itself.
    With ``image_shape`` a padded crop is checked against it.

    Raises:
        ConfigError: an unknown or repeated item, a bad number, ``crop``/``pad`` together with
            ``rrc``, ``scale``/``ratio`` without ``rrc``.
    """
    text = spec.strip().lower()
    if text == "none":
        return None
    if text == "auto":
        return default_augment(image_shape) if image_shape is not None else None
    items: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        key, eq, value = item.partition("=")
        valued = {"crop": None, "flip": False, "pad": True, "rrc": None, "scale": True,
                  "ratio": True, **DEVICE_ITEMS}  # None: optional value
        if key in items or key not in valued or (valued[key] is False and eq) or (
                valued[key] is True and not value):
            raise ConfigError(f"--augment: bad item {item!r} in {spec!r}; expected none, auto, "
                              "or a comma-separated list of crop, crop=P, pad=zeros|edge, rrc, "
                              "rrc=S, scale=LO:HI, ratio=LO:HI, flip, rotate=D, jitter=V, "
                              "brightness=V, contrast=V, saturation=V, hue=H, erase=P, "
                              "mixup=A, cutmix=A")
        items[key] = value
    device_steps = {k: items.pop(k) for k in DEVICE_ITEMS if k in items}
    if device_steps:
        geometry = parse_augment(",".join(f"{k}={v}" if v else k for k, v in items.items())
                                 or "none", image_shape, output_size)
        return _pipeline(spec, geometry, device_steps)
    flip = "flip" in items
    if "rrc" in items:
        return _parse_rrc(spec, items, flip, image_shape, output_size)
    for key in ("scale", "ratio"):
        if key in items:
            raise ConfigError(f"--augment: {key}= applies to rrc (random-resized crops) only; "
                              f"got {spec!r}")
    crop: int | str = 0
    if "crop" in items:
        crop = _int_item(spec, "crop", items["crop"]) if items["crop"] else "auto"
    if crop == "auto":
        crop = max(1, min(image_shape[:2]) // 8) if image_shape is not None else 1
    augment = Augment(crop=crop, flip=flip, padding_mode=items.get("pad", "zeros"))
    if image_shape is not None:
        augment.check_image_shape(image_shape[0], image_shape[1])
    return augment if augment.active else None


#: the ``--augment`` items of :mod:`anycnn.data.pipeline` (all take an optional or required
#: number; None: optional)
DEVICE_ITEMS = {"rotate": True, "jitter": None, "brightness": True, "contrast": True,
                "saturation": True, "hue": True, "erase": None, "mixup": None, "cutmix": None}


def mixes(spec: str | None) -> bool:
    """Whether ``--augment`` text names ``mixup`` or ``cutmix`` (batches with soft targets)."""
    return any(item.strip().partition("=")[0] in ("mixup", "cutmix")
               for item in (spec or "").lower().split(","))


def _float_item(spec: str, key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ConfigError(f"--augment: {key}= needs a number, got {key}={value!r} in "
                          f"{spec!r}")
    return number


def _pipeline(spec: str, geometry: Any, steps: dict[str, str]) -> Any:
    """The :class:`~anycnn.data.pipeline.AugmentPipeline` of the device items ``steps``."""
    from .pipeline import AugmentPipeline, BatchMix, ColorJitter, RandomErasing, RandomRotation

    def number(key: str, default: float | None = None) -> float:
        value = steps.get(key)
        return _float_item(spec, key, value) if value else default

    if "jitter" in steps and any(k in steps for k in ("brightness", "contrast", "saturation")):
        raise ConfigError(f"--augment: jitter=V sets brightness, contrast and saturation; give "
                          f"it or them, not both; got {spec!r}")
    for key, value in steps.items():
        if value:
            _check_range(spec, key, number(key))
    parts: dict[str, Any] = {}
    try:
        if "rotate" in steps:
            parts["rotate"] = RandomRotation(number("rotate"))
        colour = {k: number(k) for k in ("brightness", "contrast", "saturation", "hue")
                  if k in steps}
        if "jitter" in steps:
            v = number("jitter", 0.4)
            colour.update(brightness=v, contrast=v, saturation=v)
        if colour:
            parts["jitter"] = ColorJitter(**colour)
        if "erase" in steps:
            parts["erase"] = RandomErasing(number("erase", 0.5))
        if "mixup" in steps or "cutmix" in steps:
            parts["mix"] = BatchMix(mixup=number("mixup", 0.2) if "mixup" in steps else 0.0,
                                    cutmix=number("cutmix", 1.0) if "cutmix" in steps else 0.0)
    except ConfigError as exc:
        raise ConfigError(f"--augment {spec}: {exc}") from None
    return AugmentPipeline(geometry, **parts)


#: the allowed values of the ``--augment`` numbers: ``(low, high, low_open, why)``
_ITEM_RANGES = {
    "rotate": (0.0, 180.0, True, "the largest angle in degrees"),
    "jitter": (0.0, 1.0, False, "brightness, contrast and saturation factors lie in "
               "[1 - V, 1 + V]"),
    "brightness": (0.0, 1.0, False, "factors lie in [1 - V, 1 + V]"),
    "contrast": (0.0, 1.0, False, "factors lie in [1 - V, 1 + V]"),
    "saturation": (0.0, 1.0, False, "factors lie in [1 - V, 1 + V]"),
    "hue": (0.0, 0.5, False, "the largest hue shift in turns"),
    "erase": (0.0, 1.0, True, "the probability of erasing a box in each image"),
    "mixup": (0.0, math.inf, False, "the Beta distribution's alpha"),
    "cutmix": (0.0, math.inf, False, "the Beta distribution's alpha"),
}


def _check_range(spec: str, key: str, value: float) -> None:
    """``key=value`` of ``--augment`` within :data:`_ITEM_RANGES`; a one-line ConfigError
    naming the value and the allowed range otherwise."""
    low, high, low_open, why = _ITEM_RANGES[key]
    if (value > low if low_open else value >= low) and value <= high:
        return
    allowed = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high < math.inf else \
        f">= {low:g}"
    raise ConfigError(f"--augment {key}={value:g} is out of range: {key} must be "
                      f"{'in ' if high < math.inf else ''}{allowed} ({why}); got {spec!r}")


def _int_item(spec: str, key: str, value: str) -> int:
    what = {"crop": "P needs an integer padding", "rrc": "S needs an integer size"}[key]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--augment: {key}={what}, got {key + '=' + value!r} in "
                          f"{spec!r}") from None


def _range_item(spec: str, key: str, value: str) -> tuple[float, float]:
    lo, colon, hi = value.partition(":")
    try:
        if not colon:
            raise ValueError
        return float(lo), float(hi)
    except ValueError:
        raise ConfigError(f"--augment: {key}= needs two numbers LO:HI, got {key}={value!r} "
                          f"in {spec!r}") from None


def _parse_rrc(spec: str, items: dict[str, str], flip: bool,
               image_shape: tuple[int, int, int] | None, output_size: int | None) -> Any:
    from .resized_crop import RandomResizedCrop

    for key in ("crop", "pad"):
        if key in items:
            raise ConfigError(f"--augment: rrc (random-resized crop) and {key} do not go "
                              f"together; got {spec!r}")
    if items["rrc"]:
        size = _int_item(spec, "rrc", items["rrc"])
    elif output_size is not None:
        size = output_size
    else:
        size = min(image_shape[:2]) if image_shape is not None else 1
    options: dict[str, Any] = {"flip": flip}
    for key in ("scale", "ratio"):
        if key in items:
            options[key] = _range_item(spec, key, items[key])
    return RandomResizedCrop(size, **options)
