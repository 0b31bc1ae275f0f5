"""The fine-tuning options of ``anycnn train``: ``--weights``, ``--freeze``, ``--lr-backbone``
and ``--unfreeze-at``.

``--weights PATH|imagenet`` starts the model from a weight file (torchvision/timm names: a
``.safetensors`` or ``.pth`` file; or an anycnn checkpoint) or from torchvision's published
ImageNet weights. When the file's classifier has another number of classes than the dataset,
the classifier (the model's *head*: :attr:`~anycnn.models.backbone.Backbone.head`, or the last
``Dense`` of a ``Sequential``) is replaced by a new one, seeded by ``--seed``, and one line
says so. ``--freeze backbone`` trains the top-level part holding the head alone (``fc``, or
the whole ``classifier`` block with its dropout), ``--freeze N`` freezes the first N
stages (:meth:`~anycnn.models.backbone.Backbone.stages`; for a ``Sequential``, its layers
with parameters), ``--freeze none`` (the default) trains everything. Frozen parts stay in eval
mode (BatchNorm keeps the file's statistics), so they compute exactly the pretrained function.
``--unfreeze-at E`` trains everything from epoch E on (the usual two-phase recipe), and
``--lr-backbone LR`` gives every parameter outside the head its own learning rate (the
schedule scales both). With weights for one of the torchvision architectures (a file or
``imagenet``), ``--normalize`` defaults to ImageNet's mean and std, which those weights
expect.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .common import positive_float, positive_int, say


def add_arguments(t: argparse.ArgumentParser) -> None:
    """The fine-tuning arguments of ``anycnn train``."""
    t.add_argument("--weights", default=None, metavar="PATH|imagenet",
                   help="start from these weights: a .safetensors or .pth file in "
                   "torchvision/timm names, an anycnn checkpoint, or 'imagenet' (torchvision's "
                   "published weights for --model, downloaded once and checked); a classifier "
                   "for another number of classes is replaced")
    t.add_argument("--freeze", default="none", metavar="none|backbone|N",
                   help="train the head alone (backbone), all but the first N stages (N), or "
                   "everything (none, the default); frozen parts keep their BatchNorm "
                   "statistics")
    t.add_argument("--lr-backbone", type=positive_float, default=None, metavar="LR",
                   help="learning rate of the parameters outside the head (default: --lr)")
    t.add_argument("--unfreeze-at", type=positive_int, default=None, metavar="EPOCH",
                   help="train everything from this epoch on (1-based; with --freeze)")


def check(args) -> None:
    """Check the fine-tuning options before any data is loaded (``--freeze`` becomes
    ``"none"``, ``"backbone"`` or an int)."""
    freeze = str(args.freeze).strip().lower()
    if freeze not in ("none", "backbone"):
        try:
            freeze = int(freeze)
        except ValueError:
            raise ConfigError(f"--freeze must be none, backbone or a number of stages, got "
                              f"{args.freeze!r}") from None
        if freeze < 0:
            raise ConfigError(f"--freeze must be >= 0 stages, got {freeze}")
        if freeze > 0:
            _check_stage_count(args.model, freeze)
    args.freeze = freeze
    if args.unfreeze_at is not None and freeze in ("none", 0):
        raise ConfigError("--unfreeze-at ends a --freeze phase: add --freeze backbone "
                          "(or --freeze N)")
    if args.weights is not None:
        from ..io.pretrained import PRETRAINED, is_weights_name, lookup

        if is_weights_name(args.weights):
            _published_preprocessing(args, lookup(args.model, args.weights))
        else:
            from ..io.checkpoint import checkpoint_in

            path = checkpoint_in(args.weights) if Path(args.weights).is_dir() else \
                Path(args.weights)
            if not path.is_file():
                raise ConfigError(f"--weights {args.weights}: no such file")
            args.weights = str(path)
            if args.model in PRETRAINED and args.normalize is None:
                args.normalize = "imagenet"  # torchvision's and timm's files expect it
    if args.unfreeze_at is not None and args.unfreeze_at > args.epochs:
        print(f"anycnn: warning: --unfreeze-at {args.unfreeze_at} is after the last epoch "
              f"({args.epochs}): this run trains with --freeze {args.freeze} throughout",
              file=sys.stderr)
    if args.lr_backbone is not None and freeze == "backbone" and args.unfreeze_at is None:
        print("anycnn: warning: --lr-backbone has no effect with --freeze backbone and no "
              "--unfreeze-at (the backbone does not train)", file=sys.stderr)


def _published_preprocessing(args, entry: Any) -> None:
    """With published weights, what they were trained with is the default: ImageNet's mean
    and std, and on an image folder without ``--image-size`` the weights' resize and crop."""
    from .folders import is_image_folder

    if args.normalize is None:
        args.normalize = "imagenet"
    if (getattr(args, "preprocess_spec", None) is None and args.image_size is None
            and is_image_folder(args.dataset)):
        record = entry.preprocess()
        args.preprocess_spec = f"resize={record['resize']},crop={record['crop']}"


# ---------------------------------------------------------------------------- head and stages


def _check_stage_count(name: str, freeze: int) -> None:
    """Refuse ``--freeze N`` beyond the model's stages before any data is loaded (the model
    is built once on NumPy to count them, the global generator's state put back)."""
    from .. import random
    from ..backend import use_backend
    from ..models import build_model

    state = random.get_state()
    with use_backend("numpy"):
        count = len(stages(build_model(name)))
    random.set_state(state)  # counting draws no numbers from the run's generator
    if freeze > count:
        raise ConfigError(f"--freeze {freeze}: {name} has {count} stages")


