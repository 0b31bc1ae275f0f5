"""An exponential moving average of a model's weights (:class:`EMA`), the evaluation weights
of many recipes (timm's ``--model-ema``, PyTorch's ``AveragedModel`` with
``get_ema_multi_avg_fn``).

After every optimizer step :meth:`EMA.update` moves each average towards the model's current
value: ``avg = avg + (1 - decay) * (w - avg)`` (PyTorch's ``lerp``), for every parameter and
every floating-point buffer (BatchNorm's running statistics; PyTorch's ``use_buffers=True``);
other buffers are copied. The first update copies the model, as ``AveragedModel`` does.
:meth:`EMA.applied` puts the averages into the model for a while (validation, prediction) and
the trained weights back afterwards. ``Trainer(..., ema=EMA(model, 0.999))`` does all of it,
and saves the averages in its checkpoints beside the weights (tensors ``ema.<name>``), so a
resumed run goes on bit for bit.

The averages live on the model's backend and device, updated in place where arrays are mutable
and as new arrays where they are not (JAX), as the optimizers' state is
(:mod:`anycnn.optim.writes`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..backend import dtype_name, namespace_of, to_numpy, writes_in_place
from ..errors import CheckpointError, ConfigError
from ..nn.module import Module, _like
from .writes import IN_PLACE, NEW_ARRAYS


def _is_float(array: Any) -> bool:
    return dtype_name(array).startswith("float")


def _towards(avg, w, *, weight, ops=IN_PLACE):
    """``avg + weight * (w - avg)``, written as PyTorch's ``lerp`` for ``weight < 0.5``."""
    return ops.sub(avg, weight * (avg - w))


class EMA:
    """Exponential moving average of ``model``'s parameters and floating-point buffers.

    Args:
        model: the model whose weights are averaged (a :class:`~anycnn.nn.module.Module`).
        decay: the weight of the old average at each update, in [0, 1) (0.999 and 0.9999 are
            usual; the average spans about ``1 / (1 - decay)`` steps).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` at the ``n``-th update (TensorFlow's
            ``num_updates``), so that early averages do not hold on to the initial weights.

    Attributes:
        decay, warmup: as given.
        updates: how many times :meth:`update` has run (0: the averages are a copy of the model
            taken when this object was made).

    Raises:
        ConfigError: ``model`` is not a Module, or a bad ``decay``.
    """

    def __init__(self, model: Module, decay: float = 0.999, *, warmup: bool = False) -> None:
        if not isinstance(model, Module):
            raise ConfigError(f"EMA averages a model (a Module), got {type(model).__name__}")
        ok = (isinstance(decay, int | float) and not isinstance(decay, bool)
              and 0.0 <= decay < 1.0)
        if not ok:
            raise ConfigError(f"EMA decay must be a number in [0, 1), got {decay!r}")
        self.model = model
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.updates = 0
        self.averages: dict[str, Any] = {name: self._copy(v)
                                         for name, v in model.state_dict().items()}

    @staticmethod
    def _copy(array: Any) -> Any:
        xp = namespace_of(array)
        return xp.asarray(array, copy=True)

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        if not self.warmup:
            return self.decay
        n = self.updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    def update(self) -> None:
        """Move every average towards the model's current value (the first update copies the
        model). Call after each optimizer step."""
        state = self.model.state_dict()
        self._check_names(state, "the model")
        if self.updates == 0:
            self.averages = {name: self._copy(v) for name, v in state.items()}
            self.updates = 1
            return
        weight = 1.0 - self.current_decay()
        for name, w in state.items():
            avg = self.averages[name]
            if not _is_float(w):
                self.averages[name] = self._copy(w)
                continue
            xp = namespace_of(avg, w)
            ops = IN_PLACE if writes_in_place(xp) else NEW_ARRAYS
            self.averages[name] = _towards(avg, w, weight=weight, ops=ops)
        self.updates += 1

    def _check_names(self, state: dict[str, Any], what: str) -> None:
        if state.keys() != self.averages.keys():
            missing = sorted(set(self.averages) ^ set(state))[:3]
            raise ConfigError(f"EMA: {what} does not have the tensors the averages were made "
                              f"for (differing: {', '.join(missing)}); make a new EMA after "
                              "changing the model")

    @contextlib.contextmanager
    def applied(self) -> Iterator[Module]:
        """Within the block the model holds the averages (as its parameters and buffers); on
        leaving, the averages take what the model then holds and the model its own weights
        back. Nothing is copied: evaluation inside the block changes neither.

        Yields:
            the model.
        """
        own = self.model.state_dict()
        self._check_names(own, "the model")
        self._install(self.averages)
        try:
            yield self.model
        finally:
            self.averages = dict(self.model.state_dict())
            self._install(own)

    def _install(self, arrays: dict[str, Any]) -> None:
        params = dict(self.model.named_parameters())
        for name, value in arrays.items():
            if name in params:
                params[name].data = value
            else:
                owner, attr = self.model._locate(name)
                setattr(owner, attr, value)

    def copy_to(self, model: Module | None = None) -> Module:
        """Load the averages into ``model`` (default: the averaged model itself, whose
        trained weights are then lost), as copies; returns it."""
        model = self.model if model is None else model
        model.load_state_dict(self.averages)
        return model

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"decay", "warmup", "updates", "arrays"}``: the arrays are the averages by the
        model's tensor names (backend arrays, not copies); the rest is JSON-able."""
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates,
                "arrays": dict(self.averages)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` output (arrays may be host or backend arrays; they
        go to the model's backend, device and dtype). ``decay`` and ``warmup`` are restored
        too. Everything is checked before anything changes.

        Raises:
            CheckpointError: the state is malformed, or its tensors do not fit the model.
        """
        try:
            updates = int(state["updates"])
            decay, warmup = float(state["decay"]), bool(state["warmup"])
            arrays = state["arrays"]
            if updates < 0 or not 0.0 <= decay < 1.0:
                raise ValueError(f"updates {updates}, decay {decay}")
            own = self.model.state_dict()
            if set(arrays) != set(own):
                differ = sorted(set(arrays) ^ set(own))[:3]
                raise CheckpointError(f"the EMA state does not fit this model (tensors "
                                      f"differing: {', '.join(differ)})")
            new = {}
            for name, target in own.items():
                host = to_numpy(arrays[name])
                if tuple(host.shape) != tuple(target.shape):
                    raise CheckpointError(f"EMA tensor {name!r} has shape {tuple(host.shape)}, "
                                          f"the model's {tuple(target.shape)}")
                new[name] = _like(target, host)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"malformed EMA state ({type(exc).__name__}: {exc})") from None
        self.decay, self.warmup, self.updates, self.averages = decay, warmup, updates, new
