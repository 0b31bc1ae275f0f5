"""Learning-rate schedules: what the :class:`~anycnn.train.trainer.Trainer` sets as
``optimizer.lr``, and when.

A schedule is a callable with an ``interval``:

* ``"epoch"`` (the default, also for a plain function): ``schedule(epoch) -> lr``, ``epoch``
  counted from 0, set at the start of each epoch: :class:`Constant`, :class:`StepDecay`,
  :class:`Cosine` with ``total_epochs``, PyTorch's ``StepLR``/``CosineAnnealingLR`` stepped
  once per epoch;
* ``"step"``: ``schedule(t) -> lr``, ``t`` the 0-based index of the run's training step (over
  all epochs: ``epoch * steps_per_epoch + step``), set before every step: :class:`Cosine` with
  ``total_steps`` and :class:`OneCycle`, PyTorch's schedulers stepped once per batch.

:class:`ReduceLROnPlateau` is an epoch schedule that also reads the run's history
(``reads_history = True``: called as ``schedule(epoch, history)``); it folds the records from
the start, so it keeps no state of its own and a resumed run gets the same rates.

Every schedule here is a function of its arguments only: a resumed run sets the same learning
rate at every step as the uninterrupted one. ``Trainer(..., warmup_steps=N)`` ramps any of them
up over the first ``N`` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

INTERVALS = ("epoch", "step")


def _positive(owner: str, name: str, value: Any, *, integer: bool = False,
              allow_zero: bool = False) -> None:
    kind = (int,) if integer else (int, float)
    ok = (isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
          and (value >= 0 if allow_zero else value > 0))
    if not ok:
        what = "an integer" if integer else "a finite number"
        raise ConfigError(f"{owner}: {name} must be {what} {'>= 0' if allow_zero else '> 0'}, "
                          f"got {value!r}")


def interval_of(schedule: Any) -> str:
    """``"epoch"`` or ``"step"``: when the trainer calls ``schedule`` (``"epoch"`` for a plain
    function).

    Raises:
        ConfigError: an ``interval`` attribute with another value.
    """
    interval = getattr(schedule, "interval", "epoch")
    if interval not in INTERVALS:
        raise ConfigError(f"a schedule's interval must be 'epoch' or 'step', got {interval!r}")
    return interval


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
    """``min_lr + (base_lr - min_lr) * (1 + cos(pi * t / total)) / 2``, then ``min_lr``.

    Per epoch with ``total_epochs`` (``t`` the epoch), or per step with ``total_steps`` (``t``
    the run's step: a smooth decay inside each epoch, PyTorch's ``CosineAnnealingLR`` stepped
    per batch); give one of the two. ``Trainer(..., warmup_steps=N)`` adds a linear warmup.
    """

    base_lr: float
    total_epochs: int | None = None
    min_lr: float = 0.0
    total_steps: int | None = None

    def __post_init__(self) -> None:
        if (self.total_epochs is None) == (self.total_steps is None):
            raise ConfigError("Cosine takes total_epochs (a schedule per epoch) or total_steps "
                              "(per training step), one of them")
        total = "total_epochs" if self.total_steps is None else "total_steps"
        _positive("Cosine", total, getattr(self, total), integer=True)

    @property
    def interval(self) -> str:
        """``"step"`` with ``total_steps``, else ``"epoch"``."""
        return "epoch" if self.total_steps is None else "step"

    def __call__(self, t: int) -> float:
        total = self.total_epochs if self.total_steps is None else self.total_steps
        t = min(t, total) / max(total, 1)
        return self.min_lr + (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t)) / 2


@dataclass(frozen=True)
class OneCycle:
    """The one-cycle policy (Smith & Topin), per step, with PyTorch's ``OneCycleLR`` formulas.

    From ``max_lr / div_factor`` up to ``max_lr`` over the first ``pct_start`` of the steps,
    then down to ``max_lr / div_factor / final_div_factor`` (``three_phase``: back to the
    initial rate over as many steps, then down to the minimum), annealed by cosine or linearly.
    Only the learning rate cycles (PyTorch's ``cycle_momentum=False``).

    Args:
        max_lr: the peak learning rate.
        total_steps: steps of the cycle; or give ``epochs`` and ``steps_per_epoch``
            (``len(train_loader)``) instead.
        pct_start: share of the steps spent going up (in [0, 1]).
        anneal_strategy: ``"cos"`` or ``"linear"``.
        div_factor: ``max_lr / div_factor`` is the first step's rate.
        final_div_factor: the last rate is the first one divided by this.
        three_phase: the three-phase variant of fast.ai's ``fit_one_cycle``.

    ``schedule(t)`` for ``t`` in ``0 .. total_steps`` (PyTorch allows one step past the
    last); a :meth:`~anycnn.train.trainer.Trainer.fit` that would run past the cycle is refused
    before its first step.
    """

    max_lr: float
    total_steps: int | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None
    pct_start: float = 0.3
    anneal_strategy: str = "cos"
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False

    interval = "step"

    def __post_init__(self) -> None:
        _positive("OneCycle", "max_lr", self.max_lr)
        if self.total_steps is not None:
            _positive("OneCycle", "total_steps", self.total_steps, integer=True)
        elif self.epochs is None or self.steps_per_epoch is None:
            raise ConfigError("OneCycle needs total_steps, or epochs and steps_per_epoch "
                              "(len(train_loader))")
        else:
            _positive("OneCycle", "epochs", self.epochs, integer=True)
            _positive("OneCycle", "steps_per_epoch", self.steps_per_epoch, integer=True)
        if not (isinstance(self.pct_start, int | float) and 0 <= self.pct_start <= 1):
            raise ConfigError(f"OneCycle: pct_start must be in [0, 1], got {self.pct_start!r}")
        if self.anneal_strategy not in ("cos", "linear"):
            raise ConfigError("OneCycle: anneal_strategy must be 'cos' or 'linear', got "
                              f"{self.anneal_strategy!r}")
        _positive("OneCycle", "div_factor", self.div_factor)
        _positive("OneCycle", "final_div_factor", self.final_div_factor)

    @property
    def steps(self) -> int:
        """The number of steps of the cycle."""
        if self.total_steps is not None:
            return self.total_steps
        return self.epochs * self.steps_per_epoch

    def check_steps(self, needed: int) -> None:
        """Refuse a run of ``needed`` steps that goes past the cycle (ConfigError)."""
        if needed > self.steps:
            raise ConfigError(f"OneCycle covers {self.steps} steps, but the run would train "
                              f"{needed}: make total_steps (or epochs * steps_per_epoch) at "
                              "least the run's epochs times len(train_loader)")

    def _phases(self) -> list[tuple[float, float, float]]:
        """``(end step, start lr, end lr)`` of each phase."""
        total, pct = self.steps, self.pct_start
        initial = self.max_lr / self.div_factor
        minimum = initial / self.final_div_factor
        if self.three_phase:
            return [(float(pct * total) - 1, initial, self.max_lr),
                    (float(2 * pct * total) - 2, self.max_lr, initial),
                    (total - 1, initial, minimum)]
        return [(float(pct * total) - 1, initial, self.max_lr),
                (total - 1, self.max_lr, minimum)]

    def __call__(self, t: int) -> float:
        if t > self.steps:
            raise ConfigError(f"OneCycle was asked for step {t} of a {self.steps}-step cycle")
        start = 0.0
        phases = self._phases()
        for i, (end, lr_start, lr_end) in enumerate(phases):
            if t <= end or i == len(phases) - 1:
                pct = (t - start) / (end - start) if end != start else 1.0
                if self.anneal_strategy == "linear":
                    return (lr_end - lr_start) * pct + lr_start
                return lr_end + (lr_start - lr_end) / 2.0 * (math.cos(math.pi * pct) + 1)
            start = end
        raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class ReduceLROnPlateau:
    """Divide the learning rate when a metric of the epoch records stops improving, with
    PyTorch's ``ReduceLROnPlateau`` rules.

    After each epoch the record's ``monitor`` value is compared with the best so far: with
    ``mode="min"`` it improves when it is below ``best * (1 - threshold)``
    (``threshold_mode="rel"``) or ``best - threshold`` (``"abs"``); ``"max"`` mirrors it. After
    more than ``patience`` epochs without improvement the rate is multiplied by ``factor``
    (not below ``min_lr``; a change smaller than ``eps`` is skipped), and the count restarts
    after ``cooldown`` more epochs. The rate is recomputed from the run's history at the start
    of every epoch (``schedule(epoch, history)``), so a resumed run follows it exactly.

    Args:
        base_lr: the rate before any reduction.
        monitor: a record key (``"val_loss"``, ``"val_accuracy"``, ``"train_loss"``, ...); the
            trainer checks before training that the records will hold it.
    """

    base_lr: float
    monitor: str = "val_loss"
    mode: str = "min"
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: str = "rel"
    cooldown: int = 0
    min_lr: float = 0.0
    eps: float = 1e-8

    interval = "epoch"
    reads_history = True

    def __post_init__(self) -> None:
        _positive("ReduceLROnPlateau", "base_lr", self.base_lr)
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ConfigError("ReduceLROnPlateau: monitor must be a record key such as "
                              f"'val_loss', got {self.monitor!r}")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"ReduceLROnPlateau: mode must be 'min' or 'max', got "
                              f"{self.mode!r}")
        if self.threshold_mode not in ("rel", "abs"):
            raise ConfigError("ReduceLROnPlateau: threshold_mode must be 'rel' or 'abs', got "
                              f"{self.threshold_mode!r}")
        if not (isinstance(self.factor, int | float) and 0 < self.factor < 1):
            raise ConfigError(f"ReduceLROnPlateau: factor must be in (0, 1), got "
                              f"{self.factor!r}")
        for name in ("patience", "cooldown"):
            _positive("ReduceLROnPlateau", name, getattr(self, name), integer=True,
                      allow_zero=True)
        for name in ("threshold", "min_lr", "eps"):
            _positive("ReduceLROnPlateau", name, getattr(self, name), allow_zero=True)

    def _better(self, value: float, best: float) -> bool:
        if self.mode == "min":
            bound = best * (1 - self.threshold) if self.threshold_mode == "rel" else \
                best - self.threshold
            return value < bound
        bound = best * (1 + self.threshold) if self.threshold_mode == "rel" else \
            best + self.threshold
        return value > bound

    def fold(self, values: list[float]) -> float:
        """The rate after the epochs whose ``monitor`` values are ``values``, in order."""
        lr, best = self.base_lr, math.inf if self.mode == "min" else -math.inf
        bad = cooldown = 0
        for value in values:
            if self._better(value, best):
                best, bad = value, 0
            else:
                bad += 1
            if cooldown > 0:
                cooldown -= 1
                bad = 0
            if bad > self.patience:
                new = max(lr * self.factor, self.min_lr)
                if lr - new > self.eps:
                    lr = new
                cooldown, bad = self.cooldown, 0
        return lr

    def __call__(self, epoch: int, history: list[dict[str, Any]] = ()) -> float:
        """The rate of epoch ``epoch`` (0-based): the fold of the records of the epochs before
        it (records without a ``monitor`` value are passed over)."""
        values = [float(r[self.monitor]) for r in history
                  if int(r.get("epoch", 0)) <= epoch and r.get(self.monitor) is not None]
        return self.fold(values)


#: names :func:`make_schedule` knows (``anycnn train --schedule``)
SCHEDULES = ("constant", "step", "cosine", "cosine-per-step", "onecycle", "plateau")


def make_schedule(name: str, base_lr: float, epochs: int, step_size: int | None = None,
                  gamma: float = 0.5, *, steps_per_epoch: int | None = None,
                  monitor: str = "val_loss", patience: int = 2):
    """A schedule by name: ``constant``, ``step`` (multiply by ``gamma`` every ``step_size``
    epochs, default a third of the run), ``cosine`` (down to 0 over ``epochs``, per epoch),
    ``cosine-per-step`` (the same per training step), ``onecycle`` (:class:`OneCycle` up to
    ``base_lr`` and down over the run's steps) or ``plateau`` (:class:`ReduceLROnPlateau` on
    ``monitor``, by 10x after ``patience`` epochs without improvement; mode ``max`` for an
    accuracy). The per-step ones need ``steps_per_epoch`` (``len(train_loader)``)."""
    if name == "constant":
        return Constant(base_lr)
    if name == "step":
        return StepDecay(base_lr, step_size or max(1, epochs // 3), gamma)
    if name == "cosine":
        return Cosine(base_lr, epochs)
    if name in ("cosine-per-step", "onecycle"):
        if steps_per_epoch is None:
            raise ConfigError(f"schedule {name!r} runs per step and needs steps_per_epoch "
                              "(len(train_loader))")
        if name == "onecycle":
            return OneCycle(base_lr, epochs=epochs, steps_per_epoch=steps_per_epoch)
        return Cosine(base_lr, total_steps=epochs * steps_per_epoch)
    if name == "plateau":
        return ReduceLROnPlateau(base_lr, monitor, "max" if "acc" in monitor else "min",
                                 patience=patience)
    raise ConfigError(f"unknown schedule {name!r}; valid names: {', '.join(SCHEDULES)}")
