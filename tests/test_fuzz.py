"""Fuzzing the readers of untrusted files: the IDX reader, the CIFAR reader (record files and
archives) and the checkpoint loader.

Random bytes, mutated valid files (byte flips, truncation, appended junk, gzip or not) and
structurally edited headers go in; the only exceptions allowed out are anycnn's documented
:class:`~anycnn.errors.DataError` (datasets) and :class:`~anycnn.errors.CheckpointError`
(checkpoints), also through :func:`anycnn.io.checkpoint.load_model` and ``Trainer.resume``.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import shutil
import struct
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import anycnn
from anycnn import checkpoint as C
from anycnn import cifar, optim
from anycnn import random as R
from anycnn.data.datasets import load_dataset, read_idx
from anycnn.errors import CheckpointError, DataError
from anycnn.models import build_model
from anycnn.train.trainer import Trainer

FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# ============================================================================================
# IDX


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


VALID_IDX = {
    "images": idx_bytes(np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)),
    "labels": idx_bytes(np.array([3, 7], np.uint8)),
    "floats": idx_bytes(np.linspace(0, 1, 6).astype(">f4").reshape(2, 3), code=0x0D),
}


def read_or_data_error(path):
    try:
        out = read_idx(path)
    except DataError as exc:
        assert str(path) in str(exc)
        return None
    assert isinstance(out, np.ndarray) and 1 <= out.ndim <= 4
    return out


@FUZZ
@given(blob=st.binary(max_size=300), gz=st.booleans())
def test_idx_random_bytes(work, blob, gz):
    path = work / "random.idx"
    path.write_bytes(gzip.compress(blob) if gz else blob)
    read_or_data_error(path)


@FUZZ
@given(code=st.integers(0, 255), ndim=st.integers(0, 6),
       dims=st.lists(st.integers(0, 2**32 - 1), max_size=6),
       payload=st.binary(max_size=64), gz=st.booleans())
def test_idx_forged_headers(work, code, ndim, dims, payload, gz):
    """Headers with any type code, rank and sizes (up to 2**32-1 each): never an allocation
    beyond the file's content, never an exception other than DataError."""
    blob = bytes([0, 0, code, ndim]) + b"".join(struct.pack(">I", d) for d in dims) + payload
    path = work / "forged.idx"
    path.write_bytes(gzip.compress(blob) if gz else blob)
    read_or_data_error(path)


@FUZZ
@given(data=st.data(), which=st.sampled_from(sorted(VALID_IDX)), gz=st.booleans())
def test_idx_mutated_files(work, data, which, gz):
    valid = VALID_IDX[which]
    blob = bytearray(gzip.compress(valid, mtime=0) if gz else valid)
    for pos, value in data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1),
                                                   st.integers(0, 255)), max_size=4)):
        blob[pos] = value
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    blob += data.draw(st.binary(max_size=8))
    path = work / f"mutated-{which}.idx"
    path.write_bytes(bytes(blob))
    read_or_data_error(path)


@pytest.fixture(scope="module")
def fake_dataset(work):
    """The four files of a tiny 4x4 'mnist', as bytes by name."""
    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("train", 6), ("t10k", 3)):
        files[f"{split}-images-idx3-ubyte"] = idx_bytes(
            rng.integers(0, 256, (n, 4, 4)).astype(np.uint8))
        files[f"{split}-labels-idx1-ubyte"] = idx_bytes(rng.integers(0, 10, n).astype(np.uint8))
    return files


@FUZZ
@given(data=st.data())
def test_dataset_loading_with_one_mutated_file(work, fake_dataset, data):
    """Through load_dataset: count mismatches, non-uint8 images, labels >= 10, ... are all
    DataError."""
    directory = work / "dataset"
    directory.mkdir(exist_ok=True)
    victim = data.draw(st.sampled_from(sorted(fake_dataset)))
    for name, content in fake_dataset.items():
        if name == victim:
            blob = bytearray(content)
            for pos, value in data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1),
                                                           st.integers(0, 255)),
                                                 min_size=1, max_size=3)):
                blob[pos] = value
            content = bytes(blob)
        (directory / name).write_bytes(content)
    try:
        splits = load_dataset("mnist", data_dir=directory, download=False)
    except DataError:
        return
    assert splits.train.images.dtype == np.uint8
    assert splits.train.labels.max() < 10 and len(splits.train) == len(splits.train.labels)


