"""Optimizers with PyTorch's update rules and parameter groups, sharing one ``step`` loop.

Each optimizer implements ``_update(param, grad, state, group)`` for one parameter, returning the
new value; :class:`Optimizer` runs it over every trainable parameter that has a gradient and
writes the result back (``param.data = ...``). Each rule is written once, its writes going
through :mod:`anycnn.optim.writes`: where arrays are mutable (NumPy, CuPy, torch,
array-api-strict) the weights and the state are updated in place (row-parallel on NumPy); where
they are immutable (JAX, dask: ``w -= g`` would only rebind a local name) the same arithmetic
builds new arrays, stored back in the state dict (the backend's description decides, through
:func:`anycnn.backend.writes_in_place`).

**Parameter groups** (as in PyTorch): ``params`` is an iterable of Parameters (one group), or a
list of dicts ``{"params": [...], "lr": ..., "weight_decay": ..., ...}`` whose missing keys take
the constructor's values (:attr:`Optimizer.defaults`). :attr:`Optimizer.param_groups` holds one
dict per group: its ``params``, every hyperparameter, ``initial_lr`` (the group's ``lr`` when
the optimizer was made) and an optional ``name``. The update reads each group's dict at every
step, so assigning ``param_groups[i]["lr"]`` takes effect at the next one.

**The learning rate** :attr:`Optimizer.lr` is the optimizer's own: the constructor's ``lr``, as
schedules and warmup change it. Assigning it sets every group's ``lr`` to its ``initial_lr``
times ``value / defaults["lr"]`` — a group that gave no ``lr`` of its own gets ``value``
exactly, the others keep their ratio to it (PyTorch's ``LambdaLR`` with per-group
``initial_lr``). With one group, ``optimizer.lr`` is that group's learning rate.

``state_dict()`` holds the learning rate, the groups' hyperparameters and parameter indices, and
the per-parameter state arrays keyed ``"<index>.<name>"`` (index in :attr:`Optimizer.params`,
the groups' parameters in order), ready for a checkpoint.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

from ..backend import namespace_of, to_numpy, writes_in_place
from ..errors import CheckpointError, ConfigError, ShapeError
from ..nn.module import Module, Parameter, _like
from .averaging import check_averaged
from .writes import IN_PLACE, NEW_ARRAYS, apply

#: keys of a group dict besides the optimizer's hyperparameters
_GROUP_KEYS = ("params", "lr", "name")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> float:
    ok = (isinstance(value, int | float) and not isinstance(value, bool)
          and math.isfinite(value) and (value >= 0 if allow_zero else value > 0))
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _shape(p: Parameter) -> tuple[int, ...]:
    return tuple(p._data.shape)


def _group_label(index: int, group: dict[str, Any]) -> str:
    name = group.get("name")
    return f"parameter group {index}" + (f" ({name!r})" if name is not None else "")


class Optimizer:
    """Base class: holds the parameter groups, the per-parameter state and the ``step`` loop.

    Args:
        params: an iterable of :class:`~anycnn.nn.module.Parameter` (one group), or a list of
            group dicts: ``"params"`` (Parameters), optionally ``"lr"``, any hyperparameter of
            the optimizer (e.g. ``"weight_decay"``) and ``"name"`` (a label for messages).
            Frozen parameters (``requires_grad`` False) may be included: they are skipped
            while frozen and trained at their group's rate once unfrozen. A Parameter listed
            twice in one group (a module used twice in a model) is stepped once.
        lr: the learning rate of groups without their own (> 0).
        **defaults: the other hyperparameters (:attr:`hyper_names`), for groups without their
            own.

    Attributes:
        param_groups: one dict per group (see the module docstring).
        params: every group's parameters, in order (the indices of :meth:`state_dict`).
        defaults: the constructor's hyperparameters, ``lr`` included.
        state: one dict of state arrays per parameter, in :attr:`params` order.

    Raises:
        ConfigError: no parameters; something that is not a Parameter; a group without
            ``params``, without any, with an unknown key or a bad value; a Parameter in two
            groups; a bad hyperparameter.

    A subclass names its hyperparameters in :attr:`hyper_names` (its constructor passes them
    as ``**defaults``), checks them in ``_check_options(options) -> options`` and implements
    ``_update(w, g, state, group)``, reading them from ``group``.
    """

    #: hyperparameters of a group besides ``lr`` (the keyword arguments of the constructor)
    hyper_names: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Parameter] | Iterable[dict[str, Any]], lr: float,
                 **defaults: Any) -> None:
        kind = type(self).__name__
        self._lr = _check_positive("learning rate", lr)
        self.defaults: dict[str, Any] = {"lr": self._lr, **self._check_options(defaults)}
        self.param_groups: list[dict[str, Any]] = []
        owner: dict[int, int] = {}  # id(parameter) -> its group
        for index, given in enumerate(_as_groups(params, kind)):
            self.param_groups.append(self._make_group(index, given, owner))
        self.params: list[Parameter] = [p for g in self.param_groups for p in g["params"]]
        self.state: list[dict[str, Any]] = [{} for _ in self.params]

    # -- groups --------------------------------------------------------------------------
    def _make_group(self, index: int, given: dict[str, Any], owner: dict[int, int]
                    ) -> dict[str, Any]:
        """One validated group dict from the user's ``given`` (defaults filled in)."""
        kind = type(self).__name__
        label = _group_label(index, given)
        unknown = [k for k in given if k not in (*_GROUP_KEYS, *self.hyper_names)]
        if unknown:
            raise ConfigError(
                f"{kind} {label} has unknown key(s) {', '.join(map(repr, unknown))}; a group "
                f"may hold {', '.join(repr(k) for k in (*_GROUP_KEYS, *self.hyper_names))}")
        if "params" not in given:
            raise ConfigError(f"{kind} {label} has no 'params' key (the list of its "
                              "Parameters)")
        if "name" in given and not isinstance(given["name"], str):
            raise ConfigError(f"{kind} {label}: 'name' must be a string, got "
                              f"{type(given['name']).__name__}")
        params = _parameter_list(given["params"], f"{kind} {label}")
        if not params:
            raise ConfigError(f"{kind} {label} has no parameters")
        unique: list[Parameter] = []
        for p in params:
            other = owner.get(id(p))
            if other is None:
                owner[id(p)] = index
                unique.append(p)
            elif other != index:
                raise ConfigError(
                    f"{kind}: a Parameter of shape {_shape(p)} is in parameter group {other} "
                    f"and in {label}; each parameter may belong to one group only")
        try:
            lr = _check_positive("learning rate", given.get("lr", self.defaults["lr"]))
            options = self._check_options({k: given.get(k, self.defaults[k])
                                           for k in self.hyper_names})
        except ConfigError as exc:
            raise ConfigError(f"{kind} {label}: {exc}") from None
        group: dict[str, Any] = {"params": unique, "lr": lr, "initial_lr": lr, **options}
        if "name" in given:
            group["name"] = given["name"]
        return group

    def _check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The hyperparameters (:attr:`hyper_names`) checked and normalised.

        Raises:
            ConfigError: a bad value, named."""
        return dict(options)

    @property
    def lr(self) -> float:
        """The optimizer's learning rate (see the module docstring): the constructor's ``lr``
        as schedules change it; with one group, that group's. Assigning it scales every
        group's ``lr`` from its ``initial_lr`` by ``value / defaults["lr"]``."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = value
        base = self.defaults["lr"]
        for group in self.param_groups:
            initial = group["initial_lr"]
            group["lr"] = value if initial == base else initial * (value / base)

    # -- stepping ------------------------------------------------------------------------
    def step(self) -> None:
        """Update every trainable parameter that has a gradient (frozen ones are skipped),
        with its group's hyperparameters. As one of several ranks of a launch, warns once
        when the gradients were not averaged over them
        (:func:`anycnn.dist.average_gradients`)."""
        check_averaged(self.params)
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[i]
                if p.requires_grad and p.grad is not None:
                    if p.grad.shape != p.data.shape:  # tuples (torch.Size is one)
                        raise ShapeError(f"parameter {i} has shape {tuple(p.data.shape)} but "
                                         f"its gradient has shape {tuple(p.grad.shape)}")
                    state["step"] = state.get("step", 0) + 1
                    p.data = self._update(p.data, p.grad, state, group)
                i += 1

    def _update(self, w: Any, g: Any, state: dict[str, Any],
                group: dict[str, Any]) -> Any:  # pragma: no cover
        raise NotImplementedError

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"type", "lr", "initial_lr", "param_groups", "steps", "arrays"}``: the optimizer's
        learning rate and ``defaults["lr"]``; per group its hyperparameters, ``initial_lr``,
        ``name`` (if any) and ``params`` (indices into :attr:`params`); per parameter its step
        count; the state arrays keyed ``"<index>.<name>"``. Everything but the arrays is
        JSON-able."""
        arrays = {f"{i}.{k}": v for i, s in enumerate(self.state) for k, v in s.items()
                  if k != "step"}
        groups, start = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            entry = {k: list(v) if isinstance(v, tuple) else v
                     for k, v in group.items() if k != "params"}
            groups.append({**entry, "params": list(range(start, start + n))})
            start += n
        return {"type": type(self).__name__, "lr": self._lr, "initial_lr": self.defaults["lr"],
                "param_groups": groups, "steps": [s.get("step", 0) for s in self.state],
                "arrays": arrays}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` output (arrays may be host or backend arrays): the
        learning rate, every group's hyperparameters, the step counts and the state arrays.
        The groups must hold as many parameters, in the same order, as when it was saved. A
        state written before parameter groups existed (hyperparameters at its top level)
        loads into an optimizer of one group.

        Everything is checked before anything changes; a bad state raises CheckpointError and
        leaves the optimizer as it was. Arrays go to each parameter's backend, device and dtype.
        """
        kind = type(self).__name__
        try:
            if state.get("type") != kind:
                raise CheckpointError(f"optimizer state is for {state.get('type')!r}, not {kind}")
            steps = [int(s) for s in state["steps"]]
            if len(steps) != len(self.params):
                raise CheckpointError(f"optimizer state has {len(steps)} parameters, "
                                      f"the model has {len(self.params)}")
            lr = float(state["lr"])
            if "param_groups" in state:
                base = _check_positive("initial_lr", state["initial_lr"])
                groups = self._saved_groups(state["param_groups"])
            else:
                base, groups = self.defaults["lr"], self._legacy_group(state, lr)
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
        except ConfigError as exc:
            raise CheckpointError(f"invalid optimizer state: {exc}") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise CheckpointError(f"malformed optimizer state ({type(exc).__name__}: {exc})"
                                  ) from None
        self._lr = lr
        self.defaults["lr"] = base
        for group, values in zip(self.param_groups, groups):
            group.update(values)
        self.state = new

    def _saved_groups(self, saved: Any) -> list[dict[str, Any]]:
        """Each saved group's values, checked against this optimizer's groups."""
        if not isinstance(saved, list):
            raise TypeError(f"'param_groups' must be a list, got {type(saved).__name__}")
        if len(saved) != len(self.param_groups):
            raise CheckpointError(f"optimizer state has {len(saved)} parameter group(s), "
                                  f"this {type(self).__name__} has {len(self.param_groups)}")
        out, start = [], 0
        for index, (ours, theirs) in enumerate(zip(self.param_groups, saved)):
            n = len(ours["params"])
            label = _group_label(index, ours)
            indices = [int(i) for i in theirs["params"]]
            if len(indices) != n:
                raise CheckpointError(f"{label} holds {n} parameter(s), the optimizer state's "
                                      f"group {index} holds {len(indices)}")
            if indices != list(range(start, start + n)):
                raise ValueError(f"group {index} holds parameter indices {indices}, expected "
                                 f"{start} to {start + n - 1}")
            start += n
            try:
                values = {"lr": _check_positive("learning rate", theirs["lr"], allow_zero=True),
                          "initial_lr": _check_positive("initial_lr", theirs["initial_lr"]),
                          **self._check_options({k: theirs[k] for k in self.hyper_names})}
            except ConfigError as exc:
                raise ConfigError(f"{label}: {exc}") from None
            out.append(values)
        return out

    def _legacy_group(self, state: dict[str, Any], lr: float) -> list[dict[str, Any]]:
        """The one group of a state written before parameter groups existed."""
        if len(self.param_groups) != 1:
            raise CheckpointError(
                f"the optimizer state has one parameter group (it was written before "
                f"parameter groups existed), this {type(self).__name__} has "
                f"{len(self.param_groups)}")
        options = self._check_options(self._legacy_options(state))
        return [{"lr": _check_positive("learning rate", lr, allow_zero=True), **options}]

    def _legacy_options(self, state: dict[str, Any]) -> dict[str, Any]:
        """The hyperparameters as a state written before parameter groups stored them."""
        return {k: state[k] for k in self.hyper_names}


