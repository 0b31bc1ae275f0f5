"""ImageNet-style preprocessing: the evaluation transform (shorter side, centre crop, mean/std)
against a per-image Pillow + NumPy reference, the random-resized crop on every backend against a
per-image reference resize of the same boxes, its seeding and resume, the record round trip
through a checkpoint, and ``anycnn train/evaluate/predict`` using what the checkpoint records.

Tolerances: the evaluation transform decodes with Pillow like the reference, so the ``uint8``
pixels must be equal and the normalised floats equal to float32 rounding (``1e-6``
relative). The random-resized crop is two float matrix products per image, compared with
Pillow's own float (mode ``"F"``) resize of the cropped box (``3e-6`` in float32 on values in
``[0, 1]``) and with ``torch.nn.functional.interpolate(antialias=True)`` in float64
(``1e-12``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import anycnn
from anycnn import backend as backend_module
from anycnn.backend import to_numpy
from anycnn.cli.predict import prepare, preprocess_of
from anycnn.data import DataLoader, EvalTransform, Normalize, RandomResizedCrop
from anycnn.data.arrays import ArrayDataset
from anycnn.data.augment import (
    Augment,
    parse_augment,
    preprocess_record,
    read_eval_transform,
    read_preprocess,
)
from anycnn.data.eval_transform import IMAGENET_MEAN, IMAGENET_STD
from anycnn.data.imagefolder import load_image_folder
from anycnn.errors import CheckpointError, ConfigError

from .cli_run import cli, isolated  # noqa: F401 - isolated: every test's fixture

Image = pytest.importorskip("PIL.Image")
BACKENDS = ["numpy", "array_api_strict", "torch"]


def one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("anycnn: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


def photo(path: Path, seed: int, hw: tuple[int, int], level: int = 128) -> Path:
    """A smooth random RGB picture (a resize of it is not trivially flat)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coarse = rng.normal(level, 50, (4, 4, 3)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(coarse).resize((hw[1], hw[0]), Image.Resampling.BICUBIC)
    noisy = np.asarray(img).astype(int) + rng.integers(-20, 21, (*hw, 3))
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------- eval transform


def reference_eval(path: Path, resize: int, crop: int, mean, std) -> tuple[np.ndarray, ...]:
    """torchvision's Resize(resize) + CenterCrop(crop) + ToTensor + Normalize, written out:
    Pillow's bilinear resize to shorter side ``resize``, a NumPy slice at the rounded centre,
    ``/ 255`` and ``(x - mean) / std`` in float64."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        if h <= w:
            nh, nw = resize, int(resize * w / h)
        else:
            nh, nw = int(resize * h / w), resize
        pixels = np.asarray(img.resize((nw, nh), Image.Resampling.BILINEAR))
    top, left = round((nh - crop) / 2.0), round((nw - crop) / 2.0)
    window = pixels[top:top + crop, left:left + crop]
    x = window / 255.0
    return window, (x - np.asarray(mean)) / np.asarray(std)


# sizes (H, W): landscape, portrait, square, already at the size, an odd centre offset (.5)
EVAL_SIZES = [(30, 47), (52, 25), (33, 33), (20, 26), (20, 57)]


def test_eval_transform_matches_the_pil_reference(tmp_path):
    paths = [photo(tmp_path / f"{i}.png", i, hw) for i, hw in enumerate(EVAL_SIZES)]
    transform = EvalTransform(20, 16, IMAGENET_MEAN, IMAGENET_STD)
    pixels = transform.load(paths)
    prepared = transform.prepare(paths)
    assert pixels.shape == (5, 16, 16, 3) and pixels.dtype == np.uint8
    assert prepared.shape == (5, 16, 16, 3) and prepared.dtype == np.float32
    for i, path in enumerate(paths):
        window, normalised = reference_eval(path, 20, 16, IMAGENET_MEAN, IMAGENET_STD)
        np.testing.assert_array_equal(pixels[i], window)
        np.testing.assert_allclose(prepared[i], normalised, rtol=1e-6, atol=1e-6)
    # the windows really differ from a stretch and from a top-left crop (guards the reference)
    stretched = anycnn.data.images.load_images(paths, (16, 16), 3)
    assert not np.array_equal(pixels, stretched)
    # (20, 57): shorter side 20 already, so not resized; left offset round(20.5) = 20 (half
    # to even, as torchvision's center_crop), not 21
    with Image.open(paths[4]) as img:
        full = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(pixels[4], full[2:18, 20:36])


def test_image_folder_cache_holds_the_eval_pixels(tmp_path):
    """``anycnn evaluate`` on a folder and ``anycnn predict`` on its files see the same
    pixels: the folder decoded with resize_shorter equals EvalTransform.load."""
    for i, hw in enumerate(EVAL_SIZES * 2):
        photo(tmp_path / "f" / ("a", "b")[i % 2] / f"{i}.png", i, hw)
    data = load_image_folder(tmp_path / "f", size=16, resize_shorter=20, val_split=0.3)
    files = sorted((tmp_path / "f").rglob("*.png"))
    everything = np.concatenate([data.train.images, data.val.images])
    assert everything.shape == (10, 16, 16, 3)
    by_file = EvalTransform(20, 16).load(files)
    assert sorted(map(bytes, everything)) == sorted(map(bytes, by_file))
    # train_size: the training split at R x R, the others at the crop, from one folder
    split = load_image_folder(tmp_path / "f", size=16, resize_shorter=20, train_size=20,
                              val_split=0.3)
    assert split.train.image_shape == (20, 20, 3) and split.val.image_shape == (16, 16, 3)
    np.testing.assert_array_equal(split.val.images, data.val.images)
    with pytest.raises(ConfigError, match="larger than the resized shorter side"):
        load_image_folder(tmp_path / "f", size=24, resize_shorter=20)


def test_eval_transform_record_and_errors():
    meta = {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}
    transform = EvalTransform.from_record(meta)
    assert transform == EvalTransform.imagenet() and transform.to_record() == meta
    assert transform.normalize == Normalize(IMAGENET_MEAN, IMAGENET_STD)
    assert EvalTransform.from_record({"resize": 8, "crop": 8}).normalize is None
    for bad, words in [({"resize": 8}, "no crop"), ({**meta, "size": 3}, "unknown key"),
                       ({**meta, "crop": 300}, "larger than resize"),
                       ({**meta, "std": None}, "both mean and std"),
                       ({**meta, "interpolation": "cubic"}, "unknown interpolation"),
                       ({**meta, "resize": 2.5}, "positive integer"), ([1, 2], "an object")]:
        with pytest.raises(ConfigError, match=words):
            EvalTransform.from_record(bad)


# ---------------------------------------------------------------------- random-resized crop


def reference_rrc(images: np.ndarray, params: np.ndarray, size: int) -> np.ndarray:
    """Per image: NumPy-slice the box, resize it with Pillow's float (mode "F") bilinear
    filter, channel by channel, mirror when flipped."""
    out = []
    for b in range(images.shape[0]):
        top, left, h, w, flip = (int(v) for v in params[:, b])
        box = images[b, top:top + h, left:left + w].astype(np.float32)
        planes = [np.asarray(Image.fromarray(box[..., c], "F").resize(
            (size, size), Image.Resampling.BILINEAR)) for c in range(box.shape[2])]
        resized = np.stack(planes, axis=-1)
        out.append(resized[:, ::-1] if flip else resized)
    return np.stack(out)


@pytest.mark.parametrize("name", BACKENDS)
def test_rrc_matches_the_per_image_reference(name):
    if name == "torch":
        pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    images = rng.random((12, 23, 31, 3), dtype=np.float32)
    rrc = RandomResizedCrop(17, flip=True)
    params = rrc.draw(5, 2, 7, 12, (23, 31))
    h, w = params[2], params[3]
    assert set(params[4].tolist()) == {0, 1} and len(set(zip(h.tolist(), w.tolist()))) > 6
    assert (h < 23).any() and (w < 31).any()  # shrinks and enlarges both happen
    with anycnn.use_backend(name):
        got = to_numpy(rrc.apply(anycnn.asarray(images), anycnn.asarray(params)))
    assert got.shape == (12, 17, 17, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_rrc(images, params, 17), rtol=0, atol=3e-6)


def test_rrc_equals_torch_antialiased_interpolation_in_float64():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    images = rng.random((8, 40, 30, 2))
    rrc = RandomResizedCrop(24, scale=(0.05, 1.0), flip=True)
    params = rrc.draw(0, 0, 0, 8, (40, 30))
    got = rrc.apply(images, params)
    for b in range(8):
        top, left, h, w, flip = params[:, b]
        box = torch.from_numpy(images[b, top:top + h, left:left + w]).permute(2, 0, 1)[None]
        ref = torch.nn.functional.interpolate(box, size=(24, 24), mode="bilinear",
                                              antialias=True, align_corners=False)
        ref = ref[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(got[b], ref[:, ::-1] if flip else ref, rtol=0, atol=1e-12)


def test_rrc_boxes_follow_scale_and_ratio():
    rrc = RandomResizedCrop(8, scale=(0.25, 0.5), ratio=(0.5, 2.0))
    params = rrc.draw(1, 0, 0, 4000, (60, 80))
    top, left, h, w, flip = params
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 60).all() \
        and (left + w <= 80).all() and not flip.any()
    area = h * w / (60 * 80)
    assert 0.23 < area.min() and area.max() < 0.52 and 0.3 < area.mean() < 0.45
    assert 0.45 < (w / h).min() and (w / h).max() < 2.1
    assert len(set(top.tolist())) > 20 and len(set(left.tolist())) > 20
    # no box fits (area above the image's): the centred fallback with the ratio clamped
    wide = RandomResizedCrop(8, scale=(2.0, 3.0), ratio=(0.75, 4 / 3)).draw(0, 0, 0, 3, (10, 40))
    np.testing.assert_array_equal(wide[:4], [[0] * 3, [13] * 3, [10] * 3, [13] * 3])


def test_rrc_is_seeded_and_resumes_exactly():
    rng = np.random.default_rng(0)
    ds = ArrayDataset(rng.integers(0, 256, (21, 12, 14, 3), dtype=np.uint8),
                      np.arange(21) % 3, 3)
    rrc = RandomResizedCrop(10, flip=True)
    assert (rrc.draw(3, 1, 2, 5, (12, 14)) == rrc.draw(3, 1, 2, 5, (12, 14))).all()
    assert not (rrc.draw(3, 1, 2, 5, (12, 14)) == rrc.draw(3, 1, 3, 5, (12, 14))).all()
    norm = Normalize((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))

    def batches(start=0, **kw):
        loader = DataLoader(ds, 4, shuffle=True, seed=3, augment=rrc, normalize=norm, **kw)
        loader.set_epoch(2)
        return [to_numpy(x) for x, _ in loader.iter_from(start)]

    whole = batches()
    assert [b.shape for b in whole] == [(4, 10, 10, 3)] * 5 + [(1, 10, 10, 3)]
    for got, want in zip(batches(start=3), whole[3:], strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(batches(device_resident=True), whole, strict=True):
        np.testing.assert_array_equal(got, want)
    # the loader's batch: scale, resample the drawn boxes, normalise
    order = np.random.default_rng([3, 2]).permutation(21)
    params = rrc.draw(3, 2, 1, 4, (12, 14))
    raw = ds.images[order[4:8]].astype(np.float32) / np.float32(255)
    want = (reference_rrc(raw, params, 10) - np.float32(norm.mean)) / np.float32(norm.std)
    np.testing.assert_allclose(whole[1], want, rtol=0, atol=2e-5)


def test_rrc_on_a_non_default_strict_device(monkeypatch):
    """The weights are built on the batch's device (no leaks to the default device)."""
    strict = pytest.importorskip("array_api_strict")
    device = strict.Device("device1")
    monkeypatch.setattr(backend_module, "_current", backend_module.Backend(
        name="array_api_strict", xp=strict, device=device, reason="test"))
    rng = np.random.default_rng(1)
    ds = ArrayDataset(rng.integers(0, 256, (9, 11, 13, 3), dtype=np.uint8), np.arange(9) % 3, 3)
    rrc = RandomResizedCrop(8, flip=True)
    with strict.ArrayAPIStrictFlags(boolean_indexing=False, data_dependent_shapes=False):
        for resident in (False, True):
            batches = [x for x, _ in DataLoader(ds, 4, augment=rrc, device_resident=resident)]
            assert all(x.device == device and x.shape[1:] == (8, 8, 3) for x in batches)
    cpu = strict.Device("CPU_DEVICE")
    want = reference_rrc(ds.images[:4] / np.float32(255), rrc.draw(0, 0, 0, 4, (11, 13)), 8)
    np.testing.assert_allclose(np.asarray(batches[0].to_device(cpu)), want, atol=3e-6)


def test_parse_augment_rrc():
    rrc = parse_augment("rrc,flip", (256, 256, 3), output_size=224)
    assert rrc == RandomResizedCrop(224, flip=True) and rrc.spec() == "rrc=224,flip"
    custom = parse_augment("rrc=32,scale=0.25:1,ratio=0.5:2", (40, 40, 3))
    assert custom == RandomResizedCrop(32, (0.25, 1.0), (0.5, 2.0))
    assert parse_augment(custom.spec()) == custom
    assert parse_augment("rrc", (40, 36, 3)).size == 36
    for bad, words in [("rrc,crop", "do not go together"), ("flip,scale=0.1:1", "rrc"),
                       ("rrc=big", "integer size"), ("rrc,ratio=2", "LO:HI"),
                       ("rrc,scale=0.5:0.1", "low <= high")]:
        with pytest.raises(ConfigError, match=words):
            parse_augment(bad)


# ----------------------------------------------------------------------------- the record


def test_record_round_trips_through_a_checkpoint(tmp_path):
    model = anycnn.models.build_model({"name": "lenet5", "num_classes": 3, "in_channels": 3,
                                       "image_size": 16})
    transform = EvalTransform(20, 16, IMAGENET_MEAN, IMAGENET_STD, "bicubic")
    rrc = RandomResizedCrop(16, scale=(0.3, 1.0), flip=True)
    record = preprocess_record(rrc, transform.normalize, eval_transform=transform)
    anycnn.save(model, tmp_path / "m.safetensors", extra={"config": {"preprocess": record}})
    _, checkpoint = anycnn.load_model(tmp_path / "m.safetensors")
    saved = checkpoint.config["preprocess"]
    assert read_preprocess(saved) == (rrc, transform.normalize)
    assert read_eval_transform(saved) == transform
    # older records: no eval entry, a padded-crop augment
    old = {"augment": {"crop": 4, "flip": True, "padding_mode": "zeros"}, "normalize": None}
    assert read_preprocess(old) == (Augment(4, True), None) and read_eval_transform(old) is None
    # contradictions and junk are refused as malformed
    with pytest.raises(CheckpointError, match="differ"):
        read_eval_transform({**saved, "normalize": None})
    with pytest.raises(CheckpointError, match="malformed"):
        read_eval_transform({**saved, "eval": {"resize": 20}})
    with pytest.raises(CheckpointError, match="malformed"):
        read_preprocess({**saved, "augment": {**rrc.to_record(), "kind": "mixup"}})


def test_trainer_record_without_image_keys_is_not_refused(tmp_path):
    """A Trainer run from Python records {"augment": null, "normalize": null}; predict makes
    the image keys from the model spec (once refused as 'malformed')."""
    model = anycnn.models.build_model({"name": "lenet5", "num_classes": 3, "in_channels": 3,
                                       "image_size": 16})
    norm = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    for given, normalised in [({"augment": None, "normalize": None}, None),
                              (preprocess_record(None, norm), norm)]:
        anycnn.save(model, tmp_path / "t.safetensors", extra={"config": {"preprocess": given}})
        loaded, checkpoint = anycnn.load_model(tmp_path / "t.safetensors")
        record, recorded = preprocess_of(checkpoint, loaded)
        assert not recorded and record["image_size"] == [16, 16] and record["channels"] == 3
        assert read_preprocess(record)[1] == normalised
    files = [photo(tmp_path / "p.png", 0, (16, 16))]
    np.testing.assert_array_equal(
        prepare(files, record),
        norm.apply(anycnn.data.images.load_images(files, 16, 3) / np.float32(255)))


# ----------------------------------------------------------------------- the command line


@pytest.fixture
def photos(tmp_path) -> Path:
    """A flat folder of 3 classes, 8 images each, of several sizes and aspect ratios."""
    sizes = [(24, 30), (31, 22), (26, 26), (22, 40)]
    for c, name in enumerate(("ant", "bee", "cow")):
        for i in range(8):
            photo(tmp_path / "photos" / name / f"{i}.png", 100 * c + i, sizes[(i + c) % 4],
                  level=60 + 60 * c)
    return tmp_path / "photos"


def test_train_evaluate_predict_use_the_recorded_preprocessing(backend, capsys, photos,
                                                                tmp_path):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--dataset", photos, "--model", "lenet5",
                       "--preprocess", "imagenet,resize=20,crop=16", "--augment", "rrc,flip",
                       "--epochs", 1, "--batch-size", 8, "--quiet", "--out", out)
    assert code == 0, err
    model, checkpoint = anycnn.load_model(out / "checkpoint.safetensors")
    config = checkpoint.config
    assert model.model_spec["image_size"] == 16
    assert config["preprocess_spec"] == "imagenet,resize=20,crop=16"
    assert config["augment"] == "rrc=16,flip" and config["normalize"] == "imagenet"
    record = config["preprocess"]
    assert record["version"] == 2 and record["image_size"] == [16, 16]
    transform = read_eval_transform(record)
    assert transform == EvalTransform(20, 16, IMAGENET_MEAN, IMAGENET_STD)
    assert read_preprocess(record)[0] == RandomResizedCrop(16, flip=True)

    # evaluate: the recorded folder, split and transform: the run's own validation figures
    code, text, err = cli(capsys, "evaluate", out, "--split", "val", "--json")
    assert code == 0, err
    report = json.loads(text)
    history = json.loads((out / "history.json").read_text())[-1]
    assert report["dataset"] == str(photos.resolve()) and report["count"] == 2
    assert math.isclose(report["loss"], history["val_loss"], rel_tol=1e-6)

    # predict: the photos of any size, prepared by the transform, as predict_proba on the
    # reference pixels (resize shorter side, centre crop, normalise)
    files = sorted(photos.rglob("*.png"))[::5]
    code, text, err = cli(capsys, "predict", out, *files, "--json", "--top-k", 3)
    assert code == 0, err
    reference = np.stack([reference_eval(f, 20, 16, IMAGENET_MEAN, IMAGENET_STD)[1]
                          for f in files]).astype(np.float32)
    expected = anycnn.predict_proba(model, reference)
    for row, prediction in zip(expected, json.loads(text)["predictions"], strict=True):
        got = {e["index"]: e["probability"] for e in prediction["top_k"]}
        np.testing.assert_allclose([got[i] for i in range(3)], row, rtol=1e-4, atol=1e-6)

    # another dataset is refused, never evaluated silently; so is a folder that moved
    code, _, err = cli(capsys, "evaluate", out, "--dataset", "mnist-sample")
    one_line_error(code, err, "10 classes", "has 3")
    photos.rename(tmp_path / "moved")
    code, _, err = cli(capsys, "evaluate", out)
    one_line_error(code, err, "no such directory", "pass --dataset")
    code, _, err = cli(capsys, "evaluate", out, "--dataset", tmp_path / "moved", "--split", "val")
    assert code == 0, err


