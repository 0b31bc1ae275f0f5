"""Random erasing of training batches on the batch's own backend: :class:`RandomErasing`.

With probability ``p`` each image of a batch ``(B, H, W, C)`` gets one rectangle set to 0 in
every channel. The loader erases after normalising, so an erased patch holds the dataset's mean
colour when the run normalises (torchvision's ``RandomErasing(value=0)`` after ``Normalize``),
black otherwise.

**Boxes (host).** From the batch's erasing stream (:func:`anycnn.data.pipeline.op_generator`), in
this order: ``random(B)`` (erase when below ``p``), area shares ``uniform(scale[0], scale[1],
(B, 10))``, log aspect ratios ``uniform(log ratio[0], log ratio[1], (B, 10))``, offsets
``random((2, B))``. Each image takes the first try whose ``h = round(sqrt(area * ratio))`` and
``w = round(sqrt(area / ratio))`` are below ``H`` and ``W`` (``area`` in pixels), at top
``floor(u0 * (H - h + 1))`` and left ``floor(u1 * (W - w + 1))``; with no fitting try, nothing is
erased (as torchvision). Sent as int64 ``(5, B)``: top, left, h, w, erase (0/1).

**Device.** The box is a product of a row mask ``(B, H)`` and a column mask ``(B, W)``; the
images are multiplied by its complement (exact: ``x * 1`` and ``x * 0``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device

from ..errors import ConfigError
from .resized_crop import TRIES, _pair


@dataclass(frozen=True)
class RandomErasing:
    """Erase a random rectangle of each image with probability ``p`` (module docstring).

    Args:
        p: probability, ``0 < p <= 1``.
        scale: ``(low, high)`` share of the image area erased (``0 < low <= high <= 1``).
        ratio: ``(low, high)`` aspect ratio ``h / w`` of the box (``0 < low <= high``).

    Raises:
        ConfigError: ``p``, ``scale`` or ``ratio`` out of range.
    """

    p: float = 0.5
    scale: tuple[float, float] = (0.02, 0.33)
    ratio: tuple[float, float] = (0.3, 3.3)

    #: stream tag of :func:`anycnn.data.pipeline.op_generator`
    tag = 3

    def __post_init__(self) -> None:
        p = self.p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
            raise ConfigError(f"RandomErasing: p must be a probability in (0, 1], got {p!r}")
        object.__setattr__(self, "p", float(p))
        try:
            scale = _pair("scale", self.scale, positive=True)
            ratio = _pair("ratio", self.ratio, positive=True)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("RandomResizedCrop", "RandomErasing")) from None
        if scale[1] > 1:
            raise ConfigError(f"RandomErasing: scale must be at most 1, got {self.scale!r}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)

    def draw(self, rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
        """Host int64 ``(5, count)``: rows top, left, h, w, erase of ``height x width``
        images."""
        erase = rng.random(count) < self.p
        area = height * width * rng.uniform(self.scale[0], self.scale[1], (count, TRIES))
        log_ratio = rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1]),
                                (count, TRIES))
        offsets = rng.random((2, count))
        aspect = np.exp(log_ratio)
        h = np.round(np.sqrt(area * aspect)).astype(np.int64)
        w = np.round(np.sqrt(area / aspect)).astype(np.int64)
        fits = (h < height) & (w < width)
        first = np.argmax(fits, axis=1)
        rows = np.arange(count)
        h, w = h[rows, first], w[rows, first]
        erase &= fits.any(axis=1)
        top = np.floor(offsets[0] * (height - h + 1))
        left = np.floor(offsets[1] * (width - w + 1))
        return np.stack([top, left, h, w, erase]).astype(np.int64)

    def apply(self, images: Any, params: Any) -> Any:
        """Erase ``images`` ``(B, H, W, C)`` (floats) by ``params`` (int64 ``(5, B)`` from
        :meth:`draw`, same device); returns the same shape and dtype."""
        xp = array_namespace(images, params)
        dev = device(images)
        _, h, w, _ = images.shape
        top, left, bh, bw, erase = (params[r, :][:, None] for r in range(5))
        rows = xp.arange(h, dtype=xp.int64, device=dev)[None, :]
        cols = xp.arange(w, dtype=xp.int64, device=dev)[None, :]
        in_rows = (rows >= top) & (rows < top + bh) & (erase == 1)  # (B, H)
        in_cols = (cols >= left) & (cols < left + bw)  # (B, W)
        box = in_rows[:, :, None, None] & in_cols[:, None, :, None]
        return images * xp.astype(~box, images.dtype)

    def to_record(self) -> dict[str, Any]:
        """JSON-able ``{"p", "scale", "ratio"}``."""
        return {"p": self.p, "scale": list(self.scale), "ratio": list(self.ratio)}

    def spec(self) -> str:
        """The ``--augment`` item: ``erase=P``."""
        return f"erase={self.p!r}"
