"""anycnn: convolutional networks written once against the Python Array API.

The same layers run on NumPy, CuPy, PyTorch tensors and array-api-strict; pick one with the
``ANYCNN_BACKEND`` environment variable or :func:`use_backend`. Importing anycnn loads nothing
and reads no environment variable: names below are imported on first access, and the backend is
resolved at first use. (This also lets the CLI tune NumPy's BLAS before NumPy loads.)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "Backend": "backend", "asarray": "backend", "get_backend": "backend",
    "to_numpy": "backend", "use_backend": "backend",
    "AnycnnError": "errors", "BackendError": "errors", "BackendMismatchError": "errors",
    "CheckpointError": "errors", "ConfigError": "errors", "DataError": "errors",
    "ShapeError": "errors", "TrainingError": "errors",
    "Module": "module", "Parameter": "module", "Sequential": "sequential",
    "Concat": "containers", "Identity": "containers", "Residual": "containers",
    "manual_seed": "random",
    "load_model": "checkpoint", "load_weights": "checkpoint", "save": "checkpoint",
    "predict": "inference", "predict_proba": "inference", "predict_topk": "inference",
    "Summary": "summarize", "summary": "summarize",
}
_SUBMODULES = {"backend", "bench", "checkpoint", "cli", "containers", "dataloader", "datasets",
               "errors", "fastpath", "functional", "fusion", "geometry", "imagefolder", "images",
               "inference", "init", "interop", "layers", "losses", "metrics", "models", "module",
               "optim", "plot", "random", "schedules", "sequential", "summarize", "testing",
               "train", "augment"}

__all__ = sorted([*_EXPORTS, "__version__", "functional", "init", "layers", "losses", "optim",
                  "testing"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'anycnn' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
