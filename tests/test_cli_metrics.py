"""``anycnn evaluate`` metrics (``--json``, ``--top-k``, ``--confusion-plot``, the short plain
report) and ``anycnn plot`` on an evaluate JSON, on the backend under test. The JSON must equal
what Python's ``evaluate`` returns; mistakes are one line ``anycnn: error: ...``, status 2."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

import anycnn
from anycnn import backend as backend_module
from anycnn import optim
from anycnn.cli.commands import main
from anycnn.data.dataloader import DataLoader
from anycnn.data.datasets import CLASS_NAMES, load_dataset
from anycnn.io.checkpoint import load_model
from anycnn.models import build_model
from anycnn.train.metrics import to_json, worst_classes
from anycnn.train.trainer import Trainer, evaluate

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch, backend):
    """Run in a scratch folder on the backend under test; put the current backend back."""
    monkeypatch.chdir(tmp_path)
    saved = backend_module._current
    yield
    backend_module._current = saved


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """lenet5 after a few steps on 256 sample images, saved with anycnn.save (NumPy) with the
    dataset recorded as anycnn train records it (evaluate needs it, or --dataset)."""
    path = tmp_path_factory.mktemp("ckpt") / "lenet5.safetensors"
    with anycnn.use_backend("numpy"):
        anycnn.manual_seed(0)
        model = build_model("lenet5")
        train = load_dataset("mnist-sample").train.subset(np.arange(256))
        Trainer(model, optim.Adam(model.parameters(), lr=3e-3), progress=False).fit(
            DataLoader(train, 32, shuffle=True))
        anycnn.save(model, path, extra={"config": {"dataset": "mnist-sample"}})
    return path


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("anycnn: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


def python_evaluate(checkpoint, top_k=(1, 5)) -> dict:
    model, _ = load_model(checkpoint)
    data = load_dataset("mnist-sample")
    return evaluate(model, DataLoader(data.test, 256), top_k=top_k, confusion=True,
                    class_names=data.class_names)


def test_json_is_one_object_equal_to_python_evaluate(capsys, checkpoint):
    code, out, err = cli(capsys, "evaluate", checkpoint, "--json")
    assert code == 0, err
    assert out.count("\n") == 1  # one line, one object
    report = json.loads(out)
    expected = to_json(python_evaluate(checkpoint))
    assert set(report) == {"checkpoint", "dataset", "split", *expected}
    assert (report["checkpoint"], report["dataset"], report["split"]) == (
        str(checkpoint), "mnist-sample", "test")
    assert report["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    for key in ("accuracy", "count", "top_k_accuracy", "class_names", "confusion_matrix"):
        assert report[key] == expected[key], key
    assert report["per_class"] == expected["per_class"]  # ratios of counts: exact
    assert set(report["top_k_accuracy"]) == {"1", "5"}
    assert report["top_k_accuracy"]["1"] == report["accuracy"]
    assert report["class_names"] == list(CLASS_NAMES["mnist"])
    assert [c["name"] for c in report["per_class"]] == report["class_names"]
    assert np.sum(report["confusion_matrix"]) == report["count"] == 2000
    assert sum(c["count"] for c in report["per_class"]) == 2000


def test_plain_output_adds_top5_and_worst_classes(capsys, checkpoint):
    code, out, err = cli(capsys, "evaluate", checkpoint)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 3, out
    assert re.fullmatch(r"mnist-sample test: loss \d+\.\d{4} accuracy (0\.\d{4}|1\.0000) "
                        r"\(2000 images\)", lines[0]), out
    result = python_evaluate(checkpoint)
    assert lines[1] == f"top-5 accuracy {result['top_k_accuracy'][5]:.4f}"
    worst = ", ".join(f"{name} {acc:.4f}" for name, acc in worst_classes(result, 3))
    assert lines[2] == f"worst classes: {worst}"


def test_top_k_option(capsys, checkpoint):
    code, out, err = cli(capsys, "evaluate", checkpoint, "--json", "--top-k", "3,2")
    assert code == 0, err
    report = json.loads(out)
    expected = python_evaluate(checkpoint, top_k=(2, 3))["top_k_accuracy"]
    assert report["top_k_accuracy"] == {"2": expected[2], "3": expected[3]}
    code, out, err = cli(capsys, "evaluate", checkpoint, "--top-k", "2,3")
    assert code == 0, err
    assert out.splitlines()[1] == (f"top-2 accuracy {expected[2]:.4f}, "
                                   f"top-3 accuracy {expected[3]:.4f}")


@pytest.mark.parametrize("value, fragments", [
    ("11", ["top-11", "only 10 classes"]),
    ("1,0", ["positive integers", "0"]),
    ("five", ["--top-k", "'five'"]),
])
def test_bad_top_k_is_one_line(capsys, checkpoint, value, fragments):
    code, _, err = cli(capsys, "evaluate", checkpoint, "--top-k", value)
    assert_usage_error(code, err, *fragments)


def test_custom_model_file_says_to_use_load_weights(capsys, tmp_path):
    model = anycnn.Sequential(anycnn.nn.Flatten(), anycnn.nn.Dense(784, 10))
    path = anycnn.save(model, tmp_path / "mine.safetensors")
    code, _, err = cli(capsys, "evaluate", path, "--json")
    assert_usage_error(code, err, "no model_spec", "anycnn.load_weights(model, ")


# --------------------------------------------------------------------------------------------
# confusion-matrix pictures


def test_confusion_plot_from_evaluate_and_from_its_json(capsys, checkpoint, tmp_path):
    pytest.importorskip("matplotlib")
    code, out, err = cli(capsys, "evaluate", checkpoint, "--json", "--confusion-plot",
                         tmp_path / "cm.png")
    assert code == 0, err
    json.loads(out)  # stdout stays one JSON object; the note goes to stderr
    assert err.strip() == f"wrote {tmp_path / 'cm.png'}"
    assert (tmp_path / "cm.png").read_bytes()[:8] == PNG
    (tmp_path / "eval.json").write_text(out)
    code, out, err = cli(capsys, "plot", tmp_path / "eval.json", "-o", tmp_path / "again.png")
    assert code == 0, err
    assert out.strip() == f"wrote {tmp_path / 'again.png'}"
    assert (tmp_path / "again.png").read_bytes()[:8] == PNG


def test_confusion_plot_with_long_class_names(tmp_path):
    pytest.importorskip("matplotlib")
    from anycnn.cli.plot import plot_confusion

    matrix = np.arange(100).reshape(10, 10)
    written = plot_confusion(matrix, CLASS_NAMES["fashion-mnist"], tmp_path / "f.svg")
    svg = written.read_text()
    assert "Ankle boot" in svg and "T-shirt/top" in svg and "predicted class" in svg


@pytest.mark.parametrize("content, fragments", [
    ({"confusion_matrix": [[1, 2], [3]]}, ["confusion_matrix"]),
    ({"confusion_matrix": [[1, 2], [3, 4]], "class_names": ["a"]}, ["1 class names", "2x2"]),
    ({"loss": 1.0}, ["epoch records", "evaluate --json"]),
])
def test_plot_refuses_malformed_json(capsys, tmp_path, content, fragments):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    code, _, err = cli(capsys, "plot", path, "-o", tmp_path / "x.png")
    assert_usage_error(code, err, *fragments)
    assert not (tmp_path / "x.png").exists()


def test_confusion_plot_without_matplotlib_fails_before_evaluating(capsys, checkpoint,
                                                                   tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setattr("anycnn.train.trainer.evaluate", lambda *a, **k: pytest.fail("evaluated"))
    code, _, err = cli(capsys, "evaluate", checkpoint, "--confusion-plot", tmp_path / "cm.png")
    assert_usage_error(code, err, "matplotlib", "pip install")
    assert not (tmp_path / "cm.png").exists()
