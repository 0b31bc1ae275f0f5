"""predict / predict_proba / predict_topk on images as users hold them: one image or a batch,
uint8 or float, host or backend arrays; probabilities; top-k with ties; clear shape errors; the
model's modes put back."""

from __future__ import annotations

import numpy as np
import pytest

import anycnn
from anycnn import functional as F
from anycnn import layers as L
from anycnn.data.dataloader import DataLoader
from anycnn.data.datasets import ArrayDataset, load_dataset
from anycnn.errors import ConfigError, ShapeError
from anycnn.models import build_model
from anycnn.train.inference import expected_input
from anycnn.train.trainer import predict, predict_proba, predict_topk

from .conftest import to_backend


@pytest.fixture(scope="module")
def digits():
    """Eight MNIST images, uint8 (8, 28, 28, 1), and their labels."""
    val = load_dataset("mnist-sample").val
    return val.images[:8], val.labels[:8]


@pytest.fixture
def lenet(backend):
    return build_model("lenet5")


def test_uint8_float_single_and_batch_agree(backend, lenet, digits):
    images, labels = digits
    batch = predict(lenet, images)
    assert isinstance(batch, np.ndarray) and batch.shape == (8, 10)
    assert batch.dtype == np.float32
    # the DataLoader's own batch through the model: uint8 scaling is bit-identical
    x, _ = next(iter(DataLoader(ArrayDataset(images, labels, 10), 8)))
    with anycnn.nn.module.eval_mode(lenet):
        np.testing.assert_array_equal(batch, anycnn.to_numpy(lenet.forward(x)))
    same_batch = {
        "float32 host": images.astype(np.float32) / 255,
        "float64 host": images / 255,
        "uint8 backend": to_backend(images),
        "float32 backend": to_backend(images.astype(np.float32) / 255),
        "nested lists": (images / 255).tolist(),
    }
    for what, variant in same_batch.items():
        np.testing.assert_array_equal(predict(lenet, variant), batch, err_msg=what)
    one = predict(lenet, images[3])  # (H, W, C)
    assert one.shape == (10,)
    np.testing.assert_array_equal(predict(lenet, images[3:4])[0], one)
    np.testing.assert_array_equal(predict(lenet, images[3, :, :, 0]), one)  # (H, W)
    np.testing.assert_array_equal(predict(lenet, to_backend(images[3, :, :, 0])), one)
    np.testing.assert_array_equal(predict(lenet, images[3] / 255), one)
    # another batch composition changes at most the last float32 bits
    np.testing.assert_allclose(one, batch[3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(predict(lenet, images, batch_size=3), batch, rtol=1e-5,
                               atol=1e-5)


def test_probabilities(backend, lenet, digits):
    images, _ = digits
    logits = predict(lenet, images).astype(np.float64)
    probs = predict(lenet, images, probs=True)
    assert probs.shape == (8, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=0, atol=1e-6)
    reference = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, reference, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(predict_proba(lenet, images), probs)
    single = predict_proba(lenet, images[0])
    assert single.shape == (10,) and abs(float(single.sum()) - 1) < 1e-6
    assert anycnn.predict_proba is predict_proba


def test_softmax_is_stable(backend, xp):
    huge = to_backend(np.array([[1000.0, 0.0, -1000.0], [-1e30, -1e30, -1e30]], np.float32))
    out = anycnn.to_numpy(F.softmax(huge))
    np.testing.assert_array_equal(out[0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(out[1], [1 / 3] * 3, rtol=1e-6)
    assert np.isfinite(out).all()


def test_topk_ranks_ties_by_lowest_index(backend, rng):
    """A model whose logits are its pixels (Flatten): images (N, 1, 6, 1) with many ties."""
    model = anycnn.Sequential(L.Flatten())
    pixels = rng.choice(np.array([0, 128, 255], np.uint8), size=(40, 1, 6, 1))
    indices, probs = predict_topk(model, pixels, k=4)
    assert indices.shape == probs.shape == (40, 4) and indices.dtype == np.int64
    values = pixels[:, 0, :, 0].astype(np.int64)
    for row, got in zip(values, indices):
        expected = sorted(range(6), key=lambda j: (-row[j], j))[:4]
        assert got.tolist() == expected
    logits = predict(model, pixels)
    np.testing.assert_array_equal(indices[:, 0], logits.argmax(axis=1))
    np.testing.assert_array_equal(probs, np.take_along_axis(
        predict_proba(model, pixels), indices, axis=1))
    assert np.all(np.diff(probs, axis=1) <= 0)  # best first
    one_idx, one_p = predict_topk(model, pixels[5], k=2)
    assert one_idx.shape == one_p.shape == (2,)
    np.testing.assert_array_equal(one_idx, indices[5, :2])
    with pytest.raises(ConfigError, match=r"top-7.*only 6 classes"):
        predict_topk(model, pixels, k=7)
    for bad in (0, 2.5, None):
        with pytest.raises(ConfigError, match="positive integer"):
            predict_topk(model, pixels, k=bad)


# --------------------------------------------------------------------------------------------
# mistakes


@pytest.mark.parametrize("shape, dtype, fragments", [
    ((28, 28, 3), np.uint8, ["(28, 28, 3)", "expects (28, 28, 1)"]),
    ((2, 32, 32, 1), np.uint8, ["(2, 32, 32, 1)", "expects (28, 28, 1)"]),
    ((5, 28, 28), np.uint8, ["(5, 28, 28)", "expects (28, 28, 1)", "images[..., None]"]),
    ((1, 2, 28, 28, 1), np.uint8, ["(1, 2, 28, 28, 1)", "(N, H, W, C)"]),
    ((28,), np.uint8, ["(28,)"]),
    ((0, 28, 28, 1), np.uint8, ["empty"]),
    ((2, 28, 28, 1), np.int64, ["uint8", "int64"]),
    ((2, 28, 28, 1), np.bool_, ["uint8", "bool"]),
])
def test_wrong_images_name_what_the_model_expects(backend, lenet, shape, dtype, fragments):
    images = np.zeros(shape, dtype=dtype)
    for variant in (images, to_backend(images)):
        with pytest.raises(ShapeError) as info:
            predict(lenet, variant)
        for fragment in fragments:
            assert fragment in str(info.value), (fragment, str(info.value))


def test_models_built_in_code_name_their_channels(backend):
    model = anycnn.Sequential(L.Conv2D(3, 4, 3), L.ReLU(), L.GlobalAvgPool2D(), L.Dense(4, 2))
    assert expected_input(model) == (None, None, 3)
    assert predict(model, np.zeros((9, 9, 3), np.uint8)).shape == (2,)
    with pytest.raises(ShapeError, match=r"a 2-D array \(9, 9\).*3 channel"):
        predict(model, np.zeros((9, 9), np.uint8))
    with pytest.raises(ShapeError, match=r"\(9, 9, 1\) do not fit.*expects images with 3 "):
        predict(model, np.zeros((9, 9, 1), np.uint8))
    with pytest.raises(ShapeError, match=r"\(2, 2, 3\).*too small"):
        predict(model, np.zeros((2, 2, 3), np.uint8))
    # a Module subclass: its own layer's error, prefixed with what predict was given
    custom = TwoBranches()
    assert expected_input(custom) == (None, None, None)
    assert predict(custom, np.zeros((3, 5, 5, 2), np.uint8)).shape == (3, 4)
    with pytest.raises(ShapeError, match=r"\(5, 5, 1\) do not fit.*Conv2D expects 2 channels"):
        predict(custom, np.zeros((5, 5, 1), np.uint8))


class TwoBranches(anycnn.Module):
    """Two convolutions whose outputs are added, then pooled and classified."""

    def __init__(self):
        self.a, self.b = L.Conv2D(2, 3, 3, padding=1), L.Conv2D(2, 3, 1)
        self.head = anycnn.Sequential(L.GlobalAvgPool2D(), L.Dense(3, 4))

    def forward(self, x):
        return self.head.forward(self.a.forward(x) + self.b.forward(x))


def test_modes_are_restored(backend, digits):
    images, _ = digits
    model = anycnn.Sequential(L.Conv2D(1, 2, 3), L.BatchNorm2D(2), L.ReLU(), L.Flatten(),
                              L.Dropout(0.5), L.Dense(2 * 26 * 26, 10))
    model.train()
    model[4].eval()  # a mixed state: Dropout off, BatchNorm training
    before = [m.training for m in model.modules()]
    first = predict(model, images)
    np.testing.assert_array_equal(predict(model, images), first)  # eval: no dropout, no stats
    assert [m.training for m in model.modules()] == before
    with pytest.raises(ShapeError):
        predict(model, np.zeros((2, 28, 28, 2), np.uint8))
    assert [m.training for m in model.modules()] == before
    with pytest.raises(ConfigError, match="batch_size"):
        predict(model, images, batch_size=0)


def test_batch_size_one_makes_each_image_independent_of_the_batch(backend):
    # issue 26 (new-user trial): the same image's probabilities differed in the last digits
    # between a batch of one and a folder batch; documented (float rounding of batched
    # kernels), and batch_size=1 (anycnn predict --batch-size 1) gives the same numbers
    anycnn.manual_seed(0)
    model = build_model("simple-cnn")
    images = np.random.default_rng(3).integers(0, 256, (7, 28, 28, 1), dtype=np.uint8)
    alone = np.stack([anycnn.predict_proba(model, images[i]) for i in range(len(images))])
    np.testing.assert_array_equal(anycnn.predict_proba(model, images, batch_size=1), alone)
    batched = anycnn.predict_proba(model, images)
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-7)  # rounding only
