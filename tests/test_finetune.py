"""Fine-tuning from the CLI (issue 24): ``anycnn train --weights FILE --freeze ...`` on a
generated image folder, starting from a torchvision-format ``.safetensors`` file (written here
from an anycnn model in PyTorch's names and layouts, so no torch is needed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import anycnn
from anycnn.io import to_torch_state_dict
from anycnn.models import build_model

from .cli_run import cli, keep_backend

Image = pytest.importorskip("PIL.Image")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

CLASSES = ("cat", "dog", "owl")


@pytest.fixture(autouse=True)
def _keep_backend():
    with keep_backend():
        yield


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three classes told apart by their dominant colour, 16 photos each, of assorted sizes."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(16):
            h, w = rng.integers(36, 60, 2)
            pixels = rng.normal(60, 30, (h, w, 3))
            pixels[..., c] += 120
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A resnet18 weight file in torchvision's names and layouts (1000 classes)."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    with anycnn.use_backend("numpy"):
        anycnn.manual_seed(5)
        model = build_model("resnet18", num_classes=1000)
    safetensors_numpy.save_file({k: np.ascontiguousarray(v) for k, v in
                                 to_torch_state_dict(model).items()}, str(path))
    return path


def _torch_names(checkpoint: Path) -> dict[str, np.ndarray]:
    with anycnn.use_backend("numpy"):
        model, _ = anycnn.load_model(checkpoint)
        return to_torch_state_dict(model)


def test_freeze_backbone_trains_the_new_head_only(capsys, tmp_path, photos, weights):
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "train", "--model", "resnet18", "--weights", weights,
                            "--dataset", photos, "--image-size", 32, "--freeze", "backbone",
                            "--epochs", 3, "--lr", 0.01, "--batch-size", 16, "--out", out,
                            "--quiet", "--backend", "numpy")
    assert code == 0, err
    assert "replaced the classifier fc (1000 classes) with a new one for the dataset's 3" in \
        stdout
    trained = _torch_names(out / "checkpoint.safetensors")
    original = safetensors_numpy.load_file(str(weights))
    frozen = [k for k in original if not k.startswith("fc.")]
    assert frozen and all(np.array_equal(trained[k], original[k]) for k in frozen
                          if not k.endswith("num_batches_tracked"))
    assert trained["fc.weight"].shape == (3, 512)
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # the head learns

    code, stdout, err = cli(capsys, "evaluate", out / "checkpoint.safetensors", "--backend",
                            "numpy")
    assert code == 0, err
    code, stdout, err = cli(capsys, "predict", out / "checkpoint.safetensors",
                            photos / "owl" / "0.png", "--backend", "numpy")
    assert code == 0, err
    assert any(name in stdout for name in CLASSES)
    if importlib.util.find_spec("onnxruntime") is not None:  # the numpy session has it
        code, _, err = cli(capsys, "export", out / "checkpoint.safetensors", out / "m.onnx",
                           "--backend", "numpy")
        assert code == 0 and (out / "m.onnx").stat().st_size > 40_000_000, err
        code, onnx_out, err = cli(capsys, "predict", out / "m.onnx", photos / "owl" / "0.png")
        assert code == 0, err
        assert onnx_out.split()[:2] == stdout.split()[:2]  # the same top class and probability


def test_freeze_stages_and_unfreeze_at(capsys, tmp_path, photos, weights):
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "train", "--model", "resnet18", "--weights", weights,
                            "--dataset", photos, "--image-size", 32, "--freeze", 2,
                            "--epochs", 1, "--batch-size", 16, "--out", out, "--quiet",
                            "--backend", "numpy")
    assert code == 0, err
    trained = _torch_names(out / "checkpoint.safetensors")
    original = safetensors_numpy.load_file(str(weights))
    # stages 1-2 (the stem, layer1) are frozen; layer2 on trained
    assert np.array_equal(trained["conv1.weight"], original["conv1.weight"])
    assert np.array_equal(trained["layer1.0.conv1.weight"], original["layer1.0.conv1.weight"])
    assert np.array_equal(trained["layer1.0.bn1.running_mean"],
                          original["layer1.0.bn1.running_mean"])
    assert not np.array_equal(trained["layer2.0.conv1.weight"], original["layer2.0.conv1.weight"])

    # --unfreeze-at 2: the resumed run's second epoch trains everything
    code, stdout, err = cli(capsys, "train", "--model", "resnet18", "--weights", weights,
                            "--dataset", photos, "--image-size", 32, "--freeze", "backbone",
                            "--unfreeze-at", 2, "--epochs", 2, "--batch-size", 16,
                            "--out", tmp_path / "two", "--backend", "numpy")
    assert code == 0, err
    assert "epoch 2: unfrozen, training every parameter" in stdout
    trained = _torch_names(tmp_path / "two" / "checkpoint.safetensors")
    assert not np.array_equal(trained["conv1.weight"], original["conv1.weight"])


@pytest.mark.parametrize(("argv", "message"), [
    (("--freeze", "most"), "--freeze must be none, backbone or a number of stages"),
    (("--freeze", "-1"), "--freeze must be >= 0"),
    (("--unfreeze-at", "2"), "--unfreeze-at ends a --freeze phase"),
    (("--freeze", "backbone", "--unfreeze-at", "0"), "--unfreeze-at must be >= 1, got 0"),
    (("--lr-backbone", "0"), "--lr-backbone must be a finite number > 0"),
    (("--weights", "no/such.safetensors"), "--weights no/such.safetensors: no such file"),
    (("--freeze", "9"), "--freeze 9: resnet18 has 5 stages"),
])
def test_bad_options_are_one_line_errors(capsys, tmp_path, photos, weights, argv, message):
    if "--weights" not in argv:
        argv = ("--weights", weights, *argv)
    code, _, err = cli(capsys, "train", "--model", "resnet18", "--dataset", photos,
                       "--image-size", 32, "--epochs", 1, "--out", tmp_path / "x",
                       "--backend", "numpy", *argv)
    assert code != 0
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_weights_of_another_architecture_are_refused(capsys, tmp_path, photos, weights):
    code, _, err = cli(capsys, "train", "--model", "resnet34", "--weights", weights,
                       "--dataset", photos, "--image-size", 32, "--epochs", 1,
                       "--out", tmp_path / "x", "--backend", "numpy")
    assert code != 0 and "does not fit resnet34" in err


def test_lr_backbone_makes_two_groups():
    import argparse

    from anycnn.cli.finetune import head_parameters, parameter_groups
    from anycnn.cli.train import make_optimizer

    with anycnn.use_backend("numpy"):
        model = build_model("mobilenet_v3_small", num_classes=3)
        args = argparse.Namespace(lr_backbone=1e-4, lr=1e-2, weight_decay=0.0,
                                  optimizer="adam", momentum=None)
        groups = parameter_groups(args, model)
        head = {id(p) for p in head_parameters(model)}
        # the head is the whole classifier block (both Dense layers), at --lr
        assert head == {id(p) for p in model.classifier.parameters()}
        assert [g["name"] for g in groups] == ["backbone", "head"]
        assert {id(p) for p in groups[1]["params"]} == head
        optimizer = make_optimizer(args, model)
        assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 1e-2]
        optimizer.lr = 1e-3  # a schedule scales both
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-5, 1e-3])
        args.lr_backbone = None
        assert parameter_groups(args, model) is None


def test_pretrained_from_a_file_and_reheading_the_pytorch_way(tmp_path, weights):
    from anycnn.errors import ConfigError
    from anycnn.nn.layers import Dense

    with anycnn.use_backend("numpy"):
        model = anycnn.pretrained("resnet18", weights, num_classes=4)
        assert model.get_classifier().out_features == 4
        original = safetensors_numpy.load_file(str(weights))
        ours = to_torch_state_dict(model)
        assert np.array_equal(ours["layer3.1.conv2.weight"], original["layer3.1.conv2.weight"])
        # a head replaced by assignment is what the checkpoint records
        model.fc = Dense(512, 3)
        anycnn.save(model, tmp_path / "m.safetensors")
        again, _ = anycnn.load_model(tmp_path / "m.safetensors")
        assert again.model_spec["num_classes"] == 3
        seq = build_model("lenet5")
        seq[-1] = Dense(84, 2)
        anycnn.save(seq, tmp_path / "s.safetensors")
        assert anycnn.load_model(tmp_path / "s.safetensors")[0].model_spec["num_classes"] == 2
        with pytest.raises(ConfigError, match=r"anycnn\.pretrained"):
            build_model("resnet18", weights="imagenet")
        # these networks take any image size, whatever size the spec records
        small = np.zeros((2, 48, 40, 3), np.float32)
        assert anycnn.predict_proba(again.eval(), small).shape == (2, 3)


def test_weights_file_defaults_to_imagenet_normalisation(capsys, tmp_path, photos, weights):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--model", "resnet18", "--weights", weights,
                       "--dataset", photos, "--image-size", 32, "--freeze", "backbone",
                       "--epochs", 1, "--out", out, "--quiet", "--backend", "numpy")
    assert code == 0, err
    config = anycnn.io.checkpoint.load_checkpoint(out / "checkpoint.safetensors").config
    assert config["normalize"] == "imagenet"
    # a run folder is accepted as --weights too (its checkpoint), and late unfreezing warns
    code, _, err = cli(capsys, "train", "--model", "resnet18", "--weights", out,
                       "--dataset", photos, "--image-size", 32, "--freeze", "backbone",
                       "--unfreeze-at", 3, "--epochs", 1, "--out", tmp_path / "again",
                       "--quiet", "--backend", "numpy")
    assert code == 0, err
    assert "--unfreeze-at 3 is after the last epoch" in err
