"""Loss functions: ``forward(prediction, target)`` returns a 0-d mean loss, ``backward()`` the
gradient with respect to the prediction."""

from __future__ import annotations

import math
from typing import Any

from ..autograd.variable import Variable, record, unwrap
from ..backend import namespace_of
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


class SoftmaxCrossEntropy(Loss):
    """Softmax followed by cross-entropy, averaged over the batch (numerically stable).

    ``forward(logits, labels)``: logits ``(N, K)`` float, labels ``(N,)`` integers in ``[0, K)``.
    ``label_smoothing`` ``e`` mixes the one-hot target with the uniform one, as in PyTorch.
    ``check_labels`` reads the labels' range back to the host on every call; the Trainer turns
    it off when it does not synchronise every step (GPUs), since datasets check labels on load.
    """

    def __init__(self, label_smoothing: float = 0.0, check_labels: bool = True) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.check_labels = bool(check_labels)
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
        if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
            raise ShapeError(f"labels must be ({logits.shape[0]},) to match logits "
                             f"{tuple(logits.shape)}, got shape {tuple(labels.shape)}")
        if not xp.isdtype(labels.dtype, "integral"):
            raise ShapeError(f"labels must be integers, got dtype {labels.dtype}")
        k = logits.shape[1]
        if self.check_labels and (int(xp.min(labels)) < 0 or int(xp.max(labels)) >= k):
            raise ShapeError(f"labels must be in [0, {k}), got values in "
                             f"[{int(xp.min(labels))}, {int(xp.max(labels))}]")
        loss, self._grad = F.softmax_cross_entropy_forward(logits, labels, self.label_smoothing)
        return loss

    def backward(self) -> Any:
        if self._grad is None:
            raise RuntimeError("SoftmaxCrossEntropy.backward called before forward")
        return self._grad


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
