"""Optimizers with PyTorch's update rules, sharing one ``step`` loop.

Each optimizer implements ``_update(param, grad, state)`` for one parameter, returning the new
value; :class:`Optimizer` runs it over every parameter that has a gradient and writes the result
back (``param.data = ...``). Each rule is written once, its writes going through
:mod:`anycnn.optim.writes`: where arrays are mutable (NumPy, CuPy, torch, array-api-strict) the
weights and the state are updated in place (row-parallel on NumPy); where they are immutable
(JAX, dask: ``w -= g`` would only rebind a local name) the same arithmetic builds new arrays,
stored back in the state dict (the backend's description decides, through
:func:`anycnn.backend.writes_in_place`). ``lr`` is a
plain attribute, so schedules just assign it. ``state_dict()`` holds hyperparameters plus
per-parameter state arrays keyed ``"<index>.<name>"`` (index in the parameter list), ready for a
checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from ..backend import namespace_of, to_numpy, writes_in_place
from ..errors import CheckpointError, ConfigError, ShapeError
from ..nn.module import Parameter, _like
from .averaging import check_averaged
from .writes import IN_PLACE, NEW_ARRAYS, apply


def _check_positive(name: str, value: float, allow_zero: bool = False) -> float:
    ok = (isinstance(value, int | float) and not isinstance(value, bool)
          and math.isfinite(value) and (value >= 0 if allow_zero else value > 0))
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


class Optimizer:
    """Base class: holds the parameters, their state, and the shared ``step`` loop."""

    #: hyperparameter names saved in ``state_dict`` (besides ``lr``)
    hyper_names: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Parameter], lr: float) -> None:
        self.params = list(params)
        if not self.params:
            raise ConfigError(f"{type(self).__name__} got an empty parameter list")
        for p in self.params:
            if not isinstance(p, Parameter):
                raise ConfigError(f"{type(self).__name__} expects Parameters, got {type(p)}")
        self.lr = _check_positive("learning rate", lr)
        self.state: list[dict[str, Any]] = [{} for _ in self.params]

    def step(self) -> None:
        """Update every parameter that has a gradient (frozen ones have none). As one of
        several ranks of a launch, warns once when the gradients were not averaged over them
        (:func:`anycnn.dist.average_gradients`)."""
        check_averaged(self.params)
        for i, (p, state) in enumerate(zip(self.params, self.state)):
            if p.grad is not None:
                if p.grad.shape != p.data.shape:  # tuples (torch.Size is one)
                    raise ShapeError(f"parameter {i} has shape {tuple(p.data.shape)} but its "
                                     f"gradient has shape {tuple(p.grad.shape)}")
                state["step"] = state.get("step", 0) + 1
                p.data = self._update(p.data, p.grad, state)

    def _update(self, w: Any, g: Any, state: dict[str, Any]) -> Any:  # pragma: no cover
        raise NotImplementedError

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        """``{"type", "lr", hyperparameters..., "steps": [...], "arrays": {"i.name": array}}``."""
        arrays = {f"{i}.{k}": v for i, s in enumerate(self.state) for k, v in s.items()
                  if k != "step"}
        return {"type": type(self).__name__, "lr": self.lr,
                **{k: getattr(self, k) for k in self.hyper_names},
                "steps": [s.get("step", 0) for s in self.state], "arrays": arrays}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` output (arrays may be host or backend arrays).

        Everything is checked before anything changes; a bad state raises CheckpointError and
        leaves the optimizer as it was. Arrays go to each parameter's backend, device and dtype.
        """
        try:
            if state.get("type") != type(self).__name__:
                raise CheckpointError(
                    f"optimizer state is for {state.get('type')!r}, not {type(self).__name__}")
            steps = [int(s) for s in state["steps"]]
            if len(steps) != len(self.params):
                raise CheckpointError(f"optimizer state has {len(steps)} parameters, "
                                      f"the model has {len(self.params)}")
            lr = float(state["lr"])
            hyper = {k: state[k] for k in self.hyper_names}
            new: list[dict[str, Any]] = [{"step": s} if s else {} for s in steps]
            for key, value in state["arrays"].items():
                index, name = key.split(".", 1)
                p = self.params[int(index)]
                host = to_numpy(value)
                if tuple(host.shape) != p.shape:
                    raise CheckpointError(f"optimizer state {key!r} has shape {host.shape}, "
                                          f"parameter has {p.shape}")
                new[int(index)][name] = _like(p.data, host)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise CheckpointError(f"malformed optimizer state ({type(exc).__name__}: {exc})"
                                  ) from None
        self.lr = lr
        for k, v in hyper.items():
            setattr(self, k, v)
        self.state = new


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    PyTorch's rule: ``g += wd*w``; ``buf = momentum*buf + g`` (``buf = g`` at the first step);
    ``g = g + momentum*buf`` if nesterov else ``buf``; ``w -= lr*g``.
    """

    hyper_names = ("momentum", "nesterov", "weight_decay")

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        self.momentum = _check_positive("momentum", momentum, allow_zero=True)
        self.weight_decay = _check_positive("weight_decay", weight_decay, allow_zero=True)
        if nesterov and self.momentum == 0:
            raise ConfigError("nesterov=True needs a momentum > 0")
        self.nesterov = bool(nesterov)

    def _update(self, w, g, state):
        xp = namespace_of(w, g)  # refuses a gradient from another backend or device
        ops = IN_PLACE if writes_in_place(xp) else NEW_ARRAYS
        if self.weight_decay:
            g = g + self.weight_decay * w
        if not self.momentum:
            return apply(xp, ops, self._descend, (w,), g)[0]
        buf = state.get("momentum_buffer")
        if buf is None:  # from zeros, the first update makes it the gradient, as PyTorch
            buf = xp.zeros_like(g)
        w, state["momentum_buffer"] = apply(xp, ops, self._momentum_descend, (w, buf), g)
        return w

    def _descend(self, w, step, ops=IN_PLACE):
        return (ops.sub(w, self.lr * step),)

    def _momentum_descend(self, w, buf, g, ops=IN_PLACE):
        buf = ops.scale_add(buf, self.momentum, g)
        return ops.sub(w, self.lr * (g + self.momentum * buf if self.nesterov else buf)), buf


class Adam(Optimizer):
    """Adam (Kingma & Ba) with PyTorch's bias correction; ``weight_decay`` is L2 added to the
    gradient. :class:`AdamW` decays the weights directly instead."""

    hyper_names = ("beta1", "beta2", "eps", "weight_decay")
    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        self.beta1, self.beta2 = (float(b) for b in betas)
        for name, b in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0.0 <= b < 1.0:
                raise ConfigError(f"Adam {name} must be in [0, 1), got {b}")
        self.eps = _check_positive("eps", eps)
        self.weight_decay = _check_positive("weight_decay", weight_decay, allow_zero=True)

    def _update(self, w, g, state):
        xp = namespace_of(w, g)
        ops = IN_PLACE if writes_in_place(xp) else NEW_ARRAYS
        if self.weight_decay:
            if self.decoupled:
                w = ops.scale(w, 1.0 - self.lr * self.weight_decay)
            else:
                g = g + self.weight_decay * w
        m = state.get("exp_avg")
        v = state.get("exp_avg_sq")
        if m is None:
            m = (1.0 - self.beta1) * g
            v = (1.0 - self.beta2) * (g * g)
        else:
            m = ops.scale_add(m, self.beta1, (1.0 - self.beta1) * g)
            v = ops.scale_add(v, self.beta2, (1.0 - self.beta2) * (g * g))
        state["exp_avg"], state["exp_avg_sq"] = m, v
        t = state["step"]  # an int, or a traced array under anycnn.train.compiled
        step_size = self.lr / (1.0 - self.beta1 ** t)
        bias2 = 1.0 - self.beta2 ** t
        root = math.sqrt(bias2) if isinstance(bias2, float) else xp.sqrt(bias2)
        denom = xp.sqrt(v) * (1.0 / root) + self.eps
        return ops.sub(w, step_size * (m / denom))


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), PyTorch default decay 0.01."""

    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        super().__init__(params, lr, betas, eps, weight_decay)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}
