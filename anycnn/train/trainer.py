"""Training and evaluation loops: :class:`Trainer`, :func:`evaluate` (and :func:`predict`, from
:mod:`anycnn.train.inference`).

One training step is ``zero_grad → forward → loss → backward → optimizer.step``
(:func:`~anycnn.train.step.training_step`, shared with the data-parallel and compiled steps).
Metrics are summed on the device and read back to the host only every ``sync_every`` steps (1 on
CPU backends, where it is free; more on a GPU so the device never waits for the host) and at the
end of each epoch.

A run can stop cleanly between two steps (:meth:`Trainer.request_stop`, used by the CLI's signal
handlers and by callbacks such as :class:`~anycnn.train.callbacks.EarlyStopping`), and a checkpoint
records the epoch, the step inside it and the partial metrics, so a resumed run on NumPy repeats
the uninterrupted run's numbers exactly. Callbacks
(:mod:`anycnn.train.callbacks`) run at fixed points
of :meth:`Trainer.fit`.

Started by an MPI launcher (``mpiexec -n N python script.py``), a trainer trains data-parallel
over its :mod:`communicator <anycnn.dist>` (:mod:`anycnn.train.parallel`): the loaders' batch is
the global batch, each rank computes its share, and one allreduce per step sums the gradients and
the metrics; rank 0 alone shows progress and writes checkpoints.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..autograd import no_grad
from ..backend import on_host, to_numpy
from ..errors import CheckpointError, ConfigError, TrainingError
from ..io import checkpoint as ckpt
from ..models.backbone import current_spec
from ..nn.losses import SoftmaxCrossEntropy, batch_hits
from ..nn.module import Module, eval_mode
from ..optim.clipping import clip_grad_norm_, clip_grad_value_
from ..optim.ema import EMA
from ..optim.schedules import interval_of
from .callbacks import BestCheckpoint, Callback, ProgressLog
from .inference import predict, predict_proba, predict_topk
from .interrupt import catch_signals, interrupted, stderr_is_terminal
from .metrics import ClassificationMetrics, MultiLabelMetrics, check_top_k
from .parallel import DataParallel, StepTotals, fingerprint
from .step import training_step

__all__ = ["EpochRecord", "Trainer", "evaluate", "predict", "predict_proba", "predict_topk"]


@dataclass
class EpochRecord:
    """One line of ``history.json``. ``lr`` is the learning rate of the epoch's last step
    (``optimizer.lr``: with parameter groups, that of the groups without their own ``lr``);
    ``val_loss``/``val_accuracy`` are None when :meth:`Trainer.fit` had no validation loader."""

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

    def add_totals(self, totals: StepTotals) -> None:
        """Add one data-parallel step's global sums (host numbers)."""
        self.loss = self.loss + totals.loss_sum
        self.correct = self.correct + totals.correct
        self.seen += totals.count

    def add(self, loss: Any, logits: Any, labels: Any, loss_fn: Any = None) -> None:
        n = labels.shape[0]
        hits = batch_hits(loss_fn, logits, labels)
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


#: what each method of a loader is needed for, for error messages
_LOADER_NEEDS = {"__iter__": "iterating over (images, labels) batches",
                 "__len__": "len(), the number of batches",
                 "set_epoch": "set_epoch(epoch), the epoch's shuffling order (exact resume)"}


def check_loader(loader: Any, role: str, needs: Sequence[str]) -> None:
    """Refuse a ``loader`` that lacks what the training loop calls on it, naming the missing
    methods (e.g. a list of batches, or another framework's loader, given to :meth:`Trainer.fit`).

    Raises:
        ConfigError: ``loader`` lacks one of ``needs``.
    """
    missing = [name for name in needs if not hasattr(loader, name)]
    if missing:
        raise ConfigError(
            f"{role} must be an anycnn.data.dataloader.DataLoader or have the same interface; a "
            f"{type(loader).__module__}.{type(loader).__qualname__} lacks "
            + "; ".join(f"{name} ({_LOADER_NEEDS[name]})" for name in missing)
            + ". Wrap your arrays: DataLoader(ArrayDataset(images, labels, num_classes), "
            "batch_size)")


