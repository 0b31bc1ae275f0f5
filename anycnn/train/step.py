"""The one training step every path runs: eager (:meth:`Trainer.train_step`), data-parallel
(:meth:`Trainer.parallel_step`) and compiled (:class:`~anycnn.train.compiled.CompiledStep`,
which traces it).

    zero_grad → forward → loss → backward (no gradient for the input) → [exchange] → [clip]
    → update

with three hooks: ``exchange`` (the data-parallel allreduce, between backward and the update),
``accept`` (the NaN/inf check, which can drop the update) and ``clip`` (gradient clipping, just
before the update).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def training_step(model: Any, loss_fn: Any, optimizer: Any, x: Any, y: Any, *,
                  check_labels: bool | None = None,
                  exchange: Callable[[Any, Any], Any] | None = None,
                  accept: Callable[[Any], bool] | None = None,
                  clip: Callable[[], Any] | None = None) -> tuple[Any, Any, Any, bool]:
    """One optimisation step of ``model`` on the batch ``(x, y)``.

    Args:
        check_labels: set as the loss's ``check_labels`` (its host-side label-range check)
            when the loss has one; None leaves it.
        exchange: ``exchange(loss, logits) -> exchanged``, run after backward and before the
            update (the data-parallel allreduce: it may replace the parameters' gradients).
            With it, a batch of no examples (a rank's empty share) runs no forward or
            backward and passes ``loss = logits = None``.
        accept: ``accept(judged) -> bool``; False drops the update. ``judged`` is what
            ``exchange`` returned when there is one (checked after it), else the step's loss
            (checked before backward, so a dropped step costs no backward pass).
        clip: ``clip()``, run on an accepted step just before the update (it rewrites the
            parameters' gradients: :mod:`anycnn.optim.clipping`).

    Returns:
        ``(loss, logits, exchanged, applied)``: ``exchanged`` is None without ``exchange``;
        ``applied`` says whether the optimizer stepped.
    """
    if check_labels is not None and hasattr(loss_fn, "check_labels"):
        loss_fn.check_labels = check_labels
    model.zero_grad()
    loss = logits = exchanged = None
    if exchange is None or y.shape[0]:
        logits = model.forward(x)
        loss = loss_fn.forward(logits, y)
        if exchange is None and accept is not None and not accept(loss):
            model.release()  # this forward is not backpropagated
            return loss, logits, None, False
        model.backward(loss_fn.backward(), input_grad=False)
    if exchange is not None:
        exchanged = exchange(loss, logits)
        if accept is not None and not accept(exchanged):
            return loss, logits, exchanged, False
    if clip is not None:
        clip()
    optimizer.step()
    return loss, logits, exchanged, True
