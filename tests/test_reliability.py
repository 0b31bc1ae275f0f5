"""Issue 5: every bad input gets a clear error, no fault loses training, checkpoints are safe.

Sections: bad inputs in Python (one documented exception type each), bad inputs through the CLI
(exactly one ``anycnn: error: ...`` line, status 2), real faults (signals and SIGKILL against a
training subprocess, unwritable and full disks, NaN losses) followed by a resume that must give
the uninterrupted run's numbers bitwise on NumPy, and a scan of the package for code-executing
loaders.

The CLI fault runs train LeNet-5 for two epochs on a tiny 12x12 IDX dataset written by a fixture
(256 train / 64 test images, 16 batches per epoch), always on the NumPy backend.
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import anycnn
from anycnn import backend as B
from anycnn import checkpoint as C
from anycnn import errors, losses, optim
from anycnn import layers as L
from anycnn.cli.commands import main
from anycnn.data.datasets import ArrayDataset, load_dataset
from anycnn.errors import (
    AnycnnError,
    BackendError,
    BackendMismatchError,
    CheckpointError,
    ConfigError,
    DataError,
    ShapeError,
    TrainingError,
)
from anycnn.models import MIN_IMAGE_SIZE, MODELS, build_model, model_spec
from anycnn.optim.schedules import make_schedule
from anycnn.train.callbacks import Callback
from tests.conftest import to_backend

ROOT = Path(__file__).resolve().parents[1]
POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")


def host(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def other_backend_name(name: str) -> str:
    """A backend other than ``name`` that is always installed with the test dependencies."""
    return "array_api_strict" if name == "numpy" else "numpy"


def on_backend(name: str, array: np.ndarray):
    with anycnn.use_backend(name):
        return anycnn.asarray(array)


# ============================================================================================
# Bad inputs in Python


def test_every_error_class_is_documented():
    doc = errors.__doc__
    for cls in (ShapeError, BackendMismatchError, ConfigError, BackendError, DataError,
                CheckpointError, TrainingError):
        assert issubclass(cls, AnycnnError)
        assert f"``{cls.__name__}``" in doc, f"{cls.__name__} is not in the errors.py table"


RANK_CASES = [
    (lambda: L.Conv2D(1, 2, 3), (5, 5, 1), r"Conv2D expects a 4-D NHWC input, got shape \(5, 5"),
    (lambda: L.Dense(4, 2), (1, 2, 2, 1), r"Dense expects 4 features on the last axis, got "
     r"input shape \(1, 2, 2, 1\)"),
    (lambda: L.MaxPool2D(2), (4, 4), r"MaxPool2D expects a 4-D"),
    (lambda: L.AvgPool2D(2), (1, 4, 4, 1, 1), r"AvgPool2D expects a 4-D"),
    (lambda: L.GlobalAvgPool2D(), (2, 3), r"GlobalAvgPool2D expects a 4-D"),
    (lambda: L.BatchNorm2D(1), (2, 3, 1), r"BatchNorm2D expects NHWC or \(N, C\)"),
    (lambda: L.Flatten(), (3,), r"Flatten expects at least 2-D"),
]


@pytest.mark.parametrize(("make", "shape", "message"), RANK_CASES,
                         ids=["conv", "dense", "maxpool", "avgpool", "gap", "batchnorm", "flatten"])
def test_wrong_rank(backend, make, shape, message):
    with pytest.raises(ShapeError, match=message):
        make().forward(to_backend(host(shape)))


@pytest.mark.parametrize(("make", "shape", "message"), [
    (lambda: L.Conv2D(3, 2, 3), (1, 5, 5, 2), r"Conv2D expects 3 channels .* \(1, 5, 5, 2\)"),
    (lambda: L.Dense(4, 2), (2, 5), r"Dense expects 4 features"),
    (lambda: L.BatchNorm2D(3), (2, 4, 4, 2), r"BatchNorm2D expects 3 channels"),
], ids=["conv", "dense", "batchnorm"])
def test_wrong_channel_count(backend, make, shape, message):
    with pytest.raises(ShapeError, match=message):
        make().forward(to_backend(host(shape)))


def _strided_model():
    return anycnn.Sequential(L.Conv2D(3, 8, 3, stride=2), L.ReLU(), L.Flatten(),
                             L.Dense(5 * 9 * 8, 10))


@pytest.mark.parametrize(("make", "shape", "message"), [
    (lambda: build_model("simple-cnn"), (2, 32, 32, 1),
     "Dense expects 3136 features on the last axis, got input shape (2, 4096) (activations are "
     "NHWC); after Flatten that is 8x8x64 = 4096 features from 32x32x1 input images, but this "
     "Dense expects 7x7x64 = 3136: the model expects 28x28x1 images (any size from 28x28 "
     "to 31x31 fits)"),
    (lambda: build_model("lenet5", image_size=32, in_channels=3), (2, 28, 20, 3),
     "after Flatten that is 5x3x16 = 240 features from 28x20x3 input images, but this Dense "
     "expects 6x6x16 = 576: the model expects 32x32x3 images (any size from 32x32 to "
     "35x35 fits)"),
    (lambda: anycnn.Sequential(L.Flatten(), L.Dropout(0.5), L.ReLU(), L.Dense(28 * 28, 10)),
     (2, 32, 32, 1), "after Flatten that is 32x32x1 = 1024 features from 32x32x1 input images, "
     "but this Dense expects 28x28x1 = 784: the model expects 28x28x1 images"),
    (_strided_model, (2, 32, 32, 3), "this Dense expects 5x9x8 = 360: the model expects "
     "11x19x3 images (any size from 11x19 to 12x20 fits)"),
    (lambda: anycnn.Sequential(anycnn.Sequential(L.Conv2D(1, 4, 3, padding=1), L.MaxPool2D(2)),
                               L.Flatten(), L.Dense(4 * 14 * 14, 10), fuse=False),
     (2, 32, 32, 1), "expects 14x14x4 = 784: the model expects 28x28x1 images (any size "
     "from 28x28 to 29x29 fits)"),
    (lambda: anycnn.Sequential(L.Conv2D(1, 8, 3), L.Flatten(), L.Dense(3137, 10)),
     (2, 32, 32, 1), "after Flatten that is 30x30x8 = 7200 features from 32x32x1 input images, "
     "but this Dense expects 3137, not a multiple of 8 channels"),
], ids=["simple-cnn", "lenet5-rgb", "dropout-between", "strided-non-square", "nested",
        "not-a-multiple"])
def test_dense_after_flatten_names_the_image_size_the_model_expects(backend, make, shape,
                                                                    message):
    model = make()
    with pytest.raises(ShapeError) as info:
        model(to_backend(host(shape)))
    assert message in str(info.value)
    assert str(info.value).count("after Flatten") == 1


def test_dense_mismatch_without_flatten_is_not_explained_as_an_image_size(backend):
    model = anycnn.Sequential(L.Conv2D(1, 8, 3), L.GlobalAvgPool2D(), L.Dense(9, 10))
    with pytest.raises(ShapeError, match=r"Dense expects 9 features .*\(2, 8\) \(activations "
                                         r"are NHWC\)$"):
        model(to_backend(host((2, 12, 12, 1))))
    with pytest.raises(ShapeError, match=r"Dense expects 9 features .*\(2, 4\) \(activations "
                                         r"are NHWC\)$"):
        anycnn.Sequential(L.Flatten(), L.Dense(3, 4), L.Dense(9, 2))(to_backend(host((2, 3))))


@pytest.mark.parametrize("hw", [(28, 28), (31, 17), (9, 40)])
def test_output_hw_matches_the_forward_pass(backend, hw):
    """The geometry the Flatten → Dense explanation inverts is the one forward computes."""
    model = anycnn.Sequential(
        L.Conv2D(1, 2, 3, padding=1), L.BatchNorm2D(2), L.ReLU(), L.MaxPool2D(2),
        L.Conv2D(2, 2, (3, 2), stride=(2, 1), dilation=(1, 2), padding="valid"), L.Dropout(0.1),
        L.AvgPool2D(3, stride=2, padding=1, ceil_mode=True), L.Conv2D(2, 2, 2, padding="same"))
    out = model(to_backend(host((2, *hw, 1))))
    assert model.output_hw(hw) == tuple(out.shape[1:3])
    assert L.Flatten().output_hw(hw) is None and L.GlobalAvgPool2D().output_hw(hw) is None


@pytest.mark.parametrize(("make", "shape"), [
    (lambda: L.Conv2D(1, 1, 5), (1, 4, 9, 1)),
    (lambda: L.Conv2D(1, 1, 3, dilation=3), (1, 6, 6, 1)),
    (lambda: L.Conv2D(1, 1, (1, 4), stride=2), (1, 8, 3, 1)),
    (lambda: L.MaxPool2D(3), (1, 2, 2, 1)),
    (lambda: L.AvgPool2D(4, stride=1, padding=1), (1, 1, 9, 1)),
], ids=["conv", "dilated", "conv-width", "maxpool", "avgpool-padded"])
def test_spatial_size_too_small_for_the_kernel(backend, make, shape):
    with pytest.raises(ShapeError, match="too small for kernel"):
        make().forward(to_backend(host(shape)))


@pytest.mark.parametrize("name", list(MIN_IMAGE_SIZE))
def test_presets_refuse_images_below_their_minimum(backend, name):
    """reliability.md: a too-small image size is a ShapeError naming the size and the model's
    minimum (lenet5 at 8 said "in_features must be >= 1, got 0"); at the minimum the preset
    builds and runs."""
    minimum = MIN_IMAGE_SIZE[name]
    with pytest.raises(ShapeError, match=rf"^{name} takes images of at least {minimum}x{minimum}"
                       rf"; image_size {minimum - 1} \({minimum - 1}x{minimum - 1}\) is too "
                       "small$"):
        build_model(name, image_size=minimum - 1)
    with pytest.raises(ShapeError, match=f"at least {minimum}x{minimum}"):
        model_spec(name, image_size=minimum - 1)
    if name in ("lenet5", "simple-cnn"):  # the preset functions say so themselves too
        with pytest.raises(ShapeError, match=f"at least {minimum}x{minimum}"):
            MODELS[name](image_size=minimum - 1)
    model = build_model(name, image_size=minimum, num_classes=3)
    c = model.model_spec["in_channels"]
    with anycnn.nn.module.eval_mode(model):
        out = model.forward(to_backend(host((1, minimum, minimum, c))))
    assert tuple(out.shape) == (1, 3)


FLOAT_LAYERS = {
    "conv": (lambda: L.Conv2D(1, 2, 3), (1, 4, 4, 1)),
    "dense": (lambda: L.Dense(3, 2), (2, 3)),
    "maxpool": (lambda: L.MaxPool2D(2), (1, 4, 4, 1)),
    "avgpool": (lambda: L.AvgPool2D(2), (1, 4, 4, 1)),
    "gap": (lambda: L.GlobalAvgPool2D(), (1, 4, 4, 1)),
    "batchnorm": (lambda: L.BatchNorm2D(1), (2, 4, 4, 1)),
    "relu": (lambda: L.ReLU(), (2, 3)),
    "sigmoid": (lambda: L.Sigmoid(), (2, 3)),
    "dropout": (lambda: L.Dropout(0.5), (2, 3)),
}


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "bool", "complex64"])
@pytest.mark.parametrize("layer", list(FLOAT_LAYERS))
def test_non_float_inputs_are_refused(backend, layer, dtype):
    make, shape = FLOAT_LAYERS[layer]
    x = anycnn.asarray(np.zeros(shape, dtype=dtype))
    with pytest.raises(ShapeError, match="floating-point"):
        make().forward(x)


@pytest.mark.parametrize("layer", ["conv", "dense", "batchnorm"])
def test_float_input_of_another_precision_than_the_parameters(backend, layer):
    make, shape = FLOAT_LAYERS[layer]
    with pytest.raises(ShapeError, match=r"float32 parameters but got a float64 input"):
        make().forward(anycnn.asarray(host(shape, np.float64)))


@pytest.mark.parametrize("change", ["channels", "size", "int input", "float64 input",
                                    "float64 model", "dilation"])
def test_a_convolution_checks_each_new_input_after_a_good_one(backend, change):
    """Conv2D skips its input checks for an input like the last good one (Conv2D._checked):
    every change of input or layer is checked again."""
    conv = L.Conv2D(2, 4, 3)
    good = to_backend(host((2, 6, 6, 2)))
    conv.forward(good)
    x, match = good, "too small for kernel"
    if change == "channels":
        x, match = to_backend(host((2, 6, 6, 3))), "expects 2 channels"
    elif change == "size":
        x = to_backend(host((2, 2, 6, 2)))
    elif change == "int input":
        x, match = anycnn.asarray(np.zeros((2, 6, 6, 2), np.int32)), "floating-point"
    elif change == "float64 input":
        x, match = anycnn.asarray(host((2, 6, 6, 2), np.float64)), "parameters but got"
    elif change == "float64 model":
        conv.to("float64")
        match = "parameters but got"
    else:
        conv.dilation = (3, 3)
    with pytest.raises(ShapeError, match=match):
        conv.forward(x)


@pytest.mark.parametrize("value", [[[1.0, 2.0]], 3.0, "x", None.__class__])
def test_things_that_are_not_arrays(backend, value):
    with pytest.raises(ShapeError, match="expected an array"):
        L.Dense(2, 2).forward(value)
    with pytest.raises(ShapeError, match="expected an array"):
        losses.SoftmaxCrossEntropy().forward(to_backend(host((2, 3))), value)


@pytest.mark.parametrize(("labels", "message"), [
    (np.array([0, 3]), r"labels must be in \[0, 3\), got values in \[0, 3\]"),
    (np.array([-1, 2]), r"labels must be in \[0, 3\), got values in \[-1, 2\]"),
    (np.array([[0], [1]]), r"labels must be \(2,\) .* got shape \(2, 1\)"),
    (np.array([0, 1, 2]), r"labels must be \(2,\) .* got shape \(3,\)"),
    (np.array([0]), r"labels must be \(2,\) .* got shape \(1,\)"),
    (np.array([0.0, 1.0], np.float32), r"labels must be integers"),
    (np.array([True, False]), r"labels must be integers"),
], ids=["too-large", "negative", "2-d", "batch-too-long", "batch-too-short", "float", "bool"])
def test_bad_labels(backend, labels, message):
    loss = losses.SoftmaxCrossEntropy()
    with pytest.raises(ShapeError, match=message):
        loss.forward(to_backend(host((2, 3))), anycnn.asarray(labels))


def test_bad_logits_and_empty_batches(backend):
    loss = losses.SoftmaxCrossEntropy()
    with pytest.raises(ShapeError, match=r"logits must be \(N, classes\)"):
        loss.forward(to_backend(host((2, 3, 1))), anycnn.asarray(np.array([0, 1])))
    with pytest.raises(ShapeError, match="floating-point"):
        loss.forward(anycnn.asarray(np.zeros((2, 3), np.int64)), anycnn.asarray(np.array([0, 1])))
    with pytest.raises(ShapeError, match="empty batch"):
        loss.forward(to_backend(host((0, 3))), anycnn.asarray(np.zeros(0, np.int64)))
    mse = losses.MSELoss()
    with pytest.raises(ShapeError, match=r"prediction shape \(2, 3\) differs from target"):
        mse.forward(to_backend(host((2, 3))), to_backend(host((3, 2))))
    with pytest.raises(ShapeError, match="floating-point"):
        mse.forward(anycnn.asarray(np.zeros(3, np.int64)), anycnn.asarray(np.zeros(3, np.int64)))
    with pytest.raises(ShapeError, match="empty"):
        mse.forward(to_backend(host((0, 3))), to_backend(host((0, 3))))


def test_dataset_images_and_labels_of_different_lengths():
    with pytest.raises(DataError, match="5 images but 4 labels"):
        ArrayDataset(np.zeros((5, 4, 4, 1), np.uint8), np.zeros(4, np.int64), 10)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 10\)"):
        ArrayDataset(np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 10]), 10)


def test_gradient_of_the_wrong_shape(backend):
    p = anycnn.Parameter(to_backend(host((3, 2))))
    p.grad = to_backend(host((2, 3)))
    with pytest.raises(ShapeError, match=r"shape \(3, 2\) but its gradient has shape \(2, 3\)"):
        optim.SGD([p], lr=0.1).step()


# -- arrays of two backends or two devices in one call ---------------------------------------

def _mixers(other):
    """(name, callable) pairs that each mix a current-backend object with ``other`` arrays."""
    def conv():
        L.Conv2D(1, 2, 3).forward(other(host((1, 4, 4, 1))))

    def dense():
        L.Dense(3, 2).forward(other(host((2, 3))))

    def batchnorm():
        L.BatchNorm2D(3).forward(other(host((2, 3))))

    def cross_entropy():
        losses.SoftmaxCrossEntropy().forward(to_backend(host((2, 3))),
                                             other(np.array([0, 1])))

    def mse():
        losses.MSELoss().forward(to_backend(host((2, 3))), other(host((2, 3))))

    def make_opt(cls, **kw):
        def run():
            p = anycnn.Parameter(to_backend(host((3,))))
            p.grad = other(host((3,)))
            cls([p], lr=0.1, **kw).step()
        return run

    return [("conv", conv), ("dense", dense), ("batchnorm", batchnorm),
            ("cross_entropy", cross_entropy), ("mse", mse),
            ("sgd", make_opt(optim.SGD)), ("sgd-momentum", make_opt(optim.SGD, momentum=0.9)),
            ("adam", make_opt(optim.Adam)), ("adamw", make_opt(optim.AdamW))]


MIXERS = [name for name, _ in _mixers(None)]


@pytest.mark.parametrize("what", MIXERS)
def test_two_backends_in_one_call_names_both(backend, what):
    other_name = other_backend_name(backend.name)
    run = dict(_mixers(lambda a: on_backend(other_name, a)))[what]
    with pytest.raises(BackendMismatchError, match="different backends") as info:
        run()
    assert backend.name in str(info.value) and other_name in str(info.value)


@pytest.mark.parametrize("what", MIXERS)
def test_two_devices_in_one_call_names_both(what):
    strict = pytest.importorskip("array_api_strict")
    other_device = strict.Device("device1")

    def elsewhere(a):
        return strict.asarray(a, device=other_device)

    with anycnn.use_backend("array_api_strict"):
        run = dict(_mixers(elsewhere))[what]
        with pytest.raises(BackendMismatchError, match="different devices") as info:
            run()
    assert "device1" in str(info.value) and "CPU_DEVICE" in str(info.value)


# -- invalid hyperparameters ------------------------------------------------------------------

HYPER_CASES = {
    "conv-kernel-0": (lambda: L.Conv2D(1, 1, 0), "kernel_size must be >= 1"),
    "conv-kernel-negative": (lambda: L.Conv2D(1, 1, (3, -1)), "kernel_size must be >= 1"),
    "conv-kernel-float": (lambda: L.Conv2D(1, 1, 2.5), "kernel_size must be an int"),
    "conv-stride-0": (lambda: L.Conv2D(1, 1, 3, stride=0), "stride must be >= 1"),
    "conv-stride-negative": (lambda: L.Conv2D(1, 1, 3, stride=-2), "stride must be >= 1"),
    "conv-dilation-0": (lambda: L.Conv2D(1, 1, 3, dilation=0), "dilation must be >= 1"),
    "conv-padding-negative": (lambda: L.Conv2D(1, 1, 3, padding=-1), "padding must be >= 0"),
    "conv-padding-word": (lambda: L.Conv2D(1, 1, 3, padding="full"), "'same' or 'valid'"),
    "conv-same-strided": (lambda: L.Conv2D(1, 1, 3, stride=2, padding="same"), "stride 1"),
    "conv-channels-0": (lambda: L.Conv2D(0, 1, 3), "in_channels must be >= 1"),
    "dense-features-0": (lambda: L.Dense(3, 0), "out_features must be >= 1"),
    "maxpool-pad-over-half": (lambda: L.MaxPool2D(2, padding=2), "at most half the kernel"),
    "avgpool-pad-over-half": (lambda: L.AvgPool2D(3, padding=2), "at most half the kernel"),
    "pool-pad-negative": (lambda: L.MaxPool2D(2, padding=-1), "padding must be >= 0"),
    "pool-kernel-0": (lambda: L.AvgPool2D(0), "kernel_size must be >= 1"),
    "pool-stride-0": (lambda: L.MaxPool2D(2, stride=0), "stride must be >= 1"),
    "dropout-1": (lambda: L.Dropout(1.0), r"Dropout p must be in \[0, 1\)"),
    "dropout-negative": (lambda: L.Dropout(-0.1), r"Dropout p must be in \[0, 1\)"),
    "dropout-nan": (lambda: L.Dropout(math.nan), r"Dropout p must be in \[0, 1\)"),
    "dropout-bool": (lambda: L.Dropout(True), r"Dropout p must be in \[0, 1\)"),
    "batchnorm-momentum": (lambda: L.BatchNorm2D(2, momentum=1.5), "momentum must be in"),
    "batchnorm-eps": (lambda: L.BatchNorm2D(2, eps=0.0), "eps must be > 0"),
    "label-smoothing": (lambda: losses.SoftmaxCrossEntropy(1.0), "label_smoothing"),
    "unknown-model": (lambda: build_model("resnet9000"), "valid names: lenet5, simple-cnn"),
    "unknown-dataset": (lambda: load_dataset("imagenet"), "valid names: mnist-sample, mnist"),
    "unknown-schedule": (lambda: make_schedule("warmup", 0.1, 3), "valid names: constant"),
}


@pytest.mark.parametrize("case", list(HYPER_CASES))
def test_invalid_hyperparameters(backend, case):
    make, message = HYPER_CASES[case]
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize("lr", [0, 0.0, -1e-3, math.nan, math.inf, True, "0.1", None])
@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.AdamW])
def test_invalid_learning_rates(backend, cls, lr):
    with pytest.raises(ConfigError, match="learning rate must be a finite number > 0"):
        cls([anycnn.Parameter(to_backend(host((2,))))], lr=lr)


@pytest.mark.parametrize(("make", "message"), [
    (lambda ps: optim.SGD(ps, lr=0.1, momentum=-0.5), "momentum must be a finite number >= 0"),
    (lambda ps: optim.SGD(ps, lr=0.1, nesterov=True), "nesterov=True needs a momentum"),
    (lambda ps: optim.SGD(ps, lr=0.1, weight_decay=-1), "weight_decay must be"),
    (lambda ps: optim.Adam(ps, betas=(1.0, 0.999)), r"beta1 must be in \[0, 1\)"),
    (lambda ps: optim.Adam(ps, eps=0), "eps must be"),
    (lambda ps: optim.SGD([], lr=0.1), "empty parameter list"),
], ids=["momentum", "nesterov", "decay", "beta", "eps", "empty"])
def test_invalid_optimizer_options(backend, make, message):
    with pytest.raises(ConfigError, match=message):
        make([anycnn.Parameter(to_backend(host((2,))))])


# ============================================================================================
# Bad inputs through the CLI: one line, status 2


def write_idx(path: Path, array: np.ndarray) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))
    return path


def make_tiny_dataset(directory: Path, n_train: int = 256, n_test: int = 64, size: int = 12,
                      seed: int = 0) -> Path:
    """A learnable 10-class IDX dataset: each class brightens its own image row."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 100, (n, size, size)).astype(np.uint8)
        images[np.arange(n), labels + 1, :] = 250
        write_idx(directory / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", labels)
    return directory


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture
def isolated_env(tmp_path, monkeypatch):
    """No ANYCNN_* settings from outside, an empty cache, and downloads that fail at once
    (the compiled kernels' cache is kept: where kernels are kept changes no result, and the
    run's one cache spares compiling them again, see tests/conftest.py)."""
    for key in list(os.environ):
        if key.startswith("ANYCNN_") and key != "ANYCNN_KERNEL_CACHE":
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("ANYCNN_DATA_URL", "http://127.0.0.1:9/")  # closed port: refused
    monkeypatch.setattr(B, "_current", B._current)  # cli.commands may switch the backend
    monkeypatch.setattr(anycnn.data.sources, "SYSTEM_DATA_DIR", tmp_path / "system")
    return tmp_path


def run_main(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *fragments: str) -> str:
    assert rc == 2, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    line = lines[0]
    assert line.startswith("anycnn: error: "), line
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def train_argv(data: Path, out: Path, *extra) -> list[str]:
    return ["train", "--dataset", "fashion-mnist", "--data-dir", str(data), "--model", "lenet5",
            "--epochs", "2", "--batch-size", "16", "--backend", "numpy", "--quiet", "--seed",
            "0", "--out", str(out), *extra]


@pytest.mark.parametrize(("extra", "fragments"), [
    (["--model", "vgg"], ["unknown model 'vgg'", "lenet5, simple-cnn, bn-cnn"]),
    (["--dataset", "cifar"], ["unknown dataset 'cifar'", "mnist-sample, mnist, fashion-mnist"]),
    (["--optimizer", "lion"], ["unknown optimizer 'lion'", "sgd, adam, adamw"]),
    (["--schedule", "warmup"], ["unknown schedule 'warmup'", "constant, step, cosine"]),
    (["--backend", "mxnet"],
     ["unknown backend 'mxnet'", "numpy, cupy, torch, array_api_strict, jax"]),
    (["--lr", "0"], ["lr", "> 0"]),
    (["--lr", "-0.5"], ["lr", "> 0"]),
    (["--epochs", "0"], ["--epochs must be >= 1"]),
    (["--batch-size", "0"], ["--batch-size must be >= 1, got 0"]),
    (["--optimizer", "sgd", "--momentum", "-1"], ["momentum must be a finite number >= 0"]),
    (["--weight-decay", "-1"], ["--weight-decay must be a finite number >= 0"]),
    (["--label-smoothing", "1.5"], ["--label-smoothing must be a finite number in [0, 1)"]),
    (["--dtype", "int8"], ["invalid choice: 'int8'"]),
    (["--epochs", "two"], ["--epochs must be an integer >= 1, got 'two'"]),
], ids=["model", "dataset", "optimizer", "schedule", "backend", "lr-0", "lr-negative",
        "epochs-0", "batch-size-0", "momentum", "weight-decay", "label-smoothing", "dtype",
        "epochs-word"])
def test_cli_invalid_options(isolated_env, tiny_data, capsys, extra, fragments):
    rc, _, err = run_main(train_argv(tiny_data, isolated_env / "run", *extra), capsys)
    assert_one_line_error(rc, err, *fragments)
    assert not (isolated_env / "run" / "checkpoint.safetensors").exists()


def test_cli_unusable_backends(isolated_env, capsys, monkeypatch):
    monkeypatch.setattr(B, "_cuda_device_count", lambda: (0, "cupy is not importable (test)"))
    rc, _, err = run_main(["evaluate", "x.safetensors", "--backend", "cupy"], capsys)
    assert_one_line_error(rc, err, "backend 'cupy' cannot be used",
                          "pip install -r backends/cupy.txt")
    monkeypatch.setattr(B, "_current", None)
    monkeypatch.setenv("ANYCNN_BACKEND", "tensorflow")
    rc, _, err = run_main(["evaluate", "x.safetensors"], capsys)
    assert_one_line_error(rc, err, "unknown backend 'tensorflow'", "valid names: auto, numpy")


def subprocess_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ANYCNN_") or k == "ANYCNN_KERNEL_CACHE"}  # as isolated_env
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    env["ANYCNN_DATA_URL"] = "http://127.0.0.1:9/"
    env.update(extra)
    return env


def run_cli(args, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "anycnn", *map(str, args)], capture_output=True,
                          text=True, env=subprocess_env(tmp_path, **env), timeout=120,
                          cwd=tmp_path)


