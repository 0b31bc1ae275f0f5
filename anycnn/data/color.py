"""Random colour jitter of training batches on the batch's own backend: :class:`ColorJitter`.

Each image of a batch ``(B, H, W, C)`` (floats in ``[0, 1]``, ``C`` 1 or 3) gets its own
factors, applied in this fixed order, each result clipped to ``[0, 1]``:

1. **brightness** ``f_b``: ``x * f_b``;
2. **contrast** ``f_c``: ``f_c * x + (1 - f_c) * m``, ``m`` the mean over the image of its grey
   level;
3. **saturation** ``f_s`` (RGB only): ``f_s * x + (1 - f_s) * g``, ``g`` the pixel's grey level;
4. **hue** ``f_h`` (RGB only): the pixel's hue (HSV, in turns) shifted by ``f_h``, modulo 1.

The grey level is ``0.299 R + 0.587 G + 0.114 B`` (ITU-R 601, as torchvision), the image itself
when ``C`` is 1 (where saturation and hue change nothing). ``f_b``, ``f_c``, ``f_s`` are uniform
in ``[1 - v, 1 + v]`` for the strength ``v`` of each (``0 <= v <= 1``: no factor is negative),
``f_h`` uniform in ``[-hue, hue]``; a component of strength 0 is skipped and draws nothing.
This is torchvision's ``ColorJitter`` with its order fixed rather than shuffled per call (and
strengths kept in ``[0, 1]``, where torchvision clamps ``1 - v`` at 0).

**Factors (host).** Drawn from the batch's jitter stream
(:func:`anycnn.data.pipeline.op_generator`) in the order brightness, contrast, saturation, hue
(``uniform(lo, hi, B)`` each, only for the enabled components), sent as float64 ``(4, B)``
(1, 1, 1, 0 for a skipped component). **Device:** elementwise ops and one mean per image; the
hue goes RGB -> HSV -> RGB without branches (``k = (n + 6 h) mod 6``,
``v - v s clip(min(k, 4 - k), 0, 1)`` for ``n`` = 5, 3, 1).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from ..errors import ConfigError, ShapeError

#: grey-level weights of R, G, B (ITU-R 601)
GREY = (0.299, 0.587, 0.114)


def _strength(name: str, value: Any, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(value) and 0 <= value <= high):
        raise ConfigError(f"ColorJitter: {name} must be a number in [0, {high:g}], got "
                          f"{value!r}")
    return float(value)


@dataclass(frozen=True)
class ColorJitter:
    """Random brightness, contrast, saturation and hue per image (module docstring).

    Args:
        brightness, contrast, saturation: strength ``v`` of each (0: off), ``0 <= v <= 1``:
            the factors lie in ``[1 - v, 1 + v]``, never negative (a factor of 0 already
            makes an image black, flat grey or grayscale).
        hue: the largest hue shift in turns, ``0 <= hue <= 0.5``.

    Raises:
        ConfigError: a strength out of range, or all of them 0.
    """

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0

    #: stream tag of :func:`anycnn.data.pipeline.op_generator`
    tag = 2

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            object.__setattr__(self, name, _strength(name, getattr(self, name), 1.0))
        object.__setattr__(self, "hue", _strength("hue", self.hue, 0.5))
        if not (self.brightness or self.contrast or self.saturation or self.hue):
            raise ConfigError("ColorJitter: every strength is 0; give at least one")

    def draw(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """Host float64 ``(4, count)``: rows ``f_b``, ``f_c``, ``f_s``, ``f_h``."""
        params = np.array([1.0, 1.0, 1.0, 0.0])[:, None].repeat(count, axis=1)
        for row, v in enumerate((self.brightness, self.contrast, self.saturation)):
            if v:
                params[row] = rng.uniform(1 - v, 1 + v, count)
        if self.hue:
            params[3] = rng.uniform(-self.hue, self.hue, count)
        return params

    def apply(self, images: Any, params: Any) -> Any:
        """Jitter float ``images`` ``(B, H, W, C)`` in ``[0, 1]`` with ``params`` (``(4, B)``
        from :meth:`draw`, same device); returns the same shape and dtype.

        Raises:
            ShapeError: ``C`` is not 1 or 3 (the grey level is defined for those).
        """
        xp = array_namespace(images, params)
        c = images.shape[3]
        if c not in (1, 3):
            raise ShapeError(f"ColorJitter needs 1- or 3-channel images, got {c} channels")
        dtype = images.dtype
        f = [xp.astype(params[r, :], dtype)[:, None, None, None] for r in range(4)]
        x = images
        if self.brightness:
            x = xp.clip(x * f[0], 0.0, 1.0)
        if self.contrast:
            mean = xp.mean(_grey(xp, x), axis=(1, 2), keepdims=True)
            x = xp.clip(f[1] * x + (1 - f[1]) * mean, 0.0, 1.0)
        if c == 3 and self.saturation:
            x = xp.clip(f[2] * x + (1 - f[2]) * _grey(xp, x), 0.0, 1.0)
        if c == 3 and self.hue:
            x = _shift_hue(xp, x, f[3])
        return x

    def to_record(self) -> dict[str, Any]:
        """JSON-able ``{"brightness", "contrast", "saturation", "hue"}``."""
        return {"brightness": self.brightness, "contrast": self.contrast,
                "saturation": self.saturation, "hue": self.hue}

    def spec(self) -> str:
        """The ``--augment`` items: ``jitter=V`` when brightness, contrast and saturation
        share their strength, else ``brightness=``, ``contrast=``, ``saturation=``; then
        ``hue=H``."""
        b, c, s = self.brightness, self.contrast, self.saturation
        if b == c == s and b:
            parts = [f"jitter={b!r}"]
        else:
            parts = [f"{n}={v!r}" for n, v in (("brightness", b), ("contrast", c),
                                                 ("saturation", s)) if v]
        return ",".join(parts + ([f"hue={self.hue!r}"] if self.hue else []))


def _grey(xp: Any, x: Any) -> Any:
    """``(B, H, W, 1)`` grey level of ``x`` ``(B, H, W, C)``, ``C`` 1 or 3."""
    if x.shape[3] == 1:
        return x
    return GREY[0] * x[..., 0:1] + GREY[1] * x[..., 1:2] + GREY[2] * x[..., 2:3]


def _shift_hue(xp: Any, x: Any, shift: Any) -> Any:
    """RGB ``x`` with each pixel's hue shifted by ``shift`` ``(B, 1, 1, 1)`` turns."""
    r, g, b = x[..., 0:1], x[..., 1:2], x[..., 2:3]
    top = xp.maximum(xp.maximum(r, g), b)
    delta = top - xp.minimum(xp.minimum(r, g), b)
    sat = delta / xp.where(top > 0, top, xp.ones_like(top))
    safe = xp.where(delta > 0, delta, xp.ones_like(delta))
    rc, gc, bc = (top - r) / safe, (top - g) / safe, (top - b) / safe
    hue = xp.where(r == top, bc - gc, xp.where(g == top, 2 + rc - bc, 4 + gc - rc))
    hue = xp.remainder(hue / 6 + shift, 1.0)
    channels = []
    for n in (5, 3, 1):
        k = xp.remainder(n + hue * 6, 6.0)
        channels.append(top - top * sat * xp.clip(xp.minimum(k, 4 - k), 0.0, 1.0))
    return xp.concat(channels, axis=3)
