"""PyTorch interoperability: ``state_dict`` names and layouts, and an equivalent ``nn.Module``.

An anycnn :class:`~anycnn.nn.module.Sequential` names its tensors exactly like the equivalent
``torch.nn.Sequential`` (``"0.weight"``, ``"3.bias"``, ``"1.running_mean"``), layer for layer:

=================  ==========================================================================
anycnn             PyTorch
=================  ==========================================================================
Conv2D             ``nn.Conv2d`` (also ``groups``); weight ``(kh, kw, in/groups, out)`` ↔
                   ``(out, in/groups, kh, kw)``
ConvTranspose2D    ``nn.ConvTranspose2d`` (also ``groups``); weight ``(kh, kw, in, out/groups)``
                   ↔ ``(in, out/groups, kh, kw)``
Dense              ``nn.Linear``; weight ``(in, out)`` ↔ ``(out, in)``
BatchNorm2D        ``nn.BatchNorm2d`` (``nn.BatchNorm1d`` on flat features); torch's extra
                   ``num_batches_tracked`` is exported as 0 and ignored on import
GroupNorm          ``nn.GroupNorm``; weight, bias ``(C,)``
LayerNorm          ``nn.LayerNorm(C)`` applied to the channels: on NCHW input a subclass that
                   permutes to NHWC and back (its tensors keep the names ``weight``, ``bias``)
Upsample2D         ``nn.Upsample(scale_factor, mode)`` (``align_corners=False`` for bilinear)
MaxPool2D          ``nn.MaxPool2d``
AvgPool2D          ``nn.AvgPool2d``
GlobalAvgPool2D    ``nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())`` (no tensors, so the
                   indices stay aligned)
Flatten            ``nn.Flatten``
ReLU, LeakyReLU,   the ``nn`` module of the same name
Sigmoid, Tanh,
Dropout
Identity           ``nn.Identity``
Residual           a small ``nn.Module`` computing ``body(x) + shortcut(x)``, children ``body``
                   and ``shortcut`` (``nn.Identity`` for the identity shortcut), so tensors are
                   named ``"3.body.0.weight"``, ``"3.shortcut.1.running_mean"`` on both sides
Concat             a small ``nn.Module`` running its children ``"0"``, ``"1"``, ... on the same
                   input and concatenating on dim 1 (NCHW channels): ``"2.1.0.bias"``
forward-only       (a ``Module`` written as code) its parameters and children by attribute
                   path (``"block.conv1.weight"``, ``"gamma"``), each layer's tensors as above;
                   the shapes between its layers are not tracked, so a ``Dense`` after a
                   spatial flatten inside it keeps anycnn's (h, w, c) row order
                   (:func:`torch_module` cannot mirror such a model: it has no forward to copy)
=================  ==========================================================================

The ``Residual`` and ``Concat`` modules are defined when :func:`torch_module` first runs (torch
has no such modules, and importing anycnn must not import torch); save the torch module's
``state_dict``, not the module object. Flattened features may go through a ``Residual`` but not
into a ``Concat`` (their order differs between the frameworks; flatten after the ``Concat``).

**Flatten order.** anycnn activations are NHWC, so ``Flatten`` yields features in ``(h, w, c)``
order while PyTorch (NCHW) yields ``(c, h, w)``. The rows of the first ``Dense`` after a spatial
``Flatten`` (and of a ``BatchNorm`` on those flat features) are permuted on export and back on
import. The permutation needs only the channel count entering ``Flatten``, which is tracked from
the layers (``Conv2D.out_channels``) or taken from ``input_shape = (H, W, C)``; when
``input_shape`` is given, every ``Dense`` input size is also checked against it. A LayerNorm on
such features gets the same permutation; a GroupNorm with more than one group has none (its
groups would hold other features) and is refused.

Importing this module does not import torch; :func:`torch_module` imports it when called.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import dtype_name, to_numpy
from ..errors import CheckpointError, ConfigError
from ..nn.activations import GELU, Hardsigmoid, Hardswish, ReLU6, SiLU, Softmax
from ..nn.containers import Concat, Identity, Residual
from ..nn.geometry import pool_output_size
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
from ..nn.module import LoadResult, Module, Parameter
from ..nn.sequential import Sequential

_ELEMENTWISE = (ReLU, LeakyReLU, Sigmoid, Tanh, Dropout, ReLU6, Hardsigmoid, Hardswish, SiLU,
                GELU, Softmax, StochasticDepth)

Convert = Callable[[np.ndarray], np.ndarray]


def _same(a: np.ndarray) -> np.ndarray:
    return a


@dataclass
class _Tensor:
    """How one tensor moves between anycnn and PyTorch."""

    name: str
    to_torch: Convert
    from_torch: Convert
    description: str = ""


@dataclass
class _Layer:
    """One leaf layer in model order, with what PyTorch needs to mirror it."""

    name: str  # dotted prefix, e.g. "3"
    layer: Module
    flat_bn: bool  # a BatchNorm2D applied to (N, features) input
    tensors: list[_Tensor]


@dataclass
class _Shape:
    """What is known about the activation between two layers (any field may be unknown)."""

    spatial: bool | None = None  # True: NHWC; False: (N, features); None: unknown
    h: int | None = None
    w: int | None = None
    c: int | None = None  # channels (NHWC); after Flatten: channels entering it; else features
    flat_hw: int | None = None  # features are (hw, c)-ordered with this many positions
    in_code: bool = False  # inside a forward-only module: shapes are not tracked there


def conv_weight_nchw(a: np.ndarray) -> np.ndarray:
    """A ``Conv2D`` weight (kh, kw, in/groups, out) in the NCHW frameworks' layout (out,
    in/groups, kh, kw) (PyTorch, ONNX)."""
    return np.transpose(a, (3, 2, 0, 1))


def flat_rows_nchw(a: np.ndarray, hw: int, c: int) -> np.ndarray:
    """A ``Dense`` weight (hw*c, out) after a ``Flatten`` of NHWC activations, its rows reordered
    from (h, w, c) to the (c, h, w) order NCHW frameworks flatten in: (c*hw, out)."""
    return np.transpose(np.reshape(a, (hw, c, -1)), (1, 0, 2)).reshape(c * hw, -1)


def _conv_tensors(prefix: str, layer: Conv2D) -> list[_Tensor]:
    tensors = [_Tensor(prefix + "weight", conv_weight_nchw,
                       lambda a: np.transpose(a, (2, 3, 1, 0)),
                       "(out, in, kh, kw)" if layer.groups == 1 else "(out, in/groups, kh, kw)")]
    if layer.bias is not None:
        tensors.append(_Tensor(prefix + "bias", _same, _same, "(out,)"))
    return tensors


def swap_kernel_axes(a: np.ndarray) -> np.ndarray:
    """(kh, kw, in, out) <-> (in, out, kh, kw): the permutation is its own inverse."""
    return np.transpose(a, (2, 3, 0, 1))


def _conv_transpose_tensors(prefix: str, layer: ConvTranspose2D) -> list[_Tensor]:
    tensors = [_Tensor(prefix + "weight", swap_kernel_axes, swap_kernel_axes,
                       "(in, out, kh, kw)" if layer.groups == 1 else "(in, out/groups, kh, kw)")]
    if layer.bias is not None:
        tensors.append(_Tensor(prefix + "bias", _same, _same, "(out,)"))
    return tensors


def _dense_tensors(prefix: str, layer: Dense, hw: int | None, c: int | None) -> list[_Tensor]:
    if hw and c and hw > 1:
        out = layer.out_features

        def to_torch(a: np.ndarray) -> np.ndarray:  # rows (hw, c) -> columns (c, hw)
            return np.ascontiguousarray(flat_rows_nchw(a, hw, c).T)

        def from_torch(a: np.ndarray) -> np.ndarray:
            return np.transpose(np.reshape(a, (out, c, hw)), (2, 1, 0)).reshape(hw * c, out)

        weight = _Tensor(prefix + "weight", to_torch, from_torch,
                         f"(out, in) with inputs in (c, h, w) order, c={c}")
    else:
        weight = _Tensor(prefix + "weight", np.transpose, np.transpose, "(out, in)")
    tensors = [weight]
    if layer.bias is not None:
        tensors.append(_Tensor(prefix + "bias", _same, _same, "(out,)"))
    return tensors


def _bn_tensors(prefix: str, hw: int | None, c: int | None,
                names: tuple[str, ...] = ("weight", "bias", "running_mean", "running_var"),
                ) -> list[_Tensor]:
    """Per-feature tensors ``names``, permuted from (h, w, c) to (c, h, w) order when they
    follow a Flatten of ``hw`` positions of ``c`` channels."""
    if hw and c and hw > 1:
        def to_torch(a: np.ndarray) -> np.ndarray:
            return np.reshape(np.transpose(np.reshape(a, (hw, c))), (-1,))

        def from_torch(a: np.ndarray) -> np.ndarray:
            return np.reshape(np.transpose(np.reshape(a, (c, hw))), (-1,))
    else:
        to_torch = from_torch = _same
    return [_Tensor(prefix + k, to_torch, from_torch, "(features,)") for k in names]


def _check_features(index: str, layer: Module, expected: int, shape: _Shape) -> None:
    """Check a flat layer's input size against what the previous layers produce, if known."""
    have = None
    if shape.spatial is False and shape.c is not None:
        if shape.flat_hw is None:
            have = shape.c
        elif shape.flat_hw > 0:
            have = shape.flat_hw * shape.c
    if have is not None and have != expected:
        raise ConfigError(
            f"layer {index} ({type(layer).__name__}) expects {expected} input features but "
            f"the previous layers (with input_shape) give {have}")


