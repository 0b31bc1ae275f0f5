"""Checkpoints: one safetensors file per save, readable on every backend.

File layout (safetensors, no pickle anywhere):

* tensors ``model.<dotted name>``: every parameter and buffer of the model, as host arrays in the
  model's own layout (``Conv2D.weight`` is ``(kh, kw, in, out)``, ``Dense.weight`` ``(in, out)``);
* tensors ``optim.<index>.<name>``: the optimizer's per-parameter state arrays (momentum buffers,
  Adam moments), keyed as in :meth:`anycnn.optim.optimizers.Optimizer.state_dict`;
* tensors ``ema.<dotted name>`` (only when training kept a moving average of the weights,
  :class:`anycnn.optim.ema.EMA`): the averaged parameters and buffers, by the model's names;
* string metadata, structured values JSON-encoded: ``format_version``, ``anycnn_version``,
  ``model_spec``, ``dtype``, ``backend`` (where the model's arrays lived), ``epoch``, ``step``,
  ``optimizer`` (the optimizer's ``state_dict`` without its arrays), ``rng_state``
  (:func:`anycnn.random.get_state`) and ``extra`` (history, training config, ...); with
  averages also ``ema`` (``{"decay", "warmup", "updates"}``).

:func:`load_model` and :func:`load_weights` give a model the averaged weights when the file has
them (they are what validation measured), the trained ones with ``ema=False``;
:meth:`anycnn.train.trainer.Trainer.resume` restores both.

Guarantees (each one tested):

* Writes are atomic: the bytes go to a temporary file in the target's folder, are flushed and
  fsynced, then ``os.replace`` puts them in place and the folder is fsynced. A failed or
  interrupted save leaves the previous checkpoint intact and no temporary file behind.
* Non-finite weights are refused, so a diverged run never overwrites a good checkpoint.
* Reading untrusted bytes raises only :class:`~anycnn.errors.CheckpointError`, whatever is wrong
  with the file (missing, truncated, random bytes, not safetensors, not anycnn, too new).
* A checkpoint saved on one backend loads on any other: tensors are stored as host arrays and
  copied onto the current backend on :func:`restore`.
* Metadata is data only: the JSON header is size-limited (:data:`MAX_HEADER_BYTES`) and parsed
  with ``json``; :func:`load_model` bounds the model spec it builds from (:data:`SPEC_LIMITS`).

The atomic write itself is :func:`anycnn.atomic.atomic_write_bytes` (re-exported here), with
its test hook ``ANYCNN_TEST_SLOW_WRITE``.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import random as anycnn_random
from ..atomic import SLOW_WRITE_ENV, atomic_write_bytes, os_reason  # noqa: F401 (re-export)
from ..backend import backend_label, dtype_name, to_numpy
from ..errors import AnycnnError, CheckpointError
from .sniff import file_kind

FORMAT_VERSION = 1

#: safetensors' own limit on the JSON header; anything larger is not a file we wrote
MAX_HEADER_BYTES = 100_000_000

MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."
EMA_PREFIX = "ema."

#: metadata keys every anycnn checkpoint has (all values are strings, most JSON)
REQUIRED_METADATA = ("format_version", "anycnn_version", "model_spec", "dtype", "backend",
                     "epoch", "step", "optimizer", "rng_state", "extra")

_FLOAT_DTYPES = ("float16", "float32", "float64")


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` read from a file.

    Attributes:
        tensors: model parameters and buffers by dotted name (``"0.weight"``), NumPy arrays.
        optimizer_state: the optimizer's ``state_dict`` (``"arrays"`` as NumPy), or ``None``.
        metadata: every metadata entry, JSON values decoded.
        epoch, step: training progress when the checkpoint was written.
        model_spec: the :func:`anycnn.models.model_spec` dict, or ``None``.
        rng_state: the global RNG state (:func:`anycnn.random.get_state`), or ``None``.
        extra: caller data saved with the checkpoint (history, config, ...).
        path: the file it was read from.
        ema_state: the weight averages' ``state_dict`` (:class:`anycnn.optim.ema.EMA`;
            ``"arrays"`` as NumPy, by the model's tensor names), or ``None``.
    """

    tensors: dict[str, np.ndarray]
    optimizer_state: dict[str, Any] | None
    metadata: dict[str, Any]
    epoch: int = 0
    step: int = 0
    model_spec: dict[str, Any] | None = None
    rng_state: dict[str, Any] | None = None
    extra: Any = field(default_factory=dict)
    path: pathlib.Path | None = None
    ema_state: dict[str, Any] | None = None

    @property
    def dtype(self) -> str:
        """Floating dtype of the saved model (``"float32"``, ...)."""
        return self.metadata["dtype"]

    @property
    def backend(self) -> str:
        """Name of the backend the model lived on when it was saved."""
        return self.metadata["backend"]

    @property
    def config(self) -> dict[str, Any]:
        """The training configuration recorded in ``extra["config"]`` (the ``anycnn train``
        options, the preprocess record, ...); ``{}`` when the file holds none."""
        config = self.extra.get("config") if isinstance(self.extra, dict) else None
        return config if isinstance(config, dict) else {}

    @property
    def preprocess(self) -> dict[str, Any] | None:
        """The preprocess record (:func:`anycnn.data.augment.preprocess_record`):
        ``extra["preprocess"]`` (:func:`anycnn.save` users) or ``config["preprocess"]``
        (``anycnn train``, :class:`~anycnn.train.Trainer`); None when there is none."""
        extra = self.extra if isinstance(self.extra, dict) else {}
        record = extra.get("preprocess") or self.config.get("preprocess")
        return record if isinstance(record, dict) else None

    @property
    def multi_label(self) -> bool:
        """Whether the model is multi-label (any number of labels per image, sigmoid
        probabilities): the preprocess record's ``multi_label`` flag; without one, whether
        ``anycnn train`` ran with ``--multi-label`` (runs from before the flag was recorded);
        else False (single-label: softmax over the classes)."""
        record = self.preprocess
        if record is not None and "multi_label" in record:
            return record["multi_label"] is True
        return self.config.get("multi_label") is not None


