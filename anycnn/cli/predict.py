"""``anycnn predict``: the most likely classes of image files, prepared as in training.

``anycnn predict CHECKPOINT IMAGE|FOLDER... [--top-k K] [--threshold P] [--format
text|csv|json] [--output FILE]``: folders stand for the image files directly inside them
(:mod:`anycnn.cli.predict_files`); the predictions are printed as text or written as CSV or
JSON (:mod:`anycnn.cli.predict_report`). An image that cannot be read is reported on its own
line ``anycnn: error: PATH: why`` on standard error and the others are still predicted; the
exit status is then 1 (0 when every image was predicted, 2 for a mistake that stops the
command: a bad checkpoint or option).

A multi-label model (the record's ``multi_label``, below) gets each label's sigmoid
probability (not a softmax: they need not sum to 1) and its *labels*, those with a
probability ``>= --threshold`` (default 0.5), most likely first.

Every ``anycnn train`` records in its checkpoints how pixels were prepared, the *preprocess
record* (:func:`anycnn.data.augment.preprocess_record`); ``anycnn predict`` prepares image files
the same way (image folders in training: :mod:`anycnn.cli.folders`).

Preprocess record (a JSON object in the checkpoint's ``extra["config"]["preprocess"]``, or in
``extra["preprocess"]`` for :func:`anycnn.save` users):

=============== ===============================================================================
``image_size``  ``[H, W]`` the model was trained on
``channels``    1 (grayscale, Pillow ``convert("L")``) or 3 (RGB, ``convert("RGB")``)
``resize``      the Pillow filter images of another size are resized with (``"bilinear"``)
``scale``       pixels are divided by this (255) to lie in ``[0, 1]``
``normalize``   ``{"mean": [...], "std": [...]}`` (one value per channel) or null: the
                ``[0, 1]`` pixels become ``(x - mean) / std`` (:class:`~anycnn.data.Normalize`)
``augment``     the training augmentation, for the record (never applied at prediction)
``class_names`` the display name of each class
``multi_label`` optional: true for a multi-label model (any number of labels per image,
                trained with a sigmoid loss, e.g. ``anycnn train --multi-label``): each label
                gets its own sigmoid probability, and those ``>= --threshold`` (0.5) are the
                image's labels. Absent (or false): single-label, softmax over the classes
``eval``        optional (``version`` 2): ``{"resize": R, "crop": S, "mean", "std",
                "interpolation"}``: images are resized to shorter side ``R`` (aspect kept) and
                centre-cropped to ``S x S`` = ``image_size`` instead of stretched
                (:class:`~anycnn.data.eval_transform.EvalTransform`)
=============== ===============================================================================

A record without the image keys (what :class:`~anycnn.train.Trainer` writes from Python:
``{"augment": ..., "normalize": ...}``) is completed from the model spec, and its
normalisation (or ``eval`` transform) is still applied.

One function builds the whole record, :func:`anycnn.data.augment.preprocess_record` (the image
keys are :func:`anycnn.data.augment.image_record`'s), and
:func:`anycnn.data.augment.read_preprocess` reads ``normalize`` and ``augment`` back from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .common import backend_option, open_fraction, positive_int

#: the probability at or above which a multi-label model's label is reported present
DEFAULT_THRESHOLD = 0.5

HELP = "the most likely classes of image files, prepared as in training"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``anycnn predict``."""
    from .predict_report import FORMATS

    parser.add_argument("checkpoint", help="a checkpoint file, a run folder holding "
                        "checkpoint.safetensors, or an .onnx file from anycnn export (run by "
                        "onnxruntime)")
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files (PNG, JPEG, ...; any size and mode), or folders: "
                        "the image files directly inside, sorted by name (subfolders are not "
                        "searched)")
    parser.add_argument("--top-k", type=positive_int, default=None, metavar="K",
                        help="classes to show per image (default: 5, or all when fewer)")
    parser.add_argument("--threshold", type=open_fraction, default=None, metavar="P",
                        help="multi-label models: an image's labels are those whose sigmoid "
                        f"probability is >= P (default {DEFAULT_THRESHOLD})")
    parser.add_argument("--format", default=None, choices=FORMATS,
                        help="text, csv (one row per image: path, class, index, "
                        "probability, the other top-k classes, error) or json (one object: "
                        "checkpoint, preprocess and one prediction per image); default: "
                        "from --output's extension, else text")
    parser.add_argument("--output", "-o", default=None, metavar="FILE",
                        help="write the predictions to FILE (.csv or .json: that format) "
                        "instead of standard output")
    parser.add_argument("--json", action="store_true", help="the same as --format json")
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="images per forward pass")
    backend_option(parser)


