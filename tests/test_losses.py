"""Soft/one-hot targets and class weights for cross-entropy, BCEWithLogits and the sigmoid
focal loss: against torch.nn.functional (and torchvision's formula) in float64 where torch is
installed, finite differences on the backend under test, their errors, the accuracy counts
the Trainer reports, and the metrics that fit them (per-class precision/recall/F1, mAP)."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

import anycnn
from anycnn.data import ArrayDataset, DataLoader
from anycnn.errors import ConfigError, DataError, ShapeError
from anycnn.nn import Dense, Flatten, Sequential, losses
from anycnn.train import Trainer, evaluate
from anycnn.train.metrics import (
    ClassificationMetrics,
    MultiLabelMetrics,
    average_precision,
    precision_recall_f1,
    to_json,
)

EPS = 1e-6
TOL = dict(rtol=1e-8, atol=1e-8)
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="torch is the reference")


def host(a):
    return anycnn.to_numpy(a)


def run(loss_fn, logits, targets):
    """(loss, gradient) of ``loss_fn`` on host float64 arrays, on the backend under test."""
    loss = loss_fn.forward(anycnn.asarray(logits), anycnn.asarray(targets))
    return float(host(loss)), host(loss_fn.backward())


def check_gradient(loss_fn, logits, targets, rng):
    """Central differences along random directions equal the hand-written gradient."""
    t = anycnn.asarray(targets)

    def value(z):
        return float(host(loss_fn.forward(anycnn.asarray(z), t)))

    value(logits)
    grad = host(loss_fn.backward())
    for _ in range(3):
        v = rng.standard_normal(logits.shape)
        num = (value(logits + EPS * v) - value(logits - EPS * v)) / (2 * EPS)
        assert num == pytest.approx(float(np.sum(grad * v)), rel=1e-6, abs=1e-9)


def ce_targets(kind, rng, n=6, k=5):
    if kind == "ids":
        return rng.integers(0, k, n)
    if kind == "one_hot":
        return np.eye(k)[rng.integers(0, k, n)]
    if kind == "soft":
        return rng.dirichlet(np.ones(k), n)
    return rng.random((n, k))  # rows not summing to 1


CE_KINDS = ["ids", "one_hot", "soft", "unnormalised"]
WEIGHT = np.array([0.5, 2.0, 1.0, 0.2, 3.0])


# ------------------------------------------------------------------------- against PyTorch


@needs_torch
@pytest.mark.parametrize("kind", CE_KINDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_targets_and_weights_match_torch(backend, rng, kind, smoothing, weighted):
    import torch

    logits, targets = rng.standard_normal((6, 5)) * 4, ce_targets(kind, rng)
    weight = WEIGHT if weighted else None
    lt = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(
        lt, torch.tensor(targets), label_smoothing=smoothing,
        weight=None if weight is None else torch.tensor(weight))
    ref.backward()
    loss, grad = run(losses.SoftmaxCrossEntropy(smoothing, weight=weight), logits, targets)
    np.testing.assert_allclose(loss, ref.item(), **TOL)
    np.testing.assert_allclose(grad, lt.grad.numpy(), **TOL)


@needs_torch
@pytest.mark.parametrize("weight", [None, [0.5, 2.0, 1.0, 0.0]])
@pytest.mark.parametrize("pos_weight", [None, [3.0, 0.5, 1.0, 8.0]])
@pytest.mark.parametrize("soft", [False, True])
def test_bce_with_logits_matches_torch(backend, rng, weight, pos_weight, soft):
    import torch

    logits = rng.standard_normal((7, 4)) * 5
    targets = rng.random((7, 4)) if soft else (rng.random((7, 4)) < 0.4).astype(np.float64)
    lt = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(
        lt, torch.tensor(targets), weight=None if weight is None else torch.tensor(weight),
        pos_weight=None if pos_weight is None else torch.tensor(pos_weight))
    ref.backward()
    loss, grad = run(losses.BCEWithLogits(weight, pos_weight), logits, targets)
    np.testing.assert_allclose(loss, ref.item(), **TOL)
    np.testing.assert_allclose(grad, lt.grad.numpy(), **TOL)


def torchvision_focal(torch, inputs, targets, alpha, gamma):
    """torchvision.ops.sigmoid_focal_loss's formula with reduction="mean" (torchvision only
    imports here with a stub, so its four lines are restated)."""
    p = torch.sigmoid(inputs)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean()


@needs_torch
@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1.0, 0.0), (0.5, 1.0), (0.25, 0.5),
                                          (0.9, 3.5)])
@pytest.mark.parametrize("soft", [False, True])
def test_sigmoid_focal_matches_torchvision_formula(backend, rng, alpha, gamma, soft):
    import torch

    logits = rng.standard_normal((5, 3)) * 4
    targets = rng.random((5, 3)) if soft else (rng.random((5, 3)) < 0.5).astype(np.float64)
    lt = torch.tensor(logits, requires_grad=True)
    ref = torchvision_focal(torch, lt, torch.tensor(targets), alpha, gamma)
    ref.backward()
    loss, grad = run(losses.SigmoidFocalLoss(alpha, gamma), logits, targets)
    np.testing.assert_allclose(loss, ref.item(), **TOL)
    np.testing.assert_allclose(grad, lt.grad.numpy(), **TOL)


@needs_torch
def test_sigmoid_losses_are_stable_for_huge_logits(backend):
    import torch

    logits = np.array([[1000.0, -1000.0, 40.0], [-800.0, 800.0, -40.0]])
    targets = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    for loss_fn, ref in ((losses.BCEWithLogits(pos_weight=[2.0, 1.0, 1.0]),
                          torch.nn.functional.binary_cross_entropy_with_logits(
                              torch.tensor(logits), torch.tensor(targets),
                              pos_weight=torch.tensor([2.0, 1.0, 1.0]))),
                         (losses.SigmoidFocalLoss(), torchvision_focal(
                             torch, torch.tensor(logits), torch.tensor(targets), 0.25, 2.0))):
        loss, grad = run(loss_fn, logits, targets)
        assert math.isfinite(loss) and np.all(np.isfinite(grad))
        np.testing.assert_allclose(loss, ref.item(), rtol=1e-12)


# --------------------------------------------------------------------- finite differences


@pytest.mark.parametrize("kind", CE_KINDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_gradient(backend, rng, kind, smoothing):
    loss_fn = losses.SoftmaxCrossEntropy(smoothing, weight=WEIGHT)
    check_gradient(loss_fn, rng.standard_normal((6, 5)) * 3, ce_targets(kind, rng), rng)


def test_bce_gradient(backend, rng):
    check_gradient(losses.BCEWithLogits([1.0, 0.5, 2.0], [2.0, 1.0, 0.3]),
                   rng.standard_normal((4, 3)) * 3, rng.random((4, 3)), rng)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1.0, 0.5), (0.75, 1.0)])
def test_focal_gradient(backend, rng, alpha, gamma):
    targets = (rng.random((4, 3)) < 0.5).astype(np.float64)
    check_gradient(losses.SigmoidFocalLoss(alpha, gamma), rng.standard_normal((4, 3)) * 2,
                   targets, rng)


def test_focal_with_gamma_0_and_no_alpha_is_bce(backend, rng):
    logits, targets = rng.standard_normal((5, 4)), rng.random((5, 4))
    loss, grad = run(losses.SigmoidFocalLoss(-1.0, 0.0), logits, targets)
    ref_loss, ref_grad = run(losses.BCEWithLogits(), logits, targets)
    np.testing.assert_allclose([loss, *grad.ravel()], [ref_loss, *ref_grad.ravel()], **TOL)


def test_one_hot_targets_equal_class_ids(backend, rng):
    logits, ids = rng.standard_normal((6, 5)), rng.integers(0, 5, 6)
    for loss_fn in (losses.SoftmaxCrossEntropy(0.1), losses.SoftmaxCrossEntropy(weight=np.ones(5))):
        a = run(loss_fn, logits, ids)
        b = run(loss_fn, logits, np.eye(5)[ids])
        np.testing.assert_allclose(a[0], b[0], **TOL)
        np.testing.assert_allclose(a[1], b[1], **TOL)


def test_weighted_mean_by_hand(backend, rng):
    """Class ids: sum_i w[y_i] * nll_i / sum_i w[y_i] (PyTorch's weighted mean)."""
    logits, ids = rng.standard_normal((6, 5)), rng.integers(0, 5, 6)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    nll = -log_p[np.arange(6), ids]
    loss, _ = run(losses.SoftmaxCrossEntropy(weight=WEIGHT), logits, ids)
    assert loss == pytest.approx(np.sum(WEIGHT[ids] * nll) / np.sum(WEIGHT[ids]), rel=1e-12)


def test_losses_record_into_the_graph(backend, rng):
    from anycnn.autograd import Variable

    logits, targets = rng.standard_normal((3, 4)), (rng.random((3, 4)) < 0.5) * 1.0
    for loss_fn in (losses.BCEWithLogits(), losses.SigmoidFocalLoss(),
                    losses.SoftmaxCrossEntropy(weight=[1, 2, 3, 4])):
        z = Variable(anycnn.asarray(logits), requires_grad=True)
        loss_fn(z, anycnn.asarray(targets)).backward()
        _, grad = run(loss_fn, logits, targets)
        np.testing.assert_allclose(host(z.grad), grad, **TOL)


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("make, logits, targets, match", [
    (losses.SoftmaxCrossEntropy, (2, 3), np.zeros((2, 4)), "logits' shape"),
    (losses.SoftmaxCrossEntropy, (2, 3), np.zeros((2, 3), dtype=np.int64), "floating"),
    (lambda: losses.SoftmaxCrossEntropy(weight=[1, 2]), (2, 3), np.array([0, 1]),
     "weight has 2 entries"),
    (losses.BCEWithLogits, (2, 3), np.zeros((2,)), "targets must have the logits' shape"),
    (lambda: losses.BCEWithLogits(pos_weight=[1, 2]), (2, 3), np.zeros((2, 3)),
     "pos_weight has 2"),
    (losses.SigmoidFocalLoss, (0, 3), np.zeros((0, 3)), "non-empty"),
])
def test_shape_errors(backend, make, logits, targets, match):
    with pytest.raises(ShapeError, match=match):
        make().forward(anycnn.asarray(np.zeros(logits)), anycnn.asarray(targets))


@pytest.mark.parametrize("make, match", [
    (lambda: losses.SoftmaxCrossEntropy(weight=[1, -1]), ">= 0"),
    (lambda: losses.SoftmaxCrossEntropy(weight=[[1.0]]), "one number per class"),
    (lambda: losses.BCEWithLogits(pos_weight=[1, 0]), "> 0"),
    (lambda: losses.BCEWithLogits(weight=["a"]), "sequence of numbers"),
    (lambda: losses.SigmoidFocalLoss(gamma=-1), "gamma"),
    (lambda: losses.SigmoidFocalLoss(alpha=1.5), "alpha"),
])
def test_config_errors(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_class_weights():
    ids = np.array([0, 0, 0, 1, 2, 2])
    np.testing.assert_allclose(losses.class_weights(ids, 4), [6 / 12, 6 / 4, 6 / 8, 0.0])
    multi = np.array([[1, 0], [1, 1], [1, 0]], dtype=np.float32)
    np.testing.assert_allclose(losses.class_weights(multi, 2), [3 / 6, 3 / 2])
    with pytest.raises(ShapeError):
        losses.class_weights(np.array([0, 5]), 3)


# ------------------------------------------------------------------------ accuracy counts


def test_hits(backend):
    logits = anycnn.asarray(np.array([[2.0, -1.0, 0.5], [-1.0, -2.0, 3.0]]))
    assert float(host(losses.argmax_hits(logits, anycnn.asarray(np.array([0, 1]))))) == 1
    soft = anycnn.asarray(np.array([[0.7, 0.2, 0.1], [0.0, 0.0, 1.0]]))
    assert float(host(losses.argmax_hits(logits, soft))) == 2
    multi = anycnn.asarray(np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]]))
    # predicted present (logit > 0): [1, 0, 1] and [0, 0, 1]; each example 2 of 3 right
    assert float(host(losses.label_hits(logits, multi))) == pytest.approx(4 / 3)


