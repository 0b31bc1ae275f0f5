"""Loss functions: ``forward(prediction, target)`` returns a 0-d mean loss, ``backward()`` the
gradient with respect to the prediction."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from array_api_compat import device

from ..autograd.variable import Variable, record, unwrap
from ..backend import namespace_of, to_numpy
from ..errors import ConfigError, ShapeError
from . import functional as F


class Loss:
    """A loss: ``forward(prediction, target)`` gives the mean loss (0-d), ``backward()`` its
    gradient with respect to that prediction. Calling it with a
    :class:`~anycnn.autograd.Variable` prediction (``loss_fn(model(x), y)``) records the loss
    in the prediction's graph: the result is a Variable, and ``.backward()`` on it (or on a
    sum of such losses) reaches every parameter."""

    #: d loss / d target as a multiple of d loss / d prediction (MSE: -1); None: no gradient
    #: for targets (class labels)
    target_sign: float | None = None

    def forward(self, prediction: Any, target: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, prediction: Any, target: Any) -> Any:
        if not isinstance(prediction, Variable) and not isinstance(target, Variable):
            return self.forward(prediction, target)
        if isinstance(target, Variable) and target.requires_grad and self.target_sign is None:
            raise TypeError(f"{type(self).__name__} has no gradient for its target; pass "
                            "target.detach()")
        value = self.forward(unwrap(prediction), unwrap(target))
        grad, sign = self.backward(), self.target_sign

        def vjp(g: Any, needs: tuple[bool, ...]) -> tuple[Any, Any]:
            return (g * grad if needs[0] else None,
                    g * (sign * grad) if needs[1] else None)

        return record(value, (prediction, target), vjp, type(self).__name__)


def argmax_hits(logits: Any, targets: Any) -> Any:
    """Correct predictions in a batch, as a 0-d array of ``logits``' dtype on their device:
    examples whose largest logit is at their class (``targets`` ``(N,)`` class ids) or at
    their target's largest entry (``(N, K)`` one-hot or soft targets, e.g. mixup). What the
    Trainer reports as accuracy for single-label losses."""
    xp = namespace_of(logits, targets)
    soft = targets.ndim == 2 and logits.ndim == 2 and xp.isdtype(targets.dtype, "real floating")
    truth = xp.argmax(targets, axis=1) if soft else targets
    return xp.sum(xp.astype(xp.argmax(logits, axis=1) == truth, logits.dtype))


def label_hits(logits: Any, targets: Any) -> Any:
    """Correct predictions of a multi-label batch, summed per example: each example adds the
    fraction of its ``K`` labels predicted right (``logit > 0`` against ``target >= 0.5``), so
    the Trainer's accuracy is the mean label accuracy (1 - Hamming loss). A 0-d array."""
    xp = namespace_of(logits, targets)
    right = (logits > 0) == (targets >= 0.5)
    per_example = math.prod(logits.shape[1:]) if logits.ndim > 1 else 1
    return xp.sum(xp.astype(right, logits.dtype)) / per_example


def batch_hits(loss_fn: Any, logits: Any, targets: Any) -> Any:
    """``loss_fn.hits(logits, targets)`` when the loss defines it (the losses here do), else
    :func:`argmax_hits`: the count behind the accuracy the Trainer and ``evaluate`` report."""
    hits = getattr(loss_fn, "hits", None)
    return hits(logits, targets) if hits is not None else argmax_hits(logits, targets)


