"""Data-parallel training: what a :class:`~anycnn.train.Trainer` does differently on ``N`` ranks.

The ranks of a :mod:`communicator <anycnn.dist>` train one model together, ChainerMN/Horovod
style:

* **Start** (every :meth:`Trainer.fit`): each rank's configuration fingerprint (model shapes and
  dtypes, optimizer and its parameter groups, loss, global batch, seed, dataset length, steps,
  position, version) is gathered and compared; a difference stops every rank with one
  :class:`ConfigError` naming the rank and the differing entries. Then rank 0's parameters,
  buffers and optimizer state are broadcast, so every rank starts from the same weights (also
  after a resume).
* **Step** (:func:`~anycnn.train.step.training_step` with :meth:`DataParallel.exchange` as
  its hook): every rank runs forward and backward on its share of the global batch (see
  :class:`~anycnn.data.DataLoader`'s ``shard``), then packs into **one flat buffer**, for **one**
  in-place sum allreduce:

  ========================  =====================================================================
  ``[0, P)``                every trainable parameter's gradient, flattened in optimizer order
                            (all groups), times the share's size ``n`` (the gradient of the
                            share's *summed* loss); frozen parameters are left out
  ``P``                     the share's summed loss ``n * mean_loss``
  ``P + 1``                 the share's correct predictions
  ``P + 2``                 ``n``
  ``P + 3``                 1 if this rank was asked to stop (signal, callback), else 0
  ========================  =====================================================================

  After the sum, the gradients are divided by the global count (so they are the gradient of the
  global batch's mean loss, whatever the shares' sizes; an empty share adds zeros), and every
  rank reads the same four totals: the NaN check, the metrics and the stop decision are the same
  on every rank at the same step, and no rank waits for another that has left the loop.
* **Epoch end**: BatchNorm running statistics (float buffers) are averaged over the ranks before
  validation and before a checkpoint is written; the validation set is split across the ranks
  and its sums reduced (:func:`reduce_sums`); rank 0 alone writes checkpoints, then all wait.

With ``N`` ranks and a model without batch statistics, a step equals a single-process step on
the whole batch up to float rounding (the order of the sums differs); with 2 ranks it equals,
bit for bit, one process that sums the two shares' scaled gradients (float addition of two terms
is commutative, and the allreduce adds exactly those two terms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import device

from .. import __version__
from ..backend import dtype_name, namespace_of, to_numpy
from ..dist.gradients import assign_gradients, flat_gradients, gradient_dtype
from ..errors import ConfigError
from ..nn.losses import batch_hits
from ..nn.module import Module
from ..optim.averaging import mark_averaged

#: entries after the gradients in the step buffer
TRAILER = ("loss_sum", "correct", "count", "stop")


@dataclass(frozen=True)
class StepTotals:
    """The summed trailer of one step's buffer (the same Python numbers on every rank)."""

    loss_sum: float
    correct: float
    count: int
    stop: bool

    @property
    def loss(self) -> float:
        """Mean loss of the global batch (NaN for an empty one)."""
        return self.loss_sum / self.count if self.count else math.nan


def fingerprint_differences(prints: list[dict[str, Any]]) -> list[str]:
    """One line per rank whose fingerprint differs from rank 0's, naming the entries."""
    lines = []
    for rank, theirs in enumerate(prints[1:], start=1):
        keys = sorted(set(prints[0]) | set(theirs))
        diff = [f"{k}: {theirs.get(k)!r} on rank {rank}, {prints[0].get(k)!r} on rank 0"
                for k in keys if theirs.get(k) != prints[0].get(k)]
        if diff:
            lines.append("; ".join(diff))
    return lines


