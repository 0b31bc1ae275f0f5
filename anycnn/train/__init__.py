"""Training: the :class:`Trainer` loop, evaluation and prediction, callbacks and metrics.

* :mod:`~anycnn.train.trainer` — ``Trainer``, ``evaluate``, ``EpochRecord``;
* :mod:`~anycnn.train.inference` — ``predict``, ``predict_proba``, ``predict_topk``;
* :mod:`~anycnn.train.callbacks` — ``Callback``, ``EarlyStopping``, ``BestCheckpoint``,
  ``ProgressLog``;
* :mod:`~anycnn.train.metrics` — ``ClassificationMetrics`` (top-k, per-class, confusion).
"""

from __future__ import annotations

from .._lazy import lazy_exports, names

_EXPORTS = {
    **names("trainer", "EpochRecord", "Trainer", "evaluate"),
    **names("inference", "predict", "predict_proba", "predict_topk"),
    **names("callbacks", "Callback", "EarlyStopping", "BestCheckpoint", "ProgressLog"),
    **names("metrics", "ClassificationMetrics"),
}
_SUBMODULES = {m: m for m in ("callbacks", "inference", "metrics", "trainer")}
__all__ = sorted([*_EXPORTS, *_SUBMODULES])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _SUBMODULES, globals())
