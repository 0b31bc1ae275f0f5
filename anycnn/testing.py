"""Check a module's hand-written ``backward`` against finite differences, on any backend.

:func:`check_gradients` takes the scalar ``s = sum(module.forward(x) * dy)`` for a fixed
cotangent ``dy``: its gradient with respect to ``x`` is ``module.backward(dy)`` and with
respect to each parameter the ``Parameter.grad`` that backward accumulates. Each checked
element ``e`` of the input and of every parameter is compared with the central difference
``(s(e + eps) - s(e - eps)) / (2 eps)``: two forward passes per element (``max_elements``
samples a subset of each tensor).

The check runs in float64 whatever the module's dtype: a float32 module is cast for the check
(``module.to("float64")``) and put back afterwards, bit for bit, with everything else it holds
(see :func:`anycnn.nn.module.preserved_state`): train/eval mode, parameter values and gradients,
buffers (BatchNorm running statistics move in training-mode forwards), what ``forward`` kept for
``backward``, and anycnn's global random generator. Float32 differences would be too coarse
to tell a wrong gradient from rounding.

It also checks that ``backward`` *adds* to ``Parameter.grad`` (a second forward and backward
doubles it), as gradient accumulation and shared parameters need.

The module is checked in its current mode (BatchNorm in training mode uses batch statistics,
and that is what its backward must match). The forward must be deterministic: put stochastic
layers (Dropout) in eval mode, or give them a generator that each forward re-seeds. A forward
that gives two different outputs for the same input is refused with that advice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import device

from .autograd import no_grad
from .backend import asarray, namespace_of, to_numpy
from .errors import ConfigError
from .nn.module import Module, Parameter, preserved_state

INPUT = "input"  #: the name of the input gradient in reports


@dataclass(frozen=True)
class TensorCheck:
    """The comparison for one tensor (the input, or a parameter by dotted name).

    ``checked`` elements were compared (all, or a sample of ``max_elements``). At the worst
    element ``index`` (by how far the error exceeds the tolerance ``atol + rtol * scale``,
    ``scale`` the larger magnitude of the two values) backward gave ``analytic`` and finite
    differences ``numeric``. ``max_abs_error`` and ``max_rel_error`` (``|a - n| / scale``, 0
    where both are 0) are over the checked elements.
    """

    name: str
    shape: tuple[int, ...]
    checked: int
    max_abs_error: float
    max_rel_error: float
    index: tuple[int, ...]
    analytic: float
    numeric: float
    excess: float  #: largest ``|a - n| / (atol + rtol * scale)``; above 1 fails

    @property
    def ok(self) -> bool:
        return self.excess <= 1.0


@dataclass(frozen=True)
class GradientReport:
    """What :func:`check_gradients` compared: one :class:`TensorCheck` per tensor, input
    first; ``str()`` is one line per tensor."""

    tensors: tuple[TensorCheck, ...]
    eps: float
    rtol: float
    atol: float

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tensors)

    @property
    def worst(self) -> TensorCheck:
        return max(self.tensors, key=lambda t: t.excess)

    def __getitem__(self, name: str) -> TensorCheck:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def __str__(self) -> str:
        width = max(len(t.name) for t in self.tensors)
        return "\n".join(
            f"{t.name:<{width}}  {'ok  ' if t.ok else 'FAIL'}  max rel error {t.max_rel_error:.2e}"
            f"  max abs error {t.max_abs_error:.2e}  ({t.checked} of {_size(t.shape)} elements)"
            for t in self.tensors)


class GradientCheckError(AssertionError):
    """A gradient differs from finite differences; ``report`` holds every comparison."""

    def __init__(self, message: str, report: GradientReport) -> None:
        super().__init__(message)
        self.report = report


def check_gradients(module: Module, x: Any, *, dy: Any = None, eps: float = 1e-6,
                    rtol: float = 1e-5, atol: float = 1e-8, seed: int = 0,
                    max_elements: int | None = None) -> GradientReport:
    """Compare ``module.backward`` with central finite differences of ``sum(forward(x) * dy)``.

    Args:
        module: any :class:`~anycnn.Module` (a layer, a container, a whole model).
        x: the input, an array of the module's backend (a NumPy array is moved there).
        dy: the output cotangent, shaped as the output; default: standard normal from ``seed``.
        eps: the finite-difference step (in float64).
        rtol, atol: an element fails when ``|analytic - numeric| > atol + rtol * max(|analytic|,
            |numeric|)``.
        seed: seeds the default ``dy`` and the sampled elements.
        max_elements: check at most this many elements per tensor (a seeded random sample);
            default: all. Each element costs two forward passes.

    Returns:
        a :class:`GradientReport` (all tensors passed).

    Raises:
        GradientCheckError: (an ``AssertionError``) naming the worst tensor, its element, both
            values and the tolerance; ``.report`` holds the full comparison.
        AssertionError: backward assigns a parameter's gradient instead of adding to it.
        ConfigError: bad options, a non-deterministic forward, or a backward that returned no
            input gradient.
    """
    if not (eps > 0 and rtol >= 0 and atol >= 0):
        raise ConfigError(f"need eps > 0 and rtol, atol >= 0; got eps={eps}, rtol={rtol}, "
                          f"atol={atol}")
    if max_elements is not None and max_elements < 1:
        raise ConfigError(f"max_elements must be >= 1 or None, got {max_elements}")
    rng = np.random.default_rng(seed)
    with preserved_state(module):
        module.to("float64")
        params = _checked_parameters(module)
        like = params[0][1].data if params else (x if _is_array(x) else None)
        place = (lambda host: _array_like(host, like)) if like is not None else asarray
        x_host = to_numpy(x).astype(np.float64)
        y = _deterministic_output(module, place(x_host))
        cot = rng.standard_normal(y.shape) if dy is None else to_numpy(dy).astype(np.float64)
        if cot.shape != y.shape:
            raise ConfigError(f"dy has shape {cot.shape} but the output has shape {y.shape}")
        analytic = _backward(module, params, place(x_host), place(cot))

        @no_grad()
        def objective() -> float:
            return float(np.sum(to_numpy(module.forward(place(x_host))) * cot))

        def set_input(host: np.ndarray) -> None:
            x_host[...] = host  # the array objective() reads

        tensors = [_compare(INPUT, x_host.copy(), set_input, analytic[INPUT], objective,
                            eps, rtol, atol, rng, max_elements)]
        for name, p in params:

            def set_param(host: np.ndarray, p: Parameter = p) -> None:
                p.data = place(host)

            tensors.append(_compare(name, to_numpy(p.data).astype(np.float64), set_param,
                                    analytic[name], objective, eps, rtol, atol, rng,
                                    max_elements))
    report = GradientReport(tuple(tensors), eps, rtol, atol)
    if not report.ok:
        w = report.worst
        raise GradientCheckError(
            f"gradient of {w.name!r} of {type(module).__name__} differs from finite "
            f"differences: at index {w.index} backward gives {w.analytic:.6g}, finite "
            f"differences {w.numeric:.6g} (relative error {_rel(w.analytic, w.numeric):.2e}; "
            f"rtol {rtol:g}, atol {atol:g}); per tensor:\n{report}", report)
    return report


def _deterministic_output(module: Module, x: Any) -> np.ndarray:
    """The output for ``x`` (host copy), from the second of two forward passes (so that the
    backward pass follows a forward), after checking that both gave the same."""
    with no_grad():  # nothing to go back through (a forward-only module runs unrecorded)
        first = to_numpy(module.forward(x))
    second = to_numpy(module.forward(x))
    if first.shape != second.shape or not np.allclose(first, second, rtol=1e-12, atol=0):
        raise ConfigError(
            f"{type(module).__name__}.forward gave two different outputs for the same input: "
            "finite differences need a deterministic forward; put stochastic layers "
            "(Dropout) in eval mode (module.eval()) or seed them for each call")
    return second


def _backward(module: Module, params: list[tuple[str, Parameter]], x: Any, dy: Any
              ) -> dict[str, np.ndarray]:
    """Host copies of the input gradient and of each parameter's gradient (zeros where
    backward left none) from ``backward(dy)`` after the forward pass of ``x``. A second
    forward and backward must double the parameters' gradients: backward adds to them."""
    for _, p in params:
        p.grad = None
    dx = module.backward(dy)
    if dx is None:
        raise ConfigError(f"{type(module).__name__}.backward(dy) returned None: it must "
                          "return the input gradient")
    grads = {INPUT: to_numpy(dx)}
    for name, p in params:
        grads[name] = np.zeros(p.shape) if p.grad is None else to_numpy(p.grad)
    module.forward(x)
    module.backward(dy)
    for name, p in params:
        twice = np.zeros(p.shape) if p.grad is None else to_numpy(p.grad)
        if not np.allclose(twice, 2 * grads[name], rtol=1e-9, atol=1e-12):
            raise AssertionError(
                f"{type(module).__name__}.backward does not add to the gradient of {name!r}: "
                "after two backward passes it is not twice that of one; accumulate it "
                "(Parameter.accumulate) instead of assigning it")
    return grads


