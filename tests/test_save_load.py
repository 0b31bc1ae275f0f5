"""anycnn.save / anycnn.load_weights / anycnn.load_model for your own models: a Module subclass
and a custom Sequential round-trip (weights, buffers, predictions), a wrong model is refused with
the tensor and both classes named, load_model explains what to do without a model spec."""

from __future__ import annotations

import numpy as np
import pytest

import anycnn
from anycnn import layers as L
from anycnn import random as anycnn_random
from anycnn.errors import CheckpointError
from anycnn.io.checkpoint import load_checkpoint
from anycnn.models import build_model


class SmallNet(anycnn.Module):
    """A Module subclass with parameters, BatchNorm buffers and a nested Sequential."""

    def __init__(self, classes: int = 3):
        self.features = anycnn.Sequential(L.Conv2D(1, 4, 3, padding=1), L.BatchNorm2D(4),
                                          L.ReLU(), L.MaxPool2D(2))
        self.pool = L.GlobalAvgPool2D()
        self.head = L.Dense(4, classes)

    def forward(self, x):
        return self.head.forward(self.pool.forward(self.features.forward(x)))


def custom_sequential(classes: int = 3) -> anycnn.Sequential:
    return anycnn.Sequential(L.Conv2D(1, 2, 3), L.ReLU(), L.Flatten(), L.Dropout(0.2),
                             L.Dense(2 * 6 * 6, classes))


def state(model) -> dict[str, np.ndarray]:
    return {k: anycnn.to_numpy(v).copy() for k, v in model.state_dict().items()}


def train_a_little(model, images) -> None:
    """Change BatchNorm's running statistics so that buffers are worth checking."""
    model.train()
    model.forward(anycnn.asarray(images, dtype="float32"))


@pytest.fixture
def images(rng):
    return rng.integers(0, 256, size=(5, 8, 8, 1), dtype=np.uint8)


@pytest.mark.parametrize("make", [SmallNet, custom_sequential], ids=["subclass", "sequential"])
def test_round_trip(backend, tmp_path, images, make):
    anycnn.manual_seed(1)
    model = make()
    train_a_little(model, images / 255)
    path = anycnn.save(model, tmp_path / "mine.safetensors")
    assert path == tmp_path / "mine.safetensors" and path.is_file()
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write leaves no temporary file
    anycnn.manual_seed(2)  # other initial weights
    fresh = make()
    before = state(fresh)
    assert any(not np.array_equal(before[k], v) for k, v in state(model).items())
    rng_before = anycnn_random.get_state()
    assert anycnn.load_weights(fresh, path) is fresh
    assert anycnn_random.get_state() == rng_before  # loading leaves the global RNG alone
    for name, value in state(model).items():
        np.testing.assert_array_equal(state(fresh)[name], value, err_msg=name)
    np.testing.assert_array_equal(anycnn.predict(fresh, images), anycnn.predict(model, images))
    assert load_checkpoint(path).extra["model_class"] == type(model).__qualname__


def test_wrong_model_is_refused_and_left_unchanged(backend, tmp_path, images):
    path = anycnn.save(SmallNet(), tmp_path / "net.safetensors")
    other = custom_sequential()
    before = state(other)
    with pytest.raises(CheckpointError) as info:
        anycnn.load_weights(other, path)
    message = str(info.value)
    for fragment in ("net.safetensors", "does not fit this model", "'0.weight'",
                     "saved from a SmallNet", "this model is a Sequential"):
        assert fragment in message, (fragment, message)
    for name, value in before.items():
        np.testing.assert_array_equal(state(other)[name], value)
    with pytest.raises(CheckpointError, match=r"'head.weight' has shape \(4, 3\) in the "
                                              r"checkpoint but \(4, 5\)"):
        anycnn.load_weights(SmallNet(classes=5), path)
    with pytest.raises(CheckpointError, match="not found"):
        anycnn.load_weights(SmallNet(), tmp_path / "missing.safetensors")


def test_load_model_without_spec_says_to_use_load_weights(backend, tmp_path):
    path = anycnn.save(custom_sequential(), tmp_path / "seq.safetensors")
    with pytest.raises(CheckpointError) as info:
        anycnn.load_model(path)
    message = str(info.value)
    assert "no model_spec" in message
    assert f"anycnn.load_weights(model, {str(path)!r})" in message


def test_built_models_keep_their_spec_and_reload_with_load_model(backend, tmp_path, rng):
    images = rng.integers(0, 256, size=(3, 12, 12, 1), dtype=np.uint8)
    model = build_model("lenet5", image_size=12, num_classes=4)
    assert model.model_spec == {"name": "lenet5", "num_classes": 4, "in_channels": 1,
                                "image_size": 12}
    path = anycnn.save(model, tmp_path / "lenet.safetensors")
    loaded, checkpoint = anycnn.load_model(path)
    assert checkpoint.model_spec == model.model_spec == loaded.model_spec
    np.testing.assert_array_equal(anycnn.predict(loaded, images), anycnn.predict(model, images))
    # an explicit spec wins; without one anywhere, none is stored
    assert anycnn.save(SmallNet(), tmp_path / "a.safetensors", model_spec=None) is not None
    assert load_checkpoint(tmp_path / "a.safetensors").model_spec is None


def test_failed_saves_keep_the_previous_file(backend, tmp_path):
    model = custom_sequential()
    path = anycnn.save(model, tmp_path / "keep.safetensors")
    good = path.read_bytes()
    xp = backend.xp
    model[0].weight.data = model[0].weight.data * xp.nan
    with pytest.raises(CheckpointError, match="non-finite"):
        anycnn.save(model, path)
    assert path.read_bytes() == good
    with pytest.raises(CheckpointError, match="cannot write"):
        anycnn.save(custom_sequential(), tmp_path / "no" / "such" / "folder.safetensors")


def test_weights_saved_on_numpy_load_on_the_backend_under_test(backend, tmp_path, images):
    with anycnn.use_backend("numpy"):
        anycnn.manual_seed(5)
        source = SmallNet()
        train_a_little(source, images / 255)
        path = anycnn.save(source, tmp_path / "np.safetensors")
        expected = anycnn.predict(source, images)
    target = anycnn.load_weights(SmallNet(), path)
    assert anycnn.backend.namespace_of(target.head.weight.data) is not None
    np.testing.assert_allclose(anycnn.predict(target, images), expected, rtol=1e-5, atol=1e-6)


def test_top_level_names_are_lazy_exports():
    import anycnn.io.checkpoint as C
    import anycnn.train.inference as I

    assert anycnn.save is C.save and anycnn.load_weights is C.load_weights
    assert anycnn.load_model is C.load_model and anycnn.predict is I.predict
    assert {"save", "load_weights", "load_model", "predict", "predict_topk",
            "metrics"} <= set(dir(anycnn))
