"""Synchronised BatchNorm: every BatchNorm layer of a model takes its training statistics over
all ranks of a communicator."""

from __future__ import annotations

from typing import Any

from ..nn.layers import BatchNorm2D
from ..nn.module import Module
from .launch import get_communicator


def sync_batchnorm(model: Module, comm: Any = None) -> int:
    """Make every :class:`BatchNorm2D` of ``model`` compute its training statistics over all
    ranks of ``comm`` (default :func:`anycnn.dist.get_communicator`); returns how many.

    Every rank must then hold a non-empty share of every training batch (each layer's sums are
    collective): :meth:`anycnn.train.Trainer.fit` refuses a batch size or a last batch smaller
    than the number of ranks.
    """
    if comm is None:
        comm = get_communicator()
    layers = [m for m in model.modules() if isinstance(m, BatchNorm2D)]
    for m in layers:
        m.sync = comm
    return len(layers)
