"""What a callback sees of the trainer: :class:`TrainerView`, the type the hooks of
:mod:`anycnn.train.callbacks` take (a :class:`~anycnn.train.trainer.Trainer` is one). It lives
here so that callbacks need not import the trainer, which imports them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class TrainerView(Protocol):
    """The attributes and methods of :class:`~anycnn.train.trainer.Trainer` that callbacks use
    (see its documentation for each)."""

    model: Any
    epoch: int
    step: int
    target_epochs: int
    steps_per_epoch: int
    history: list[dict]
    last_checkpoint: Path | None

    @property
    def record_keys(self) -> tuple[str, ...]:
        """Names of the metrics the epoch records of the current ``fit`` hold values for."""

    @property
    def stopped(self) -> str | None:
        """Why the last ``fit`` returned early (or why the next one will), else None."""

    def request_stop(self, reason: str = "stop requested") -> None:
        """Ask ``fit`` to return after the step in progress."""

    def save(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint of the whole training state."""
