"""anycnn.train.metrics and evaluate(top_k=, confusion=): top-k accuracy, per-class accuracy and the
confusion matrix against plain-Python/NumPy references on random logits full of ties, summed over
uneven batches on the device, with no host read before the end."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

import anycnn
from anycnn.errors import ConfigError, ShapeError
from anycnn.nn.module import Module
from anycnn.train.metrics import (
    ClassificationMetrics,
    check_top_k,
    confusion_counts,
    per_class_accuracy,
    to_json,
    true_class_ranks,
    worst_classes,
)
from anycnn.train.trainer import evaluate

from .conftest import to_backend

# --------------------------------------------------------------------------------------------
# references: loops over examples, written from the definitions in anycnn.train.metrics' docstring


def ref_ranking(row: np.ndarray) -> list[int]:
    """Classes best first: larger logit first, equal logits by lower index."""
    return sorted(range(len(row)), key=lambda j: (-float(row[j]), j))


def ref_top_k(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    hits = sum(int(y in ref_ranking(row)[:k]) for row, y in zip(logits, labels))
    return hits / len(labels)


def ref_confusion(logits: np.ndarray, labels: np.ndarray, c: int) -> np.ndarray:
    matrix = np.zeros((c, c), dtype=np.int64)
    for row, y in zip(logits, labels):
        matrix[y, ref_ranking(row)[0]] += 1
    return matrix


def tied_problem(rng, n=157, c=7, absent=3):
    """Logits drawn from 4 values (many ties, also at the top) and labels that never use class
    ``absent``."""
    logits = rng.integers(0, 4, size=(n, c)).astype(np.float32)
    labels = rng.choice([i for i in range(c) if i != absent], size=n).astype(np.int64)
    return logits, labels


def accumulate(logits, labels, sizes, **kwargs) -> dict:
    metrics = ClassificationMetrics(**kwargs)
    start = 0
    for size in sizes:
        metrics.update(to_backend(logits[start:start + size]),
                       to_backend(labels[start:start + size]))
        start += size
    assert start == len(labels)
    return metrics.compute()


# --------------------------------------------------------------------------------------------
# against the references


def test_metrics_match_reference_with_ties(backend, rng):
    logits, labels = tied_problem(rng)
    c = logits.shape[1]
    result = accumulate(logits, labels, [64, 1, 50, 42], top_k=range(1, c + 1))
    for k in range(1, c + 1):
        assert result["top_k_accuracy"][k] == ref_top_k(logits, labels, k), k
    assert result["top_k_accuracy"][c] == 1.0
    expected = ref_confusion(logits, labels, c)
    np.testing.assert_array_equal(result["confusion_matrix"], expected)
    assert result["confusion_matrix"].dtype == np.int64
    assert result["confusion_matrix"].sum() == len(labels)
    np.testing.assert_array_equal(result["per_class_count"], np.bincount(labels, minlength=c))
    with np.errstate(invalid="ignore"):
        expected_acc = np.diagonal(expected) / expected.sum(axis=1)
    np.testing.assert_array_equal(result["per_class_accuracy"], expected_acc)
    assert math.isnan(result["per_class_accuracy"][3])  # the absent class: NaN, not 0
    assert result["class_names"] == tuple(str(i) for i in range(c))


def test_ties_go_to_the_lowest_index_and_top1_equals_argmax(backend):
    logits = np.array([[1, 3, 3, 0],    # classes 1 and 2 tie for first: 1 wins
                       [1, 3, 3, 0],
                       [2, 2, 2, 2],    # all tie: ranking 0, 1, 2, 3
                       [2, 2, 2, 2],
                       [0, 5, 1, 5]], dtype=np.float32)
    labels = np.array([1, 2, 0, 3, 3])
    ranks = anycnn.to_numpy(true_class_ranks(to_backend(logits), to_backend(labels)))
    np.testing.assert_array_equal(ranks, [0, 1, 0, 3, 1])
    result = accumulate(logits, labels, [5], top_k=(1, 2, 4))
    assert result["top_k_accuracy"] == {1: 2 / 5, 2: 4 / 5, 4: 1.0}
    argmax = logits.argmax(axis=1)  # NumPy's first maximum
    assert result["top_k_accuracy"][1] == np.mean(argmax == labels)
    assert result["confusion_matrix"][2, 1] == 1  # true 2, predicted 1 (first of the tie)


def test_evaluate_returns_metrics_and_keeps_old_keys(backend, rng):
    logits, labels = tied_problem(rng, n=90, c=6, absent=5)
    loader = [(to_backend(logits[i:i + 32]), to_backend(labels[i:i + 32]))
              for i in range(0, 90, 32)]
    model = Identity()
    plain = evaluate(model, loader)
    assert set(plain) == {"loss", "accuracy", "count"}
    names = ("a", "b", "c", "d", "e", "f")
    full = evaluate(model, loader, top_k=(3, 1), confusion=True, class_names=names)
    assert {k: full[k] for k in plain} == plain
    assert set(full) == {"loss", "accuracy", "count", "top_k_accuracy", "confusion_matrix",
                         "per_class_accuracy", "per_class_count", "per_class_precision",
                         "per_class_recall", "per_class_f1", "class_names"}
    assert list(full["top_k_accuracy"]) == [1, 3]
    assert full["top_k_accuracy"][1] == full["accuracy"] == ref_top_k(logits, labels, 1)
    assert full["top_k_accuracy"][3] == ref_top_k(logits, labels, 3)
    np.testing.assert_array_equal(full["confusion_matrix"], ref_confusion(logits, labels, 6))
    assert full["class_names"] == names and math.isnan(full["per_class_accuracy"][5])
    only_top = evaluate(model, loader, top_k=2)
    assert set(only_top) == {"loss", "accuracy", "count", "top_k_accuracy"}


class Identity(Module):
    """A model whose logits are its input (so tests choose the logits)."""

    def forward(self, x):
        return x


# --------------------------------------------------------------------------------------------
# mistakes


def test_top_k_larger_than_classes_is_a_config_error(backend, rng):
    logits, labels = tied_problem(rng, n=10, c=4)
    metrics = ClassificationMetrics(top_k=(1, 5))
    with pytest.raises(ConfigError, match=r"top-5.*only 4 classes"):
        metrics.update(to_backend(logits), to_backend(labels))
    with pytest.raises(ConfigError, match=r"top-5.*only 4 classes"):
        ClassificationMetrics(top_k=5, class_names="abcd")
    with pytest.raises(ConfigError, match=r"top-5.*only 4 classes"):
        evaluate(Identity(), [(to_backend(logits), to_backend(labels))], top_k=(1, 5))
    for bad in (0, -1, True, 2.0, "3"):
        with pytest.raises(ConfigError, match="positive integers"):
            check_top_k([bad])
    assert check_top_k([5, 1, 5]) == (1, 5) and check_top_k(3, 3) == (3,)


def test_labels_outside_the_classes_are_reported_at_the_end(backend):
    logits = np.zeros((4, 3), dtype=np.float32)
    metrics = ClassificationMetrics(top_k=1)
    metrics.update(to_backend(logits), to_backend(np.array([0, 1, 3, 2])))
    with pytest.raises(ShapeError, match=r"1 of 4 labels are outside \[0, 3\)"):
        metrics.compute()


def test_mismatched_batches_and_names(backend):
    metrics = ClassificationMetrics(top_k=1, class_names=["x", "y", "z"])
    with pytest.raises(ShapeError, match="4 classes, expected 3"):
        metrics.update(to_backend(np.zeros((2, 4), np.float32)), to_backend(np.array([0, 1])))
    with pytest.raises(ShapeError, match="labels"):
        metrics.update(to_backend(np.zeros((2, 3), np.float32)), to_backend(np.array([0])))
    with pytest.raises(ConfigError, match="2 class names for 3 classes"):
        ClassificationMetrics(class_names=["x", "y"], num_classes=3)


# --------------------------------------------------------------------------------------------
# host-side helpers


def test_per_class_accuracy_json_and_worst_classes():
    matrix = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 2]])
    acc = per_class_accuracy(matrix)
    np.testing.assert_array_equal(acc, [0.75, np.nan, 0.5])
    result = {"loss": 0.5, "accuracy": 5 / 8, "count": 8, "top_k_accuracy": {1: 0.625, 2: 1.0},
              "confusion_matrix": matrix, "per_class_accuracy": acc,
              "per_class_count": matrix.sum(axis=1), "class_names": ("cat", "dog", "emu")}
    data = json.loads(json.dumps(to_json(result), allow_nan=False))  # strict JSON: no NaN
    assert data["top_k_accuracy"] == {"1": 0.625, "2": 1.0}
    assert data["confusion_matrix"] == matrix.tolist()
    assert data["per_class"] == [
        {"index": 0, "name": "cat", "accuracy": 0.75, "count": 4},
        {"index": 1, "name": "dog", "accuracy": None, "count": 0},
        {"index": 2, "name": "emu", "accuracy": 0.5, "count": 4}]
    assert to_json({"loss": float("nan")}) == {"loss": None}
    assert worst_classes(result, 2) == [("emu", 0.5), ("cat", 0.75)]  # dog has no examples


# --------------------------------------------------------------------------------------------
# no host synchronisation per batch


def refuse_reads_except_through(monkeypatch, modules):
    """array-api-strict arrays refuse every conversion to host data, except inside the
    ``to_numpy`` of ``modules``; returns the list the allowed reads are counted in."""
    import array_api_strict

    reading, reads = [False], []
    cls = array_api_strict._array_object.Array
    for name in ("__bool__", "__int__", "__float__", "__index__", "__array__", "__dlpack__",
                 "__buffer__"):
        original = getattr(cls, name, None)
        if original is None:
            continue

        def guarded(self, *args, _original=original, **kwargs):
            if not reading[0]:
                raise AssertionError("device-to-host read while summing batches")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, guarded)
    for module in modules:
        real = module.to_numpy

        def counted(x, _real=real):
            reading[0] = True
            reads.append(1)
            try:
                return _real(x)
            finally:
                reading[0] = False

        monkeypatch.setattr(module, "to_numpy", counted)
    return reads


@pytest.mark.parametrize("batches", [2, 6])
def test_evaluate_reads_the_device_once_at_the_end(monkeypatch, rng, batches):
    """On a non-CPU device (array-api-strict's "device1"), evaluate sums everything there: the
    number of reads does not grow with the number of batches."""
    array_api_strict = pytest.importorskip("array_api_strict")
    import anycnn.train.metrics
    import anycnn.train.trainer

    logits, labels = tied_problem(rng, n=16 * batches, c=5, absent=2)
    device = array_api_strict.Device("device1")
    loader = [(array_api_strict.asarray(logits[i:i + 16], device=device),
               array_api_strict.asarray(labels[i:i + 16], device=device))
              for i in range(0, len(labels), 16)]
    reads = refuse_reads_except_through(monkeypatch, [anycnn.train.metrics, anycnn.train.trainer])
    result = evaluate(Identity(), loader, top_k=(1, 2), confusion=True)
    assert len(reads) == 5  # loss and correct sums, the matrix, two top-k counts: once each
    np.testing.assert_array_equal(result["confusion_matrix"], ref_confusion(logits, labels, 5))
    assert result["top_k_accuracy"][2] == ref_top_k(logits, labels, 2)


def test_confusion_counts_do_not_drop_repeated_pairs(backend):
    labels = to_backend(np.array([1, 1, 1, 0, 2, 2]))
    predictions = to_backend(np.array([1, 1, 1, 2, 2, 0]))
    counts = anycnn.to_numpy(confusion_counts(labels, predictions, 3))
    np.testing.assert_array_equal(counts, [[0, 0, 1], [0, 3, 0], [1, 0, 1]])


def test_importing_metrics_inference_and_plot_loads_no_torch_or_matplotlib():
    code = ("import sys, numpy as np, anycnn, anycnn.train.metrics, anycnn.train.inference\n"
            "import anycnn.cli.plot\n"
            "anycnn.use_backend('numpy')\n"
            "from anycnn.models import build_model\n"
            "anycnn.predict(build_model('lenet5'), np.zeros((28, 28), np.uint8))\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'matplotlib', 'cupy')]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