def _as_groups(params: Any, kind: str) -> list[dict[str, Any]]:
    """``params`` as a list of group dicts (not yet checked)."""
    if isinstance(params, Module):
        raise ConfigError(f"{kind} takes the model's parameters, not the model: pass "
                          "model.parameters() (or a list of parameter groups)")
    if isinstance(params, Parameter):
        raise ConfigError(f"{kind} takes an iterable of Parameters, got one Parameter; wrap it "
                          "in a list")
    if isinstance(params, dict):
        return [params]
    items = _parameter_list(params, kind, groups_allowed=True)
    if not items:
        raise ConfigError(f"{kind} got an empty parameter list")
    dicts = [isinstance(item, dict) for item in items]
    if all(dicts):
        return items
    if any(dicts):
        raise ConfigError(f"{kind} takes a list of Parameters or a list of parameter-group "
                          "dicts, not a mix of both")
    return [{"params": items}]


def _parameter_list(params: Any, where: str, groups_allowed: bool = False) -> list[Any]:
    """The Parameters of ``params`` as a list (one Parameter is a list of one)."""
    if isinstance(params, Parameter):
        return [params]
    if isinstance(params, set | frozenset):
        raise ConfigError(f"{where}: parameters in a set have no fixed order (the order of "
                          "the optimizer state); pass a list")
    try:
        items = list(params)
    except TypeError:
        raise ConfigError(f"{where} takes an iterable of Parameters, got "
                          f"{type(params).__name__}") from None
    for i, item in enumerate(items):
        if not isinstance(item, Parameter) and not (groups_allowed and isinstance(item, dict)):
            raise ConfigError(f"{where} expects Parameters, got {type(item).__name__} at "
                              f"position {i}")
    return items


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    PyTorch's rule: ``g += wd*w``; ``buf = momentum*buf + g`` (``buf = g`` at the first step);
    ``g = g + momentum*buf`` if nesterov else ``buf``; ``w -= lr*g``. ``params`` may be
    parameter groups (see :class:`Optimizer`) with keys ``lr``, ``momentum``, ``nesterov`` and
    ``weight_decay``.
    """

    hyper_names = ("momentum", "nesterov", "weight_decay")

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay)

    def _check_options(self, options):
        momentum = _check_positive("momentum", options["momentum"], allow_zero=True)
        weight_decay = _check_positive("weight_decay", options["weight_decay"], allow_zero=True)
        nesterov = bool(options["nesterov"])
        if nesterov and momentum == 0:
            raise ConfigError("nesterov=True needs a momentum > 0")
        return {"momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay}

    def _update(self, w, g, state, group):
        xp = namespace_of(w, g)  # refuses a gradient from another backend or device
        ops = IN_PLACE if writes_in_place(xp) else NEW_ARRAYS
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        if weight_decay:
            g = g + weight_decay * w
        if not momentum:
            return apply(xp, ops, functools.partial(_descend, lr=lr), (w,), g)[0]
        buf = state.get("momentum_buffer")
        if buf is None:  # from zeros, the first update makes it the gradient, as PyTorch
            buf = xp.zeros_like(g)
        kernel = functools.partial(_momentum_descend, lr=lr, momentum=momentum,
                                   nesterov=group["nesterov"])
        w, state["momentum_buffer"] = apply(xp, ops, kernel, (w, buf), g)
        return w


def _descend(w, step, *, lr, ops=IN_PLACE):
    return (ops.sub(w, lr * step),)


def _momentum_descend(w, buf, g, *, lr, momentum, nesterov, ops=IN_PLACE):
    buf = ops.scale_add(buf, momentum, g)
    return ops.sub(w, lr * (g + momentum * buf if nesterov else buf)), buf


class Adam(Optimizer):
    """Adam (Kingma & Ba) with PyTorch's bias correction; ``weight_decay`` is L2 added to the
    gradient. :class:`AdamW` decays the weights directly instead. ``params`` may be parameter
    groups (see :class:`Optimizer`) with keys ``lr``, ``betas``, ``eps`` and
    ``weight_decay``."""

    hyper_names = ("betas", "eps", "weight_decay")
    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _check_options(self, options):
        kind = type(self).__name__
        try:
            beta1, beta2 = (float(b) for b in options["betas"])
        except (TypeError, ValueError):
            raise ConfigError(f"{kind} betas must be a pair of numbers in [0, 1), got "
                              f"{options['betas']!r}") from None
        for name, b in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= b < 1.0:
                raise ConfigError(f"{kind} {name} must be in [0, 1), got {b}")
        return {"betas": (beta1, beta2), "eps": _check_positive("eps", options["eps"]),
                "weight_decay": _check_positive("weight_decay", options["weight_decay"],
                                                allow_zero=True)}

    def _legacy_options(self, state):
        return {"betas": (state["beta1"], state["beta2"]), "eps": state["eps"],
                "weight_decay": state["weight_decay"]}

    def _update(self, w, g, state, group):
        xp = namespace_of(w, g)
        ops = IN_PLACE if writes_in_place(xp) else NEW_ARRAYS
        lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        if weight_decay:
            if self.decoupled:
                w = ops.scale(w, 1.0 - lr * weight_decay)
            else:
                g = g + weight_decay * w
        m = state.get("exp_avg")
        v = state.get("exp_avg_sq")
        if m is None:
            m = (1.0 - beta1) * g
            v = (1.0 - beta2) * (g * g)
        else:
            m = ops.scale_add(m, beta1, (1.0 - beta1) * g)
            v = ops.scale_add(v, beta2, (1.0 - beta2) * (g * g))
        state["exp_avg"], state["exp_avg_sq"] = m, v
        t = state["step"]  # an int, or a traced array under anycnn.train.compiled
        step_size = lr / (1.0 - beta1 ** t)
        bias2 = 1.0 - beta2 ** t
        root = math.sqrt(bias2) if isinstance(bias2, float) else xp.sqrt(bias2)
        denom = xp.sqrt(v) * (1.0 / root) + eps
        return ops.sub(w, step_size * (m / denom))


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), PyTorch default decay 0.01.
    ``params`` may be parameter groups (see :class:`Optimizer`), as for :class:`Adam`."""

    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        super().__init__(params, lr, betas, eps, weight_decay)


