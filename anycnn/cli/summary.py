"""``anycnn summary``: a model's layers with output shapes, parameter counts and FLOPs, for the
input shape of ``--input-shape``, of ``--dataset`` (loaded), or of the preset."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from .common import backend_option, select_backend

HELP = "a model's layers with output shapes, parameter counts and FLOPs"


def add_arguments(s: argparse.ArgumentParser) -> None:
    """The arguments of ``anycnn summary``."""
    from ..data.datasets import DATASETS
    from ..models import MODELS

    s.add_argument("--model", default="lenet5", help=f"one of {', '.join(MODELS)}")
    s.add_argument("--dataset", default=None, help="take the image shape and class count from "
                   f"this dataset (one of {', '.join(DATASETS)}, or an image folder; it is "
                   "loaded)")
    s.add_argument("--data-dir", help="folder holding the dataset's files "
                   "(IDX; CIFAR: the binary version's folder or .tar.gz)")
    s.add_argument("--input-shape", default=None, metavar="H,W,C",
                   help="image shape, height and width equal (default: 28,28,1)")
    s.add_argument("--num-classes", type=int, default=None, metavar="K",
                   help="classes (default: the dataset's, else 10)")
    backend_option(s)


def image_shape_option(text: str) -> tuple[int, int, int]:
    """``--input-shape H,W,C`` as three positive integers with H == W (presets are square)."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--input-shape expects three positive integers H,W,C such as "
                          f"28,28,1; got {text!r}")
    if shape[0] != shape[1]:
        raise ConfigError(f"--input-shape {text}: the presets take square images (H == W)")
    return shape


def run(args) -> int:
    """``anycnn summary``."""
    from ..models import build_model, model_spec
    from ..nn.summarize import summary

    select_backend(args.backend)
    spec = model_spec(args.model)
    if args.dataset is not None and args.input_shape is not None:
        raise ConfigError("--dataset and --input-shape both set the input shape: pass one")
    if args.num_classes is not None and args.num_classes < 1:
        raise ConfigError(f"--num-classes must be >= 1, got {args.num_classes}")
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
    print(f"model {args.model}, {classes} classes")
    print(summary(model, shape))
    return 0
