"""The loss of ``anycnn train``: ``--loss``, ``--class-weights`` and ``--multi-label``.

* ``--loss ce`` (default for class ids): softmax cross-entropy
  (:class:`~anycnn.nn.losses.SoftmaxCrossEntropy`, with ``--label-smoothing``);
  ``--loss bce`` (default with ``--multi-label``): :class:`~anycnn.nn.losses.BCEWithLogits`;
  ``--loss focal``: :class:`~anycnn.nn.losses.SigmoidFocalLoss` (alpha 0.25, gamma 2). The two
  sigmoid losses need multi-label targets (``--multi-label``), and ``ce`` class ids.
* ``--class-weights auto|w1,w2,...``: with ``ce``, PyTorch's ``weight=`` (``auto``: the
  balanced weights ``N / (K * count_c)`` of the training split,
  :func:`~anycnn.nn.losses.class_weights`); with ``bce``, the ``pos_weight`` of each label
  (``auto``: ``negatives / positives`` of the training split, and 1 for a label with no
  positive there, with a one-line warning naming it). The weights used are recorded
  in the checkpoint (``class_weights`` becomes the list of numbers).
* ``--multi-label [LABELS_FILE]``: the image folder's images and labels come from a labels file
  (default ``labels.csv`` in the folder; format in :mod:`anycnn.data.multilabel`).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..errors import ConfigError

LOSSES = ("ce", "bce", "focal")


def add_loss_options(parser: argparse.ArgumentParser) -> None:
    """The loss options of ``anycnn train``."""
    parser.add_argument("--loss", default=None, choices=LOSSES,
                        help="ce: softmax cross-entropy (class ids; default); bce: sigmoid "
                        "binary cross-entropy, focal: sigmoid focal loss (both for "
                        "--multi-label; bce is the default there)")
    parser.add_argument("--class-weights", default=None, metavar="auto|W1,W2,...",
                        help="ce: one weight per class (PyTorch's weight=; auto: balanced, "
                        "N/(K*count)); bce: one pos_weight per label (auto: negatives/positives)")
    parser.add_argument("--multi-label", nargs="?", const="", default=None, metavar="LABELS_FILE",
                        help="image folders: images with any number of labels, listed in a CSV "
                        "labels file of rows 'path,label1;label2' (default: labels.csv in the "
                        "folder)")


def parse_weights(text: str | list | None) -> str | list[float] | None:
    """``--class-weights`` as ``None``, ``"auto"`` or a list of finite numbers >= 0."""
    if text is None or isinstance(text, list):
        return text
    if text.strip().lower() == "auto":
        return "auto"
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--class-weights must be 'auto' or numbers separated by commas, got "
                          f"{text!r}") from None
    if not all(math.isfinite(v) and v >= 0 for v in values) or not any(values):
        raise ConfigError(f"--class-weights must be finite numbers >= 0, not all 0, got {text!r}")
    return values


def check_loss_options(args: argparse.Namespace) -> None:
    """Check the loss options before the data is loaded; fill in ``--loss``'s default."""
    multi = getattr(args, "multi_label", None) is not None
    if args.loss is None:
        args.loss = "bce" if multi else "ce"
    if args.loss == "ce" and multi:
        raise ConfigError("--loss ce takes one class per image; with --multi-label use --loss "
                          "bce or focal")
    if args.loss != "ce" and not multi:
        raise ConfigError(f"--loss {args.loss} is for multi-label data: add --multi-label "
                          "(a labels file), or use --loss ce for one class per image")
    if args.loss != "ce" and args.label_smoothing:
        raise ConfigError(f"--label-smoothing applies to --loss ce, not {args.loss}")
    weights = parse_weights(args.class_weights)
    if weights is not None and args.loss == "focal":
        raise ConfigError("--class-weights applies to --loss ce and bce; the focal loss weighs "
                          "positives by its alpha (0.25)")


def make_loss(args: argparse.Namespace, data: Any):
    """The run's loss for ``data`` (:class:`~anycnn.data.arrays.Splits`); ``--class-weights
    auto`` is resolved on the training split and ``args.class_weights`` set to the numbers
    used."""
    import numpy as np

    from ..nn.losses import BCEWithLogits, SigmoidFocalLoss, SoftmaxCrossEntropy, class_weights

    if args.loss == "focal":
        return SigmoidFocalLoss()
    weights = parse_weights(args.class_weights)
    k = data.num_classes
    if weights == "auto":
        labels = np.asarray(data.train.labels)
        if args.loss == "bce":
            positives = labels.sum(axis=0)
            weights = np.where(positives > 0, (len(labels) - positives)
                               / np.maximum(positives, 1), 1.0).tolist()
            _warn_no_positives(positives, data.class_names)
        else:
            weights = class_weights(labels, k).tolist()
    if weights is not None:
        if len(weights) != k:
            raise ConfigError(f"--class-weights has {len(weights)} value(s) but {data.name} has "
                              f"{k} classes")
        if args.loss == "bce" and not all(w > 0 for w in weights):
            raise ConfigError("--class-weights with --loss bce are pos_weight values: each "
                              "must be > 0")
        args.class_weights = [float(w) for w in weights]
    if args.loss == "bce":
        return BCEWithLogits(pos_weight=weights)
    return SoftmaxCrossEntropy(args.label_smoothing, weight=weights)


def loss_from_config(config: dict, data: Any, multi_label: bool):
    """The loss a run trained with, from its checkpoint's recorded ``config`` (``loss``,
    ``class_weights``, ``label_smoothing``; :func:`make_loss` builds it), so ``anycnn
    evaluate`` reports the loss training's validation did; ``data``: the evaluated
    :class:`~anycnn.data.arrays.Splits` (its number of classes; ``class_weights`` still
    ``"auto"``, which ``anycnn train`` does not record, is resolved on its training split)."""
    loss = config.get("loss")
    if loss not in LOSSES or (loss == "ce") == multi_label:
        loss = "bce" if multi_label else "ce"
    smoothing = config.get("label_smoothing") if loss == "ce" else 0.0
    args = argparse.Namespace(loss=loss, class_weights=config.get("class_weights"),
                              label_smoothing=float(smoothing or 0.0))
    return make_loss(args, data)


def _warn_no_positives(positives, class_names) -> None:
    """``--class-weights auto`` with ``bce``: say which labels have no positive in the
    training split (their ``pos_weight`` falls back to 1)."""
    import sys

    names = list(class_names or ())
    missing = [str(names[i]) if i < len(names) else str(i)
               for i, p in enumerate(positives) if p <= 0]
    if missing:
        print(f"anycnn: warning: --class-weights auto: no positive of {', '.join(missing)} in "
              "the training split; pos_weight 1 for "
              f"{'it' if len(missing) == 1 else 'them'}", file=sys.stderr)
