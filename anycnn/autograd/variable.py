"""The :class:`Variable` (an array with its history) and reverse-mode differentiation.

A Variable wraps one backend array (``data``: NumPy, CuPy, torch, JAX or array_api_strict) and,
when it was computed from Variables that need gradients, the :class:`Node` that computed it.
Operations on Variables (Python operators, the functions of ``namespace_of(v)``, calls of
modules) build the graph as they run (define-by-run, as Chainer and PyTorch). Its
:meth:`Variable.backward` (or :func:`backward`) walks the graph once in reverse topological
order: each node's vector-Jacobian product gets the gradient of its outputs and gives those of
its inputs; gradients meeting at one Variable add up. A parameter's leaf adds its gradient to
``Parameter.grad``; another leaf made with ``requires_grad=True`` keeps it in ``.grad``.

A node frees what it saved once its backward ran: a graph is backpropagated once (a second
backward through it raises), like PyTorch without ``retain_graph``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..backend import namespace_of
from .mode import STATE

#: ``vjp(output_grads, needs) -> input grads``: ``output_grads`` is the one output's gradient
#: (a tuple with None for outputs no gradient reached, for a node of several outputs);
#: ``needs[i]`` says whether input ``i`` wants its gradient (None may be returned otherwise).
VJP = Callable[[Any, tuple[bool, ...]], Sequence[Any]]


class Node:
    """One recorded operation: its inputs (``parents``: Variable or None for each argument
    that is no Variable needing a gradient), its vector-Jacobian product and its number of
    outputs. ``grads`` collects the outputs' gradients during a backward pass."""

    __slots__ = ("grads", "n_out", "name", "needs", "parents", "takes_addend", "vjp")

    def __init__(self, parents: tuple[Variable | Edge | None, ...], vjp: VJP, n_out: int,
                 name: str) -> None:
        self.parents, self.vjp, self.n_out, self.name = parents, vjp, n_out, name
        self.grads: list[Any] | None = None
        self.needs: tuple[bool, ...] = ()
        #: the vjp takes ``addend=``: the gradient its first input already has, to add to
        #: the one it computes inside its own pass (a convolution starts its sums from it)
        self.takes_addend = False

    def __repr__(self) -> str:
        return f"<Node {self.name}>"


