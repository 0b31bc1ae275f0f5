"""Building networks: layers, containers, losses, initialisers and the array functions under them.

``anycnn.nn.Conv2D``, ``anycnn.nn.Residual``, ``anycnn.nn.SoftmaxCrossEntropy``, ... are
re-exported from the modules that define them (imported on first use):

* :mod:`~anycnn.nn.functional` — pure array ops with their backward passes (im2col convolution,
  pooling, normalisation, losses);
* :mod:`~anycnn.nn.module` (``Module``, ``Parameter``), :mod:`~anycnn.nn.layers`,
  :mod:`~anycnn.nn.activations` (``ReLU6``, ``Hardswish``, ``SiLU``, ``GELU``, ...),
  :mod:`~anycnn.nn.sequential`, :mod:`~anycnn.nn.containers` (``Residual``, ``Concat``,
  ``Identity``), :mod:`~anycnn.nn.blocks` (squeeze-and-excitation, conv-norm-activation),
  :mod:`~anycnn.nn.losses`, :mod:`~anycnn.nn.init`;
* :mod:`~anycnn.nn.fusion` (exact fused blocks), :mod:`~anycnn.nn.inference` (eval mode:
  BatchNorm folded into convolutions), :mod:`~anycnn.nn.geometry` (window shapes and index
  tables), :mod:`~anycnn.nn.summarize` (``summary``).
"""

from __future__ import annotations

from .._lazy import lazy_exports, names

_EXPORTS = {
    **names("module", "Module", "Parameter", "eval_mode"),
    **names("layers", "Conv2D", "ConvTranspose2D", "Dense", "BatchNorm2D",
            "GroupNorm", "LayerNorm", "MaxPool2D", "AvgPool2D", "GlobalAvgPool2D",
            "AdaptiveAvgPool2D", "Upsample2D", "Flatten", "ReLU", "LeakyReLU", "Sigmoid", "Tanh",
            "Dropout", "StochasticDepth"),
    **names("activations", "ReLU6", "Hardsigmoid", "Hardswish", "SiLU", "GELU", "Softmax"),
    **names("blocks", "SqueezeExcitation", "conv_norm_act"),
    **names("sequential", "Sequential"),
    **names("containers", "Identity", "Residual", "Concat", "ModuleList"),
    **names("losses", "Loss", "SoftmaxCrossEntropy", "MSELoss", "BCEWithLogits",
            "SigmoidFocalLoss", "class_weights"),
    **names("summarize", "Summary", "summary"),
    # the model-wide switch lives with the communicators (anycnn.dist); kept here by name
    **names(".dist.sync", "sync_batchnorm"),
}
_SUBMODULES = {m: m for m in ("activations", "blocks", "containers", "functional", "fusion",
                              "geometry", "inference", "init", "layers", "losses", "module",
                              "sequential", "summarize")}
__all__ = sorted([*_EXPORTS, *_SUBMODULES])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _SUBMODULES, globals())