def test_evaluate_a_python_checkpoint_needs_its_dataset(backend, capsys, photos, tmp_path):
    data = load_image_folder(photos, size=16, channels=3)
    model = anycnn.models.build_model({"name": "lenet5", "num_classes": 3, "in_channels": 3,
                                       "image_size": 16})
    trainer = anycnn.train.Trainer(model, anycnn.optim.Adam(model.parameters(), lr=1e-3),
                                   model_spec=model.model_spec, progress=False,
                                   checkpoint_path=tmp_path / "py.safetensors")
    trainer.fit(DataLoader(data.train, 8), epochs=1)
    code, _, err = cli(capsys, "evaluate", tmp_path / "py.safetensors")
    one_line_error(code, err, "records no dataset", "--dataset")
    code, text, err = cli(capsys, "evaluate", tmp_path / "py.safetensors", "--dataset", photos,
                          "--split", "val", "--json")
    assert code == 0, err
    want = anycnn.train.evaluate(model, DataLoader(data.val, 256))
    assert math.isclose(json.loads(text)["loss"], want["loss"], rel_tol=1e-6)
    code, _, err = cli(capsys, "predict", tmp_path / "py.safetensors", sorted(photos.rglob(
        "*.png"))[0], "--top-k", 1)
    assert code == 0 and "records no preprocessing" in err


def test_cli_preprocess_mistakes_are_one_line(capsys, photos, tmp_path):
    for argv, words in [
            (["--preprocess", "crop=3"], "give both resize=R and crop=S"),
            (["--preprocess", "resize=8,crop=9"], "crop <= resize"),
            (["--preprocess", "imagenet", "--image-size", 16], "--image-size and --preprocess"),
            (["--dataset", "mnist-sample", "--preprocess", "imagenet"],
             "--preprocess applies only to image folders"),
            (["--image-size", 16, "--augment", "rrc=12"], "12x12 training images")]:
        dataset = [] if "--dataset" in argv else ["--dataset", photos]
        code, _, err = cli(capsys, "train", *dataset, *argv, "--epochs", 1, "--quiet",
                           "--out", tmp_path / "bad")
        one_line_error(code, err, words)
