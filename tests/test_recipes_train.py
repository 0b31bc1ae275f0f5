"""Issue 26 item 6 in the Trainer and the CLI: per-step schedules set every step's rate,
ReduceLROnPlateau follows the history, clipping equals a hand-written loop, the weight EMA is
what validation measures and what checkpoints, ``load_model`` and ``anycnn evaluate`` give, and
a run with all of them resumes bit for bit on NumPy (and array-api-strict)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import anycnn
from anycnn import optim
from anycnn.data.dataloader import DataLoader
from anycnn.data.datasets import load_dataset
from anycnn.errors import CheckpointError, ConfigError
from anycnn.io import checkpoint as C
from anycnn.models import build_model, model_spec
from anycnn.nn import SoftmaxCrossEntropy
from anycnn.optim import EMA, Cosine, OneCycle, ReduceLROnPlateau, RMSprop
from anycnn.train.callbacks import Callback
from anycnn.train.trainer import Trainer, evaluate
from tests.cli_run import cli, keep_backend
from tests.test_train import StopAfter, assert_same, tiny_model


@pytest.fixture(scope="module")
def small():
    sample = load_dataset("mnist-sample")
    return sample.train.subset(np.arange(192)), sample.val.subset(np.arange(128))


class Rates(Callback):
    """Every step's learning rate, as the step used it."""

    def __init__(self):
        self.lrs = []

    def on_step_end(self, trainer, step, logs):
        self.lrs.append(logs["lr"])


def host_state(arrays):
    return {k: np.array(anycnn.to_numpy(v), copy=True) for k, v in arrays.items()}


# --------------------------------------------------------------------------------------------
# schedules in the trainer


@pytest.mark.parametrize("make", [
    lambda spe: OneCycle(0.01, epochs=2, steps_per_epoch=spe),
    lambda spe: Cosine(0.01, total_steps=2 * spe, min_lr=1e-4),
], ids=["onecycle", "cosine-per-step"])
def test_a_per_step_schedule_sets_every_step_and_warms_up(backend, small, make):
    loader = DataLoader(small[0], 32, shuffle=True, seed=0)
    schedule = make(len(loader))
    anycnn.manual_seed(0)
    model = tiny_model()
    rates = Rates()
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.01), schedule=schedule,
                      warmup_steps=3, progress=False, callbacks=[rates])
    trainer.fit(loader, epochs=2)
    want = [schedule(t) * (t + 1) / 3 if t < 2 else schedule(t) for t in range(2 * len(loader))]
    assert rates.lrs == want
    assert len(set(rates.lrs)) == len(rates.lrs)  # a new rate at every step
    assert [r["lr"] for r in trainer.history] == [want[len(loader) - 1], want[-1]]


def test_a_cycle_shorter_than_the_run_is_refused_before_training(backend, small):
    loader = DataLoader(small[0], 32)
    model = tiny_model()
    before = host_state(model.state_dict())
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.01), progress=False,
                      schedule=OneCycle(0.01, epochs=1, steps_per_epoch=len(loader)))
    with pytest.raises(ConfigError, match="OneCycle covers 6 steps, but the run would train 12"):
        trainer.fit(loader, epochs=2)
    for k, v in host_state(model.state_dict()).items():
        np.testing.assert_array_equal(v, before[k])
    with pytest.raises(ConfigError, match="interval must be 'epoch' or 'step'"):
        Trainer(model, optim.SGD(model.parameters(), lr=0.01),
                schedule=type("S", (), {"interval": "batch", "__call__": lambda s, t: 1.0})())


def test_reduce_on_plateau_needs_its_metric(backend, small):
    model = tiny_model()
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.01), progress=False,
                      schedule=ReduceLROnPlateau(0.01))
    with pytest.raises(ConfigError, match=r"monitors 'val_loss', which the epoch records will "
                                          r"not hold .*validation loader"):
        trainer.fit(DataLoader(small[0], 32), epochs=1)


