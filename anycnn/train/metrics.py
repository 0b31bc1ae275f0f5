"""Classification metrics accumulated on the device: top-k accuracy, per-class accuracy and the
confusion matrix.

Everything is counted with Array API operations on the arrays' own device; nothing is read back
to the host until :meth:`ClassificationMetrics.compute`, which reads all the counts once. So on a
GPU the metrics add no synchronisation per batch.

Conventions (each one tested against a plain NumPy reference):

* **Confusion matrix**: ``matrix[t, p]`` counts the examples whose *true* class is ``t`` (rows)
  and whose *predicted* class is ``p`` (columns); its total is the number of examples, row ``t``
  sums to the number of examples of class ``t``. It is an ``int64`` ``(C, C)`` host array.
* **Prediction**: the class with the largest logit; among equal largest logits the lowest class
  index wins (``argmax`` takes the first maximum, as NumPy and PyTorch do).
* **Top-k**: an example counts as a top-k hit when its true class is among the ``k`` classes
  ranked first, where classes are ranked by logit, largest first, and equal logits by class
  index, lowest first. So top-1 accuracy equals the ``argmax`` accuracy exactly, ties included,
  and top-k never counts more than ``k`` classes as "in the top k". ``k`` larger than the number
  of classes is a :class:`~anycnn.errors.ConfigError`.
* **Per-class accuracy** (the recall of each class): ``matrix[c, c] / matrix[c, :].sum()``. For a
  class absent from the labels it is **NaN** (undefined, not 0: the model made no mistake on
  it); JSON output writes it as ``null``.

Logits must be finite; with NaN logits the metrics are undefined.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from array_api_compat import device

from ..backend import namespace_of, to_numpy
from ..errors import ConfigError, ShapeError


def check_top_k(top_k: int | Iterable[int], num_classes: int | None = None) -> tuple[int, ...]:
    """``top_k`` (an int or several) as a sorted tuple of distinct positive ints.

    Raises:
        ConfigError: a value is not a positive integer, or exceeds ``num_classes`` (when given).
    """
    values = (top_k,) if isinstance(top_k, numbers.Integral) else tuple(top_k)
    for k in values:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ConfigError(f"top-k values must be positive integers, got {k!r}")
    ks = tuple(sorted({int(k) for k in values}))
    if num_classes is not None and ks and ks[-1] > num_classes:
        raise ConfigError(f"top-{ks[-1]} accuracy asked for, but the model has only "
                          f"{num_classes} classes; choose k <= {num_classes}")
    return ks


def _one_hot(indices: Any, num_classes: int, dtype: Any, xp: Any) -> Any:
    """``(N,)`` integer indices → ``(N, C)`` 0/1 array of ``dtype``. An index outside
    ``[0, C)`` gives a row of zeros on every backend (no check, hence no host read)."""
    classes = xp.arange(num_classes, dtype=indices.dtype, device=device(indices))
    return xp.astype(indices[:, None] == classes[None, :], dtype)


def true_class_ranks(logits: Any, labels: Any) -> Any:
    """Rank of each example's true class, on the device: ``(N,)`` int64, 0 = ranked first.

    The rank counts the classes ranked before the true class ``y``: those with a larger logit,
    and those with an equal logit and a smaller index. ``rank < k`` is a top-k hit.
    """
    xp = namespace_of(logits, labels)
    num_classes = logits.shape[1]
    is_true = _one_hot(labels, num_classes, xp.bool, xp)
    true_logit = xp.sum(xp.where(is_true, logits, xp.zeros_like(logits)), axis=1, keepdims=True)
    classes = xp.arange(num_classes, dtype=labels.dtype, device=device(labels))
    before = (logits > true_logit) | ((logits == true_logit)
                                      & (classes[None, :] < labels[:, None]))
    return xp.sum(xp.astype(before, xp.int64), axis=1)


def confusion_counts(labels: Any, predictions: Any, num_classes: int) -> Any:
    """Confusion matrix of one batch, on the device: ``(C, C)`` int64, rows true, columns
    predicted. Built as ``one_hot(labels).T @ one_hot(predictions)`` in float32 (exact for
    batches below 2**24 examples) instead of a scatter, which would drop repeated indices."""
    xp = namespace_of(labels, predictions)
    truth = _one_hot(labels, num_classes, xp.float32, xp)
    guess = _one_hot(predictions, num_classes, xp.float32, xp)
    return xp.astype(truth.T @ guess, xp.int64)


def per_class_accuracy(matrix: np.ndarray) -> np.ndarray:
    """Diagonal over row sums of a host confusion matrix: ``(C,)`` float64, NaN where a class
    has no examples."""
    matrix = np.asarray(matrix)
    support = matrix.sum(axis=1)
    correct = np.diagonal(matrix).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, correct / np.maximum(support, 1), np.nan)


class ClassificationMetrics:
    """Top-k hits and the confusion matrix, summed over batches on the device.

    Args:
        top_k: the ``k`` values to report (an int or several; empty for none).
        class_names: one display name per class, or ``None`` for ``"0"``, ``"1"``, ...
        num_classes: the number of classes, or ``None`` to take it from the first batch's
            logits (it must match ``class_names`` when both are given).

    :meth:`update` takes each batch's logits ``(N, C)`` (float) and labels ``(N,)`` (integer)
    on any backend; :meth:`compute` reads the counts back once and returns host values.
    """

    def __init__(self, top_k: int | Iterable[int] = (1,), class_names: Sequence[str] | None = None,
                 num_classes: int | None = None) -> None:
        if class_names is not None:
            class_names = tuple(str(name) for name in class_names)
            if num_classes is not None and num_classes != len(class_names):
                raise ConfigError(f"{len(class_names)} class names for {num_classes} classes")
            num_classes = len(class_names)
        self.top_k = check_top_k(top_k, num_classes)
        self.class_names = class_names
        self.num_classes = num_classes
        self.seen = 0
        self._hits: list[Any] = []  # device int64 scalars, one per k
        self._matrix: Any = None  # device int64 (C, C)

    def update(self, logits: Any, labels: Any) -> None:
        """Add one batch (no host read)."""
        xp = namespace_of(logits, labels)
        if logits.ndim != 2 or labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
            raise ShapeError(f"expected logits (N, classes) and labels (N,), got shapes "
                             f"{tuple(logits.shape)} and {tuple(labels.shape)}")
        if not xp.isdtype(labels.dtype, "integral"):
            raise ShapeError(f"labels must be integers, got dtype {labels.dtype}")
        if self.num_classes is None:
            check_top_k(self.top_k, logits.shape[1])
            self.num_classes = logits.shape[1]
        if logits.shape[1] != self.num_classes:
            raise ShapeError(f"logits have {logits.shape[1]} classes, expected "
                             f"{self.num_classes}" + (" (one per class name)"
                                                      if self.class_names else ""))
        if self.top_k:
            ranks = true_class_ranks(logits, labels)
            hits = [xp.sum(xp.astype(ranks < k, xp.int64)) for k in self.top_k]
            self._hits = hits if not self._hits else [a + b for a, b in zip(self._hits, hits)]
        batch = confusion_counts(labels, xp.argmax(logits, axis=1), self.num_classes)
        self._matrix = batch if self._matrix is None else self._matrix + batch
        self.seen += labels.shape[0]

    def compute(self) -> dict[str, Any]:
        """The metrics as host values (this is the one read from the device).

        Returns a dict with:

        * ``top_k_accuracy``: ``{k: fraction}`` for each requested ``k`` (NaN with no examples);
        * ``confusion_matrix``: ``np.int64`` ``(C, C)``, rows true class, columns predicted;
        * ``per_class_accuracy``: ``np.float64`` ``(C,)``, NaN for classes without examples;
        * ``per_class_count``: ``np.int64`` ``(C,)``, examples of each class;
        * ``class_names``: ``tuple[str, ...]`` of length ``C``.

        Raises:
            ShapeError: some labels were outside ``[0, C)`` (they are in no row of the matrix).
        """
        c = self.num_classes or 0
        matrix = (np.zeros((c, c), dtype=np.int64) if self._matrix is None
                  else to_numpy(self._matrix).astype(np.int64))
        if int(matrix.sum()) != self.seen:
            raise ShapeError(f"{self.seen - int(matrix.sum())} of {self.seen} labels are outside "
                             f"[0, {c}): labels must be class indices of the model's {c} classes")
        hits = [int(to_numpy(h)) for h in self._hits] or [0] * len(self.top_k)
        return {
            "top_k_accuracy": {k: (h / self.seen if self.seen else math.nan)
                               for k, h in zip(self.top_k, hits)},
            "confusion_matrix": matrix,
            "per_class_accuracy": per_class_accuracy(matrix),
            "per_class_count": matrix.sum(axis=1),
            "class_names": self.class_names or tuple(str(i) for i in range(c)),
        }


def _json_number(value: Any) -> float | int | None:
    value = value.item() if isinstance(value, np.generic) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    """An :func:`anycnn.train.trainer.evaluate` result as plain JSON data.

    Arrays become lists, NaN/inf become ``None`` (``null``), top-k keys become strings
    (``{"1": ..., "5": ...}``), and the per-class values are gathered into ``per_class``: one
    ``{"index", "name", "accuracy", "count"}`` object per class, in class order.
    """
    out: dict[str, Any] = {}
    for key, value in result.items():
        if key == "top_k_accuracy":
            out[key] = {str(k): _json_number(v) for k, v in value.items()}
        elif key == "confusion_matrix":
            out[key] = np.asarray(value).tolist()
        elif key == "class_names":
            out[key] = list(value)
        elif key not in ("per_class_accuracy", "per_class_count"):
            out[key] = _json_number(value)
    if "per_class_accuracy" in result:
        names = result.get("class_names") or [str(i) for i in
                                              range(len(result["per_class_accuracy"]))]
        out["per_class"] = [
            {"index": i, "name": name, "accuracy": _json_number(float(acc)), "count": int(n)}
            for i, (name, acc, n) in enumerate(zip(names, result["per_class_accuracy"],
                                                   result["per_class_count"]))]
    return out


def worst_classes(result: dict[str, Any], n: int = 3) -> list[tuple[str, float]]:
    """The ``n`` classes with the lowest accuracy (classes without examples skipped), as
    ``(name, accuracy)`` pairs, worst first; equal accuracies in class order."""
    accuracy = np.asarray(result["per_class_accuracy"], dtype=np.float64)
    present = np.flatnonzero(~np.isnan(accuracy))
    order = present[np.argsort(accuracy[present], kind="stable")][:n]
    return [(result["class_names"][i], float(accuracy[i])) for i in order]
