"""A checkpoint written by each way of training — the CLI, ``Trainer`` from Python and
``anycnn.save`` — works with ``anycnn predict`` and ``anycnn export`` (issue 26's first item:
``Trainer`` checkpoints used to be refused for want of a model spec or preprocess record)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import anycnn
from anycnn.data import ArrayDataset, DataLoader
from anycnn.models import build_model
from anycnn.nn import SoftmaxCrossEntropy
from anycnn.optim import Adam
from anycnn.train import Trainer

from .cli_run import cli, isolated  # noqa: F401 - isolated: every test's fixture

Image = pytest.importorskip("PIL.Image")


def _written(way: str, tmp_path, capsys):
    path = tmp_path / f"{way}.safetensors"
    rng = np.random.default_rng(0)
    images = rng.random((64, 28, 28, 1)).astype(np.float32)
    labels = rng.integers(0, 10, 64)
    if way == "cli":
        code, _, err = cli(capsys, "train", "--epochs", "1", "--limit", "64", "--quiet",
                           "--out", tmp_path / "run", "--backend", "numpy")
        assert code == 0, err
        return tmp_path / "run" / "checkpoint.safetensors", images
    with anycnn.use_backend("numpy"):
        model = build_model("lenet5")
        if way == "trainer":
            data = ArrayDataset(images, labels, 10)
            trainer = Trainer(model, Adam(model.parameters()), SoftmaxCrossEntropy(),
                              checkpoint_path=path, progress=False)
            trainer.fit(DataLoader(data, 32, shuffle=True), DataLoader(data, 32), epochs=1)
        else:
            anycnn.save(model, path)
    return path, images


@pytest.mark.parametrize("way", ["cli", "trainer", "save"])
def test_predict_and_export_take_every_checkpoint(way, tmp_path, capsys):
    path, images = _written(way, tmp_path, capsys)
    Image.fromarray((images[0, ..., 0] * 255).astype(np.uint8)).save(tmp_path / "digit.png")
    code, out, err = cli(capsys, "predict", path, tmp_path / "digit.png", "--backend", "numpy")
    assert code == 0 and "class" in out, err
    if importlib.util.find_spec("onnx") is not None:
        code, out, err = cli(capsys, "export", path, tmp_path / f"{way}.onnx",
                             "--backend", "numpy")
        assert code == 0 and "wrote" in out, err