# ---------------------------------------------------------------------------------- metrics


def test_precision_recall_f1_by_hand():
    matrix = np.array([[3, 1, 0], [2, 0, 0], [0, 0, 0]])  # class 1 never right, 2 absent
    p, r, f1 = precision_recall_f1(matrix)
    np.testing.assert_allclose(p, [3 / 5, 0.0, np.nan])
    np.testing.assert_allclose(r, [3 / 4, 0.0, np.nan])
    np.testing.assert_allclose(f1, [2 * 0.6 * 0.75 / 1.35, 0.0, np.nan])


def reference_ap(scores, truth):
    """Mean over the positives of the precision at their score (ties counted together)."""
    positives = np.flatnonzero(truth)
    if not len(positives):
        return math.nan
    return float(np.mean([truth[scores >= scores[i]].mean() for i in positives]))


def test_average_precision_against_its_definition(rng):
    for _ in range(20):
        scores = np.round(rng.standard_normal(30), 1)  # ties
        truth = rng.random(30) < 0.3
        assert average_precision(scores, truth) == pytest.approx(reference_ap(scores, truth),
                                                                 nan_ok=True)
    assert average_precision([3.0, 2.0, 1.0], [1, 1, 0]) == 1.0
    assert average_precision([1.0, 2.0, 3.0], [1, 0, 0]) == pytest.approx(1 / 3)