def test_reduce_on_plateau_divides_the_rate_from_the_history(backend, small):
    # train_loss goes down: with mode="max" every epoch after the first is "no better"
    schedule = ReduceLROnPlateau(0.02, monitor="train_loss", mode="max", patience=0, factor=0.5)
    anycnn.manual_seed(0)
    model = tiny_model()
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.02), schedule=schedule,
                      progress=False)
    trainer.fit(DataLoader(small[0], 32, shuffle=True, seed=0), epochs=4)
    lrs = [r["lr"] for r in trainer.history]
    assert lrs == [schedule(e, trainer.history) for e in range(4)] == [0.02, 0.02, 0.01, 0.005]


# --------------------------------------------------------------------------------------------
# clipping and EMA in the trainer


def clipped_by_hand(small, norm, value, steps=5):
    """The steps a Trainer with clipping runs, written out."""
    anycnn.manual_seed(3)
    model = tiny_model()
    opt = RMSprop(model.parameters(), lr=1e-2, momentum=0.5)
    loss_fn = SoftmaxCrossEntropy()
    loader = DataLoader(small[0], 32, shuffle=True, seed=0)
    loader.set_epoch(0)
    model.train()
    for i, (x, y) in enumerate(loader):
        if i == steps:
            break
        model.zero_grad()
        loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward(), input_grad=False)
        if value is not None:
            optim.clip_grad_value_(model.parameters(), value)
        if norm is not None:
            optim.clip_grad_norm_(model.parameters(), norm)
        opt.step()
    return host_state(model.state_dict())


def test_trainer_clipping_equals_a_hand_written_loop(backend, small):
    anycnn.manual_seed(3)
    model = tiny_model()
    trainer = Trainer(model, RMSprop(model.parameters(), lr=1e-2, momentum=0.5), progress=False,
                      clip_grad_norm=0.5, clip_grad_value=0.05)
    stopper = StopAfter(DataLoader(small[0], 32, shuffle=True, seed=0), 0, 5)
    stopper.trainer = trainer
    trainer.fit(stopper, epochs=1)
    assert trainer.step == 5
    want = clipped_by_hand(small, 0.5, 0.05)
    for k, v in host_state(model.state_dict()).items():
        assert_same(backend, v, want[k])
    unclipped = clipped_by_hand(small, None, None)
    assert any(not np.allclose(unclipped[k], want[k]) for k in want)  # clipping acted
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ConfigError, match="clip_grad_norm must be a finite number > 0"):
            Trainer(model, RMSprop(model.parameters()), clip_grad_norm=bad)


def test_ema_is_validated_saved_and_loaded(backend, small, tmp_path):
    anycnn.manual_seed(0)
    spec = model_spec("lenet5")
    model = build_model(spec)
    val = DataLoader(small[1], 64)
    path = tmp_path / "run.safetensors"
    trainer = Trainer(model, optim.Adam(model.parameters(), lr=3e-3), model_spec=spec,
                      ema=0.9, checkpoint_path=path, progress=False)
    assert isinstance(trainer.ema, EMA) and trainer.ema.decay == 0.9
    trainer.fit(DataLoader(small[0], 32, shuffle=True, seed=0), val, epochs=2)
    assert trainer.ema.updates == 12
    raw = evaluate(model, val)
    with trainer.ema.applied():
        averaged = evaluate(model, val)
    assert trainer.history[-1]["val_loss"] == averaged["loss"] != raw["loss"]

    saved = C.load_checkpoint(path)
    assert saved.ema_state["updates"] == 12 and saved.ema_state["decay"] == 0.9
    for k, v in host_state(trainer.ema.averages).items():
        np.testing.assert_array_equal(saved.ema_state["arrays"][k], v)
    for k, v in host_state(model.state_dict()).items():
        np.testing.assert_array_equal(saved.tensors[k], v)
    loaded, _ = C.load_model(path)  # the averages: what validation measured
    assert evaluate(loaded, val)["loss"] == pytest.approx(averaged["loss"], rel=1e-6)
    loaded_raw, _ = C.load_model(path, ema=False)
    assert evaluate(loaded_raw, val)["loss"] == pytest.approx(raw["loss"], rel=1e-6)
    into = anycnn.load_weights(build_model(spec), path)
    np.testing.assert_array_equal(anycnn.to_numpy(into[0].weight.data),
                                  saved.ema_state["arrays"]["0.weight"])

    plain = tmp_path / "plain.safetensors"
    anycnn.save(model, plain)
    with pytest.raises(CheckpointError, match="holds no weight averages"):
        C.load_model(plain, ema=True)
    with pytest.raises(ConfigError, match="ema must average the trainer's model"):
        Trainer(model, optim.Adam(model.parameters()), ema=EMA(build_model(spec), 0.9))