def test_cli_subprocess_bad_backend_env_and_missing_package(tmp_path, tiny_data):
    result = run_cli(["train"], tmp_path, ANYCNN_BACKEND="no-such-backend")
    assert_one_line_error(result.returncode, result.stderr, "unknown backend 'no-such-backend'",
                          "valid names")
    # a backend whose package is missing: shadow torch with a package that fails to import
    fake = tmp_path / "fake-site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    result = run_cli(["train", "--dataset", "fashion-mnist", "--data-dir", tiny_data, "--quiet"],
                     tmp_path, ANYCNN_BACKEND="torch",
                     PYTHONPATH=f"{tmp_path / 'fake-site'}{os.pathsep}{ROOT}")
    assert_one_line_error(result.returncode, result.stderr, "backend 'torch' cannot be used",
                          "torch is not installed", "pip install -r backends/torch.txt")


BROKEN_DATA = {
    "truncated": ("train-images-idx3-ubyte.gz",
                  lambda d: gzip.compress(gzip.decompress(d)[:-7]), "truncated: expected"),
    "wrong-magic": ("t10k-labels-idx1-ubyte.gz",
                    lambda d: gzip.compress(b"\x01\x02" + gzip.decompress(d)[2:]),
                    "not an IDX file"),
    "corrupt-gzip": ("train-labels-idx1-ubyte.gz", lambda d: d[:12] + b"\xff" * 40,
                     "corrupt gzip stream"),
    "count-mismatch": ("train-labels-idx1-ubyte.gz",
                       lambda d: gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 255)
                                               + gzip.decompress(d)[8:-1]),
                       "256 images but 255 labels"),
    "not-gzip-garbage": ("t10k-images-idx3-ubyte.gz", lambda d: b"hello world",
                         "not an IDX file"),
}