def test_multilabel_metrics_against_loops(backend, rng):
    logits = rng.standard_normal((40, 4))
    truth = rng.random((40, 4)) < 0.4
    truth[:, 3] = False  # a label without positives: AP NaN, left out of mAP
    m = MultiLabelMetrics(class_names=["a", "b", "c", "d"], threshold=0.6)
    for lo in (0, 25):
        m.update(anycnn.asarray(logits[lo:lo + 25]), anycnn.asarray(truth[lo:lo + 25] * 1.0))
    got = m.compute()
    guess = 1 / (1 + np.exp(-logits)) >= 0.6
    for c in range(4):
        tp = np.sum(guess[:, c] & truth[:, c])
        p = tp / guess[:, c].sum() if guess[:, c].sum() else np.nan
        r = tp / truth[:, c].sum() if truth[:, c].sum() else np.nan
        assert got["per_class_precision"][c] == pytest.approx(p, nan_ok=True)
        assert got["per_class_recall"][c] == pytest.approx(r, nan_ok=True)
        assert got["per_class_ap"][c] == pytest.approx(reference_ap(logits[:, c], truth[:, c]),
                                                       nan_ok=True)
    assert np.isnan(got["per_class_ap"][3])
    assert got["mAP"] == pytest.approx(np.mean([reference_ap(logits[:, c], truth[:, c])
                                                for c in range(3)]))
    assert got["subset_accuracy"] == pytest.approx(np.mean(np.all(guess == truth, axis=1)))
    tp = np.sum(guess & truth)
    assert got["micro_f1"] == pytest.approx(2 * tp / (guess.sum() + truth.sum()))
    assert got["per_class_count"].tolist() == truth.sum(axis=0).tolist()


