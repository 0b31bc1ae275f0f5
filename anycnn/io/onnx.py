"""ONNX export: an anycnn model as an ONNX graph of standard operators.

:func:`export_onnx` writes one ``.onnx`` file that onnxruntime (or any ONNX runtime) runs with
its own kernels: every layer maps to the standard operator(s) below, with the weights converted
to ONNX layouts. Inference semantics (eval mode): BatchNorm uses its running statistics,
Dropout disappears.

**Layout.** The graph input ``input`` is NHWC float ``[batch, H, W, C]`` (what anycnn takes;
``batch`` is a dynamic dimension), transposed once to NCHW inside the graph (ONNX operators are
channels-first); the output ``logits`` is ``[batch, K]``. A model whose output is spatial has
output ``output`` ``[batch, H', W', C']``, transposed back to NHWC. ``layout="nchw"`` makes the
input ``[batch, C, H, W]`` (and a spatial output NCHW) with no transpose.

=================  ==========================================================================
anycnn             ONNX (opset 17 unless a traced layer needs more)
=================  ==========================================================================
Conv2D             ``Conv`` (``group``, ``dilations``, ``strides``, explicit ``pads``, also for
                   ``'same'``); W ``(kh, kw, in/g, out)`` → ``(out, in/g, kh, kw)``
ConvTranspose2D    ``ConvTranspose`` (``pads``, ``output_padding``, ``dilations``, ``group``);
                   W ``(kh, kw, in, out/g)`` → ``(in, out/g, kh, kw)``
Dense              ``Gemm``; W ``(in, out)`` as is, except the first Dense after a spatial
                   ``Flatten``, whose rows are reordered from NHWC (h, w, c) to NCHW (c, h, w)
                   flattening. On NHWC input (a channel MLP): ``Transpose``, ``MatMul``,
                   ``Add``, ``Transpose`` back
BatchNorm2D        ``BatchNormalization`` (running statistics; also on flat features)
GroupNorm          ``Reshape`` (N, G, -1) → ``InstanceNormalization`` → ``Reshape`` → ``Mul``,
                   ``Add`` (per-channel affine)
LayerNorm          ``Transpose`` to channels-last → ``LayerNormalization`` (last axis) →
                   ``Transpose`` back (on flat features: ``LayerNormalization`` alone)
MaxPool2D          ``MaxPool``; ``ceil_mode`` as explicit extra bottom/right ``pads``
AvgPool2D          ``AveragePool``; ``count_include_pad`` and ``ceil_mode`` as PyTorch defines
                   them (with ``ceil_mode``, the zero padding is a ``Pad`` node and the
                   ceil-mode overhang is not counted)
GlobalAvgPool2D    ``GlobalAveragePool`` → ``Flatten``
AdaptiveAvgPool2D  ``GlobalAveragePool`` for a 1x1 output (kept 4-D); ``AveragePool`` when the
                   output size divides the input's; otherwise two ``MatMul`` by constant
                   averaging weights (exact for any sizes, as anycnn computes it)
Upsample2D         ``Resize``: nearest (``asymmetric``, ``floor``) or linear (``half_pixel``:
                   PyTorch's ``align_corners=False``)
Flatten            ``Flatten`` (axis 1)
ReLU, LeakyReLU,   ``Relu``, ``LeakyRelu`` (``alpha``), ``Sigmoid``, ``Tanh``
Sigmoid, Tanh
ReLU6, Hardsig-    ``Clip`` (0, 6), ``HardSigmoid`` (alpha 1/6, beta 0.5), ``HardSwish``,
moid, Hardswish,   ``x * Sigmoid(x)``, ``Gelu`` from opset 20 (below: ``Erf`` or ``Tanh``
SiLU, GELU,        formula), ``Softmax`` over the layer's axis moved to NCHW
Softmax            (:mod:`anycnn.io.onnx_activations`)
Dropout, Identity, nothing (eval)
StochasticDepth
Residual           the two paths, then ``Add``
Concat             the branches, then ``Concat`` on the channel axis (1 in NCHW)
Sequential         its layers in order (nested containers included)
=================  ==========================================================================

Flattened features keep NCHW order inside the graph; layers other than Dense, the elementwise
ones and Dropout/Identity that receive them get them back in anycnn's (h, w, c) order through a
``Reshape``/``Transpose``/``Reshape``.

**Modules written as code** (a ``forward`` and no ``backward``) are exported from a trace of
one forward pass, operation by operation, with the layers they call mapped as above
(:mod:`anycnn.io.onnx_code`). A ``Transpose`` that undoes the one before it is not written
(the tensor before both is used), and nodes the output does not depend on are left out.

**Layers with no mapping** (your own ``Module`` with a hand-written backward, or a subclass of
a mapped layer that overrides ``forward``): when ndonnx is installed (``pip install ndonnx``;
an Array API namespace that records ONNX operators), the layer's own ``forward`` is traced
on a symbolic NHWC array with its parameters as constants, and the recorded operators are
inlined between a ``Transpose`` to NHWC and one back (dynamic batch kept). ndonnx records at
its own opset (21 for ndonnx 0.23), so an unset ``opset`` rises to it and an explicit lower
one is refused. A layer that cannot be traced
(its forward leaves the Array API, e.g. through NumPy), or any unmapped layer without ndonnx or
with ``trace=False``, raises a :class:`~anycnn.errors.ConfigError` naming it and its position.

The file passes ``onnx.checker.check_model(full_check=True)``. ``onnx`` is an optional
dependency (``pip install 'anycnn[onnx]'``), imported only when :func:`export_onnx` runs.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import device

from ..autograd import no_grad
from ..backend import dtype_name, namespace_of, to_numpy
from ..errors import ConfigError, ShapeError
from ..nn.containers import Concat, Identity, Residual
from ..nn.functional import pool_windows
from ..nn.functional.pool import adaptive_pool_matrix
from ..nn.layers import (
    AdaptiveAvgPool2D,
    AvgPool2D,
    BatchNorm2D,
    Conv2D,
    ConvTranspose2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool2D,
    GroupNorm,
    LayerNorm,
    LeakyReLU,
    MaxPool2D,
    ReLU,
    Sigmoid,
    StochasticDepth,
    Tanh,
    Upsample2D,
)
from ..nn.module import Module, eval_mode, preserved_state
from ..nn.sequential import Sequential
from .interop import conv_weight_nchw, flat_rows_nchw, swap_kernel_axes
from .onnx_activations import ACTIVATIONS, emit_activation

#: the opset written by default (LayerNormalization needs 17)
DEFAULT_OPSET = 17
MIN_OPSET = 17
INSTALL_HINT = "pip install 'anycnn[onnx]' (or: pip install onnx onnxruntime)"

SUPPORTED = ("Sequential, Residual, Concat, Identity, Conv2D, ConvTranspose2D, Dense, "
             "BatchNorm2D, GroupNorm, LayerNorm, MaxPool2D, AvgPool2D, GlobalAvgPool2D, "
             "AdaptiveAvgPool2D, Upsample2D, Flatten, ReLU, LeakyReLU, Sigmoid, Tanh, ReLU6, "
             "Hardsigmoid, Hardswish, SiLU, GELU, Softmax, Dropout, StochasticDepth")

_ACTIVATIONS = {LeakyReLU: "LeakyRelu", ReLU: "Relu", Sigmoid: "Sigmoid", Tanh: "Tanh"}
#: the classes with a mapping; a subclass is mapped as its base only if it keeps its forward
_MAPPED = (Sequential, Residual, Concat, Identity, Dropout, StochasticDepth, *_ACTIVATIONS,
           *ACTIVATIONS, Dense, Conv2D, ConvTranspose2D, MaxPool2D, AvgPool2D, GlobalAvgPool2D,
           AdaptiveAvgPool2D, Upsample2D, Flatten, BatchNorm2D, GroupNorm, LayerNorm)


def import_onnx() -> Any:
    """The ``onnx`` package, or a ConfigError with the install hint."""
    try:
        import onnx
    except ImportError as exc:
        raise ConfigError(f"ONNX export needs the onnx package ({exc}); {INSTALL_HINT}") from None
    return onnx


@dataclass
class _Value:
    """A tensor of the graph being built, with the anycnn value it stands for (batch 1)."""

    name: str
    sample: np.ndarray  # anycnn's output for the sample input (NHWC or (N, features))
    # flat features in NCHW (c, h, w) order: (c, h*w) of the Flatten that made them, else None
    chw: tuple[int, int] | None = None

    @property
    def spatial(self) -> bool:
        return self.sample.ndim == 4


class _Builder:
    def __init__(self, onnx: Any, dtype: np.dtype, opset: int | None, trace: bool) -> None:
        self.onnx = onnx
        self.opset_given = opset is not None
        self.opset = DEFAULT_OPSET if opset is None else opset  # a trace may raise an unset one
        self.trace = trace
        self.helper = onnx.helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.dtype = dtype
        self._names: set[str] = set()
        self._scalars: dict[float, str] = {}
        self._transposes: dict[str, tuple[str, tuple[int, ...]]] = {}  # output: (input, perm)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.initializers.append(self.onnx.numpy_helper.from_array(
            np.ascontiguousarray(array), name))
        return name

    def weight(self, base: str, array: np.ndarray) -> str:
        return self.const(base, np.asarray(array, dtype=self.dtype))

    def scalar(self, base: str, value: float) -> str:
        """A 0-d constant of the model's dtype, one initializer per value for the graph."""
        if value not in self._scalars:
            self._scalars[value] = self.weight(f"const/{base}", np.asarray(value))
        return self._scalars[value]

    def ints(self, base: str, values: list[int]) -> str:
        return self.const(base, np.asarray(values, dtype=np.int64))

    def node(self, op: str, inputs: list[str], scope: str, **attrs: Any) -> str:
        if op == "Transpose":  # undoing the Transpose that made the input: its input instead
            source, perm = self._transposes.get(inputs[0], (None, ()))
            if source is not None and [perm[i] for i in attrs["perm"]] == list(range(len(perm))):
                return source
        out = self.fresh(f"{scope}/{op}" if scope else op)
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        if op == "Transpose":
            self._transposes[out] = (inputs[0], tuple(attrs["perm"]))
        return out

    def used(self, output: str) -> tuple[list[Any], list[Any]]:
        """The nodes and initializers that ``output`` depends on (a Transpose left without
        readers when the next one undid it is dropped here), in order."""
        needed, nodes = {output}, []
        for node in reversed(self.nodes):
            if any(o in needed for o in node.output):
                nodes.append(node)
                needed.update(node.input)
        return nodes[::-1], [t for t in self.initializers if t.name in needed]


