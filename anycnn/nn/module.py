"""Parameters and the :class:`Module` base class (containers live in :mod:`anycnn.nn.sequential`).

A module's ``forward(x)`` returns its output and keeps what ``backward`` needs; ``backward(dy)``
returns the input gradient and *accumulates* parameter gradients into ``Parameter.grad`` (which
``zero_grad`` resets to ``None``). Parameters and child modules are found from the instance's
attributes in the order they were assigned, which gives stable dotted names (``"0.weight"``).

A subclass that defines ``forward`` and no ``backward`` is a *forward-only* module: its
forward is recorded as it runs and its backward derived (:mod:`anycnn.nn.calls`,
:mod:`anycnn.autograd`). Calling any module, ``module(x)``, returns a
:class:`~anycnn.autograd.Variable` that carries its graph (unless gradients are off:
:func:`anycnn.no_grad`), so ``loss_fn(model(x), y).backward()`` works;
``module.forward(x)`` returns plain arrays.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
from array_api_compat import device

from ..autograd.mode import STATE
from ..autograd.variable import Variable
from ..backend import asarray, dtype_name, get_backend, namespace_of, to_numpy
from ..errors import CheckpointError, ConfigError, ShapeError
from .functional.primitives import add, add_relu
from .modes import eval_mode, preserved_state  # noqa: F401 - re-exported


class Parameter:
    """A trainable array: ``data`` (assign to replace the value), ``grad`` (or ``None``) and
    ``requires_grad`` (default True; False freezes it: no gradient is kept, optimizers leave
    it alone, checkpoints still hold it).

    While a forward-only module's ``forward`` is recorded, ``data`` is the parameter's leaf
    :class:`~anycnn.autograd.Variable` (one per forward pass), through which its gradient
    reaches ``grad`` (a constant when frozen or under ``no_grad``); elsewhere it is the backend
    array.
    """

    __slots__ = ("_data", "_version", "grad", "requires_grad")
    __anycnn_parameter__ = True  # recorded operations use its value
    __array_ufunc__ = None  # NumPy arrays defer to the reflected operators below

    def __init__(self, data: Any, requires_grad: bool = True) -> None:
        self._data = data
        self._version = 0
        self.grad: Any = None
        self.requires_grad = bool(requires_grad)

    @property
    def data(self) -> Any:
        rec = STATE.recording
        if rec is None:
            return self._data
        leaf = rec.leaves.get(id(self))
        if leaf is None:  # a constant when frozen or with gradients off: still a Variable,
            trainable = self.requires_grad and STATE.grad  # so arithmetic stays recorded
            leaf = rec.leaves[id(self)] = Variable(self._data, trainable)
            if trainable:
                leaf.param = self
        return leaf

    @data.setter
    def data(self, value: Any) -> None:
        self._data = value.data if isinstance(value, Variable) else value
        self._version += 1

    @property
    def version(self) -> int:
        """How many times ``data`` has been assigned. Optimizers assign it at every step, also
        when they update the array in place, and so do ``load_state_dict`` and ``to``: what
        eval mode derives from a parameter (BatchNorm folded into a convolution,
        :mod:`anycnn.nn.inference`) is computed again when its version or its array changes.
        After writing into the array yourself (``p.data[...] = v``), assign it
        (``p.data = p.data``) or call ``model.eval()`` again."""
        return self._version

    def accumulate(self, grad: Any) -> None:
        """Add ``grad`` to ``self.grad`` (the first gradient is stored as is); nothing for a
        frozen parameter (``requires_grad`` False)."""
        if self.requires_grad:
            self.grad = grad if self.grad is None else self.grad + grad

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> Any:
        return self.data.dtype

    # Arithmetic uses the value (a recorded leaf inside a forward), as with PyTorch's
    # parameters: ``x * self.scale`` is ``x * self.scale.data``.
    def __add__(self, other: Any) -> Any:
        return self.data + other

    def __radd__(self, other: Any) -> Any:
        return other + self.data

    def __sub__(self, other: Any) -> Any:
        return self.data - other

    def __rsub__(self, other: Any) -> Any:
        return other - self.data

    def __mul__(self, other: Any) -> Any:
        return self.data * other

    def __rmul__(self, other: Any) -> Any:
        return other * self.data

    def __truediv__(self, other: Any) -> Any:
        return self.data / other

    def __rtruediv__(self, other: Any) -> Any:
        return other / self.data

    def __matmul__(self, other: Any) -> Any:
        return self.data @ other

    def __rmatmul__(self, other: Any) -> Any:
        return other @ self.data

    def __neg__(self) -> Any:
        return -self.data

    def __repr__(self) -> str:
        frozen = "" if self.requires_grad else ", requires_grad=False"
        return f"Parameter(shape={self.shape}, dtype={self.dtype}{frozen})"


def make_array(host: np.ndarray, dtype: str) -> Any:
    """Cast host values to ``dtype`` on the host, then copy to the current backend."""
    return asarray(np.asarray(host).astype(dtype), backend=get_backend())


class Module:
    """Base class of layers and containers."""

    training: bool = True
    #: names of non-trainable state arrays saved in checkpoints (e.g. BatchNorm running stats)
    buffer_names: tuple[str, ...] = ()
    #: True for forward-only subclasses (``forward`` and no ``backward``): derived backward
    autodiff: bool = False
    #: kept in eval mode by ``freeze(eval=True)`` whatever ``train()`` says
    eval_pinned: bool = False
    #: what eval mode derives from this module's parameters and buffers (e.g. a BatchNorm2D
    #: folded into the Conv2D before it, :mod:`anycnn.nn.inference`); ``train()`` and
    #: ``eval()`` drop it, so it is computed again at the first forward after either
    _derived: Any = None
    #: training-mode forward passes since the last backward or ``train()`` (containers and
    #: forward-only modules refuse a backward that cannot tell which of several it belongs to)
    _calls: int = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            from .calls import derive_backward, derived_backward, guard_forward

            if cls.backward is Module.backward or cls.backward is derived_backward:
                derive_backward(cls)  # forward only (a subclass of one, too)
            else:
                guard_forward(cls)

    # -- composition ---------------------------------------------------------------------
    def forward(self, x: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dy: Any, input_grad: bool = True) -> Any:  # pragma: no cover
        """Accumulate parameter gradients; return the input gradient (``None`` is allowed when
        ``input_grad`` is False: the caller does not need it, so layers may skip computing it)."""
        raise NotImplementedError

    def forward_add(self, x: Any, addend: Any, relu: bool = False) -> Any:
        """``forward(x) + addend`` (then ``max(., 0)`` with ``relu``): a residual sum, whose
        last layer may add the shortcut's output inside its own pass (``BatchNorm2D`` with the
        compiled kernels); this adds after. Raises :class:`AddendShapeError` when the output
        and ``addend`` differ in shape. The backward is :meth:`backward` of the sum's (already
        ReLU-masked) gradient."""
        return residual_sum(self.forward(x), addend, relu)

    def backward_add(self, dy: Any, addend: Any) -> Any:
        """``backward(dy) + addend``, ``addend`` shaped as the input gradient (a residual sum's
        other gradient). Layers that can start their input gradient from it override this
        (:class:`~anycnn.nn.layers.Conv2D` with the compiled kernels); this adds after."""
        return add_gradients(self.backward(dy), addend)

    def __call__(self, *inputs: Any, **kwargs: Any) -> Any:
        """``forward(*inputs)`` recorded for gradients: the result is a
        :class:`~anycnn.autograd.Variable` carrying its graph (``loss.backward()`` reaches
        every parameter), as in PyTorch. Under :func:`anycnn.no_grad` it is the plain
        ``forward(*inputs)``: use that for inference."""
        if STATE.grad:
            from .calls import recorded_call

            return recorded_call(self, inputs, kwargs)
        return self.forward(*inputs, **kwargs)

    def output_hw(self, hw: tuple[int, int]) -> tuple[int, int] | None:
        """Spatial size ``(H, W)`` of the NHWC output for an NHWC input of spatial size ``hw``;
        None when unknown or when the output is not NHWC (the default). Integer arithmetic on
        the host, used only to explain shape errors (see :func:`spatial_size`)."""
        return None

    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """``(dotted name, Parameter)`` pairs, own parameters first, then children's."""
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
        for name, child in self.named_children():
            yield from child.named_parameters(f"{prefix}{name}.")

    def parameters(self) -> list[Parameter]:
        """The Parameters of :meth:`named_parameters`, in its order (collected without its
        generators and names where no module of the tree overrides it: ``zero_grad`` asks on
        every step)."""
        found: list[Parameter] = []
        _collect_parameters(self, found)
        return found

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, Any]]:
        for name in self.buffer_names:
            yield prefix + name, getattr(self, name)
        for name, child in self.named_children():
            yield from child.named_buffers(f"{prefix}{name}.")

    def modules(self) -> Iterator[Module]:
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    # -- modes and gradients ------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        """Training mode (``mode`` True) or eval mode for this module and its children; parts
        frozen with ``freeze(eval=True)`` stay in eval mode."""
        for m in self.modules():
            m.training = mode and not m.eval_pinned
            m._calls = 0  # a new phase: earlier forwards will not be backpropagated
            if m._derived is not None:
                m._derived = None
        return self

    def freeze(self, eval: bool = False) -> Module:
        """Stop training this module's parameters (``requires_grad = False``): they get no
        gradient, optimizers leave them alone, and a frozen first part of a ``Sequential``
        runs no backward at all. With ``eval=True`` the part also stays in eval mode through
        ``model.train()`` and ``Trainer.fit``: BatchNorm normalises with its running
        statistics and leaves them unchanged, Dropout is off. Returns the module."""
        for p in self.parameters():
            p.requires_grad = False
            p.grad = None
        if eval:
            for m in self.modules():
                m.eval_pinned, m.training = True, False
        return self

    def unfreeze(self) -> Module:
        """Train this module's parameters again (and release ``freeze(eval=True)``; the next
        ``train()`` sets the mode). Returns the module."""
        for p in self.parameters():
            p.requires_grad = True
        for m in self.modules():
            m.eval_pinned = False
        return self

    def eval(self) -> Module:
        return self.train(False)

    def release(self) -> None:
        """Forget the training-mode forward passes not yet backpropagated (a skipped step):
        the next ``backward`` belongs to the next forward. Drops what forward-only modules
        kept for their backward."""
        for m in self.modules():
            m._calls = 0
            if m.autodiff:
                m._graph = None

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Parameters and buffers by dotted name (backend arrays, not copies)."""
        state = {name: p.data for name, p in self.named_parameters()}
        state.update(self.named_buffers())
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> LoadResult:
        """Replace parameters and buffers from ``state`` (host or backend arrays).

        Values are copied onto the current backend keeping each target's dtype. With
        ``strict=False`` (fine-tuning: a new head, a backbone's weights) the names the state
        lacks keep their values and the names the model lacks are ignored; both are returned.
        Nothing is written when an error is raised.

        Returns:
            ``LoadResult(missing, unexpected)``: the model's names absent from ``state``, and
            the state's names absent from the model (both empty when ``strict``).

        Raises:
            CheckpointError: a shape differs (the first mismatching tensor and both shapes
                are named); with ``strict``, also a name missing or unexpected.
        """
        own = self.state_dict()
        missing = [name for name in own if name not in state]
        unexpected = [name for name in state if name not in own]
        for name, target in own.items():  # in order: the first mismatch is named
            if name not in state:
                if strict:
                    raise CheckpointError(
                        f"tensor {name!r} (shape {tuple(target.shape)}) is missing from the "
                        "state: it was saved from a different model "
                        "(load_state_dict(..., strict=False) keeps such tensors)")
            elif tuple(state[name].shape) != tuple(target.shape):
                raise CheckpointError(
                    f"tensor {name!r} has shape {tuple(state[name].shape)} in the state but "
                    f"{tuple(target.shape)} in the model: it was saved from a different model")
        if strict and unexpected:
            raise CheckpointError(f"the state has tensors the model lacks: {unexpected[:5]} "
                                  "(load_state_dict(..., strict=False) ignores them)")
        params = dict(self.named_parameters())
        for name, target in own.items():
            if name not in state:
                continue
            new = _like(target, to_numpy(state[name]))
            if name in params:
                params[name].data = new
            else:
                owner, attr = self._locate(name)
                setattr(owner, attr, new)
        return LoadResult(missing, unexpected)

    def _locate(self, dotted: str) -> tuple[Module, str]:
        *path, attr = dotted.split(".")
        owner: Module = self
        for part in path:
            owner = getattr(owner, part)
        return owner, attr

    def to(self, dtype: str) -> Module:
        """Cast every floating parameter and buffer to ``dtype`` (``"float32"``/``"float64"``).

        Raises:
            ConfigError: anything but a float dtype name (devices follow the backend:
                ``anycnn.use_backend``)."""
        if dtype not in ("float32", "float64", "float16"):
            raise ConfigError(f"Module.to takes a dtype name, 'float32' or 'float64', got "
                              f"{dtype!r}; the device follows the backend (ANYCNN_BACKEND, "
                              "anycnn.use_backend)")
        for m in self.modules():
            for value in vars(m).values():
                if isinstance(value, Parameter):
                    value.data = _cast(value.data, dtype)
                    value.grad = None
            for name in m.buffer_names:
                setattr(m, name, _cast(getattr(m, name), dtype))
        return self

    def extra_repr(self) -> str:
        return ""

    # -- inspection ----------------------------------------------------------------------
    def flops(self, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
        """Forward FLOPs of this module's *own* computation (its children are counted by
        themselves) for one call on an input of ``input_shape`` giving ``output_shape`` (both
        with the batch axis; the count is for the whole batch). Counted: 2 per multiply-add of
        the matrix products (convolutions, dense layers); elementwise work (bias, activations,
        pooling, normalisation) counts 0. Default 0; :func:`anycnn.summary` sums the tree."""
        return 0

    def summary(self, input_shape: tuple[int, ...], print_fn: Any = print) -> None:
        """Print the layer table of :func:`anycnn.summary` for per-image
        ``input_shape`` (e.g. ``(28, 28, 1)``, no batch axis) with ``print_fn``."""
        from .summarize import summary

        print_fn(str(summary(self, input_shape)))

    def __repr__(self) -> str:
        children = list(self.named_children())
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        inner = "\n".join(f"  ({n}): " + repr(c).replace("\n", "\n  ") for n, c in children)
        return f"{type(self).__name__}(\n{inner}\n)"


class LoadResult(NamedTuple):
    """What :meth:`Module.load_state_dict` did not match: the model's tensors the state lacks
    (``missing``) and the state's tensors the model lacks (``unexpected``), by dotted name."""

    missing: list[str]
    unexpected: list[str]


class AddendShapeError(ShapeError):
    """:meth:`Module.forward_add`'s output and addend differ in shape (``shape``: the
    output's; the caller, e.g. a ``Residual``, says what that means)."""

    def __init__(self, shape: tuple[int, ...], addend: tuple[int, ...]) -> None:
        super().__init__(f"output {shape} cannot be added to {addend}")
        self.shape = shape


def check_addend(shape: Any, addend: Any) -> None:
    """Raise :class:`AddendShapeError` unless ``addend`` has ``shape``."""
    if tuple(shape) != tuple(addend.shape):
        raise AddendShapeError(tuple(shape), tuple(addend.shape))


def residual_sum(y: Any, addend: Any, relu: bool) -> Any:
    """``y + addend``, then ``max(., 0)`` with ``relu`` (shapes checked)."""
    check_addend(y.shape, addend)
    namespace_of(y, addend)  # one backend, one device
    return add_relu(y, addend, relu)


def add_gradients(dx: Any, addend: Any) -> Any:
    """``dx + addend`` (two gradients of one input: a new array)."""
    namespace_of(dx, addend)  # one backend, one device
    return add(dx, addend)


def spatial_size(modules: list[Module], hw: tuple[int, int]) -> tuple[int, int] | None:
    """Spatial size ``(H, W)`` after ``modules``, applied in order, for an NHWC input of spatial
    size ``hw`` (from each one's :meth:`Module.output_hw`); None when one of them cannot tell or
    a size falls below 1."""
    for module in modules:
        hw = module.output_hw(hw)
        if hw is None or min(hw) < 1:
            return None
    return hw


def _like(target: Any, host: np.ndarray) -> Any:
    """``host`` as an array of ``target``'s backend, device and dtype."""
    xp = namespace_of(target)
    host = np.ascontiguousarray(host.astype(dtype_name(target)))
    return xp.asarray(host, device=device(target))


def _cast(array: Any, dtype: str) -> Any:
    xp = namespace_of(array)
    if not xp.isdtype(array.dtype, "real floating"):
        return array
    return xp.astype(array, getattr(xp, dtype))


def _collect_parameters(module: Module, found: list[Parameter]) -> None:
    """Append ``module.parameters()`` to ``found``: own ones first, then each child's, as
    :meth:`Module.named_parameters` yields them (which a module overriding it is asked)."""
    kind = type(module)
    if (kind.named_parameters is not Module.named_parameters
            or kind.named_children is not Module.named_children):
        found.extend(p for _, p in module.named_parameters())
        return
    children = []
    for value in vars(module).values():
        if isinstance(value, Parameter):
            found.append(value)
        elif isinstance(value, Module):
            children.append(value)
    for child in children:
        _collect_parameters(child, found)