def _class_vector(name: str, value: Any, minimum_exclusive: bool = False) -> np.ndarray | None:
    """``value`` (a sequence or array of per-class numbers, or None) as a host float64 ``(K,)``
    array of finite, non-negative numbers (positive with ``minimum_exclusive``)."""
    if value is None:
        return None
    try:
        host = np.asarray(to_numpy(value) if hasattr(value, "__array_namespace__") else value,
                          dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a sequence of numbers, one per class ({exc})") from exc
    if host.ndim != 1 or host.size == 0:
        raise ConfigError(f"{name} must be one number per class, shape (K,), got shape "
                          f"{host.shape}")
    if not np.all(np.isfinite(host)) or np.any(host < 0) or (
            minimum_exclusive and np.any(host == 0)):
        raise ConfigError(f"{name} must be finite and {'> 0' if minimum_exclusive else '>= 0'}"
                          f", got {host.tolist()}")
    return host


def _on_device(host: np.ndarray | None, like: Any, xp: Any) -> Any:
    return None if host is None else xp.asarray(host, dtype=like.dtype, device=device(like))


def _check_logits(what: str, logits: Any, xp: Any) -> None:
    if logits.ndim < 1 or math.prod(logits.shape) == 0:
        raise ShapeError(f"{what}: logits must be non-empty, got shape {tuple(logits.shape)} "
                         "(the mean over no elements is undefined)")
    if not xp.isdtype(logits.dtype, "real floating"):
        raise ShapeError(f"{what}: logits must be floating-point, got dtype {logits.dtype}")


class SoftmaxCrossEntropy(Loss):
    """Softmax followed by cross-entropy, averaged over the batch (numerically stable); PyTorch's
    ``cross_entropy``.

    ``forward(logits, labels)``: logits ``(N, K)`` float; labels either ``(N,)`` integers in
    ``[0, K)`` or ``(N, K)`` floating targets (one-hot, or soft: each row a distribution over
    the classes, as mixup or distillation give).
    ``label_smoothing`` ``e`` mixes the target with the uniform one, as in PyTorch.
    ``weight``: one non-negative weight per class (a sequence or array of ``K`` numbers), as
    PyTorch's ``weight=``: class ``c``'s terms are multiplied by ``weight[c]``, and with class-id
    labels the mean divides by the summed weights of the batch's labels (the weighted mean);
    with floating targets it divides by ``N``. :func:`class_weights` computes balanced weights
    from a dataset's labels.
    ``check_labels`` reads the labels' range back to the host on every call; the Trainer turns
    it off when it does not synchronise every step (GPUs), since datasets check labels on load.
    """

    def __init__(self, label_smoothing: float = 0.0, check_labels: bool = True,
                 weight: Any = None) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.check_labels = bool(check_labels)
        self.weight = _class_vector("weight", weight)
        self._grad = None

    def forward(self, logits: Any, labels: Any) -> Any:
        logits, labels = unwrap(logits), unwrap(labels)
        xp = namespace_of(logits, labels)
        if logits.ndim != 2:
            raise ShapeError(f"logits must be (N, classes), got shape {tuple(logits.shape)}")
        if not xp.isdtype(logits.dtype, "real floating"):
            raise ShapeError(f"logits must be floating-point, got dtype {logits.dtype}")
        if logits.shape[0] == 0 or logits.shape[1] == 0:
            raise ShapeError(f"logits must hold at least one example and one class, got shape "
                             f"{tuple(logits.shape)} (the mean over an empty batch is undefined)")
        k = logits.shape[1]
        floating = xp.isdtype(labels.dtype, "real floating")
        if labels.ndim == 2 and (floating or tuple(labels.shape) == tuple(logits.shape)):
            if not floating:
                raise ShapeError(f"(N, K) targets must be floating-point (one-hot or soft), got "
                                 f"dtype {labels.dtype}; class ids are (N,) integers")
            if tuple(labels.shape) != tuple(logits.shape):
                raise ShapeError(f"soft targets must have the logits' shape "
                                 f"{tuple(logits.shape)}, got shape {tuple(labels.shape)}")
        else:
            if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
                raise ShapeError(f"labels must be ({logits.shape[0]},) class ids or "
                                 f"{tuple(logits.shape)} targets to match logits "
                                 f"{tuple(logits.shape)}, got shape {tuple(labels.shape)}")
            if not xp.isdtype(labels.dtype, "integral"):
                raise ShapeError(f"labels must be integers, got dtype {labels.dtype}")
            if self.check_labels and (int(xp.min(labels)) < 0 or int(xp.max(labels)) >= k):
                raise ShapeError(f"labels must be in [0, {k}), got values in "
                                 f"[{int(xp.min(labels))}, {int(xp.max(labels))}]")
        if self.weight is not None and self.weight.shape[0] != k:
            raise ShapeError(f"weight has {self.weight.shape[0]} entries but the logits have "
                             f"{k} classes")
        loss, self._grad = F.softmax_cross_entropy_forward(
            logits, labels, self.label_smoothing, _on_device(self.weight, logits, xp))
        return loss

    def backward(self) -> Any:
        if self._grad is None:
            raise RuntimeError("SoftmaxCrossEntropy.backward called before forward")
        return self._grad

    def hits(self, logits: Any, labels: Any) -> Any:
        """Correct predictions in the batch (:func:`argmax_hits`)."""
        return argmax_hits(logits, labels)


class _SigmoidLoss(Loss):
    """Shared checks of the element-wise sigmoid losses (multi-label / binary targets)."""

    _grad: Any = None

    def _inputs(self, logits: Any, targets: Any) -> tuple[Any, Any, Any]:
        logits, targets = unwrap(logits), unwrap(targets)
        xp = namespace_of(logits, targets)
        name = type(self).__name__
        _check_logits(name, logits, xp)
        if tuple(targets.shape) != tuple(logits.shape):
            raise ShapeError(f"{name}: targets must have the logits' shape "
                             f"{tuple(logits.shape)} (one 0/1 or soft entry per label), got "
                             f"shape {tuple(targets.shape)}")
        if not (xp.isdtype(targets.dtype, "real floating")
                or xp.isdtype(targets.dtype, "integral") or targets.dtype == xp.bool):
            raise ShapeError(f"{name}: targets must be numbers in [0, 1], got dtype "
                             f"{targets.dtype}")
        return logits, targets, xp

    def backward(self) -> Any:
        if self._grad is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return self._grad

    def hits(self, logits: Any, targets: Any) -> Any:
        """Correct predictions in the batch as the mean label accuracy (:func:`label_hits`)."""
        return label_hits(logits, targets)


class BCEWithLogits(_SigmoidLoss):
    """Sigmoid followed by binary cross-entropy, averaged over all elements; PyTorch's
    ``BCEWithLogitsLoss`` (stable for logits of any size). For multi-label classification
    (each of ``K`` labels present or not) and binary outputs.

    ``forward(logits, targets)``: both the same shape, typically ``(N, K)``; targets in
    ``[0, 1]`` (0/1, or soft), of any real or bool dtype.
    ``pos_weight``: ``K`` positive numbers weighing each class's positive term (``> 1`` raises
    recall: ``n_negative / n_positive`` balances a rare label), as PyTorch's ``pos_weight``.
    ``weight``: ``K`` non-negative numbers rescaling each class's whole term (PyTorch's
    ``weight`` broadcast along the last axis). Both apply along the last axis.
    """

    def __init__(self, weight: Any = None, pos_weight: Any = None) -> None:
        self.weight = _class_vector("weight", weight)
        self.pos_weight = _class_vector("pos_weight", pos_weight, minimum_exclusive=True)

    def forward(self, logits: Any, targets: Any) -> Any:
        logits, targets, xp = self._inputs(logits, targets)
        for name, value in (("weight", self.weight), ("pos_weight", self.pos_weight)):
            if value is not None and value.shape[0] != logits.shape[-1]:
                raise ShapeError(f"BCEWithLogits: {name} has {value.shape[0]} entries but the "
                                 f"logits' last axis has {logits.shape[-1]}")
        loss, self._grad = F.bce_with_logits_forward(
            logits, targets, _on_device(self.weight, logits, xp),
            _on_device(self.pos_weight, logits, xp))
        return loss


class SigmoidFocalLoss(_SigmoidLoss):
    """Sigmoid focal loss (Lin et al., "Focal Loss for Dense Object Detection"), averaged over
    all elements: ``torchvision.ops.sigmoid_focal_loss(..., reduction="mean")``. Binary and
    multi-label targets, like :class:`BCEWithLogits`; it down-weights well-classified elements
    by ``(1 - p_t) ** gamma`` and weighs positives by ``alpha`` (negatives by ``1 - alpha``; a
    negative ``alpha`` turns that off). ``gamma = 0`` and ``alpha < 0`` give
    :class:`BCEWithLogits`. (For a multi-class softmax model use :class:`SoftmaxCrossEntropy`
    with ``weight``.)
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0) -> None:
        if not (math.isfinite(alpha) and alpha <= 1.0):
            raise ConfigError(f"alpha must be <= 1 (negative: no alpha weighting), got {alpha}")
        if not (math.isfinite(gamma) and gamma >= 0.0):
            raise ConfigError(f"gamma must be a finite number >= 0, got {gamma}")
        self.alpha, self.gamma = float(alpha), float(gamma)

    def forward(self, logits: Any, targets: Any) -> Any:
        logits, targets, _ = self._inputs(logits, targets)
        loss, self._grad = F.sigmoid_focal_forward(logits, targets, self.alpha, self.gamma)
        return loss


def class_weights(labels: Any, num_classes: int) -> np.ndarray:
    """Balanced per-class weights from class-id labels (``(N,)``) or multi-label targets
    (``(N, K)`` 0/1): ``N / (K * count_c)``, scikit-learn's "balanced" rule, so a class with the
    average count gets 1. A class with no examples gets weight 0 (it contributes nothing).
    Returns host float64 ``(K,)``, for ``SoftmaxCrossEntropy(weight=...)`` or
    ``BCEWithLogits(weight=...)``.
    """
    host = np.asarray(to_numpy(labels) if hasattr(labels, "__array_namespace__") else labels)
    if host.ndim == 1:
        if host.size and (host.min() < 0 or host.max() >= num_classes):
            raise ShapeError(f"labels must be in [0, {num_classes})")
        counts = np.bincount(host.astype(np.int64), minlength=num_classes).astype(np.float64)
    elif host.ndim == 2 and host.shape[1] == num_classes:
        counts = (host >= 0.5).sum(axis=0).astype(np.float64)
    else:
        raise ShapeError(f"labels must be (N,) class ids or (N, {num_classes}) targets, got shape "
                         f"{host.shape}")
    n = host.shape[0]
    with np.errstate(divide="ignore"):
        return np.where(counts > 0, n / (num_classes * np.maximum(counts, 1)), 0.0)


class MSELoss(Loss):
    """Mean squared error over all elements; prediction and target of the same shape."""

    target_sign = -1.0

    def __init__(self) -> None:
        self._grad = None

    def forward(self, pred: Any, target: Any) -> Any:
        pred, target = unwrap(pred), unwrap(target)
        xp = namespace_of(pred, target)
        if tuple(pred.shape) != tuple(target.shape):
            raise ShapeError(f"MSELoss: prediction shape {tuple(pred.shape)} differs from target "
                             f"shape {tuple(target.shape)}")
        for what, a in (("prediction", pred), ("target", target)):
            if not xp.isdtype(a.dtype, "real floating"):
                raise ShapeError(f"MSELoss: {what} must be floating-point, got dtype {a.dtype}")
        if math.prod(pred.shape) == 0:
            raise ShapeError("MSELoss: empty prediction (the mean over no elements is undefined)")
        loss, self._grad = F.mse_forward(pred, target)
        return loss

    def backward(self) -> Any:
        if self._grad is None:
            raise RuntimeError("MSELoss.backward called before forward")
        return self._grad
