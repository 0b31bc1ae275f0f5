"""``anycnn train --dataset FOLDER`` and ``anycnn predict CHECKPOINT IMAGE...`` end to end, on
small PNG/JPEG files generated into tmp_path, on the backend under test: the CLI's probabilities
equal ``anycnn.predict_proba`` on the arrays the dataset holds, the checkpoint records the
preprocessing, and mistakes are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import anycnn
from anycnn.cli.predict import prepare
from anycnn.data.augment import read_preprocess
from anycnn.data.imagefolder import ImageFolder, load_image_folder
from anycnn.data.images import load_images

from .cli_run import cli, isolated  # noqa: F401 - isolated: every test's fixture

Image = pytest.importorskip("PIL.Image")
ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--epochs", "1", "--batch-size", "8", "--quiet"]


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("anycnn: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


def save(path: Path, seed: int, size, mode: str) -> Path:
    """A random image with a class-dependent brightness, as PNG or JPEG by extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (*size, bands), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if bands == 1 else pixels, mode).save(path)
    return path


@pytest.fixture
def photos(tmp_path) -> Path:
    """A train/val folder of 3 classes: PNG and JPEG, RGB/RGBA/grayscale, several sizes."""
    root = tmp_path / "photos"
    kinds = [("png", (20, 20), "RGB"), ("jpg", (12, 14), "RGB"), ("png", (16, 16), "L"),
             ("png", (9, 17), "RGBA"), ("jpg", (30, 24), "L")]
    for split, count in (("train", 8), ("val", 3)):
        for c, name in enumerate(("ant", "bee", "cow")):
            for i in range(count):
                ext, size, mode = kinds[(i + c) % len(kinds)]
                save(root / split / name / f"{i}.{ext}", 1000 * c + 10 * i + len(split),
                     size, mode)
    return root


def val_files(root: Path) -> list[Path]:
    classes = ImageFolder(root / "train").classes
    return [path for path, _ in ImageFolder(root / "val", classes=classes).samples]


def test_train_on_a_folder_then_predict_gives_the_probabilities_of_predict(
        backend, capsys, photos, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--dataset", photos, "--model", "lenet5",
                       "--image-size", 16, "--channels", 3, "--augment", "crop,flip",
                       "--normalize", "auto", *QUICK, "--out", out)
    assert code == 0, err
    model, checkpoint = anycnn.load_model(out / "checkpoint.safetensors")
    config = checkpoint.extra["config"]
    assert config["dataset"] == str(photos.resolve())
    record = dict(config["preprocess"])
    normalize = record.pop("normalize")
    assert record == {"version": 1, "image_size": [16, 16], "channels": 3,
                      "resize": "bilinear", "scale": 255, "class_names": ["ant", "bee", "cow"],
                      "augment": {"crop": 2, "flip": True, "padding_mode": "zeros"}}
    assert len(normalize["mean"]) == len(normalize["std"]) == 3
    _, norm = read_preprocess(config["preprocess"])

    files = val_files(photos)
    assert {f.suffix for f in files} == {".png", ".jpg"}
    code, text, err = cli(capsys, "predict", out, *files, "--json", "--top-k", 3)
    assert code == 0, err
    report = json.loads(text)
    assert report["preprocess"] == config["preprocess"]
    assert [p["path"] for p in report["predictions"]] == [str(f) for f in files]

    data = load_image_folder(photos, size=16, channels=3)  # the arrays training used (cached)
    expected = anycnn.predict_proba(  # normalised as the training DataLoader did
        model, norm.apply(data.val.images.astype(np.float32) / np.float32(255)))
    assert expected.shape == (len(files), 3)
    for row, prediction in zip(expected, report["predictions"]):
        got = {entry["index"]: entry["probability"] for entry in prediction["top_k"]}
        assert sorted(got) == [0, 1, 2]
        np.testing.assert_allclose([got[i] for i in range(3)], row, rtol=1e-5, atol=1e-6)
        assert prediction["top_k"][0]["name"] == ("ant", "bee", "cow")[row.argmax()]
    # the Python way: the same pixels, so the same probabilities
    pixels = load_images(files, (16, 16), 3)
    np.testing.assert_array_equal(pixels, data.val.images)
    np.testing.assert_array_equal(prepare(files, config["preprocess"]),
                                  norm.apply(pixels.astype(np.float32) / np.float32(255)))

    code, text, err = cli(capsys, "predict", out, files[0], files[-1], "--top-k", 2)
    assert code == 0, err
    lines = text.splitlines()
    assert lines[0] == str(files[0]) and lines[3] == str(files[-1]) and len(lines) == 6
    assert all(line.startswith("  0.") and "(class " in line for line in lines[1:3] + lines[4:])

    code, _, err = cli(capsys, "evaluate", out, "--split", "val")  # same folder, same options
    assert code == 0, err
    code, _, err = cli(capsys, "train", "--dataset", photos, "--image-size", 12, *QUICK,
                       "--out", out, "--resume", "--epochs", 2)
    assert_one_line_error(code, err, "--image-size 16, not 12")


