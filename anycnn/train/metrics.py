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
        * ``per_class_precision``, ``per_class_recall``, ``per_class_f1``: ``np.float64``
          ``(C,)`` (:func:`precision_recall_f1`; recall equals the per-class accuracy);
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
        precision, recall, f1 = precision_recall_f1(matrix)
        return {
            "top_k_accuracy": {k: (h / self.seen if self.seen else math.nan)
                               for k, h in zip(self.top_k, hits)},
            "confusion_matrix": matrix,
            "per_class_accuracy": per_class_accuracy(matrix),
            "per_class_count": matrix.sum(axis=1),
            "per_class_precision": precision,
            "per_class_recall": recall,
            "per_class_f1": f1,
            "class_names": self.class_names or tuple(str(i) for i in range(c)),
        }


def _json_number(value: Any) -> float | int | None:
    value = value.item() if isinstance(value, np.generic) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    """An :func:`anycnn.train.trainer.evaluate` result as plain JSON data.

    Arrays become lists, NaN/inf become ``None`` (``null``), top-k keys become strings
    (``{"1": ..., "5": ...}``), and the per-class values (``per_class_<name>`` arrays) are
    gathered into ``per_class``: one ``{"index", "name", "accuracy", "count", "precision",
    ...}`` object per class, in class order (a ``multi_label`` result is converted likewise).
    """
    out: dict[str, Any] = {}
    for key, value in result.items():
        if key == "top_k_accuracy":
            out[key] = {str(k): _json_number(v) for k, v in value.items()}
        elif key == "confusion_matrix":
            out[key] = np.asarray(value).tolist()
        elif key == "class_names":
            out[key] = list(value)
        elif key == "multi_label":
            out[key] = to_json(value)
        elif not key.startswith("per_class_"):
            out[key] = _json_number(value)
    per_class = {key[len("per_class_"):]: value for key, value in result.items()
                 if key.startswith("per_class_")}
    if per_class:
        count = len(next(iter(per_class.values())))
        names = result.get("class_names") or [str(i) for i in range(count)]
        out["per_class"] = [
            {"index": i, "name": names[i],
             **{key: (int(values[i]) if key == "count" else _json_number(float(values[i])))
                for key, values in per_class.items()}}
            for i in range(count)]
    return out


def worst_classes(result: dict[str, Any], n: int = 3) -> list[tuple[str, float]]:
    """The ``n`` classes with the lowest accuracy (classes without examples skipped), as
    ``(name, accuracy)`` pairs, worst first; equal accuracies in class order."""
    accuracy = np.asarray(result["per_class_accuracy"], dtype=np.float64)
    present = np.flatnonzero(~np.isnan(accuracy))
    order = present[np.argsort(accuracy[present], kind="stable")][:n]
    return [(result["class_names"][i], float(accuracy[i])) for i in order]


