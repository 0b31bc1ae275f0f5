"""``anycnn summary``: a model's layers with output shapes, parameter counts and FLOPs, for the
input shape of ``--input-shape``, of ``--dataset`` (loaded), or of the preset; or the model of
a checkpoint (``anycnn summary RUN_DIR`` or ``anycnn summary CHECKPOINT``) for the input shape
it records."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from .common import backend_option, model_name, positive_int, select_backend

HELP = "a model's layers with output shapes, parameter counts and FLOPs"


def add_arguments(s: argparse.ArgumentParser) -> None:
    """The arguments of ``anycnn summary``."""
    from ..data.datasets import DATASETS
    from ..models import MODELS

    s.add_argument("checkpoint", nargs="?", default=None, metavar="CHECKPOINT",
                   help="summarise the model of this checkpoint file or run folder (as anycnn "
                   "train writes it) instead of a preset")
    s.add_argument("--model", default=None, type=model_name,
                   help=f"one of {', '.join(MODELS)} (any case; default: lenet5)")
    s.add_argument("--dataset", default=None, help="take the image shape and class count from "
                   f"this dataset (one of {', '.join(DATASETS)}, or an image folder; it is "
                   "loaded)")
    s.add_argument("--data-dir", help="folder holding the dataset's files "
                   "(IDX; CIFAR: the binary version's folder or .tar.gz)")
    s.add_argument("--input-shape", default=None, metavar="H,W,C",
                   help="image shape, channels last, height and width equal (default: 28,28,1, "
                   "or the checkpoint's)")
    s.add_argument("--num-classes", type=positive_int, default=None, metavar="K",
                   help="classes (default: the dataset's, else 10)")
    backend_option(s)


def image_shape_option(text: str) -> tuple[int, int, int]:
    """``--input-shape H,W,C`` as three positive integers with H == W (presets are square),
    channels last; a channels-first shape (``3,32,32``) is refused with the shape meant."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--input-shape expects three positive integers H,W,C such as "
                          f"28,28,1; got {text!r}")
    h, w, c = shape
    if h < w == c:  # 3,32,32: C,H,W
        raise ConfigError(f"--input-shape {text} looks channels first (C,H,W); anycnn takes "
                          f"images channels last (H,W,C): did you mean {w},{c},{h}?")
    if h != w:
        raise ConfigError(f"--input-shape {text}: the presets take square images (H == W)")
    return shape


def run(args) -> int:
    """``anycnn summary``."""
    from ..models import build_model, model_spec
    from ..nn.summarize import summary

    select_backend(args.backend)
    if args.dataset is not None and args.input_shape is not None:
        raise ConfigError("--dataset and --input-shape both set the input shape: pass one")
    if args.checkpoint is not None:
        return _summarise_checkpoint(args)
    name = args.model or "lenet5"
    spec = model_spec(name)
    classes = spec["num_classes"]
    if args.input_shape is not None:
        shape = image_shape_option(args.input_shape)
    elif args.dataset is not None:
        from .folders import load_data

        data = load_data(args.dataset, args.data_dir, {}, progress=False)
        shape, classes = data.image_shape, data.num_classes
    else:
        shape = (spec["image_size"], spec["image_size"], spec["in_channels"])
    classes = args.num_classes or classes
    model = build_model({**spec, "num_classes": classes, "in_channels": shape[2],
                         "image_size": shape[0]})
    table = summary(model, shape)  # (a model refusing the shape prints nothing)
    print(f"model {spec['name']}, {classes} classes")
    print(table)
    return 0


def _summarise_checkpoint(args) -> int:
    """``anycnn summary CHECKPOINT``: the checkpoint's model (rebuilt from its spec, with its
    dtype), for its recorded input shape or ``--input-shape``."""
    from ..io.checkpoint import checkpoint_in, load_model
    from ..nn.summarize import summary

    given = [option for option, value in (("--model", args.model), ("--dataset", args.dataset),
                                          ("--data-dir", args.data_dir),
                                          ("--num-classes", args.num_classes))
             if value is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: a checkpoint's model is summarised as it was "
                          "saved; drop them (or the checkpoint, to summarise a preset)")
    path = checkpoint_in(args.checkpoint)
    model, _ = load_model(path)
    spec = model.model_spec
    shape = (image_shape_option(args.input_shape) if args.input_shape is not None else
             (spec["image_size"], spec["image_size"], spec["in_channels"]))
    table = summary(model, shape)
    print(f"model {spec['name']} from {path}, {spec['num_classes']} classes")
    print(table)
    return 0