#: the file name of a run folder's checkpoint (``anycnn train --out FOLDER``)
RUN_CHECKPOINT = "checkpoint.safetensors"


def checkpoint_in(path: str | os.PathLike) -> pathlib.Path:
    """``path`` itself, or the :data:`RUN_CHECKPOINT` in it when it is a run folder."""
    path = pathlib.Path(path)
    return path / RUN_CHECKPOINT if path.is_dir() else path


# --------------------------------------------------------------------------------------------
# Saving


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _to_json(name: str, value: Any) -> str:
    try:
        return json.dumps(value, default=_json_default, sort_keys=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint metadata {name!r} cannot be saved as JSON: {exc}") from exc


def _host(value: Any) -> np.ndarray:
    return np.ascontiguousarray(to_numpy(value))


def _model_dtype(model: Any, state: dict[str, Any]) -> str:
    for _, p in model.named_parameters():
        return dtype_name(p.data)
    for value in state.values():
        return dtype_name(value)
    return "float32"


def _finite(path: pathlib.Path, name: str, host: np.ndarray) -> np.ndarray:
    if np.issubdtype(host.dtype, np.inexact) and not np.isfinite(host).all():
        bad = int(np.size(host) - np.count_nonzero(np.isfinite(host)))
        raise CheckpointError(
            f"refusing to save checkpoint {path}: tensor {name!r} has {bad} non-finite "
            "(NaN or inf) value(s); training has probably diverged (lower the learning rate)")
    return host


def _encode(model: Any, optimizer: Any, path: pathlib.Path, model_spec: dict | None,
            epoch: int, step: int, extra: dict | None, ema: Any = None) -> bytes:
    """The checkpoint's bytes (raises CheckpointError for non-finite or unsavable values)."""
    from safetensors.numpy import save

    from .. import __version__

    state = model.state_dict()
    if not state:
        raise CheckpointError(f"refusing to save checkpoint {path}: the model has no parameters")
    tensors: dict[str, np.ndarray] = {}
    for name, value in state.items():
        tensors[MODEL_PREFIX + name] = _finite(path, name, _host(value))
    ema_meta = None
    if ema is not None:
        ema_meta = dict(ema.state_dict())
        for name, value in ema_meta.pop("arrays").items():
            tensors[EMA_PREFIX + name] = _finite(path, EMA_PREFIX + name, _host(value))
    optim_meta = None
    if optimizer is not None:
        optim_meta = dict(optimizer.state_dict())
        for key, value in optim_meta.pop("arrays", {}).items():
            tensors[OPTIM_PREFIX + key] = _host(value)
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "anycnn_version": str(__version__),
        "model_spec": _to_json("model_spec", model_spec),
        "dtype": _model_dtype(model, state),
        "backend": backend_label(next(iter(state.values()))),
        "epoch": _to_json("epoch", int(epoch)),
        "step": _to_json("step", int(step)),
        "optimizer": _to_json("optimizer", optim_meta),
        "rng_state": _to_json("rng_state", anycnn_random.get_state()),
        "extra": _to_json("extra", {} if extra is None else extra),
    }
    if ema_meta is not None:
        metadata["ema"] = _to_json("ema", ema_meta)
    try:
        return save(tensors, metadata=metadata)
    except Exception as exc:  # safetensors' own error types vary between versions
        raise CheckpointError(f"cannot encode checkpoint {path}: {exc}") from exc


