"""Random-resized crop (and flip) of training batches on the batch's own backend:
:class:`RandomResizedCrop`, the training augmentation of ImageNet-style models.

Each image of a batch ``(B, H, W, C)`` (floats in ``[0, 1]``) gets its own box — top ``i``,
left ``j``, height ``h``, width ``w``, integers inside the image — whose area is a random share
in ``scale`` of the image's and whose aspect ratio ``w / h`` is log-uniform in ``ratio``; the
box is resampled to ``size x size`` with antialiased bilinear interpolation (the triangle filter
of Pillow's ``BILINEAR`` and ``torch.nn.functional.interpolate(..., antialias=True)``: its
support widens by the shrink factor when the box is larger than the output), and with ``flip``
each output is mirrored left-right with probability 1/2. This is what torchvision's
``RandomResizedCrop(size, scale, ratio, antialias=True)`` followed by
``RandomHorizontalFlip()`` does to a float image.

**Boxes (host).** Drawn per batch from
:func:`anycnn.data.augment.batch_generator` ``(seed, epoch, batch)``, like
:class:`~anycnn.data.augment.Augment`'s crops, in this order: the area shares
``uniform(scale[0], scale[1], (B, 10))``, the log aspect ratios
``uniform(log ratio[0], log ratio[1], (B, 10))``, the offsets ``random((2, B))``, then (with
``flip``) ``integers(0, 2, B)``. Each image takes the first of its 10 tries whose
``w = round(sqrt(area * ratio))`` and ``h = round(sqrt(area / ratio))`` fit the image, at offset
``i = floor(u0 * (H - h + 1))``, ``j = floor(u1 * (W - w + 1))``; when none fits, the largest
centred box whose ratio is clamped into ``ratio`` (torchvision's fallback). A batch's boxes
therefore depend on (seed, epoch, batch, H, W) only: every backend, both loader modes, and a
resumed run see the same boxes.

**Resampling (device).** The boxes travel as one int64 ``(5, B)`` array; the per-image
interpolation weights are built from them on the device as two dense matrices, rows
``Wy (B, S, H)`` and columns ``Wx (B, S, W)`` (the flip folded into ``Wx``), and the batch is
resampled by two batched matrix products, ``Wy @ X @ Wx^T`` per image and channel. On NumPy
this is 3x faster than gathering the taps (about 40 ms for 32 images 256 -> 224 on two cores:
BENCHMARKS.md). Results agree with a per-image reference to float rounding (about ``1e-5`` in
float32), not bit for bit across backends.

Output pixel ``y`` of an axis whose box starts at ``a`` and is ``n`` long reads input pixel
``k`` (``a <= k < a + n``) with weight ``max(0, 1 - |k + 0.5 - c| / s)`` normalised over ``k``,
where ``c = a + (y + 0.5) * n / S`` and ``s = max(n / S, 1)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device

from ..errors import ConfigError

#: tries per image before the centred fallback box (as torchvision)
TRIES = 10

#: ``kind`` of a :class:`RandomResizedCrop` in a preprocess record
KIND = "random_resized_crop"


def _pair(name: str, value: Any, positive: bool) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"RandomResizedCrop: {name} must be two numbers (low, high), "
                          f"got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi
            and (lo > 0 if positive else lo >= 0)):
        raise ConfigError(f"RandomResizedCrop: {name} must be finite with "
                          f"{'0 <' if positive else '0 <='} low <= high, got {value!r}")
    return lo, hi


@dataclass(frozen=True)
class RandomResizedCrop:
    """Random-resized crop to ``size x size`` and optional horizontal flip (module docstring).

    Args:
        size: output side ``S`` in pixels.
        scale: ``(low, high)`` share of the image area a box covers (``0 < low <= high``;
            ``high`` above 1 only makes the fallback likelier).
        ratio: ``(low, high)`` aspect ratio ``w / h`` of a box (``0 < low <= high``).
        flip: mirror each output left-right with probability 1/2.

    Raises:
        ConfigError: ``size`` not a positive integer, a bad ``scale`` or ``ratio``, ``flip``
            not a bool.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False

    #: applied to ``[0, 1]`` floats, after the scaling (an interpolation of pixels)
    before_scaling = False

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, numbers.Integral) \
                or self.size < 1:
            raise ConfigError(f"RandomResizedCrop: size must be a positive integer, got "
                              f"{self.size!r}")
        if not isinstance(self.flip, (bool, np.bool_)):
            raise ConfigError(f"RandomResizedCrop: flip must be True or False, got "
                              f"{self.flip!r}")
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "scale", _pair("scale", self.scale, positive=True))
        object.__setattr__(self, "ratio", _pair("ratio", self.ratio, positive=True))
        object.__setattr__(self, "flip", bool(self.flip))

    @property
    def active(self) -> bool:
        """Always true: the crop changes every image."""
        return True

    def check_image_shape(self, height: int, width: int) -> None:
        """Any image size works (boxes are drawn inside it); nothing to refuse."""

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        """``(size, size)``: the shape of every output image."""
        return self.size, self.size

    def draw(self, seed: int, epoch: int, batch: int, count: int,
             image_size: Sequence[int] | None = None) -> np.ndarray:
        """Host int64 ``(5, count)``: rows top, left, height, width and flip (0/1) of the boxes
        of batch ``batch`` of epoch ``epoch`` for ``image_size`` ``(H, W)`` images, drawn as
        the module docstring says.

        Raises:
            ConfigError: no ``image_size``.
        """
        from .augment import batch_generator

        if image_size is None:
            raise ConfigError("RandomResizedCrop.draw needs the image size (H, W)")
        height, width = (int(v) for v in image_size[:2])
        rng = batch_generator(seed, epoch, batch)
        area = height * width * rng.uniform(self.scale[0], self.scale[1], (count, TRIES))
        log_ratio = rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1]),
                                (count, TRIES))
        offsets = rng.random((2, count))
        flips = rng.integers(0, 2, count) if self.flip else np.zeros(count, dtype=np.int64)
        aspect = np.exp(log_ratio)
        w = np.round(np.sqrt(area * aspect)).astype(np.int64)
        h = np.round(np.sqrt(area / aspect)).astype(np.int64)
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = np.argmax(fits, axis=1)
        rows = np.arange(count)
        h, w = h[rows, first], w[rows, first]
        fallback_h, fallback_w = self._fallback(height, width)
        found = fits.any(axis=1)
        h = np.where(found, h, fallback_h)
        w = np.where(found, w, fallback_w)
        top = np.where(found, np.floor(offsets[0] * (height - h + 1)), (height - h) // 2)
        left = np.where(found, np.floor(offsets[1] * (width - w + 1)), (width - w) // 2)
        return np.stack([top, left, h, w, flips]).astype(np.int64)

    def _fallback(self, height: int, width: int) -> tuple[int, int]:
        """The centred box used when no try fits: the whole image, its ratio clamped."""
        ratio = width / height
        if ratio < self.ratio[0]:
            return round(width / self.ratio[0]), width
        if ratio > self.ratio[1]:
            return height, round(height * self.ratio[1])
        return height, width

    def apply(self, images: Any, params: Any) -> Any:
        """Resample ``images`` float ``(B, H, W, C)`` (any backend) through the boxes
        ``params`` (int64 ``(5, B)`` from :meth:`draw`, on the same device); returns
        ``(B, size, size, C)`` in the images' dtype.

        Raises:
            ConfigError: the images are not floating point.
        """
        xp = array_namespace(images, params)
        if not xp.isdtype(images.dtype, "real floating"):
            raise ConfigError(f"RandomResizedCrop resamples floats in [0, 1]; got "
                              f"{images.dtype} images (scale them first)")
        b, h, w, c = images.shape
        s = self.size
        box = [xp.astype(params[r, :], images.dtype) for r in range(5)]
        wy = _weights(xp, box[0], box[2], s, h, None)  # (B, S, H)
        wx = _weights(xp, box[1], box[3], s, w, box[4])  # (B, S, W), flips folded in
        # rows: (B, W*C, H) @ (B, H, S) -> (B, W*C, S), i.e. [w, c, y]
        cols = xp.matmul(xp.matrix_transpose(xp.reshape(images, (b, h, w * c))),
                         xp.matrix_transpose(wy))
        # columns: (B, S, W) @ (B, W, C*S) -> (B, S, C*S), i.e. [x, c, y]
        out = xp.matmul(wx, xp.reshape(cols, (b, w, c * s)))
        return xp.permute_dims(xp.reshape(out, (b, s, c, s)), (0, 3, 1, 2))

    def to_record(self) -> dict[str, Any]:
        """JSON-able ``{"kind": "random_resized_crop", "size", "scale", "ratio", "flip"}``."""
        return {"kind": KIND, "size": self.size, "scale": list(self.scale),
                "ratio": list(self.ratio), "flip": self.flip}

    def spec(self) -> str:
        """The ``--augment`` text that gives this object back
        (:func:`anycnn.data.augment.parse_augment`)."""
        parts = [f"rrc={self.size}"]
        if self.scale != (0.08, 1.0):
            parts.append(f"scale={self.scale[0]!r}:{self.scale[1]!r}")
        if self.ratio != (3 / 4, 4 / 3):
            parts.append(f"ratio={self.ratio[0]!r}:{self.ratio[1]!r}")
        return ",".join(parts + (["flip"] if self.flip else []))


def _weights(xp: Any, start: Any, length: Any, out: int, size: int, flip: Any) -> Any:
    """``(B, out, size)`` antialiased bilinear weights of the boxes ``[start, start + length)``
    (float ``(B,)`` each) of an axis of ``size`` pixels resampled to ``out`` (module docstring);
    ``flip`` (float ``(B,)`` of 0/1, or None) reverses the output order."""
    dtype, dev = start.dtype, device(start)
    step = length / out  # input pixels per output pixel
    inverse = 1 / xp.clip(step, min=1.0)  # the filter's support widens when shrinking
    y = xp.arange(out, dtype=dtype, device=dev)[None, :]
    if flip is not None:
        y = y + flip[:, None] * (out - 1 - 2 * y)
    centre = start[:, None] + (y + 0.5) * step[:, None]  # (B, out)
    k = xp.arange(size, dtype=dtype, device=dev)[None, None, :]
    weight = xp.clip(1 - xp.abs((k + 0.5 - centre[:, :, None]) * inverse[:, None, None]),
                     min=0.0)
    inside = (k >= start[:, None, None]) & (k < (start + length)[:, None, None])
    weight = weight * xp.astype(inside, dtype)
    return weight / xp.sum(weight, axis=2, keepdims=True)