def test_a_bad_image_is_one_line_and_the_others_are_predicted(backend, capsys, photos,
                                                              tmp_path):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--dataset", photos, "--image-size", 12, *QUICK,
                       "--out", out)
    assert code == 0, err
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    good = val_files(photos)[:2]
    code, text, err = cli(capsys, "predict", out, good[0], notes, tmp_path / "gone.png",
                          good[1], "--top-k", 1)
    assert code == 1, err  # some failed: 1 at the end, after predicting the others
    assert err.splitlines() == [f"anycnn: error: {notes}: not an image file Pillow can read",
                                f"anycnn: error: {tmp_path / 'gone.png'}: no such file"]
    assert text.splitlines()[0::2] == [str(good[0]), str(good[1])]
    _, alone, _ = cli(capsys, "predict", out, *good, "--top-k", 1)
    assert text == alone  # the same predictions as without the bad files
    for argv, fragment in (([good[0], "--top-k", 4], "--top-k must be in [1, 3]"),
                           ([good[0], "--top-k", 0], "--top-k must be >= 1, got 0"),
                           ([good[0], "--batch-size", 0], "--batch-size must be >= 1, got 0")):
        code, text, err = cli(capsys, "predict", out, *argv)
        assert_one_line_error(code, err, fragment)  # a mistake in the command: status 2
        assert text == ""
    code, _, err = cli(capsys, "predict", tmp_path / "nothing.safetensors", good[0])
    assert_one_line_error(code, err, "nothing.safetensors")