def evaluate(model: Module, loader, loss_fn=None, progress: bool = False, *,
             top_k: int | Iterable[int] = (), confusion: bool = False,
             class_names: Sequence[str] | None = None, comm: Any = None,
             multi_label: bool = False, threshold: float = 0.5) -> dict[str, Any]:
    """Loss, accuracy and optional metrics of ``model`` over ``loader`` (in eval mode; each
    submodule's mode is restored).

    Args:
        model: maps each batch's images to logits ``(N, K)``.
        loader: yields ``(images, labels)`` batches (e.g. a :class:`DataLoader`).
        loss_fn: default :class:`~anycnn.nn.losses.SoftmaxCrossEntropy` (which then checks label
            ranges on the host only on CPU backends, so a GPU is not synchronised per batch).
        progress: show a tqdm bar.
        top_k: ``k`` values for top-k accuracy, e.g. ``(1, 5)``; ``k`` larger than ``K`` is a
            :class:`~anycnn.errors.ConfigError`.
        confusion: also return the confusion matrix and the per-class accuracy.
        class_names: names of the ``K`` classes (default ``"0"``, ``"1"``, ...), e.g.
            ``load_dataset(...).class_names``.
        comm: a communicator of ``size`` > 1 (:mod:`anycnn.dist`; collective: every rank calls
            this): the loader is sharded (``set_shard``) so each rank evaluates its share of
            every batch, and the sums are added over the ranks; every rank gets the result.
            ``top_k``, ``confusion`` and ``multi_label`` are not available then.
        multi_label: the labels are ``(N, K)`` 0/1 targets (a sigmoid loss such as
            :class:`~anycnn.nn.losses.BCEWithLogits`): also return ``"multi_label"``, the
            :class:`~anycnn.train.metrics.MultiLabelMetrics` result (per-class precision,
            recall, F1 and average precision, mAP). ``top_k``/``confusion`` do not apply.
        threshold: with ``multi_label``, a label counts as predicted when its sigmoid
            probability is at least this (in (0, 1)).

    Returns:
        ``{"loss", "accuracy", "count"}`` (mean loss, argmax accuracy, number of examples), plus
        ``"top_k_accuracy"`` (``{k: fraction}``) when ``top_k`` is given, and with
        ``confusion`` ``"confusion_matrix"`` (``int64 (K, K)``, rows true class, columns
        predicted), ``"per_class_accuracy"`` (``float64 (K,)``, NaN for a class with no
        examples), ``"per_class_count"`` (``int64 (K,)``), ``"per_class_precision"``,
        ``"per_class_recall"``, ``"per_class_f1"`` (``float64 (K,)``) and ``"class_names"``.
        ``"accuracy"`` is what the loss's ``hits`` counts (the argmax accuracy for softmax
        losses, the mean label accuracy for sigmoid ones). Conventions
        (ties, NaN) are in :mod:`anycnn.train.metrics`. All sums stay on the device until the end.
    """
    check_loader(loader, "loader", ("__iter__", "__len__"))
    parallel = comm is not None and comm.size > 1
    if parallel:
        if top_k or confusion or multi_label:
            raise ConfigError("evaluate(comm=...) over several ranks computes loss and accuracy "
                              "only; run top_k/confusion/multi_label on one process")
        check_loader(loader, "loader", ("set_shard",))
        loader.set_shard(comm.rank, comm.size)
    own_loss = loss_fn is None
    loss_fn = loss_fn or SoftmaxCrossEntropy()
    top_k = check_top_k(top_k)
    if multi_label and (top_k or confusion):
        raise ConfigError("evaluate: top_k and confusion are single-label metrics; with "
                          "multi_label=True the per-label metrics come instead")
    metrics = (MultiLabelMetrics(class_names, threshold) if multi_label
               else ClassificationMetrics(top_k, class_names) if top_k or confusion else None)
    sums = _Sums()
    with eval_mode(model), no_grad(), _progress(len(loader), "eval", progress) as bar:
        for x, y in loader:
            if y.shape[0] == 0:  # an empty share of a small batch
                bar.update()
                continue
            if own_loss:
                loss_fn.check_labels = on_host(x)
            logits = model.forward(x)
            sums.add(loss_fn.forward(logits, y), logits, y, loss_fn)
            if metrics is not None:
                metrics.update(logits, y)
            bar.update()
    if parallel:
        loss, correct, seen = DataParallel(comm).reduce_sums(list(sums.host()))
        sums = _Sums(loss, correct, round(seen))
    loss, accuracy = sums.means()
    result: dict[str, Any] = {"loss": loss, "accuracy": accuracy, "count": sums.seen}
    if multi_label:
        result["multi_label"] = metrics.compute()
    elif metrics is not None:
        extra = metrics.compute()
        if top_k:
            result["top_k_accuracy"] = extra["top_k_accuracy"]
        if confusion:
            result.update({k: extra[k] for k in (
                "confusion_matrix", "per_class_accuracy", "per_class_count",
                "per_class_precision", "per_class_recall", "per_class_f1", "class_names")})
    return result