def broken_copy(tiny_data: Path, target: Path, kind: str) -> Path:
    target.mkdir(parents=True)
    name, damage, _ = BROKEN_DATA[kind]
    for f in tiny_data.iterdir():
        data = f.read_bytes()
        (target / f.name).write_bytes(damage(data) if f.name == name else data)
    return target


@pytest.mark.parametrize("kind", list(BROKEN_DATA))
def test_cli_broken_dataset_dir(isolated_env, tiny_data, capsys, kind):
    broken = broken_copy(tiny_data, isolated_env / "BROKEN", kind)
    rc, _, err = run_main(train_argv(broken, isolated_env / "run"), capsys)
    line = assert_one_line_error(rc, err, BROKEN_DATA[kind][2])
    assert str(broken) in line


def test_cli_missing_dataset_files_says_where_to_put_them(isolated_env, capsys):
    rc, _, err = run_main(["train", "--dataset", "mnist", "--backend", "numpy", "--quiet"],
                          capsys)
    assert_one_line_error(rc, err, "downloading mnist failed", "train-images-idx3-ubyte.gz",
                          "--data-dir", "searched in this order")


def test_cli_explicit_data_dir_without_the_files_names_them(isolated_env, tiny_data, capsys):
    """No fall back from a data dir the user named (not to the cache, not to a download)."""
    rc, _, err = run_main(["train", "--dataset", "mnist", "--data-dir", isolated_env / "nowhere",
                           "--backend", "numpy", "--quiet"], capsys)
    assert_one_line_error(rc, err, str(isolated_env / "nowhere"), "no such directory")
    partial = broken_copy(tiny_data, isolated_env / "partial", "truncated")
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    rc, _, err = run_main(train_argv(partial, isolated_env / "run"), capsys)
    assert_one_line_error(rc, err, str(partial), "lacks 1 of the 4")


