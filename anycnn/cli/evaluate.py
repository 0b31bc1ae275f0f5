"""``anycnn evaluate``: loss, accuracy, top-k and per-class accuracy of a checkpoint, prepared
as in training (the checkpoint's recorded normalisation and image-folder options).

The data is the dataset the checkpoint records (``config["dataset"]``: a built-in name or an
image folder's absolute path) unless ``--dataset`` names another; a checkpoint that records
none (saved from Python) needs ``--dataset``, and data whose classes are not the model's (their
number, or their recorded names) are refused, never evaluated silently. Image folders are
prepared by the recorded evaluation transform (shorter side, centre crop:
:class:`~anycnn.data.eval_transform.EvalTransform`) when there is one, else as in training.
The loss is the one the run trained with (its recorded ``--loss``, ``--class-weights`` and
``--label-smoothing``: :func:`~anycnn.cli.losses.loss_from_config`), so it matches training's
validation loss on the same split.

A multi-label checkpoint (:attr:`~anycnn.io.checkpoint.Checkpoint.multi_label`: ``anycnn train
--multi-label``) is evaluated on its multi-label folder, its labels file the recorded one (or
``--multi-label LABELS_FILE`` for data given with ``--dataset``), and
:class:`~anycnn.train.metrics.MultiLabelMetrics`: label accuracy, mAP, macro/micro F1, subset
accuracy and per-label AP, F1, precision and recall at ``--threshold`` (0.5).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import ConfigError
from .common import backend_option, open_fraction, positive_int, select_backend

HELP = "loss, accuracy, top-k and per-class accuracy of a checkpoint"


def add_arguments(e: argparse.ArgumentParser) -> None:
    """The arguments of ``anycnn evaluate``."""
    e.add_argument("checkpoint", help="a checkpoint file, or a run folder holding "
                   "checkpoint.safetensors")
    e.add_argument("--dataset", default=None, help="a built-in dataset or an image folder "
                   "(default: the one the checkpoint records it was trained on)")
    e.add_argument("--data-dir", help="folder holding the dataset's files (default: the one "
                   "it was trained with)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="which split to evaluate")
    e.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass")
    e.add_argument("--top-k", default=None, metavar="K[,K...]",
                   help="top-k accuracies to report (default: 1,5, or 1 with fewer than 5 "
                   "classes)")
    e.add_argument("--json", action="store_true",
                   help="print one JSON object: loss, accuracy, top-k, per-class accuracy with "
                   "class names, confusion matrix (rows true class, columns predicted)")
    e.add_argument("--multi-label", nargs="?", const="", default=None, metavar="LABELS_FILE",
                   help="the data is a multi-label image folder with a labels file (default: "
                   "labels.csv in the folder; a multi-label checkpoint's own data needs no "
                   "option)")
    e.add_argument("--threshold", type=open_fraction, default=None, metavar="P",
                   help="multi-label: a label counts as predicted when its sigmoid probability "
                   "is >= P (default 0.5)")
    e.add_argument("--confusion-plot", default=None, metavar="FILE",
                   help="also draw the confusion matrix into FILE (.png/.svg/.pdf; needs "
                   "matplotlib)")
    backend_option(e)


def top_k_option(text: str | None, num_classes: int) -> tuple[int, ...]:
    """``--top-k K[,K...]`` checked against the model's classes (default: 1,5, or 1)."""
    from ..train.metrics import check_top_k

    if text is None:
        return (1, 5) if num_classes >= 5 else (1,)
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--top-k expects positive integers separated by commas, got "
                          f"{text!r}") from None
    return check_top_k(values, num_classes)


def run(args) -> int:
    """``anycnn evaluate``."""
    from ..data.augment import read_preprocess
    from ..data.dataloader import DataLoader
    from ..io.checkpoint import checkpoint_in, load_model
    from ..train.metrics import to_json
    from ..train.trainer import evaluate
    from .losses import loss_from_config

    select_backend(args.backend)
    if args.confusion_plot:
        from .plot import pyplot

        pyplot()  # no matplotlib: say so before the evaluation, not after
    path = checkpoint_in(args.checkpoint)
    model, state = load_model(path)
    config = state.config
    record = state.preprocess
    _, normalize = read_preprocess(record)  # as in training
    num_classes = model.model_spec["num_classes"]
    labels_file = multi_label_option(args, path, state)
    if labels_file is not None:
        return _run_multi_label(args, path, model, state, labels_file, normalize)
    if args.threshold is not None:
        raise ConfigError(f"--threshold applies to multi-label models; {path} is single-label")
    top_k = top_k_option(args.top_k, num_classes)
    name, data = eval_data(args, path, config, record, model.model_spec)
    split = getattr(data, args.split)
    names = data.class_names if len(data.class_names) == num_classes else None
    result = evaluate(model, DataLoader(split, args.batch_size, normalize=normalize),
                      loss_from_config(config, data, multi_label=False), top_k=top_k,
                      confusion=True, class_names=names)
    written = None
    if args.confusion_plot:
        from .plot import plot_confusion

        written = plot_confusion(result["confusion_matrix"], result["class_names"],
                                 args.confusion_plot,
                                 title=f"confusion matrix — {name} {args.split}")
    if args.json:
        report = {"checkpoint": str(args.checkpoint), "dataset": name, "split": args.split,
                  **to_json(result)}
        print(json.dumps(report))
        if written:
            print(f"wrote {written}", file=sys.stderr)
        return 0
    print_result(result, name, args.split)
    if written:
        print(f"wrote {written}")
    return 0