def _make_parent(path: str | Path) -> None:
    """Create the folder of the checkpoint ``path`` (and its parents) when missing.

    Raises:
        CheckpointError: it cannot be created (e.g. a file stands in the way), naming the
            folder and the OS's reason.
    """
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from ..atomic import os_reason

        blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()),
                        None)
        reason = (f"{blocking} is a file, not a folder" if blocking is not None
                  else os_reason(exc))
        raise CheckpointError(f"cannot create the folder {folder} for the checkpoint {path}: "
                              f"{reason}") from None


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class Trainer:
    """Runs epochs of training with validation, schedules, checkpoints and clean stops.

    Args:
        model, optimizer: what to train.
        loss_fn: default :class:`~anycnn.nn.losses.SoftmaxCrossEntropy`.
        schedule: callable ``epoch -> lr`` (see :mod:`anycnn.optim.schedules`), or None. Its
            value is assigned to ``optimizer.lr`` at the start of every epoch; a schedule with
            ``interval = "step"`` (:class:`~anycnn.optim.schedules.OneCycle`,
            :class:`~anycnn.optim.schedules.Cosine` with ``total_steps``) is called with the
            0-based index of the run's step before every step instead, and
            :class:`~anycnn.optim.schedules.ReduceLROnPlateau` with the epoch and the history.
            With parameter groups, every group's learning rate follows at its own ratio to the
            optimizer's (see :class:`~anycnn.optim.optimizers.Optimizer`).
        model_spec: stored in checkpoints so :func:`anycnn.io.checkpoint.load_model` can rebuild
            the model; default: the model's own (``model.model_spec``, set by
            :func:`anycnn.models.build_model`, with the class count of its current head).
        checkpoint_path: where :meth:`fit` saves after every epoch (None: never), and where it
            saves when SIGINT (Ctrl-C) or SIGTERM stops it (see :meth:`fit`). Missing folders
            are created when :meth:`fit` starts (as ``anycnn train`` creates its ``--out``
            folder, and Keras' and Lightning's checkpoint callbacks theirs), so a path that
            cannot be written fails there, not after the first epoch.
        on_nonfinite: ``"stop"`` raises :class:`TrainingError` when the loss is NaN/inf;
            ``"skip"`` drops that step's update and goes on.
        sync_every: steps between host reads of the metrics (default 1 on CPU, 20 on GPU).
        progress: show tqdm bars. They switch off by themselves when stderr is not a
            terminal; one log line per epoch then goes to stderr instead (a
            :class:`~anycnn.train.callbacks.ProgressLog`, unless ``callbacks`` has one already).
        config: extra JSON-able data saved in checkpoints (e.g. the CLI arguments). Unless it
            has a ``"preprocess"`` key, checkpoints add the training loader's
            :attr:`~anycnn.data.dataloader.DataLoader.preprocess` there (normalisation and
            augmentation; :func:`anycnn.data.augment.read_preprocess` reads it back).
        callbacks: :class:`~anycnn.train.callbacks.Callback` objects run by every :meth:`fit`.
        warmup_steps: ``N`` > 0 ramps the learning rate up over the first ``N`` training
            steps of the run: step ``s`` (1-based, counted over all epochs; a skipped NaN step
            counts) uses ``lr * s / N``, where ``lr`` is what the schedule gives for that
            step's epoch (the optimizer's learning rate when this trainer was made, without a
            schedule). From step ``N`` on the schedule alone sets it. ``s`` is derived from
            the epoch, the step and the length of the training loader, so a resumed run
            warms up exactly as the uninterrupted one.
        comm: the communicator to train data-parallel over (:mod:`anycnn.dist`); default
            :func:`anycnn.dist.get_communicator` (MPI when an MPI launcher started this process,
            else one process). With ``size`` > 1 :meth:`fit` shards the loaders
            (``set_shard``; ``batch_size`` is the global batch), only rank 0 shows progress and
            writes checkpoints, and :meth:`fit`, :meth:`save` and :meth:`resume` are collective
            (every rank calls them). See :mod:`anycnn.train.parallel`.
        compile: run each training step (forward, loss, backward, optimizer update) as one
            ``jax.jit``-compiled function (JAX backend only; one compilation per batch shape;
            see :mod:`anycnn.train.compiled`). Results equal the eager step's up to float
            rounding.
        clip_grad_norm: scale the gradients before each update so that their total 2-norm is
            at most this (:func:`~anycnn.optim.clipping.clip_grad_norm_`); None: off.
        clip_grad_value: clip every gradient element to ``[-v, v]`` before each update
            (:func:`~anycnn.optim.clipping.clip_grad_value_`; applied before
            ``clip_grad_norm`` when both are given); None: off.
        ema: an :class:`~anycnn.optim.ema.EMA` of ``model`` (or its decay, e.g. ``0.999``):
            updated after every applied step, used for validation, saved in checkpoints beside
            the weights (tensors ``ema.<name>``) and restored by :meth:`resume`. The history's
            ``val_*`` values are then the averaged weights'. None: off.
    """

    def __init__(self, model: Module, optimizer, loss_fn=None, *, schedule=None,
                 model_spec: dict | None = None, checkpoint_path: str | Path | None = None,
                 on_nonfinite: str = "stop", sync_every: int | None = None,
                 progress: bool = True, config: dict | None = None,
                 callbacks: list[Callback] | tuple[Callback, ...] = (),
                 warmup_steps: int = 0, comm: Any = None, compile: bool = False,
                 clip_grad_norm: float | None = None, clip_grad_value: float | None = None,
                 ema: EMA | float | None = None) -> None:
        if on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
        self.model, self.optimizer = model, optimizer
        self.loss_fn = loss_fn or SoftmaxCrossEntropy()
        if schedule is not None:
            interval_of(schedule)  # a bad interval, before any training
        self.schedule = schedule
        self.clip_grad_norm = _check_clip("clip_grad_norm", clip_grad_norm)
        self.clip_grad_value = _check_clip("clip_grad_value", clip_grad_value)
        self.ema = _make_ema(ema, model)
        self.model_spec = model_spec
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.on_nonfinite = on_nonfinite
        self.sync_every = sync_every
        if comm is None:
            from ..dist import get_communicator

            comm = get_communicator()
        self.comm = comm
        self._parallel = DataParallel(comm) if comm.size > 1 else None
        self._compiled = None
        if compile:
            if self._parallel is not None:
                raise ConfigError("compile=True runs on one process; data-parallel training "
                                  "is eager")
            from ..backend import backend_label
            from .compiled import CompiledStep, check_compilable

            check_compilable(model, optimizer, backend_label(optimizer.params[0].data))
            self._compiled = CompiledStep(model, optimizer, self.loss_fn,
                                          clip=self._clip_function())
        self.progress = progress and comm.rank == 0
        self.config = config or {}
        self.callbacks: list[Callback] = _check_callbacks(callbacks)
        self.warmup_steps = _check_count("warmup_steps", warmup_steps, 0)
        self._base_lr = getattr(optimizer, "lr", None)  # warmup's target without a schedule
        self.epoch = 0  # index of the epoch in progress (= epochs completed when step == 0)
        self.step = 0  # batches completed inside that epoch
        self.history: list[dict] = []
        self.skipped_steps = 0
        self.last_checkpoint: Path | None = None
        #: set by :meth:`fit` for its callbacks: the epoch count it trains up to, the
        #: training loader's length, and whether there is validation
        self.target_epochs = 0
        self.steps_per_epoch = 0
        self._validating = False
        self._partial = _Sums()
        self._stop_reason: str | None = None
        self._stop_honoured = False  # fit() has returned because of _stop_reason
        self._preprocess: dict | None = None  # the training loader's, for checkpoints

    # -- control -------------------------------------------------------------------------
    def request_stop(self, reason: str = "stop requested") -> None:
        """Ask :meth:`fit` to return after the step in progress (safe from a signal handler
        and from callbacks; asked at the end of an epoch, after that epoch's checkpoint).

        A request made between two :meth:`fit` calls makes the next one return before its
        first step; one made during an epoch's validation or end stops the run there."""
        self._stop_reason = reason

    @property
    def stopped(self) -> str | None:
        """Why the last :meth:`fit` returned early (or why the next one will), else None."""
        return self._stop_reason

    @property
    def record_keys(self) -> tuple[str, ...]:
        """Names of the metrics the epoch records of the current :meth:`fit` hold values for
        (``val_*`` only with a validation loader); what callbacks may monitor."""
        return tuple(f.name for f in fields(EpochRecord) if f.name != "epoch"
                     and (self._validating or not f.name.startswith("val_")))

    # -- checkpoints ---------------------------------------------------------------------
    def save(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint of the whole training state (atomic), creating missing folders
        (``checkpoint_path``: see the constructor)."""
        target = Path(path) if path else self.checkpoint_path
        if target is None:
            raise ConfigError("no checkpoint path given")
        if self.comm.rank == 0:
            _make_parent(target)
        if self._parallel is not None:
            self._average_buffers()
            if self.comm.rank != 0:  # rank 0 writes; everyone waits for the file
                self.comm.barrier()
                self.last_checkpoint = target
                return target
        loss, correct, seen = self._partial.host()
        config = self.config
        if self._preprocess is not None and "preprocess" not in config:
            config = {**config, "preprocess": self._preprocess}
        written = ckpt.save_checkpoint(
            target, self.model, self.optimizer,
            model_spec=self.model_spec if self.model_spec is not None else current_spec(
                self.model), epoch=self.epoch,
            step=self.step,
            extra={"history": self.history, "config": config,
                   "partial": {"loss": loss, "correct": correct, "seen": seen}},
            ema=self.ema)
        if self._parallel is not None:
            self.comm.barrier()
        self.last_checkpoint = written
        return written

    def resume(self, path: str | Path | ckpt.Checkpoint) -> None:
        """Restore model, optimizer, RNG, position and history from a checkpoint (a file, or
        one :func:`anycnn.io.checkpoint.load_checkpoint` has read already), and the weight
        averages when this trainer has an ``ema`` (one saved without them starts the averages
        again from the restored weights, with a warning; averages saved by a trainer without
        ``ema`` are ignored, with a warning).

        Raises:
            CheckpointError: the file is bad, does not fit the model or optimizer, or its
                training record (history, partial metrics) is malformed.
        """
        state = path if isinstance(path, ckpt.Checkpoint) else ckpt.load_checkpoint(path)
        path = state.path
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
        self._restore(state)
        self.epoch, self.step = state.epoch, state.step
        self.history = list(history)
        self._partial = sums
        self.last_checkpoint = Path(path) if path is not None else None

    def _restore(self, state: ckpt.Checkpoint) -> None:
        """Model, optimizer, RNG and weight averages from ``state``, all or nothing."""
        has_averages = state.ema_state is not None
        if self.ema is None:
            if has_averages:
                warnings.warn(f"{state.path}: the checkpoint holds weight averages (EMA), but "
                              "this trainer has no ema; they are not used", stacklevel=3)
            ckpt.restore(state, self.model, self.optimizer)
            return
        before = self.ema.state_dict()
        if has_averages:
            try:
                self.ema.load_state_dict(state.ema_state)
            except CheckpointError as exc:
                raise CheckpointError(f"{state.path}: {exc}") from None
        try:
            ckpt.restore(state, self.model, self.optimizer)
        except BaseException:
            self.ema.load_state_dict(before)
            raise
        if not has_averages:
            warnings.warn(f"{state.path}: the checkpoint holds no weight averages (EMA); they "
                          "start again from the restored weights", stacklevel=3)
            self.ema.load_state_dict({**before, "updates": 0,
                                      "arrays": self.model.state_dict()})

    def _average_buffers(self) -> None:
        """Data-parallel: the model's float buffers (and the averaged ones) become their mean
        over the ranks."""
        self._parallel.average_buffers(self.model)
        if self.ema is not None:
            with self.ema.applied():
                self._parallel.average_buffers(self.model)

    def _validate(self, val_loader) -> dict[str, Any]:
        """Loss and accuracy over ``val_loader``, with the averaged weights when ``ema``."""
        if self.ema is None:
            return evaluate(self.model, val_loader, self.loss_fn, comm=self.comm)
        with self.ema.applied():
            return evaluate(self.model, val_loader, self.loss_fn, comm=self.comm)

    # -- training ------------------------------------------------------------------------
    def _sync_every(self, x: Any) -> int:
        if self.sync_every:
            return self.sync_every
        return 1 if on_host(x) else 20

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
        error = TrainingError(f"loss became {loss_value} at {where}; training stopped. "
                              f"Last good checkpoint: {good}. Try a smaller learning rate.")
        error.every_rank = self._parallel is not None  # the reduced loss: same on every rank
        raise error

    def train_step(self, x: Any, y: Any, check: bool) -> Any:
        """One optimisation step; returns the (device) loss and logits.

        With ``check`` False (GPU pace) nothing is read back to the host: the loss's per-step
        label-range check is off too (datasets check their labels when loaded).
        """
        accept = None
        if check:
            step = self.step + 1
            accept = lambda loss: self._check_finite(float(to_numpy(loss)), step, step)  # noqa: E731
        if self._compiled is not None:
            loss, logits, applied = self._compiled(x, y, accept)
        else:
            loss, logits, _, applied = training_step(
                self.model, self.loss_fn, self.optimizer, x, y, check_labels=check, accept=accept,
                clip=self._clip_function())
        if applied and self.ema is not None:
            self.ema.update()
        return (loss if applied else None), logits

    def parallel_step(self, x: Any, y: Any) -> StepTotals:
        """One data-parallel step on this rank's share ``(x, y)`` (collective): forward,
        backward, the step's allreduce, then the optimizer update unless the global loss is
        NaN/inf (``on_nonfinite``). Returns the global sums."""
        params = self._exchanged_params()
        stop, step = self._stop_reason is not None, self.step + 1
        _, _, totals, applied = training_step(
            self.model, self.loss_fn, self.optimizer, x, y, check_labels=on_host(x),
            exchange=lambda loss, logits: self._parallel.exchange(params, x, y, loss, logits,
                                                                  stop, self.loss_fn),
            accept=lambda totals: self._check_finite(totals.loss, step, step),
            clip=self._clip_function())
        if applied and self.ema is not None:
            self.ema.update()
        return totals

    def _exchanged_params(self) -> list:
        """The parameters whose gradients a data-parallel step sums: the trainable ones (a
        frozen parameter has no gradient to send), or all of them when every one is frozen
        (the buffer still carries the step's sums)."""
        params = self.optimizer.params
        return [p for p in params if p.requires_grad] or params

    def _clip_function(self):
        """The gradient clipping run before each update (None when off)."""
        norm, value = self.clip_grad_norm, self.clip_grad_value
        if norm is None and value is None:
            return None
        params = self.optimizer.params

        def clip() -> None:
            if value is not None:
                clip_grad_value_(params, value)
            if norm is not None:
                clip_grad_norm_(params, norm)

        return clip

    def _scheduled_lr(self, s: int) -> float:
        """The schedule's learning rate for run step ``s`` (1-based) of the epoch in
        progress."""
        schedule = self.schedule
        if interval_of(schedule) == "step":
            return float(schedule(s - 1))
        if getattr(schedule, "reads_history", False):
            return float(schedule(self.epoch, self.history))
        return float(schedule(self.epoch))

    def _set_lr(self, s: int) -> None:
        """Set the learning rate of run step ``s`` (1-based): the per-step schedule's, ramped
        up while ``s`` is in the warmup."""
        n = self.warmup_steps
        per_step = self.schedule is not None and interval_of(self.schedule) == "step"
        if s > n:
            if per_step:
                self.optimizer.lr = self._scheduled_lr(s)
            return
        target = self._scheduled_lr(s) if self.schedule is not None else self._base_lr
        self.optimizer.lr = target if s == n else target * s / n

    def _check_schedule(self, target: int) -> None:
        """Refuse, before training, a schedule that cannot serve this fit: a cycle shorter than
        the run, or a monitored metric the records will not hold."""
        schedule = self.schedule
        check_steps = getattr(schedule, "check_steps", None)
        if check_steps is not None:
            check_steps(target * self.steps_per_epoch)
        monitor = getattr(schedule, "monitor", None)
        if getattr(schedule, "reads_history", False) and monitor not in self.record_keys:
            hint = (" (it needs a validation loader: fit(train_loader, val_loader, ...))"
                    if str(monitor).startswith("val_") else "")
            raise ConfigError(f"{type(schedule).__name__} monitors {monitor!r}, which the epoch "
                              f"records will not hold{hint}; available: "
                              f"{', '.join(self.record_keys)}")

    def fit(self, train_loader, val_loader=None, epochs: int | None = None, *,
            more_epochs: int | None = None,
            callbacks: list[Callback] | tuple[Callback, ...] = ()) -> list[dict]:
        """Train until ``epochs`` epochs of the run are complete, or ``more_epochs`` more.

        ``epochs`` counts every epoch of the run, resumed ones included (Keras's ``epochs``
        with ``initial_epoch``, Lightning's ``max_epochs``): after ``fit(epochs=3)``,
        ``fit(epochs=5)`` trains epochs 4 and 5, and a trainer resumed from a checkpoint of
        epoch 2 trains epoch 3 only with ``epochs=3``. ``more_epochs=k`` trains ``k`` epochs
        from where the run is (a run stopped mid-epoch finishes that epoch as the first of
        them). Neither given: ``epochs=1``. A call with nothing left to do (``epochs`` not
        above the epochs already done) warns (``UserWarning``) and returns the history at
        once, running no callback.

        Saves a checkpoint after each epoch when ``checkpoint_path`` is set; returns early
        (with :attr:`stopped` set) when a stop is requested. ``callbacks`` run for this call
        only, after the trainer's own (hook order in :mod:`anycnn.train.callbacks`). Returns the
        history.

        **Interrupting loses nothing.** Where nobody else handles SIGINT (Ctrl-C) or SIGTERM
        (the default handlers, in the main thread), ``fit`` catches them: the step in progress
        finishes, the callbacks' ``on_train_end`` runs, the run is saved at that step (to
        ``checkpoint_path``; without one, beside a :class:`~anycnn.train.callbacks.BestCheckpoint`
        file as ``<name>.interrupted.safetensors``; else nowhere), one line on stderr says where
        and how to resume (:meth:`resume`, then the same ``fit`` call: the numbers are the
        uninterrupted run's), and ``fit`` raises ``KeyboardInterrupt`` (SIGINT) or
        ``SystemExit(143)`` (SIGTERM). The trainer keeps the run: calling ``fit`` again goes
        on from that step. A second signal interrupts at once (the checkpoint on disk stays
        whole: writes are atomic). ``anycnn train`` installs its own handlers
        (:mod:`anycnn.train.interrupt`), which ``fit`` then leaves alone.
        """
        if epochs is not None and more_epochs is not None:
            raise ConfigError("fit: pass epochs (the run's total) or more_epochs, not both")
        if more_epochs is not None:
            target = self.epoch + _check_count("more_epochs", more_epochs, 1)
        else:
            target = _check_count("epochs", 1 if epochs is None else epochs, 1)
        hooks = [*self.callbacks, *_check_callbacks(callbacks)]
        check_loader(train_loader, "train_loader", ("__iter__", "__len__", "set_epoch"))
        self._preprocess = getattr(train_loader, "preprocess", self._preprocess)
        if val_loader is not None:
            check_loader(val_loader, "val_loader", ("__iter__", "__len__"))
        if self._stop_honoured:  # the last fit() returned because of that stop: start afresh
            self._stop_reason, self._stop_honoured = None, False
        if self.epoch >= target:
            warnings.warn(f"fit(epochs={target}) has nothing to do: {self.epoch} epoch(s) of "
                          "this run are complete already (epochs counts them all, resumed ones "
                          "included). Pass a larger epochs, or more_epochs=k to train k more.",
                          stacklevel=2)
            return self.history
        if self.progress and not stderr_is_terminal() and not any(
                isinstance(c, ProgressLog) for c in hooks):
            hooks.append(ProgressLog(file=sys.stderr))  # no bars: one line per epoch instead
        self.target_epochs, self.steps_per_epoch = target, len(train_loader)
        self._validating = val_loader is not None
        if self.schedule is not None:
            self._check_schedule(target)
        if self._parallel is not None:
            check_loader(train_loader, "train_loader", ("set_shard",))
            train_loader.set_shard(self.comm.rank, self.comm.size)
            self._parallel.check_same(fingerprint(self, train_loader, target))
            self._parallel.check_shares(self.model, train_loader)
            self._parallel.broadcast_state(self.model, self.optimizer, self.ema)
        if self.checkpoint_path is not None and self.comm.rank == 0:
            _make_parent(self.checkpoint_path)  # an unwritable place fails now, not in an hour
        self.model.train()
        with catch_signals(self) as stopper:
            for cb in hooks:
                cb.on_train_begin(self)
            while self.epoch < target and not self._honour_stop():
                done = self._train_epoch(train_loader, hooks)
                if done is None:  # stopped mid-epoch
                    break
                self._end_epoch(val_loader, *done, hooks)
            self._honour_stop()  # asked during the last epoch's end: honoured, not pending
            for cb in hooks:
                cb.on_train_end(self)
            signum = stopper.signum  # saved with the handlers on: a second signal interrupts
            saved = self._save_interrupted(hooks) if signum is not None else None  # at once
        if signum is not None:
            raise interrupted(self, signum, saved)
        return self.history

    def _save_interrupted(self, hooks: list[Callback]) -> Path | None:
        """Save the run stopped by a signal: to ``checkpoint_path``, else beside the first
        :class:`BestCheckpoint`'s file; None when there is neither."""
        path = self.checkpoint_path
        if path is None:
            best = next((cb for cb in hooks if isinstance(cb, BestCheckpoint)), None)
            if best is None:
                return None
            path = best.path.with_name(f"{best.path.stem}.interrupted{best.path.suffix}")
        return self.save(path)

    def _honour_stop(self) -> bool:
        if self._parallel is not None and not self._stop_honoured and \
                self._parallel.agree_stop(self._stop_reason is not None):
            self._stop_reason = self._stop_reason or "stop requested on another rank"
        if self._stop_reason:
            self._stop_honoured = True
        return self._stop_honoured

    def _train_epoch(self, train_loader, hooks: list[Callback]) -> tuple[float, int] | None:
        """The steps of the epoch in progress; (seconds, images) or None if stopped inside."""
        if self.schedule is not None and interval_of(self.schedule) == "epoch":
            self.optimizer.lr = self._scheduled_lr(0)
        train_loader.set_epoch(self.epoch)
        for cb in hooks:
            cb.on_epoch_begin(self, self.epoch + 1)  # 1-based, as printed and recorded
        start = time.perf_counter()
        sums = self._partial
        seen_before = sums.seen
        with _progress(self.steps_per_epoch, f"epoch {self.epoch + 1}/{self.target_epochs}",
                       self.progress, initial=self.step) as bar:
            sync = None
            last_checked = self.step
            for x, y in _batches_from(train_loader, self.step):
                sync = sync or (1 if self._parallel else self._sync_every(x))
                check = self.on_nonfinite == "skip" or sync == 1
                run_step = self.epoch * self.steps_per_epoch + self.step + 1
                self._set_lr(run_step)
                if self._parallel is None:
                    loss, logits = self.train_step(x, y, check)
                    self.step += 1
                    if loss is not None:
                        sums.add(loss, logits, y, self.loss_fn)
                    stop = False  # read after the callbacks, which may ask
                else:  # every rank reads the same sums and flags: all stop at the same step
                    totals = self.parallel_step(x, y)
                    self.step += 1
                    sums.add_totals(totals)
                    loss, stop = totals.loss, totals.stop
                logs = {"loss": loss, "batch_size": int(y.shape[0]), "lr": self.optimizer.lr,
                        "global_step": run_step, "synced": False}
                if self.step % sync == 0 or self.step == self.steps_per_epoch:
                    total, correct, seen = sums.host()
                    if not check:
                        self._check_finite(total, last_checked + 1, self.step)
                    last_checked = self.step
                    rate = (seen - seen_before) / max(time.perf_counter() - start, 1e-9)
                    logs.update(synced=True, train_loss=total / max(seen, 1),
                                train_accuracy=correct / max(seen, 1), images_per_s=rate)
                    bar.set_postfix(loss=f"{logs['train_loss']:.4f}",
                                    acc=f"{logs['train_accuracy']:.4f}",
                                    img_s=f"{rate:.0f}", refresh=False)
                bar.update()
                for cb in hooks:
                    cb.on_step_end(self, self.step, logs)
                if stop or (self._parallel is None and self._stop_reason is not None):
                    self._stop_reason = self._stop_reason or "stop requested on another rank"
                    self._stop_honoured = True
                    return None
        return time.perf_counter() - start, sums.seen - seen_before

    def _end_epoch(self, val_loader, elapsed: float, images: int,
                   hooks: list[Callback]) -> None:
        """Validate, record, checkpoint, then run the epoch-end callbacks."""
        train_loss, train_acc = self._partial.means()
        if self._parallel is not None:
            self._average_buffers()
        val = self._validate(val_loader) if val_loader else None
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
            images_per_s=images / elapsed if elapsed > 0 else math.nan)
        self.history.append(asdict(record))
        self.epoch, self.step, self._partial = self.epoch + 1, 0, _Sums()
        if self.checkpoint_path is not None:
            self.save()
        for cb in hooks:
            cb.on_epoch_end(self, self.epoch, self.history[-1])  # record["epoch"]


def _check_clip(name: str, value: Any) -> float | None:
    if value is None:
        return None
    ok = (isinstance(value, int | float) and not isinstance(value, bool)
          and math.isfinite(value) and value > 0)
    if not ok:
        raise ConfigError(f"{name} must be a finite number > 0 (or None: off), got {value!r}")
    return float(value)


def _make_ema(ema: Any, model: Module) -> EMA | None:
    """``ema`` as an :class:`EMA` of ``model`` (a number is its decay), or None."""
    if ema is None:
        return None
    if isinstance(ema, EMA):
        if ema.model is not model:
            raise ConfigError("ema must average the trainer's model: EMA(model, decay) with "
                              "the model given to the Trainer")
        return ema
    if isinstance(ema, int | float) and not isinstance(ema, bool):
        return EMA(model, ema)
    raise ConfigError(f"ema must be an anycnn.optim.EMA of the model or its decay (a number "
                      f"in [0, 1)), got {type(ema).__name__}")


def _check_callbacks(callbacks) -> list[Callback]:
    """``callbacks`` as a list, refusing anything that is not a :class:`Callback`."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback):
        raise ConfigError("callbacks must be a list of Callback objects, got one Callback; "
                          "wrap it in [...]")
    items = list(callbacks)
    for c in items:
        if not isinstance(c, Callback):
            raise ConfigError("callbacks must be anycnn.train.callbacks.Callback instances, got "
                              f"{type(c).__name__}")
    return items


def _batches_from(loader, start: int):
    """The loader's batches for the current epoch, skipping the first ``start`` (resume)."""
    if start == 0:
        return iter(loader)
    if hasattr(loader, "iter_from"):
        return loader.iter_from(start)
    return islice(iter(loader), start, None)
