"""anycnn.data.dataloader: batch counts, per-epoch shuffles, scaling, identical batches
everywhere."""

from __future__ import annotations

import numpy as np
import pytest

import anycnn
from anycnn import backend as backend_module
from anycnn import layers as L
from anycnn.backend import Backend, to_numpy
from anycnn.data.dataloader import DataLoader
from anycnn.data.datasets import ArrayDataset
from anycnn.errors import ConfigError
from anycnn.train.trainer import Trainer, evaluate


def make_dataset(n: int = 10, hw: int = 3, c: int = 2, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, hw, hw, c), dtype=np.uint8)
    images[0] = 255  # make sure both ends of the range are present
    images[-1] = 0
    return ArrayDataset(images, np.arange(n) % 10, 10)


def collect(loader: DataLoader) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(to_numpy(x), to_numpy(y)) for x, y in loader]


def labels_seen(loader: DataLoader) -> np.ndarray:
    return np.concatenate([y for _, y in collect(loader)])


# ---------------------------------------------------------------------------------- batch counts


@pytest.mark.parametrize(("n", "bs", "drop_last", "sizes"), [
    (10, 3, False, [3, 3, 3, 1]),
    (10, 3, True, [3, 3, 3]),
    (9, 3, False, [3, 3, 3]),
    (9, 3, True, [3, 3, 3]),
    (2, 5, False, [2]),
    (2, 5, True, []),
    (4, 1, False, [1, 1, 1, 1]),
])
def test_batch_counts(n, bs, drop_last, sizes):
    loader = DataLoader(make_dataset(n), bs, drop_last=drop_last)
    with anycnn.use_backend("numpy"):
        batches = collect(loader)
    assert len(loader) == len(sizes)
    assert [len(y) for _, y in batches] == sizes
    assert [len(x) for x, _ in batches] == sizes


def test_unshuffled_order():
    with anycnn.use_backend("numpy"):
        np.testing.assert_array_equal(labels_seen(DataLoader(make_dataset(10), 4)),
                                      np.arange(10) % 10)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8", None])
def test_batch_size_validated(bad):
    with pytest.raises(ConfigError, match="batch_size"):
        DataLoader(make_dataset(), bad)


def test_other_arguments_validated():
    with pytest.raises(ConfigError, match="dtype"):
        DataLoader(make_dataset(), 2, dtype="int8")
    with pytest.raises(ConfigError, match="seed"):
        DataLoader(make_dataset(), 2, seed=-1)
    with pytest.raises(ConfigError, match="ArrayDataset"):
        DataLoader(np.zeros((4, 2, 2, 1)), 2)
    with pytest.raises(ConfigError, match="epoch"):
        DataLoader(make_dataset(), 2).set_epoch(-1)


def test_batch_size_accepts_numpy_integer():
    assert len(DataLoader(make_dataset(10), np.int64(5))) == 2


# -------------------------------------------------------------------------------------- shuffle


def test_shuffle_is_a_permutation_fixed_by_seed_and_epoch():
    ds = make_dataset(50)
    with anycnn.use_backend("numpy"):
        loader = DataLoader(ds, 8, shuffle=True, seed=7)
        epoch0 = labels_seen(loader)
        # epoch 0 by default, and the documented rule: default_rng([seed, epoch])
        order = np.random.default_rng([7, 0]).permutation(50)
        np.testing.assert_array_equal(epoch0, ds.labels[order])
        np.testing.assert_array_equal(labels_seen(loader), epoch0)  # re-iterating: same epoch
        loader.set_epoch(1)
        epoch1 = labels_seen(loader)
        assert not np.array_equal(epoch0, epoch1)
        assert sorted(epoch1) == sorted(ds.labels)
        np.testing.assert_array_equal(loader.order(), np.random.default_rng([7, 1]).permutation(50))
        # a fresh loader (a resumed run) reproduces any epoch
        resumed = DataLoader(ds, 8, shuffle=True, seed=7)
        resumed.set_epoch(1)
        np.testing.assert_array_equal(labels_seen(resumed), epoch1)
        other_seed = DataLoader(ds, 8, shuffle=True, seed=8)
        assert not np.array_equal(labels_seen(other_seed), epoch0)


