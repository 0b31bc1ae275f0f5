"""Eval mode's execution: BatchNorm folded into the convolution before it, and the ReLU and the
residual sum computed in the convolution's own pass.

In eval mode a ``BatchNorm2D`` is a fixed affine map per channel, ``(y - mean) * s + beta``
with ``s = gamma / sqrt(running_var + eps)``. After a ``Conv2D`` with weight ``w``
``(kh, kw, C_in/groups, C_out)`` and bias ``b`` (zero when it has none) that is one
convolution (:func:`fold_batch_norm`)::

    w' = w * s                    (per output channel: the weight's last axis)
    b' = (b - mean) * s + beta

:func:`inference_layers` puts a stand-in ``Conv2D`` with ``w'`` and ``b'`` in place of every
eval-mode ``Conv2D → BatchNorm2D`` pair of a ``Sequential``; the fusions of
:mod:`anycnn.nn.fusion` then treat it as any convolution: ``Conv2D → ReLU`` (:class:`ConvReLU`,
eval mode) applies the ReLU inside the convolution's pass, a ``Residual`` body that ends in a
convolution adds the shortcut inside it (:meth:`~anycnn.nn.layers.Conv2D.forward_add`, the
compiled kernels starting their sums from the shortcut and the bias), and
``Conv2D → BatchNorm2D → ReLU → MaxPool2D`` runs as one compiled Conv-ReLU-MaxPool kernel. A
ResNet block is then two kernels and no pass of its own. ``predict``, ``evaluate`` and the
Trainer's validation run in eval mode, so they use it.

**Freshness.** The folded arrays are computed at the first eval-mode forward and kept on the
``BatchNorm2D`` (:attr:`Module._derived <anycnn.nn.module.Module>`), and each ``Sequential``
keeps its eval plan (:class:`EvalPlan`: the folded stand-ins, the fused steps). Every forward
checks that they were made from what the layers hold now (the same layers, array objects,
settings and :attr:`Parameter.version <anycnn.nn.module.Parameter.version>`: optimizer steps,
also in place, ``load_state_dict`` and ``to`` change one or the other; one identity
comparison per value, in C) and folds again otherwise; ``train()`` and ``eval()`` drop them.
The layers' own parameters and buffers are never changed: ``state_dict``, checkpoints and
training see the model as written.

**Gradients in eval mode** (saliency maps, adversarial inputs): a ``Sequential`` whose forward
was folded runs that forward again unfolded, from the same input, when its backward is called
(eval mode is deterministic), then its backward: the gradients of the unfolded layers, at the
cost of one more forward.

Folding needs the whole model in eval mode: the outermost ``Sequential`` of a forward and
every module in it (:func:`enter_tree` walks them once per forward). So nothing is folded
while a model trains, not even a frozen eval-mode backbone inside it (its backward would pay
one more forward). Nothing is folded either inside :func:`~anycnn.nn.modes.suspended`, in a
``Sequential(..., fuse=False)`` or one that holds a layer twice, for subclasses of the two
layers, or where their dtypes or channel counts differ (the layers then report the mismatch as
usual). In models written as code (a ``forward`` and no ``backward``) the ``Sequential``
parts fold as above, and with gradients off (``predict``, ``evaluate``) ``bn(conv(x))``,
its ReLU and a residual sum fold too (:mod:`anycnn.nn.deferred`).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Iterator
from itertools import chain
from operator import attrgetter, is_
from typing import Any

from ..autograd.mode import STATE
from ..backend import namespace_of
from . import functional as F
from .layers import BatchNorm2D, Conv2D, Dense, ReLU
from .modes import fusion_suspended
from .module import Module, Parameter


def fold_batch_norm(weight: Any, bias: Any, gamma: Any, beta: Any, mean: Any, var: Any,
                    eps: float) -> tuple[Any, Any]:
    """The convolution equal to an eval-mode BatchNorm after a convolution:
    ``(weight * s, (bias - mean) * s + beta)`` with ``s = gamma / sqrt(var + eps)``.

    Args:
        weight: the convolution's ``(..., C_out)`` (output channels on the last axis, as
            ``Conv2D.weight`` ``(kh, kw, C_in/groups, C_out)``); bias: ``(C_out,)`` or None
            (zero).
        gamma, beta, mean, var: the BatchNorm's ``weight``, ``bias``, ``running_mean``,
            ``running_var``, each ``(C_out,)``; eps: its ``eps``.
    Returns:
        ``(weight', bias')`` shaped as ``weight`` and ``(C_out,)``, new arrays in the inputs'
        namespace and dtype.
    """
    xp = namespace_of(weight, bias, gamma, beta, mean, var)
    scale = gamma / xp.sqrt(var + eps)
    shift = beta - mean * scale if bias is None else (bias - mean) * scale + beta
    return weight * scale, shift


_unfolded = contextvars.ContextVar("anycnn_unfolded", default=False)


@contextlib.contextmanager
def unfolded() -> Iterator[None]:
    """Within the block, :func:`inference_layers` folds nothing (a folded ``Sequential``'s
    forward run again for its backward)."""
    token = _unfolded.set(True)
    try:
        yield
    finally:
        _unfolded.reset(token)


_tree_in_eval = contextvars.ContextVar("anycnn_tree_in_eval", default=None)


def tree_in_eval() -> bool | None:
    """Whether the outermost ``Sequential`` of the forward running now, and every module in
    it, is in eval mode (then its ``Sequential`` parts fold); None outside such a forward."""
    return _tree_in_eval.get()


def enter_tree(module: Module) -> contextvars.Token:
    """Start an outermost forward of ``module``: walk its modules once for
    :func:`tree_in_eval` (the nested ``Sequential`` calls read the answer). A tree with a
    module in training mode (a frozen, eval-mode backbone in a model that trains) is not
    folded: its backward would pay one more forward, and a random layer would draw again."""
    return _tree_in_eval.set(_all_eval(module))


def _all_eval(module: Module) -> bool:
    """Whether ``module`` and every module reachable through its attributes are in eval
    mode (the attributes filtered in C: no Python frame or step per attribute)."""
    stack = [module]
    pop, extend, is_module = stack.pop, stack.extend, Module.__instancecheck__
    while stack:
        m = pop()
        if m.training:
            return False
        extend(filter(is_module, m.__dict__.values()))
    return True


def inferring() -> bool:
    """Whether the forward running now is an inference: gradients off (``no_grad``) and the
    whole model in eval mode (:func:`tree_in_eval`), as ``predict``, ``evaluate`` and
    validation run it. Its steps then keep nothing for a backward (:func:`release`; a fused
    block writes no pooling codes): each activation is freed as soon as the next step has read
    it, so the next one's output reuses memory still in the cache. A backward called all the
    same runs the forward again, with gradients on, from the outermost ``Sequential``'s input."""
    return not STATE.grad and bool(_tree_in_eval.get())