def test_cli_subprocess_broken_dataset(tmp_path, tiny_data):
    broken = broken_copy(tiny_data, tmp_path / "BROKEN", "truncated")
    result = run_cli(train_argv(broken, tmp_path / "run"), tmp_path)
    assert_one_line_error(result.returncode, result.stderr, str(broken), "truncated")


# -- checkpoints given to `anycnn evaluate` ---------------------------------------------------

@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A real lenet5 checkpoint for the tiny dataset, written through the Python API."""
    path = tmp_path_factory.mktemp("ckpt") / "lenet.safetensors"
    with anycnn.use_backend("numpy"):
        spec = {"name": "lenet5", "num_classes": 10, "in_channels": 1, "image_size": 12}
        C.save_checkpoint(path, build_model(spec), model_spec=spec, epoch=1,
                          extra={"config": {"dataset": "fashion-mnist"}})
    return path


def with_metadata(data: bytes, **changes: str) -> bytes:
    from safetensors.numpy import load, save

    size = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + size])["__metadata__"]
    meta.update(changes)
    return save(load(data), metadata=meta)


EVAL_CASES = {
    "missing": (None, ["checkpoint file not found"]),
    "truncated": (lambda d: d[: len(d) * 2 // 3], ["truncated or corrupt"]),
    "empty": (lambda d: b"", ["truncated or empty"]),
    "not-safetensors": (lambda d: b"PK\x03\x04 this is a zip file, not a checkpoint" * 3,
                        ["is not a safetensors checkpoint"]),
    "a-history-file": (lambda d: b'[\n  {\n    "epoch": 1,\n    "lr": 0.001}]\n',
                       ["is not a safetensors checkpoint (it is a text file starting '[\\n"]),
    "newer-version": (lambda d: with_metadata(d, format_version="99"),
                      ["format version 99", "upgrade anycnn"]),
    "other-model": (lambda d: C_other_model(), ["'0.weight'", "(3, 3, 1, 32)", "(5, 5, 1, 6)"]),
    "forged-spec": (lambda d: with_metadata(d, model_spec=json.dumps(
        {"name": "lenet5", "num_classes": 10, "in_channels": 1, "image_size": 10**7})),
        ["image_size=10000000", "not an integer in [1, 512]"]),
}


def C_other_model() -> bytes:
    """simple-cnn weights labelled as lenet5: load_model must name the first mismatch."""
    import tempfile

    spec = {"name": "lenet5", "num_classes": 10, "in_channels": 1, "image_size": 12}
    with anycnn.use_backend("numpy"), tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        C.save_checkpoint(path, build_model({**spec, "name": "simple-cnn"}), model_spec=spec)
        return path.read_bytes()


@pytest.mark.parametrize("kind", list(EVAL_CASES))
def test_cli_evaluate_bad_checkpoints(isolated_env, tiny_data, small_checkpoint, capsys, kind):
    damage, fragments = EVAL_CASES[kind]
    path = isolated_env / f"{kind}.safetensors"
    if damage is not None:
        path.write_bytes(damage(small_checkpoint.read_bytes()))
    rc, _, err = run_main(["evaluate", path, "--data-dir", tiny_data, "--backend", "numpy"],
                          capsys)
    assert_one_line_error(rc, err, str(path), *fragments)


def test_cli_evaluate_good_checkpoint_and_subprocess_bad_one(tmp_path, tiny_data,
                                                              small_checkpoint):
    ok = run_cli(["evaluate", small_checkpoint, "--data-dir", tiny_data, "--backend", "numpy"],
                 tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "fashion-mnist test: loss" in ok.stdout
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(small_checkpoint.read_bytes()[:100])
    result = run_cli(["evaluate", bad, "--backend", "numpy"], tmp_path)
    assert_one_line_error(result.returncode, result.stderr, str(bad))


# ============================================================================================
# Faults: nothing lost


RUNNER = """
import sys, time
import anycnn.train.trainer as T