def test_predict_refuses_a_non_image_in_a_real_process(tmp_path):
    model = anycnn.models.build_model("lenet5")
    anycnn.save(model, tmp_path / "m.safetensors")
    (tmp_path / "x.png").write_bytes(b"\x89PNG but not really")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ANYCNN_BACKEND": "numpy"}
    result = subprocess.run([sys.executable, "-m", "anycnn", "predict", "m.safetensors", "x.png"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "anycnn: error: x.png: not an image file Pillow can read")
    assert result.stdout == ""


@pytest.fixture
def named(tmp_path) -> Path:
    """A model for 12x12 RGB images saved with a preprocess record naming its classes."""
    anycnn.manual_seed(4)
    model = anycnn.models.build_model("lenet5", num_classes=3, in_channels=3, image_size=12)
    record = {"version": 1, "image_size": [12, 12], "channels": 3, "resize": "bilinear",
              "scale": 255, "normalize": None, "augment": None,
              "class_names": ["ant", "bee", "cow"]}
    path = tmp_path / "named.safetensors"
    anycnn.save(model, path, extra={"preprocess": record})
    return path


def test_predict_takes_folders_sorted_and_not_recursive(backend, capsys, named, tmp_path):
    folder = tmp_path / "shots"
    for i, name in enumerate(("b.png", "a.JPG", "c.webp", ".hidden.png", "sub/d.png")):
        save(folder / name, i, (15, 18), "RGB")
    (folder / "notes.txt").write_text("not an image, not listed")
    listed = [folder / "a.JPG", folder / "b.png", folder / "c.webp"]
    code, text, err = cli(capsys, "predict", named, folder, "--json")
    assert code == 0, err
    predictions = json.loads(text)["predictions"]
    assert [p["path"] for p in predictions] == [str(f) for f in listed]
    _, given, _ = cli(capsys, "predict", named, *listed, "--json")
    assert json.loads(given)["predictions"] == predictions  # the folder is its files
    model, _ = anycnn.load_model(named)
    expected = anycnn.predict_proba(model, load_images(listed, 12, 3))
    for row, prediction in zip(expected, predictions):
        assert prediction["index"] == int(row.argmax())
        assert prediction["class"] == ("ant", "bee", "cow")[row.argmax()]
        np.testing.assert_allclose(prediction["probability"], row.max(), rtol=1e-5)

    empty = tmp_path / "classes"
    for c in ("cat", "dog"):
        save(empty / c / "0.png", 1, (12, 12), "RGB")
    code, text, err = cli(capsys, "predict", named, empty, folder / "b.png")
    assert code == 1 and text.splitlines()[0] == str(folder / "b.png")
    line, = err.splitlines()
    assert line.startswith(f"anycnn: error: {empty}: folder holds no image files (.png")
    assert "its subfolders (cat/, dog/) are not searched" in line
    code, text, err = cli(capsys, "predict", named, str(empty / "*"))  # an unexpanded glob
    assert code == 1 and text == "" and "no such file" in err


def test_predict_writes_csv_and_json(backend, capsys, named, tmp_path):
    import csv

    files = [save(tmp_path / f"{i}.png", 20 + i, (12 + i, 14), "RGB") for i in range(5)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    argv = ["predict", named, *files[:2], bad, *files[2:], "--top-k", 2, "--batch-size", 2]
    code, text, err = cli(capsys, *argv, "--format", "csv")
    assert code == 1 and err.count("\n") == 1 and "bad.png" in err
    rows = list(csv.DictReader(text.splitlines()))
    assert list(rows[0]) == ["path", "class", "index", "probability", "class_2", "index_2",
                             "probability_2", "error"]
    assert [r["path"] for r in rows] == [str(f) for f in [*files[:2], bad, *files[2:]]]
    assert rows[2] == {"path": str(bad), **{k: "" for k in list(rows[0])[1:-1]},
                       "error": "not an image file Pillow can read"}
    code, _, _ = cli(capsys, *argv, "--output", tmp_path / "p.json")
    assert code == 1
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["predictions"][2] == {"path": str(bad),
                                        "error": "not an image file Pillow can read"}
    model, _ = anycnn.load_model(named)
    expected = anycnn.predict_proba(model, load_images(files, 12, 3))
    good = [p for p in report["predictions"] if "error" not in p]
    for row, prediction, line in zip(expected, good, [r for r in rows if not r["error"]]):
        order = np.argsort(-row, kind="stable")[:2]
        assert [e["index"] for e in prediction["top_k"]] == list(order)
        assert prediction["class"] == line["class"] == ("ant", "bee", "cow")[order[0]]
        assert line["class_2"] == ("ant", "bee", "cow")[order[1]]
        np.testing.assert_allclose([e["probability"] for e in prediction["top_k"]], row[order],
                                   rtol=1e-5, atol=1e-7)
        # the CSV holds the same numbers in full
        assert float(line["probability"]) == prediction["probability"]
        assert float(line["probability_2"]) == prediction["top_k"][1]["probability"]
        assert int(line["index"]) == prediction["index"] == order[0]
    code, out, _ = cli(capsys, *argv, "-o", tmp_path / "p.csv")
    assert code == 1 and out.strip() == f"wrote {tmp_path / 'p.csv'}: 5 predictions, 1 bad " \
        "image(s) or folder(s)"
    assert (tmp_path / "p.csv").read_text() == text
    code, out, _ = cli(capsys, *argv, "--json")
    assert json.loads(out) == report
    for extra, fragment in ((["-o", tmp_path / "p.txt"], "name a .csv or .json file"),
                            (["--json", "--format", "csv"], "--json is --format json"),
                            (["--format", "xml"], "invalid choice: 'xml'")):
        code, out, err = cli(capsys, *argv, *extra)
        assert_one_line_error(code, err, fragment)
        assert out == ""


def test_builtin_datasets_record_their_preprocessing_too(backend, capsys, tmp_path):
    out = tmp_path / "mnist"
    code, _, err = cli(capsys, "train", "--limit", 64, *QUICK, "--out", out)
    assert code == 0, err
    model, checkpoint = anycnn.load_model(out / "checkpoint.safetensors")
    record = checkpoint.extra["config"]["preprocess"]
    assert record["image_size"] == [28, 28] and record["channels"] == 1
    assert record["class_names"] == [str(d) for d in range(10)]
    digits = anycnn.data.datasets.load_dataset("mnist-sample").val.images[:3]
    files = [tmp_path / f"digit{i}.png" for i in range(3)]
    for pixels, path in zip(digits, files):
        Image.fromarray(pixels[..., 0]).save(path)
    code, text, err = cli(capsys, "predict", out, *files, "--json", "--top-k", 10)
    assert code == 0, err
    expected = anycnn.predict_proba(model, digits)
    for row, prediction in zip(expected, json.loads(text)["predictions"]):
        got = sorted((e["index"], e["probability"]) for e in prediction["top_k"])
        np.testing.assert_allclose([p for _, p in got], row, rtol=1e-5, atol=1e-7)


def test_a_checkpoint_without_a_record_falls_back_to_the_model_spec(backend, capsys, tmp_path):
    anycnn.manual_seed(3)
    model = anycnn.models.build_model("lenet5", num_classes=4)
    anycnn.save(model, tmp_path / "plain.safetensors")
    photo = save(tmp_path / "photo.jpg", 5, (40, 30), "RGB")
    code, text, err = cli(capsys, "predict", tmp_path / "plain.safetensors", photo, "--json")
    assert code == 0, err
    assert "records no preprocessing" in err and "grayscale, resized to 28x28" in err
    top = json.loads(text)["predictions"][0]["top_k"]
    assert len(top) == 4 and [e["name"] for e in top] == [str(e["index"]) for e in top]
    expected = anycnn.predict_proba(model, load_images([photo], 28, 1))[0]
    np.testing.assert_allclose([e["probability"] for e in top], np.sort(expected)[::-1],
                               rtol=1e-5, atol=1e-7)


def test_a_recorded_mean_and_std_are_applied(backend, capsys, tmp_path):
    model = anycnn.models.build_model("lenet5", num_classes=3, in_channels=3, image_size=12)
    record = {"version": 1, "image_size": [12, 12], "channels": 3, "resize": "bilinear",
              "scale": 255, "normalize": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]},
              "augment": None, "class_names": ["x", "y", "z"]}
    anycnn.save(model, tmp_path / "norm.safetensors", extra={"preprocess": record})
    photo = save(tmp_path / "p.png", 8, (20, 20), "RGB")
    code, text, err = cli(capsys, "predict", tmp_path / "norm.safetensors", photo, "--json")
    assert code == 0, err
    pixels = load_images([photo], 12, 3).astype(np.float32) / np.float32(255)
    normalised = (pixels - np.float32([0.5, 0.4, 0.3])) / np.float32([0.2, 0.25, 0.3])
    expected = anycnn.predict_proba(model, normalised)[0]
    top = json.loads(text)["predictions"][0]["top_k"]
    np.testing.assert_allclose([e["probability"] for e in top], np.sort(expected)[::-1],
                               rtol=1e-5, atol=1e-7)


