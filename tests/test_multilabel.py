"""Multi-label image folders (a labels file of ``path,label1;label2`` rows) and the loss options
of ``anycnn train``: ``--multi-label``, ``--loss``, ``--class-weights``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anycnn.data.multilabel import load_multilabel_folder, read_labels_file
from anycnn.errors import DataError
from anycnn.io.checkpoint import load_checkpoint

from .cli_run import cli, isolated  # noqa: F401 (an autouse fixture)

Image = pytest.importorskip("PIL.Image")
NAMES = ("sand", "sea", "sky")


def make_multilabel_folder(root: Path, n=24, seed=0) -> dict[str, tuple[str, ...]]:
    """``n`` 8x8 RGB images in two subfolders and ``labels.csv``; returns path -> labels."""
    rng = np.random.default_rng(seed)
    rows, truth = ["path,labels", "# a comment", ""], {}
    for i in range(n):
        rel = f"{'ab'[i % 2]}/{i}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / rel)
        labels = tuple(name for name in NAMES if rng.random() < 0.5)
        truth[rel] = labels
        rows.append(f"{rel},{' ; '.join(labels)}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return truth


def test_labels_file_and_targets(tmp_path):
    truth = make_multilabel_folder(tmp_path / "pics")
    rows, classes = read_labels_file(tmp_path / "pics" / "labels.csv")
    assert classes == NAMES and len(rows) == len(truth)
    data = load_multilabel_folder(tmp_path / "pics", val_split=0.25)
    assert data.class_names == NAMES and data.train.multi_label
    assert len(data.train) + len(data.val) == len(truth) and len(data.val) == 6
    assert data.train.labels.shape == (18, 3) and data.train.labels.dtype == np.float32
    # every image's row of targets is the one its file lists: find each by its pixels
    by_pixels = {np.asarray(Image.open(tmp_path / "pics" / rel)).tobytes(): labels
                 for rel, labels in truth.items()}
    for split in (data.train, data.val):
        for image, target in zip(split.images, split.labels):
            expected = by_pixels[np.asarray(image).tobytes()]
            assert tuple(n for n, t in zip(NAMES, target) if t) == expected


@pytest.mark.parametrize("text, match", [
    ("a.png\n", "2 columns"),
    ("missing.png,sky\n", "not found"),
    ("a.png,sky\na.png,sea\n", "listed twice"),
    ("path,labels\n", "lists no image"),
])
def test_labels_file_errors(tmp_path, text, match):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(DataError, match=match):
        read_labels_file(tmp_path / "labels.csv")


def test_train_multilabel_from_the_command_line(capsys, tmp_path):
    make_multilabel_folder(tmp_path / "pics")
    code, _, err = cli(capsys, "train", "--dataset", tmp_path / "pics", "--multi-label",
                         "--class-weights", "auto", "--model", "simple-cnn", "--epochs", "1",
                         "--batch-size", "8", "--quiet", "--out", tmp_path / "run")
    assert code == 0, err
    config = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors").config
    assert config["loss"] == "bce" and config["multi_label"] == ""
    assert len(config["class_weights"]) == 3  # auto resolved: negatives / positives
    assert json.loads((tmp_path / "run" / "history.json").read_text())[0]["val_accuracy"] <= 1
    code, _, err = cli(capsys, "train", "--dataset", tmp_path / "pics", "--multi-label",
                       "--loss", "focal", "--model", "simple-cnn", "--epochs", "1", "--quiet",
                       "--out", tmp_path / "focal")
    assert code == 0, err


@pytest.mark.parametrize("argv, match", [
    (["--multi-label", "--loss", "ce"], "--loss ce takes one class"),
    (["--loss", "bce"], "add --multi-label"),
    (["--loss", "focal", "--multi-label", "--class-weights", "auto"], "focal"),
    (["--class-weights", "1,x"], "numbers separated by commas"),
    (["--class-weights", "1,-2"], ">= 0"),
    (["--multi-label", "--loss", "bce", "--label-smoothing", "0.1"], "--label-smoothing"),
    (["--class-weights", "1,2,3"], "3 value"),
    (["--multi-label"], "image folders"),
])
def test_loss_option_errors(capsys, argv, match):
    code, _, err = cli(capsys, "train", "--epochs", "1", "--limit", "64", "--quiet", *argv)
    assert code != 0 and match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