def preprocess_of(checkpoint, model) -> tuple[dict[str, Any], bool]:
    """``(preprocess record, recorded)`` of a loaded checkpoint. Without a record, or with one
    that lacks the image keys (a :class:`~anycnn.train.Trainer` run from Python), the image
    keys are made from the model spec (``image_size`` square, ``in_channels``; bilinear; classes
    named by their index), the record's ``augment``/``normalize``/``eval`` kept, and
    ``recorded`` is false."""
    from ..data.augment import image_record

    record = checkpoint.preprocess
    spec = model.model_spec
    num_classes = spec["num_classes"]
    multi = {"multi_label": True} if checkpoint.multi_label else {}  # older --multi-label runs
    if record is not None and "image_size" in record:
        _check_record(record, checkpoint.path, num_classes)
        return {**record, **multi}, True
    made = image_record([spec["image_size"]] * 2, spec["in_channels"],
                        [str(i) for i in range(num_classes)])
    made.update(multi)
    if record is not None:  # normalisation (and maybe an eval transform) without image keys
        made.update({k: record.get(k) for k in ("augment", "normalize", "eval")
                     if record.get(k) is not None})
        _check_record(made, checkpoint.path, num_classes)
    return made, False


def _check_record(record: dict[str, Any], path, num_classes: int) -> None:
    from ..data.augment import read_eval_transform, read_preprocess
    from ..errors import CheckpointError

    size, channels = record.get("image_size"), record.get("channels")
    names = record.get("class_names")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v >= 1
                                                              for v in size)
            and channels in (1, 3) and isinstance(names, list) and len(names) == num_classes
            and isinstance(record.get("multi_label", False), bool)):
        raise DataError(f"{path}: malformed preprocess record {json.dumps(record)[:200]}")
    try:
        read_preprocess(record)
        transform = read_eval_transform(record)
    except CheckpointError as exc:
        raise DataError(f"{path}: {exc}") from exc
    if transform is not None and list(transform.image_size) != size:
        raise DataError(f"{path}: malformed preprocess record: image_size {size} is not the "
                        f"eval transform's crop {transform.crop}")


def prepare(paths: list[str], record: dict[str, Any]):
    """Image files → the model's input as :func:`anycnn.predict` takes it: ``uint8`` NHWC
    pixels, or, when the record normalises, float32 ``x / 255`` normalised exactly as the
    :class:`~anycnn.data.dataloader.DataLoader` does
    (:meth:`anycnn.data.augment.Normalize.apply`). With an ``eval`` transform the files are
    resized by their shorter side and centre-cropped
    (:meth:`anycnn.data.eval_transform.EvalTransform.load`), else stretched to
    ``image_size``.

    Raises:
        DataError: a file cannot be read (the first such file is named).
    """
    import numpy as np

    return finish(np.stack([load_pixels(path, record) for path in paths]), record)


def load_pixels(path: str, record: dict[str, Any]):
    """One image file as the ``uint8`` ``(H, W, C)`` pixels of ``record`` (:func:`prepare`'s
    first step).

    Raises:
        DataError: naming the file, when it is missing, a folder or not a readable image.
    """
    from ..data.augment import read_eval_transform
    from ..data.images import load_image

    transform = read_eval_transform(record)
    if transform is not None:
        return transform.load([path], record["channels"])[0]
    return load_image(path, tuple(record["image_size"]), record["channels"],
                      record.get("resize", "bilinear"))


def finish(pixels, record: dict[str, Any]):
    """``uint8`` NHWC ``pixels`` of :func:`load_pixels` → the model's input (:func:`prepare`'s
    second step: scaled and normalised when the record normalises, else as they are)."""
    import array_api_compat.numpy as host_xp

    from ..data.augment import read_preprocess, to_unit_range

    _, normalize = read_preprocess(record)
    if normalize is None:
        return pixels
    return normalize.apply(to_unit_range(host_xp, pixels, "float32"))


