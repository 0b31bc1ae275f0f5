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
    ("filename,sand,sea,sky\na.png,1,0,1\n", "4 column.*one-hot.*separated by ';'.*path,labels"),
    ('a.png,"sea,sky"\n', "line 1: the labels 'sea,sky' hold a comma; labels are separated by ';'"),
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


def test_evaluate_uses_the_pos_weight_the_run_trained_with(capsys, tmp_path):
    make_multilabel_folder(tmp_path / "pics")
    code, _, err = cli(capsys, "train", "--dataset", tmp_path / "pics", "--multi-label",
                       "--class-weights", "4,0.25,3", "--val-split", "0.5", "--model",
                       "simple-cnn", "--epochs", "1", "--quiet", "--out", tmp_path / "run")
    assert code == 0, err
    val_loss = json.loads((tmp_path / "run" / "history.json").read_text())[-1]["val_loss"]
    code, out, err = cli(capsys, "evaluate", tmp_path / "run", "--split", "val", "--json")
    assert code == 0, err
    assert json.loads(out)["loss"] == pytest.approx(val_loss, rel=1e-4)


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


# -- a multi-label run through predict and evaluate (issue 26, new-user trial) -----------------


@pytest.fixture
def multilabel_run(capsys, tmp_path):
    """A one-epoch multi-label run on a folder of 8x8 RGB images: ``(folder, run folder)``."""
    make_multilabel_folder(tmp_path / "pics", n=32)
    code, _, err = cli(capsys, "train", "--dataset", tmp_path / "pics", "--multi-label",
                       "--model", "simple-cnn", "--epochs", "1", "--batch-size", "8", "--quiet",
                       "--out", tmp_path / "run")
    assert code == 0, err
    return tmp_path / "pics", tmp_path / "run"


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def test_the_checkpoint_records_the_multi_label_flag(multilabel_run):
    _, run = multilabel_run
    ckpt = load_checkpoint(run / "checkpoint.safetensors")
    assert ckpt.preprocess["multi_label"] is True and ckpt.multi_label
    assert ckpt.config["multi_label"] == ""  # the folder's labels.csv


def test_multi_label_flag_of_older_and_single_label_checkpoints():
    from anycnn.data.augment import preprocess_record
    from anycnn.io.checkpoint import Checkpoint

    def ckpt(config):
        return Checkpoint({}, None, {}, extra={"config": config})

    record = preprocess_record(None, None)
    assert "multi_label" not in record  # single-label records are as before
    assert not ckpt({"preprocess": record}).multi_label  # missing: single-label
    assert not ckpt({}).multi_label and not ckpt({"multi_label": None}).multi_label
    # a run of anycnn train --multi-label from before the flag was recorded
    assert ckpt({"preprocess": record, "multi_label": ""}).multi_label
    assert ckpt({"preprocess": {**record, "multi_label": True}}).multi_label
    assert not ckpt({"preprocess": {**record, "multi_label": False}, "multi_label": ""}
                    ).multi_label
    assert preprocess_record(None, None, multi_label=True)["multi_label"] is True


def test_predict_reports_per_label_sigmoids_and_the_labels_above_the_threshold(
        capsys, multilabel_run):
    import anycnn
    from anycnn.cli.predict import prepare

    pics, run = multilabel_run
    images = [str(pics / "a" / "0.png"), str(pics / "b" / "1.png"), str(pics / "a" / "2.png")]
    model, ckpt = anycnn.load_model(run / "checkpoint.safetensors")
    want = sigmoid(anycnn.predict(model, prepare(images, ckpt.preprocess)))  # (3, 3) float64
    for threshold in (None, "0.3", "0.9"):
        extra = ["--threshold", threshold] if threshold else []
        code, out, err = cli(capsys, "predict", run, *images, "--json", *extra)
        assert code == 0, err
        report = json.loads(out)
        t = float(threshold or 0.5)
        assert report["threshold"] == t and report["preprocess"]["multi_label"] is True
        for row, p in zip(report["predictions"], want):
            got = {e["name"]: e["probability"] for e in row["top_k"]}
            assert list(got) == [NAMES[i] for i in np.argsort(-p, kind="stable")]
            np.testing.assert_allclose([got[n] for n in NAMES], p, rtol=1e-5)
            assert row["labels"] == [n for n in got if got[n] >= t]
    code, out, err = cli(capsys, "predict", run, images[0], "--format", "csv", "--top-k", "1")
    assert code == 0, err
    header, line = out.splitlines()
    assert header == "path,labels,class,index,probability,error"
    expected = [NAMES[i] for i in np.argsort(-want[0], kind="stable") if want[0][i] >= 0.5]
    assert line.split(",")[1] == ";".join(expected)
    code, out, err = cli(capsys, "predict", run, images[0])
    assert code == 0, err
    assert out.splitlines()[1] == f"  labels: {', '.join(expected) or '(none)'}"
    assert "(label " in out and "(class " not in out


def test_python_prediction_of_a_multi_label_model(backend, multilabel_run):
    import anycnn
    from anycnn.cli.predict import prepare

    pics, run = multilabel_run
    model, ckpt = anycnn.load_model(run / "checkpoint.safetensors")
    x = prepare([str(pics / "a" / "0.png"), str(pics / "b" / "1.png")], ckpt.preprocess)
    logits = anycnn.predict(model, x)
    probs = anycnn.predict_proba(model, x, multi_label=ckpt.multi_label)
    np.testing.assert_allclose(probs, sigmoid(logits), rtol=1e-6)
    assert not np.allclose(probs.sum(axis=1), 1.0)  # sigmoids, not a softmax
    index, p = anycnn.predict_topk(model, x, k=2, multi_label=True)
    np.testing.assert_array_equal(index, np.argsort(-logits, axis=1, kind="stable")[:, :2])
    np.testing.assert_allclose(p, np.take_along_axis(probs, index, axis=1))
    # load_model marked the model: without multi_label, sigmoids too; False: a softmax
    assert model.multi_label is True
    np.testing.assert_array_equal(anycnn.predict_proba(model, x), probs)
    np.testing.assert_array_equal(anycnn.predict_topk(model, x, k=2)[1], p)
    np.testing.assert_allclose(anycnn.predict_proba(model, x, multi_label=False).sum(axis=1),
                               1.0, rtol=1e-6)