_step = T.Trainer.train_step

def slow_step(self, x, y, check):
    out = _step(self, x, y, check)
    print(f"step {self.epoch} {self.step + 1}", flush=True)
    time.sleep(float(sys.argv[1]))
    return out

T.Trainer.train_step = slow_step
from anycnn.cli.commands import main
sys.exit(main(sys.argv[2:]))
"""


def start_runner(tmp_path: Path, argv, delay: float = 0.01, **env: str) -> subprocess.Popen:
    """The real CLI in a subprocess, printing ``step <epoch index> <step>`` after each step."""
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    return subprocess.Popen([sys.executable, str(script), str(delay), *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(tmp_path, **env), cwd=tmp_path)


def wait_for_line(proc: subprocess.Popen, wanted: str) -> None:
    while True:
        line = proc.stdout.readline()
        if not line:
            _, err = proc.communicate(timeout=60)
            pytest.fail(f"process ended before {wanted!r}: rc={proc.returncode}\n{err}")
        if line.strip() == wanted:
            return


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"process ended early: rc={proc.returncode}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out")
        time.sleep(0.005)


def checkpoint_temp_files(out: Path) -> list[Path]:
    return sorted(out.glob(".checkpoint.safetensors.*.tmp"))


def final_state(out: Path):
    """(weights, history without timings) of the checkpoint in ``out``."""
    ckpt = C.load_checkpoint(out / "checkpoint.safetensors")
    history = [{k: v for k, v in rec.items() if k not in ("seconds", "images_per_s")}
               for rec in ckpt.extra["history"]]
    return ckpt, history


def assert_same_run(out: Path, reference: Path) -> None:
    got, got_history = final_state(out)
    want, want_history = final_state(reference)
    assert (got.epoch, got.step) == (want.epoch, want.step) == (2, 0)
    assert got_history == want_history  # losses, accuracies and lr, bitwise (JSON floats)
    assert got.tensors.keys() == want.tensors.keys()
    for name in want.tensors:
        np.testing.assert_array_equal(got.tensors[name], want.tensors[name], err_msg=name)
    for key, value in want.optimizer_state["arrays"].items():
        np.testing.assert_array_equal(got.optimizer_state["arrays"][key], value, err_msg=key)
    assert json.loads((out / "history.json").read_text())[-1]["val_loss"] == \
        want_history[-1]["val_loss"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    """The reference: the same two-epoch run with no fault, in a subprocess."""
    tmp = tmp_path_factory.mktemp("reference")
    result = run_cli(train_argv(tiny_data, tmp / "run"), tmp)
    assert result.returncode == 0, result.stderr
    _, history = final_state(tmp / "run")
    assert len(history) == 2 and history[-1]["val_accuracy"] > 0.3  # it really trains
    return tmp / "run"


def resume(tiny_data: Path, out: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    result = run_cli(train_argv(tiny_data, out, "--resume"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert "final validation accuracy" in result.stdout
    return result


@POSIX
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_epoch_saves_and_resume_matches_uninterrupted(tmp_path, tiny_data,
                                                                 uninterrupted, sig):
    out = tmp_path / "run"
    proc = start_runner(tmp_path, train_argv(tiny_data, out))
    wait_for_line(proc, "step 1 5")  # second epoch, fifth of 16 steps
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    name = signal.Signals(sig).name
    assert f"anycnn: {name} received: stopping after this step" in err
    assert f"interrupted ({name}) at epoch 2" in err and "--resume" in err
    assert "" not in err.splitlines()  # no blank line (stderr is a pipe: no bar to leave)
    ckpt = C.load_checkpoint(out / "checkpoint.safetensors")
    assert ckpt.epoch == 1 and 5 <= ckpt.step < 16  # mid-epoch, after the step in progress
    assert checkpoint_temp_files(out) == []
    resume(tiny_data, out, tmp_path)
    assert_same_run(out, uninterrupted)


@POSIX
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, tiny_data,
                                                                  uninterrupted):
    out = tmp_path / "run"
    ckpt_path = out / "checkpoint.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "anycnn", *train_argv(tiny_data, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=subprocess_env(tmp_path, ANYCNN_TEST_SLOW_WRITE="0.3"))
    # epoch 1's checkpoint is in place and epoch 2's is being written (temp file, not renamed)
    wait_for(lambda: ckpt_path.exists() and checkpoint_temp_files(out), proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert len(checkpoint_temp_files(out)) == 1  # really killed in the middle of the write
    ckpt = C.load_checkpoint(ckpt_path)  # the previous, complete checkpoint
    assert (ckpt.epoch, ckpt.step) == (1, 0)
    assert all(np.isfinite(t).all() for t in ckpt.tensors.values())
    resume(tiny_data, out, tmp_path)
    assert_same_run(out, uninterrupted)


@POSIX
def test_second_signal_during_the_final_save_exits_at_once_without_damage(tmp_path, tiny_data,
                                                                         uninterrupted):
    out = tmp_path / "run"
    ckpt_path = out / "checkpoint.safetensors"
    proc = start_runner(tmp_path, train_argv(tiny_data, out), ANYCNN_TEST_SLOW_WRITE="0.3")
    wait_for_line(proc, "step 1 3")
    before = ckpt_path.read_bytes()  # epoch 1's checkpoint
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: checkpoint_temp_files(out), proc)  # the stop's save is being written
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "second signal, exiting now" in err
    assert ckpt_path.read_bytes() == before
    assert (C.load_checkpoint(ckpt_path).epoch, C.load_checkpoint(ckpt_path).step) == (1, 0)
    resume(tiny_data, out, tmp_path)
    assert_same_run(out, uninterrupted)


# -- saves that fail --------------------------------------------------------------------------

def tiny_splits(seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, 64)
    images = rng.integers(0, 100, (64, 12, 12, 1)).astype(np.uint8)
    images[np.arange(64), labels + 1, :, 0] = 250
    return ArrayDataset(images[:48], labels[:48], 10), ArrayDataset(images[48:], labels[48:], 10)


def make_trainer(**kwargs):
    from anycnn.train.trainer import Trainer

    anycnn.manual_seed(0)
    spec = {"name": "lenet5", "num_classes": 10, "in_channels": 1, "image_size": 12}
    model = build_model(spec)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    return Trainer(model, opt, model_spec=spec, progress=False, **kwargs)


def loaders():
    from anycnn.data.dataloader import DataLoader

    train, val = tiny_splits()
    return DataLoader(train, 16, shuffle=True, seed=0), DataLoader(val, 16)


class FolderBecomesAFile(Callback):
    """Once training has started (fit has made the checkpoint's folder), replace that folder
    with a regular file: the epoch's save then fails as on a lost or read-only disk."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_begin(self, trainer):
        self.folder.rmdir()
        self.folder.write_text("not a folder")


def test_failed_save_keeps_the_training_state_for_a_retry(backend, tmp_path):
    folder = tmp_path / "run"
    bad = folder / "checkpoint.safetensors"
    trainer = make_trainer(checkpoint_path=bad)
    train, val = loaders()
    with pytest.raises(CheckpointError) as info:
        trainer.fit(train, val, epochs=2, callbacks=[FolderBecomesAFile(folder)])
    assert str(bad) in str(info.value) and str(folder) in str(info.value)
    # the epoch that finished is kept in memory: save it elsewhere and carry on from there
    assert (trainer.epoch, trainer.step, len(trainer.history)) == (1, 0, 1)
    assert trainer.last_checkpoint is None
    good = trainer.save(tmp_path / "elsewhere.safetensors")
    assert trainer.last_checkpoint == good
    trainer.checkpoint_path = good
    trainer.fit(train, val, epochs=2)

    reference = make_trainer(checkpoint_path=tmp_path / "reference.safetensors")
    reference.fit(*loaders(), epochs=2)
    for (name, p), q in zip(trainer.model.named_parameters(), reference.model.parameters()):
        np.testing.assert_allclose(anycnn.to_numpy(p.data), anycnn.to_numpy(q.data),
                                   rtol=0, atol=1e-6 if backend.name != "numpy" else 0,
                                   err_msg=name)
    assert [h["train_loss"] for h in trainer.history] == \
        pytest.approx([h["train_loss"] for h in reference.history], rel=1e-6)


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "full"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                              capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=10)