class Variable:
    """An array and how it was computed, for gradients.

    Args:
        data: a backend array (a Variable is unwrapped).
        requires_grad: keep this leaf's gradient in :attr:`grad` after a backward pass.

    Attributes:
        data: the array. ``shape``, ``ndim``, ``dtype``, ``device`` and ``size`` are its.
        grad: a leaf's accumulated gradient (None before any).
        requires_grad: whether gradients flow to (or through) this Variable.

    Use it as an array: Python operators (``+ - * / ** @``, unary ``-``, comparisons, which
    give masks without gradients, and indexing with ints, slices, ``None``, ``...`` and
    boolean masks) and the functions of its namespace (``xp = anycnn.namespace_of(v)``).
    """

    __slots__ = (
        "__weakref__",
        "creator",
        "data",
        "grad",
        "index",
        "param",
        "requires_grad",
        "xp",
    )
    __anycnn_variable__ = True  # anycnn.to_numpy and friends unwrap it

    def __init__(self, data: Any, requires_grad: bool = False) -> None:
        if isinstance(data, Variable):
            data = data.data
        self.data = data
        self._start(namespace_of(data), requires_grad)

    def _start(self, xp: Any, requires_grad: bool) -> None:
        """No history yet: a leaf of namespace ``xp``."""
        self.xp = xp
        self.creator: Node | None = None
        self.index = 0
        self.requires_grad = bool(requires_grad)
        self.grad: Any = None
        self.param: Any = None  # the Parameter whose leaf this is

    # -- array attributes ----------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self) -> Any:
        return self.data.dtype

    @property
    def device(self) -> Any:
        from array_api_compat import device

        return device(self.data)

    @property
    def size(self) -> int | None:
        return self.data.size if not callable(self.data.size) else self.data.numel()

    @property
    def T(self) -> Variable:
        if self.ndim != 2:
            raise ValueError(f".T needs a 2-D array, got shape {tuple(self.shape)}; use .mT")
        return self.xp_recording.permute_dims(self, (1, 0))

    @property
    def mT(self) -> Variable:
        return self.xp_recording.matrix_transpose(self)

    @property
    def xp_recording(self) -> Any:
        from .namespace import recording_namespace

        return recording_namespace(self.xp)

    def __array_namespace__(self, api_version: str | None = None) -> Any:
        return self.xp_recording

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        host = self.host()
        return host if dtype is None else host.astype(dtype)

    def host(self) -> Any:
        """A NumPy copy of the array (``anycnn.to_numpy`` and ``np.asarray`` call this).

        Raises:
            TypeError: inside a recorded forward, for a Variable that needs a gradient: the
                host copy would leave the graph, and the gradient would be cut silently.
        """
        if self.requires_grad and STATE.recording is not None:
            raise TypeError(
                "a Variable that needs a gradient was copied to NumPy inside a recorded "
                "forward: the gradient would stop there. Compute with its namespace (xp = "
                "anycnn.namespace_of(x); xp.mean(x, ...)); use x.detach() where no gradient "
                "should flow")
        from ..backend import to_numpy

        return to_numpy(self.data)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        """NumPy's ufuncs on Variables: the differentiable ones are recorded (``np.exp(v)``,
        ``array + v``), comparisons give masks; any other raises instead of leaving the
        graph."""
        name = _UFUNCS.get(ufunc.__name__)
        if method != "__call__" or kwargs or name is None:
            raise TypeError(f"np.{ufunc.__name__} on a Variable would leave its graph: use its "
                            f"namespace (xp = anycnn.namespace_of(v)) instead")
        if name.startswith("__"):
            first, other = inputs
            if not isinstance(first, Variable):  # array < v is v > array
                return _constant(other, first, _SWAPPED.get(name, name))
            return _constant(first, other, name)
        ops = _ops()
        if name in ops._UNARY:
            return ops.unary(name, *inputs)
        return getattr(ops, name)(*inputs)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Variable({self.data!r}{grad})"

    def __len__(self) -> int:
        return int(self.shape[0])

    def __bool__(self) -> bool:
        return bool(self.data)

    def __float__(self) -> float:
        return float(self.data)

    def __int__(self) -> int:
        return int(self.data)

    def __index__(self) -> int:
        return int(self.data)

    def item(self) -> float:
        return float(self.data)

    def __format__(self, spec: str) -> str:
        """A single value formats as a float (``f"{loss:.3f}"``), anything else as text."""
        if spec and self.size in (1, None) and self.ndim == 0:
            return format(float(self.data), spec)
        return format(str(self), spec)

    # a few PyTorch-style methods, each the namespace function of the same name
    def sum(self, axis: Any = None, keepdims: bool = False) -> Variable:
        return self.xp_recording.sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis: Any = None, keepdims: bool = False) -> Variable:
        return self.xp_recording.mean(self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape: Any) -> Variable:
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple | list) else shape
        return self.xp_recording.reshape(self, tuple(shape))

    def numpy(self) -> Any:
        """:meth:`host` (a NumPy copy)."""
        return self.host()

    def detach(self) -> Variable:
        """The same array with no history (a constant)."""
        return Variable(self.data)

    # -- differentiation ----------------------------------------------------------------
    def backward(self, grad: Any = None) -> None:
        """Backpropagate from this Variable: every parameter it depends on gets its gradient
        added to ``Parameter.grad``. ``grad`` is the gradient of this Variable (default 1 for
        a single value, as a loss)."""
        backward([self], [grad])

    # -- operators (see anycnn.autograd.ops) -------------------------------------------
    def __add__(self, other):
        return _ops().add(self, other)
    def __radd__(self, other):
        return _ops().add(other, self)
    def __sub__(self, other):
        return _ops().subtract(self, other)
    def __rsub__(self, other):
        return _ops().subtract(other, self)
    def __mul__(self, other):
        return _ops().multiply(self, other)
    def __rmul__(self, other):
        return _ops().multiply(other, self)
    def __truediv__(self, other):
        return _ops().divide(self, other)
    def __rtruediv__(self, other):
        return _ops().divide(other, self)
    def __pow__(self, other):
        return _ops().pow(self, other)
    def __rpow__(self, other):
        return _ops().pow(other, self)
    def __matmul__(self, other):
        return _ops().matmul(self, other)
    def __rmatmul__(self, other):
        return _ops().matmul(other, self)
    def __neg__(self):
        return _ops().negative(self)
    def __pos__(self):
        return self
    def __abs__(self):
        return _ops().abs(self)
    def __getitem__(self, key):
        return _ops().getitem(self, key)

    # masks and integer results: no gradient
    def __lt__(self, other):
        return _constant(self, other, "__lt__")
    def __le__(self, other):
        return _constant(self, other, "__le__")
    def __gt__(self, other):
        return _constant(self, other, "__gt__")
    def __ge__(self, other):
        return _constant(self, other, "__ge__")
    def __eq__(self, other):
        return _constant(self, other, "__eq__")
    def __ne__(self, other):
        return _constant(self, other, "__ne__")
    def __and__(self, other):
        return _constant(self, other, "__and__")
    def __or__(self, other):
        return _constant(self, other, "__or__")
    def __xor__(self, other):
        return _constant(self, other, "__xor__")
    def __invert__(self):
        return _constant(self, None, "__invert__")
    def __floordiv__(self, other):
        return _constant(self, other, "__floordiv__")
    def __mod__(self, other):
        return _constant(self, other, "__mod__")

    __hash__ = object.__hash__


