"""Gradient averaging for hand-written data-parallel loops (what PyTorch's DDP wrapper does).

Run one copy of the script per rank (``mpiexec -n 4 python train.py``), give every rank its
share of each batch, and call :func:`average_gradients` between ``backward`` and
``optimizer.step()``::

    comm = anycnn.dist.get_communicator()
    for x, y in loader:                        # DataLoader(..., shard=(comm.rank, comm.size))
        model.zero_grad()
        loss_fn(model(x), y).backward()
        anycnn.dist.average_gradients(model)   # one allreduce
        optimizer.step()

Start every rank from the same weights: ``anycnn.manual_seed(s)`` with one seed on all ranks
draws identical parameters (they are drawn on the host), or call
``comm.broadcast_`` on each parameter.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import device

from ..backend import dtype_name, namespace_of
from ..errors import ConfigError
from ..nn.module import Module
from ..optim.averaging import mark_averaged
from .launch import get_communicator


def average_gradients(model: Module | list[Any], comm: Any = None) -> None:
    """Replace the gradient of every trainable parameter of ``model`` (a Module or a list of
    Parameters) by its mean over the ranks of ``comm`` (default: the process-wide
    communicator, :func:`anycnn.dist.get_communicator`), packed into one flat buffer for one
    sum allreduce. A parameter with no gradient on a rank counts as zeros there. The mean of
    per-rank mean losses: equal shares give the gradient of the whole batch's mean loss.

    Raises:
        ConfigError: parameters of more than one dtype (one buffer holds them all).
    """
    comm = comm if comm is not None else get_communicator()
    params = [p for p in (model.parameters() if isinstance(model, Module) else model)
              if p.requires_grad]
    if comm.size > 1 and params:
        assign_gradients(params, comm.allreduce_(flat_gradients(params)) / comm.size)
    mark_averaged(params)


def gradient_dtype(params: list[Any]) -> Any:
    """The one dtype of ``params`` (one flat buffer holds all their gradients).

    Raises:
        ConfigError: parameters of more than one dtype.
    """
    dtypes = {dtype_name(p.data) for p in params}
    if len(dtypes) != 1:
        raise ConfigError("data-parallel training packs all gradients in one buffer and needs "
                          f"one parameter dtype; the model has {sorted(dtypes)}")
    return params[0].data.dtype


def flat_gradients(params: list[Any]) -> Any:
    """The gradients of ``params`` in order, flattened into one 1-D array (zeros for a
    parameter without one: a rank whose forward did not use it)."""
    dtype = gradient_dtype(params)
    xp = namespace_of(params[0].data)
    return xp.concat([
        xp.reshape(p.grad, (-1,)) if p.grad is not None else
        xp.zeros(math.prod(p.shape), dtype=dtype, device=device(p.data)) for p in params])


def assign_gradients(params: list[Any], flat: Any) -> None:
    """Set each parameter's ``grad`` from its range of ``flat`` (the layout of
    :func:`flat_gradients`)."""
    xp = namespace_of(flat)
    start = 0
    for p in params:
        size = math.prod(p.shape)
        p.grad = xp.reshape(flat[start:start + size], p.shape)
        start += size
