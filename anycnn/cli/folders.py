"""Image folders in the ``anycnn`` command: ``anycnn train --dataset PATH`` (any existing
folder that is not a built-in dataset name, or any value with a ``/``) loads
:func:`anycnn.data.imagefolder.load_image_folder` with ``--image-size``, ``--channels``,
``--val-split``, ``--bad-images`` and ``--preprocess`` (:mod:`anycnn.cli.transforms`);
``evaluate`` and ``summary`` load data the same way (``evaluate`` with the checkpoint's
options and recorded evaluation transform).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .common import open_fraction, positive_int

DEFAULT_VAL_SPLIT = 0.1
DEFAULT_BAD_IMAGES = "stop"

#: ``anycnn train`` options that only apply to image folders
FOLDER_OPTIONS = ("image_size", "channels", "val_split", "bad_images", "preprocess_spec")

#: the command-line spelling of a FOLDER_OPTIONS key whose dest differs from it
_OPTION_NAMES = {"preprocess_spec": "--preprocess"}


def add_folder_options(parser: argparse.ArgumentParser) -> None:
    """The image-folder options of ``anycnn train``."""
    parser.add_argument("--image-size", type=positive_int, default=None, metavar="N",
                        help="image folders: resize every image to NxN (default: keep the size "
                        "when all images share one, else required)")
    parser.add_argument("--channels", type=int, default=None, choices=[1, 3],
                        help="image folders: 1 grayscale or 3 RGB (default: 1 when every image "
                        "is grayscale, else 3)")
    parser.add_argument("--val-split", type=open_fraction, default=None, metavar="FRACTION",
                        help="image folders without a val/ subfolder: share of the images used "
                        f"for validation, chosen by a fixed seeded permutation (default: "
                        f"{DEFAULT_VAL_SPLIT})")
    parser.add_argument("--bad-images", default=None, choices=["stop", "skip"],
                        help="image folders: on an unreadable image, stop with its path, or "
                        f"skip it with a warning (default: {DEFAULT_BAD_IMAGES})")
    from .transforms import add_preprocess_option

    add_preprocess_option(parser)


def is_image_folder(name: str | None) -> bool:
    """Whether ``--dataset name`` means an image folder: not a built-in dataset name, and an
    existing directory or a path (holding a ``/``)."""
    from ..data.datasets import DATASETS

    if not name:
        return False
    text = str(name)
    if text.strip().lower().replace("_", "-") in DATASETS:
        return False
    return os.sep in text or "/" in text or Path(text).is_dir()


def normalise_dataset(name: str) -> str:
    """``name`` as recorded in checkpoints: an image folder's absolute path, else as given."""
    return str(Path(name).resolve()) if is_image_folder(name) else name


def run_label(name: str) -> str:
    """A short name for the default run folder: an image folder's own name."""
    return Path(name).name if is_image_folder(name) else name