def precision_recall_f1(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1 from a host confusion matrix (rows true, columns
    predicted): ``precision[c] = matrix[c, c] / matrix[:, c].sum()``, ``recall[c] =
    matrix[c, c] / matrix[c, :].sum()``, ``f1 = 2 * p * r / (p + r)``. Each ``(C,)``
    float64. Precision is NaN for a class never predicted, recall for a class without
    examples; F1 is ``2 TP / (2 TP + FP + FN)`` (the same where both are defined): 0 for a class
    with examples that is never predicted, or predicted but absent (as scikit-learn's
    ``f1_score``), NaN only for a class neither present nor predicted."""
    matrix = np.asarray(matrix, dtype=np.float64)
    true_pos = np.diagonal(matrix)
    return _prf(true_pos, matrix.sum(axis=0), matrix.sum(axis=1))


def _prf(true_pos: np.ndarray, predicted: np.ndarray,
         actual: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, true_pos / np.maximum(predicted, 1), np.nan)
        recall = np.where(actual > 0, true_pos / np.maximum(actual, 1), np.nan)
        # F1 = 2TP / (2TP + FP + FN) = 2TP / (predicted + actual): 0 for a class with
        # positives never predicted (as scikit-learn), NaN only with neither
        total = np.asarray(predicted + actual, dtype=np.float64)
        f1 = np.where(total > 0, 2 * true_pos / np.maximum(total, 1), np.nan)
    return precision, recall, f1


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Average precision of one label: the area under its precision-recall curve as the step
    sum ``sum_k (R_k - R_{k-1}) * P_k`` over the distinct score thresholds, largest first
    (equal scores form one threshold; no interpolation, as scikit-learn's
    ``average_precision_score``). ``scores`` and ``targets`` (0/1) are host ``(N,)``; NaN when
    there is no positive."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(targets) >= 0.5
    n_pos = int(positive.sum())
    if n_pos == 0:
        return math.nan
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last_of_group = np.r_[scores[1:] != scores[:-1], True]  # the end of each tied run
    true_pos = np.cumsum(positive)[last_of_group].astype(np.float64)
    seen = (np.flatnonzero(last_of_group) + 1).astype(np.float64)
    recall_step = np.diff(np.r_[0.0, true_pos]) / n_pos
    return float(np.sum(recall_step * true_pos / seen))


class MultiLabelMetrics:
    """Metrics of multi-label classification (each of ``K`` labels present or not), from the
    logits of a model trained with :class:`~anycnn.nn.losses.BCEWithLogits` or
    :class:`~anycnn.nn.losses.SigmoidFocalLoss`.

    Args:
        class_names: one display name per label, or ``None`` for ``"0"``, ``"1"``, ...
        threshold: a label is predicted present when ``sigmoid(logit) >= threshold``.

    :meth:`update` takes each batch's logits and 0/1 targets, both ``(N, K)``, on any backend
    and keeps them on the device; :meth:`compute` reads everything back once (average precision
    ranks all the scores, so the logits are kept: ``N * K`` numbers).
    """

    def __init__(self, class_names: Sequence[str] | None = None, threshold: float = 0.5) -> None:
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), got {threshold}")
        self.class_names = None if class_names is None else tuple(str(n) for n in class_names)
        self.threshold = float(threshold)
        self._logits: list[Any] = []
        self._targets: list[Any] = []

    def update(self, logits: Any, targets: Any) -> None:
        """Add one batch (no host read)."""
        if logits.ndim != 2 or tuple(targets.shape) != tuple(logits.shape):
            raise ShapeError(f"expected logits and targets of the same shape (N, labels), got "
                             f"{tuple(logits.shape)} and {tuple(targets.shape)}")
        k = len(self.class_names) if self.class_names else (
            self._logits[0].shape[1] if self._logits else logits.shape[1])
        if logits.shape[1] != k:
            raise ShapeError(f"logits have {logits.shape[1]} labels, expected {k}")
        self._logits.append(logits)
        self._targets.append(targets)

    def compute(self) -> dict[str, Any]:
        """The metrics as host values. Returns a dict with:

        * ``per_class_precision``, ``per_class_recall``, ``per_class_f1``, ``per_class_ap``:
          float64 ``(K,)`` (NaN where undefined: precision for a label never predicted, recall
          and AP for a label with no positive; F1 is ``2 TP / (2 TP + FP + FN)``, 0 for a label
          with positives never predicted, NaN only for a label with neither positives nor
          predictions);
        * ``per_class_count``: int64 ``(K,)``, examples with each label;
        * ``mAP``: the mean of ``per_class_ap`` over the labels with a positive;
        * ``macro_f1`` (mean of the defined F1s: labels with neither positives nor predictions
          are left out), ``micro_f1`` (from the summed counts),
          ``subset_accuracy`` (examples with every label right), ``label_accuracy``;
        * ``class_names``.
        """
        if not self._logits:
            raise ShapeError("MultiLabelMetrics.compute: no batch was added")
        scores = np.concatenate([to_numpy(a) for a in self._logits]).astype(np.float64)
        truth = np.concatenate([to_numpy(a) for a in self._targets]) >= 0.5
        cut = math.log(self.threshold / (1.0 - self.threshold))  # sigmoid(x) >= t <=> x >= cut
        guess = scores >= cut
        true_pos = (guess & truth).sum(axis=0).astype(np.float64)
        precision, recall, f1 = _prf(true_pos, guess.sum(axis=0), truth.sum(axis=0))
        ap = np.array([average_precision(scores[:, c], truth[:, c])
                       for c in range(scores.shape[1])])
        _, _, micro = _prf(true_pos.sum(), guess.sum(), truth.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "per_class_precision": precision, "per_class_recall": recall,
                "per_class_f1": f1, "per_class_ap": ap,
                "per_class_count": truth.sum(axis=0).astype(np.int64),
                "mAP": float(np.nanmean(ap)) if np.any(~np.isnan(ap)) else math.nan,
                "macro_f1": float(np.nanmean(f1)) if np.any(~np.isnan(f1)) else math.nan,
                "micro_f1": float(micro),
                "subset_accuracy": float(np.mean(np.all(guess == truth, axis=1))),
                "label_accuracy": float(np.mean(guess == truth)),
                "class_names": self.class_names or tuple(str(i) for i in range(scores.shape[1])),
            }

