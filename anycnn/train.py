"""Training and evaluation loops: :class:`Trainer`, :func:`evaluate` (and :func:`predict`, from
:mod:`anycnn.inference`).

One training step is ``zero_grad → forward → loss → backward → optimizer.step``. Metrics are summed
on the device and read back to the host only every ``sync_every`` steps (1 on CPU backends, where
it is free; more on a GPU so the device never waits for the host) and at the end of each epoch.

A run can stop cleanly between two steps (:meth:`Trainer.request_stop`, used by the CLI's signal
handlers), and a checkpoint records the epoch, the step inside it and the partial metrics, so a
resumed run on NumPy repeats the uninterrupted run's numbers exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .backend import namespace_of, to_numpy
from .errors import CheckpointError, ConfigError, TrainingError
from .inference import predict, predict_proba, predict_topk
from .losses import SoftmaxCrossEntropy
from .metrics import ClassificationMetrics, check_top_k
from .module import Module, eval_mode

__all__ = ["EpochRecord", "Trainer", "evaluate", "predict", "predict_proba", "predict_topk"]


@dataclass
class EpochRecord:
    """One line of ``history.json``."""

    epoch: int
    lr: float
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float
    images_per_s: float


class _Sums:
    """Loss and correct-prediction sums kept on the device until read."""

    def __init__(self, loss: float = 0.0, correct: float = 0.0, seen: int = 0) -> None:
        self.loss: Any = loss
        self.correct: Any = correct
        self.seen = seen

    def add(self, loss: Any, logits: Any, labels: Any) -> None:
        xp = namespace_of(logits, labels)
        n = labels.shape[0]
        hits = xp.sum(xp.astype(xp.argmax(logits, axis=1) == labels, logits.dtype))
        self.loss = self.loss + loss * n
        self.correct = self.correct + hits
        self.seen += n

    def host(self) -> tuple[float, float, int]:
        """(sum of losses, number correct, number seen) as Python numbers (synchronises)."""
        return float(to_numpy(self.loss)), float(to_numpy(self.correct)), self.seen

    def means(self) -> tuple[float, float]:
        loss, correct, seen = self.host()
        return (loss / seen, correct / seen) if seen else (math.nan, math.nan)


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    # disable=None lets tqdm switch itself off when stderr is not a terminal
    return tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=False,
                dynamic_ncols=True, disable=None if enabled else True)


def _on_host(x: Any) -> bool:
    """True when ``x`` lives in host memory (reading it back costs nothing)."""
    return "cpu" in str(getattr(x, "device", "cpu")).lower()


def evaluate(model: Module, loader, loss_fn=None, progress: bool = False, *,
             top_k: int | Iterable[int] = (), confusion: bool = False,
             class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Loss, accuracy and optional metrics of ``model`` over ``loader`` (in eval mode; each
    submodule's mode is restored).

    Args:
        model: maps each batch's images to logits ``(N, K)``.
        loader: yields ``(images, labels)`` batches (e.g. a :class:`DataLoader`).
        loss_fn: default :class:`~anycnn.losses.SoftmaxCrossEntropy` (which then checks label
            ranges on the host only on CPU backends, so a GPU is not synchronised per batch).
        progress: show a tqdm bar.
        top_k: ``k`` values for top-k accuracy, e.g. ``(1, 5)``; ``k`` larger than ``K`` is a
            :class:`~anycnn.errors.ConfigError`.
        confusion: also return the confusion matrix and the per-class accuracy.
        class_names: names of the ``K`` classes (default ``"0"``, ``"1"``, ...), e.g.
            ``load_dataset(...).class_names``.

    Returns:
        ``{"loss", "accuracy", "count"}`` (mean loss, argmax accuracy, number of examples), plus
        ``"top_k_accuracy"`` (``{k: fraction}``) when ``top_k`` is given, and with
        ``confusion`` ``"confusion_matrix"`` (``int64 (K, K)``, rows true class, columns
        predicted), ``"per_class_accuracy"`` (``float64 (K,)``, NaN for a class with no
        examples), ``"per_class_count"`` (``int64 (K,)``) and ``"class_names"``. Conventions
        (ties, NaN) are in :mod:`anycnn.metrics`. All sums stay on the device until the end.
    """
    own_loss = loss_fn is None
    loss_fn = loss_fn or SoftmaxCrossEntropy()
    top_k = check_top_k(top_k)
    metrics = (ClassificationMetrics(top_k, class_names) if top_k or confusion else None)
    sums = _Sums()
    with eval_mode(model), _progress(len(loader), "eval", progress) as bar:
        for x, y in loader:
            if own_loss:
                loss_fn.check_labels = _on_host(x)
            logits = model.forward(x)
            sums.add(loss_fn.forward(logits, y), logits, y)
            if metrics is not None:
                metrics.update(logits, y)
            bar.update()
    loss, accuracy = sums.means()
    result: dict[str, Any] = {"loss": loss, "accuracy": accuracy, "count": sums.seen}
    if metrics is not None:
        extra = metrics.compute()
        if top_k:
            result["top_k_accuracy"] = extra["top_k_accuracy"]
        if confusion:
            result.update({k: extra[k] for k in ("confusion_matrix", "per_class_accuracy",
                                                 "per_class_count", "class_names")})
    return result