def _scope(prefix: str) -> str:
    return prefix[:-1] if prefix else "model"


def _natural(b: _Builder, v: _Value, scope: str) -> _Value:
    """Flat features back in anycnn's (h, w, c) order (a no-op when they already are)."""
    if v.chw is None:
        return v
    c, hw = v.chw
    x = b.node("Reshape", [v.name, b.ints(f"{scope}/chw", [0, c, hw])], scope)
    x = b.node("Transpose", [x], scope, perm=[0, 2, 1])
    x = b.node("Reshape", [x, b.ints(f"{scope}/flat", [0, -1])], scope)
    return _Value(x, v.sample, None)


def _run(layer: Module, v: _Value, like: Any, scope: str) -> np.ndarray:
    """``layer``'s anycnn output for the sample (on the model's backend), as NumPy; a layer
    that refuses its input is named with its position."""
    xp = namespace_of(like)
    x = xp.asarray(np.ascontiguousarray(v.sample), device=device(like))
    try:
        return to_numpy(layer.forward(x))
    except ShapeError as exc:
        raise ShapeError(f"layer {scope}: {exc}") from exc


def _pads(t: int, b_: int, l: int, r: int) -> list[int]:
    """anycnn's (top, bottom, left, right) as ONNX's [top, left, bottom, right]."""
    return [int(t), int(l), int(b_), int(r)]