def run(args: argparse.Namespace) -> int:
    """``anycnn predict CHECKPOINT IMAGE...``: the top-k classes of each image, a bad image
    reported on its own line (exit status 1 at the end) without stopping the others."""
    from ..data.images import pillow
    from ..io.checkpoint import checkpoint_in, load_model
    from ..train.inference import predict_topk
    from .common import select_backend
    from .predict_report import output_format

    fmt = output_format(args.format, args.json, args.output)
    select_backend(args.backend)
    path = checkpoint_in(args.checkpoint)
    pillow()  # no Pillow: say so before loading the model
    if path.suffix.lower() == ".onnx":
        topk, record, recorded, num_classes = onnx_classifier(path)
    else:
        model, checkpoint = load_model(path)
        record, recorded = preprocess_of(checkpoint, model)
        num_classes = model.model_spec["num_classes"]

        def topk(images, k):
            return predict_topk(model, images, k=k, multi_label=multi)
    multi = record.get("multi_label") is True
    if args.threshold is not None and not multi:
        raise ConfigError(f"--threshold applies to multi-label models (anycnn train "
                          f"--multi-label); {path} is single-label: its softmax probabilities "
                          "sum to 1 and the most likely class is the prediction")
    threshold = (args.threshold if args.threshold is not None else DEFAULT_THRESHOLD) \
        if multi else None
    k = min(5, num_classes) if args.top_k is None else args.top_k
    if not 1 <= k <= num_classes:
        raise ConfigError(f"--top-k must be in [1, {num_classes}] (the model's "
                          f"{'labels' if multi else 'classes'}), got {k}")
    if not recorded:
        _warn_unrecorded(path, record)
    rows, failed = _predict_all(args, record, topk, k, fmt, threshold)
    _write(args, fmt, rows, k, str(path), record, threshold)
    return 1 if failed else 0


def _warn_unrecorded(path: Path, record: dict[str, Any]) -> None:
    """The warning for a checkpoint (or ONNX file) that records no image preparation."""
    h, w = record["image_size"]
    how = (f"resized to shorter side {record['eval']['resize']} and centre-cropped to "
           f"{h}x{w}" if record.get("eval") else f"resized to {h}x{w} (bilinear)")
    norm = ", then normalised with the recorded mean/std" if record.get("normalize") else ""
    what = ("no image size or channels" if record.get("normalize") or record.get("eval")
            else "no preprocessing")
    print(f"anycnn: warning: {path} records {what} (trained before anycnn "
          f"recorded it, or saved from Python): images are converted to "
          f"{'grayscale' if record['channels'] == 1 else 'RGB'}, {how} and scaled by "
          f"1/255{norm}, from the model "
          f"{'input' if path.suffix.lower() == '.onnx' else 'spec'}", file=sys.stderr)


def _predict_all(args, record: dict[str, Any], topk, k: int, fmt: str,
                 threshold: float | None = None):
    """``(rows in the order given, number of failures)``: the images read and predicted
    ``--batch-size`` at a time; a bad one is reported on standard error at once. The text
    format is printed batch by batch (to standard output). With ``threshold`` (a multi-label
    model) every label is scored, for the labels at or above it, and the rows keep the top
    ``k``."""
    import numpy as np

    from .predict_files import image_entries
    from .predict_report import error_row, prediction_row, text_lines

    names = record["class_names"]
    width = max(len(str(n)) for n in names)
    stream_text = fmt == "text" and args.output is None
    rows: list[tuple[int, dict[str, Any]]] = []
    pending: list[tuple[int, str, Any]] = []
    failed = 0

    def flush() -> None:
        if not pending:
            return
        indices, probs = topk(finish(np.stack([px for _, _, px in pending]), record),
                              k if threshold is None else len(names))
        for (position, image, _), idx, prob in zip(pending, np.atleast_2d(indices),
                                                   np.atleast_2d(probs)):
            row = prediction_row(image, idx, prob, names, k=k, threshold=threshold)
            rows.append((position, row))
            if stream_text:
                print("\n".join(text_lines(row, width)), flush=True)
        pending.clear()

    for position, entry in enumerate(image_entries(args.images)):
        error = entry.error
        if error is None:
            try:
                pending.append((position, entry.path, load_pixels(entry.path, record)))
            except DataError as exc:
                error = str(exc).removeprefix(f"{entry.path}: ")
        if error is not None:
            failed += 1
            print(f"anycnn: error: {entry.path}: {error}", file=sys.stderr, flush=True)
            rows.append((position, error_row(entry.path, error)))
        elif len(pending) == args.batch_size:
            flush()
    flush()
    return [row for _, row in sorted(rows, key=lambda item: item[0])], failed