def _join(index: str, kind: str, shapes: list[_Shape], concat: bool) -> _Shape:
    """The shape after a container whose paths end in ``shapes``: a ``Residual`` adds them
    (all fields must agree where known), a ``Concat`` also adds up their channels."""
    def agreed(field: str) -> Any:
        known = {getattr(s, field) for s in shapes if getattr(s, field) is not None}
        if len(known) > 1:
            raise ConfigError(f"layer {index} ({kind}): its paths give different {field} "
                              f"{sorted(known)}")
        return known.pop() if known else None

    flat = {s.flat_hw for s in shapes}
    if len(flat) > 1 or (concat and flat != {None}):
        raise ConfigError(
            f"layer {index} ({kind}) joins flattened features, whose order differs between "
            f"anycnn (h, w, c) and PyTorch (c, h, w); flatten after the {kind} instead")
    if concat:
        widths = [s.c for s in shapes]
        c = sum(widths) if all(v is not None for v in widths) else None
    else:
        c = agreed("c")
    return _Shape(agreed("spatial"), agreed("h"), agreed("w"), c, flat.pop())


def _walk(module: Module, shape: _Shape, prefix: str, plan: list[_Layer]) -> _Shape:
    """Append the leaf layers of ``module`` to ``plan``; return the shape after it."""
    if isinstance(module, Sequential):
        for name, child in module.named_children():
            shape = _walk(child, shape, f"{prefix}{name}.", plan)
        return shape
    index = prefix[:-1] or "<root>"
    kind = type(module).__name__
    if isinstance(module, Residual | Concat):
        paths = [_walk(child, shape, f"{prefix}{name}.", plan)
                 for name, child in module.named_children()]
        return _join(index, kind, paths, isinstance(module, Concat))
    if shape.spatial is False and isinstance(module, Conv2D | ConvTranspose2D | MaxPool2D |
                                             AvgPool2D | GlobalAvgPool2D | AdaptiveAvgPool2D |
                                             Upsample2D):
        raise ConfigError(f"layer {index} ({kind}) needs NHWC input but follows a flat layer")
    if isinstance(module, Conv2D | ConvTranspose2D):
        if shape.c is not None and shape.c != module.in_channels:
            raise ConfigError(f"layer {index} ({kind}) expects {module.in_channels} channels, "
                              f"input_shape/previous layers give {shape.c}")
        h = w = None
        if shape.h is not None and shape.w is not None:
            h, w = module.output_hw((shape.h, shape.w))
        tensors = (_conv_tensors if isinstance(module, Conv2D) else _conv_transpose_tensors)
        plan.append(_Layer(prefix, module, False, tensors(prefix, module)))
        return _Shape(True, h, w, module.out_channels)
    if isinstance(module, Upsample2D):
        h = w = None
        if shape.h is not None and shape.w is not None:
            h, w = module.output_hw((shape.h, shape.w))
        plan.append(_Layer(prefix, module, False, []))
        return _Shape(True, h, w, shape.c)
    if isinstance(module, GroupNorm | LayerNorm):
        return _channel_norm(index, prefix, module, shape, plan)
    if isinstance(module, MaxPool2D | AvgPool2D):
        h = w = None
        if shape.h is not None and shape.w is not None:
            h, w = (pool_output_size(size, module.kernel_size[i], module.stride[i],
                                     module.padding[i], module.ceil_mode)
                    for i, size in enumerate((shape.h, shape.w)))
        plan.append(_Layer(prefix, module, False, []))
        return _Shape(True, h, w, shape.c)
    if isinstance(module, GlobalAvgPool2D):
        plan.append(_Layer(prefix, module, False, []))
        return _Shape(False, 1, 1, shape.c, None)
    if isinstance(module, AdaptiveAvgPool2D):
        plan.append(_Layer(prefix, module, False, []))
        return _Shape(True, *module.output_size, shape.c)
    if isinstance(module, Flatten):
        plan.append(_Layer(prefix, module, False, []))
        if shape.spatial is False:
            return shape
        if shape.in_code:  # inside a forward-only module: rows keep anycnn's order
            return _Shape(False, in_code=True)
        hw = shape.h * shape.w if shape.h is not None and shape.w is not None else None
        return _Shape(False, shape.h, shape.w, shape.c, hw if hw is not None else -1)
    if isinstance(module, Dense):
        hw = _flat_positions(index, module, module.in_features, shape)
        _check_features(index, module, module.in_features, shape)
        plan.append(_Layer(prefix, module, False,
                           _dense_tensors(prefix, module, hw, shape.c)))
        return _Shape(False, None, None, module.out_features, None)
    if isinstance(module, BatchNorm2D):
        flat = shape.spatial is False
        if flat:
            hw = _flat_positions(index, module, module.num_features, shape)
            _check_features(index, module, module.num_features, shape)
            tensors = _bn_tensors(prefix, hw, shape.c)
        else:
            if shape.c is not None and shape.c != module.num_features:
                raise ConfigError(f"layer {index} (BatchNorm2D) expects {module.num_features} "
                                  f"channels, previous layers give {shape.c}")
            tensors = _bn_tensors(prefix, None, None)
        plan.append(_Layer(prefix, module, flat, tensors))
        return shape
    if isinstance(module, Softmax) and shape.spatial is not False:
        raise ConfigError(f"layer {index} (Softmax) over NHWC maps has no PyTorch equivalent "
                          "here (its axis would differ on NCHW); apply it to flat features")
    if isinstance(module, (*_ELEMENTWISE, Identity)):
        plan.append(_Layer(prefix, module, False, []))
        return shape
    if module.autodiff:  # written as code: its children in attribute order, shapes unknown
        _own_parameters(module, prefix, plan)
        for name, child in module.named_children():
            _walk(child, _Shape(in_code=True), f"{prefix}{name}.", plan)
        return _Shape()
    raise ConfigError(
        f"layer {index} ({kind}) has no PyTorch equivalent in anycnn.io.interop; supported: "
        "Sequential, Residual, Concat, Identity, Conv2D, ConvTranspose2D, Dense, BatchNorm2D, "
        "GroupNorm, LayerNorm, MaxPool2D, AvgPool2D, GlobalAvgPool2D, AdaptiveAvgPool2D, "
        "Upsample2D, Flatten, the activations, Dropout, StochasticDepth, and forward-only "
        "modules built of these")