def multi_label_option(args, path, checkpoint) -> str | None:
    """The labels file of a multi-label evaluation (``""``: the folder's ``labels.csv``), or
    None for a single-label one: ``--multi-label``'s, else for the recorded dataset the
    recorded one.

    Raises:
        ConfigError: ``--multi-label`` for a single-label checkpoint, or with options that
            only single-label models have (``--top-k``, ``--confusion-plot``).
    """
    given = getattr(args, "multi_label", None)
    if given is not None and not checkpoint.multi_label:
        raise ConfigError(f"--multi-label: {path} holds a single-label model (softmax over its "
                          "classes); evaluate it on data with one class per image")
    if not checkpoint.multi_label:
        return None
    for option, value in (("--top-k", args.top_k), ("--confusion-plot", args.confusion_plot)):
        if value is not None:
            raise ConfigError(f"{option} is for single-label models; {path} is multi-label "
                              "(its report has per-label AP, F1, precision and recall)")
    if given is not None:
        from .folders import labels_file_option

        return labels_file_option(given, args.dataset or checkpoint.config.get("dataset"))
    recorded = checkpoint.config.get("multi_label")
    return recorded if isinstance(recorded, str) and not args.dataset else ""


def _run_multi_label(args, path, model, state, labels_file: str, normalize) -> int:
    """``anycnn evaluate`` of a multi-label checkpoint (module docstring)."""
    from ..data.dataloader import DataLoader
    from ..train.metrics import to_json
    from ..train.trainer import evaluate
    from .losses import loss_from_config

    config, record = state.config, state.preprocess
    name, data = eval_data(args, path, config, record, model.model_spec, labels_file)
    loss_fn = loss_from_config(config, data, multi_label=True)
    threshold = 0.5 if args.threshold is None else args.threshold
    result = evaluate(model, DataLoader(getattr(data, args.split), args.batch_size,
                                        normalize=normalize),
                      loss_fn, multi_label=True, class_names=data.class_names,
                      threshold=threshold)
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "dataset": name,
                          "split": args.split, "threshold": threshold, **to_json(result)}))
        return 0
    print_multi_label(result, name, args.split, threshold)
    return 0


def print_multi_label(result: dict, name: str, split: str, threshold: float) -> None:
    """The human-readable lines of a multi-label evaluation: loss and label accuracy, the
    summary metrics, the labels with the lowest average precision."""
    import numpy as np

    m = result["multi_label"]
    print(f"{name} {split}: loss {result['loss']:.4f} label accuracy "
          f"{m['label_accuracy']:.4f} ({result['count']} images, {len(m['class_names'])} "
          f"labels, threshold {threshold:g})")
    print(f"mAP {m['mAP']:.4f}, macro F1 {m['macro_f1']:.4f}, micro F1 {m['micro_f1']:.4f}, "
          f"subset accuracy {m['subset_accuracy']:.4f}")
    ap = np.asarray(m["per_class_ap"], dtype=np.float64)
    present = np.flatnonzero(~np.isnan(ap))
    worst = present[np.argsort(ap[present], kind="stable")][:3]
    if len(worst):
        print("lowest AP: " + ", ".join(f"{m['class_names'][i]} {ap[i]:.4f} (F1 "
                                        f"{m['per_class_f1'][i]:.4f})" for i in worst))


def eval_data(args, path, config: dict, record: dict | None, spec: dict,
              labels_file: str | None = None):
    """``(name, Splits)`` to evaluate on: ``--dataset`` or the recorded dataset, prepared as
    recorded, with the model's classes (module docstring); ``labels_file`` not None: a
    multi-label folder with that labels file (``""``: its ``labels.csv``).

    Raises:
        ConfigError: no dataset recorded nor given; classes that are not the model's.
        DataError: the recorded folder is gone (the message says to pass ``--dataset``).
    """
    from ..data.augment import read_eval_transform
    from ..errors import DataError
    from .folders import load_eval_data

    name = args.dataset or config.get("dataset")
    if not name:
        raise ConfigError(f"{path} records no dataset (it was saved from Python, not by anycnn "
                          "train): pass --dataset NAME or --dataset FOLDER, the data its "
                          f"{spec['num_classes']} classes come from")
    try:
        data = load_eval_data(name, args.data_dir or config.get("data_dir"), config,
                              progress=not args.json, transform=read_eval_transform(record),
                              model_spec=spec, labels_file=labels_file)
    except DataError as exc:
        if args.dataset:
            raise
        raise DataError(f"{exc} (the dataset recorded in {path}; pass --dataset to evaluate "
                        "on another copy)") from exc
    num_classes = spec["num_classes"]
    if data.num_classes != num_classes:
        raise ConfigError(f"{name} has {data.num_classes} classes but the model in {path} has "
                          f"{num_classes}: pass the --dataset it was trained on")
    recorded = (record or {}).get("class_names")
    if isinstance(recorded, list) and data.class_names and \
            [str(n) for n in recorded] != [str(n) for n in data.class_names]:
        raise ConfigError(f"the classes of {name} ({', '.join(map(str, data.class_names[:5]))}"
                          f"{', ...' if len(data.class_names) > 5 else ''}) are not those "
                          f"{path} was trained on ({', '.join(map(str, recorded[:5]))}"
                          f"{', ...' if len(recorded) > 5 else ''}); labels would not match")
    return name, data


def print_result(result: dict, name: str, split: str) -> None:
    """The human-readable lines: loss and accuracy, top-k beyond 1, the worst classes."""
    from ..train.metrics import worst_classes

    print(f"{name} {split}: loss {result['loss']:.4f} accuracy {result['accuracy']:.4f} "
          f"({result['count']} images)")
    beyond_1 = [f"top-{k} accuracy {v:.4f}" for k, v in result["top_k_accuracy"].items() if k != 1]
    if beyond_1:
        print(", ".join(beyond_1))
    worst = worst_classes(result, 3)
    if worst:
        print("worst classes: " + ", ".join(f"{n} {a:.4f}" for n, a in worst))
