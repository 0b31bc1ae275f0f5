"""Learning-rate schedules: callables ``epoch -> lr`` (epoch counted from 0), set once per epoch.

Formulas follow PyTorch's ``StepLR`` and ``CosineAnnealingLR`` evaluated per epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Constant:
    """The same learning rate every epoch."""

    base_lr: float

    def __call__(self, epoch: int) -> float:
        return self.base_lr


@dataclass(frozen=True)
class StepDecay:
    """``base_lr * gamma ** (epoch // step_size)``."""

    base_lr: float
    step_size: int = 1
    gamma: float = 0.5

    def __call__(self, epoch: int) -> float:
        return self.base_lr * self.gamma ** (epoch // self.step_size)


@dataclass(frozen=True)
class Cosine:
    """``min_lr + (base_lr - min_lr) * (1 + cos(pi * epoch / total_epochs)) / 2``."""

    base_lr: float
    total_epochs: int
    min_lr: float = 0.0

    def __call__(self, epoch: int) -> float:
        t = min(epoch, self.total_epochs) / max(self.total_epochs, 1)
        return self.min_lr + (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t)) / 2


SCHEDULES = ("constant", "step", "cosine")


def make_schedule(name: str, base_lr: float, epochs: int, step_size: int | None = None,
                  gamma: float = 0.5):
    """A schedule by name: ``constant``, ``step`` (halve every ``step_size`` epochs, default a
    third of the run) or ``cosine`` (down to 0 over ``epochs``)."""
    if name == "constant":
        return Constant(base_lr)
    if name == "step":
        return StepDecay(base_lr, step_size or max(1, epochs // 3), gamma)
    if name == "cosine":
        return Cosine(base_lr, epochs)
    raise ConfigError(f"unknown schedule {name!r}; valid names: {', '.join(SCHEDULES)}")