def _own_parameters(module: Module, prefix: str, plan: list[_Layer]) -> None:
    """A forward-only module's own parameters (``self.gamma``), in the same layout on both
    sides (PyTorch's ``nn.Parameter`` attributes of the same names), except where the module
    names another PyTorch shape (``torch_parameter_shape(name, shape)``: a reshape, such as
    ConvNeXt's ``(C,)`` layer scale stored as ``(C, 1, 1)``)."""
    torch_shape = getattr(module, "torch_parameter_shape", None)
    own = []
    for name, value in vars(module).items():
        if not isinstance(value, Parameter):
            continue
        shape = tuple(int(n) for n in value.data.shape)
        theirs = torch_shape(name, shape) if torch_shape is not None else shape
        if theirs == shape:
            own.append(_Tensor(prefix + name, _same, _same, "as in anycnn"))
        else:
            own.append(_Tensor(prefix + name, functools.partial(_reshaped, shape=theirs),
                               functools.partial(_reshaped, shape=shape), f"shape {theirs}"))
    if own:
        plan.append(_Layer(prefix, module, False, own))


def _reshaped(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.reshape(a, shape)


def _channel_norm(index: str, prefix: str, module: GroupNorm | LayerNorm, shape: _Shape,
                  plan: list[_Layer]) -> _Shape:
    """Plan a GroupNorm or LayerNorm (see the module docstring for flat features)."""
    kind = type(module).__name__
    names = ("weight", "bias") if module.weight is not None else ()
    hw = None
    if shape.spatial is False:
        hw = _flat_positions(index, module, module.num_channels, shape)
        _check_features(index, module, module.num_channels, shape)
        if hw is not None and hw != 1 and isinstance(module, GroupNorm) and module.num_groups > 1:
            raise ConfigError(
                f"layer {index} (GroupNorm) normalises flattened NHWC features in groups: "
                "PyTorch flattens NCHW, so its groups would hold other features")
    elif shape.c is not None and shape.c != module.num_channels:
        raise ConfigError(f"layer {index} ({kind}) expects {module.num_channels} channels, "
                          f"previous layers give {shape.c}")
    tensors = _bn_tensors(prefix, hw, shape.c if hw else None, names)
    plan.append(_Layer(prefix, module, shape.spatial is False, tensors))
    return shape


def _flat_positions(index: str, layer: Module, features: int, shape: _Shape) -> int | None:
    """Spatial positions (h*w) behind flat features in (h, w, c) order, or None if not flat."""
    if shape.flat_hw is None:
        return None
    if shape.c is None:
        raise ConfigError(
            f"layer {index} ({type(layer).__name__}) follows a Flatten of an input whose channel "
            "count is unknown: pass input_shape=(H, W, C)")
    if features % shape.c:
        raise ConfigError(
            f"layer {index} ({type(layer).__name__}) has {features} input features, not a "
            f"multiple of the {shape.c} channels entering Flatten")
    return features // shape.c


def _plan(model: Module, input_shape: tuple[int, int, int] | None) -> list[_Layer]:
    if input_shape is None:
        start = _Shape()
    else:
        if len(tuple(input_shape)) != 3:
            raise ConfigError(f"input_shape must be (H, W, C), got {input_shape!r}")
        h, w, c = (int(v) for v in input_shape)
        start = _Shape(True, h, w, c)
    plan: list[_Layer] = []
    _walk(model, start, "", plan)
    return plan


# --------------------------------------------------------------------------------------------
# Public API


def to_torch_state_dict(model: Module,
                        input_shape: tuple[int, int, int] | None = None) -> dict[str, np.ndarray]:
    """The model's tensors as a PyTorch ``state_dict``: torch names and layouts, NumPy arrays.

    Load it with ``torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.

    Args:
        model: an anycnn ``Sequential`` of supported layers (see the module docstring).
        input_shape: ``(H, W, C)`` of one input image; optional for models whose channel count
            is known from a ``Conv2D`` before ``Flatten``, and used to check ``Dense`` sizes.

    Raises:
        ConfigError: a layer has no PyTorch equivalent, or ``input_shape`` does not fit.
    """
    plan = _plan(model, input_shape)
    state = model.state_dict()
    out: dict[str, np.ndarray] = {}
    for entry in plan:
        for t in entry.tensors:
            out[t.name] = np.ascontiguousarray(t.to_torch(to_numpy(state[t.name])))
        if isinstance(entry.layer, BatchNorm2D):
            out[entry.name + "num_batches_tracked"] = np.zeros((), dtype=np.int64)
    return out


def torch_value(name: str, value: Any) -> np.ndarray:
    """One ``state_dict`` value as a host NumPy array: a NumPy array, a torch tensor (on any
    device, requiring grad or not; ``bfloat16`` widened to ``float32``, which holds it
    exactly), a Python number or any array :func:`~anycnn.backend.to_numpy` reads.

    Raises:
        CheckpointError: the value is not a numeric array (the tensor's ``name`` is given).
    """
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    try:
        host = to_numpy(value)
    except Exception as exc:  # BackendError, or whatever an odd object raises
        raise CheckpointError(f"tensor {name!r} is a {type(value).__name__}, not an array "
                              f"({exc})") from None
    if not (np.issubdtype(host.dtype, np.number) or host.dtype == np.bool_):
        raise CheckpointError(f"tensor {name!r} is a {type(value).__name__} of dtype "
                              f"{host.dtype}, not a numeric array")
    return host


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def from_torch_state_dict(model: Module, state: dict[str, Any],
                          input_shape: tuple[int, int, int] | None = None, *,
                          strict: bool = True) -> LoadResult:
    """Load a PyTorch ``state_dict`` into an anycnn model: torch names (torchvision's and timm's
    for models built with their names), torch layouts, values as torch tensors or NumPy arrays.

    Each tensor is converted to the model's layout (see the module docstring) and copied onto
    the current backend in the model's own dtype (a ``float64`` or ``bfloat16`` file loads
    into a ``float32`` model). ``num_batches_tracked`` entries of BatchNorm layers are ignored.

    Args:
        model: an anycnn model (see the module docstring for the layers it may hold).
        state: ``{torch name: tensor}``, e.g. ``torch_model.state_dict()`` or
            :func:`anycnn.io.weights.read_state_dict` of a weight file.
        input_shape: ``(H, W, C)``, as for :func:`to_torch_state_dict`.
        strict: as in :meth:`~anycnn.nn.module.Module.load_state_dict`: with ``False`` the
            model's tensors the state lacks keep their values and the state's tensors the
            model lacks are ignored (shapes are still checked).

    Returns:
        ``LoadResult(missing, unexpected)``: the model's torch names absent from ``state`` and
        the state's names the model lacks (both empty when ``strict``).

    Raises:
        CheckpointError: with ``strict``, a tensor is missing or unexpected (the first few are
            named, with the counts); a shape differs (the tensor's name and both shapes, in
            PyTorch layout, are given); a value is not a numeric array. The model is then
            unchanged.
        ConfigError: the model has a layer with no PyTorch equivalent.
    """
    plan = _plan(model, input_shape)
    own = model.state_dict()
    expected: dict[str, _Tensor] = {t.name: t for entry in plan for t in entry.tensors}
    ignored = {entry.name + "num_batches_tracked" for entry in plan
               if isinstance(entry.layer, BatchNorm2D)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and k not in ignored]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} of the model's tensors ({_names(missing)})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s) the model lacks "
                         f"({_names(unexpected)})")
        raise CheckpointError("the PyTorch state_dict does not match the model: "
                              + "; ".join(parts) + " (strict=False loads the tensors that "
                              "match and returns the names of the others)")
    converted: dict[str, np.ndarray] = {}
    for name, t in expected.items():
        if name not in state:
            continue
        value = torch_value(name, state[name])
        want = tuple(np.shape(t.to_torch(np.empty(tuple(own[name].shape), dtype=np.uint8))))
        if tuple(value.shape) != want:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(value.shape)} in the PyTorch state_dict but "
                f"the model needs {want} (PyTorch layout {t.description})"
                + _head_hint(model, name, tuple(value.shape), want))
        converted[name] = np.ascontiguousarray(t.from_torch(value))
    model.load_state_dict(converted, strict=strict)
    return LoadResult(missing, unexpected)