def load_data(name: str, data_dir: str | None, options: dict[str, Any], progress: bool):
    """The :class:`~anycnn.data.arrays.Splits` of ``--dataset name``: an image folder with
    ``options`` (keys of :data:`FOLDER_OPTIONS`; ``None`` means the default; and the geometry
    keys ``resize_shorter``, ``train_size``, ``resample`` of
    :func:`~anycnn.data.imagefolder.load_image_folder`), or a built-in dataset, for which
    those options must be unset. Warnings about skipped images are printed as
    ``anycnn: warning: ...`` lines."""
    from ..data.datasets import load_dataset

    if not is_image_folder(name):
        given = [_OPTION_NAMES.get(k, f"--{k.replace('_', '-')}") for k in FOLDER_OPTIONS
                 if options.get(k) is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise ConfigError(f"{', '.join(given)} {verb} only to image folders (--dataset PATH), "
                              f"not to {name}")
        return load_dataset(name, data_dir=data_dir, progress=progress)
    if data_dir is not None:
        raise ConfigError("--data-dir is for the built-in datasets; an image folder is given "
                          "as --dataset PATH")
    from ..data.imagefolder import load_image_folder

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_image_folder(
            name, size=options.get("image_size"), channels=options.get("channels"),
            resample=options.get("resample") or "bilinear",
            resize_shorter=options.get("resize_shorter"), train_size=options.get("train_size"),
            val_split=options.get("val_split") or DEFAULT_VAL_SPLIT,
            bad_images=options.get("bad_images") or DEFAULT_BAD_IMAGES, progress=progress)
    for warning in caught:
        print(f"anycnn: warning: {warning.message}", file=sys.stderr)
    return data


def load_train_data(args: argparse.Namespace, progress: bool):
    """The training data of ``anycnn train``; fills in the image-folder defaults used (so the
    checkpoint records them)."""
    from .transforms import folder_geometry

    options = {k: getattr(args, k, None) for k in FOLDER_OPTIONS}
    if is_image_folder(args.dataset):  # (a built-in dataset refuses --preprocess below)
        options.update(folder_geometry(args))
    if getattr(args, "multi_label", None) is not None:
        data = load_multilabel(args.dataset, args.multi_label, options, progress)
    else:
        data = load_data(args.dataset, args.data_dir, options, progress)
    if is_image_folder(args.dataset):
        args.val_split = args.val_split or DEFAULT_VAL_SPLIT
        args.bad_images = args.bad_images or DEFAULT_BAD_IMAGES
        h, w, _ = data.image_shape
        if h != w:
            raise ConfigError(f"{args.dataset}: the images are {h}x{w} (H x W), but the models "
                              "take square images: pass --image-size N to resize them")
    return data


def labels_file_option(value: str | None, dataset: str | None = None) -> str | None:
    """``--multi-label``'s value as recorded in checkpoints: ``""`` (the folder's
    ``labels.csv``), a labels file's absolute path, or None (not multi-label). A relative
    path missing from the current folder but present in the ``dataset`` folder is that one
    (``--multi-label tags.csv`` for ``--dataset photos/`` reads ``photos/tags.csv``); else
    the path as given, which the loader reports when missing."""
    if not value:
        return value
    path = Path(value)
    inside = Path(dataset) / path if dataset else None
    if not path.is_absolute() and not path.exists() and inside is not None and inside.is_file():
        path = inside
    return str(path.resolve())


def load_multilabel(name: str, labels_file: str | None, options: dict[str, Any],
                    progress: bool):
    """``--multi-label [LABELS_FILE]``: the multi-label image folder ``name`` with its labels
    file (``""``/None: the folder's ``labels.csv``) and ``options`` (as :func:`load_data`'s;
    :func:`anycnn.data.multilabel.load_multilabel_folder`)."""
    if not is_image_folder(name):
        raise ConfigError(f"--multi-label applies to image folders (--dataset PATH), not to "
                          f"{name}")
    from ..data.multilabel import load_multilabel_folder

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_multilabel_folder(
            name, labels_file or None, size=options.get("image_size"),
            channels=options.get("channels"), resample=options.get("resample") or "bilinear",
            resize_shorter=options.get("resize_shorter"),
            val_split=options.get("val_split") or DEFAULT_VAL_SPLIT,
            bad_images=options.get("bad_images") or DEFAULT_BAD_IMAGES, progress=progress)
    for warning in caught:
        print(f"anycnn: warning: {warning.message}", file=sys.stderr)
    return data


def load_eval_data(name: str, data_dir: str | None, config: dict[str, Any], progress: bool,
                   transform: Any = None, model_spec: dict[str, Any] | None = None,
                   labels_file: str | None = None):
    """The data ``anycnn evaluate`` uses: an image folder with the options it was trained with
    (``config``, the checkpoint's) and every split prepared by ``transform`` (the recorded
    :class:`~anycnn.data.eval_transform.EvalTransform`: shorter side, centre crop), or a
    built-in dataset. A folder for a checkpoint that records no image options (saved from
    Python) is resized to the ``model_spec``'s input instead. ``labels_file`` (not None: a
    multi-label folder; ``""`` its ``labels.csv``) reads the images and labels from a labels
    file (:func:`load_multilabel`)."""
    options: dict[str, Any] = {}
    if is_image_folder(name):
        options = {k: config.get(k) for k in FOLDER_OPTIONS if k != "preprocess_spec"}
        if transform is not None:
            options.update(image_size=transform.crop, resize_shorter=transform.resize,
                           resample=transform.interpolation)
        elif "image_size" not in config and model_spec is not None:
            options.update(image_size=model_spec.get("image_size"),
                           channels=model_spec.get("in_channels"))
    if labels_file is not None:
        if data_dir is not None:
            raise ConfigError("--data-dir is for the built-in datasets; a multi-label image "
                              "folder is given as --dataset PATH")
        return load_multilabel(name, labels_file, options, progress)
    return load_data(name, data_dir, options, progress)