def test_shuffled_images_follow_their_labels():
    n = 30
    images = np.repeat(np.arange(n, dtype=np.uint8), 4).reshape(n, 2, 2, 1)
    ds = ArrayDataset(images, np.arange(n) % 10, 10)
    loader = DataLoader(ds, 7, shuffle=True, seed=1)
    loader.set_epoch(3)
    with anycnn.use_backend("numpy"):
        for x, y in collect(loader):
            ids = np.rint(x[:, 0, 0, 0] * 255).astype(np.int64)
            np.testing.assert_array_equal(ids % 10, y)


def test_iter_from_resumes_mid_epoch():
    loader = DataLoader(make_dataset(11), 3, shuffle=True, seed=5)
    loader.set_epoch(4)
    with anycnn.use_backend("numpy"):
        full = collect(loader)
        for start in range(len(loader) + 1):
            rest = [(to_numpy(x), to_numpy(y)) for x, y in loader.iter_from(start)]
            assert len(rest) == len(full) - start
            for (xa, ya), (xb, yb) in zip(rest, full[start:]):
                np.testing.assert_array_equal(xa, xb)
                np.testing.assert_array_equal(ya, yb)
    with pytest.raises(ConfigError, match="start"):
        loader.iter_from(len(loader) + 1)
    with pytest.raises(ConfigError, match="start"):
        loader.iter_from(-1)


# -------------------------------------------------------------------------------- scaling/dtypes


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_scaling_and_dtypes(dtype):
    ds = make_dataset(6)
    with anycnn.use_backend("numpy"):
        (x, y), = DataLoader(ds, 6, dtype=dtype)
    assert x.dtype == np.dtype(dtype) and y.dtype == np.int64
    assert x.shape == (6, 3, 3, 2) and y.shape == (6,)
    x = to_numpy(x)
    assert x.max() == 1.0 and x.min() == 0.0
    np.testing.assert_array_equal(x, ds.images.astype(dtype) / np.asarray(255, dtype))


# ---------------------------------------------------------------------- backends and residency

BACKENDS = ["numpy", "array_api_strict", "torch"]


def _batches(name: str, device_resident: bool, dtype: str = "float32",
             dataset: ArrayDataset | None = None):
    if name == "torch":
        pytest.importorskip("torch")
    dataset = make_dataset(23, hw=5, c=3) if dataset is None else dataset
    loader = DataLoader(dataset, 4, shuffle=True, seed=11, device_resident=device_resident,
                        dtype=dtype)
    loader.set_epoch(2)
    with anycnn.use_backend(name) as b:
        out = []
        for x, y in loader:
            assert x.dtype == getattr(b.xp, dtype) and y.dtype == b.xp.int64
            assert anycnn.backend.namespace_of(x, y) is not None
            out.append((to_numpy(x), to_numpy(y)))
        assert len(out) == len(loader) == 6
        assert type(x).__module__.split(".")[0] == b.name  # the array type of that library
    return out


