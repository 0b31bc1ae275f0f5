"""anycnn.data.augment: crops, flips and normalisation against a slow per-image NumPy reference on
every backend, their determinism and resume, auto statistics, the CLI record, and bad values.

Batches are compared bit for bit across backends: crop and flip are gathers (copies of stored
pixels), and scaling and normalisation are one correctly rounded IEEE operation each (``/ 255``,
``- mean``, ``/ std``) on the same float32/float64 operands, so every backend must give the
same bits; any difference is a bug (a wrong index, an extra rounding, a float64 promotion).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import anycnn
from anycnn import augment as A
from anycnn import checkpoint as C
from anycnn import optim
from anycnn.backend import Backend, to_numpy
from anycnn.data.augment import Augment, Normalize, parse_augment, read_preprocess
from anycnn.data.dataloader import DataLoader
from anycnn.data.datasets import ArrayDataset, load_dataset
from anycnn.errors import CheckpointError, ConfigError
from anycnn.optim.schedules import make_schedule
from anycnn.train.trainer import Trainer, evaluate
from tests.test_reliability import isolated_env, make_tiny_dataset, run_main  # noqa: F401
from tests.test_train import StopAfter, assert_same_run, tiny_model

BACKENDS = ["numpy", "array_api_strict", "torch"]


def make_dataset(n=23, h=6, w=5, c=3, seed=0, dtype="uint8") -> ArrayDataset:
    """Non-square images (a swapped H/W shows), distinct pixel values per image."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    if dtype != "uint8":
        images = images.astype(dtype) / 255
    return ArrayDataset(images, np.arange(n) % 10, 10)


# --------------------------------------------------------------------------------- reference


def reference_batches(ds, batch_size, seed, epoch, crop, flip, mode="zeros", normalize=None,
                      dtype="float32"):
    """The documented semantics, one image at a time: np.pad, slice, [:, ::-1], scale,
    normalise; random numbers drawn by the documented rule."""
    order = np.random.default_rng([seed, epoch]).permutation(len(ds))
    out = []
    for b, start in enumerate(range(0, len(ds), batch_size)):
        idx = order[start:start + batch_size]
        rng = np.random.default_rng([seed, epoch, b, 0x617567])
        n = len(idx)
        dy = rng.integers(0, 2 * crop + 1, n) if crop else np.zeros(n, int)
        dx = rng.integers(0, 2 * crop + 1, n) if crop else np.zeros(n, int)
        fl = rng.integers(0, 2, n) if flip else np.zeros(n, int)
        images = []
        for k, i in enumerate(idx):
            img = ds.images[i]
            h, w = img.shape[:2]
            pad = ((crop, crop), (crop, crop), (0, 0))
            padded = np.pad(img, pad, mode="constant" if mode == "zeros" else "edge")
            window = padded[dy[k]:dy[k] + h, dx[k]:dx[k] + w]
            if fl[k]:
                window = window[:, ::-1]
            x = window.astype(dtype)
            if img.dtype == np.uint8:
                x = x / np.asarray(255, dtype)
            if normalize is not None:
                x = (x - np.asarray(normalize.mean, dtype)) / np.asarray(normalize.std, dtype)
            images.append(x)
        out.append((np.stack(images), ds.labels[idx]))
    return out


def run_loader(name, loader, epoch=0, start=0):
    if name == "torch":
        pytest.importorskip("torch")
    loader.set_epoch(epoch)
    with anycnn.use_backend(name) as b:
        batches = []
        for x, y in loader.iter_from(start):
            assert type(x).__module__.split(".")[0] == b.name
            batches.append((to_numpy(x), to_numpy(y)))
    return batches


def assert_identical(got, want):
    assert len(got) == len(want)
    for (xa, ya), (xb, yb) in zip(got, want):
        np.testing.assert_array_equal(xa, xb, strict=True)
        np.testing.assert_array_equal(ya, yb, strict=True)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("device_resident", [False, True], ids=["host", "resident"])
@pytest.mark.parametrize(("crop", "flip", "mode"), [
    (2, True, "zeros"), (2, True, "edge"), (1, False, "zeros"), (0, True, "zeros"),
    (3, True, "edge")])