def test_cli_disk_full_says_where_it_could_not_write(isolated_env, tiny_data, capsys, full_disk):
    out = full_disk / "run"
    rc, _, err = run_main(train_argv(tiny_data, out), capsys)
    assert_one_line_error(rc, err, f"cannot write checkpoint {out / 'checkpoint.safetensors'}",
                          "No space left on device")
    assert not (out / "checkpoint.safetensors").exists()
    assert [p.name for p in out.iterdir()] == []  # no temporary file left behind


def test_python_disk_full_keeps_the_previous_checkpoint(backend, full_disk):
    small = anycnn.Sequential(L.Dense(3, 2))
    path = full_disk / "small.safetensors"
    C.save_checkpoint(path, small, epoch=1)
    content = path.read_bytes()
    big = anycnn.Sequential(L.Dense(300, 100))  # 120 KB: does not fit
    with pytest.raises(CheckpointError, match="No space left on device") as info:
        C.save_checkpoint(path, big, epoch=2)
    assert str(path) in str(info.value)
    assert path.read_bytes() == content and C.load_checkpoint(path).epoch == 1
    assert [p.name for p in full_disk.iterdir()] == [path.name]


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_cli_unwritable_output_folder(isolated_env, tiny_data, capsys, where):
    if where == "proc":
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc")
        out = Path("/proc/self/anycnn-run")
    else:
        blocker = isolated_env / "a-regular-file"
        blocker.write_text("x")
        out = blocker / "run"
    rc, _, err = run_main(train_argv(tiny_data, out), capsys)
    assert_one_line_error(rc, err, str(out))


