"""Random rotation of training batches on the batch's own backend: :class:`RandomRotation`.

Each image of a batch ``(B, H, W, C)`` (floats) is rotated about its centre by its own angle
``a``, drawn uniformly in ``[-degrees, degrees]`` (positive: counter-clockwise as displayed,
row 0 at the top), and resampled bilinearly; pixels whose source falls outside the image are 0
(each of the four bilinear taps outside the image counts as 0, as ``grid_sample`` with zero
padding). The output keeps the input's shape.

Output pixel ``(y, x)`` reads the input at ``xs = cx + cos(a) (x - cx) - sin(a) (y - cy)``,
``ys = cy + sin(a) (x - cx) + cos(a) (y - cy)`` with ``cy = (H - 1) / 2``, ``cx = (W - 1) / 2``.

**Angles (host).** ``uniform(-degrees, degrees, B)`` from the batch's rotation stream
(:func:`anycnn.data.pipeline.op_generator`), sent as the float64 rows ``cos a``, ``sin a``
(cast to the images' dtype on the device).

**Resampling (device).** The source coordinates of all ``B * H * W`` pixels are computed on the
device; the four taps are four ``xp.take`` over the batch flattened to ``(B * H * W, C)``, with
out-of-image taps clamped and their weights zeroed. No Python loop runs over the images.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device

from ..errors import ConfigError


@dataclass(frozen=True)
class RandomRotation:
    """Rotate each image by a random angle in ``[-degrees, degrees]`` (module docstring).

    Args:
        degrees: the largest angle, in degrees, ``0 < degrees <= 180``.

    Raises:
        ConfigError: ``degrees`` is not a number in ``(0, 180]``.
    """

    degrees: float

    #: stream tag of :func:`anycnn.data.pipeline.op_generator`
    tag = 1

    def __post_init__(self) -> None:
        d = self.degrees
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not 0 < d <= 180:
            raise ConfigError(f"RandomRotation: degrees must be a number in (0, 180], got {d!r}")
        object.__setattr__(self, "degrees", float(d))

    def draw(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """Host float64 ``(2, count)``: rows ``cos a`` and ``sin a`` of ``count`` angles."""
        angle = np.deg2rad(rng.uniform(-self.degrees, self.degrees, count))
        return np.stack([np.cos(angle), np.sin(angle)])

    def apply(self, images: Any, params: Any) -> Any:
        """Rotate float ``images`` ``(B, H, W, C)`` by ``params`` (``(2, B)`` from :meth:`draw`,
        on the same device); returns ``(B, H, W, C)`` in the images' dtype."""
        xp = array_namespace(images, params)
        dtype, dev = images.dtype, device(images)
        b, h, w, c = images.shape
        cos = xp.astype(params[0, :], dtype)[:, None, None]
        sin = xp.astype(params[1, :], dtype)[:, None, None]
        cy, cx = (h - 1) / 2, (w - 1) / 2
        dy = (xp.arange(h, dtype=dtype, device=dev) - cy)[None, :, None]
        dx = (xp.arange(w, dtype=dtype, device=dev) - cx)[None, None, :]
        xs = cx + cos * dx - sin * dy  # (B, H, W)
        ys = cy + sin * dx + cos * dy
        x0, y0 = xp.floor(xs), xp.floor(ys)
        fx, fy = xs - x0, ys - y0
        x0 = xp.astype(x0, xp.int64)
        y0 = xp.astype(y0, xp.int64)
        flat = xp.reshape(images, (b * h * w, c))
        base = xp.arange(b, dtype=xp.int64, device=dev)[:, None, None] * (h * w)
        out = None
        for oy, ox, wt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                           (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
            yy, xx = y0 + oy, x0 + ox
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            index = base + xp.clip(yy, 0, h - 1) * w + xp.clip(xx, 0, w - 1)
            tap = xp.take(flat, xp.reshape(index, (-1,)), axis=0)
            weight = xp.reshape(wt * xp.astype(inside, dtype), (-1, 1))
            out = tap * weight if out is None else out + tap * weight
        return xp.reshape(out, (b, h, w, c))

    def to_record(self) -> dict[str, Any]:
        """JSON-able ``{"degrees": float}``."""
        return {"degrees": self.degrees}

    def spec(self) -> str:
        """The ``--augment`` item: ``rotate=D``."""
        return f"rotate={_number(self.degrees)}"


def _number(v: float) -> str:
    """``v`` as short text (``15`` rather than ``15.0``)."""
    return str(int(v)) if float(v).is_integer() and math.isfinite(v) else repr(v)
