"""ONNX export of modules written as code (forward-only modules): one forward pass is traced
(:func:`anycnn.autograd.mode.tracing`) and each recorded operation written as standard ONNX
operators; the modules it calls are exported by :mod:`anycnn.io.onnx` as usual (a ``Conv2D``
is a ``Conv``), nested forward-only modules are part of the trace.

The traced code sees anycnn's layouts: NHWC images, ``(N, features)`` rows. Its input is
transposed from the graph's NCHW once, each mapped module it calls gets NCHW and gives back
NHWC through a ``Transpose`` pair (onnxruntime folds adjacent pairs), and a 4-D output goes
back to NCHW. The batch axis stays dynamic: the trace runs on a batch of one, and a shape
argument whose first entry is that batch (``reshape``, ``broadcast_to``) keeps the input's
batch instead (``0`` for ``Reshape``, ``1`` for ``Expand``). Operations with no ONNX form here
(indexing with masks, or functions outside :data:`SUPPORTED`) raise a ``ConfigError`` naming
the operation and the module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import device

from ..autograd.mode import enable_grad, recording, tracing
from ..autograd.variable import Variable
from ..backend import namespace_of, to_numpy
from ..errors import ConfigError
from ..nn.module import Module

_BINARY = {"add": "Add", "subtract": "Sub", "multiply": "Mul", "divide": "Div", "pow": "Pow",
           "maximum": "Max", "minimum": "Min", "matmul": "MatMul", "__gt__": "Greater",
           "__lt__": "Less", "__ge__": "GreaterOrEqual", "__le__": "LessOrEqual",
           "__eq__": "Equal", "__and__": "And", "__or__": "Or", "__xor__": "Xor"}
_UNARY = {"negative": "Neg", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "tanh": "Tanh",
          "abs": "Abs", "sin": "Sin", "cos": "Cos", "__invert__": "Not"}
_REDUCE = {"sum": "ReduceSum", "mean": "ReduceMean", "max": "ReduceMax", "min": "ReduceMin"}
#: operation names this exporter writes (besides the calls of mapped modules)
SUPPORTED = tuple(sorted({*_BINARY, *_UNARY, *_REDUCE, "square", "expm1", "log1p", "where",
                          "clip", "astype", "reshape", "permute_dims", "matrix_transpose",
                          "expand_dims", "squeeze", "flip", "concat", "stack", "broadcast_to",
                          "getitem", "__ne__"}))
_BIG = np.iinfo(np.int64).max


def emit_code(b: Any, module: Module, v: Any, prefix: str, like: Any) -> Any:
    """Append the nodes computing the forward-only ``module`` on the graph value ``v``;
    return its output value (see the module docstring)."""
    from .onnx import _natural, _scope, _Value

    scope = _scope(prefix)
    x_name = _natural(b, v, scope).name
    if v.spatial:
        x_name = b.node("Transpose", [x_name], scope, perm=[0, 2, 3, 1])
    xp = namespace_of(like)
    x = xp.asarray(np.ascontiguousarray(v.sample), device=device(like))
    try:
        with enable_grad(), tracing() as entries, recording():
            leaf = Variable(x, True)
            out = module.forward(leaf)
    except (TypeError, ValueError, AttributeError) as exc:  # what its code does with a trace
        raise ConfigError(f"layer {scope} ({type(module).__name__}): tracing its forward for "
                          f"ONNX failed ({type(exc).__name__}: {exc})") from None
    if not isinstance(out, Variable):
        raise ConfigError(f"layer {scope} ({type(module).__name__}): its forward returned a "
                          f"{type(out).__name__} not computed from its input with the Array "
                          "API (through NumPy, or several outputs), so it cannot be traced "
                          "for ONNX")
    writer = _Writer(b, module, prefix, like)
    writer.names[id(leaf)] = x_name
    for entry in _live(entries, out):
        writer.write(entry)
    y = writer.name_of(out)
    if out.ndim == 4:
        y = b.node("Transpose", [y], scope, perm=[0, 3, 1, 2])
    return _Value(y, to_numpy(out.data))


def _live(entries: list, out: Variable) -> list:
    """The entries the output depends on, in order. A trace also holds operations whose
    results are not used: the inner operations of a forward-only module that a mapped
    container called from this code runs (that call is one entry of its own, exported as the
    container), and any dead code of the forward; writing them would add unused nodes and
    constants of their inputs."""
    needed, keep = {id(out)}, []
    for entry in reversed(entries):
        if any(id(o) in needed for o in entry.outputs):
            keep.append(entry)
            needed.update(id(a) for a in entry.inputs if isinstance(a, Variable))
    return keep[::-1]


class _Writer:
    """Writes traced entries as nodes, knowing each Variable's graph name."""

    def __init__(self, b: Any, module: Module, prefix: str, like: Any) -> None:
        from .onnx import _scope

        self.b, self.module, self.prefix, self.like = b, module, prefix, like
        self.scope = _scope(prefix)
        self.names: dict[int, str] = {}
        self.params = {id(p): name for name, p in module.named_parameters()}
        self.paths: dict[int, str] = {}
        self._walk(module, "")

    def _walk(self, module: Module, path: str) -> None:
        for name, child in module.named_children():
            self.paths.setdefault(id(child), f"{path}{name}")
            self._walk(child, f"{path}{name}.")

    def fail(self, what: str) -> ConfigError:
        return ConfigError(f"layer {self.scope} ({type(self.module).__name__}): {what} has no "
                           f"ONNX form in anycnn's export of modules written as code "
                           f"(supported: module calls and {', '.join(SUPPORTED)})")

    # -- names of inputs -------------------------------------------------------------------
    def name_of(self, value: Any, like: Any = None) -> str:
        if isinstance(value, Variable):
            key = id(value)
            if key not in self.names:  # a parameter, or a constant made outside the trace
                base = self.params.get(id(value.param), "const")
                self.names[key] = self.b.const(f"{self.scope}/{base}", to_numpy(value.data))
            return self.names[key]
        if hasattr(value, "shape"):
            return self.b.const(f"{self.scope}/const", to_numpy(value))
        dtype = to_numpy(like.data).dtype if isinstance(like, Variable) else self.b.dtype
        if isinstance(value, bool):
            dtype = np.bool_
        return self.b.const(f"{self.scope}/scalar", np.asarray(value, dtype=dtype))

    def ints(self, values: Any) -> str:
        return self.b.ints(f"{self.scope}/ints", [int(v) for v in values])

    def node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        return self.b.node(op, inputs, self.scope, **attrs)

    # -- entries ---------------------------------------------------------------------------
    def write(self, e: Any) -> None:
        out = e.outputs[0]
        if "module" in e.attrs:
            self.names[id(out)] = self._module_call(e.attrs["module"], e.inputs[0])
            return
        first = next((a for a in e.inputs if isinstance(a, Variable)), None)
        args = [self.name_of(a, first) if a is not None else "" for a in e.inputs]
        self.names[id(out)] = self._operation(e, args, first)

    def _module_call(self, child: Module, x: Variable) -> str:
        from .onnx import _emit, _natural, _Value

        name = self.name_of(x)
        sample = to_numpy(x.data)
        if sample.ndim == 4:
            name = self.node("Transpose", [name], perm=[0, 3, 1, 2])
        path = self.paths.get(id(child))
        if path is None:
            raise self.fail(f"a call of {type(child).__name__}, which is not one of its "
                            "attributes,")
        y = _natural(self.b, _emit(self.b, child, _Value(name, sample), f"{self.prefix}{path}.",
                                   self.like), self.scope)
        return self.node("Transpose", [y.name], perm=[0, 2, 3, 1]) if y.spatial else y.name

    def _operation(self, e: Any, args: list[str], first: Variable | None) -> str:
        name, attrs, b = e.name, e.attrs, self.b
        if name in _BINARY:
            return self.node(_BINARY[name], args)
        if name == "__ne__":
            return self.node("Not", [self.node("Equal", args)])
        if name in _UNARY:
            return self.node(_UNARY[name], args[:1])
        if name == "square":
            return self.node("Mul", [args[0], args[0]])
        if name == "expm1":
            return self.node("Sub", [self.node("Exp", args[:1]), self.name_of(1.0, first)])
        if name == "log1p":
            return self.node("Log", [self.node("Add", [args[0], self.name_of(1.0, first)])])
        if name == "where":
            return self.node("Where", args)
        if name == "clip":
            bounds = [self.name_of(attrs[k], first) if attrs[k] is not None else ""
                      for k in ("min", "max")]
            return self.node("Clip", [args[0], *bounds])
        if name == "astype":
            dtype = np.dtype(str(to_numpy(e.outputs[0].data).dtype))
            return self.node("Cast", args[:1],
                             to=b.onnx.helper.np_dtype_to_tensor_dtype(dtype))
        if name in _REDUCE:
            keep = int(bool(attrs["keepdims"]))
            if name == "sum" or b.opset >= 18:
                return self.node(_REDUCE[name], [args[0], self.ints(attrs["axes"])],
                                 keepdims=keep)
            return self.node(_REDUCE[name], args[:1], axes=list(attrs["axes"]), keepdims=keep)
        if name in ("reshape", "broadcast_to"):
            shape = list(attrs["shape"])
            batch = int(first.shape[0]) if first is not None and first.ndim else None
            if shape and batch is not None and shape[0] == batch:
                shape[0] = 0 if name == "reshape" else 1  # the input's own batch
            return self.node("Reshape" if name == "reshape" else "Expand",
                             [args[0], self.ints(shape)])
        if name in ("permute_dims", "matrix_transpose"):
            perm = list(attrs["axes"]) if name == "permute_dims" else [
                *range(first.ndim - 2), first.ndim - 1, first.ndim - 2]
            return self.node("Transpose", args[:1], perm=perm)
        if name == "expand_dims":
            return self.node("Unsqueeze", [args[0], self.ints([attrs["axis"]])])
        if name == "squeeze":
            return self.node("Squeeze", [args[0], self.ints(attrs["axes"])])
        if name == "flip":
            axes = list(attrs["axes"])
            return self.node("Slice", [args[0], self.ints([-1] * len(axes)),
                                       self.ints([-_BIG] * len(axes)), self.ints(axes),
                                       self.ints([-1] * len(axes))])
        if name == "concat":
            return self.node("Concat", args, axis=attrs["axis"])
        if name == "stack":
            axis = self.ints([attrs["axis"]])
            return self.node("Concat", [self.node("Unsqueeze", [a, axis]) for a in args],
                             axis=attrs["axis"])
        if name == "getitem":
            return self._getitem(args[0], first, attrs["key"])
        raise self.fail(f"the operation {name!r}")

    def _getitem(self, x: str, a: Variable, key: tuple) -> str:
        """Basic indexing (ints, slices, None, ``...``) as one Slice, then Squeeze of the
        integer axes and Unsqueeze of the new ones."""
        if any(hasattr(k, "shape") for k in key):
            raise self.fail("indexing with an array")
        real = [k for k in key if k is not None and k is not Ellipsis]
        if Ellipsis in key:
            at = key.index(Ellipsis)
            fill = [slice(None)] * (a.ndim - len(real))
            key = (*key[:at], *fill, *key[at + 1:])
        starts, ends, axes, steps, dropped, new = [], [], [], [], [], []
        axis = out_axis = 0
        for k in key:
            if k is None:
                new.append(out_axis)
                out_axis += 1
                continue
            if isinstance(k, slice):
                step = 1 if k.step is None else int(k.step)
                start = k.start if k.start is not None else (0 if step > 0 else -1)
                stop = k.stop if k.stop is not None else (_BIG if step > 0 else -_BIG)
                if (start, stop, step) != (0, _BIG, 1):
                    starts.append(int(start))
                    ends.append(int(stop))
                    axes.append(axis)
                    steps.append(step)
                out_axis += 1
            else:
                i = int(k)
                starts.append(i)
                ends.append(i + 1 if i != -1 else _BIG)
                axes.append(axis)
                steps.append(1)
                dropped.append(axis)
            axis += 1
        if axes:
            x = self.node("Slice", [x, self.ints(starts), self.ints(ends), self.ints(axes),
                                    self.ints(steps)])
        if dropped:
            x = self.node("Squeeze", [x, self.ints(dropped)])
        if new:
            x = self.node("Unsqueeze", [x, self.ints(new)])
        return x