def _emit(b: _Builder, module: Module, v: _Value, prefix: str, like: Any) -> _Value:
    """Append the nodes computing ``module`` on ``v``; return its output."""
    scope = _scope(prefix)
    kind = type(module).__name__
    base = next((t for t in _MAPPED if isinstance(module, t)), None)
    if module.autodiff:  # written as code: its forward's operations, traced
        from .onnx_code import emit_code

        return emit_code(b, module, v, prefix, like)
    if base is None or type(module).forward is not base.forward:
        return _traced(b, module, v, scope, like)
    if isinstance(module, Sequential):
        for name, child in module.named_children():
            v = _emit(b, child, v, f"{prefix}{name}.", like)
        return v
    if isinstance(module, Residual):
        body = _emit(b, module.body, v, f"{prefix}body.", like)
        short = _emit(b, module.shortcut, v, f"{prefix}shortcut.", like)
        if body.chw != short.chw:
            body, short = _natural(b, body, scope), _natural(b, short, scope)
        return _Value(b.node("Add", [body.name, short.name], scope),
                      body.sample + short.sample, body.chw)
    if isinstance(module, Concat):
        outs = [_emit(b, child, v, f"{prefix}{name}.", like)
                for name, child in module.named_children()]
        if len(outs) == 1:
            return outs[0]
        outs = [_natural(b, o, scope) for o in outs]
        return _Value(b.node("Concat", [o.name for o in outs], scope, axis=1),
                      np.concatenate([o.sample for o in outs], axis=-1), None)
    if isinstance(module, Identity | Dropout | StochasticDepth):
        return v
    needs_spatial = (Conv2D, ConvTranspose2D, MaxPool2D, AvgPool2D, GlobalAvgPool2D,
                     AdaptiveAvgPool2D, Upsample2D)
    if isinstance(module, needs_spatial) and not v.spatial:
        raise ConfigError(f"layer {scope} ({kind}) needs NHWC input but gets features of "
                          f"shape {v.sample.shape}")
    if base in _ACTIVATIONS:
        op = _ACTIVATIONS[base]
        attrs = {"alpha": module.negative_slope} if op == "LeakyRelu" else {}
        return _Value(b.node(op, [v.name], scope, **attrs), _run(module, v, like, scope), v.chw)
    if base in ACTIVATIONS:  # elementwise, or Softmax over a whole axis: any row order holds
        out = _run(module, v, like, scope)
        return _Value(emit_activation(b, module, v.name, v.sample.ndim, scope), out, v.chw)
    out = _run(module, v, like, scope)  # also checks that the layer accepts its input
    if isinstance(module, Dense):
        return _dense(b, module, v, out, scope)
    if isinstance(module, Conv2D):
        w = conv_weight_nchw(to_numpy(module.weight.data))
        inputs = [v.name, b.weight(f"{scope}.weight", w)]
        if module.bias is not None:
            inputs.append(b.weight(f"{scope}.bias", to_numpy(module.bias.data)))
        return _Value(b.node("Conv", inputs, scope, kernel_shape=list(module.kernel_size),
                             strides=list(module.stride), dilations=list(module.dilation),
                             pads=_pads(*module.pads), group=module.groups), out)
    if isinstance(module, ConvTranspose2D):
        w = swap_kernel_axes(to_numpy(module.weight.data))
        inputs = [v.name, b.weight(f"{scope}.weight", w)]
        if module.bias is not None:
            inputs.append(b.weight(f"{scope}.bias", to_numpy(module.bias.data)))
        (ph, pw), (oh, ow) = module.padding, module.output_padding
        return _Value(b.node("ConvTranspose", inputs, scope,
                             kernel_shape=list(module.kernel_size), strides=list(module.stride),
                             dilations=list(module.dilation), pads=[ph, pw, ph, pw],
                             output_padding=[oh, ow], group=module.groups), out)
    if isinstance(module, MaxPool2D | AvgPool2D):
        return _pool(b, module, v, out, scope)
    if isinstance(module, GlobalAvgPool2D):
        x = b.node("GlobalAveragePool", [v.name], scope)
        return _Value(b.node("Flatten", [x], scope, axis=1), out)
    if isinstance(module, AdaptiveAvgPool2D):
        return _Value(_adaptive_pool(b, module, v, scope), out)
    if isinstance(module, Upsample2D):
        sh, sw = module.scale_factor
        scales = b.const(f"{scope}/scales", np.asarray([1, 1, sh, sw], dtype=np.float32))
        if module.mode == "nearest":
            attrs = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                     "nearest_mode": "floor"}
        else:
            attrs = {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}
        return _Value(b.node("Resize", [v.name, "", scales], scope, **attrs), out)
    if isinstance(module, Flatten):
        if not v.spatial:
            return v
        _, h, w, c = v.sample.shape
        flat = b.node("Flatten", [v.name], scope, axis=1)
        return _Value(flat, out, (c, h * w) if h * w > 1 else None)
    if isinstance(module, BatchNorm2D):
        v = _natural(b, v, scope)
        inputs = [v.name] + [b.weight(f"{scope}.{k}", to_numpy(a)) for k, a in (
            ("weight", module.weight.data), ("bias", module.bias.data),
            ("running_mean", module.running_mean), ("running_var", module.running_var))]
        return _Value(b.node("BatchNormalization", inputs, scope, epsilon=module.eps), out)
    if isinstance(module, GroupNorm):
        return _group_norm(b, module, _natural(b, v, scope), out, scope)
    if isinstance(module, LayerNorm):
        return _layer_norm(b, module, _natural(b, v, scope), out, scope)
    raise _unmapped(scope, module)