class DataParallel:
    """The collective parts of a data-parallel :class:`~anycnn.train.Trainer` (see the module
    docstring). Every method is collective: all ranks call it, in the same order.

    Args:
        comm: the communicator (:func:`anycnn.dist.get_communicator`), ``size`` > 1.
    """

    def __init__(self, comm: Any) -> None:
        self.comm = comm

    # -- start ---------------------------------------------------------------------------
    def check_same(self, fingerprint: dict[str, Any]) -> None:
        """Refuse to start unless every rank has the same ``fingerprint``.

        Raises:
            ConfigError: on every rank, naming each differing rank and entry.
        """
        prints = self.comm.allgather_object(fingerprint)
        lines = fingerprint_differences(prints)
        if lines:
            error = ConfigError("the ranks of this data-parallel run are configured differently "
                                "(every rank must run the same command on the same data): "
                                + " | ".join(lines))
            error.every_rank = True
            raise error

    def broadcast_state(self, model: Module, optimizer: Any, ema: Any = None) -> None:
        """Give every rank rank 0's parameters, buffers, optimizer state and weight averages
        (``ema``, an :class:`~anycnn.optim.ema.EMA`; host copies, once per
        :meth:`Trainer.fit`)."""
        state = None
        if self.comm.rank == 0:
            state = {"model": {k: to_numpy(v) for k, v in model.state_dict().items()},
                     "optimizer": _host_state(optimizer.state_dict()),
                     "ema": _host_state(ema.state_dict()) if ema is not None else None}
        state = self.comm.broadcast_object(state, 0)
        if self.comm.rank != 0:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if ema is not None:
                ema.load_state_dict(state["ema"])

    def check_shares(self, model: Module, loader: Any) -> None:
        """Refuse a loader that would leave a rank an empty share when ``model`` has BatchNorm
        layers with synchronised statistics (their sums are collective: every rank must run
        its forward and backward at every step).

        Raises:
            ConfigError: the batch size, or the last batch, is smaller than the rank count.
        """
        if not any(getattr(m, "sync", None) is not None for m in model.modules()):
            return
        size, batch = self.comm.size, loader.batch_size
        last = len(loader.dataset) % batch
        if getattr(loader, "drop_last", False):
            last = 0
        if batch < size or 0 < last < size:
            small = batch if batch < size else last
            raise ConfigError(f"synchronised BatchNorm needs every rank in every step, but a "
                              f"batch of {small} leaves some of the {size} ranks nothing: use "
                              "a batch size and a last batch of at least the number of ranks "
                              "(e.g. drop_last=True)")

    # -- steps ---------------------------------------------------------------------------
    def exchange(self, params: list, x: Any, y: Any, loss: Any, logits: Any,
                 stop: bool, loss_fn: Any = None) -> StepTotals:
        """The step's one allreduce, after forward and backward on this rank's share ``(x, y)``
        (``loss`` and ``logits`` None for an empty share): each parameter's ``grad`` becomes the
        global batch's mean-loss gradient. The ``exchange`` hook of
        :func:`~anycnn.train.step.training_step`.

        ``loss_fn`` counts the correct predictions (:func:`~anycnn.nn.losses.batch_hits`).
        Returns the summed trailer. The optimizer is not stepped: the caller decides (NaN).
        """
        xp = namespace_of(x)
        dtype = gradient_dtype(params)
        dev = device(params[0].data)
        n = int(y.shape[0])
        if n:
            hits = batch_hits(loss_fn, logits, y)
            flat = flat_gradients(params) * float(n)
            head = [xp.reshape(xp.astype(loss * float(n), dtype), (1,)),
                    xp.reshape(xp.astype(hits, dtype), (1,))]
        else:
            flat = xp.zeros(sum(math.prod(p.shape) for p in params), dtype=dtype, device=dev)
            head = [xp.zeros(2, dtype=dtype, device=dev)]
        tail = xp.asarray(np.asarray([n, 1.0 if stop else 0.0], dtype=dtype_name(flat)),
                          device=dev)
        buf = self.comm.allreduce_(xp.concat([flat, *head, tail]))
        loss_sum, correct, count, flag = (float(v) for v in to_numpy(buf[-len(TRAILER):]))
        if count:
            assign_gradients(params, buf[:-len(TRAILER)] / count)
            mark_averaged(params)
        return StepTotals(loss_sum, correct, round(count), flag > 0)

    def agree_stop(self, stop: bool) -> bool:
        """True on every rank when any rank asks to stop (between epochs)."""
        return self.reduce_sums([1.0 if stop else 0.0])[0] > 0

    # -- epoch end -----------------------------------------------------------------------
    def average_buffers(self, model: Module) -> None:
        """Replace every float buffer (BatchNorm running statistics) by its mean over ranks."""
        owners = [(m, name) for m in model.modules() for name in m.buffer_names
                  if dtype_name(getattr(m, name)).startswith("float")]
        if not owners:
            return
        values = [getattr(m, name) for m, name in owners]
        xp = namespace_of(*values)
        total = self.comm.allreduce_(xp.concat([xp.reshape(v, (-1,)) for v in values]))
        start = 0
        for (m, name), v in zip(owners, values):
            size = math.prod(v.shape)
            mean = xp.reshape(total[start:start + size], v.shape) / self.comm.size
            setattr(m, name, xp.astype(mean, v.dtype))
            start += size

    def reduce_sums(self, values: list[float]) -> list[float]:
        """Elementwise sum over ranks of a few host numbers (float64)."""
        total = self.comm.allreduce_(np.asarray(values, dtype=np.float64))
        return [float(v) for v in to_numpy(total)]


def fingerprint(trainer: Any, loader: Any, target_epochs: int) -> dict[str, Any]:
    """What must be the same on every rank of one run (JSON-able values)."""
    dataset = getattr(loader, "dataset", None)
    opt = trainer.optimizer
    return {
        "anycnn": __version__,
        "parameters": [(name, list(p.shape), dtype_name(p.data))
                       for name, p in trainer.model.named_parameters()],
        "optimizer": [type(opt).__name__, opt.lr, _groups_print(opt)],
        "loss": type(trainer.loss_fn).__name__,
        "batch_size": getattr(loader, "batch_size", None),
        "seed": getattr(loader, "seed", None),
        "shuffle": getattr(loader, "shuffle", None),
        "dataset_length": len(dataset) if dataset is not None else None,
        "steps_per_epoch": len(loader),
        "epochs": target_epochs,
        "position": [trainer.epoch, trainer.step],
        "warmup_steps": trainer.warmup_steps,
        "on_nonfinite": trainer.on_nonfinite,
        "clipping": [getattr(trainer, "clip_grad_norm", None),
                     getattr(trainer, "clip_grad_value", None)],
        "ema": None if getattr(trainer, "ema", None) is None else trainer.ema.decay,
        "synchronised_batchnorm": sum(getattr(m, "sync", None) is not None
                                      for m in trainer.model.modules()),
    }


def _host_state(state: dict[str, Any]) -> dict[str, Any]:
    """A ``state_dict`` with host copies of its ``"arrays"``."""
    return {**state, "arrays": {k: to_numpy(v) for k, v in state["arrays"].items()}}


def _groups_print(optimizer: Any) -> list[dict[str, Any]]:
    """Each parameter group's hyperparameters and size (what every rank must share)."""
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": len(g["params"])}
            for g in getattr(optimizer, "param_groups", ())]