def test_folder_mistakes_are_one_line(backend, capsys, tmp_path):
    root = tmp_path / "odd"
    for c in ("a", "b"):
        for i in range(3):
            save(root / c / f"{i}.png", i, (10, 14), "RGB")
    for argv, fragment in (
            (["--dataset", root], "the images are 10x14 (H x W), but the models take square "
                                  "images: pass --image-size N"),
            (["--dataset", tmp_path / "missing"], "no such directory"),
            (["--image-size", 8], "--image-size applies only to image folders"),
            (["--val-split", 0.2, "--channels", 1], "--channels, --val-split apply only"),
            (["--dataset", root, "--image-size", 12, "--val-split", 1.5],
             "--val-split must be a finite number in (0, 1), got 1.5"),
            (["--dataset", root, "--image-size", 12, "--data-dir", tmp_path], "--data-dir"),
            # reliability.md: a too-small image is a ShapeError naming the size and minimum
            (["--dataset", root, "--image-size", 8], "--image-size 8 is too small for lenet5: "
                                                     "it takes images of at least 12x12"),
            (["--dataset", root, "--preprocess", "resize=10,crop=10", "--model", "LeNet5"],
             "--preprocess crop 10 is too small for lenet5"),
            (["--dataset", root, "--image-size", 2, "--model", "simple-cnn"],
             "at least 4x4"),
            (["--dataset", root, "--image-size", 0], "--image-size must be >= 1, got 0")):
        code, _, err = cli(capsys, "train", *argv, *QUICK, "--out", tmp_path / "r")
        assert_one_line_error(code, err, fragment)
    for c in ("a", "b"):  # images too small for the model, without --image-size
        save(tmp_path / "tiny" / c / "0.png", 1, (8, 8), "L")
    code, _, err = cli(capsys, "train", "--dataset", tmp_path / "tiny", *QUICK)
    assert_one_line_error(code, err, "lenet5 takes images of at least 12x12, but the images "
                          "of", "are 8x8; pass --image-size 12 (or more) to resize them")
    for c in ("a", "b", "c"):
        save(tmp_path / "square" / c / "0.png", 1, (12, 12), "L")
    code, text, err = cli(capsys, "summary", "--dataset", tmp_path / "square")
    assert code == 0 and "3 classes" in text and "(None, 12, 12, 6)" in text, err


def test_skipped_images_are_a_warning_line(backend, capsys, photos, tmp_path):
    (photos / "train" / "ant" / "broken.png").write_bytes(b"garbage")
    code, _, err = cli(capsys, "train", "--dataset", photos, "--image-size", 12, *QUICK,
                       "--out", tmp_path / "r")
    assert_one_line_error(code, err, "broken.png", "--bad-images skip")
    code, _, err = cli(capsys, "train", "--dataset", photos, "--image-size", 12, *QUICK,
                       "--bad-images", "skip", "--out", tmp_path / "r")
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("anycnn: warning: ")]
    assert len(warning) == 1 and "skipped 1 of" in warning[0] and "broken.png" in warning[0]


def test_predict_without_pillow_says_how_to_install(capsys, tmp_path, monkeypatch):
    anycnn.save(anycnn.models.build_model("lenet5"), tmp_path / "m.safetensors")
    monkeypatch.setitem(sys.modules, "PIL", None)
    code, _, err = cli(capsys, "predict", tmp_path / "m.safetensors", tmp_path / "x.png")
    assert_one_line_error(code, err, "pip install 'anycnn[images]'")