def _unmapped(scope: str, module: Module, why: str = "") -> ConfigError:
    return ConfigError(
        f"layer {scope} ({type(module).__name__}) has no ONNX mapping in anycnn.io.onnx "
        f"(a layer of your own, or a subclass with its own forward){why}; supported: "
        f"{SUPPORTED}")


def _traced(b: _Builder, module: Module, v: _Value, scope: str, like: Any) -> _Value:
    """A layer with no mapping, traced: its own ``forward`` runs on an ndonnx array (an Array
    API namespace that records ONNX operators), with its parameters and buffers as ndonnx
    constants, and the recorded graph is inlined here (NHWC in, NHWC out, as the layer sees
    its data). ndonnx records at its own opset (21 for ndonnx 0.23): an unset opset rises to
    it; a lower one that was asked for is an error."""
    if not b.trace:
        raise _unmapped(scope, module)
    try:
        import ndonnx as ndx
    except ImportError:
        raise _unmapped(scope, module, "; pip install ndonnx to trace its forward instead"
                        ) from None
    out = _run(module, v, like, scope)
    v = _natural(b, v, scope)
    dtype = ndx.float64 if b.dtype == np.float64 else ndx.float32
    x = ndx.argument(shape=("batch", *v.sample.shape[1:]), dtype=dtype)
    arrays = [(p, "data", p.data) for p in module.parameters()]
    arrays += [(m, k, getattr(m, k)) for m in module.modules() for k in m.buffer_names]
    try:
        for owner, key, value in arrays:
            setattr(owner, key, ndx.asarray(to_numpy(value)))
        y = module.forward(x)
        sub = ndx.build({"x": x}, {"y": y})
    except Exception as exc:  # whatever the layer's forward does with a symbolic array
        raise _unmapped(scope, module, f"; tracing its forward with ndonnx failed "
                        f"({type(exc).__name__}: {exc})") from None
    finally:
        for owner, key, value in arrays:
            setattr(owner, key, value)
    return _Value(_inline(b, sub, v, out, scope, module), out)


