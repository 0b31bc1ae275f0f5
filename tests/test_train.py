"""Trainer, evaluate and predict: learning, history records, schedules (against PyTorch's
formulas and schedulers), exact resume after an epoch or mid-epoch, and checkpoints that move
between backends."""

from __future__ import annotations

import math

import numpy as np
import pytest

import anycnn
from anycnn import layers as L
from anycnn import optim
from anycnn.data.dataloader import DataLoader
from anycnn.data.datasets import load_dataset
from anycnn.errors import ConfigError
from anycnn.io.checkpoint import load_model
from anycnn.models import build_model, model_spec
from anycnn.optim.schedules import Constant, Cosine, StepDecay, make_schedule
from anycnn.train.trainer import Trainer, evaluate, predict
from tests.rounding import assert_rounding_close

RECORD_KEYS = {"epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
               "seconds", "images_per_s"}
#: fields of a history record that a resumed run must reproduce exactly
REPRODUCIBLE = ("epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy")


@pytest.fixture(scope="module")
def sample():
    return load_dataset("mnist-sample")


@pytest.fixture(scope="module")
def small(sample):
    """(train, val): 192 and 128 images of the bundled sample."""
    return sample.train.subset(np.arange(192)), sample.val.subset(np.arange(128))


def tiny_model():
    """Cheap, but with every kind of state a resume must restore: BatchNorm running statistics
    and Dropout masks drawn from the global RNG."""
    return anycnn.Sequential(
        L.Conv2D(1, 4, 3, stride=2), L.BatchNorm2D(4), L.ReLU(), L.MaxPool2D(2),  # -> 6x6x4
        L.Flatten(), L.Dropout(0.3), L.Dense(144, 10))


def weights(model):
    return {k: anycnn.to_numpy(v).copy() for k, v in model.state_dict().items()}


def optimizer_arrays(opt):
    return {k: anycnn.to_numpy(v).copy() for k, v in opt.state_dict()["arrays"].items()}


def assert_same(backend, actual, expected):
    """Bit-identical on NumPy and array-api-strict (which runs NumPy underneath); float32
    rounding differences allowed elsewhere."""
    if backend.name in ("numpy", "array_api_strict"):
        np.testing.assert_array_equal(actual, expected)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# learning, history, evaluate, predict


def test_training_reduces_loss(backend, sample):
    train_set = sample.train.subset(np.arange(512))
    val = DataLoader(sample.val.subset(np.arange(256)), 256)
    model = build_model("lenet5")
    before = evaluate(model, val)
    trainer = Trainer(model, optim.Adam(model.parameters(), lr=3e-3), progress=False)
    history = trainer.fit(DataLoader(train_set, 32, shuffle=True), val, epochs=2)
    assert history[-1]["train_loss"] < history[0]["train_loss"] < before["loss"]
    assert history[-1]["val_loss"] < 0.6 * before["loss"]
    assert history[-1]["val_accuracy"] > 0.6 > before["accuracy"]
    assert model.training  # fit leaves the model in training mode


def test_history_records(backend, small):
    train_set, val_set = small
    model = tiny_model()
    schedule = StepDecay(0.01, step_size=1, gamma=0.5)
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=1.0, momentum=0.9),
                      schedule=schedule, progress=False)
    history = trainer.fit(DataLoader(train_set, 64, shuffle=True), DataLoader(val_set, 64),
                          epochs=2)
    assert history is trainer.history and len(history) == 2
    for i, record in enumerate(history):
        assert set(record) == RECORD_KEYS
        assert record["epoch"] == i + 1
        assert record["lr"] == schedule(i)
        assert record["seconds"] > 0 and record["images_per_s"] > 0
        assert 0 <= record["train_accuracy"] <= 1 and 0 <= record["val_accuracy"] <= 1
        assert math.isfinite(record["train_loss"]) and math.isfinite(record["val_loss"])
    assert (trainer.epoch, trainer.step) == (2, 0)
    # fit counts epochs already done: asking for 2 again does nothing, and says so
    with pytest.warns(UserWarning, match=r"fit\(epochs=2\) has nothing to do.*more_epochs"):
        assert trainer.fit(DataLoader(train_set, 64), epochs=2) == history
    # no validation loader: validation fields are None
    more = trainer.fit(DataLoader(train_set, 64), epochs=3)
    assert more[-1]["val_loss"] is None and more[-1]["val_accuracy"] is None


def test_evaluate_and_predict_agree(backend, small):
    _, val_set = small
    model = tiny_model()
    Trainer(model, optim.Adam(model.parameters(), lr=1e-2), progress=False).fit(
        DataLoader(small[0], 32, shuffle=True))
    result = evaluate(model, DataLoader(val_set, 50))
    assert result["count"] == len(val_set)
    images = anycnn.asarray(val_set.images / 255, dtype="float32")
    logits = predict(model, images, batch_size=50)
    assert isinstance(logits, np.ndarray) and logits.shape == (len(val_set), 10)
    accuracy = float(np.mean(logits.argmax(axis=1) == val_set.labels))
    assert result["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    np.testing.assert_allclose(predict(model, images, batch_size=1000), logits,
                               rtol=1e-5, atol=1e-5)
    assert model.training  # predict and evaluate put the mode back
    model.eval()
    predict(model, images)
    assert not model.training