def test_classification_metrics_give_precision_recall_f1(backend, rng):
    logits, labels = rng.standard_normal((50, 3)), rng.integers(0, 3, 50)
    m = ClassificationMetrics(num_classes=3)
    m.update(anycnn.asarray(logits), anycnn.asarray(labels))
    got = m.compute()
    p, r, f1 = precision_recall_f1(got["confusion_matrix"])
    np.testing.assert_array_equal(got["per_class_precision"], p)
    np.testing.assert_array_equal(got["per_class_recall"], r)
    np.testing.assert_array_equal(got["per_class_f1"], f1)
    np.testing.assert_array_equal(got["per_class_recall"], got["per_class_accuracy"])
    pred = logits.argmax(axis=1)
    for c in range(3):
        tp = np.sum((pred == c) & (labels == c))
        assert got["per_class_precision"][c] == pytest.approx(tp / np.sum(pred == c))


# ------------------------------------------------------------------- datasets and training


def multilabel_data(rng, n=48, k=3):
    images = rng.integers(0, 256, (n, 6, 6, 1), dtype=np.uint8)
    targets = (rng.random((n, k)) < 0.4).astype(np.float32)
    return ArrayDataset(images, targets, k)


def test_array_dataset_holds_targets(backend, rng):
    data = multilabel_data(rng)
    assert data.multi_label and data.labels.dtype == np.float32
    assert data.subset(np.array([3, 1])).labels.tolist() == data.labels[[3, 1]].tolist()
    for resident in (False, True):
        _, y = next(iter(DataLoader(data, 5, shuffle=True, device_resident=resident)))
        assert tuple(y.shape) == (5, 3)
    with pytest.raises(DataError, match="one column per class"):
        ArrayDataset(data.images, data.labels, 4)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        ArrayDataset(data.images, data.labels * 2, 3)