def _inline(b: _Builder, sub: Any, v: _Value, out: np.ndarray, scope: str,
            module: Module) -> str:
    """Append the traced model ``sub`` (input ``x``, output ``y``) to the graph."""
    onnx = b.onnx
    opset = next((o.version for o in sub.opset_import if o.domain in ("", "ai.onnx")), b.opset)
    if any(o.domain not in ("", "ai.onnx") for o in sub.opset_import) or any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for n in sub.graph.node for a in n.attribute):
        raise _unmapped(scope, module, "; its ndonnx trace uses operators of another domain "
                        "or subgraphs")
    if opset > b.opset:
        if b.opset_given:
            raise _unmapped(scope, module, f"; its ndonnx trace needs opset {opset}: export "
                            f"with opset={opset}, or leave the opset unset")
        b.opset = opset
    x = v.name
    if v.spatial:
        x = b.node("Transpose", [x], scope, perm=[0, 2, 3, 1])
    names = {"x": x, "": ""}

    def rename(name: str) -> str:
        if name not in names:
            names[name] = b.fresh(f"{scope}/traced/{name}")
        return names[name]

    for init in sub.graph.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = rename(init.name)
        b.initializers.append(copy)
    for node in sub.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [rename(n) for n in node.input]
        copy.output[:] = [rename(n) for n in node.output]
        copy.name = b.fresh(f"{scope}/traced/{node.op_type}")
        b.nodes.append(copy)
    y = rename(sub.graph.output[0].name)
    if out.ndim == 4:
        y = b.node("Transpose", [y], scope, perm=[0, 3, 1, 2])
    return y