def _assert_identical(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == xb.dtype and ya.dtype == yb.dtype
        np.testing.assert_array_equal(xa, xb, strict=True)
        np.testing.assert_array_equal(ya, yb, strict=True)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_device_resident_matches_host_path(name, dtype):
    _assert_identical(_batches(name, False, dtype), _batches(name, True, dtype))


@pytest.mark.parametrize("name", BACKENDS[1:])
@pytest.mark.parametrize("device_resident", [False, True])
def test_backends_give_identical_batches(name, device_resident):
    _assert_identical(_batches("numpy", False), _batches(name, device_resident))


def test_strict_flags_and_non_default_device(monkeypatch):
    """Batches land on the backend's device (no leaks) under array-api-strict's strictest flags."""
    strict = pytest.importorskip("array_api_strict")
    device = strict.Device("device1")
    fake = Backend(name="array_api_strict", xp=strict, device=device, reason="test")
    monkeypatch.setattr(backend_module, "_current", fake)
    ds = make_dataset(9)
    with strict.ArrayAPIStrictFlags(boolean_indexing=False, data_dependent_shapes=False):
        for resident in (False, True):
            loader = DataLoader(ds, 4, shuffle=True, device_resident=resident)
            batches = list(loader)
            assert all(x.device == device and y.device == device for x, y in batches)
            got = np.concatenate([np.asarray(y.to_device(strict.Device("CPU_DEVICE")))
                                  for _, y in batches])
            np.testing.assert_array_equal(got, ds.labels[loader.order()])


def test_device_resident_follows_backend_switch():
    pytest.importorskip("torch")
    loader = DataLoader(make_dataset(8), 4, device_resident=True)
    with anycnn.use_backend("numpy"):
        first = collect(loader)
        assert isinstance(next(iter(loader))[0], np.ndarray)
    with anycnn.use_backend("torch"):
        x, _ = next(iter(loader))
        assert type(x).__module__ == "torch"
        _assert_identical(first, collect(loader))


# ------------------------------------------------------------------------------- float images


def unit_float_dataset(image_dtype: str) -> ArrayDataset:
    """23 images (5x5x3) of random floats in [0, 1], both ends included."""
    images = np.random.default_rng(3).random((23, 5, 5, 3)).astype(image_dtype)
    images[0], images[-1] = 1, 0
    return ArrayDataset(images, np.arange(23) % 10, 10)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("device_resident", [False, True])
@pytest.mark.parametrize("image_dtype", ["float32", "float64"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_float_images_are_used_as_they_are(name, device_resident, image_dtype, dtype):
    """Float images in [0, 1] are not divided by 255: each batch is exactly the images at the
    batch's indices, cast to the loader's dtype, as if the user had fed them."""
    ds = unit_float_dataset(image_dtype)
    got = _batches(name, device_resident, dtype, ds)
    order = np.random.default_rng([11, 2]).permutation(len(ds))
    expected = [(ds.images[order[i:i + 4]].astype(dtype), ds.labels[order[i:i + 4]])
                for i in range(0, len(ds), 4)]
    _assert_identical(got, expected)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("device_resident", [False, True])
def test_uint8_images_and_their_float_copy_give_the_same_batches(name, device_resident):
    """``images / 255`` in float32, given as a float dataset, batches to the very same bits as
    the uint8 images (which the loader divides by 255 itself)."""
    raw = make_dataset(23, hw=5, c=3)
    scaled = ArrayDataset(raw.images.astype(np.float32) / 255, raw.labels, 10)
    _assert_identical(_batches(name, device_resident, dataset=raw),
                      _batches(name, device_resident, dataset=scaled))


def test_float_dataset_trains_and_evaluates_like_its_uint8_original(backend):
    """Trainer.fit, evaluate and subset take float images too: the same numbers, bit for bit, as
    the uint8 images they were scaled from."""
    raw = make_dataset(24, hw=6, c=1)
    scaled = ArrayDataset(raw.images.astype(np.float32) / 255, raw.labels, 10)
    results = []
    for ds in (raw, scaled, scaled.subset(np.arange(24))):
        anycnn.manual_seed(0)
        model = anycnn.Sequential(L.Conv2D(1, 2, 3), L.ReLU(), L.Flatten(), L.Dense(32, 10))
        trainer = Trainer(model, anycnn.optim.SGD(model.parameters(), lr=0.5), progress=False)
        record, = trainer.fit(DataLoader(ds, 8, shuffle=True), DataLoader(ds, 12), epochs=1)
        results.append([record[k] for k in ("train_loss", "train_accuracy", "val_loss")]
                       + list(evaluate(model, DataLoader(ds, 12, device_resident=True)).values()))
    assert results[0] == results[1] == results[2]
    assert all(np.isfinite(results[0])) and results[0][0] != results[0][2]