def _compare(name: str, base: np.ndarray, assign, analytic: np.ndarray, objective,
             eps: float, rtol: float, atol: float, rng: np.random.Generator,
             max_elements: int | None) -> TensorCheck:
    """Central differences of ``objective`` at the chosen elements of ``base`` (written with
    ``assign``, which is given ``base`` back at the end) against ``analytic``."""
    if analytic.shape != base.shape:
        raise ConfigError(f"the gradient of {name!r} has shape {analytic.shape}, but "
                          f"{name!r} has shape {base.shape}")
    size = base.size
    if size == 0:
        return TensorCheck(name, tuple(base.shape), 0, 0.0, 0.0, (), 0.0, 0.0, 0.0)
    flat = (np.arange(size) if max_elements is None or size <= max_elements
            else np.sort(rng.choice(size, max_elements, replace=False)))
    numeric = np.empty(flat.size)
    probe = base.copy()
    for k, i in enumerate(flat):
        idx = np.unravel_index(i, base.shape)
        probe[idx] = base[idx] + eps
        assign(probe)
        plus = objective()
        probe[idx] = base[idx] - eps
        assign(probe)
        minus = objective()
        probe[idx] = base[idx]
        numeric[k] = (plus - minus) / (2 * eps)
    assign(base)
    ana = analytic.reshape(-1)[flat]
    err = np.abs(ana - numeric)
    scale = np.maximum(np.abs(ana), np.abs(numeric))
    excess = err / (atol + rtol * scale) if (atol or rtol) else np.where(err > 0, np.inf, 0.0)
    rel = np.divide(err, scale, out=np.zeros_like(err), where=scale > 0)
    w = int(np.argmax(excess))
    index = tuple(int(i) for i in np.unravel_index(flat[w], base.shape))
    return TensorCheck(name, tuple(base.shape), int(flat.size), float(err.max()),
                       float(rel.max()), index, float(ana[w]), float(numeric[w]),
                       float(excess[w]))


def _checked_parameters(module: Module) -> list[tuple[str, Parameter]]:
    """Floating parameters that require gradients by name, each once (a shared one under its
    first name); frozen ones get no gradient, so there is nothing to check."""
    seen: dict[int, tuple[str, Parameter]] = {}
    for name, p in module.named_parameters():
        xp = namespace_of(p.data)
        if id(p) not in seen and p.requires_grad and xp.isdtype(p.data.dtype, "real floating"):
            seen[id(p)] = (name, p)
    return list(seen.values())


def _is_array(x: Any) -> bool:
    return not isinstance(x, np.ndarray | list | tuple) and hasattr(x, "__array_namespace__")


def _array_like(host: np.ndarray, like: Any) -> Any:
    """``host`` on the backend and device of ``like`` (float64)."""
    return namespace_of(like).asarray(np.ascontiguousarray(host), device=device(like))


def _rel(a: float, n: float) -> float:
    scale = max(abs(a), abs(n))
    return abs(a - n) / scale if scale else 0.0


def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape))