#: the attributes in which layers and fused executors keep what their backward reads
_KEPT_FOR_BACKWARD = ("_ctx", "_x", "_out", "_saved")


def release(step: Any) -> None:
    """Drop what ``step`` (a layer, or a fused executor and its layers) kept for its backward,
    after an inference's forward (:func:`inferring`)."""
    for holder in _holders(step):
        for name in _KEPT_FOR_BACKWARD:
            if getattr(holder, name, None) is not None:
                setattr(holder, name, None)


def _holders(step: Any) -> tuple:
    """The objects that keep what ``step`` (a layer, or a fused executor and its layers)
    keeps for its backward."""
    return (step,) if isinstance(step, Module) else (step, *step.layers())


def leave_tree(token: contextvars.Token) -> None:
    """End the forward :func:`enter_tree` started."""
    _tree_in_eval.reset(token)


def folding_off() -> bool:
    """Whether the calling context is inside :func:`unfolded`."""
    return _unfolded.get()


class _Fold:
    """A ``BatchNorm2D`` folded into ``conv``: the stand-in ``twin`` and what it was made from
    (the values of :func:`_watches` on the two layers, kept: compared by identity)."""

    __slots__ = ("conv", "getters", "snapshot", "twin")

    def __init__(self, conv: Conv2D, bn: BatchNorm2D, twin: Conv2D) -> None:
        self.conv, self.twin = conv, twin
        self.getters, _ = _watches([conv, bn])
        self.snapshot = list(_read(self.getters, (conv, bn)))

    def fresh(self, conv: Conv2D, bn: BatchNorm2D) -> bool:
        """Whether ``conv`` and ``bn`` (the layers it is kept on) still hold what it was made
        from: one identity comparison per value, in C."""
        return conv is self.conv and _unchanged(self.getters, (conv, bn), self.snapshot)