def save_checkpoint(path: str | os.PathLike, model: Any, optimizer: Any = None, *,
                    model_spec: dict | None = None, epoch: int = 0, step: int = 0,
                    extra: dict | None = None, ema: Any = None) -> pathlib.Path:
    """Save ``model`` (and ``optimizer``, RNG state, progress) to one safetensors file.

    Args:
        path: target file (conventionally ``*.safetensors``); its folder must exist.
        model: any :class:`~anycnn.nn.module.Module`, on any backend.
        optimizer: an :class:`~anycnn.optim.optimizers.Optimizer` whose state to save, or ``None``.
        model_spec: the spec the model was built from (lets :func:`load_model` rebuild it).
        epoch, step: training progress to record.
        extra: JSON-able data to keep with the weights (history, config, ...).
        ema: an :class:`~anycnn.optim.ema.EMA` whose averages to save beside the weights.

    Returns:
        The path written.

    Raises:
        CheckpointError: a weight or buffer is NaN/inf (named), metadata is not JSON-able, or
            the file cannot be written (path and OS reason named). The previous file at
            ``path`` survives any failure.
    """
    target = pathlib.Path(path)
    data = _encode(model, optimizer, target, model_spec, epoch, step, extra, ema)
    return atomic_write_bytes(target, data, what="checkpoint")


# --------------------------------------------------------------------------------------------
# Loading


def _read_bytes(path: pathlib.Path) -> bytes:
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a directory, not a file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {os_reason(exc)}") from exc


def _parse_header(path: pathlib.Path, data: bytes) -> dict[str, Any]:
    """Check the safetensors framing and return the decoded JSON header."""
    not_ours = f"{path} is not a safetensors checkpoint ("
    if len(data) < 8:
        raise CheckpointError(f"{not_ours}only {len(data)} bytes, truncated or empty)")
    size = int.from_bytes(data[:8], "little")
    head = data[:32]
    if all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head):  # a JSON, CSV, ... file
        raise CheckpointError(f"{not_ours}it is a text file starting {head.decode()!r})")
    if len(data) > 8 and data[8:9] != b"{":  # safetensors: the header is a JSON object
        what = file_kind(data[:64])
        raise CheckpointError(
            f"{not_ours}it looks like {what})" if what is not None else
            f"{not_ours}its first bytes are not a safetensors header; anycnn checkpoints are "
            "written by anycnn train and anycnn.save)")
    if size > MAX_HEADER_BYTES:
        raise CheckpointError(f"{not_ours}header length {size} exceeds the 100 MB limit)")
    if size > len(data) - 8:
        raise CheckpointError(
            f"{not_ours}header length {size} is larger than the file's {len(data) - 8} "
            "remaining bytes; the file is truncated or corrupt)")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{not_ours}header is not valid JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{not_ours}header is not a JSON object)")
    return header