class Deferred(Variable):
    """A Variable whose array is computed when first needed: a module call whose last pass may
    still take in the operation that consumes it (a BatchNorm that adds a residual and applies
    the block's ReLU inside its normalising pass). ``make()`` computes it on its own (a
    recorded Variable); a consumer that fuses it calls its own recipe instead and marks it
    :attr:`absorbed`. Shape, dtype and device are known without computing it.
    """

    __slots__ = ("_array", "_dtype", "_shape", "absorbed", "make", "plan")

    def __init__(self, make: Callable[[], Variable], like: Any, plan: Any = None) -> None:
        self._array: Any = None
        self.make, self.plan, self.absorbed = make, plan, False
        self._shape, self._dtype = tuple(like.shape), like.dtype
        self._start(namespace_of(like), True)

    @property
    def pending(self) -> bool:
        """Not computed yet."""
        return self._array is None

    @property
    def data(self) -> Any:  # type: ignore[override]
        if self._array is None:
            made = self.make()
            self._array, self.creator, self.index = made.data, made.creator, made.index
            self.requires_grad = made.requires_grad
        return self._array

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def ndim(self) -> int:
        return len(self._shape)

    @property
    def dtype(self) -> Any:
        return self._dtype


#: NumPy ufunc name -> the recorder's operation (or comparison method)
_UFUNCS = {"add": "add", "subtract": "subtract", "multiply": "multiply", "divide": "divide",
           "true_divide": "divide", "power": "pow", "matmul": "matmul", "negative": "negative",
           "maximum": "maximum", "minimum": "minimum", "absolute": "abs", "exp": "exp",
           "log": "log", "sqrt": "sqrt", "tanh": "tanh", "sin": "sin", "cos": "cos",
           "square": "square", "expm1": "expm1", "log1p": "log1p", "greater": "__gt__",
           "less": "__lt__", "greater_equal": "__ge__", "less_equal": "__le__",
           "equal": "__eq__", "not_equal": "__ne__"}
_SWAPPED = {"__gt__": "__lt__", "__lt__": "__gt__", "__ge__": "__le__", "__le__": "__ge__"}


def _ops():
    from . import ops

    return ops