def foldable(conv: Module, bn: Module) -> bool:
    """Whether ``conv``, ``bn`` (adjacent layers) fold: exactly a Conv2D and a BatchNorm2D,
    both in eval mode, with matching channels and one dtype."""
    if type(conv) is not Conv2D or type(bn) is not BatchNorm2D:
        return False
    if conv.training or bn.training or bn.num_features != conv.out_channels:
        return False
    dtype = conv.weight._data.dtype
    arrays = (None if conv.bias is None else conv.bias._data, bn.weight._data, bn.bias._data,
              bn.running_mean, bn.running_var)
    return all(a is None or a.dtype == dtype for a in arrays)


def folded(conv: Conv2D, bn: BatchNorm2D) -> Conv2D:
    """The stand-in ``Conv2D`` for eval-mode ``conv`` followed by ``bn``: ``conv``'s geometry
    with the folded weight and bias (frozen parameters of its own), kept on ``bn`` and made
    again when any array it came from has changed."""
    cached = bn._derived
    if isinstance(cached, _Fold) and cached.fresh(conv, bn):
        return cached.twin
    bias = None if conv.bias is None else conv.bias._data
    weight, bias = fold_batch_norm(conv.weight._data, bias, bn.weight._data, bn.bias._data,
                                   bn.running_mean, bn.running_var, bn.eps)
    twin = copy.copy(conv)  # shallow: the same geometry, its own parameters and state
    twin.weight = Parameter(weight, requires_grad=False)
    twin.bias = Parameter(bias, requires_grad=False)
    twin.training, twin._ctx, twin._derived = False, None, None
    bn._derived = _Fold(conv, bn, twin)
    return twin


#: what a fold (:class:`_Fold`) or a kept :class:`EvalPlan` was made from, read off each
#: watched layer by one ``attrgetter``: the arrays, the parameters' versions (in-place
#: updates), the settings, the channel counts and groups (:func:`foldable`, the fusions'
#: ``accepts``), compared by identity (an unchanged read gives the same objects; ``bias``
#: itself: added or removed).
_CONV_WATCH = ("weight._data", "weight._version", "bias", "stride", "pads", "dilation",
               "groups", "out_channels")
_BIAS_WATCH = ("bias._data", "bias._version")
_BN_WATCH = ("weight._data", "weight._version", "bias._data", "bias._version",
             "running_mean", "running_var", "eps", "num_features")


def _watches(layers: list[Module]) -> tuple[list[Any], list[Module]]:
    """``(getters, watched)``: each ``Conv2D`` and ``BatchNorm2D`` (exact types) of ``layers``
    and the getter of everything :func:`inference_layers` and
    :func:`~anycnn.nn.fusion.execution_plan` read of it besides its type and mode."""
    getters, watched = [], []
    for layer in layers:
        if type(layer) is Conv2D:
            names = _CONV_WATCH if layer.bias is None else _CONV_WATCH + _BIAS_WATCH
        elif type(layer) is BatchNorm2D:
            names = _BN_WATCH
        else:
            continue
        getters.append(attrgetter(*names))
        watched.append(layer)
    return getters, watched


#: ``_apply(getter, layer)`` is ``getter(layer)``, callable from ``map`` with no Python frame
_apply = attrgetter.__call__


def _read(getters: list[Any], watched: list[Module]) -> Iterator[Any]:
    """The watched attributes' values, one flat iterator (read as it is consumed)."""
    return chain.from_iterable(map(_apply, getters, watched))


def _unchanged(getters: list[Any], watched: Any, snapshot: list[Any]) -> bool:
    """Whether :func:`_read` of ``watched`` gives the objects of ``snapshot`` (an earlier read),
    one identity comparison per value, in C; False where an attribute is gone (a bias
    removed)."""
    try:
        return all(map(is_, _read(getters, watched), snapshot))
    except AttributeError:
        return False