def test_resuming_with_and_without_averages_warns(backend, small, tmp_path):
    model = tiny_model()
    with_ema = Trainer(model, optim.SGD(model.parameters(), lr=0.01), ema=0.5, progress=False)
    with_ema.fit(DataLoader(small[0], 64), epochs=1)
    path = with_ema.save(tmp_path / "a.safetensors")
    with pytest.warns(UserWarning, match="holds weight averages .* they are not used"):
        Trainer(model, optim.SGD(model.parameters(), lr=0.01), progress=False).resume(path)
    without = Trainer(model, optim.SGD(model.parameters(), lr=0.01), progress=False)
    without.fit(DataLoader(small[0], 64), epochs=1)
    path = without.save(tmp_path / "b.safetensors")
    resumed = Trainer(model, optim.SGD(model.parameters(), lr=0.01), ema=0.5, progress=False)
    resumed.ema.updates = 7
    with pytest.warns(UserWarning, match="holds no weight averages"):
        resumed.resume(path)
    assert resumed.ema.updates == 0
    for k, v in host_state(model.state_dict()).items():
        np.testing.assert_array_equal(host_state(resumed.ema.averages)[k], v)


# --------------------------------------------------------------------------------------------
# exact resume with every recipe


def recipe_run(train_set, seed, *, plateau=False):
    """RMSprop, OneCycle (or plateau) with warmup, clipping by norm and value, and an EMA."""
    anycnn.manual_seed(seed)
    model = tiny_model()
    loader = DataLoader(train_set, 32, shuffle=True, seed=5)
    schedule = (ReduceLROnPlateau(3e-3, monitor="train_loss", mode="max", patience=0)
                if plateau else OneCycle(3e-3, epochs=3, steps_per_epoch=len(loader)))
    trainer = Trainer(model, RMSprop(model.parameters(), lr=3e-3, momentum=0.5, centered=True),
                      schedule=schedule, warmup_steps=4, clip_grad_norm=1.0,
                      clip_grad_value=0.05, ema=0.8, progress=False)
    return trainer, loader


@pytest.mark.parametrize("plateau, stop_epoch, k", [(False, 1, 2), (False, 0, 5),
                                                    (True, 1, 3)],
                         ids=["onecycle-epoch2", "onecycle-epoch1", "plateau-epoch2"])