def _write(args, fmt: str, rows: list[dict[str, Any]], k: int, checkpoint: str,
           record: dict[str, Any], threshold: float | None = None) -> None:
    """The predictions in ``fmt`` to ``--output`` (written atomically), or to standard
    output unless they were printed already (text)."""
    from .predict_report import csv_text, json_text, text_lines

    if fmt == "text" and args.output is None:
        return  # printed batch by batch
    if fmt == "csv":
        text = csv_text(rows, k, multi_label=threshold is not None)
    elif fmt == "json":
        text = json_text(rows, checkpoint, record, threshold) + "\n"
    else:
        width = max(len(str(n)) for n in record["class_names"])
        text = "".join("\n".join(text_lines(row, width)) + "\n" for row in rows
                       if "error" not in row)
    if args.output is None:
        sys.stdout.write(text)
        return
    from ..atomic import atomic_write_bytes

    atomic_write_bytes(args.output, text.encode())
    bad = sum("error" in row for row in rows)
    print(f"wrote {args.output}: {len(rows) - bad} predictions"
          + (f", {bad} bad image(s) or folder(s)" if bad else ""))


def onnx_classifier(path: Path):
    """``(topk, record, recorded, num_classes)`` for an ``.onnx`` file run by onnxruntime:
    ``topk(images, k)`` ranks and scores classes as :func:`anycnn.train.inference.predict_topk`
    does (images as :func:`prepare` gives them; per-label sigmoids when the record is
    ``multi_label``). The preprocess record is the ``preprocess``
    entry ``anycnn export`` writes in the file's metadata; without one it is made from the
    input's shape (``recorded`` false)."""
    import array_api_compat.numpy as host_xp
    import numpy as np

    from ..data.augment import image_record, to_unit_range
    from ..errors import CheckpointError
    from ..io.onnx import INSTALL_HINT
    from ..train.inference import probabilities

    if not path.is_file():
        raise FileNotFoundError(2, "no such file", str(path))
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError(f"predicting with an ONNX file needs onnxruntime; {INSTALL_HINT}"
                          ) from None
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: onnxruntime cannot load it ({reason})") from None
    meta = session.get_modelmeta().custom_metadata_map
    (inp,), outputs = session.get_inputs(), session.get_outputs()
    nchw = meta.get("input_layout", "NHWC").upper() == "NCHW"
    dims = list(inp.shape[1:])
    classes = outputs[0].shape[-1] if len(outputs[0].shape) == 2 else None
    if len(dims) != 3 or not all(isinstance(d, int) for d in dims) or not isinstance(classes,
                                                                                     int):
        raise CheckpointError(f"{path}: not an image classifier anycnn can feed (input "
                              f"{inp.shape}, output {outputs[0].shape}); expected input "
                              "[batch, H, W, C] and output [batch, K]")
    c, h, w = dims if nchw else (dims[2], dims[0], dims[1])
    recorded = "preprocess" in meta
    if recorded:
        try:
            record = json.loads(meta["preprocess"])
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise DataError(f"{path}: malformed preprocess record {meta['preprocess'][:200]}")
        _check_record(record, path, classes)
    else:
        record = image_record([h, w], c, [str(i) for i in range(classes)])
    dtype = "float64" if inp.type == "tensor(double)" else "float32"

    def topk(images, k):
        x = np.asarray(to_unit_range(host_xp, images, dtype))
        if nchw:
            x = np.transpose(x, (0, 3, 1, 2))
        logits = session.run(None, {inp.name: np.ascontiguousarray(x)})[0]
        order = np.argsort(-logits, axis=1, kind="stable")[:, :k].astype(np.int64)
        probs = probabilities(logits, record.get("multi_label") is True)
        return order, np.take_along_axis(probs, order, axis=1)

    return topk, record, recorded, classes