class EvalPlan:
    """A ``Sequential``'s eval-mode execution plan (folded, fused), kept on it
    (:attr:`Module._derived <anycnn.nn.module.Module>`, so ``train()`` and ``eval()`` drop
    it) and used again while :meth:`valid`: the same layers, and every array, parameter,
    version and setting that the folds and fusions read the same object as when it was made.
    Anything else (an optimizer step, ``load_state_dict``, ``to``, a new ``eps``) makes it
    again, folding anew the pairs whose own arrays changed (:func:`folded`).

    Attributes:
        layers: the ``Sequential``'s layers it was made for (a list, by identity).
        plan: the steps to run (layers, folded stand-ins, fused executors).
        folded: whether a pair was folded (its backward then runs the forward again).
        releases: per step of ``plan``, the ``(object, attribute)`` pairs in which it keeps
            state for its backward, read after its first forward (:meth:`release`).
    """

    __slots__ = ("folded", "getters", "layers", "plan", "releases", "snapshot", "watched")

    def __init__(self, layers: list[Module], plan: list[Any], folded: bool) -> None:
        self.layers, self.plan, self.folded = layers, plan, folded
        self.getters, self.watched = _watches(layers)
        self.snapshot = list(_read(self.getters, self.watched))  # keeps the objects alive
        self.releases: list[list | None] = [None] * len(plan)

    def valid(self, layers: list[Module]) -> bool:
        """Whether the plan still runs ``layers`` (the ``Sequential``'s, read now) as made:
        one identity comparison per watched value, in C."""
        return layers == self.layers and _unchanged(self.getters, self.watched, self.snapshot)

    def release(self, i: int) -> None:
        """:func:`release` of step ``i`` after its forward: the attributes it keeps state in
        found once, then set to None."""
        pairs = self.releases[i]
        if pairs is None:
            pairs = self.releases[i] = [(holder, name) for holder in _holders(self.plan[i])
                                        for name in _KEPT_FOR_BACKWARD
                                        if hasattr(holder, name)]
        for holder, name in pairs:
            setattr(holder, name, None)


def inference_layers(layers: list[Module]) -> list[Module]:
    """``layers`` with each eval-mode ``Conv2D → BatchNorm2D`` pair replaced by its folded
    stand-in (:func:`folded`); ``layers`` itself (the same list) when nothing folds, in
    training mode, inside :func:`unfolded` and inside :func:`~anycnn.nn.modes.suspended`."""
    if _unfolded.get() or fusion_suspended():
        return layers
    out: list[Module] = []
    i, changed = 0, False
    while i < len(layers):
        if i + 1 < len(layers) and foldable(layers[i], layers[i + 1]):
            out.append(folded(layers[i], layers[i + 1]))
            i, changed = i + 2, True
        else:
            out.append(layers[i])
            i += 1
    return out if changed else layers


class ReLUInside:
    """A ``layer → ReLU`` run whose layer applies the ReLU inside its own pass
    (``layer.forward(x, relu=True)``); the backward takes the ReLU's gradient from the kept
    output, then the layer's. Exact. Subclasses name the layer type (``pattern``)."""

    pattern: tuple = ()

    def __init__(self, layer: Module, relu: ReLU) -> None:
        self.layer, self.relu = layer, relu
        self._out: Any = None

    def layers(self) -> list[Module]:
        """The layers this executor runs."""
        return [self.layer, self.relu]

    def forward(self, x: Any) -> Any:
        self._out = self.layer.forward(x, relu=True)
        return self._out

    def backward(self, dy: Any, input_grad: bool = True) -> Any:
        if self._out is None:
            raise RuntimeError(f"fused {type(self.layer).__name__}/ReLU backward called before "
                               "forward, or called twice for one forward")
        out, self._out = self._out, None
        return self.layer.backward(F.relu_grad(out, dy), input_grad)


class EvalReLUInside(ReLUInside):
    """A :class:`ReLUInside` run fused in eval mode only (training runs the layers as
    before)."""

    @staticmethod
    def accepts(run: list[Module]) -> bool:
        """Eval mode only."""
        return not (run[0].training or run[1].training)


class ConvReLU(EvalReLUInside):
    """An eval-mode ``Conv2D → ReLU`` run (a folded convolution's usual successor): the ReLU
    applied inside the convolution's pass (``Conv2D.forward(x, relu=True)``)."""

    pattern = (Conv2D, ReLU)


class DenseReLU(EvalReLUInside):
    """An eval-mode ``Dense → ReLU`` run: the bias and the ReLU in one pass after the Dense's
    product (``Dense.forward(x, relu=True)``), as onnxruntime's fused Gemm does."""

    pattern = (Dense, ReLU)