def head_path(model: Any) -> str:
    """The dotted path of ``model``'s classifier
    (:func:`~anycnn.models.backbone.classifier_path`)."""
    from ..models.backbone import classifier_path

    path = classifier_path(model)
    if path is None:
        raise ConfigError(f"{type(model).__name__} has no classifier head anycnn can find (a "
                          "Dense at the end of a Sequential, or one of the pretrained "
                          "architectures)")
    return path


def stages(model: Any) -> list[list[Any]]:
    """The parts ``--freeze N`` counts: a Backbone's stages, or a ``Sequential``'s layers
    with parameters before its head."""
    from ..models.backbone import Backbone

    if isinstance(model, Backbone):
        return model.stages()
    head = int(head_path(model))
    return [[layer] for layer in list(model)[:head] if any(True for _ in layer.parameters())]


def head_parameters(model: Any) -> list[Any]:
    """The parameters ``--freeze backbone`` trains and ``--lr-backbone`` leaves at ``--lr``:
    those of the model's top-level part holding the head (``fc``; a ``classifier`` block)."""
    top = head_path(model).split(".")[0]
    return list(dict(model.named_children())[top].parameters())


# ------------------------------------------------------------------------------------ weights


def _replace_head(model: Any, num_classes: int, seed: int) -> None:
    import numpy as np

    from ..models.backbone import reset_classifier

    reset_classifier(model, num_classes, np.random.default_rng(seed))


def _file_state(path: Path, head: str) -> tuple[dict[str, Any], bool, int | None]:
    """``(state, torch_names, classes)``: the file's tensors, whether they are in PyTorch's
    names and layouts (else anycnn's), and its head's class count."""
    from ..io.checkpoint import load_checkpoint
    from ..io.weights import is_anycnn_checkpoint, read_state_dict

    if is_anycnn_checkpoint(path):
        state = dict(load_checkpoint(path).tensors)
        weight = state.get(f"{head}.weight")
        return state, False, None if weight is None else int(weight.shape[-1])
    state = read_state_dict(path)
    weight = state.get(f"{head}.weight")
    return state, True, None if weight is None else int(weight.shape[0])


def load_weights(args, model: Any, num_classes: int) -> None:
    """Load ``--weights`` into ``model`` (built for ``num_classes``), replacing the file's
    classifier when its class count differs (said in one line)."""
    from ..io.interop import from_torch_state_dict
    from ..io.pretrained import is_weights_name, lookup, weight_file

    head = head_path(model)
    if is_weights_name(args.weights):
        entry = lookup(args.model, args.weights)
        path = weight_file(entry, progress=not args.quiet)
        what = f"{args.model} {entry.tag} weights"
    else:
        path, entry, what = Path(args.weights), None, str(args.weights)
    state, torch_names, classes = _file_state(path, head)
    if classes is None:
        raise ConfigError(f"--weights {args.weights}: the file has no {head}.weight, the "
                          f"classifier of {args.model}: is it a {args.model}?")
    replaced = classes != num_classes
    if replaced:
        state = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}
    if torch_names:
        result = from_torch_state_dict(model, state, strict=False)
    else:
        result = model.load_state_dict(state, strict=False)
    extra = [k for k in result.missing if not (replaced and k.startswith(f"{head}."))]
    if extra or result.unexpected:
        names = ", ".join((extra + list(result.unexpected))[:5])
        raise ConfigError(f"--weights {args.weights} does not fit {args.model}: "
                          f"{len(extra)} tensor(s) missing, {len(result.unexpected)} "
                          f"unexpected ({names}, ...)")
    if replaced:  # said even with --quiet: the model is no longer the file's
        _replace_head(model, num_classes, args.seed)
        print(f"loaded {what}; replaced the classifier {head} ({classes} classes) with a new "
              f"one for the dataset's {num_classes} classes")
    else:
        say(args.quiet, f"loaded {what}")
    if entry is not None:
        model.pretrained = entry.record()


# --------------------------------------------------------------------------- freezing, groups


def apply_freeze(args, model: Any, epoch: int) -> bool:
    """Freeze what ``--freeze`` names unless ``--unfreeze-at`` has come (``epoch`` 1-based, the
    epoch about to start); returns whether anything is frozen."""
    model.unfreeze()
    frozen = args.freeze not in ("none", 0) and (
        args.unfreeze_at is None or epoch < args.unfreeze_at)
    if not frozen:
        return False
    if args.freeze == "backbone":
        top = head_path(model).split(".")[0]
        for name, child in model.named_children():
            if name != top:
                child.freeze(eval=True)
    else:
        parts = stages(model)
        if args.freeze > len(parts):
            raise ConfigError(f"--freeze {args.freeze}: {args.model} has {len(parts)} stages")
        for stage in parts[:args.freeze]:
            for module in stage:
                module.freeze(eval=True)
    return True


def parameter_groups(args, model: Any) -> list[dict] | None:
    """With ``--lr-backbone``: the groups of :func:`~anycnn.optim.groups.split_groups` (the
    top-level part holding the head at ``--lr``, the rest at ``--lr-backbone``), else None."""
    from ..optim.groups import split_groups

    if args.lr_backbone is None:
        return None
    return split_groups(model, head_path(model).split(".")[0], lr_backbone=args.lr_backbone)


def unfreeze_callback(args):
    """A callback that applies ``--freeze``/``--unfreeze-at`` at the start of every epoch
    (and so also on a resumed run), saying when everything starts training."""
    from ..train.callbacks import Callback

    class Unfreeze(Callback):
        frozen: bool | None = None

        def on_epoch_begin(self, trainer, epoch) -> None:
            frozen = apply_freeze(args, trainer.model, epoch)
            if self.frozen is not False and not frozen and trainer.comm.rank == 0:
                say(args.quiet, f"epoch {epoch}: unfrozen, training every parameter")
            if not frozen:
                trainer.model.train()
            self.frozen = frozen

    return Unfreeze()