def _check_length(path: pathlib.Path, header: dict[str, Any], available: int) -> None:
    """Say "truncated" when the header describes more tensor bytes than the file holds."""
    try:
        needed = max((int(v["data_offsets"][1]) for k, v in header.items()
                      if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return  # malformed entries: safetensors reports them below
    if needed > available:
        raise CheckpointError(
            f"{path} is truncated or corrupt: its header describes {needed} bytes of tensor "
            f"data but only {available} follow (an interrupted copy or download?)")


def _metadata(path: pathlib.Path, header: dict[str, Any]) -> dict[str, str]:
    raw = header.get("__metadata__")
    if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise CheckpointError(f"{path} is not an anycnn checkpoint (no string metadata)")
    if "format_version" not in raw:
        raise CheckpointError(f"{path} is not an anycnn checkpoint (no format_version metadata)")
    try:
        version = int(raw["format_version"])
    except ValueError as exc:
        raise CheckpointError(
            f"{path}: invalid format_version {raw['format_version']!r}") from exc
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}, newer than the version this "
            f"anycnn reads ({FORMAT_VERSION}); upgrade anycnn (pip install -U anycnn) to load it")
    if version < 1:
        raise CheckpointError(f"{path}: invalid format_version {version}")
    missing = [k for k in REQUIRED_METADATA if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: checkpoint metadata is missing {', '.join(missing)}")
    return raw


def _decode(path: pathlib.Path, raw: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = dict(raw)
    meta["format_version"] = int(raw["format_version"])
    for key in ("model_spec", "epoch", "step", "optimizer", "rng_state", "extra", "ema"):
        if key not in raw:  # "ema": only files with weight averages
            meta[key] = None
            continue
        try:
            meta[key] = json.loads(raw[key])
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON ({exc})") from exc
    for key in ("epoch", "step"):
        if not isinstance(meta[key], int) or isinstance(meta[key], bool):
            raise CheckpointError(f"{path}: metadata {key!r} must be an integer, "
                                  f"got {raw[key]!r}")
    for key in ("model_spec", "optimizer", "rng_state", "ema"):
        if meta[key] is not None and not isinstance(meta[key], dict):
            raise CheckpointError(f"{path}: metadata {key!r} must be a JSON object or null")
    if meta["dtype"] not in _FLOAT_DTYPES:
        raise CheckpointError(f"{path}: unsupported model dtype {meta['dtype']!r}")
    return meta


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (no pickle; safe on untrusted files).
    ``path`` is a checkpoint file or a run folder (``anycnn train --out``), which means its
    :data:`RUN_CHECKPOINT` (:func:`checkpoint_in`, as the command line reads it).

    Raises:
        CheckpointError: the file is missing, unreadable, truncated, not safetensors, not an
            anycnn checkpoint, or written by a newer anycnn (the message says which version).
            No other exception escapes for a bad file.
    """
    given = pathlib.Path(path)
    path = checkpoint_in(given)
    if path != given and not path.exists():
        raise CheckpointError(f"{given} is a folder without {RUN_CHECKPOINT}: pass a checkpoint "
                              "file, or a run folder (anycnn train --out) holding one")
    data = _read_bytes(path)
    header = _parse_header(path, data)
    _check_length(path, header, len(data) - 8 - int.from_bytes(data[:8], "little"))
    meta = _decode(path, _metadata(path, header))
    try:
        from safetensors.numpy import load

        arrays = load(data)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # SafetensorError, and pyo3's PanicException (a BaseException)
        raise CheckpointError(f"{path} is corrupt (safetensors: {exc})") from exc

    tensors: dict[str, np.ndarray] = {}
    optim_arrays: dict[str, np.ndarray] = {}
    ema_arrays: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if name.startswith(MODEL_PREFIX) and len(name) > len(MODEL_PREFIX):
            tensors[name[len(MODEL_PREFIX):]] = value
        elif name.startswith(OPTIM_PREFIX) and len(name) > len(OPTIM_PREFIX):
            optim_arrays[name[len(OPTIM_PREFIX):]] = value
        elif name.startswith(EMA_PREFIX) and len(name) > len(EMA_PREFIX):
            ema_arrays[name[len(EMA_PREFIX):]] = value
        else:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} in checkpoint")
    if not tensors:
        raise CheckpointError(f"{path}: checkpoint holds no model tensors")
    optimizer_state = None
    if meta["optimizer"] is not None:
        optimizer_state = {**meta["optimizer"], "arrays": optim_arrays}
    elif optim_arrays:
        raise CheckpointError(f"{path}: optimizer tensors present but no optimizer metadata")
    ema_state = None
    if meta["ema"] is not None:
        if ema_arrays.keys() != tensors.keys():
            raise CheckpointError(f"{path}: the weight averages (ema.*) do not hold the same "
                                  "tensors as the model")
        ema_state = {**meta["ema"], "arrays": ema_arrays}
    elif ema_arrays:
        raise CheckpointError(f"{path}: weight-average tensors present but no ema metadata")
    return Checkpoint(tensors=tensors, optimizer_state=optimizer_state, metadata=meta,
                      epoch=meta["epoch"], step=meta["step"], model_spec=meta["model_spec"],
                      rng_state=meta["rng_state"], extra=meta["extra"], path=path,
                      ema_state=ema_state)


# --------------------------------------------------------------------------------------------
# Restoring


def _describe(checkpoint: Checkpoint) -> str:
    where = f"checkpoint {checkpoint.path}" if checkpoint.path else "checkpoint"
    spec = checkpoint.model_spec
    if isinstance(spec, dict) and "name" in spec:
        where += f" (model {spec['name']!r})"
    return where


def check_compatible(checkpoint: Checkpoint, model: Any) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint's tensors fit ``model`` exactly.

    The message names the first mismatching tensor (in the model's order) and both shapes, or
    the first tensor missing from either side.
    """
    own = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    saved = {name: tuple(value.shape) for name, value in checkpoint.tensors.items()}
    where = _describe(checkpoint)
    for name, shape in own.items():
        if name not in saved:
            raise CheckpointError(
                f"{where} does not fit this model: tensor {name!r} (shape {shape} in the model) "
                "is missing from the checkpoint")
        if saved[name] != shape:
            raise CheckpointError(
                f"{where} does not fit this model: tensor {name!r} has shape {saved[name]} in "
                f"the checkpoint but {shape} in the model")
    extra = [name for name in saved if name not in own]
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise CheckpointError(
            f"{where} does not fit this model: tensor {extra[0]!r} (shape {saved[extra[0]]}) "
            f"is in the checkpoint but not in the model{more}")


def restore(checkpoint: Checkpoint, model: Any, optimizer: Any = None, *,
            restore_rng: bool = True) -> None:
    """Load a checkpoint's weights into ``model`` (on the current backend), and optionally the
    optimizer state and the global RNG state, so training resumes exactly.

    Raises:
        CheckpointError: the tensors do not fit the model (first mismatch named with both
            shapes), the optimizer state is absent or for another optimizer, or the RNG state is
            invalid. Everything is checked before anything changes: on error the model,
            the optimizer and the RNG are left as they were.
    """
    check_compatible(checkpoint, model)
    if optimizer is not None and checkpoint.optimizer_state is None:
        raise CheckpointError(f"{_describe(checkpoint)} holds no optimizer state; "
                              "pass optimizer=None to restore the weights only")
    rng_state = checkpoint.rng_state if restore_rng else None
    if rng_state is not None:
        try:  # try it on a scratch generator first
            np.random.default_rng(0).bit_generator.state = rng_state
        except (KeyError, ValueError, TypeError, OverflowError, AttributeError) as exc:
            raise CheckpointError(f"{_describe(checkpoint)}: invalid RNG state ({exc})") from exc
    if optimizer is not None:  # all-or-nothing itself, so it goes first
        try:
            optimizer.load_state_dict(checkpoint.optimizer_state)
        except CheckpointError as exc:
            raise CheckpointError(f"{_describe(checkpoint)}: {exc}") from exc
        except AnycnnError:
            raise
        except (KeyError, ValueError, IndexError, TypeError) as exc:
            raise CheckpointError(
                f"{_describe(checkpoint)}: invalid optimizer state ({type(exc).__name__}: {exc})"
            ) from exc
    model.load_state_dict(checkpoint.tensors)
    if rng_state is not None:
        anycnn_random.set_state(rng_state)


#: Largest model_spec values :func:`load_model` builds from a file: the spec is untrusted data, and
#: a forged one must not make the loader allocate gigabytes before the shapes are compared.
SPEC_LIMITS = {"num_classes": 100_000, "in_channels": 1024, "image_size": 512}


def _check_spec(checkpoint: Checkpoint, spec: dict[str, Any]) -> None:
    where = _describe(checkpoint)
    if not isinstance(spec.get("name"), str):
        raise CheckpointError(f"{where}: model_spec has no model name")
    for key, value in spec.items():
        if key == "name":
            continue
        limit = SPEC_LIMITS.get(key, 100_000)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise CheckpointError(
                f"{where}: model_spec {key}={value!r} is not an integer in [1, {limit}]; build "
                f"the model in code and call anycnn.load_weights(model, {str(checkpoint.path)!r})")


def _weights_of(checkpoint: Checkpoint, ema: bool | None) -> Checkpoint:
    """``checkpoint`` with the averaged weights as its tensors when it has them and ``ema`` is
    None or True (:class:`anycnn.optim.ema.EMA`); itself otherwise."""
    if ema is None:
        ema = checkpoint.ema_state is not None
    if not ema:
        return checkpoint
    if checkpoint.ema_state is None:
        raise CheckpointError(f"{_describe(checkpoint)} holds no weight averages (EMA); "
                              "load it with ema=None or ema=False")
    import dataclasses

    return dataclasses.replace(checkpoint, tensors=dict(checkpoint.ema_state["arrays"]))


def load_model(path: str | os.PathLike, *, restore_rng: bool = False,
               ema: bool | None = None) -> tuple[Any, Checkpoint]:
    """Rebuild the model a checkpoint was saved from, on the current backend, with its weights.
    ``path``: a checkpoint file, or a run folder holding ``checkpoint.safetensors``.

    ``ema`` picks the weights of a checkpoint written with a moving average of the weights
    (``Trainer(..., ema=...)``): None (default) the averages when the file has them (what
    validation measured), else the trained weights; True the averages (an error when there are
    none); False the trained weights.

    The model is built from the checkpoint's ``model_spec`` with
    :func:`anycnn.models.build_model`, cast to the saved dtype, and left in training mode (call
    ``model.eval()`` for inference) and marked ``model.multi_label`` as the checkpoint's
    :attr:`Checkpoint.multi_label`, which :func:`anycnn.predict_proba` and the other predict
    functions follow when not told. Building draws initial weights from the global RNG; its
    state is put back afterwards, so loading has no effect on it unless ``restore_rng``.

    Returns:
        ``(model, checkpoint)``; pass the checkpoint to :func:`restore` with an optimizer to
        resume training.
    """
    from ..models import build_model

    checkpoint = load_checkpoint(path)
    spec = checkpoint.model_spec
    if spec is None:
        raise CheckpointError(
            f"{_describe(checkpoint)} has no model_spec, so load_model cannot rebuild the model "
            "(it was saved from a model built in code); build the same model in code and call "
            f"anycnn.load_weights(model, {str(checkpoint.path)!r})")
    _check_spec(checkpoint, spec)
    rng_before = anycnn_random.get_state()
    try:
        model = build_model(spec)
    except (AnycnnError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{_describe(checkpoint)}: cannot rebuild the model from its spec {spec!r} ({exc})"
        ) from exc
    finally:
        anycnn_random.set_state(rng_before)
    if checkpoint.dtype != "float32":
        model.to(checkpoint.dtype)
    restore(_weights_of(checkpoint, ema), model, restore_rng=restore_rng)
    model.multi_label = checkpoint.multi_label  # predict/predict_proba/predict_topk read it
    return model, checkpoint


# --------------------------------------------------------------------------------------------
# Your own models


def save(model: Any, path: str | os.PathLike, *, model_spec: dict | None = None,
         extra: dict | None = None) -> pathlib.Path:
    """Save the weights (parameters and buffers) of any :class:`~anycnn.nn.module.Module` to one
    safetensors file, atomically (through :func:`save_checkpoint`, without optimizer state).

    ``model_spec`` defaults to ``model.model_spec`` (set by :func:`anycnn.models.build_model`);
    with a spec the file reloads with :func:`load_model`, without one (your own ``Sequential``
    or ``Module`` subclass) with :func:`load_weights` into a model built by the same code. The
    model's class name is recorded so a mismatch can be named on load.

    A model that carries published weights' record (``model.pretrained``, set by
    ``load_weights(model, "imagenet")``) keeps it in ``extra["pretrained"]``, which
    :func:`load_weights` puts back; while its classes are still the published ones (as many
    names as the spec's ``num_classes``), ``extra["preprocess"]`` also gets the record
    ``anycnn predict`` prepares images by (:func:`pretrained_preprocess`), unless ``extra``
    has its own.

    Raises:
        CheckpointError: NaN/inf weights, or the file cannot be written.
    """
    if model_spec is not None:
        spec = model_spec
    else:  # a head replaced the PyTorch way still records the right class count
        from ..models.backbone import current_spec

        spec = current_spec(model)
    spec = spec if isinstance(spec, dict) else None
    record = {"model_class": type(model).__qualname__}
    pretrained = getattr(model, "pretrained", None)
    if isinstance(pretrained, dict):
        record["pretrained"] = pretrained
        preprocess = pretrained_preprocess(pretrained, spec)
        if preprocess is not None:
            record["preprocess"] = preprocess
    return save_checkpoint(path, model, model_spec=spec, extra={**record, **(extra or {})})


def pretrained_preprocess(pretrained: dict[str, Any],
                          spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """The preprocess record of ``anycnn predict`` (:mod:`anycnn.cli.predict`) for a model
    carrying published weights' record ``pretrained`` (:func:`load_weights`): RGB images
    resized to ``crop`` x ``crop`` with the weights' interpolation, scaled by 1/255 and
    normalised with their mean and std, the classes named (torchvision's own eval transform
    resizes the shorter side to ``resize`` and crops the centre: ``pretrained["preprocess"]``
    keeps those facts). ``None`` when the record is incomplete or its class names do not match
    the spec's ``num_classes`` (a replaced head)."""
    facts, names = pretrained.get("preprocess"), pretrained.get("classes")
    if not isinstance(facts, dict) or not isinstance(names, list):
        return None
    if spec is not None and spec.get("num_classes") != len(names):
        return None
    try:
        crop = int(facts["crop"])
        normalize = {"mean": [float(v) for v in facts["mean"]],
                     "std": [float(v) for v in facts["std"]]}
        filter_name = str(facts.get("interpolation", "bilinear"))
    except (KeyError, TypeError, ValueError):
        return None
    from ..data.augment import image_record

    return {**image_record((crop, crop), 3, names), "resize": filter_name, "augment": None,
            "normalize": normalize}


def load_weights(model: Any, source: str | os.PathLike, strict: bool = True, *,
                 arch: str | None = None, base_url: str | None = None,
                 progress: bool = True, ema: bool | None = None) -> Any:
    """Load weights into ``model``, on the model's backend and in its dtype; returns ``model``.
    The global RNG is left alone.

    ``source`` is one of:

    * a file saved by :func:`save` (or any anycnn checkpoint): anycnn names and layouts; of a
      checkpoint with weight averages, the averages (``ema``: as in :func:`load_model`);
    * a weight file in PyTorch's names and layouts (torchvision, timm, ``torch.save`` of a
      ``state_dict``): ``.safetensors`` (no PyTorch needed) or ``.pth``/``.pt`` (read with
      ``torch.load(weights_only=True)``; needs PyTorch), the state_dict possibly wrapped as
      ``{"state_dict": ...}`` or ``{"model": ...}`` (:mod:`anycnn.io.weights`), converted
      by :func:`anycnn.io.interop.from_torch_state_dict`;
    * ``"imagenet"`` (or ``"imagenet1k_v1"``, ``"imagenet1k_v2"``): torchvision's published
      ImageNet weights for the model's architecture (``model.model_spec["name"]``, or
      ``arch``), downloaded once into the user cache and checked against the pinned hash
      (:mod:`anycnn.io.pretrained`; ``base_url`` or ``$ANYCNN_WEIGHTS_URL`` names a mirror,
      ``progress`` shows a progress bar on a terminal). A ``.pth`` file: needs PyTorch. The
      model then carries ``model.class_names`` (the 1000 ImageNet names) and
      ``model.pretrained`` (``{"weights", "name", "tag", "url", "sha256", "top1",
      "preprocess": {"resize", "crop", "mean", "std", "interpolation"}, "classes"}``), which
      :func:`save` records.

    With ``strict=False`` (a new head, a backbone's weights) the model's tensors the file
    lacks keep their values and the file's tensors the model lacks are ignored; shapes are
    still checked. To see which names those were, call
    ``anycnn.io.from_torch_state_dict(model, anycnn.io.read_state_dict(path), strict=False)``
    (a PyTorch-format file) or ``model.load_state_dict(load_checkpoint(path).tensors,
    strict=False)`` (an anycnn file): both return ``LoadResult(missing, unexpected)``.

    Raises:
        CheckpointError: the file is missing, not a weight file (an image, text, ...),
            corrupt, needs PyTorch which is not installed (one line saying so), or its tensors
            do not fit ``model`` (the first tensor that differs is named with both shapes, and
            the class the file was saved from). Nothing is changed then.
        ConfigError: a weights name for an architecture without published weights.
        DataError: a download failed or did not match the pinned hash.
    """
    from . import pretrained, weights

    if pretrained.is_weights_name(source):
        pretrained.load_pretrained(model, str(source), arch=arch, strict=strict,
                                   base_url=base_url, progress=progress)
        return model
    path = pathlib.Path(source)
    if not weights.is_anycnn_checkpoint(path):
        from .interop import from_torch_state_dict

        from_torch_state_dict(model, weights.read_state_dict(path), strict=strict)
        return model
    checkpoint = _weights_of(load_checkpoint(path), ema)
    try:
        if strict:
            restore(checkpoint, model, restore_rng=False)
        else:
            try:
                model.load_state_dict(checkpoint.tensors, strict=False)
            except CheckpointError as exc:
                raise CheckpointError(f"{_describe(checkpoint)}: {exc}") from exc
    except CheckpointError as exc:
        saved = checkpoint.extra.get("model_class") if isinstance(checkpoint.extra, dict) else None
        if not isinstance(saved, str) or saved == type(model).__qualname__:
            raise
        raise CheckpointError(f"{exc} (the file was saved from a {saved}, this model is a "
                              f"{type(model).__qualname__})") from exc
    record = checkpoint.extra.get("pretrained") if isinstance(checkpoint.extra, dict) else None
    if isinstance(record, dict):
        model.pretrained = record
        if isinstance(record.get("classes"), list):
            model.class_names = list(record["classes"])
    return model