def test_idx_fuzz_reaches_success_and_failure(work):
    """Guard against a vacuous fuzz: the valid files parse, a damaged one does not."""
    for name, blob in VALID_IDX.items():
        path = work / f"valid-{name}.idx"
        path.write_bytes(blob)
        assert read_or_data_error(path) is not None
    path.write_bytes(VALID_IDX["images"][:-1])
    assert read_or_data_error(path) is None


# ============================================================================================
# CIFAR binary files and archives

CIFAR_NAMES = ("cifar10", "cifar100")
#: two valid records of each dataset (labels, then the R, G, B planes)
VALID_CIFAR = {
    "cifar10": bytes([3] + [7] * 3072 + [9] + list(range(256)) * 12),
    "cifar100": bytes([19, 99] + [7] * 3072 + [0, 0] + list(range(256)) * 12),
}
#: the official layout with one record per file, as in the archive below
SMALL_CIFAR10 = dataclasses.replace(cifar.LAYOUTS["cifar10"], train_records=1, test_records=1)


def read_cifar_or_data_error(path, name):
    try:
        images, labels = cifar.read_cifar_file(path, name)
    except DataError as exc:
        assert str(path) in str(exc)
        return None
    assert images.shape == (len(labels), 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.max() < cifar.LAYOUTS[name].num_classes
    return labels


@FUZZ
@given(blob=st.binary(max_size=7000), name=st.sampled_from(CIFAR_NAMES))
def test_cifar_random_bytes(work, blob, name):
    path = work / "random.bin"
    path.write_bytes(blob)
    read_cifar_or_data_error(path, name)


@FUZZ
@given(data=st.data(), name=st.sampled_from(CIFAR_NAMES))
def test_cifar_mutated_files(work, data, name):
    blob = bytearray(VALID_CIFAR[name])
    record = cifar.LAYOUTS[name].record_bytes
    labels = [r * record + k for r in (0, 1) for k in range(record - 3072)]
    where = st.sampled_from(labels) | st.integers(0, len(blob) - 1)  # label bytes above all
    for pos, value in data.draw(st.lists(st.tuples(where, st.integers(0, 255)), max_size=3)):
        blob[pos] = value
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    blob += data.draw(st.binary(max_size=8))
    path = work / f"mutated-{name}.bin"
    path.write_bytes(bytes(blob))
    read_cifar_or_data_error(path, name)


@pytest.fixture(scope="module")
def cifar_tar():
    """An uncompressed tar laid out like the official CIFAR-10 archive (one record per file), and
    the offsets of its member headers."""
    buffer = io.BytesIO()
    names = {"batches.meta.txt": "\n".join(f"c{i}" for i in range(10)).encode()}
    names.update({f: VALID_CIFAR["cifar10"][:3073] for f in SMALL_CIFAR10.train_files +
                  SMALL_CIFAR10.test_files})
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, content in names.items():
            info = tarfile.TarInfo(f"{SMALL_CIFAR10.folder}/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        headers = [m.offset for m in tar.getmembers()]
    return Blob(buffer.getvalue()), headers


@FUZZ
@given(data=st.data())
def test_cifar_mutated_archives(work, cifar_tar, data):
    """Tar headers (names, types, sizes, checksums) and contents edited, then gzipped: extracting
    and reading the archive raises DataError or succeeds, and writes only into its folder."""
    blob, headers = cifar_tar
    blob = bytearray(blob)
    for header, pos, value in data.draw(st.lists(st.tuples(
            st.sampled_from(headers), st.integers(0, 511), st.integers(0, 255)), max_size=4)):
        blob[header + pos] = value
        if data.draw(st.booleans()):  # a valid checksum: the edit reaches the header's parser
            blob[header + 148:header + 156] = b" " * 8
            blob[header + 148:header + 156] = b"%06o\0 " % sum(blob[header:header + 512])
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    archive = work / "cifar-10-binary.tar.gz"
    archive.write_bytes(gzip.compress(bytes(blob), mtime=0))
    outside = sorted(p.name for p in work.iterdir())
    target = Path(tempfile.mkdtemp(dir=work))
    try:
        cifar._extract_members(archive, SMALL_CIFAR10, target)
        splits = cifar._read_folder(target, SMALL_CIFAR10, "fuzz")
        assert len(splits.train) == 5 and len(splits.class_names) == 10
    except DataError as exc:
        assert str(archive) in str(exc) or str(target) in str(exc)
    finally:
        shutil.rmtree(target)
    assert sorted(p.name for p in work.iterdir()) == outside


def test_cifar_fuzz_reaches_success_and_failure(work, cifar_tar):
    for name in CIFAR_NAMES:
        path = work / f"valid-{name}.bin"
        path.write_bytes(VALID_CIFAR[name])
        expected = [3, 9] if name == "cifar10" else [99, 0]  # CIFAR-100: the fine labels
        assert read_cifar_or_data_error(path, name).tolist() == expected
        path.write_bytes(VALID_CIFAR[name][:-1])
        assert read_cifar_or_data_error(path, name) is None
    archive = work / "valid.tar.gz"
    archive.write_bytes(gzip.compress(cifar_tar[0]))
    target = Path(tempfile.mkdtemp(dir=work))
    cifar._extract_members(archive, SMALL_CIFAR10, target)
    assert len(cifar._read_folder(target, SMALL_CIFAR10, "fuzz").train) == 5
    shutil.rmtree(target)


# ============================================================================================
# Checkpoints

SPEC = {"name": "lenet5", "num_classes": 10, "in_channels": 1, "image_size": 12}


def make_training(backend_name):
    with anycnn.use_backend(backend_name):
        state = R.get_state()
        model = build_model(SPEC)
        opt = optim.Adam(model.parameters(), lr=1e-3)
        R.set_state(state)
        return Trainer(model, opt, model_spec=SPEC, progress=False)


@pytest.fixture(scope="module")
def valid_checkpoint(work):
    """A real lenet5 checkpoint with Adam state, a mid-epoch position and a history."""
    trainer = make_training("numpy")
    with anycnn.use_backend("numpy"):
        x = anycnn.asarray(np.random.default_rng(0).random((4, 12, 12, 1), dtype=np.float32))
        y = anycnn.asarray(np.array([1, 2, 3, 4]))
        trainer.train_step(x, y, check=True)
        trainer.step = 1
        trainer.history = [{"epoch": 1, "train_loss": 2.3}]
        path = trainer.save(work / "valid.safetensors")
    return Blob(path.read_bytes())


class Blob(bytes):
    """Bytes with a short repr (hypothesis prints the arguments of failing examples)."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


def header_of(blob: bytes) -> tuple[dict, bytes]:
    size = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + size]), blob[8 + size:]


def with_header(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


def must_fail_cleanly(path, backend_name, trainer=None):
    """Load, rebuild and resume from ``path``: only CheckpointError may come out."""
    rng_state = R.get_state()
    try:
        with anycnn.use_backend(backend_name):
            ckpt = C.load_checkpoint(path)
            model, _ = C.load_model(path)
            (trainer or make_training(backend_name)).resume(path)
            return ckpt, model
    except CheckpointError as exc:
        assert str(path) in str(exc) or "checkpoint" in str(exc)
        return None
    finally:
        R.set_state(rng_state)


@FUZZ
@given(blob=st.binary(max_size=400), prefix=st.sampled_from([b"", b"\x10\x00\x00\x00\x00\x00"
                                                             b"\x00\x00{\"a\":"]))
def test_checkpoint_random_bytes(work, session_backend, blob, prefix):
    path = work / "random.safetensors"
    path.write_bytes(prefix + blob)
    assert must_fail_cleanly(path, session_backend.name) is None


@FUZZ
@given(data=st.data())
def test_checkpoint_mutated_bytes(work, session_backend, valid_checkpoint, data):
    blob = bytearray(valid_checkpoint)
    size = int.from_bytes(valid_checkpoint[:8], "little")
    positions = st.one_of(st.integers(0, 8 + size - 1), st.integers(0, len(blob) - 1))
    for pos, value in data.draw(st.lists(st.tuples(positions, st.integers(0, 255)),
                                         min_size=1, max_size=4)):
        blob[pos] = value
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    path = work / "mutated.safetensors"
    path.write_bytes(bytes(blob))
    must_fail_cleanly(path, session_backend.name)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                               max_size=3),
    max_leaves=8)

META_KEYS = list(C.REQUIRED_METADATA)


def metadata_edits():
    """A function editing the metadata dict: replace a value, drop a key, or edit a field of a
    JSON-encoded value (history, partial metrics, optimizer steps, spec fields, ...)."""
    replace = st.tuples(st.just("replace"), st.sampled_from(META_KEYS),
                        st.one_of(st.text(max_size=12), JSON_VALUES.map(json.dumps)))
    drop = st.tuples(st.just("drop"), st.sampled_from(META_KEYS), st.none())
    field = st.tuples(st.just("field"),
                      st.sampled_from([("extra", "history"), ("extra", "partial"),
                                       ("extra", "config"), ("optimizer", "steps"),
                                       ("optimizer", "lr"), ("optimizer", "type"),
                                       ("optimizer", "beta1"), ("optimizer", "param_groups"),
                                       ("optimizer", "initial_lr"), ("rng_state", "state"),
                                       ("rng_state", "bit_generator"), ("model_spec", "name"),
                                       ("model_spec", "num_classes"),
                                       ("model_spec", "image_size"), ("model_spec", "extra")]),
                      st.one_of(JSON_VALUES, st.integers(0, 40)))
    return st.one_of(replace, drop, field)


def apply_edit(meta: dict, edit) -> None:
    kind, key, value = edit
    if kind == "replace":
        meta[key] = value
    elif kind == "drop":
        meta.pop(key, None)
    else:
        outer, inner = key
        if outer not in meta:
            return
        decoded = json.loads(meta[outer])
        if isinstance(decoded, dict):
            decoded[inner] = value
        meta[outer] = json.dumps(decoded)


TENSOR_FIELDS = st.one_of(
    st.tuples(st.just("dtype"), st.sampled_from(["F32", "F64", "F16", "BF16", "I64", "U8",
                                                 "BOOL", "I8", "XYZ", ""])),
    st.tuples(st.just("shape"), st.lists(st.integers(-2, 130), max_size=5)),
    st.tuples(st.just("data_offsets"), st.lists(st.integers(-1, 400_000), max_size=3)),
)


@FUZZ
@given(edits=st.lists(metadata_edits(), min_size=1, max_size=3),
       tensor_edit=st.one_of(st.none(), st.tuples(st.integers(0, 100), TENSOR_FIELDS)))
def test_checkpoint_forged_headers(work, session_backend, valid_checkpoint, edits, tensor_edit):
    """Well-framed files whose header says odd things: metadata of the wrong types or values,
    tensors whose dtype, shape or offsets do not match their bytes."""
    header, body = header_of(valid_checkpoint)
    for edit in edits:
        apply_edit(header["__metadata__"], edit)
    if tensor_edit is not None:
        index, (field, value) = tensor_edit
        names = sorted(k for k in header if k != "__metadata__")
        header[names[index % len(names)]][field] = value
    path = work / "forged.safetensors"
    path.write_bytes(with_header(header, body))
    result = must_fail_cleanly(path, session_backend.name)
    if result is not None:  # accepted: then it really is a usable lenet5 checkpoint
        ckpt, model = result
        assert set(ckpt.tensors) == set(model.state_dict())


def test_checkpoint_fuzz_reaches_success_and_failure(work, session_backend, valid_checkpoint):
    path = work / "ok.safetensors"
    path.write_bytes(valid_checkpoint)
    trainer = make_training(session_backend.name)
    ckpt, _ = must_fail_cleanly(path, session_backend.name, trainer)
    assert (ckpt.epoch, ckpt.step, trainer.step) == (0, 1, 1)
    header, body = header_of(valid_checkpoint)
    header["__metadata__"]["extra"] = json.dumps({"history": 3})
    path.write_bytes(with_header(header, body))
    assert must_fail_cleanly(path, session_backend.name) is None
