"""Saving and moving models: checkpoints (:mod:`~anycnn.io.checkpoint`, safetensors, atomic) and
PyTorch interop (:mod:`~anycnn.io.interop`: ``state_dict`` names and layouts), PyTorch-format
weight files (:mod:`~anycnn.io.weights`) and torchvision's published ImageNet weights
(:mod:`~anycnn.io.pretrained`), ONNX export (:mod:`~anycnn.io.onnx`, needs
``pip install 'anycnn[onnx]'``; onnx is imported only when called)."""

from __future__ import annotations

from .._lazy import lazy_exports, names

_EXPORTS = {
    **names("checkpoint", "Checkpoint", "save_checkpoint", "load_checkpoint", "save",
            "load_weights", "load_model"),
    **names("interop", "to_torch_state_dict", "from_torch_state_dict", "torch_module"),
    **names("weights", "read_state_dict"),
    **names("pretrained", "imagenet_classes"),
    **names("onnx", "export_onnx"),
}
_SUBMODULES = {m: m for m in ("checkpoint", "interop", "onnx", "pretrained", "weights")}
__all__ = sorted([*_EXPORTS, *_SUBMODULES])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _SUBMODULES, globals())
