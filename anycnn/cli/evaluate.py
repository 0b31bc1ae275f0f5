"""``anycnn evaluate``: loss, accuracy, top-k and per-class accuracy of a checkpoint, prepared
as in training (the checkpoint's recorded normalisation and image-folder options).

The data is the dataset the checkpoint records (``config["dataset"]``: a built-in name or an
image folder's absolute path) unless ``--dataset`` names another; a checkpoint that records
none (saved from Python) needs ``--dataset``, and data whose classes are not the model's (their
number, or their recorded names) are refused, never evaluated silently. Image folders are
prepared by the recorded evaluation transform (shorter side, centre crop:
:class:`~anycnn.data.eval_transform.EvalTransform`) when there is one, else as in training.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import ConfigError
from .common import backend_option, positive_int, select_backend

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

    select_backend(args.backend)
    if args.confusion_plot:
        from .plot import pyplot

        pyplot()  # no matplotlib: say so before the evaluation, not after
    path = checkpoint_in(args.checkpoint)
    model, state = load_model(path)
    config = state.config
    record = recorded_preprocess(state)
    _, normalize = read_preprocess(record)  # as in training
    num_classes = model.model_spec["num_classes"]
    top_k = top_k_option(args.top_k, num_classes)
    name, data = eval_data(args, path, config, record, model.model_spec)
    split = getattr(data, args.split)
    names = data.class_names if len(data.class_names) == num_classes else None
    result = evaluate(model, DataLoader(split, args.batch_size, normalize=normalize),
                      top_k=top_k, confusion=True, class_names=names)
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


def recorded_preprocess(checkpoint) -> dict | None:
    """The checkpoint's preprocess record: ``extra["preprocess"]`` (:func:`anycnn.save`
    users) or ``config["preprocess"]`` (``anycnn train``, :class:`~anycnn.train.Trainer`)."""
    extra = checkpoint.extra if isinstance(checkpoint.extra, dict) else {}
    record = extra.get("preprocess") or checkpoint.config.get("preprocess")
    return record if isinstance(record, dict) else None


def eval_data(args, path, config: dict, record: dict | None, spec: dict):
    """``(name, Splits)`` to evaluate on: ``--dataset`` or the recorded dataset, prepared as
    recorded, with the model's classes (module docstring).

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
                              model_spec=spec)
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
