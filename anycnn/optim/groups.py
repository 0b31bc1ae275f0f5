"""Parameter groups for the usual recipes, to pass to an optimizer as ``params``.

* :func:`decay_groups`: no weight decay on normalisation layers and biases
  (``AdamW(decay_groups(model), lr=1e-3, weight_decay=0.05)``).
* :func:`split_groups`: discriminative learning rates, one for a (pretrained) backbone and the
  optimizer's own for a (new) head (``SGD(split_groups(model, "fc", lr_backbone=1e-3),
  lr=1e-2)``), optionally combined with the no-decay split.

Both return a list of group dicts (``{"params": [...], "name": ..., ...}``, empty groups left
out) in the order of ``model.named_parameters()``. Frozen parameters are included: the optimizer
skips them while frozen and trains them at their group's rate once unfrozen (the two-phase
fine-tuning recipe needs no new optimizer). A parameter shared by two places of the model is
listed once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError
from ..nn.layers import BatchNorm2D, GroupNorm, LayerNorm
from ..nn.module import Module, Parameter
from .optimizers import _check_positive

#: layer types whose parameters ``"norm"`` in ``no_decay`` names
_NORM_LAYERS: tuple[type[Module], ...] = (BatchNorm2D, GroupNorm, LayerNorm)


def _check_model(model: Any, caller: str) -> Module:
    if not isinstance(model, Module):
        raise ConfigError(f"{caller} needs the model (a Module: it reads the layer types and "
                          f"parameter names), got {type(model).__name__}")
    return model


def _named_unique(model: Module) -> list[tuple[str, Parameter]]:
    """``model.named_parameters()`` with each Parameter once (its first name)."""
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _no_decay_ids(model: Module, no_decay: Any, caller: str) -> set[int]:
    """``id``\\ s of the parameters ``no_decay`` names (see :func:`decay_groups`)."""
    if isinstance(no_decay, str | type):
        no_decay = (no_decay,)
    try:
        entries = tuple(no_decay)
    except TypeError:
        entries = (no_decay,)
    layer_types: list[type] = []
    by_name = False
    for entry in entries:
        if entry == "norm":
            layer_types.extend(_NORM_LAYERS)
        elif entry == "bias":
            by_name = True
        elif isinstance(entry, type) and issubclass(entry, Module):
            layer_types.append(entry)
        else:
            raise ConfigError(f"{caller}: no_decay takes 'bias', 'norm' (BatchNorm2D, "
                              "GroupNorm, LayerNorm) and Module classes, got "
                              f"{entry!r}")
    ids: set[int] = set()
    if layer_types:
        for m in model.modules():
            if isinstance(m, tuple(layer_types)):
                ids.update(id(p) for p in m.parameters())
    if by_name:
        ids.update(id(p) for name, p in model.named_parameters()
                   if name.rsplit(".", 1)[-1] == "bias")
    return ids


def _split_decay(named: list[tuple[str, Parameter]], skip: set[int], prefix: str,
                 weight_decay: float | None) -> list[dict[str, Any]]:
    decay = [p for _, p in named if id(p) not in skip]
    rest = [p for _, p in named if id(p) in skip]
    groups = []
    if decay:
        group: dict[str, Any] = {"params": decay, "name": prefix or "decay"}
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
        groups.append(group)
    if rest:
        groups.append({"params": rest, "name": f"{prefix}.no_decay" if prefix else "no_decay",
                       "weight_decay": 0.0})
    return groups


def decay_groups(model: Module, weight_decay: float | None = None, *,
                 no_decay: Sequence[str | type[Module]] = ("bias", "norm")
                 ) -> list[dict[str, Any]]:
    """Two parameter groups of ``model``: ``"decay"`` and ``"no_decay"`` (weight decay 0).

    Args:
        model: the model (a :class:`~anycnn.nn.module.Module`).
        weight_decay: the ``"decay"`` group's weight decay; None (default) leaves it to the
            optimizer's ``weight_decay``.
        no_decay: what gets no weight decay: ``"bias"`` (every parameter named ``bias``:
            those of ``Dense``, ``Conv2D``, ...), ``"norm"`` (every parameter of a
            ``BatchNorm2D``, ``GroupNorm`` or ``LayerNorm`` layer, found by type, not by name)
            and Module classes (every parameter of layers of that type, e.g. your own norm
            layer).

    Returns:
        ``[{"params", "name": "decay"[, "weight_decay"]}, {"params", "name": "no_decay",
        "weight_decay": 0.0}]``, leaving out an empty one.

    Raises:
        ConfigError: ``model`` is not a Module, a bad ``weight_decay`` or ``no_decay`` entry.
    """
    model = _check_model(model, "decay_groups")
    if weight_decay is not None:
        weight_decay = _check_positive("decay_groups: weight_decay", weight_decay,
                                       allow_zero=True)
    skip = _no_decay_ids(model, no_decay, "decay_groups")
    return _split_decay(_named_unique(model), skip, "", weight_decay)


def _head_ids(model: Module, head: Any) -> set[int]:
    """``id``\\ s of the parameters of ``head`` (a Module, a name prefix or several)."""
    if isinstance(head, Module):
        ids = {id(p) for p in head.parameters()}
        if not ids & {id(p) for p in model.parameters()}:
            raise ConfigError("split_groups: the head module holds no parameter of the model")
        return ids
    prefixes = (head,) if isinstance(head, str) else tuple(head) if isinstance(
        head, Sequence) else None
    if not prefixes or not all(isinstance(h, str) and h for h in prefixes):
        raise ConfigError("split_groups: head must be a submodule of the model, its name "
                          f"(e.g. 'fc', 'classifier'), or a list of names; got {head!r}")
    ids = set()
    for prefix in prefixes:
        found = {id(p) for name, p in model.named_parameters()
                 if name == prefix or name.startswith(prefix.rstrip(".") + ".")}
        if not found:
            parts = ", ".join(name for name, _ in model.named_children()) or "none"
            raise ConfigError(f"split_groups: head {prefix!r} names no parameter of the model "
                              f"(its parts: {parts})")
        ids |= found
    return ids


def split_groups(model: Module, head: str | Sequence[str] | Module, *, lr_backbone: float,
                 lr: float | None = None, no_decay: Sequence[str | type[Module]] = ()
                 ) -> list[dict[str, Any]]:
    """Parameter groups for discriminative learning rates: the head's and the rest's.

    Args:
        model: the model (a :class:`~anycnn.nn.module.Module`).
        head: the head: a submodule (``model.fc``), or the dotted name of one (``"fc"``,
            ``"classifier"``, ``"7"`` for the eighth layer of a ``Sequential``), or several.
            A name matches that module's parameters (``"fc"`` matches ``fc.weight``, not
            ``fc2.weight``).
        lr_backbone: the learning rate of every other parameter (> 0).
        lr: the head's learning rate; None (default) leaves it to the optimizer's ``lr``, so
            ``optimizer.lr`` and schedules speak of the head's rate and the backbone's keeps
            its ratio to it.
        no_decay: as in :func:`decay_groups`; when given, each part is split further and its
            ``"<part>.no_decay"`` group gets weight decay 0 (the others take the optimizer's).

    Returns:
        ``"backbone"`` (``lr`` = ``lr_backbone``), then ``"head"`` groups, and with
        ``no_decay`` ``"backbone.no_decay"`` and ``"head.no_decay"`` after each; empty ones
        left out.

    Raises:
        ConfigError: ``model`` is not a Module; ``head`` names no parameter, or every one; a
            bad learning rate or ``no_decay`` entry.
    """
    model = _check_model(model, "split_groups")
    lr_backbone = _check_positive("split_groups: lr_backbone", lr_backbone)
    if lr is not None:
        lr = _check_positive("split_groups: lr", lr)
    heads = _head_ids(model, head)
    named = _named_unique(model)
    backbone = [(n, p) for n, p in named if id(p) not in heads]
    top = [(n, p) for n, p in named if id(p) in heads]
    if not backbone:
        raise ConfigError("split_groups: the head holds every parameter of the model; "
                          "nothing is left for lr_backbone")
    skip = _no_decay_ids(model, no_decay, "split_groups") if no_decay else set()
    groups = []
    for part, members, rate in (("backbone", backbone, lr_backbone), ("head", top, lr)):
        for group in _split_decay(members, skip, part, None):
            if rate is not None:
                group["lr"] = rate
            groups.append(group)
    return groups