# -- NaN and infinite losses -----------------------------------------------------------------

class NaNAt:
    """Cross-entropy that is NaN at the given training steps ``(epoch index, 1-based step)``."""

    def __init__(self, trainer, steps):
        self.inner, self.trainer, self.steps = losses.SoftmaxCrossEntropy(), trainer, set(steps)
        trainer.loss_fn = self

    def forward(self, logits, labels):
        loss = self.inner.forward(logits, labels)
        t = self.trainer
        if t.model.training and (t.epoch, t.step + 1) in self.steps:
            return loss * math.nan
        return loss

    def backward(self):
        return self.inner.backward()


def test_nan_loss_stops_naming_epoch_step_and_last_checkpoint(backend, tmp_path):
    path = tmp_path / "ckpt.safetensors"
    trainer = make_trainer(checkpoint_path=path)
    NaNAt(trainer, {(1, 3)})  # second epoch, third (last) step
    train, val = loaders()
    with pytest.raises(TrainingError) as info:
        trainer.fit(train, val, epochs=3)
    message = str(info.value)
    assert "loss became nan at epoch 2, step 3" in message
    assert f"Last good checkpoint: {path}" in message
    ckpt = C.load_checkpoint(path)
    assert (ckpt.epoch, ckpt.step) == (1, 0)
    assert all(np.isfinite(t).all() for t in ckpt.tensors.values())


def test_nan_loss_before_any_checkpoint_says_so(backend):
    trainer = make_trainer()
    NaNAt(trainer, {(0, 1)})
    with pytest.raises(TrainingError, match=r"epoch 1, step 1;.*none written yet"):
        trainer.fit(*loaders(), epochs=1)


def test_nan_loss_with_several_steps_per_check_names_the_range(backend):
    trainer = make_trainer(sync_every=3)
    NaNAt(trainer, {(0, 2)})
    with pytest.raises(TrainingError, match="epoch 1, steps 1-3"):
        trainer.fit(*loaders(), epochs=1)


def test_nan_loss_skip_drops_only_that_update(backend):
    trainer = make_trainer(on_nonfinite="skip")
    NaNAt(trainer, {(0, 2)})
    train, val = loaders()
    seen = []
    original = trainer.optimizer.step

    def spy():
        seen.append(trainer.step)
        original()

    trainer.optimizer.step = spy
    trainer.fit(train, val, epochs=1)
    assert trainer.skipped_steps == 1
    assert seen == [0, 2]  # steps 1 and 3 updated, step 2 (trainer.step == 1) did not
    assert math.isfinite(trainer.history[0]["train_loss"])