class Trainer:
    """Runs epochs of training with validation, schedules, checkpoints and clean stops.

    Args:
        model, optimizer: what to train.
        loss_fn: default :class:`~anycnn.losses.SoftmaxCrossEntropy`.
        schedule: callable ``epoch -> lr`` (see :mod:`anycnn.schedules`), or None.
        model_spec: stored in checkpoints so :func:`anycnn.checkpoint.load_model` can rebuild.
        checkpoint_path: where :meth:`fit` saves after every epoch (None: never).
        on_nonfinite: ``"stop"`` raises :class:`TrainingError` when the loss is NaN/inf;
            ``"skip"`` drops that step's update and goes on.
        sync_every: steps between host reads of the metrics (default 1 on CPU, 20 on GPU).
        progress: show tqdm bars (they switch off by themselves when not on a terminal).
        config: extra JSON-able data saved in checkpoints (e.g. the CLI arguments).
    """

    def __init__(self, model: Module, optimizer, loss_fn=None, *, schedule=None,
                 model_spec: dict | None = None, checkpoint_path: str | Path | None = None,
                 on_nonfinite: str = "stop", sync_every: int | None = None,
                 progress: bool = True, config: dict | None = None) -> None:
        if on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        self.model, self.optimizer = model, optimizer
        self.loss_fn = loss_fn or SoftmaxCrossEntropy()
        self.schedule = schedule
        self.model_spec = model_spec
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.on_nonfinite = on_nonfinite
        self.sync_every = sync_every
        self.progress = progress
        self.config = config or {}
        self.epoch = 0  # index of the epoch in progress (= epochs completed when step == 0)
        self.step = 0  # batches completed inside that epoch
        self.history: list[dict] = []
        self.skipped_steps = 0
        self.last_checkpoint: Path | None = None
        self._partial = _Sums()
        self._stop_reason: str | None = None
        self._stop_honoured = False  # fit() has returned because of _stop_reason

    # -- control -------------------------------------------------------------------------
    def request_stop(self, reason: str = "stop requested") -> None:
        """Ask :meth:`fit` to return after the step in progress (safe from a signal handler).

        A request made while no step runs (between two :meth:`fit` calls, or during
        validation) makes the next :meth:`fit` return before it starts another step."""
        self._stop_reason = reason

    @property
    def stopped(self) -> str | None:
        """Why the last :meth:`fit` returned early (or why the next one will), else None."""
        return self._stop_reason

    # -- checkpoints ---------------------------------------------------------------------
    def save(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint of the whole training state (atomic)."""
        target = Path(path) if path else self.checkpoint_path
        if target is None:
            raise ConfigError("no checkpoint path given")
        loss, correct, seen = self._partial.host()
        written = ckpt.save_checkpoint(
            target, self.model, self.optimizer, model_spec=self.model_spec, epoch=self.epoch,
            step=self.step,
            extra={"history": self.history, "config": self.config,
                   "partial": {"loss": loss, "correct": correct, "seen": seen}})
        self.last_checkpoint = written
        return written

    def resume(self, path: str | Path) -> None:
        """Restore model, optimizer, RNG, position and history from a checkpoint.

        Raises:
            CheckpointError: the file is bad, does not fit the model or optimizer, or its
                training record (history, partial metrics) is malformed.
        """
        state = ckpt.load_checkpoint(path)
        extra = state.extra if state.extra is not None else {}
        history = extra.get("history", []) if isinstance(extra, dict) else None
        partial = (extra.get("partial") or {}) if isinstance(extra, dict) else None
        try:
            if not isinstance(history, list) or not isinstance(partial, dict):
                raise TypeError("'extra' must hold a 'history' list and a 'partial' object")
            sums = _Sums(float(partial.get("loss", 0.0)), float(partial.get("correct", 0.0)),
                         int(partial.get("seen", 0)))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: malformed training record in the checkpoint ({exc})") from exc
        if state.epoch < 0 or state.step < 0:
            raise CheckpointError(f"{path}: negative epoch or step in the checkpoint")
        ckpt.restore(state, self.model, self.optimizer)
        self.epoch, self.step = state.epoch, state.step
        self.history = list(history)
        self._partial = sums
        self.last_checkpoint = Path(path)

    # -- training ------------------------------------------------------------------------
    def _sync_every(self, x: Any) -> int:
        if self.sync_every:
            return self.sync_every
        return 1 if "cpu" in str(getattr(x, "device", "cpu")).lower() else 20

    def _check_finite(self, loss_value: float, first_step: int, last_step: int) -> bool:
        """True if finite; otherwise stop (raise) or count a skipped step."""
        if math.isfinite(loss_value):
            return True
        where = (f"epoch {self.epoch + 1}, step {last_step}" if first_step == last_step
                 else f"epoch {self.epoch + 1}, steps {first_step}-{last_step}")
        if self.on_nonfinite == "skip" and first_step == last_step:
            self.skipped_steps += 1
            return False
        good = self.last_checkpoint or "none written yet"
        raise TrainingError(f"loss became {loss_value} at {where}; training stopped. "
                            f"Last good checkpoint: {good}. Try a smaller learning rate.")

    def train_step(self, x: Any, y: Any, check: bool) -> Any:
        """One optimisation step; returns the (device) loss and logits.

        With ``check`` False (GPU pace) nothing is read back to the host: the loss's per-step
        label-range check is off too (datasets check their labels when loaded).
        """
        if hasattr(self.loss_fn, "check_labels"):
            self.loss_fn.check_labels = check
        self.model.zero_grad()
        logits = self.model.forward(x)
        loss = self.loss_fn.forward(logits, y)
        if check and not self._check_finite(float(to_numpy(loss)), self.step + 1, self.step + 1):
            return None, logits
        self.model.backward(self.loss_fn.backward(), input_grad=False)
        self.optimizer.step()
        return loss, logits

    def fit(self, train_loader, val_loader=None, epochs: int = 1) -> list[dict]:
        """Train until ``epochs`` epochs are complete (counting resumed ones).

        Saves a checkpoint after each epoch when ``checkpoint_path`` is set; returns early
        (with :attr:`stopped` set) when a stop is requested. Returns the history.
        """
        if self._stop_honoured:  # the last fit() returned because of that stop: start afresh
            self._stop_reason, self._stop_honoured = None, False
        self.model.train()
        while self.epoch < epochs:
            if self._stop_reason:  # requested between steps (e.g. during validation)
                self._stop_honoured = True
                return self.history
            if self.schedule is not None:
                self.optimizer.lr = float(self.schedule(self.epoch))
            train_loader.set_epoch(self.epoch)
            start = time.perf_counter()
            sums = self._partial
            seen_before = sums.seen
            with _progress(len(train_loader), f"epoch {self.epoch + 1}/{epochs}", self.progress,
                           initial=self.step) as bar:
                sync = None
                last_checked = self.step
                for x, y in _batches_from(train_loader, self.step):
                    sync = sync or self._sync_every(x)
                    check = self.on_nonfinite == "skip" or sync == 1
                    loss, logits = self.train_step(x, y, check)
                    self.step += 1
                    if loss is not None:
                        sums.add(loss, logits, y)
                    if self.step % sync == 0 or self.step == len(train_loader):
                        total, correct, seen = sums.host()
                        if not check:
                            self._check_finite(total, last_checked + 1, self.step)
                        last_checked = self.step
                        rate = (seen - seen_before) / max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix(loss=f"{total / max(seen, 1):.4f}",
                                        acc=f"{correct / max(seen, 1):.4f}",
                                        img_s=f"{rate:.0f}", refresh=False)
                    bar.update()
                    if self._stop_reason:
                        self._stop_honoured = True
                        return self.history
            elapsed = time.perf_counter() - start
            train_loss, train_acc = sums.means()
            val = evaluate(self.model, val_loader, self.loss_fn) if val_loader else None
            self.model.train()
            if val is not None and not math.isfinite(val["loss"]):
                # the weights are finite (or the step checks would have fired) but useless:
                # do not let this epoch's checkpoint replace the last good one
                raise TrainingError(
                    f"validation loss became {val['loss']} after epoch {self.epoch + 1} "
                    f"(step {self.step}); training stopped. Last good checkpoint: "
                    f"{self.last_checkpoint or 'none written yet'}. Try a smaller learning rate.")
            record = EpochRecord(
                epoch=self.epoch + 1, lr=self.optimizer.lr, train_loss=train_loss,
                train_accuracy=train_acc, val_loss=val and val["loss"],
                val_accuracy=val and val["accuracy"], seconds=elapsed,
                images_per_s=(sums.seen - seen_before) / elapsed if elapsed > 0 else math.nan)
            self.history.append(asdict(record))
            self.epoch, self.step, self._partial = self.epoch + 1, 0, _Sums()
            if self.checkpoint_path is not None:
                self.save()
        return self.history


def _batches_from(loader, start: int):
    """The loader's batches for the current epoch, skipping the first ``start`` (resume)."""
    if start == 0:
        return iter(loader)
    if hasattr(loader, "iter_from"):
        return loader.iter_from(start)
    return islice(iter(loader), start, None)