def _constant(a: Variable, other: Any, method: str) -> Variable:
    """``a <method> other`` with no gradient (masks, integer results); traced all the same."""
    value = getattr(a.data, method)() if other is None else getattr(a.data, method)(unwrap(other))
    out = Variable(value)
    if STATE.trace is not None:
        STATE.trace.append(TraceEntry(method, (a, other), (out,), {}))
    return out


def is_array(value: Any) -> bool:
    """Whether ``value`` is an array (of any backend, or a Variable), not a scalar or a type."""
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, type)


def as_variable(value: Any) -> Any:
    """An array as a constant Variable; Variables and everything else unchanged."""
    return Variable(value) if is_array(value) and not isinstance(value, Variable) else value


def unwrap(value: Any) -> Any:
    """The array inside a Variable; other values (arrays, scalars, None) as they are."""
    return value.data if isinstance(value, Variable) else value


def unwrap_tree(value: Any) -> Any:
    """:func:`unwrap` through tuples and lists (a module's several outputs)."""
    if isinstance(value, tuple | list):
        return type(value)(unwrap_tree(v) for v in value)
    return unwrap(value)


def needs_grad(value: Any) -> bool:
    return isinstance(value, Variable) and value.requires_grad


def record(value: Any, inputs: Sequence[Any], vjp: VJP, name: str,
           attrs: dict[str, Any] | None = None) -> Variable:
    """The Variable of ``value``, computed from ``inputs`` (Variables or anything else) by an
    operation whose vector-Jacobian product is ``vjp``; a constant when no input needs a
    gradient or grad mode is off. ``attrs`` (the operation's other arguments: ``axis``,
    ``shape``...) are kept only while a trace is taken (:func:`~.mode.tracing`)."""
    return record_many((value,), inputs, vjp, name, attrs)[0]


def record_many(values: Sequence[Any], inputs: Sequence[Any], vjp: VJP, name: str,
                attrs: dict[str, Any] | None = None) -> tuple[Variable, ...]:
    """:func:`record` for an operation with several outputs (``vjp`` gets a tuple)."""
    parents = tuple(_edge(a) if needs_grad(a) else None for a in inputs)
    if not STATE.grad or not any(p is not None for p in parents):
        outs = tuple(Variable(v) for v in values)
    else:
        node = Node(parents, vjp, len(values), name)
        outs = []
        for i, v in enumerate(values):
            out = Variable(v, True)
            out.creator, out.index = node, i
            outs.append(out)
        outs = tuple(outs)
    if STATE.trace is not None:
        STATE.trace.append(TraceEntry(name, tuple(inputs), outs, attrs or {}))
    return outs


class Edge:
    """A node's link to an input computed by another node: that node and the output's index,
    not the Variable itself, so that an intermediate array nobody saved for a backward is
    freed as soon as the code drops it (leaves are linked as themselves)."""

    __slots__ = ("creator", "index")
    requires_grad = True
    param = None

    def __init__(self, creator: Node, index: int) -> None:
        self.creator, self.index = creator, index


def _edge(v: Variable) -> Variable | Edge:
    return v if v.creator is None else Edge(v.creator, v.index)


class TraceEntry:
    """One operation of a traced forward pass (:func:`~.mode.tracing`): what an exporter
    needs to write it elsewhere (ONNX): the operation's name, its inputs (Variables, arrays or
    scalars), its output Variables and its other arguments."""

    __slots__ = ("attrs", "inputs", "name", "outputs")

    def __init__(self, name: str, inputs: tuple, outputs: tuple, attrs: dict[str, Any]) -> None:
        self.name, self.inputs, self.outputs, self.attrs = name, inputs, outputs, attrs


