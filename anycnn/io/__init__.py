"""Saving and moving models: checkpoints (:mod:`~anycnn.io.checkpoint`, safetensors, atomic) and
PyTorch interop (:mod:`~anycnn.io.interop`: ``state_dict`` names and layouts), ONNX export
(:mod:`~anycnn.io.onnx`, needs ``pip install 'anycnn[onnx]'``; onnx is imported only when
called)."""

from __future__ import annotations

from .._lazy import lazy_exports, names

_EXPORTS = {
    **names("checkpoint", "Checkpoint", "save_checkpoint", "load_checkpoint", "save",
            "load_weights", "load_model"),
    **names("interop", "to_torch_state_dict", "from_torch_state_dict", "torch_module"),
    **names("onnx", "export_onnx"),
}
_SUBMODULES = {m: m for m in ("checkpoint", "interop", "onnx")}
__all__ = sorted([*_EXPORTS, *_SUBMODULES])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _SUBMODULES, globals())