def test_matches_per_image_reference(name, device_resident, crop, flip, mode):
    ds = make_dataset(h=7, w=6)
    norm = Normalize((0.5, 0.25, 0.125), (0.2, 0.3, 0.7))
    loader = DataLoader(ds, 4, shuffle=True, seed=7, device_resident=device_resident,
                        augment=Augment(crop, flip, mode), normalize=norm)
    got = run_loader(name, loader, epoch=3)
    assert_identical(got, reference_batches(ds, 4, 7, 3, crop, flip, mode, norm))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize(("c", "image_dtype", "dtype"), [
    (1, "uint8", "float32"), (1, "float32", "float64"), (3, "float64", "float32"),
    (2, "uint8", "float64")])
def test_reference_other_channels_and_dtypes(name, c, image_dtype, dtype):
    """One channel takes another index path; float images are padded with 0.0 like uint8."""
    ds = make_dataset(n=10, h=5, w=7, c=c, dtype=image_dtype)
    loader = DataLoader(ds, 3, shuffle=True, seed=2, augment=Augment(2, True), dtype=dtype,
                        device_resident=True)
    got = run_loader(name, loader, epoch=1)
    assert_identical(got, reference_batches(ds, 3, 2, 1, 2, True, dtype=dtype))


def test_crops_really_vary_and_pad_with_zeros():
    """Guards the reference itself: with a padding of 2 some windows show padding, some
    images are mirrored, and not all in the same way."""
    ds = ArrayDataset(np.full((64, 6, 6, 1), 200, np.uint8), np.zeros(64, np.int64), 10)
    (x, _), = run_loader("numpy", DataLoader(ds, 64, augment=Augment(crop=2)))
    zeros_per_image = (x == 0).reshape(64, -1).sum(axis=1)
    assert zeros_per_image.min() == 0 and zeros_per_image.max() >= 2 * 6 + 2 * 4
    assert len(set(zeros_per_image.tolist())) > 3
    ramp = np.tile(np.arange(6, dtype=np.uint8), (64, 6, 1))[..., None]
    (x, _), = run_loader("numpy", DataLoader(ArrayDataset(ramp, np.zeros(64, np.int64), 10), 64,
                                             augment=Augment(flip=True)))
    mirrored = x[:, 0, 0, 0] > x[:, 0, -1, 0]
    assert 10 < mirrored.sum() < 54


def test_strict_flags_and_non_default_device(monkeypatch):
    """The index vectors are made on the batch's device (no leaks to the default device)."""
    strict = pytest.importorskip("array_api_strict")
    from anycnn import backend as backend_module

    device = strict.Device("device1")
    monkeypatch.setattr(backend_module, "_current",
                        Backend(name="array_api_strict", xp=strict, device=device, reason="test"))
    ds = make_dataset()
    norm = Normalize((0.5,) * 3, (0.25,) * 3)
    with strict.ArrayAPIStrictFlags(boolean_indexing=False, data_dependent_shapes=False):
        for resident in (False, True):
            for mode in A.PADDING_MODES:
                loader = DataLoader(ds, 4, shuffle=True, seed=1, device_resident=resident,
                                    augment=Augment(2, True, mode), normalize=norm)
                batches = list(loader)
                assert all(x.device == device for x, _ in batches)
                cpu = strict.Device("CPU_DEVICE")
                got = [(np.asarray(x.to_device(cpu)), np.asarray(y.to_device(cpu)))
                       for x, y in batches]
                assert_identical(got, reference_batches(ds, 4, 1, 0, 2, True, mode, norm))


# ------------------------------------------------------------------------ determinism, resume


