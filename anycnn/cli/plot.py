"""Pictures (matplotlib is an optional extra, drawn with the Agg backend, no display needed):

* loss and accuracy curves from a ``history.json`` (:func:`plot_history`);
* a confusion matrix (:func:`plot_confusion`), from :func:`anycnn.train.trainer.evaluate` results or
  the JSON that ``anycnn evaluate --json`` prints.

:func:`plot_file` draws whichever of the two a JSON file holds (``anycnn plot FILE``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError


def read_history(path: str | Path) -> list[dict]:
    """The list of epoch records in a ``history.json``; DataError if it is not one."""
    path = Path(path)
    return _check_history(path, _read_json(path))


def _check_history(path: Path, records: Any) -> list[dict]:
    if not isinstance(records, list) or not records or not all(
            isinstance(r, dict) and "epoch" in r and "train_loss" in r for r in records):
        raise DataError(f"{path}: expected a non-empty list of epoch records "
                        "(as written by anycnn train) or the output of anycnn evaluate --json")
    return records


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend; ConfigError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'anycnn[plot]'") from None
    return plt


def _save(fig: Any, output: str | Path) -> Path:
    """Write ``fig``; an ``output`` without an extension gets ``.png``."""
    plt = pyplot()
    output = Path(output)
    if not output.suffix:
        output = output.with_name(output.name + ".png")
    try:
        fig.savefig(output, dpi=120)
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return output


def plot_history(history: str | Path, output: str | Path) -> Path:
    """Draw train/validation loss and accuracy per epoch into ``output`` (PNG, SVG or PDF;
    ``.png`` is added to a name without an extension). The curves are called "train" and
    "validation", as the history's ``train_*`` and ``val_*`` keys (for the built-in datasets
    the validation split is their test split: :func:`anycnn.data.datasets.validation_is_test`).

    When the ``checkpoint.safetensors`` written beside the history by ``anycnn train`` is
    there, the title names its model and dataset.
    """
    history = Path(history)
    return _draw_history(read_history(history), output, _title_of(history))


def _title_of(history: Path) -> str | None:
    """"MODEL on DATASET" from the checkpoint beside ``history``, or None."""
    from ..errors import CheckpointError
    from ..io.checkpoint import RUN_CHECKPOINT, load_checkpoint

    try:
        config = load_checkpoint(history.parent / RUN_CHECKPOINT).config
    except CheckpointError:  # plotting a history alone: no title
        return None
    if not config.get("model") or not config.get("dataset"):
        return None
    return f"{config['model']} on {config['dataset']}"


def _draw_history(records: list[dict], output: str | Path, title: str | None = None) -> Path:
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, what in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        for split, label in (("train", "train"), ("val", "validation")):
            values = [r.get(f"{split}_{what}") for r in records]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", label=label)
        ax.set(title=what, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # no epoch 1.5
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, output)


def plot_confusion(matrix: Any, class_names: Sequence[str] | None, output: str | Path,
                   title: str = "confusion matrix") -> Path:
    """Draw a confusion matrix into ``output`` (PNG, SVG or PDF).

    ``matrix`` is ``(C, C)`` counts, rows the true class and columns the predicted one (as
    :mod:`anycnn.train.metrics` builds it). Each cell is coloured by its share of its row (the
    fraction of that true class predicted as the column's class), so rare classes show as
    clearly as common ones, and up to 30 classes the counts are written in the cells.
    """
    counts = np.asarray(matrix)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] == 0:
        raise DataError(f"a confusion matrix must be square (C, C), got shape {counts.shape}")
    c = counts.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    if len(names) != c:
        raise DataError(f"{len(names)} class names for a {c}x{c} confusion matrix")
    support = counts.sum(axis=1, keepdims=True)
    share = counts / np.maximum(support, 1)
    plt = pyplot()
    side = min(4 + 0.45 * c, 24)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if c <= 30:
        for t in range(c):
            for p in range(c):
                ax.text(p, t, str(int(counts[t, p])), ha="center", va="center", fontsize=8,
                        color="white" if share[t, p] > 0.5 else "black")
    if c <= 60:
        ax.set_xticks(range(c), names, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(c), names)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.tight_layout()
    return _save(fig, output)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable JSON file ({exc})") from None


def plot_file(path: str | Path, output: str | Path) -> Path:
    """Draw what a JSON file holds: curves for a ``history.json`` (a list of epoch records),
    the confusion matrix for the output of ``anycnn evaluate --json`` (an object with
    ``confusion_matrix`` and ``class_names``)."""
    path = Path(path)
    data = _read_json(path)
    if isinstance(data, dict) and "confusion_matrix" in data:
        try:
            matrix = np.asarray(data["confusion_matrix"], dtype=np.int64)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: confusion_matrix is not a matrix of counts ({exc})") from None
        where = " ".join(str(data[k]) for k in ("dataset", "split") if data.get(k))
        return plot_confusion(matrix, data.get("class_names"), output,
                              title=f"confusion matrix{' — ' + where if where else ''}")
    return _draw_history(_check_history(path, data), output, _title_of(path))