def backward(outputs: Sequence[Variable], grads: Sequence[Any]) -> None:
    """Backpropagate ``grads`` (one per output; None is 1 for a single-valued output) through
    the graph that computed ``outputs``: parameters' leaves add to ``Parameter.grad``, other
    leaves that require a gradient to their ``.grad``.

    Raises:
        RuntimeError: no output needs a gradient, a None grad for an output of several values,
            or the graph was already backpropagated (its saved arrays are freed).
    """
    seeds = []
    for out, g in zip(outputs, grads):
        if not isinstance(out, Variable) or not out.requires_grad:
            continue
        if g is None:
            if out.size not in (1, None):
                raise RuntimeError(f"backward() of an output of shape {tuple(out.shape)} needs "
                                   "its gradient: pass one of the same shape (only a single "
                                   "value, such as a loss, defaults to 1)")
            g = out.xp.ones_like(out.data)
        elif tuple(g.shape) != tuple(out.shape):
            raise RuntimeError(f"gradient of shape {tuple(g.shape)} given for an output of "
                               f"shape {tuple(out.shape)}")
        seeds.append((out, unwrap(g)))
    if not seeds:
        raise RuntimeError("backward(): the output does not depend on anything that needs a "
                           "gradient (every parameter is frozen, or it was computed under "
                           "no_grad or in eval mode of a plain call)")
    order = _topological([out.creator for out, _ in seeds if out.creator is not None])
    for node in order:  # inputs first: which inputs lead to a leaf that wants a gradient
        node.needs = tuple(p is not None and (any(p.creator.needs) if p.creator is not None
                                              else p.requires_grad)
                           for p in node.parents)
    for out, g in seeds:
        _deliver(out, g)
    for node in reversed(order):
        gs, node.grads = node.grads, None
        if gs is None or not any(node.needs):
            continue
        if node.vjp is None:
            raise RuntimeError(f"backward through the graph of {node.name} a second time: a "
                               "forward pass is backpropagated once (its saved arrays are "
                               "freed); run the forward pass again")
        vjp, node.vjp = node.vjp, None
        g = gs[0] if node.n_out == 1 else tuple(gs)
        addend = _pending_gradient(node.parents[0]) if node.takes_addend and node.needs[0] else None
        input_grads = vjp(g, node.needs) if addend is None else vjp(g, node.needs, addend=addend)
        for parent, need, g in zip(node.parents, node.needs, input_grads):
            if need and g is not None:
                _deliver(parent, g)


def _pending_gradient(v: Variable) -> Any:
    """Take the gradient that has reached ``v`` so far out of its creator's slot (None when
    none has, or ``v`` is a leaf): the next gradient of ``v`` is computed with it added."""
    node = v.creator
    if node is None or node.grads is None:
        return None
    g, node.grads[v.index] = node.grads[v.index], None
    return g


def _deliver(v: Variable, g: Any) -> None:
    """Add gradient ``g`` to what reaches ``v``: its creator's slot, a parameter, or a leaf."""
    node = v.creator
    if node is not None:
        if node.grads is None:
            node.grads = [None] * node.n_out
        old = node.grads[v.index]
        node.grads[v.index] = g if old is None else add_arrays(old, g)
    elif v.param is not None:
        v.param.accumulate(g)
    elif v.requires_grad:
        v.grad = g if v.grad is None else add_arrays(v.grad, g)


def add_arrays(a: Any, b: Any) -> Any:
    """``a + b``: a new array, through the kernels' ``add_relu`` where one takes it (NumPy:
    split over the threads), else the operator."""
    from ..kernels.dispatch import DECLINE, attempt

    if hasattr(a, "shape") and hasattr(b, "shape") and a.shape == b.shape:
        out = attempt("add_relu", a, b, relu=False)
        if out is not DECLINE:
            return out
    return a + b


def _topological(roots: list[Node]) -> list[Node]:
    """The nodes ``roots`` depend on, each after all nodes it depends on."""
    order: list[Node] = []
    seen: set[int] = set()
    for root in roots:
        if id(root) in seen:
            continue
        seen.add(id(root))
        stack = [(root, iter(root.parents))]
        while stack:
            node, parents = stack[-1]
            for p in parents:
                if p is not None and p.creator is not None and id(p.creator) not in seen:
                    seen.add(id(p.creator))
                    stack.append((p.creator, iter(p.creator.parents)))
                    break
            else:
                stack.pop()
                order.append(node)
    for node in order:
        node.needs = ()
    return order
