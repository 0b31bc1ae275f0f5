"""MixUp and CutMix of training batches with their mixed targets: :class:`BatchMix`.

A mixed batch pairs image ``i`` with image ``perm[i]`` of the same batch (a random permutation)
and one ratio ``lam`` for the whole batch:

* **MixUp** (``mixup=alpha``): ``lam ~ Beta(alpha, alpha)``; ``x = lam x + (1 - lam) x[perm]``.
* **CutMix** (``cutmix=alpha``): ``lam ~ Beta(alpha, alpha)``; a box of ``int(H r) x int(W r)``
  pixels, ``r = sqrt(1 - lam)``, centred at a uniform pixel ``(cy, cx)`` and cut at the image's
  edges (rows ``[clip(cy - ch // 2), clip(cy + ch // 2))``, columns likewise) is copied from
  ``x[perm]``; ``lam`` becomes ``1 - box area / (H W)``, the share actually kept.
* Both given: each batch picks one of the two with probability 1/2.

The targets become ``lam t + (1 - lam) t[perm]``, where ``t`` is the one-hot ``(B, K)`` form of
integer labels (or the soft targets themselves): batches of a mixing loader are
``(images, soft_targets)`` with ``soft_targets`` float ``(B, K)`` in the loader's dtype.

**Draws (host).** From the batch's mixing stream (:func:`anycnn.data.pipeline.op_generator`), in
this order: (both given) ``integers(0, 2)`` (1 = CutMix), ``beta(alpha, alpha)``,
``permutation(B)``, (CutMix) ``integers(0, H)`` then ``integers(0, W)``.

**Loss.** For such targets, cross-entropy ``-sum_k t_k log softmax(z)_k`` equals
``lam CE(z, y) + (1 - lam) CE(z, y[perm])`` (the loss of the MixUp paper), since it is linear in
``t``. :class:`~anycnn.nn.losses.SoftmaxCrossEntropy` computes it from the soft targets (and
takes integer labels too, for validation); the mixing is done on the device by elementwise
ops, one ``xp.take`` and (CutMix) one ``xp.where``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import array_api_extra as xpx
import numpy as np
from array_api_compat import array_namespace, device

from ..errors import ConfigError


def _alpha(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(value) and value >= 0):
        raise ConfigError(f"BatchMix: {name} (the Beta distribution's alpha) must be a number "
                          f">= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class MixDraw:
    """One batch's mixing: ``cutmix`` (else MixUp), ``lam`` (the kept share), ``perm`` (int64
    ``(B,)``), and the CutMix box rows ``[top, bottom)`` and columns ``[left, right)``."""

    cutmix: bool
    lam: float
    perm: np.ndarray
    box: tuple[int, int, int, int] = (0, 0, 0, 0)


@dataclass(frozen=True)
class BatchMix:
    """MixUp and/or CutMix (module docstring).

    Args:
        mixup: MixUp's ``alpha`` (0: off).
        cutmix: CutMix's ``alpha`` (0: off).

    Raises:
        ConfigError: a negative or non-finite ``alpha``, or both 0.
    """

    mixup: float = 0.0
    cutmix: float = 0.0

    #: stream tag of :func:`anycnn.data.pipeline.op_generator`
    tag = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "mixup", _alpha("mixup", self.mixup))
        object.__setattr__(self, "cutmix", _alpha("cutmix", self.cutmix))
        if not (self.mixup or self.cutmix):
            raise ConfigError("BatchMix: mixup and cutmix are both 0; give at least one alpha")

    def draw(self, rng: np.random.Generator, count: int, height: int, width: int) -> MixDraw:
        """The mixing of a batch of ``count`` ``height x width`` images."""
        cutmix = bool(self.cutmix) and (not self.mixup or bool(rng.integers(0, 2)))
        alpha = self.cutmix if cutmix else self.mixup
        lam = float(rng.beta(alpha, alpha))
        perm = rng.permutation(count).astype(np.int64)
        if not cutmix:
            return MixDraw(False, lam, perm)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        r = math.sqrt(1 - lam)
        ch, cw = int(height * r), int(width * r)
        top, bottom = min(max(cy - ch // 2, 0), height), min(max(cy + ch // 2, 0), height)
        left, right = min(max(cx - cw // 2, 0), width), min(max(cx + cw // 2, 0), width)
        lam = 1 - (bottom - top) * (right - left) / (height * width)
        return MixDraw(True, lam, perm, (top, bottom, left, right))

    def apply(self, images: Any, targets: Any, mix: MixDraw, num_classes: int) -> tuple[Any, Any]:
        """``(mixed images, soft targets)``: ``images`` float ``(B, H, W, C)``, ``targets``
        integer labels ``(B,)`` or float soft targets ``(B, num_classes)`` (same backend);
        the soft targets come out ``(B, num_classes)`` in the images' dtype."""
        xp = array_namespace(images, targets)
        dev = device(images)
        if targets.ndim == 1:
            targets = xpx.one_hot(targets, num_classes, dtype=images.dtype, xp=xp)
        else:
            targets = xp.astype(targets, images.dtype)
        perm = xp.asarray(mix.perm, device=dev)
        other = xp.take(images, perm, axis=0)
        lam = mix.lam
        if mix.cutmix:
            top, bottom, left, right = mix.box
            _, h, w, _ = images.shape
            rows = xp.arange(h, device=dev)
            cols = xp.arange(w, device=dev)
            box = (((rows >= top) & (rows < bottom))[:, None]
                   & ((cols >= left) & (cols < right))[None, :])
            mixed = xp.where(box[None, :, :, None], other, images)
        else:
            mixed = lam * images + (1 - lam) * other
        soft = lam * targets + (1 - lam) * xp.take(targets, perm, axis=0)
        return mixed, soft

    def to_record(self) -> dict[str, float]:
        """JSON-able ``{"mixup": alpha, "cutmix": alpha}``."""
        return {"mixup": self.mixup, "cutmix": self.cutmix}

    def spec(self) -> str:
        """The ``--augment`` items ``mixup=A`` and/or ``cutmix=A``."""
        return ",".join(f"{n}={v!r}" for n, v in (("mixup", self.mixup),
                                                  ("cutmix", self.cutmix)) if v)