def _dense(b: _Builder, module: Dense, v: _Value, out: np.ndarray, scope: str) -> _Value:
    w = to_numpy(module.weight.data)
    if v.spatial:  # a channel MLP: over the channels of NHWC, MatMul and Add per position
        y = b.node("Transpose", [v.name], scope, perm=[0, 2, 3, 1])
        y = b.node("MatMul", [y, b.weight(f"{scope}.weight", w)], scope)
        if module.bias is not None:
            y = b.node("Add", [y, b.weight(f"{scope}.bias", to_numpy(module.bias.data))], scope)
        return _Value(b.node("Transpose", [y], scope, perm=[0, 3, 1, 2]), out)
    if v.chw is not None:  # rows (h, w, c) -> (c, h, w), as the graph flattened NCHW
        c, hw = v.chw
        w = flat_rows_nchw(w, hw, c)
    inputs = [v.name, b.weight(f"{scope}.weight", w)]
    if module.bias is not None:
        inputs.append(b.weight(f"{scope}.bias", to_numpy(module.bias.data)))
    return _Value(b.node("Gemm", inputs, scope), out)


def _pool(b: _Builder, module: MaxPool2D | AvgPool2D, v: _Value, out: np.ndarray,
          scope: str) -> _Value:
    """MaxPool/AveragePool in floor mode with explicit pads: ``ceil_mode`` becomes extra
    bottom/right padding (anycnn's own window geometry), so no runtime's reading of ceil mode
    matters."""
    win = pool_windows(tuple(v.sample.shape[1:3]), module.kernel_size, module.stride,
                       module.padding, module.ceil_mode)
    t, bottom, l, r = win.pads
    attrs = {"kernel_shape": list(module.kernel_size), "strides": list(module.stride)}
    if isinstance(module, MaxPool2D):
        return _Value(b.node("MaxPool", [v.name], scope, pads=_pads(t, bottom, l, r), **attrs),
                      out)
    x = v.name
    (ph, pw) = module.padding
    if module.count_include_pad and (bottom > ph or r > pw) and (ph or pw):
        # PyTorch counts the zero padding but not the ceil-mode overhang beyond it: pad with
        # zeros explicitly, then average over the real (zero-padded) values only.
        x = b.node("Pad", [x, b.ints(f"{scope}/pads", [0, 0, ph, pw, 0, 0, ph, pw])], scope)
        pads, include = _pads(0, bottom - ph, 0, r - pw), 0
    elif module.count_include_pad and (bottom > ph or r > pw):
        pads, include = _pads(t, bottom, l, r), 0  # no symmetric padding to count
    else:
        pads, include = _pads(t, bottom, l, r), int(module.count_include_pad)
    return _Value(b.node("AveragePool", [x], scope, pads=pads, count_include_pad=include,
                         **attrs), out)