def test_every_recipe_resumes_exactly(backend, small, tmp_path, plateau, stop_epoch, k):
    val = DataLoader(small[1], 64)
    straight, loader = recipe_run(small[0], 1, plateau=plateau)
    straight.fit(loader, val, epochs=3)

    first, loader = recipe_run(small[0], 1, plateau=plateau)
    stopper = StopAfter(loader, stop_epoch, k)
    stopper.trainer = first
    first.fit(stopper, val, epochs=3)
    assert (first.epoch, first.step) == (stop_epoch, k)
    path = first.save(tmp_path / "stopped.safetensors")

    resumed, loader = recipe_run(small[0], 42, plateau=plateau)  # other weights and RNG
    resumed.resume(path)
    resumed.fit(loader, val, epochs=3)
    for name, value in host_state(straight.model.state_dict()).items():
        assert_same(backend, host_state(resumed.model.state_dict())[name], value)
    for name, value in host_state(straight.ema.averages).items():
        assert_same(backend, host_state(resumed.ema.averages)[name], value)
    assert resumed.ema.updates == straight.ema.updates == 18
    for name, value in host_state(straight.optimizer.state_dict()["arrays"]).items():
        assert_same(backend, host_state(resumed.optimizer.state_dict()["arrays"])[name], value)
    for got, want in zip(resumed.history, straight.history, strict=True):
        for key in ("lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert_same(backend, np.float64(got[key]), np.float64(want[key]))
    if plateau:
        assert [r["lr"] for r in straight.history] == [3e-3, 3e-3, 3e-3 * 0.1]


# --------------------------------------------------------------------------------------------
# the command line


def test_cli_trains_with_the_recipes_and_resumes_exactly(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    common = ["--limit", "128", "--batch-size", "32", "--optimizer", "rmsprop", "--momentum",
              "0.5", "--clip-grad-norm", "1", "--clip-grad-value", "0.5", "--ema", "0.9",
              "--quiet", "--backend", "numpy"]
    plateau = ["--schedule", "plateau", "--monitor", "train_loss", "--plateau-patience", "0"]
    with keep_backend(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, _, err = cli(capsys, "train", "--epochs", "2", "--out", "cycle", "--schedule",
                           "onecycle", *common)
        assert code == 0, err
        code, out, err = cli(capsys, "evaluate", "cycle", "--json", "--backend", "numpy")
        assert code == 0, err
        code, _, err = cli(capsys, "train", "--epochs", "3", "--out", "straight", *plateau,
                           *common)
        assert code == 0, err
        code, _, err = cli(capsys, "train", "--epochs", "1", "--out", "part", *plateau, *common)
        assert code == 0, err
        code, _, err = cli(capsys, "train", "--resume", "part", "--epochs", "3", "--quiet")
        assert code == 0, err

    cycle = C.load_checkpoint(tmp_path / "cycle" / "checkpoint.safetensors")
    assert cycle.config["ema"] == 0.9 and cycle.config["optimizer"] == "rmsprop"
    assert cycle.optimizer_state["type"] == "RMSprop"
    assert cycle.optimizer_state["param_groups"][0]["momentum"] == 0.5
    assert cycle.ema_state["updates"] == 8
    history = json.loads((tmp_path / "cycle" / "history.json").read_text())
    schedule = OneCycle(1e-3, epochs=2, steps_per_epoch=4)
    assert [r["lr"] for r in history] == [schedule(3), schedule(7)]
    # evaluate uses the averages, as validation did
    assert json.loads(out)["loss"] == pytest.approx(history[-1]["val_loss"], rel=1e-5)

    straight = C.load_checkpoint(tmp_path / "straight" / "checkpoint.safetensors")
    resumed = C.load_checkpoint(tmp_path / "part" / "checkpoint.safetensors")
    for name, value in straight.tensors.items():
        np.testing.assert_array_equal(resumed.tensors[name], value)
        np.testing.assert_array_equal(resumed.ema_state["arrays"][name],
                                      straight.ema_state["arrays"][name])
    history = json.loads((tmp_path / "straight" / "history.json").read_text())
    fold = ReduceLROnPlateau(1e-3, monitor="train_loss", patience=0)
    lrs = [r["lr"] for r in history]
    assert lrs == [fold(e, history) for e in range(3)]
    assert [r["lr"] for r in json.loads((tmp_path / "part" / "history.json").read_text())] == lrs


def test_a_checkpoint_with_broken_averages_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save

    with anycnn.use_backend("numpy"):
        model = tiny_model()
        trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.01), ema=0.5,
                          progress=False)
        path = trainer.save(tmp_path / "good.safetensors")
    with safe_open(str(path), "np") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert json.loads(metadata["ema"]) == {"decay": 0.5, "warmup": False, "updates": 0}

    def broken(name, tensors, metadata):
        bad = tmp_path / name
        bad.write_bytes(save(tensors, metadata=metadata))
        return bad

    no_meta = broken("a.safetensors", tensors, {k: v for k, v in metadata.items() if k != "ema"})
    with pytest.raises(CheckpointError, match="weight-average tensors present but no ema"):
        C.load_checkpoint(no_meta)
    missing = broken("b.safetensors", {k: v for k, v in tensors.items() if k != "ema.6.bias"},
                     metadata)
    with pytest.raises(CheckpointError, match=r"averages \(ema\.\*\) do not hold the same"):
        C.load_checkpoint(missing)
    not_json = broken("c.safetensors", tensors, {**metadata, "ema": "{"})
    with pytest.raises(CheckpointError, match="metadata 'ema' is not valid JSON"):
        C.load_checkpoint(not_json)
