"""Checkpoints: round trips (same and across backends), resume exactness, metadata, atomic
writes, refusals, and hostile files (only CheckpointError may escape)."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile

import numpy as np
import pytest
from safetensors.numpy import save as st_save

import anycnn
from anycnn import checkpoint as C
from anycnn import layers as L
from anycnn import losses, optim
from anycnn import random as R
from anycnn.errors import CheckpointError
from anycnn.models import build_model, model_spec
from tests.rounding import assert_rounding_close

SMALL = {"image_size": 8}  # bn-cnn at 8x8: BatchNorm, Dropout (uses the RNG), global pooling


def batch(n=4, size=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, size, size, 1)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int64)
    return x, y


def train(model, opt, steps, seed=0, size=8):
    """A few optimizer steps on fixed host batches (dropout masks come from the global RNG)."""
    loss = losses.SoftmaxCrossEntropy()
    model.train()
    for i in range(steps):
        x, y = batch(size=size, seed=seed + i)
        loss.forward(model(anycnn.asarray(x)), anycnn.asarray(y))
        opt.zero_grad()
        model.backward(loss.backward())
        opt.step()


def logits(model, x):
    model.eval()
    return anycnn.to_numpy(model(anycnn.asarray(x)))


def weights(model):
    return {k: anycnn.to_numpy(v).copy() for k, v in model.state_dict().items()}


def trained_bn_cnn(path, steps=2):
    """A bn-cnn trained a little (non-trivial BatchNorm stats), saved with its Adam state."""
    spec = model_spec("bn-cnn", **SMALL)
    model = build_model(spec)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, steps)
    C.save_checkpoint(path, model, opt, model_spec=spec, epoch=3, step=steps,
                      extra={"history": {"loss": [2.3, 2.1]}, "config": {"batch_size": 4}})
    return model, opt


# --------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_same_backend(backend, tmp_path):
    path = tmp_path / "model.safetensors"
    model, _ = trained_bn_cnn(path)
    x, _ = batch(n=3, seed=7)
    expected = logits(model, x)

    loaded, ckpt = C.load_model(path)
    assert loaded.training  # like a freshly built model
    np.testing.assert_array_equal(logits(loaded, x), expected)
    for name, value in weights(model).items():
        np.testing.assert_array_equal(ckpt.tensors[name], value)

    fresh = build_model(ckpt.model_spec)
    C.restore(ckpt, fresh)
    np.testing.assert_array_equal(logits(fresh, x), expected)


@pytest.mark.parametrize("target", ["array_api_strict", "torch"])
def test_round_trip_across_backends(tmp_path, target):
    if target == "torch":
        pytest.importorskip("torch")
    path = tmp_path / "numpy.safetensors"
    x, _ = batch(n=3, seed=7)
    with anycnn.use_backend("numpy"):
        R.manual_seed(0)
        model, _ = trained_bn_cnn(path)
        expected = logits(model, x)
    with anycnn.use_backend(target) as b:
        loaded, ckpt = C.load_model(path)
        assert ckpt.backend == "numpy"
        for _, p in loaded.named_parameters():
            assert anycnn.backend.backend_label(p.data) == target
        got = logits(loaded, x)
        assert anycnn.backend.backend_label(loaded(anycnn.asarray(x))) == b.name
    # another backend sums in another order (NumPy's compiled kernels, torch's oneDNN)
    assert_rounding_close(got, expected)


def test_round_trip_float64(backend, tmp_path):
    path = tmp_path / "f64.safetensors"
    spec = model_spec("lenet5")
    model = build_model(spec).to("float64")
    C.save_checkpoint(path, model, model_spec=spec)
    loaded, ckpt = C.load_model(path)
    assert ckpt.dtype == "float64"
    assert ckpt.tensors["0.weight"].dtype == np.float64
    for name, value in loaded.state_dict().items():
        assert anycnn.backend.dtype_name(value) == "float64"
        np.testing.assert_array_equal(anycnn.to_numpy(value), anycnn.to_numpy(
            model.state_dict()[name]))


def test_load_model_leaves_the_global_rng_alone(backend, tmp_path):
    path = tmp_path / "m.safetensors"
    C.save_checkpoint(path, build_model("lenet5"), model_spec=model_spec("lenet5"))
    R.manual_seed(123)
    before = R.get_state()
    C.load_model(path)
    assert R.get_state() == before


# --------------------------------------------------------------------------------------------
# Resuming training exactly


@pytest.mark.parametrize("make_opt", [
    lambda m: optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
    lambda m: optim.Adam(m.parameters(), lr=1e-2),
    lambda m: optim.AdamW(m.parameters(), lr=1e-2),
    lambda m: optim.SGD(optim.split_groups(m, m[-1], lr_backbone=0.01, no_decay=("bias", "norm")),
                        lr=0.05, momentum=0.9, weight_decay=1e-3),
    lambda m: optim.AdamW([{**g, "betas": (0.8, 0.99)} if g["name"] == "no_decay" else g
                           for g in optim.decay_groups(m, 0.05)], lr=1e-2),
], ids=["sgd-momentum", "adam", "adamw", "sgd-groups", "adamw-groups"])
def test_resume_is_exact(backend, tmp_path, make_opt):
    path = tmp_path / "resume.safetensors"
    R.manual_seed(0)
    model = build_model("bn-cnn", **SMALL)
    opt = make_opt(model)
    train(model, opt, 2)
    C.save_checkpoint(path, model, opt, model_spec=model_spec("bn-cnn", **SMALL), step=2)
    train(model, opt, 2, seed=10)  # the uninterrupted run
    reference = weights(model)

    R.manual_seed(999)  # a new process: other weights, other RNG state
    resumed = build_model("bn-cnn", **SMALL)
    resumed_opt = make_opt(resumed)
    resumed_opt.lr = 0.5  # restored from the checkpoint, with every group's rate
    ckpt = C.load_checkpoint(path)
    assert ckpt.step == 2
    C.restore(ckpt, resumed, resumed_opt)
    assert resumed_opt.state_dict()["steps"] == [2] * len(resumed.parameters())
    train(resumed, resumed_opt, 2, seed=10)
    for name, value in weights(resumed).items():
        np.testing.assert_array_equal(value, reference[name], err_msg=name)

    # control: without the RNG state the dropout masks differ, and so do the weights
    R.manual_seed(999)
    other = build_model("bn-cnn", **SMALL)
    other_opt = make_opt(other)
    C.restore(ckpt, other, other_opt, restore_rng=False)
    train(other, other_opt, 2, seed=10)
    assert any(not np.array_equal(v, reference[k]) for k, v in weights(other).items())


def test_optimizer_state_round_trip(backend, tmp_path):
    path = tmp_path / "opt.safetensors"
    model = build_model("bn-cnn", **SMALL)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, 1)
    C.save_checkpoint(path, model, opt)
    state = C.load_checkpoint(path).optimizer_state
    saved = opt.state_dict()
    assert {k: v for k, v in state.items() if k != "arrays"} == {
        k: v for k, v in saved.items() if k != "arrays"}
    assert set(state["arrays"]) == set(saved["arrays"]) and state["arrays"]
    for key, value in saved["arrays"].items():
        np.testing.assert_array_equal(state["arrays"][key], anycnn.to_numpy(value))


def test_restore_errors(backend, tmp_path):
    path = tmp_path / "weights.safetensors"
    model = build_model("lenet5")
    C.save_checkpoint(path, model)  # no optimizer
    ckpt = C.load_checkpoint(path)
    assert ckpt.optimizer_state is None
    with pytest.raises(CheckpointError, match="no optimizer state"):
        C.restore(ckpt, model, optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(CheckpointError, match="no model_spec"):
        C.load_model(path)

    opt = optim.Adam(model.parameters())
    C.save_checkpoint(path, model, opt)
    with pytest.raises(CheckpointError, match="Adam"):
        C.restore(C.load_checkpoint(path), model, optim.SGD(model.parameters(), lr=0.1))


def test_checkpoint_of_another_model_names_the_first_mismatch(backend, tmp_path):
    path = tmp_path / "lenet.safetensors"
    C.save_checkpoint(path, build_model("lenet5"), model_spec=model_spec("lenet5"))
    target = build_model("simple-cnn")
    before = weights(target)
    with pytest.raises(CheckpointError) as info:
        C.restore(C.load_checkpoint(path), target)
    msg = str(info.value)
    assert "'0.weight'" in msg and "(5, 5, 1, 6)" in msg and "(3, 3, 1, 32)" in msg
    assert "lenet5" in msg and str(path) in msg
    for name, value in weights(target).items():  # untouched
        np.testing.assert_array_equal(value, before[name])


def test_missing_and_extra_tensors_are_named(backend, tmp_path):
    path = tmp_path / "a.safetensors"
    C.save_checkpoint(path, anycnn.Sequential(L.Dense(3, 2), L.ReLU(), L.Dense(2, 2)))
    with pytest.raises(CheckpointError, match=r"'3\.weight'.*missing"):
        C.restore(C.load_checkpoint(path), anycnn.Sequential(L.Dense(3, 2), L.ReLU(),
                                                             L.Dense(2, 2), L.Dense(2, 2)))
    with pytest.raises(CheckpointError, match=r"'2\.(weight|bias)'.*not in the model and 1 more"):
        C.restore(C.load_checkpoint(path), anycnn.Sequential(L.Dense(3, 2)))


# --------------------------------------------------------------------------------------------
# Metadata


def test_metadata(backend, tmp_path):
    path = tmp_path / "meta.safetensors"
    R.manual_seed(5)
    spec = model_spec("bn-cnn", **SMALL)
    model = build_model(spec)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    train(model, opt, 1)
    rng_at_save = R.get_state()
    extra = {"history": {"loss": [np.float32(2.5), 2.25]}, "config": {"epochs": 3}}
    C.save_checkpoint(path, model, opt, model_spec=spec, epoch=4, step=17, extra=extra)

    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        raw = f.metadata()
        names = set(f.keys())
    assert set(C.REQUIRED_METADATA) <= set(raw)
    assert all(isinstance(v, str) for v in raw.values())
    assert {n for n in names if n.startswith("model.")} == {
        "model." + k for k in model.state_dict()}
    assert "optim.0.momentum_buffer" in names

    ckpt = C.load_checkpoint(path)
    meta = ckpt.metadata
    assert meta["format_version"] == C.FORMAT_VERSION == 1
    assert meta["anycnn_version"] == anycnn.__version__
    assert meta["backend"] == backend.name
    assert meta["dtype"] == "float32"
    assert ckpt.model_spec == spec
    assert (ckpt.epoch, ckpt.step) == (4, 17)
    assert ckpt.extra == {"history": {"loss": [2.5, 2.25]}, "config": {"epochs": 3}}
    assert ckpt.rng_state == rng_at_save
    assert json.loads(raw["rng_state"]) == rng_at_save
    opt_meta = meta["optimizer"]
    assert opt_meta["type"] == "SGD" and opt_meta["lr"] == 0.1
    (group,) = opt_meta["param_groups"]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 5e-4
    assert group["params"] == list(range(len(model.parameters())))
    assert opt_meta["steps"] == [1] * len(model.parameters())
    assert "arrays" not in opt_meta


def test_extra_must_be_json(backend, tmp_path):
    with pytest.raises(CheckpointError, match="extra"):
        C.save_checkpoint(tmp_path / "x.safetensors", anycnn.Sequential(L.Dense(2, 2)),
                          extra={"fn": object()})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Atomic writes and refusals


def small_model():
    return anycnn.Sequential(L.Dense(3, 2))


def write_v1(path):
    C.save_checkpoint(path, small_model(), epoch=1)
    return path.read_bytes()


def assert_intact(path, content):
    assert path.read_bytes() == content
    assert C.load_checkpoint(path).epoch == 1
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left


@pytest.mark.parametrize("where", ["replace", "fsync", "write"])
def test_failed_write_keeps_the_previous_checkpoint(backend, tmp_path, monkeypatch, where):
    path = tmp_path / "ckpt.safetensors"
    content = write_v1(path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "write":
        real_fdopen = os.fdopen

        class FullFile:
            def __init__(self, f):
                self._f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._f.close()

            def write(self, data):
                self._f.write(data[: len(data) // 2])
                disk_full()

        monkeypatch.setattr(os, "fdopen", lambda *a, **k: FullFile(real_fdopen(*a, **k)))
    else:
        monkeypatch.setattr(os, where, disk_full)
    with pytest.raises(CheckpointError) as info:
        C.save_checkpoint(path, small_model(), epoch=2)
    assert str(path) in str(info.value) and "No space left on device" in str(info.value)
    monkeypatch.undo()
    assert_intact(path, content)


def test_crash_mid_write_keeps_the_previous_checkpoint(backend, tmp_path, monkeypatch):
    """An interruption that is not an OSError (Ctrl-C, a kill) propagates, but cleans up."""
    path = tmp_path / "ckpt.safetensors"
    content = write_v1(path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(path, small_model(), epoch=2)
    monkeypatch.undo()
    assert_intact(path, content)


def test_unwritable_location(backend, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(folder, os.W_OK):  # root ignores permissions: use a path under a file
            blocker = tmp_path / "plain-file"
            blocker.write_text("not a folder")
            target = blocker / "ckpt.safetensors"
        else:
            target = folder / "ckpt.safetensors"
        with pytest.raises(CheckpointError) as info:
            C.save_checkpoint(target, small_model())
        assert str(target) in str(info.value)
        assert not target.exists()
    finally:
        folder.chmod(stat.S_IRWXU)
    assert list(folder.iterdir()) == []


def test_missing_folder(backend, tmp_path):
    target = tmp_path / "no" / "such" / "ckpt.safetensors"
    with pytest.raises(CheckpointError) as info:
        C.save_checkpoint(target, small_model())
    assert str(target) in str(info.value) and "No such file" in str(info.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused(backend, tmp_path, bad):
    path = tmp_path / "ckpt.safetensors"
    content = write_v1(path)
    model = anycnn.Sequential(L.Dense(3, 2), L.ReLU(), L.Dense(2, 2))
    host = anycnn.to_numpy(model.state_dict()["2.weight"]).copy()
    host[1, 0] = bad
    model[2].weight.data = anycnn.asarray(host)
    with pytest.raises(CheckpointError, match=r"'2\.weight'.*non-finite"):
        C.save_checkpoint(path, model, epoch=2)
    assert_intact(path, content)


# --------------------------------------------------------------------------------------------
# Hostile and broken files


@pytest.fixture(scope="module")
def valid_bytes():
    with anycnn.use_backend("numpy"):
        model = anycnn.Sequential(L.Dense(3, 2), L.ReLU(), L.Dense(2, 2))
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        train_step_dense(model, opt)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "valid.safetensors")
            C.save_checkpoint(path, model, opt, epoch=1, step=1)
            with open(path, "rb") as f:
                return f.read()


def train_step_dense(model, opt):
    loss = losses.MSELoss()
    x = anycnn.asarray(np.ones((2, 3), np.float32))
    loss.forward(model(x), anycnn.asarray(np.zeros((2, 2), np.float32)))
    model.backward(loss.backward())
    opt.step()


def with_metadata(valid: bytes, **changes) -> bytes:
    """Re-encode ``valid`` with some metadata entries changed (None removes one)."""
    from safetensors.numpy import load

    size = int.from_bytes(valid[:8], "little")
    meta = json.loads(valid[8:8 + size])["__metadata__"]
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    return st_save(load(valid), metadata=meta)


BAD_FILES = {
    "empty": lambda v: b"",
    "seven-bytes": lambda v: v[:7],
    "header-only-half": lambda v: v[:40],
    "truncated-half": lambda v: v[: len(v) // 2],
    "truncated-one-byte": lambda v: v[:-1],
    "random-bytes": lambda v: np.random.default_rng(0).bytes(4096),
    "json-file": lambda v: json.dumps({"weights": [1, 2, 3]}).encode(),
    "huge-header-length": lambda v: (2**62).to_bytes(8, "little") + b"{}" + b" " * 64,
    "header-longer-than-file": lambda v: (10_000).to_bytes(8, "little") + v[8:200],
    "header-not-json": lambda v: (6).to_bytes(8, "little") + b"\xff\xfe{[}]",
    "header-is-a-list": lambda v: (2).to_bytes(8, "little") + b"[]",
    "plain-safetensors": lambda v: st_save({"w": np.zeros(3, np.float32)}),
    "missing-extra": lambda v: with_metadata(v, extra=None),
    "missing-format-version": lambda v: with_metadata(v, format_version=None),
    "bad-format-version": lambda v: with_metadata(v, format_version="one"),
    "bad-epoch": lambda v: with_metadata(v, epoch='"three"'),
    "bad-json-metadata": lambda v: with_metadata(v, model_spec="{not json"),
    "bad-dtype": lambda v: with_metadata(v, dtype="complex64"),
    "foreign-tensor": lambda v: st_save({"model.0.weight": np.zeros((3, 2), np.float32),
                                         "other": np.zeros(1, np.float32)},
                                        metadata=json.loads(v[8:8 + int.from_bytes(
                                            v[:8], "little")])["__metadata__"]),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_files_raise_checkpoint_error_only(tmp_path, valid_bytes, kind):
    path = tmp_path / f"{kind}.safetensors"
    path.write_bytes(BAD_FILES[kind](valid_bytes))
    with pytest.raises(CheckpointError) as info:
        C.load_checkpoint(path)
    assert str(path) in str(info.value)


def test_newer_format_version_says_upgrade(tmp_path, valid_bytes):
    path = tmp_path / "future.safetensors"
    path.write_bytes(with_metadata(valid_bytes, format_version="7"))
    with pytest.raises(CheckpointError) as info:
        C.load_checkpoint(path)
    msg = str(info.value)
    assert "7" in msg and "upgrade anycnn" in msg and str(C.FORMAT_VERSION) in msg


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as info:
        C.load_checkpoint(tmp_path / "nope.safetensors")
    assert str(tmp_path / "nope.safetensors") in str(info.value)
    # a folder is a run folder: its checkpoint.safetensors, named when missing
    with pytest.raises(CheckpointError, match=r"is a folder without checkpoint\.safetensors"):
        C.load_checkpoint(tmp_path)


def test_valid_bytes_load(tmp_path, valid_bytes):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(valid_bytes)
    ckpt = C.load_checkpoint(path)
    assert set(ckpt.tensors) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert ckpt.optimizer_state["type"] == "SGD"
