"""The training step as one compiled function (JAX): ``Trainer(..., compile=True)``.

anycnn's layers keep state on their objects (a forward pass stores what its backward needs,
parameters hold ``data`` and ``grad``). Under :func:`jax.jit` that is fine as long as the step
is a function of its *values*: :class:`CompiledStep` traces

    (parameters, optimizer state, step counts, buffers, group lrs, x, y)
        -> (new parameters, new optimizer state, new buffers, loss, logits)

by installing JAX's tracers in the model and the optimizer, running the ordinary eager code once
(:func:`~anycnn.train.step.training_step`: ``zero_grad → forward → loss → backward →
optimizer.step``), and reading the results back out.
XLA then compiles forward, loss, backward and update into one program per input shape (one per
batch size: the last, smaller batch of an epoch compiles once more). After each call the
concrete new arrays are written back, so checkpoints, evaluation and eager steps see them.

What stays out of the compiled function: each parameter group's learning rate is an input
(schedules and warmup change them without recompiling); the per-parameter step counts are inputs
(Adam's bias correction) and are counted on the host; the loss's host-side label check is off
(datasets check labels when loaded). The groups' other hyperparameters (weight decay, momentum,
betas, ...) and which parameters are frozen are compiled in as constants: changing one (e.g.
unfreezing the backbone) compiles the step again. Not supported: ``Dropout`` with ``p > 0`` (its
masks come from the host RNG, which a trace would freeze into constants) — refused with a
:class:`ConfigError`.
"""

from __future__ import annotations

from typing import Any

from ..backend import backend_names, describe, namespace_of
from ..errors import ConfigError
from ..nn.module import Module
from .step import training_step

#: group keys that are not compiled in: the parameters, and the learning rates (inputs)
_INPUTS = ("params", "lr", "initial_lr")


def check_compilable(model: Module, optimizer: Any, backend_name: str) -> None:
    """Refuse what :class:`CompiledStep` cannot compile, with the reason.

    Raises:
        ConfigError: the backend cannot compile (its description's ``compiles``: JAX), the
            model has an active ``Dropout``, or the optimizer is not one of anycnn's.
    """
    if backend_name not in backend_names() or not describe(backend_name).compiles:
        able = [n for n in backend_names() if describe(n).compiles]
        raise ConfigError(f"compile=True compiles the training step with jax.jit and needs the "
                          f"{' or '.join(able)} backend "
                          f"({' or '.join(f'ANYCNN_BACKEND={n}' for n in able)}), "
                          f"not {backend_name!r}")
    from ..nn.layers import Dropout

    active = [m for m in model.modules() if isinstance(m, Dropout) and m.p > 0]
    if active:
        raise ConfigError("compile=True cannot compile Dropout (its masks come from the host "
                          "random generator, which a trace would freeze); train it eagerly")
    if not hasattr(optimizer, "param_groups"):
        raise ConfigError("compile=True compiles the update of an anycnn.optim optimizer "
                          f"(SGD, Adam, AdamW: it reads their param_groups), not a "
                          f"{type(optimizer).__name__}")
    if not optimizer.params:
        raise ConfigError("compile=True: the optimizer has no parameters")


class CompiledStep:
    """One jitted training step of ``model`` with ``optimizer`` and ``loss_fn`` (see the module
    docstring). Call it with a batch ``(x, y)`` on the JAX backend; it updates the model's
    parameters and buffers and the optimizer's state, and returns ``(loss, logits)``.
    ``clip`` (optional, ``clip()``) clips the gradients inside the step, before the update.

    ``accept`` (optional) sees the step's loss before anything is written back; when it
    returns False (a NaN step to skip) the model and the optimizer keep their values.
    """

    def __init__(self, model: Module, optimizer: Any, loss_fn: Any, clip: Any = None) -> None:
        import jax

        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.clip = clip  # gradient clipping inside the step (compiled in)
        self.params = list(optimizer.params)
        self.buffers = [(m, name) for m in model.modules() for name in m.buffer_names]
        self._jitted = jax.jit(self._traced, static_argnums=(7,))

    # -- the traced function -------------------------------------------------------------
    def _traced(self, values, states, steps, buffers, lrs, x, y, constants):
        # constants (_constants()) is what the trace reads from Python state: only its key
        # role matters here (a change compiles again)
        model, opt, params = self.model, self.optimizer, self.params
        saved = self._snapshot()
        try:
            for p, v in zip(params, values):
                p.data = v
            opt.state = [{**s, "step": t} if t is not None else dict(s)
                         for s, t in zip(states, steps)]
            for (m, name), v in zip(self.buffers, buffers):
                setattr(m, name, v)
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr
            loss, logits, _, _ = training_step(model, self.loss_fn, opt, x, y,
                                               check_labels=False, clip=self.clip)
            new_states = [{k: v for k, v in s.items() if k != "step"} for s in opt.state]
            return ([p.data for p in params], new_states,
                    [getattr(m, name) for m, name in self.buffers], loss, logits)
        finally:
            self._restore(saved)

    def _snapshot(self):
        return ([p.data for p in self.params], [dict(s) for s in self.optimizer.state],
                [getattr(m, name) for m, name in self.buffers],
                [g["lr"] for g in self.optimizer.param_groups])

    def _restore(self, saved) -> None:
        values, states, buffers, lrs = saved
        for p, v in zip(self.params, values):
            p.data, p.grad = v, None
        self.optimizer.state = states
        for (m, name), v in zip(self.buffers, buffers):
            setattr(m, name, v)
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr

    def _constants(self) -> tuple:
        """What the trace compiles in from Python state (hashable): every group's
        hyperparameters but its learning rate, and which parameters are trainable."""
        groups = tuple(tuple((k, tuple(v) if isinstance(v, list) else v)
                             for k, v in g.items() if k not in _INPUTS)
                       for g in self.optimizer.param_groups)
        return groups, tuple(p.requires_grad for p in self.params)

    # -- calling it ----------------------------------------------------------------------
    def __call__(self, x: Any, y: Any, accept: Any = None) -> tuple[Any, Any, bool]:
        """Run the step on ``(x, y)``; returns ``(loss, logits, applied)``."""
        xp = namespace_of(x)
        opt = self.optimizer
        steps = [s.get("step", 0) for s in opt.state]
        states = [{k: v for k, v in s.items() if k != "step"} for s in opt.state]
        counts = [xp.asarray(t) for t in steps]  # Optimizer.step adds 1 inside the trace
        values, new_states, buffers, loss, logits = self._jitted(
            [p.data for p in self.params], states, counts,
            [getattr(m, name) for m, name in self.buffers],
            [float(g["lr"]) for g in opt.param_groups], x, y, self._constants())
        applied = accept is None or bool(accept(loss))
        if applied:
            for p, v in zip(self.params, values):
                p.data, p.grad = v, None
            opt.state = [{**s, "step": t + 1} for s, t in zip(new_states, steps)]
            for (m, name), v in zip(self.buffers, buffers):
                setattr(m, name, v)
        return loss, logits, applied