def _adaptive_pool(b: _Builder, module: AdaptiveAvgPool2D, v: _Value, scope: str) -> str:
    """``GlobalAveragePool`` for a 1x1 output; ``AveragePool`` when the output size divides
    the input's (every window the same size); otherwise anycnn's own construction, exact for
    any sizes: ``MatMul`` by the ``(W, ow)`` column weights, then the ``(oh, H)`` row weights
    from the left (each output cell the mean of its rows ``floor(i*n/m)`` to
    ``ceil((i+1)*n/m) - 1``)."""
    _, h, w, _ = v.sample.shape
    oh, ow = module.output_size
    if (oh, ow) == (1, 1):
        return b.node("GlobalAveragePool", [v.name], scope)
    if h % oh == 0 and w % ow == 0:
        kernel = [h // oh, w // ow]
        return b.node("AveragePool", [v.name], scope, kernel_shape=kernel, strides=kernel)
    cols = b.weight(f"{scope}/cols", adaptive_pool_matrix(w, ow).T)
    rows = b.weight(f"{scope}/rows", adaptive_pool_matrix(h, oh))
    return b.node("MatMul", [rows, b.node("MatMul", [v.name, cols], scope)], scope)


def _group_norm(b: _Builder, module: GroupNorm, v: _Value, out: np.ndarray,
                scope: str) -> _Value:
    g = module.num_groups
    x = b.node("Reshape", [v.name, b.ints(f"{scope}/groups", [0, g, -1])], scope)
    x = b.node("InstanceNormalization", [x, b.weight(f"{scope}/ones", np.ones(g)),
                                         b.weight(f"{scope}/zeros", np.zeros(g))],
               scope, epsilon=module.eps)
    x = b.node("Reshape", [x, b.node("Shape", [v.name], scope)], scope)
    return _Value(_affine(b, module, x, v, scope), out)


def _layer_norm(b: _Builder, module: LayerNorm, v: _Value, out: np.ndarray,
                scope: str) -> _Value:
    c = module.num_channels
    weight = to_numpy(module.weight.data) if module.weight is not None else np.ones(c)
    bias = to_numpy(module.bias.data) if module.bias is not None else np.zeros(c)
    inputs = [b.weight(f"{scope}.weight", weight), b.weight(f"{scope}.bias", bias)]
    if not v.spatial:
        return _Value(b.node("LayerNormalization", [v.name, *inputs], scope, axis=-1,
                             epsilon=module.eps), out)
    x = b.node("Transpose", [v.name], scope, perm=[0, 2, 3, 1])
    x = b.node("LayerNormalization", [x, *inputs], scope, axis=-1, epsilon=module.eps)
    return _Value(b.node("Transpose", [x], scope, perm=[0, 3, 1, 2]), out)


def _affine(b: _Builder, module: GroupNorm, x: str, v: _Value, scope: str) -> str:
    if module.weight is None:
        return x
    shape = (-1, 1, 1) if v.spatial else (-1,)
    w = np.reshape(to_numpy(module.weight.data), shape)
    bias = np.reshape(to_numpy(module.bias.data), shape)
    x = b.node("Mul", [x, b.weight(f"{scope}.weight", w)], scope)
    return b.node("Add", [x, b.weight(f"{scope}.bias", bias)], scope)


def _input_shape(model: Module, input_shape: Any) -> tuple[int, int, int]:
    if input_shape is None:
        spec = getattr(model, "model_spec", None)
        if not isinstance(spec, dict) or "image_size" not in spec:
            raise ConfigError("export_onnx needs input_shape=(H, W, C) for a model without a "
                              "model_spec")
        side = int(spec["image_size"])
        return side, side, int(spec["in_channels"])
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(n, int | np.integer) and n >= 1 for n in shape):
        raise ConfigError(f"input_shape must be (H, W, C) positive ints, got {input_shape!r}")
    return tuple(int(n) for n in shape)  # type: ignore[return-value]


def _reference_array(model: Module) -> Any:
    """An array of the model's backend, device and dtype (samples are made like it)."""
    params = model.parameters()
    if params:
        return params[0].data
    from ..backend import asarray, get_backend

    return asarray(np.zeros(1, dtype=np.float32), backend=get_backend())


