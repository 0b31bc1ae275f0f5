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


def _tiny_run(checkpoint_path):
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.random((16, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 16),
                        10)
    anycnn.manual_seed(0)
    model = build_model("lenet5")
    trainer = Trainer(model, Adam(model.parameters()), SoftmaxCrossEntropy(),
                      checkpoint_path=checkpoint_path, progress=False)
    return trainer, DataLoader(data, 8, shuffle=True)


def test_trainer_creates_the_checkpoint_folder(backend, tmp_path):
    # issue 26 (new-user trial): a missing folder failed only at the end of the first epoch;
    # like anycnn train's --out (and Keras' and Lightning's checkpoint callbacks) it is made
    path = tmp_path / "runs" / "deep" / "model.safetensors"
    trainer, loader = _tiny_run(path)
    trainer.fit(loader, epochs=1)
    assert path.is_file() and anycnn.load_model(path)[1].epoch == 1
    other = tmp_path / "elsewhere" / "again.safetensors"
    assert trainer.save(other) == other and other.is_file()


def test_an_unusable_checkpoint_folder_fails_before_the_first_step(backend, tmp_path):
    (tmp_path / "taken").write_text("a file where the folder should be")
    trainer, loader = _tiny_run(tmp_path / "taken" / "model.safetensors")
    with pytest.raises(anycnn.errors.CheckpointError,
                       match=r"cannot create the folder .*taken for the checkpoint .*: "
                             r".*taken is a file, not a folder$"):
        trainer.fit(loader, epochs=1)
    assert trainer.step == 0  # refused at the start, not after an epoch of training


def test_anycnn_save_into_a_missing_folder_says_so(backend, tmp_path):
    # anycnn.save is a plain write, as torch.save: the folder must exist, and the error says it
    with pytest.raises(anycnn.errors.CheckpointError,
                       match=r"the folder .*nowhere does not exist: create it first"):
        anycnn.save(build_model("lenet5"), tmp_path / "nowhere" / "model.safetensors")
    assert not (tmp_path / "nowhere").exists()


def test_load_model_takes_a_run_folder(backend, tmp_path, capsys):
    """``anycnn.load_model("runs/x")`` reads the folder's checkpoint.safetensors, as the
    command line does; a folder without one is named in the error."""
    path, _ = _written("cli", tmp_path, capsys)
    model, checkpoint = anycnn.load_model(path.parent)
    assert checkpoint.path == path and model.model_spec == anycnn.load_model(path)[0].model_spec
    (tmp_path / "empty").mkdir()
    with pytest.raises(anycnn.errors.CheckpointError, match=r"empty is a folder without "
                       r"checkpoint\.safetensors"):
        anycnn.load_model(tmp_path / "empty")