def test_sync_every_does_not_change_the_numbers(backend, small):
    runs = []
    for sync in (1, 4):
        anycnn.manual_seed(3)
        model = tiny_model()
        trainer = Trainer(model, optim.Adam(model.parameters()), sync_every=sync, progress=False)
        runs.append(trainer.fit(DataLoader(small[0], 32, shuffle=True), epochs=1)[0])
    for key in ("train_loss", "train_accuracy"):
        assert runs[0][key] == runs[1][key]


# --------------------------------------------------------------------------------------------
# schedules


def test_step_schedule_formula():
    schedule = make_schedule("step", 0.1, epochs=9)  # halve every third of the run
    assert [schedule(e) for e in range(9)] == pytest.approx(
        [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025], rel=1e-15)
    custom = make_schedule("step", 0.2, epochs=10, step_size=4, gamma=0.1)
    assert [custom(e) for e in (0, 3, 4, 7, 8)] == pytest.approx([0.2, 0.2, 0.02, 0.02, 0.002])


def test_cosine_schedule_formula():
    base, total = 1e-3, 7
    schedule = make_schedule("cosine", base, epochs=total)
    for e in range(total + 1):  # PyTorch's CosineAnnealingLR, closed form, eta_min = 0
        assert schedule(e) == pytest.approx(base * (1 + math.cos(math.pi * e / total)) / 2,
                                            rel=1e-12, abs=1e-18)
    assert schedule(0) == base and schedule(total) == pytest.approx(0.0, abs=1e-18)
    assert schedule(total + 3) == schedule(total)  # stays at the minimum after the run
    floor = Cosine(1.0, 4, min_lr=0.1)
    assert [floor(e) for e in (0, 2, 4)] == pytest.approx([1.0, 0.55, 0.1])
    assert make_schedule("constant", 0.3, 5)(4) == 0.3 == Constant(0.3)(100)


def test_unknown_schedule():
    with pytest.raises(ConfigError, match="valid names: constant, step, cosine"):
        make_schedule("linear", 0.1, 3)


@pytest.mark.parametrize("name", ["step", "cosine"])
def test_schedules_match_torch_schedulers(name):
    torch = pytest.importorskip("torch")
    base, epochs = 0.05, 10
    ours = make_schedule(name, base, epochs, step_size=3, gamma=0.3)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    if name == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.3)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for epoch in range(epochs):
        assert ours(epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()


# --------------------------------------------------------------------------------------------
# resume


class StopAfter:
    """A loader wrapper that asks the trainer to stop during batch ``k`` of epoch ``epoch``
    (like a signal arriving mid-epoch); the trainer finishes that step and returns."""

    def __init__(self, loader, epoch: int, k: int) -> None:
        self.loader, self.stop_epoch, self.k = loader, epoch, k
        self.trainer = None

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, start):
        for i, batch in enumerate(self.loader.iter_from(start), start=start):
            if self.loader.epoch == self.stop_epoch and i + 1 == self.k:
                self.trainer.request_stop("test")
            yield batch


def new_run(train_set, seed, path=None, groups=False):
    """A run of :func:`tiny_model` with Adam and a cosine schedule; with ``groups``, SGD with
    parameter groups (a slower backbone, no decay on BatchNorm and biases) and a warmup."""
    anycnn.manual_seed(seed)
    model = tiny_model()
    if groups:
        opt = optim.SGD(optim.split_groups(model, model[-1], lr_backbone=3e-4,
                                           no_decay=("bias", "norm")),
                        lr=3e-3, momentum=0.9, weight_decay=5e-3)
    else:
        opt = optim.Adam(model.parameters(), lr=3e-3)
    trainer = Trainer(model, opt, schedule=make_schedule("cosine", 3e-3, 3),
                      checkpoint_path=path, progress=False, warmup_steps=5 if groups else 0)
    return trainer, DataLoader(train_set, 32, shuffle=True, seed=5)


def straight_run(small, groups=False):
    trainer, loader = new_run(small[0], seed=1, groups=groups)
    trainer.fit(loader, DataLoader(small[1], 64), epochs=3)
    return trainer


def assert_same_run(backend, resumed, straight):
    for name, value in weights(straight.model).items():
        assert_same(backend, weights(resumed.model)[name], value)
    for name, value in optimizer_arrays(straight.optimizer).items():
        assert_same(backend, optimizer_arrays(resumed.optimizer)[name], value)
    assert len(resumed.history) == len(straight.history) == 3
    for got, want in zip(resumed.history, straight.history):
        for key in REPRODUCIBLE:
            assert_same(backend, np.float64(got[key]), np.float64(want[key]))