def _head_hint(model: Any, name: str, shape: tuple[int, ...], want: tuple[int, ...]) -> str:
    """For a classifier of another class count (PyTorch layout ``(out, in)``): how to
    fine-tune from the file instead."""
    head = getattr(model, "head", None)
    if not (isinstance(head, str) and head and name == f"{head}.weight" and len(shape) == 2
            and shape[1:] == want[1:]):
        return ""
    return (f"; the file's classifier has {shape[0]} classes: build the model with "
            f"num_classes={shape[0]}, load the file, then call "
            f"model.reset_classifier({want[0]})")


def _torch_layer(entry: _Layer, nn: Any) -> Any:
    layer = entry.layer
    if isinstance(layer, Conv2D):
        t, b, l, r = layer.pads
        if isinstance(layer.padding, str):
            padding: Any = layer.padding.lower()
        elif t == b and l == r:
            padding = (t, l)
        else:  # pragma: no cover - conv_padding only makes asymmetric pads for 'same'
            raise ConfigError(f"layer {entry.name[:-1]}: asymmetric padding {layer.pads}")
        return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                         stride=layer.stride, padding=padding, dilation=layer.dilation,
                         groups=layer.groups, bias=layer.bias is not None)
    if isinstance(layer, ConvTranspose2D):
        return nn.ConvTranspose2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                  stride=layer.stride, padding=layer.padding,
                                  output_padding=layer.output_padding, groups=layer.groups,
                                  bias=layer.bias is not None, dilation=layer.dilation)
    if isinstance(layer, Upsample2D):
        corners = {"align_corners": False} if layer.mode == "bilinear" else {}
        return nn.Upsample(scale_factor=tuple(float(s) for s in layer.scale_factor),
                           mode=layer.mode, **corners)
    if isinstance(layer, GroupNorm):
        return nn.GroupNorm(layer.num_groups, layer.num_channels, eps=layer.eps,
                            affine=layer.weight is not None)
    if isinstance(layer, LayerNorm):
        return _channel_layer_norm(nn)(layer.num_channels, eps=layer.eps,
                                       elementwise_affine=layer.weight is not None)
    if isinstance(layer, Dense):
        return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    if isinstance(layer, BatchNorm2D):
        cls = nn.BatchNorm1d if entry.flat_bn else nn.BatchNorm2d
        return cls(layer.num_features, eps=layer.eps, momentum=layer.momentum)
    if isinstance(layer, MaxPool2D):
        return nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding,
                            ceil_mode=layer.ceil_mode)
    if isinstance(layer, AvgPool2D):
        return nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding,
                            ceil_mode=layer.ceil_mode,
                            count_include_pad=layer.count_include_pad)
    if isinstance(layer, GlobalAvgPool2D):
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if isinstance(layer, AdaptiveAvgPool2D):
        return nn.AdaptiveAvgPool2d(layer.output_size)
    if isinstance(layer, Flatten):
        return nn.Flatten()
    if isinstance(layer, ReLU):
        return nn.ReLU()
    if isinstance(layer, LeakyReLU):
        return nn.LeakyReLU(layer.negative_slope)
    if isinstance(layer, Sigmoid):
        return nn.Sigmoid()
    if isinstance(layer, Tanh):
        return nn.Tanh()
    if isinstance(layer, Dropout):
        return nn.Dropout(layer.p)
    if isinstance(layer, GELU):
        return nn.GELU(approximate=layer.approximate)
    if isinstance(layer, Softmax):
        return nn.Softmax(dim=layer.axis)
    for ours, theirs in ((ReLU6, "ReLU6"), (Hardsigmoid, "Hardsigmoid"), (Hardswish, "Hardswish"),
                         (SiLU, "SiLU")):
        if isinstance(layer, ours):
            return getattr(nn, theirs)()
    if isinstance(layer, StochasticDepth):
        return _torch_stochastic_depth(nn)(layer.p, layer.mode)
    if isinstance(layer, Identity):
        return nn.Identity()
    raise ConfigError(f"layer {entry.name[:-1]} ({type(layer).__name__}) has no PyTorch "
                      "equivalent")  # pragma: no cover - _walk rejects these first