def test_diverged_validation_loss_stops_before_the_checkpoint(backend, tmp_path):
    path = tmp_path / "ckpt.safetensors"
    trainer = make_trainer(checkpoint_path=path)
    train, val = loaders()
    trainer.fit(train, val, epochs=1)
    content = path.read_bytes()
    trainer.optimizer.lr = 1e30  # every later step is ruined, but training losses may be finite
    trainer.schedule = None
    trainer.on_nonfinite = "skip"
    with pytest.raises(TrainingError, match=f"after epoch 2.*Last good checkpoint: {path}"), \
            np.errstate(all="ignore"):
        trainer.fit(train, val, epochs=2)
    assert path.read_bytes() == content


def test_non_finite_weights_are_never_checkpointed(backend, tmp_path):
    path = tmp_path / "ckpt.safetensors"
    trainer = make_trainer(checkpoint_path=path)
    trainer.fit(*loaders(), epochs=1)
    content = path.read_bytes()
    host_w = anycnn.to_numpy(trainer.model[0].weight.data).copy()
    host_w[0, 0, 0, 0] = math.inf
    trainer.model[0].weight.data = anycnn.asarray(host_w)
    with pytest.raises(CheckpointError, match=r"'0\.weight' has 1 non-finite"):
        trainer.save()
    assert path.read_bytes() == content


def test_cli_huge_learning_rate_stops_with_one_line(isolated_env, tiny_data, capsys,
                                                    uninterrupted):
    out = isolated_env / "run"
    ckpt_path = out / "checkpoint.safetensors"
    argv = train_argv(tiny_data, out)
    argv[argv.index("--epochs") + 1] = "1"
    rc, _, err = run_main(argv, capsys)
    assert rc == 0, err
    good = ckpt_path.read_bytes()
    # resume for a second epoch with an absurd learning rate: the loss becomes NaN
    argv[argv.index("--epochs") + 1] = "2"
    rc, _, err = run_main([*argv, "--resume", "--lr", "1e30"], capsys)
    warning, err = err.split("\n", 1)
    assert warning == (f"anycnn: warning: resuming {ckpt_path} with changed settings: "
                       "epochs 1 -> 2, lr 0.001 -> 1e+30")
    assert_one_line_error(rc, err, "loss became", "at epoch 2, step",
                          f"Last good checkpoint: {ckpt_path}")
    assert ckpt_path.read_bytes() == good
    ckpt = C.load_checkpoint(ckpt_path)
    assert ckpt.epoch == 1 and all(np.isfinite(t).all() for t in ckpt.tensors.values())
    # with --on-nan skip the diverged epoch is still never checkpointed
    rc, _, err = run_main([*argv, "--resume", "--lr", "1e30", "--on-nan", "skip"], capsys)
    assert_one_line_error(rc, err.split("\n", 1)[1], "validation loss became", "after epoch 2")
    assert ckpt_path.read_bytes() == good
    # resuming with the intended learning rate gives the uninterrupted run, bit for bit
    rc, _, err = run_main([*argv, "--resume"], capsys)
    assert rc == 0, err
    assert_same_run(out, uninterrupted)


def test_resume_rejects_a_malformed_training_record(backend, tmp_path):
    trainer = make_trainer()
    path = tmp_path / "odd.safetensors"
    C.save_checkpoint(path, trainer.model, trainer.optimizer, model_spec=trainer.model_spec,
                      extra={"history": "not a list"})
    fresh = make_trainer()
    with pytest.raises(CheckpointError, match="malformed training record"):
        fresh.resume(path)
    assert fresh.epoch == 0 and fresh.history == []


def test_stop_requested_between_fit_calls_is_not_lost(backend):
    trainer = make_trainer()
    train, val = loaders()
    trainer.request_stop("test")
    trainer.fit(train, val, epochs=1)
    assert trainer.stopped == "test" and (trainer.epoch, trainer.step) == (0, 0)
    trainer.fit(train, val, epochs=1)  # a new fit after an honoured stop runs normally
    assert trainer.stopped is None and trainer.epoch == 1


# ============================================================================================
# Security: loading never executes code from a file


FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def scan(source: str, filename: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n.split(".")[0] in FORBIDDEN_MODULES for n in names):
                found.append(f"{where}: imports {names}")
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_MODULES:
            found.append(f"{where}: uses {node.id}")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in ("eval", "exec", "compile",
                                                          "__import__"):
                found.append(f"{where}: calls {func.id}()")
            if isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(
                    func.value, ast.Name) and func.value.id in ("torch", "np", "numpy"):
                # torch.load(weights_only=True) refuses every object but tensors and plain
                # containers: the one safe way to read a .pth file (torchvision's weights)
                safe = func.value.id == "torch" and any(
                    kw.arg == "weights_only" and isinstance(kw.value, ast.Constant)
                    and kw.value.value is True for kw in node.keywords)
                if not safe:
                    found.append(f"{where}: calls {func.value.id}.load()")
            for kw in node.keywords:
                if kw.arg in ("allow_pickle", "weights_only") and not (
                        isinstance(kw.value, ast.Constant) and kw.value.value is (
                            kw.arg == "weights_only")):
                    found.append(f"{where}: {kw.arg}={ast.unparse(kw.value)}")
    return found


def test_scanner_catches_the_patterns():
    bad = ("import pickle\nfrom cloudpickle import loads\nx = eval('1')\nexec('y=2')\n"
           "np.load(f, allow_pickle=True)\ntorch.load(p)\n")
    assert len(scan(bad, "bad.py")) == 7
    assert scan("model.eval()\nnp.frombuffer(b)\n", "ok.py") == []
    assert scan("torch.load(p, map_location='cpu', weights_only=True)\n", "ok.py") == []
    assert len(scan("torch.load(p, weights_only=False)\n", "bad.py")) == 2


#: modules allowed to pickle, and why: none reads a pickle from a file
PICKLE_ALLOWED = {
    # the DataLoader's worker processes: the user's dataset object and its batches cross the
    # pipes between the training process and the workers it started (as in PyTorch)
    "data/workers.py",
}


def test_package_has_no_code_executing_loaders():
    package = Path(anycnn.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        here = scan(text, str(path.relative_to(package)))
        for needle in ("allow_pickle=True", "pickle.load"):
            if needle in text:
                here.append(f"{path.name}: contains {needle!r}")
        if path.relative_to(package).as_posix() in PICKLE_ALLOWED:
            here = [f for f in here if "pickle" not in f]
        found += here
    assert found == []


def test_idx_reader_parses_with_frombuffer_only():
    import inspect

    from anycnn import datasets

    source = inspect.getsource(datasets._parse_idx)
    assert "np.frombuffer(" in source and "np.load" not in source


def test_checkpoint_header_size_is_limited(tmp_path):
    path = tmp_path / "huge-header.safetensors"
    path.write_bytes((C.MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="exceeds the 100 MB limit"):
        C.load_checkpoint(path)
