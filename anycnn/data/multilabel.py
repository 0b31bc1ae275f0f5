"""Multi-label image folders: images listed in a labels file, each with any number of labels.

**Labels file** (CSV, UTF-8; default ``labels.csv`` inside the folder)::

    path,labels
    beach/001.jpg,sea;sky;sand
    city/7.png,sky
    misc/blank.png,

* one row per image: its path **relative to the labels file's folder**, a comma, then its
  label names separated by ``;`` (an empty second column: an image with no label; spaces
  around names are dropped). Quote a path that holds a comma (``"a,b.png",sky``); a label
  name cannot hold one (a quoted ``"sea,sky"`` cell is an error, not one label).
* a first row ``path,labels`` is a header and skipped; blank rows and rows starting with ``#``
  are ignored.
* the label names, sorted, are the classes (``class_names``); the targets are ``(N, K)``
  float32 0/1 rows (:class:`~anycnn.data.arrays.ArrayDataset` with ``multi_label`` true), for
  :class:`~anycnn.nn.losses.BCEWithLogits` or :class:`~anycnn.nn.losses.SigmoidFocalLoss`.

A missing or repeated path, a row without its label column, or a file that lists no image is a
:class:`~anycnn.errors.DataError` naming the file and line. Images are decoded and cached as
:mod:`anycnn.data.imagefolder` does (same options, same cache, same ``bad_images`` policy), and
split into train and validation by the same seeded permutation (``val_split``, ``split_seed``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .arrays import Splits
from .imagefolder import (
    BAD_IMAGE_POLICIES,
    CACHE_VERSION,
    SPLIT_SEED,
    Options,
    decode_cached,
    default_cache_dir,
    split_decoded,
)

#: the labels file looked for inside the folder when none is given
DEFAULT_LABELS_FILE = "labels.csv"


def read_labels_file(path: str | os.PathLike) -> tuple[list[tuple[Path, tuple[str, ...]]],
                                                       tuple[str, ...]]:
    """The rows of a labels file (format in the module docstring).

    Returns:
        ``(rows, class_names)``: ``rows`` one ``(image path, label names)`` per image in file
        order, paths resolved against the file's folder; ``class_names`` the sorted names.

    Raises:
        DataError: no such file, a malformed row, a missing or repeated image, no image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels file {path}: no such file (expected CSV rows "
                        "'image/path.png,label1;label2')")
    rows: list[tuple[Path, tuple[str, ...]]] = []
    seen: dict[Path, int] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for line, cells in enumerate(csv.reader(f), start=1):
            if not cells or not "".join(cells).strip() or cells[0].lstrip().startswith("#"):
                continue
            if line == 1 and [c.strip().lower() for c in cells] == ["path", "labels"]:
                continue
            if len(cells) != 2:
                hint = ("; a column per label (one-hot) is not read: give each image's label "
                        "names in one column separated by ';', under a header 'path,labels'"
                        if len(cells) > 2 else "")
                raise DataError(f"{path}, line {line}: expected 'image path,label1;label2' (2 "
                                f"columns), got {len(cells)} column(s){hint}")
            if "," in cells[1]:
                raise DataError(f"{path}, line {line}: the labels {cells[1]!r} hold a comma; "
                                "labels are separated by ';' (e.g. sea;sky), and a label "
                                "name cannot hold a comma")
            image = (path.parent / cells[0].strip()).resolve()
            if image in seen:
                raise DataError(f"{path}, line {line}: {cells[0].strip()} is listed twice "
                                f"(first on line {seen[image]})")
            if not image.is_file():
                raise DataError(f"{path}, line {line}: image {cells[0].strip()} not found "
                                f"(paths are relative to {path.parent})")
            seen[image] = line
            names = tuple(sorted({n.strip() for n in cells[1].split(";") if n.strip()}))
            rows.append((image, names))
    if not rows:
        raise DataError(f"labels file {path} lists no image")
    classes = tuple(sorted({name for _, names in rows for name in names}))
    return rows, classes


def targets_of(rows: Sequence[tuple[Path, Sequence[str]]],
               class_names: Sequence[str]) -> np.ndarray:
    """``(N, K)`` float32 0/1 targets of ``rows`` (``[i, k]`` = 1 when row ``i`` has
    ``class_names[k]``)."""
    index = {name: k for k, name in enumerate(class_names)}
    targets = np.zeros((len(rows), len(class_names)), dtype=np.float32)
    for i, (_, names) in enumerate(rows):
        for name in names:
            targets[i, index[name]] = 1.0
    return targets


def load_multilabel_folder(path: str | os.PathLike, labels_file: str | os.PathLike | None = None,
                           size: Sequence[int] | int | None = None, channels: int | None = None,
                           *, resample: str = "bilinear", resize_shorter: int | None = None,
                           val_split: float = 0.1, split_seed: int = SPLIT_SEED,
                           bad_images: str = "stop", cache_dir: str | os.PathLike | None = None,
                           progress: bool = False) -> Splits:
    """A multi-label image folder as train / validation :class:`~anycnn.data.arrays.Splits`
    (``test`` is ``val``), with ``(N, K)`` float32 0/1 targets.

    Args:
        path: the folder.
        labels_file: the labels file (default ``path/labels.csv``); its rows' paths are
            relative to its own folder.
        size, channels, resample, resize_shorter, bad_images, cache_dir, progress: as
            :func:`anycnn.data.imagefolder.load_image_folder`.
        val_split, split_seed: ``max(1, round(val_split * N))`` images, chosen by
            ``np.random.default_rng(split_seed).permutation``, form ``val``; each split keeps
            the file's order.

    Raises:
        DataError: see :func:`read_labels_file`; fewer than 2 labels; too few images to split;
            a bad image (``"stop"``).
        ConfigError: bad options.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder {root}: no such directory")
    if not (isinstance(val_split, int | float) and 0 < val_split < 1):
        raise ConfigError(f"val_split must be a fraction in (0, 1), got {val_split!r}")
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ConfigError(f"bad_images must be one of {', '.join(BAD_IMAGE_POLICIES)}, got "
                          f"{bad_images!r}")
    options = Options.checked(size, channels, resample, resize_shorter)
    file = Path(labels_file) if labels_file is not None else root / DEFAULT_LABELS_FILE
    rows, classes = read_labels_file(file)
    if len(classes) < 2:
        raise DataError(f"{file}: found {len(classes)} label name(s) ({', '.join(classes)}); "
                        "multi-label data needs at least 2")
    n = len(rows)
    n_val = max(1, round(val_split * n))
    if n - n_val < 1:
        raise DataError(f"{file}: {n} image(s) cannot be split into train and validation "
                        f"(val_split {val_split})")
    order = np.random.default_rng(split_seed).permutation(n)
    parts = [("train", np.sort(order[n_val:])), ("val", np.sort(order[:n_val]))]
    samples = [(rows[i][0], int(i)) for _, idx in parts for i in idx]  # label: the row
    key_text = json.dumps([CACHE_VERSION, "multilabel", str(file.resolve()), *options.key(),
                           val_split, split_seed])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    images, row_of, kept = decode_cached(
        samples, options, bad_images,
        Path(cache_dir) if cache_dir is not None else default_cache_dir(), key=key,
        progress=progress)
    targets = targets_of(rows, classes)[row_of]
    splits = split_decoded(file, [(name, len(idx)) for name, idx in parts], kept, images,
                           targets, len(classes))
    return Splits(name=root.name or str(root), train=splits["train"], val=splits["val"],
                  test=splits["val"], source=f"multi-label image folder {root} (labels {file}, "
                  f"val_split {val_split}, split_seed {split_seed})", class_names=classes)