@functools.cache
def _torch_stochastic_depth(nn: Any) -> type:
    """A torch module dropping whole rows (or the batch) of a residual branch in training,
    as :class:`~anycnn.nn.layers.StochasticDepth` (torchvision's ``ops.StochasticDepth``
    without needing torchvision)."""
    import torch

    class StochasticDepth(nn.Module):
        def __init__(self, p: float, mode: str) -> None:
            super().__init__()
            self.p, self.mode = p, mode

        def forward(self, x):
            if not self.training or self.p == 0.0:
                return x
            rows = x.shape[0] if self.mode == "row" else 1
            keep = torch.empty((rows,) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
            keep = keep.bernoulli_(1.0 - self.p)
            return x * (keep / (1.0 - self.p) if self.p < 1.0 else keep)

    return StochasticDepth


@functools.cache
def _torch_containers() -> tuple[type, type]:
    """``nn.Module`` classes mirroring :class:`Residual` and :class:`Concat` (torch has none),
    defined on first use so that importing anycnn never imports torch."""
    import torch
    from torch import nn

    class Residual(nn.Module):  # shadows anycnn's Residual here: torch prints this name
        """``body(x) + shortcut(x)``, children named as in anycnn."""

        def __init__(self, body: nn.Module, shortcut: nn.Module) -> None:
            super().__init__()
            self.body, self.shortcut = body, shortcut

        def forward(self, x):
            return self.body(x) + self.shortcut(x)

    class Concat(nn.Module):  # shadows anycnn's Concat here, likewise
        """Children ``"0"``, ``"1"``, ... on the same input, concatenated on dim 1 (channels
        of NCHW, features of (N, F))."""

        def __init__(self, *branches: nn.Module) -> None:
            super().__init__()
            for i, branch in enumerate(branches):
                self.add_module(str(i), branch)

        def __getitem__(self, i: int) -> nn.Module:
            return list(self.children())[i]

        def forward(self, x):
            return torch.cat([branch(x) for branch in self.children()], dim=1)

    return Residual, Concat


@functools.cache
def _channel_layer_norm(nn: Any) -> type:
    """``nn.LayerNorm`` over the channel axis of NCHW input (permuted to NHWC and back), or
    over the last axis of 2-D input; made when first needed (torch stays an optional import)."""

    class ChannelLayerNorm(nn.LayerNorm):
        """LayerNorm of each position's channels (anycnn's LayerNorm on NCHW tensors)."""

        def forward(self, x):
            if x.ndim != 4:
                return super().forward(x)
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    return ChannelLayerNorm


def _torch_tree(module: Module, plan: dict[str, _Layer], prefix: str, nn: Any) -> Any:
    if module.autodiff:
        raise ConfigError(
            f"layer {prefix[:-1] or '<root>'} ({type(module).__name__}) is written as code: "
            "torch_module cannot copy its forward; write the same module in PyTorch and load "
            "to_torch_state_dict(model) into it (the names are the attribute paths)")
    children = [_torch_tree(child, plan, f"{prefix}{name}.", nn)
                for name, child in module.named_children()]
    if isinstance(module, Sequential):
        return nn.Sequential(*children)
    if isinstance(module, Residual | Concat):
        residual, concat = _torch_containers()
        return residual(*children) if isinstance(module, Residual) else concat(*children)
    return _torch_layer(plan[prefix], nn)


def torch_module(model: Module, input_shape: tuple[int, int, int] | None = None, *,
                 copy_weights: bool = True) -> Any:
    """An equivalent ``torch.nn.Sequential`` (NCHW input), on the CPU.

    Args:
        model: an anycnn ``Sequential`` of supported layers and containers.
        input_shape: ``(H, W, C)``, as for :func:`to_torch_state_dict`.
        copy_weights: load the model's weights (else keep PyTorch's own initialisation).

    The module gets the model's floating dtype and its train/eval mode. Its state_dict names are
    the anycnn names, so :func:`from_torch_state_dict` reads its ``state_dict()`` back.
    """
    import torch
    from torch import nn

    plan = _plan(model, input_shape)
    module = _torch_tree(model, {entry.name: entry for entry in plan}, "", nn)
    params = model.parameters()
    if params:
        module = module.to(getattr(torch, dtype_name(params[0].data)))
    if copy_weights:
        state = to_torch_state_dict(model, input_shape)
        module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    module.train(model.training)
    return module
