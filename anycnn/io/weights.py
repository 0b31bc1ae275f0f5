"""Weight files in PyTorch's names and layouts (torchvision, timm, your own ``torch.save``), read
into anycnn models.

Formats, told apart by their first bytes (the suffix is only used in messages):

* **safetensors** (``.safetensors``, e.g. timm's ``model.safetensors`` on the Hugging Face Hub,
  or ``safetensors.torch.save_file(model.state_dict(), path)``): read with
  ``safetensors.numpy``, so no PyTorch is needed; ``BF16`` tensors are widened to ``float32``
  (exactly). A safetensors file written by :func:`anycnn.save` is an anycnn checkpoint instead
  (anycnn names and layouts; :func:`is_anycnn_checkpoint`), which :func:`anycnn.load_weights`
  reads as such.
* **PyTorch** (``.pth``/``.pt``/``.bin``: the zip format of ``torch.save``, or its older pickle
  format): read with ``torch.load(path, map_location="cpu", weights_only=True)``, which refuses
  arbitrary Python objects. Needs PyTorch; without it the error says so in one line.

A file may hold the ``state_dict`` itself or wrap it: ``{"state_dict": ...}`` (timm, Lightning),
``{"model": ...}`` (torchvision's reference scripts), ``{"model_state_dict": ...}``, ``{"net":
...}``, ``{"module": ...}``, searched in that order (an exponential-moving-average copy such as
``state_dict_ema`` is not picked). A ``"module."`` prefix on every name (``DataParallel``) or
``"_orig_mod."`` (``torch.compile``) is removed. Values end up as host NumPy arrays in torch
layout; :func:`anycnn.io.interop.from_torch_state_dict` converts them to the model's.

Every bad input raises :class:`~anycnn.errors.CheckpointError` naming the file: missing, a
folder, empty, truncated or corrupt, an image or a text file, a pickle holding other Python
objects than tensors, a mapping with no tensors.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..atomic import os_reason
from ..errors import CheckpointError
from .interop import torch_value
from .sniff import file_kind

#: keys that wrap a state_dict in training checkpoints, looked for in this order
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "module")
#: name prefixes removed when every tensor carries them (DataParallel, torch.compile)
STRIP_PREFIXES = ("module.", "_orig_mod.")

_READS = "anycnn reads .safetensors files, and .pth/.pt files with PyTorch installed"


def _head(path: pathlib.Path, count: int = 64) -> bytes:
    if not path.exists():
        raise CheckpointError(f"weight file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"weight path {path} is a directory, not a file")
    try:
        with open(path, "rb") as stream:
            return stream.read(count)
    except OSError as exc:
        raise CheckpointError(f"cannot read weight file {path}: {os_reason(exc)}") from exc


def file_format(path: str | os.PathLike) -> str:
    """``"safetensors"`` or ``"torch"``: the format of the weight file at ``path``, from its
    first bytes.

    Raises:
        CheckpointError: the file is missing, a folder, empty, or not a weight file (an image, a
            text file, ...: what it looks like is said).
    """
    path = pathlib.Path(path)
    head = _head(path)
    if not head:
        raise CheckpointError(f"{path} is empty, not a weight file")
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):
        return "torch"  # torch.save's zip format, or its older pickle format
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"  # 8-byte little-endian header length, then the JSON header
    what = file_kind(head)
    if what is not None:
        raise CheckpointError(f"{path} is {what}, not a weight file ({_READS})")
    if all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head):
        raise CheckpointError(f"{path} is a text file starting {head[:32].decode()!r}, not a "
                              f"weight file ({_READS})")
    raise CheckpointError(f"{path} is not a weight file anycnn knows: neither safetensors nor "
                          f"PyTorch's format ({_READS})")


def _safetensors_header(path: pathlib.Path, data: bytes) -> dict[str, Any]:
    from .checkpoint import _check_length, _parse_header

    header = _parse_header(path, data)
    _check_length(path, header, len(data) - 8 - int.from_bytes(data[:8], "little"))
    return header


def is_anycnn_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file written by anycnn (:func:`anycnn.save`,
    checkpoints of ``anycnn train``): its metadata has ``format_version`` and
    ``anycnn_version``. Other safetensors files hold torch-named tensors.

    Raises:
        CheckpointError: as :func:`file_format`, or the safetensors header is corrupt.
    """
    path = pathlib.Path(path)
    if file_format(path) != "safetensors":
        return False
    head = _head(path, 8)
    size = int.from_bytes(head, "little")
    try:
        with open(path, "rb") as stream:
            data = stream.read(8 + min(size, path.stat().st_size))
    except OSError as exc:
        raise CheckpointError(f"cannot read weight file {path}: {os_reason(exc)}") from exc
    from .checkpoint import _parse_header

    meta = _parse_header(path, data).get("__metadata__")
    return isinstance(meta, dict) and "format_version" in meta and "anycnn_version" in meta