class RMSprop(Optimizer):
    """RMSprop (Hinton) with PyTorch's update rule and defaults.

    ``g += wd*w``; ``sq = alpha*sq + (1-alpha)*g*g``; ``centered``: also
    ``ga = ga + (1-alpha)*(g - ga)`` and ``avg = sqrt(sq - ga*ga) + eps``, else
    ``avg = sqrt(sq) + eps``; with ``momentum``: ``buf = momentum*buf + g/avg`` and
    ``w -= lr*buf``, else ``w -= lr*g/avg`` (every state starts at zero). ``params`` may be
    parameter groups (see :class:`Optimizer`) with keys ``lr``, ``alpha``, ``eps``,
    ``weight_decay``, ``momentum`` and ``centered``.

    Args:
        lr: learning rate (PyTorch's default 1e-2).
        alpha: smoothing constant of the squared-gradient average, in [0, 1).
        eps: added to the denominator (> 0).
        weight_decay: L2 penalty added to the gradient (>= 0).
        momentum: momentum of the scaled step (>= 0).
        centered: divide by an estimate of the gradient's variance instead of its second
            moment.
    """

    hyper_names = ("alpha", "eps", "weight_decay", "momentum", "centered")

    def __init__(self, params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0,
                 centered: bool = False) -> None:
        super().__init__(params, lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                         momentum=momentum, centered=centered)

    def _check_options(self, options):
        alpha = options["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or \
                not 0.0 <= alpha < 1.0:
            raise ConfigError(f"RMSprop alpha must be a number in [0, 1), got {alpha!r}")
        return {"alpha": float(alpha), "eps": _check_positive("eps", options["eps"]),
                "weight_decay": _check_positive("weight_decay", options["weight_decay"],
                                                allow_zero=True),
                "momentum": _check_positive("momentum", options["momentum"], allow_zero=True),
                "centered": bool(options["centered"])}

    def _update(self, w, g, state, group):
        xp = namespace_of(w, g)
        ops = IN_PLACE if writes_in_place(xp) else NEW_ARRAYS
        lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
        momentum, weight_decay = group["momentum"], group["weight_decay"]
        if weight_decay:
            g = g + weight_decay * w
        sq = state.get("square_avg")
        if sq is None:  # every state starts at zero, as PyTorch's
            sq = xp.zeros_like(w)
        sq = state["square_avg"] = ops.scale_add(sq, alpha, (1.0 - alpha) * (g * g))
        if group["centered"]:
            ga = state.get("grad_avg")
            if ga is None:
                ga = xp.zeros_like(w)
            ga = state["grad_avg"] = ops.sub(ga, (1.0 - alpha) * (ga - g))
            avg = xp.sqrt(sq - ga * ga) + eps
        else:
            avg = xp.sqrt(sq) + eps
        if not momentum:
            return ops.sub(w, lr * (g / avg))
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = xp.zeros_like(w)
        buf = state["momentum_buffer"] = ops.scale_add(buf, momentum, g / avg)
        return ops.sub(w, lr * buf)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop}