def to_onnx(model: Module, *, input_shape: tuple[int, int, int] | None = None,
            opset: int | None = None, layout: str = "nhwc",
            metadata: dict[str, str] | None = None, trace: bool = True) -> Any:
    """The ``onnx.ModelProto`` that :func:`export_onnx` writes (checked)."""
    onnx = import_onnx()
    if layout not in ("nhwc", "nchw"):
        raise ConfigError(f"layout must be 'nhwc' or 'nchw', got {layout!r}")
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and (not isinstance(opset, int) or not MIN_OPSET <= opset <= newest):
        raise ConfigError(f"opset must be an int from {MIN_OPSET} to {newest} (this onnx "
                          f"package's newest), got {opset!r}")
    if not isinstance(model, Module):
        raise ConfigError(f"export_onnx takes an anycnn Module, got {type(model).__name__}")
    h, w, c = _input_shape(model, input_shape)
    like = _reference_array(model)
    dtype = np.dtype(dtype_name(like))
    if dtype not in (np.float32, np.float64):
        raise ConfigError(f"export_onnx supports float32 and float64 models, not {dtype}")
    b = _Builder(onnx, dtype, opset, trace)
    elem = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    sample = np.random.default_rng(0).random((1, h, w, c)).astype(dtype)
    with preserved_state(model), eval_mode(model), no_grad():
        if layout == "nhwc":
            dims = ["batch", h, w, c]
            start = b.node("Transpose", ["input"], "input", perm=[0, 3, 1, 2])
        else:
            dims = ["batch", c, h, w]
            start = b.node("Identity", ["input"], "input")
        out = _emit(b, model, _Value(start, sample), "", like)
    if out.spatial:
        perm = [0, 2, 3, 1] if layout == "nhwc" else [0, 1, 2, 3]
        name = "output"
        shape = ["batch", *(out.sample.shape[1:] if layout == "nhwc" else
                            (out.sample.shape[3], *out.sample.shape[1:3]))]
        b.nodes.append(onnx.helper.make_node("Transpose", [out.name], [name], perm=perm,
                                             name="output/Transpose"))
    else:
        out = _natural(b, out, "output")
        name, shape = "logits", ["batch", *out.sample.shape[1:]]
        b.nodes.append(onnx.helper.make_node("Identity", [out.name], [name],
                                             name="output/Identity"))
    nodes, initializers = b.used(name)
    graph = onnx.helper.make_graph(
        nodes, "anycnn", [onnx.helper.make_tensor_value_info("input", elem, dims)],
        [onnx.helper.make_tensor_value_info(name, elem, shape)], initializers)
    opsets = [onnx.helper.make_opsetid("", b.opset)]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, producer_name="anycnn",
                                   ir_version=onnx.helper.find_min_ir_version_for(opsets),
                                   doc_string=_doc(layout, dims, name, shape))
    from .. import __version__

    proto.producer_version = __version__
    meta = {"input_layout": layout.upper()}
    spec = getattr(model, "model_spec", None)
    if isinstance(spec, dict):
        meta["model_spec"] = json.dumps(spec)
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    onnx.helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _doc(layout: str, dims: list, name: str, shape: list) -> str:
    return (f"anycnn model (eval mode). Input 'input' {layout.upper()} {dims}, float, images as "
            f"anycnn takes them (DataLoader scaling/normalisation applied by the caller); "
            f"output {name!r} {shape}.")


def export_onnx(model: Module, path: str | os.PathLike, *,
                input_shape: tuple[int, int, int] | None = None, opset: int | None = None,
                layout: str = "nhwc", metadata: dict[str, str] | None = None,
                trace: bool = True) -> pathlib.Path:
    """Write ``model`` (eval-mode semantics) as an ONNX file of standard operators.

    Args:
        model: an anycnn model of the layers listed in the module docstring.
        path: the ``.onnx`` file to write (replaced atomically).
        input_shape: ``(H, W, C)`` of one image; default from ``model.model_spec`` (presets
            and :func:`anycnn.load_model` models have one).
        opset: the ONNX opset, 17 up to the installed onnx's newest; unset: 17, or the opset
            ndonnx records at (21) when a layer is traced.
        layout: ``"nhwc"`` (default): input ``[batch, H, W, C]``, transposed to NCHW inside the
            graph; ``"nchw"``: input ``[batch, C, H, W]``.
        metadata: extra string key-values for the file's ``metadata_props`` (beside
            ``input_layout`` and ``model_spec``; ``anycnn export`` adds ``preprocess``, the
            checkpoint's preprocess record, which ``anycnn predict MODEL.onnx`` reads).
        trace: a layer with no mapping (your own) is traced with ndonnx when that is
            installed (its ``forward`` recorded as generic ONNX operators); False refuses it.

    Returns:
        The path written. The batch dimension is dynamic; the output ``logits`` is
        ``[batch, K]``.

    Raises:
        ConfigError: onnx is not installed (with the install hint), a layer has no ONNX
            mapping and cannot be traced (named with its position), or an argument is invalid.
    """
    proto = to_onnx(model, input_shape=input_shape, opset=opset, layout=layout,
                    metadata=metadata, trace=trace)
    from ..atomic import atomic_write_bytes

    return pathlib.Path(atomic_write_bytes(path, proto.SerializeToString(), what="ONNX model"))