def test_deterministic_per_seed_epoch_and_batch_and_resumable():
    ds = make_dataset(n=30)

    def loader(seed=5, resident=False, shuffle=True):
        return DataLoader(ds, 4, shuffle=shuffle, seed=seed, device_resident=resident,
                          augment=Augment(2, True))

    first = run_loader("numpy", loader(), epoch=2)
    assert_identical(run_loader("numpy", loader(), epoch=2), first)  # a fresh loader
    assert_identical(run_loader("numpy", loader(resident=True), epoch=2), first)
    for start in (1, 4, len(first)):  # resume mid-epoch: the same batches as skipping
        assert_identical(run_loader("numpy", loader(), epoch=2, start=start), first[start:])
    other_epoch = run_loader("numpy", loader(), epoch=3)
    other_seed = run_loader("numpy", loader(seed=6), epoch=2)
    # same images in the same order, different crops: unshuffled loaders of two epochs
    e0, e1 = (run_loader("numpy", loader(shuffle=False), epoch=e) for e in (0, 1))
    for batches in (other_epoch, other_seed, e1):
        assert not all(np.array_equal(a, b) for (a, _), (b, _) in zip(batches, first))
    assert not any(np.array_equal(a, b) for (a, _), (b, _) in zip(e0, e1))
    # the stream of batch b does not depend on the batch before it
    params = [Augment(2, True).draw(5, 2, b, 4) for b in range(3)]
    assert np.array_equal(Augment(2, True).draw(5, 2, 1, 4), params[1])


def new_augmented_run(train_set, seed, path=None):
    anycnn.manual_seed(seed)
    model = tiny_model()
    opt = optim.Adam(model.parameters(), lr=3e-3)
    trainer = Trainer(model, opt, schedule=make_schedule("cosine", 3e-3, 3),
                      checkpoint_path=path, progress=False)
    norm = Normalize.from_images(train_set.images)
    return trainer, DataLoader(train_set, 32, shuffle=True, seed=5,
                               augment=Augment(crop=2, flip=True), normalize=norm)


@pytest.fixture(scope="module")
def small():
    sample = load_dataset("mnist-sample")
    return sample.train.subset(np.arange(192)), sample.val.subset(np.arange(128))


def test_trainer_resume_with_augmentation_equals_uninterrupted_run(small, tmp_path):
    with anycnn.use_backend("numpy") as backend:
        straight, loader = new_augmented_run(small[0], seed=1)
        val = DataLoader(small[1], 64, normalize=loader.normalize)
        straight.fit(loader, val, epochs=3)

        first, loader = new_augmented_run(small[0], seed=1)
        stopper = StopAfter(loader, 1, 3)
        stopper.trainer = first
        first.fit(stopper, val, epochs=3)
        assert (first.epoch, first.step) == (1, 3)
        path = first.save(tmp_path / "stopped.safetensors")

        resumed, loader = new_augmented_run(small[0], seed=42)
        resumed.resume(path)
        resumed.fit(loader, val, epochs=3)
        assert_same_run(backend, resumed, straight)
        # without augmentation the run differs: the test can fail
        plain, _ = new_augmented_run(small[0], seed=1)
        plain.fit(DataLoader(small[0], 32, shuffle=True, seed=5, normalize=loader.normalize),
                  val, epochs=1)
        assert plain.history[0]["train_loss"] != straight.history[0]["train_loss"]
        # the checkpoint records the preprocessing of the training loader
        end = resumed.save(tmp_path / "end.safetensors")
        saved = C.load_checkpoint(end).extra["config"]["preprocess"]
        assert saved == loader.preprocess
        assert read_preprocess(saved) == (Augment(2, True), loader.normalize)


# ---------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("image_dtype", ["uint8", "float32", "float64"])
def test_auto_statistics_equal_numpy(image_dtype):
    ds = make_dataset(n=37, h=4, w=3, c=3, seed=4, dtype=image_dtype)
    scaled = ds.images.astype(np.float64) / (255 if image_dtype == "uint8" else 1)
    mean, std = scaled.mean(axis=(0, 1, 2)), scaled.std(axis=(0, 1, 2))
    for chunk in (5, 4096):  # several chunks, and one
        got = Normalize.from_images(ds.images, chunk=chunk)
        np.testing.assert_allclose(got.mean, mean, rtol=1e-13)
        np.testing.assert_allclose(got.std, std, rtol=1e-12)
    assert DataLoader(ds, 4, normalize="auto").normalize == Normalize.from_images(ds.images)


def test_normalised_batches_have_zero_mean_unit_std():
    ds = make_dataset(n=40)
    (x, _), = run_loader("numpy", DataLoader(ds, 40, normalize="auto", dtype="float64"))
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0, atol=1e-12)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1, rtol=1e-12)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data", n_train=128, n_test=64)


def train_argv(data, out, *extra):
    return ["train", "--dataset", "fashion-mnist", "--data-dir", str(data), "--model", "lenet5",
            "--epochs", "1", "--batch-size", "16", "--backend", "numpy", "--quiet",
            "--out", str(out), *extra]