def test_resume_after_an_epoch_equals_uninterrupted_run(backend, small, tmp_path):
    straight = straight_run(small)

    first, loader = new_run(small[0], seed=1, path=tmp_path / "ckpt.safetensors")
    first.fit(loader, DataLoader(small[1], 64), epochs=1)
    assert first.last_checkpoint == tmp_path / "ckpt.safetensors"

    resumed, loader = new_run(small[0], seed=99)  # other initial weights, other RNG state
    resumed.resume(tmp_path / "ckpt.safetensors")
    assert (resumed.epoch, resumed.step, len(resumed.history)) == (1, 0, 1)
    resumed.fit(loader, DataLoader(small[1], 64), epochs=3)
    assert_same_run(backend, resumed, straight)


@pytest.mark.parametrize("stop_epoch, k", [(1, 2), (0, 5)])
def test_stop_mid_epoch_and_resume_equals_uninterrupted_run(backend, small, tmp_path,
                                                            stop_epoch, k):
    straight = straight_run(small)

    first, loader = new_run(small[0], seed=1)
    stopper = StopAfter(loader, stop_epoch, k)
    stopper.trainer = first
    first.fit(stopper, DataLoader(small[1], 64), epochs=3)
    assert first.stopped == "test"
    assert (first.epoch, first.step, len(first.history)) == (stop_epoch, k, stop_epoch)
    path = first.save(tmp_path / "stopped.safetensors")

    resumed, loader = new_run(small[0], seed=42)
    resumed.resume(path)
    assert (resumed.epoch, resumed.step) == (stop_epoch, k)
    resumed.fit(loader, DataLoader(small[1], 64), epochs=3)
    assert resumed.stopped is None
    assert_same_run(backend, resumed, straight)


def test_resume_with_parameter_groups_equals_uninterrupted_run(backend, small, tmp_path):
    straight = straight_run(small, groups=True)

    first, loader = new_run(small[0], seed=1, groups=True)
    stopper = StopAfter(loader, 1, 2)
    stopper.trainer = first
    first.fit(stopper, DataLoader(small[1], 64), epochs=3)
    assert (first.epoch, first.step) == (1, 2)
    path = first.save(tmp_path / "stopped.safetensors")

    resumed, loader = new_run(small[0], seed=42, groups=True)
    resumed.resume(path)
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [
        g["lr"] for g in first.optimizer.param_groups]
    resumed.fit(loader, DataLoader(small[1], 64), epochs=3)
    assert_same_run(backend, resumed, straight)
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [
        g["lr"] for g in straight.optimizer.param_groups]


# --------------------------------------------------------------------------------------------
# checkpoints across backends


@pytest.mark.parametrize("target", ["array_api_strict", "torch"])
def test_checkpoint_from_numpy_loads_on_other_backends(small, tmp_path, target):
    if target == "torch":
        pytest.importorskip("torch")
    train_set, val_set = small
    x = val_set.images[:64].astype(np.float32) / 255
    with anycnn.use_backend("numpy"):
        anycnn.manual_seed(0)
        spec = model_spec("lenet5")
        model = build_model(spec)
        trainer = Trainer(model, optim.Adam(model.parameters()), model_spec=spec, progress=False)
        trainer.fit(DataLoader(train_set, 64, shuffle=True), epochs=1)
        path = trainer.save(tmp_path / "numpy.safetensors")
        expected = predict(model, anycnn.asarray(x))
    with anycnn.use_backend(target) as b:
        loaded, checkpoint = load_model(path)
        assert checkpoint.metadata["backend"] == "numpy"
        assert anycnn.backend.namespace_of(loaded[0].weight.data) is not None
        logits = predict(loaded, anycnn.asarray(x))
        assert b.name == target
    np.testing.assert_array_equal(logits.argmax(axis=1), expected.argmax(axis=1))
    if target == "array_api_strict":  # NumPy underneath, but without the chunked fast paths
        assert_rounding_close(logits, expected)
    else:
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_fit_names_what_a_loader_lacks(backend, small):
    """Another framework's loader, or a plain list of batches, is refused before any step with
    the missing methods named (not an AttributeError deep inside the loop)."""
    train_set, _ = small
    model = tiny_model()
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.1), progress=False)
    batches = list(DataLoader(train_set, 64))
    with pytest.raises(ConfigError, match=r"train_loader .* builtins\.list lacks set_epoch"):
        trainer.fit(batches, epochs=1)
    with pytest.raises(ConfigError, match=r"val_loader .* lacks __len__.*DataLoader\(ArrayData"):
        trainer.fit(DataLoader(train_set, 64), iter(batches), epochs=1)
    with pytest.raises(ConfigError, match=r"^loader .*generator lacks __len__"):
        evaluate(model, (b for b in batches))
    assert trainer.epoch == 0 and trainer.history == []
    assert evaluate(model, batches)["count"] == len(train_set)  # a list has what evaluate needs