def test_evaluate_a_multi_label_run(capsys, multilabel_run):
    pics, run = multilabel_run
    history = json.loads((run / "history.json").read_text())
    code, out, err = cli(capsys, "evaluate", run, "--json")
    assert code == 0, err
    report = json.loads(out)
    # the recorded folder and labels file, the run's loss: its validation loss again
    assert report["dataset"] == str(pics.resolve()) and report["count"] == 3
    assert report["loss"] == pytest.approx(history[-1]["val_loss"], rel=1e-6)
    assert report["accuracy"] == pytest.approx(history[-1]["val_accuracy"])
    metrics = report["multi_label"]
    assert [c["name"] for c in metrics["per_class"]] == list(NAMES)
    assert {"mAP", "macro_f1", "micro_f1", "subset_accuracy"} <= set(metrics)
    assert metrics["label_accuracy"] == pytest.approx(report["accuracy"])
    code, out, err = cli(capsys, "evaluate", run)
    assert code == 0, err
    assert "label accuracy" in out and "mAP" in out and "lowest AP" in out
    # data given explicitly, with --multi-label and a threshold
    code, out, err = cli(capsys, "evaluate", run, "--dataset", pics, "--multi-label",
                         pics / "labels.csv", "--split", "train", "--threshold", "0.7")
    assert code == 0, err
    assert out.startswith(f"{pics} train: ") and "(29 images, 3 labels, threshold 0.7)" in out


@pytest.mark.parametrize("argv, match", [
    (["--top-k", "1"], "--top-k is for single-label models"),
    (["--confusion-plot", "c.png"], "--confusion-plot is for single-label models"),
])
def test_evaluate_multi_label_refuses_single_label_options(capsys, multilabel_run, argv, match):
    _, run = multilabel_run
    code, _, err = cli(capsys, "evaluate", run, *argv)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1


def test_an_exported_multi_label_model_predicts_sigmoids_too(capsys, multilabel_run):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pics, run = multilabel_run
    image = pics / "a" / "0.png"
    code, _, err = cli(capsys, "export", run, run / "model.onnx")
    assert code == 0, err
    reports = []
    for source in (run, run / "model.onnx"):
        code, out, err = cli(capsys, "predict", source, image, "--json")
        assert code == 0, err
        reports.append(json.loads(out))
    assert reports[1]["preprocess"]["multi_label"] is True  # carried in the file's metadata
    (ours,), (theirs,) = (r["predictions"] for r in reports)
    assert theirs["labels"] == ours["labels"]
    np.testing.assert_allclose([e["probability"] for e in theirs["top_k"]],
                               [e["probability"] for e in ours["top_k"]], rtol=1e-5)


def test_auto_pos_weight_warns_about_a_label_without_positives(capsys):
    from argparse import Namespace

    from anycnn.cli.losses import make_loss

    targets = np.array([[1, 0, 0], [1, 0, 1], [0, 0, 1], [0, 0, 0]], np.float32)
    data = Namespace(train=Namespace(labels=targets), num_classes=3, class_names=NAMES,
                     name="scenes")
    args = Namespace(loss="bce", class_weights="auto", label_smoothing=0.0)
    make_loss(args, data)
    assert args.class_weights == [1.0, 1.0, 1.0]  # sea: no positive, falls back to 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no positive of sea " in err[0] and "pos_weight 1" in err[0], err
    targets[0, 1] = 1
    make_loss(Namespace(loss="bce", class_weights="auto", label_smoothing=0.0), data)
    assert capsys.readouterr().err == ""


def test_a_relative_labels_file_is_found_in_the_dataset_folder(capsys, tmp_path):
    """``--multi-label tags.csv``: not in the current folder but in the dataset's, so that one
    (recorded as its absolute path); a path found nowhere is the loader's clear error."""
    make_multilabel_folder(tmp_path / "pics")
    (tmp_path / "pics" / "labels.csv").rename(tmp_path / "pics" / "tags.csv")
    argv = ["train", "--dataset", tmp_path / "pics", "--model", "simple-cnn", "--epochs", "1",
            "--quiet", "--out", tmp_path / "run"]
    code, _, err = cli(capsys, *argv, "--multi-label", "tags.csv")
    assert code == 0, err
    config = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors").config
    assert config["multi_label"] == str((tmp_path / "pics" / "tags.csv").resolve())
    code, _, err = cli(capsys, *argv, "--multi-label", "other.csv")
    assert code != 0 and "other.csv" in err and "Traceback" not in err, err


def test_mixing_note_speaks_of_label_accuracy(capsys, tmp_path):
    from anycnn.cli.train import MIXED_ACCURACY, MIXED_LABEL_ACCURACY

    make_multilabel_folder(tmp_path / "pics")
    code, out, err = cli(capsys, "train", "--dataset", tmp_path / "pics", "--multi-label",
                         "--augment", "mixup", "--model", "simple-cnn", "--epochs", "1",
                         "--out", tmp_path / "run")
    assert code == 0, err
    lines = out.splitlines()
    assert MIXED_LABEL_ACCURACY in lines and MIXED_ACCURACY not in lines
    assert "top class" not in out and "label accuracy" in MIXED_LABEL_ACCURACY