def test_cli_normalize_auto_is_recorded_and_applied_by_evaluate(isolated_env,  # noqa: F811
                                                                 tiny_data, capsys):
    out = isolated_env / "run"
    rc, _, err = run_main(train_argv(tiny_data, out, "--normalize", "auto", "--augment",
                                     "crop,flip"), capsys)
    assert rc == 0, err
    state = C.load_checkpoint(out / "checkpoint.safetensors")
    config = state.extra["config"]
    data = load_dataset("fashion-mnist", data_dir=tiny_data)
    norm = Normalize.from_images(data.train.images)
    # the exact record format other commands read (beside the image size, channels, classes)
    record = config["preprocess"]
    assert {k: record[k] for k in ("augment", "normalize")} == {
        "augment": {"crop": 1, "flip": True, "padding_mode": "zeros"},  # 12 // 8 = 1
        "normalize": {"mean": list(norm.mean), "std": list(norm.std)}}
    assert (record["image_size"], record["channels"]) == ([12, 12], 1)
    assert (config["augment"], config["normalize"]) == ("crop=1,flip", "auto")
    assert json.loads(json.dumps(config["preprocess"])) == config["preprocess"]

    rc, stdout, err = run_main(["evaluate", str(out), "--json", "--backend", "numpy"], capsys)
    assert rc == 0, err
    via_cli = json.loads(stdout)
    model, _ = C.load_model(out / "checkpoint.safetensors")
    with anycnn.use_backend("numpy"):
        right = evaluate(model, DataLoader(data.test, 256, normalize=norm))
        wrong = evaluate(model, DataLoader(data.test, 256))
    assert via_cli["accuracy"] == right["accuracy"] and via_cli["loss"] == right["loss"]
    assert wrong["loss"] != right["loss"]  # so the test would see a missing normalisation


def test_cli_defaults_and_resume_keep_the_settings(isolated_env, tiny_data, capsys):  # noqa: F811
    out = isolated_env / "run"
    rc, _, err = run_main(train_argv(tiny_data, out), capsys)
    assert rc == 0, err
    config = C.load_checkpoint(out / "checkpoint.safetensors").extra["config"]
    # 12x12 grayscale: no augmentation, no normalisation (earlier runs stay as they were)
    assert (config["augment"], config["normalize"]) == ("none", "none")
    assert (config["preprocess"]["augment"], config["preprocess"]["normalize"]) == (None, None)

    out2 = isolated_env / "run2"
    rc, _, err = run_main(train_argv(tiny_data, out2, "--augment", "crop=2,pad=edge",
                                     "--normalize", "auto"), capsys)
    assert rc == 0, err
    first = C.load_checkpoint(out2 / "checkpoint.safetensors").extra["config"]
    rc, _, err = run_main(train_argv(tiny_data, out2, "--epochs", "2", "--resume"), capsys)
    assert rc == 0, err
    resumed = C.load_checkpoint(out2 / "checkpoint.safetensors").extra["config"]
    assert (resumed["augment"], resumed["normalize"]) == ("crop=2,pad=edge", "auto")
    assert resumed["preprocess"] == first["preprocess"]
    assert first["preprocess"]["augment"] == {"crop": 2, "flip": False, "padding_mode": "edge"}
    rc, _, err = run_main(train_argv(tiny_data, out2, "--epochs", "3", "--resume",
                                     "--normalize", "none"), capsys)
    assert rc == 2 and "--normalize auto, not none" in err


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--augment", "rotate"], "bad item 'rotate'"),
    (["--augment", "crop=x"], "crop=P needs an integer"),
    (["--augment", "crop=-1"], "crop (the padding in pixels) must be an integer >= 0, got -1"),
    (["--augment", "crop=7"], "crop=7 is too large for 12x12 images"),
    (["--augment", "flip,flip"], "bad item 'flip'"),
    (["--augment", "crop,pad=wrap"], "padding_mode must be one of zeros, edge, got 'wrap'"),
    (["--normalize", "yes"], "invalid choice: 'yes'"),
])
def test_cli_bad_preprocessing_options(isolated_env, tiny_data, capsys, extra,  # noqa: F811
                                       fragment):
    rc, _, err = run_main(train_argv(tiny_data, isolated_env / "run", *extra), capsys)
    assert rc == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