@pytest.mark.parametrize("make", [losses.BCEWithLogits, losses.SigmoidFocalLoss])
def test_trainer_on_multilabel_targets(backend, rng, make):
    data = multilabel_data(rng)
    model = Sequential(Flatten(), Dense(36, 3, dtype="float64"))
    trainer = Trainer(model, anycnn.optim.SGD(model.parameters(), lr=0.05), make(),
                      progress=False)
    history = trainer.fit(DataLoader(data, 16, shuffle=True, dtype="float64"),
                          DataLoader(data, 16, dtype="float64"), epochs=2)
    result = evaluate(model, DataLoader(data, 16, dtype="float64"), make(), multi_label=True)
    # the accuracy the trainer reports is the mean label accuracy, counted another way here
    assert result["accuracy"] == pytest.approx(result["multi_label"]["label_accuracy"])
    assert history[-1]["val_accuracy"] == pytest.approx(result["accuracy"])
    assert json.loads(json.dumps(to_json(result)))["multi_label"]["per_class"][0]["name"] == "0"
    with pytest.raises(ConfigError, match="single-label"):
        evaluate(model, DataLoader(data, 16, dtype="float64"), make(), multi_label=True,
                 confusion=True)


def test_trainer_on_soft_targets_and_weights(backend, rng):
    images = rng.integers(0, 256, (32, 6, 6, 1), dtype=np.uint8)
    ids = rng.integers(0, 3, 32)
    model = Sequential(Flatten(), Dense(36, 3, dtype="float64"))
    loss_fn = losses.SoftmaxCrossEntropy(0.1, weight=losses.class_weights(ids, 3))
    soft = ArrayDataset(images, np.eye(3)[ids], 3)
    trainer = Trainer(model, anycnn.optim.SGD(model.parameters(), lr=0.05), loss_fn,
                      progress=False)
    record = trainer.fit(DataLoader(soft, 8, dtype="float64"),
                         DataLoader(ArrayDataset(images, ids, 3), 8, dtype="float64"))[-1]
    # the same model scored on one-hot rows and on class ids: the same argmax accuracy
    again = evaluate(model, DataLoader(soft, 8, dtype="float64"), loss_fn)
    assert again["accuracy"] == pytest.approx(record["val_accuracy"])
    result = evaluate(model, DataLoader(ArrayDataset(images, ids, 3), 8, dtype="float64"),
                      confusion=True)
    assert {"precision", "recall", "f1"} <= set(to_json(result)["per_class"][0])


def test_multilabel_f1_is_0_for_a_label_never_predicted(backend):
    """F1 = 2TP / (2TP + FP + FN), as scikit-learn's f1_score: 0 (not NaN) for a label with
    positives that is never predicted, or predicted but absent; NaN only with neither."""
    logits = np.array([[5.0, -5, 5, -5], [5, -5, -5, -5], [-5, -5, -5, -5]])
    truth = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], np.float32)
    m = MultiLabelMetrics(class_names=["a", "b", "c", "d"])
    m.update(anycnn.asarray(logits), anycnn.asarray(truth))
    got = m.compute()
    np.testing.assert_array_equal(got["per_class_f1"], [1.0, 0.0, 0.0, np.nan])
    assert np.isnan(got["per_class_precision"][1])  # never predicted: precision undefined
    assert got["macro_f1"] == pytest.approx(1 / 3)  # d (no positive, no prediction) left out
    assert got["micro_f1"] == pytest.approx(2 * 2 / (3 + 4))
    only_missed = MultiLabelMetrics()
    only_missed.update(anycnn.asarray(logits[:, 1:2]), anycnn.asarray(truth[:, 1:2]))
    assert only_missed.compute()["micro_f1"] == 0.0  # not NaN
