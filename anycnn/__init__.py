"""anycnn: convolutional networks written once against the Python Array API.

The same layers run on NumPy, CuPy, PyTorch tensors and array-api-strict; pick one with the
``ANYCNN_BACKEND`` environment variable or :func:`use_backend`. Importing anycnn loads nothing
and reads no environment variable: names below are imported on first access, and the backend is
resolved at first use. (This also lets the CLI tune NumPy's BLAS before NumPy loads.)
"""

from __future__ import annotations

from ._lazy import lazy_exports, names

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    **names("backend", "Backend", "asarray", "get_backend", "namespace_of", "to_numpy",
            "use_backend"),
    **names("autograd", "Variable", "enable_grad", "is_grad_enabled", "no_grad"),
    **names("errors", "AnycnnError", "BackendError", "BackendMismatchError", "CheckpointError",
            "ConfigError", "DataError", "ShapeError", "TrainingError"),
    **names("nn.module", "Module", "Parameter"), **names("nn.sequential", "Sequential"),
    **names("nn.containers", "Concat", "Identity", "ModuleList", "Residual"),
    **names("random", "manual_seed"),
    **names("io.checkpoint", "load_model", "load_weights", "save"),
    **names("io.pretrained", "pretrained"),
    **names("train.inference", "predict", "predict_proba", "predict_topk"),
    **names("nn.summarize", "Summary", "summary"),
}
#: attribute -> the module or package it stands for (``anycnn.layers`` is ``anycnn.nn.layers``)
_SUBMODULES = {
    **{p: p for p in ("autograd", "backend", "cli", "data", "dist", "errors", "io", "kernels",
                      "models", "nn", "optim", "random", "testing", "train")},
    **{m: f"nn.{m}" for m in ("containers", "functional", "fusion", "geometry", "init", "layers",
                              "losses", "module", "sequential", "summarize")},
    **{m: f"data.{m}" for m in ("augment", "cifar", "dataloader", "datasets", "imagefolder",
                                "images")},
    **{m: f"train.{m}" for m in ("callbacks", "inference", "metrics")},
    "schedules": "optim.schedules", "checkpoint": "io.checkpoint", "interop": "io.interop",
    "bench": "cli.bench", "plot": "cli.plot",
}

__all__ = sorted([*_EXPORTS, "__version__", "autograd", "data", "functional", "init", "io",
                  "layers", "losses", "nn", "optim", "testing", "train"])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _SUBMODULES, globals())