# -------------------------------------------------------------------------- defaults, errors


def test_defaults_follow_the_image_shape():
    assert parse_augment("auto", (32, 32, 3)) == Augment(crop=4, flip=True)
    assert parse_augment("auto", (28, 28, 1)) is None
    assert parse_augment("auto", (32, 32, 1)) is None
    assert parse_augment("crop,flip", (28, 28, 1)) == Augment(crop=3, flip=True)
    assert parse_augment("none", (32, 32, 3)) is None
    assert parse_augment(" Crop=2 , pad=edge ", (12, 12, 1)) == Augment(2, False, "edge")
    assert A.default_normalize((32, 32, 3)) and not A.default_normalize((28, 28, 1))
    for aug in (Augment(4, True), Augment(2, False, "edge"), Augment(0, True)):
        assert parse_augment(aug.spec()) == aug


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"crop": -1}, "got -1"), ({"crop": 1.5}, "got 1.5"), ({"crop": True}, "got True"),
    ({"crop": "4"}, "got '4'"), ({"flip": 1}, "flip must be True or False, got 1"),
    ({"flip": "yes"}, "got 'yes'"), ({"padding_mode": "reflect"}, "got 'reflect'"),
])
def test_bad_augment_values(kwargs, fragment):
    with pytest.raises(ConfigError, match="Augment") as info:
        Augment(**kwargs)
    assert fragment in str(info.value)


def test_crop_too_large_for_the_images():
    ds = make_dataset(h=6, w=5)
    DataLoader(ds, 4, augment=Augment(crop=2))  # half of 5, rounded down
    with pytest.raises(ConfigError, match=r"crop=3 is too large for 6x5 images.*at most 2"):
        DataLoader(ds, 4, augment=Augment(crop=3))
    with pytest.raises(ConfigError, match=r"augment must be an anycnn\.data\.augment\.Augment"):
        DataLoader(ds, 4, augment="crop")


@pytest.mark.parametrize(("mean", "std", "fragment"), [
    ((0.5, 0.5), (0.2, 0.2, 0.2), "mean has 2 values but std has 3"),
    ((0.5,) * 3, (0.2, 0.0, 0.2), "std must be > 0, got 0.0"),
    ((0.5,) * 3, (0.2, -1, 0.2), "std must be > 0, got -1.0"),
    ((0.5, float("nan"), 0.5), (0.2,) * 3, "finite numbers, got nan"),
    (0.5, (0.2,), "mean must be a sequence of numbers"),
    ("abc", (0.2,) * 3, "mean must be a sequence of numbers"),
    ((), (), "mean is empty"),
    ((0.5, "x"), (0.2, 0.2), "got 'x'"),
])
def test_bad_normalize_values(mean, std, fragment):
    with pytest.raises(ConfigError, match="Normalize") as info:
        Normalize(mean, std)
    assert fragment in str(info.value)


def test_normalize_must_fit_the_images():
    ds = make_dataset(c=3)
    with pytest.raises(ConfigError, match=r"2 mean/std value\(s\) but the images have 3"):
        DataLoader(ds, 4, normalize=Normalize((0.5, 0.5), (0.2, 0.2)))
    with pytest.raises(ConfigError, match="normalize must be"):
        DataLoader(ds, 4, normalize="mean")
    flat = ArrayDataset(np.full((4, 3, 3, 2), 7, np.uint8), np.zeros(4, np.int64), 10)
    with pytest.raises(ConfigError, match="channel 0 of the images is constant"):
        DataLoader(flat, 4, normalize="auto")
    with pytest.raises(ConfigError, match="Normalize has 3 channel"):
        Normalize((0.5,) * 3, (1.0,) * 3).apply(np.zeros((2, 2, 1), np.float32))


@pytest.mark.parametrize("record", [
    [1, 2], {"augment": {"crop": -1}}, {"augment": {"zoom": 2}}, {"normalize": {"mean": [0]}},
    {"normalize": {"mean": [0.5], "std": [0]}}, {"normalize": [0.5]}])
def test_malformed_checkpoint_records(record):
    with pytest.raises(CheckpointError, match="malformed preprocess record"):
        read_preprocess(record)