def _bf16_to_float32(raw: bytes) -> np.ndarray:
    """``bfloat16`` bytes (little-endian) as ``float32``: the upper half of each float's bits."""
    return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read weight file {path}: {os_reason(exc)}") from exc
    header = _safetensors_header(path, data)
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    bf16 = {k for k, v in entries.items() if isinstance(v, dict) and v.get("dtype") == "BF16"}
    try:
        from safetensors.numpy import load

        if not bf16:
            return dict(load(data))
        # NumPy has no bfloat16: read those tensors as uint16 (same size), then widen them
        header = {k: ({**v, "dtype": "U16"} if k in bf16 else v) for k, v in header.items()}
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        start = 8 + int.from_bytes(data[:8], "little")
        out = dict(load(len(text).to_bytes(8, "little") + text + data[start:]))
        for name in bf16:
            out[name] = _bf16_to_float32(out[name].tobytes()).reshape(out[name].shape)
        return out
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # SafetensorError, pyo3's PanicException, a bad reshape
        raise CheckpointError(f"{path} is corrupt (safetensors: {exc})") from exc


def import_torch(path: str | os.PathLike, why: str = "reading a .pth/.pt weight file") -> Any:
    """The ``torch`` module, or a one-line :class:`CheckpointError` saying that ``why`` needs
    PyTorch and that ``.safetensors`` files load without it."""
    try:
        return importlib.import_module("torch")
    except ImportError:
        raise CheckpointError(
            f"{path}: {why} needs PyTorch (pip install torch); .safetensors weight files load "
            "without it") from None


def _first_line(exc: BaseException) -> str:
    """The first sentence of a torch.load error (of weights_only's long message, the line that
    names the refused object)."""
    text = str(exc).strip()
    lines = text.splitlines() or [type(exc).__name__]
    line = next((ln.strip() for ln in lines if "WeightsUnpickler error" in ln), lines[0])
    return line.split(". ")[0].rstrip(".")[:300]


def _read_torch(path: pathlib.Path) -> Any:
    torch = import_torch(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError, ...
        reason = _first_line(exc)
        if "Weights only load failed" in str(exc) or "WeightsUnpickler" in str(exc):
            raise CheckpointError(
                f"{path} holds Python objects besides tensors, which torch.load(weights_only="
                f"True) refuses to unpickle ({reason}); save only the model's state_dict "
                "(or a .safetensors file) from a trusted copy") from None
        raise CheckpointError(f"{path} is not a readable PyTorch file, truncated or corrupt "
                              f"({reason})") from None


def _is_tensor(value: Any) -> bool:
    return isinstance(value, np.ndarray) or (type(value).__module__.startswith("torch")
                                            and hasattr(value, "detach"))


def unwrap_state_dict(obj: Any, where: str = "the file") -> dict[str, Any]:
    """The ``{name: tensor}`` mapping in a loaded weight file: ``obj`` itself, or the first of
    :data:`WRAPPER_KEYS` that holds one (see the module docstring), with a
    :data:`STRIP_PREFIXES` prefix removed when every name has it.

    Raises:
        CheckpointError: no such mapping (the top-level keys found are named), or a name that
            is not a string.
    """
    for _ in range(3):  # {"model": {"state_dict": ...}} at most
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a state_dict "
                                  "(a mapping of tensor names to tensors)")
        tensors = {k: v for k, v in obj.items() if _is_tensor(v)}
        if tensors and len(tensors) == len(obj):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            if tensors:  # tensors beside other entries: take the tensors
                obj = tensors
                break
            keys = ", ".join(repr(k) for k in list(obj)[:8])
            raise CheckpointError(
                f"{where} holds no tensors: its top-level keys are {keys or 'none'}; expected "
                f"a state_dict, or one wrapped under one of {', '.join(WRAPPER_KEYS)}")
        obj = inner
    state = dict(obj)
    bad = [k for k in state if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{where}: tensor names must be strings, found {bad[0]!r}")
    for prefix in STRIP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The PyTorch ``state_dict`` in a weight file (safetensors, or ``.pth``/``.pt`` with
    PyTorch; see the module docstring), as ``{torch name: host NumPy array in torch layout}``.
    Pass it to :func:`anycnn.io.interop.from_torch_state_dict`.

    Raises:
        CheckpointError: the file is missing, not a weight file, corrupt, needs PyTorch which
            is not installed, or holds no state_dict (each said with the file's path).
    """
    path = pathlib.Path(path)
    if file_format(path) == "safetensors":
        loaded: Any = _read_safetensors(path)
    else:
        loaded = _read_torch(path)
    state = unwrap_state_dict(loaded, str(path))
    return {name: torch_value(name, value) for name, value in state.items()}
