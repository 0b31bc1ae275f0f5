"""Callbacks: code that runs at fixed points of :meth:`anycnn.train.trainer.Trainer.fit`.

Pass them as ``Trainer(..., callbacks=[...])`` (for every :meth:`~anycnn.train.trainer.Trainer.fit`)
or ``fit(..., callbacks=[...])`` (for that call only; they run after the trainer's own). One
``fit`` call runs the hooks in this order::

    on_train_begin(trainer)
    for each epoch still to do:
        on_epoch_begin(trainer, epoch)
        for each step:  on_step_end(trainer, step, logs)
        validation, history record, the epoch's checkpoint (``checkpoint_path``)
        on_epoch_end(trainer, epoch, record)
    on_train_end(trainer)

``epoch`` is the epoch's number counted from 1, as the progress bar and log lines print it and
as the ``epoch`` field of its history record holds it (``trainer.epoch``, the count of epochs
completed, is ``epoch - 1`` during the epoch and ``epoch`` after it); ``step`` counts the
batches done in that epoch (1-based). Earlier versions passed the hooks the 0-based index
(``epoch - 1`` now; the signatures are unchanged): a callback written for them that prints
``epoch + 1`` now prints ``epoch``. A hook
may call ``trainer.request_stop(reason)``: :meth:`~anycnn.train.trainer.Trainer.fit` then returns
after the step (or epoch) in progress, with ``trainer.stopped == reason``. A ``fit`` that ends
with an exception (NaN loss, failed save) skips ``on_train_end``.

Callbacks keep no state in checkpoints: what :class:`EarlyStopping` and :class:`BestCheckpoint`
know (best value, its epoch, epochs without improvement) is recomputed from
``trainer.history``, which every checkpoint holds, so a resumed run goes on exactly where the
interrupted one was.

Here: :class:`Callback` (the base, all hooks no-ops), :class:`EarlyStopping`,
:class:`BestCheckpoint` and :class:`ProgressLog` (log lines instead of progress bars).
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..backend import to_numpy
from ..errors import ConfigError
from .view import TrainerView  # the trainer as callbacks see it (no import circle)


class Callback:
    """Base class: override the hooks you need; each does nothing by default."""

    def on_train_begin(self, trainer: TrainerView) -> None:
        """Start of :meth:`~anycnn.train.Trainer.fit`, before the first step. ``trainer.epoch``
        and ``trainer.step`` say where training starts (not 0 after a resume);
        ``trainer.target_epochs`` is the epoch count this call trains up to,
        ``trainer.steps_per_epoch`` the length of the training loader and
        ``trainer.record_keys`` the names the epoch records will hold values for."""

    def on_epoch_begin(self, trainer: TrainerView, epoch: int) -> None:
        """Start of epoch ``epoch`` (1-based, as printed; ``trainer.epoch`` is ``epoch - 1``),
        after the schedule set its learning rate. A resumed epoch starts at step
        ``trainer.step`` instead of 0."""

    def on_step_end(self, trainer: TrainerView, step: int, logs: dict[str, Any]) -> None:
        """After optimizer step ``step`` (1-based, inside the epoch) and its metric update.

        ``logs`` holds:

        * ``"loss"``: this step's loss as a 0-d array **on the device** (``None`` for a step
          skipped because its loss was not finite). Reading it (``float(...)``) makes the host
          wait for the device: on a GPU, do it only when ``logs["synced"]`` is true;
        * ``"batch_size"`` (int), ``"lr"`` (float, the learning rate this step used) and
          ``"global_step"`` (int, 1-based count of training steps in the whole run);
        * ``"synced"`` (bool): the trainer has just read its metrics back to the host (every
          ``sync_every`` steps, and at the epoch's last step). Only then also
          ``"train_loss"``, ``"train_accuracy"`` (means over the epoch so far) and
          ``"images_per_s"`` (since the epoch, or this resumed part of it, started): plain
          floats, free to read.
        """

    def on_epoch_end(self, trainer: TrainerView, epoch: int, record: dict[str, Any]) -> None:
        """After epoch ``epoch`` (1-based, ``record["epoch"]``): validation has run,
        ``record`` (the new last entry of ``trainer.history``, keys as in
        :class:`~anycnn.train.EpochRecord`) is appended and the epoch's checkpoint is written.
        ``trainer.epoch`` is already ``epoch`` (epochs completed) and ``trainer.step`` 0."""

    def on_train_end(self, trainer: TrainerView) -> None:
        """End of :meth:`~anycnn.train.trainer.Trainer.fit`: all epochs done, or a stop was honoured
        (``trainer.stopped`` says why). Not called when ``fit`` raises."""


# --------------------------------------------------------------------------------------------
# watching one metric of the epoch records


@dataclass(frozen=True)
class Standing:
    """Where a monitored metric stands after some history records.

    Attributes:
        best: best value so far (None: no record had a value).
        best_epoch: 1-based epoch of that value.
        wait: epochs with a value since ``best_epoch`` that did not improve on it.
        improved: whether the last record with a value set the best.
    """

    best: float | None = None
    best_epoch: int | None = None
    wait: int = 0
    improved: bool = False


class Monitor:
    """One metric of the epoch records, which direction is better, and by how much.

    Args:
        owner: the name used in error messages (``"EarlyStopping"``, ...).
        key: a record key such as ``"val_loss"``.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (``min`` for names with ``loss``, ``max``
            for names with ``acc``).
        min_delta: an improvement must beat the best by more than this (>= 0).
    """

    def __init__(self, owner: str, key: str, mode: str = "auto", min_delta: float = 0.0) -> None:
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{owner}: monitor must be a record key such as 'val_loss', "
                              f"got {key!r}")
        if mode not in ("auto", "min", "max"):
            raise ConfigError(f"{owner}: mode must be 'auto', 'min' or 'max', got {mode!r}")
        if mode == "auto":
            if "loss" in key:
                mode = "min"
            elif "acc" in key:
                mode = "max"
            else:
                raise ConfigError(f"{owner}: mode='auto' cannot tell whether {key!r} should go "
                                  "down or up; pass mode='min' or mode='max'")
        ok = (isinstance(min_delta, int | float) and not isinstance(min_delta, bool)
              and math.isfinite(min_delta) and min_delta >= 0)
        if not ok:
            raise ConfigError(f"{owner}: min_delta must be a finite number >= 0, got "
                              f"{min_delta!r}")
        self.owner, self.key, self.mode, self.min_delta = owner, key, mode, float(min_delta)

    def check_available(self, trainer: TrainerView) -> None:
        """Raise ConfigError, before any training, if the records will lack the key."""
        keys = trainer.record_keys
        if self.key in keys:
            return
        hint = (" (it needs a validation loader: fit(train_loader, val_loader, ...))"
                if self.key.startswith("val_") and "train" + self.key[3:] in keys else "")
        raise ConfigError(f"{self.owner} monitors {self.key!r}, which the epoch records will not "
                          f"hold{hint}; available: {', '.join(keys)}")

    def value(self, record: dict[str, Any]) -> float:
        """The record's value (ConfigError naming the keys that have values if it is absent)."""
        value = record.get(self.key)
        if value is None:
            have = [k for k, v in record.items() if isinstance(v, int | float) and k != "epoch"]
            raise ConfigError(f"{self.owner} monitors {self.key!r}, which epoch "
                              f"{record.get('epoch')}'s record does not hold; available: "
                              f"{', '.join(have)}")
        return float(value)

    def better(self, value: float, best: float | None) -> bool:
        """Whether ``value`` improves on ``best`` by more than ``min_delta`` (NaN never does)."""
        if best is None:
            return not math.isnan(value)
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def standing(self, history: list[dict[str, Any]]) -> Standing:
        """Fold the records in order (those without a value are passed over)."""
        state = Standing()
        for record in history:
            value = record.get(self.key)
            if value is None:
                continue
            if self.better(float(value), state.best):
                state = Standing(float(value), int(record["epoch"]), 0, True)
            else:
                state = Standing(state.best, state.best_epoch, state.wait + 1, False)
        return state


def _host_copy(trainer: TrainerView) -> dict[str, np.ndarray]:
    """Host copies of every parameter and buffer (BatchNorm statistics included)."""
    return {k: np.array(to_numpy(v), copy=True) for k, v in trainer.model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# early stopping


class EarlyStopping(Callback):
    """Stop training when a metric of the epoch records has stopped improving.

    After each epoch the run's whole history is folded (so epochs from before a resume count):
    an epoch improves when its ``monitor`` value beats the best so far by more than
    ``min_delta``. When the epoch just finished did not improve and ``patience`` epochs have
    passed since the best one, it asks the trainer to stop (``trainer.stopped`` then starts
    with ``"early stopping"``); the epoch's checkpoint is already written.

    Args:
        monitor: a record key: ``val_loss`` (needs a validation loader), ``val_accuracy``,
            ``train_loss``, ``train_accuracy``, ...
        patience: epochs without improvement to wait (0 stops at the first one, like 1).
        min_delta: smallest change that counts as an improvement (>= 0).
        mode: ``"min"``, ``"max"`` or ``"auto"`` (min for ``*loss*``, max for ``*acc*``).
        restore_best_weights: when this callback stops the run, put back the parameters and
            buffers of the best epoch at the end of ``fit`` (host copies taken at that epoch;
            ``checkpoint_path`` still gets the last epoch's state, so the run can be resumed).
            A run that uses all its epochs keeps its last weights, as in Keras.

    Attributes (updated after every epoch):
        best, best_epoch, wait: see :class:`Standing`.
        stopped_epoch: the 1-based epoch after which it stopped the run, else None.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 3, min_delta: float = 0.0,
                 mode: str = "auto", restore_best_weights: bool = False) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ConfigError(f"EarlyStopping: patience must be an integer >= 0, got "
                              f"{patience!r}")
        self.monitor = Monitor("EarlyStopping", monitor, mode, min_delta)
        self.patience = patience
        self.restore_best_weights = bool(restore_best_weights)
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None
        self._best_weights: tuple[int, dict[str, np.ndarray]] | None = None
        self._stopped_this_fit = False

    def review(self, history: list[dict[str, Any]]) -> bool:
        """Update the attributes from ``history``; True if it says the run should stop now."""
        state = self.monitor.standing(history)
        self.best, self.best_epoch, self.wait = state.best, state.best_epoch, state.wait
        stop = state.best is not None and not state.improved and state.wait >= self.patience
        self.stopped_epoch = int(history[-1]["epoch"]) if stop else None
        return stop

    def reason(self) -> str:
        return (f"early stopping: {self.monitor.key} did not improve for {self.wait} epoch(s) "
                f"(best {self.best:.6g} at epoch {self.best_epoch})")

    def _keep_weights_if_best(self, trainer: TrainerView) -> None:
        if self.restore_best_weights and self.best_epoch == trainer.epoch and trainer.step == 0:
            self._best_weights = (trainer.epoch, _host_copy(trainer))

    def on_train_begin(self, trainer: TrainerView) -> None:
        self.monitor.check_available(trainer)
        self._stopped_this_fit = False
        self.review(trainer.history)
        self._keep_weights_if_best(trainer)  # resumed right after the best epoch

    def on_epoch_end(self, trainer: TrainerView, epoch: int, record: dict[str, Any]) -> None:
        self.monitor.value(record)  # the key must be there
        stop = self.review(trainer.history)
        self._keep_weights_if_best(trainer)
        if stop:
            self._stopped_this_fit = True
            trainer.request_stop(self.reason())

    def on_train_end(self, trainer: TrainerView) -> None:
        if not (self._stopped_this_fit and self.restore_best_weights):
            return
        if self._best_weights is None or self._best_weights[0] != self.best_epoch:
            warnings.warn(f"EarlyStopping: the weights of the best epoch ({self.best_epoch}) are "
                          "not in memory (the run was resumed after it); keeping the last "
                          "weights. A BestCheckpoint file holds them.", stacklevel=2)
            return
        trainer.model.load_state_dict(self._best_weights[1])


# --------------------------------------------------------------------------------------------
# best checkpoint


class BestCheckpoint(Callback):
    """Keep a checkpoint of the epoch with the best ``monitor`` value at ``path``.

    The file is a full :meth:`~anycnn.train.trainer.Trainer.save` checkpoint (atomic write), written
    after the epoch's regular checkpoint whenever an epoch beats the best so far (any
    improvement; ties keep the earlier epoch). The best value comes from ``trainer.history``,
    so a resumed run never replaces the file with a worse epoch. If a crash came between the
    two writes, the next ``fit`` starting right after the best epoch writes the file again.
    ``trainer.last_checkpoint`` keeps pointing at the regular checkpoint.

    Attributes:
        best, best_epoch: best value so far and its 1-based epoch (None before any).
    """

    def __init__(self, path: str | Path, monitor: str = "val_loss", mode: str = "auto") -> None:
        self.path = Path(path)
        self.monitor = Monitor("BestCheckpoint", monitor, mode)
        self.best: float | None = None
        self.best_epoch: int | None = None

    def review(self, history: list[dict[str, Any]]) -> int | None:
        """Update :attr:`best` and :attr:`best_epoch` from ``history``; return the latter."""
        state = self.monitor.standing(history)
        self.best, self.best_epoch = state.best, state.best_epoch
        return state.best_epoch

    def _model_is_best(self, trainer: TrainerView) -> bool:
        """Does the trainer hold the state right after the best epoch?"""
        return self.review(trainer.history) == trainer.epoch and trainer.step == 0

    def _save(self, trainer: TrainerView) -> None:
        last = trainer.last_checkpoint
        trainer.save(self.path)
        trainer.last_checkpoint = last

    def on_train_begin(self, trainer: TrainerView) -> None:
        self.monitor.check_available(trainer)
        if self._model_is_best(trainer):  # resumed (or called again) right after the best epoch
            self._save(trainer)

    def on_epoch_end(self, trainer: TrainerView, epoch: int, record: dict[str, Any]) -> None:
        self.monitor.value(record)
        if self._model_is_best(trainer):
            self._save(trainer)


# --------------------------------------------------------------------------------------------
# log lines


def format_epoch(record: dict[str, Any], total: int) -> str:
    """``epoch 3/8: train loss 0.1234 acc 0.9612 | val loss ... | 5012 img/s, 1.6 s``."""
    line = (f"epoch {record['epoch']}/{total}: train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.4f}")
    if record.get("val_loss") is not None:
        line += f" | val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f}"
    return line + f" | {record['images_per_s']:.0f} img/s, {record['seconds']:.1f} s"


class ProgressLog(Callback):
    """Plain log lines: one per epoch, and with ``every`` > 0 one every ``every`` steps.

    The trainer adds one by itself (writing to stderr, per epoch) when ``progress`` is on but
    stderr is not a terminal, so a run piped to a file logs lines instead of nothing.

    A step line (``epoch 2/8 step 40/125: loss 0.2154 acc 0.9312 | 4810 img/s``, means over
    the epoch so far) is printed at the first metric sync at or after each multiple of
    ``every``: on the CPU that is exactly every ``every`` steps; on a GPU the trainer reads the
    metrics every ``sync_every`` steps only, and the log never makes it read more often.

    Args:
        every: steps between step lines (0: epoch lines only).
        file: where to write (default: ``sys.stdout`` at the time of writing).
    """

    def __init__(self, every: int = 0, file: TextIO | None = None) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ConfigError(f"ProgressLog: every must be an integer >= 0, got {every!r}")
        self.every, self.file = every, file
        self._logged_step = 0

    def _write(self, line: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(line, file=self.file or sys.stdout)  # above any progress bar
        (self.file or sys.stdout).flush()

    def on_epoch_begin(self, trainer: TrainerView, epoch: int) -> None:
        self._logged_step = trainer.step

    def on_step_end(self, trainer: TrainerView, step: int, logs: dict[str, Any]) -> None:
        if not (self.every and logs["synced"]) or step // self.every == \
                self._logged_step // self.every:
            return
        self._logged_step = step
        self._write(f"epoch {trainer.epoch + 1}/{trainer.target_epochs} step {step}/"
                    f"{trainer.steps_per_epoch}: loss {logs['train_loss']:.4f} acc "
                    f"{logs['train_accuracy']:.4f} | {logs['images_per_s']:.0f} img/s")

    def on_epoch_end(self, trainer: TrainerView, epoch: int, record: dict[str, Any]) -> None:
        self._write(format_epoch(record, trainer.target_epochs))
