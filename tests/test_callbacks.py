"""Callbacks on Trainer.fit: hook order and arguments, stop requests, EarlyStopping (patience,
min_delta, restore_best_weights, resume), BestCheckpoint (best epoch kept, resume never replaces
it with a worse one), LR warmup (formula, exact resume), fit(epochs)/fit(more_epochs) and the
log lines that replace progress bars off a terminal; and that none of it reads the device
between two metric syncs."""

from __future__ import annotations

import io
import math
import re

import array_api_strict
import numpy as np
import pytest

import anycnn
from anycnn import checkpoint as C
from anycnn import optim
from anycnn.data.dataloader import DataLoader
from anycnn.data.datasets import load_dataset
from anycnn.errors import ConfigError
from anycnn.optim.schedules import StepDecay
from anycnn.train.callbacks import BestCheckpoint, Callback, EarlyStopping, Monitor, ProgressLog
from anycnn.train.trainer import Trainer, _Sums

from .test_train import REPRODUCIBLE, assert_same, tiny_model, weights


@pytest.fixture(scope="module")
def small():
    """(train, val): 192 and 128 images of the bundled sample (as in test_train.py)."""
    data = load_dataset("mnist-sample")
    return data.train.subset(np.arange(192)), data.val.subset(np.arange(128))


class Recorder(Callback):
    """Notes every hook call; keeps the weights seen at each epoch end."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.logs: list[dict] = []
        self.snapshots: list[dict[str, np.ndarray]] = []

    def on_train_begin(self, trainer):
        self.events.append(("train_begin", trainer.epoch, trainer.step))

    def on_epoch_begin(self, trainer, epoch):
        assert epoch == trainer.epoch + 1  # 1-based, as the progress bar prints it
        self.events.append(("epoch_begin", epoch, trainer.step))

    def on_step_end(self, trainer, step, logs):
        self.events.append(("step", trainer.epoch, step))
        self.logs.append(dict(logs))

    def on_epoch_end(self, trainer, epoch, record):
        # the epoch is 1-based everywhere users see it: as recorded and printed
        assert record is trainer.history[-1] and record["epoch"] == epoch
        assert (trainer.epoch, trainer.step) == (epoch, 0)
        self.events.append(("epoch_end", epoch, trainer.step))
        self.snapshots.append(weights(trainer.model))

    def on_train_end(self, trainer):
        self.events.append(("train_end", trainer.epoch, trainer.step))


class StopAt(Callback):
    """Requests a stop after step ``step`` of epoch index ``epoch``."""

    def __init__(self, epoch: int, step: int) -> None:
        self.at = (epoch, step)

    def on_step_end(self, trainer, step, logs):
        if (trainer.epoch, step) == self.at:
            trainer.request_stop("test")


class Schedule:
    """A schedule from a list: lr of epoch e is ``lrs[e]`` (its record's ``lr``)."""

    def __init__(self, lrs) -> None:
        self.lrs = list(lrs)

    def __call__(self, epoch: int) -> float:
        return self.lrs[epoch]


def make_trainer(seed=1, lr=3e-3, **kwargs):
    anycnn.manual_seed(seed)
    model = tiny_model()
    kwargs.setdefault("progress", False)
    return Trainer(model, optim.Adam(model.parameters(), lr=lr), **kwargs)


def train_loader(small, batch=64):
    return DataLoader(small[0], batch, shuffle=True, seed=5)


def val_loader(small):
    return DataLoader(small[1], 64)


def epochs_of(history):
    return [r["epoch"] for r in history]


# --------------------------------------------------------------------------------------------
# hooks


def test_hooks_run_in_order_with_their_arguments(backend, small, tmp_path):
    path = tmp_path / "ckpt.safetensors"
    mine, per_call = Recorder(), Recorder()
    order = []

    class Seen(Callback):
        def __init__(self, name):
            self.name = name

        def on_epoch_end(self, trainer, epoch, record):
            order.append(self.name)
            # the epoch's checkpoint is written before the epoch-end callbacks run
            assert C.load_checkpoint(path).epoch == epoch

    trainer = make_trainer(callbacks=[mine, Seen("trainer's")], checkpoint_path=path)
    trainer.fit(train_loader(small), val_loader(small), epochs=2,
                callbacks=[per_call, Seen("fit's")])
    steps = [("step", e, s) for e in range(2) for s in (1, 2, 3)]
    assert mine.events == [
        ("train_begin", 0, 0), ("epoch_begin", 1, 0), *steps[:3], ("epoch_end", 1, 0),
        ("epoch_begin", 2, 0), *steps[3:], ("epoch_end", 2, 0), ("train_end", 2, 0)]
    assert per_call.events == mine.events
    assert order == ["trainer's", "fit's"] * 2

    assert [log["global_step"] for log in mine.logs] == [1, 2, 3, 4, 5, 6]
    assert all(log["batch_size"] == 64 and log["synced"] for log in mine.logs)
    for log, record in ((mine.logs[2], trainer.history[0]), (mine.logs[5], trainer.history[1])):
        assert log["train_loss"] == record["train_loss"]  # the epoch's last step: its means
        assert log["train_accuracy"] == record["train_accuracy"]
        assert log["lr"] == record["lr"] and log["images_per_s"] > 0
    loss = mine.logs[0]["loss"]  # the step's loss, left on the device
    assert tuple(loss.shape) == () and math.isfinite(float(anycnn.to_numpy(loss)))

    # a later fit with nothing given runs only the trainer's callbacks
    mine.events.clear()
    trainer.fit(train_loader(small), epochs=3)
    assert mine.events[0] == ("train_begin", 2, 0) and len(per_call.events) == 12


def test_logs_hold_metrics_only_at_sync_points(backend, small):
    recorder = Recorder()
    trainer = make_trainer(callbacks=[recorder], sync_every=2)
    trainer.fit(DataLoader(small[0], 32), epochs=1)  # 6 steps: syncs at 2, 4 and 6
    assert [log["synced"] for log in recorder.logs] == [False, True] * 3
    for log in recorder.logs:
        assert ("train_loss" in log) == log["synced"] == ("images_per_s" in log)


def test_a_callback_can_stop_mid_epoch(backend, small):
    recorder = Recorder()
    trainer = make_trainer(callbacks=[recorder, StopAt(0, 2)])
    trainer.fit(train_loader(small), epochs=2)
    assert trainer.stopped == "test" and (trainer.epoch, trainer.step) == (0, 2)
    assert recorder.events[-1] == ("train_end", 0, 2)  # on_train_end runs after a stop too
    assert trainer.history == []


@pytest.mark.parametrize("callbacks, message", [
    ([print], "got builtin_function_or_method"),
    (Recorder(), "wrap it in"),
])
def test_callbacks_must_be_callback_objects(callbacks, message):
    with pytest.raises(ConfigError, match=message):
        make_trainer(callbacks=callbacks)


# --------------------------------------------------------------------------------------------
# fit(epochs=...) and fit(more_epochs=...)


def test_fit_with_nothing_to_do_warns_and_more_epochs_trains_more(backend, small):
    recorder = Recorder()
    trainer = make_trainer(callbacks=[recorder])
    loader = train_loader(small)
    trainer.fit(loader, epochs=1)
    events = list(recorder.events)
    with pytest.warns(UserWarning, match=r"fit\(epochs=1\) has nothing to do: 1 epoch"):
        assert len(trainer.fit(loader, epochs=1)) == 1
    assert recorder.events == events  # no callback ran
    assert epochs_of(trainer.fit(loader, more_epochs=2)) == [1, 2, 3]
    # stopped mid-epoch: more_epochs=1 finishes that epoch
    trainer.fit(loader, more_epochs=2, callbacks=[StopAt(3, 1)])
    assert (trainer.epoch, trainer.step) == (3, 1)
    trainer.fit(loader, more_epochs=1)
    assert (trainer.epoch, trainer.step) == (4, 0) and epochs_of(trainer.history)[-1] == 4
    for kwargs, message in (({"epochs": 5, "more_epochs": 1}, "not both"),
                            ({"epochs": 0}, "epochs must be an integer >= 1"),
                            ({"more_epochs": 0}, "more_epochs must be an integer >= 1")):
        with pytest.raises(ConfigError, match=message):
            trainer.fit(loader, **kwargs)


# --------------------------------------------------------------------------------------------
# early stopping

#: a learning rate that rises by less and less, then stays flat (monitored with mode="max")
RISING = [0.010, 0.011, 0.0125, 0.013, 0.013, 0.013, 0.013, 0.013]


@pytest.mark.parametrize("min_delta, stop_epoch, best_epoch", [(0.0, 6, 4), (0.0015, 5, 3)])
def test_early_stopping_stops_after_patience(backend, small, min_delta, stop_epoch, best_epoch):
    early = EarlyStopping("lr", patience=2, min_delta=min_delta, mode="max")
    trainer = make_trainer(schedule=Schedule(RISING), callbacks=[early])
    trainer.fit(train_loader(small), epochs=len(RISING))
    assert epochs_of(trainer.history) == list(range(1, stop_epoch + 1))
    assert (early.stopped_epoch, early.best_epoch, early.wait) == (stop_epoch, best_epoch, 2)
    assert early.best == RISING[best_epoch - 1]
    assert trainer.stopped.startswith("early stopping: lr did not improve for 2 epoch(s)")
    # the stop was honoured: a later fit trains again (and stops at the next flat epoch)
    trainer.fit(train_loader(small), more_epochs=2)
    assert epochs_of(trainer.history)[-1] == stop_epoch + 1


def test_early_stopping_with_patience_zero_stops_at_the_first_flat_epoch(backend, small):
    early = EarlyStopping("lr", patience=0, mode="max")
    trainer = make_trainer(schedule=Schedule([0.01, 0.02, 0.02, 0.03, 0.03]), callbacks=[early])
    trainer.fit(train_loader(small), epochs=5)
    assert early.stopped_epoch == 3 and len(trainer.history) == 3


def test_a_stop_asked_at_the_last_epoch_does_not_block_the_next_fit(backend, small):
    early = EarlyStopping("lr", patience=0, mode="max")
    trainer = make_trainer(schedule=Schedule([0.01, 0.02, 0.02, 0.03]), callbacks=[early])
    trainer.fit(train_loader(small), epochs=3)
    assert early.stopped_epoch == 3 and trainer.stopped.startswith("early stopping")
    trainer.fit(train_loader(small), more_epochs=1)  # epoch 4 improves: no stop
    assert len(trainer.history) == 4 and trainer.stopped is None


def test_early_stopping_on_val_loss_restores_the_best_weights(backend, small, tmp_path):
    """Only the first epoch counts as an improvement (min_delta is huge): stopped after
    epoch 3 with patience 2, the model gets epoch 1's parameters and BatchNorm statistics back,
    while the checkpoint keeps the last epoch (to resume from)."""
    recorder = Recorder()
    early = EarlyStopping(patience=2, min_delta=1e6, restore_best_weights=True)
    path = tmp_path / "ckpt.safetensors"
    trainer = make_trainer(callbacks=[recorder, early], checkpoint_path=path)
    trainer.fit(train_loader(small), val_loader(small), epochs=6)
    assert (early.stopped_epoch, early.best_epoch) == (3, 1)
    assert early.best == trainer.history[0]["val_loss"]
    restored, first, last = weights(trainer.model), recorder.snapshots[0], recorder.snapshots[-1]
    assert any(k.endswith("running_mean") for k in restored)
    for name, value in first.items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)
        assert not np.array_equal(value, last[name]), name  # training did change it
    saved = C.load_checkpoint(path)
    assert saved.epoch == 3
    for name, value in last.items():
        np.testing.assert_array_equal(saved.tensors[name], value, err_msg=name)


def test_early_stopping_keeps_the_last_weights_unless_asked(backend, small):
    recorder = Recorder()
    trainer = make_trainer(callbacks=[recorder, EarlyStopping(patience=1, min_delta=1e6)])
    trainer.fit(train_loader(small), val_loader(small), epochs=4)
    assert len(trainer.history) == 2
    for name, value in weights(trainer.model).items():
        np.testing.assert_array_equal(value, recorder.snapshots[-1][name], err_msg=name)


def test_early_stopping_survives_resume(backend, small, tmp_path):
    """Counting goes on from the history in the checkpoint: the resumed run stops where the
    uninterrupted one did (a fresh count would stop two epochs later)."""
    straight = EarlyStopping("lr", patience=2, min_delta=0.0015, mode="max")
    make_trainer(schedule=Schedule(RISING), callbacks=[straight]).fit(
        train_loader(small), epochs=len(RISING))
    assert straight.stopped_epoch == 5

    path = tmp_path / "ckpt.safetensors"
    first = make_trainer(schedule=Schedule(RISING), checkpoint_path=path,
                         callbacks=[EarlyStopping("lr", 2, 0.0015, "max")])
    first.fit(train_loader(small), epochs=4)
    resumed_early = EarlyStopping("lr", 2, 0.0015, "max")
    resumed = make_trainer(seed=7, schedule=Schedule(RISING), callbacks=[resumed_early])
    resumed.resume(path)
    resumed.fit(train_loader(small), epochs=len(RISING))
    assert resumed_early.stopped_epoch == 5 and len(resumed.history) == 5


def test_restore_best_weights_after_resuming_right_after_the_best_epoch(backend, small,
                                                                        tmp_path):
    path = tmp_path / "ckpt.safetensors"
    first = make_trainer(checkpoint_path=path)
    first.fit(train_loader(small), val_loader(small), epochs=1)
    best = weights(first.model)
    early = EarlyStopping(patience=1, min_delta=1e6, restore_best_weights=True)
    resumed = make_trainer(seed=7, callbacks=[early])
    resumed.resume(path)
    resumed.fit(train_loader(small), val_loader(small), epochs=5)
    assert (early.best_epoch, early.stopped_epoch) == (1, 2)
    for name, value in weights(resumed.model).items():
        np.testing.assert_array_equal(value, best[name], err_msg=name)


@pytest.mark.parametrize("callback, fragment", [
    (EarlyStopping(), "EarlyStopping monitors 'val_loss'"),
    (BestCheckpoint("never.safetensors"), "BestCheckpoint monitors 'val_loss'"),
    (EarlyStopping("val_los", mode="min"), "EarlyStopping monitors 'val_los'"),
])
def test_monitoring_a_key_the_records_lack_is_a_config_error(backend, small, callback,
                                                             fragment):
    trainer = make_trainer(callbacks=[callback])
    with pytest.raises(ConfigError) as info:
        trainer.fit(train_loader(small), epochs=2)  # no validation loader
    message = str(info.value)
    assert fragment in message
    assert ("needs a validation loader" in message) == fragment.endswith("'val_loss'")
    assert message.endswith("available: lr, train_loss, train_accuracy, seconds, images_per_s")
    assert (trainer.epoch, trainer.step, trainer.history) == (0, 0, [])  # nothing trained


@pytest.mark.parametrize("make, message", [
    (lambda: EarlyStopping("lr"), "mode='auto' cannot tell whether 'lr'"),
    (lambda: EarlyStopping(mode="down"), "mode must be 'auto', 'min' or 'max'"),
    (lambda: EarlyStopping(patience=-1), "patience must be an integer >= 0"),
    (lambda: EarlyStopping(patience=1.5), "patience must be an integer >= 0"),
    (lambda: EarlyStopping(min_delta=-0.1), "min_delta must be a finite number >= 0"),
    (lambda: EarlyStopping(min_delta=math.nan), "min_delta must be a finite number >= 0"),
    (lambda: BestCheckpoint("x", monitor=""), "monitor must be a record key"),
    (lambda: ProgressLog(every=-2), "every must be an integer >= 0"),
    (lambda: make_trainer(warmup_steps=-1), "warmup_steps must be an integer >= 0"),
])
def test_invalid_callback_options(make, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make()


def test_monitor_modes_and_min_delta():
    loss, acc = Monitor("t", "val_loss"), Monitor("t", "val_accuracy", min_delta=0.1)
    assert loss.mode == "min" and acc.mode == "max"
    assert loss.better(0.5, 0.6) and not loss.better(0.6, 0.6) and not loss.better(math.nan, 1)
    assert acc.better(0.81, 0.7) and not acc.better(0.79, 0.7)
    state = loss.standing([{"epoch": 1, "val_loss": 2.0}, {"epoch": 2, "val_loss": None},
                           {"epoch": 3, "val_loss": 1.0}, {"epoch": 4, "val_loss": 1.5}])
    assert (state.best, state.best_epoch, state.wait, state.improved) == (1.0, 3, 1, False)


# --------------------------------------------------------------------------------------------
# best checkpoint


def test_best_checkpoint_holds_the_best_epoch(backend, small, tmp_path):
    best_path, path = tmp_path / "best.safetensors", tmp_path / "ckpt.safetensors"
    held = []

    class WhatIsHeld(Callback):
        def on_epoch_end(self, trainer, epoch, record):
            held.append(C.load_checkpoint(best_path).epoch)

    recorder = Recorder()
    by_lr = BestCheckpoint(best_path, monitor="lr", mode="max")
    trainer = make_trainer(schedule=Schedule([0.01, 0.03, 0.02, 0.04, 0.01]),
                           checkpoint_path=path, callbacks=[recorder, by_lr, WhatIsHeld()])
    trainer.fit(train_loader(small), epochs=5)
    assert held == [1, 2, 2, 4, 4]
    assert (by_lr.best, by_lr.best_epoch) == (0.04, 4)
    saved = C.load_checkpoint(best_path)
    for name, value in recorder.snapshots[3].items():
        np.testing.assert_array_equal(saved.tensors[name], value, err_msg=name)
    assert len(saved.extra["history"]) == 4  # a full training checkpoint of that epoch
    assert trainer.last_checkpoint == path

    # the default: lowest validation loss
    by_val = BestCheckpoint(tmp_path / "val.safetensors")
    trainer = make_trainer(callbacks=[by_val])
    trainer.fit(train_loader(small), val_loader(small), epochs=3)
    losses = [r["val_loss"] for r in trainer.history]
    assert by_val.best_epoch == int(np.argmin(losses)) + 1 and by_val.best == min(losses)
    assert C.load_checkpoint(by_val.path).epoch == by_val.best_epoch


def test_best_checkpoint_survives_resume(backend, small, tmp_path):
    """Epoch 1 is the best; after a resume at epoch 2, epochs 3 and 4 beat epoch 2 but not
    epoch 1, so best.safetensors must keep epoch 1."""
    best_path, path = tmp_path / "best.safetensors", tmp_path / "ckpt.safetensors"
    lrs = Schedule([0.04, 0.01, 0.02, 0.03])
    first = make_trainer(schedule=lrs, checkpoint_path=path,
                         callbacks=[BestCheckpoint(best_path, "lr", "max")])
    first.fit(train_loader(small), epochs=2)
    content = best_path.read_bytes()
    best = BestCheckpoint(best_path, "lr", "max")
    resumed = make_trainer(seed=7, schedule=lrs, checkpoint_path=path, callbacks=[best])
    resumed.resume(path)
    resumed.fit(train_loader(small), epochs=4)
    assert best_path.read_bytes() == content and (best.best, best.best_epoch) == (0.04, 1)


def test_best_checkpoint_is_rewritten_when_resumed_right_after_the_best_epoch(backend, small,
                                                                             tmp_path):
    """A crash between the epoch's checkpoint and best.safetensors loses nothing."""
    best_path, path = tmp_path / "best.safetensors", tmp_path / "ckpt.safetensors"
    first = make_trainer(checkpoint_path=path, callbacks=[BestCheckpoint(best_path)])
    first.fit(train_loader(small), val_loader(small), epochs=1)
    best_path.unlink()
    resumed = make_trainer(seed=7, callbacks=[BestCheckpoint(best_path)])
    resumed.resume(path)
    resumed.fit(train_loader(small), val_loader(small), epochs=2, callbacks=[StopAt(1, 1)])
    saved = C.load_checkpoint(best_path)
    assert saved.epoch == 1
    for name, value in C.load_checkpoint(path).tensors.items():
        np.testing.assert_array_equal(saved.tensors[name], value, err_msg=name)


# --------------------------------------------------------------------------------------------
# warmup


class LrSpy:
    """The learning rate each optimizer step really used."""

    def __init__(self, trainer) -> None:
        self.used = []
        step = trainer.optimizer.step

        def spy():
            self.used.append(trainer.optimizer.lr)
            step()

        trainer.optimizer.step = spy


def test_warmup_ramps_each_step_then_the_schedule_takes_over(backend, small):
    schedule = StepDecay(0.01, step_size=1, gamma=0.5)
    trainer = make_trainer(schedule=schedule, warmup_steps=5)
    spy, recorder = LrSpy(trainer), Recorder()
    trainer.fit(train_loader(small), epochs=3, callbacks=[recorder])  # 3 steps per epoch
    expected = [0.01 * 1 / 5, 0.01 * 2 / 5, 0.01 * 3 / 5,  # epoch 1: lr * s / N
                0.005 * 4 / 5, 0.005,                      # epoch 2, steps 4 and 5 = N
                0.005, 0.0025, 0.0025, 0.0025]
    assert spy.used == expected
    assert [log["lr"] for log in recorder.logs] == expected
    assert [r["lr"] for r in trainer.history] == [0.01 * 3 / 5, 0.005, 0.0025]
    # no schedule: the ramp goes up to the optimizer's learning rate
    trainer = make_trainer(lr=0.02, warmup_steps=4)
    spy = LrSpy(trainer)
    trainer.fit(train_loader(small), epochs=2)
    assert spy.used == [0.02 * 1 / 4, 0.02 * 2 / 4, 0.02 * 3 / 4, 0.02, 0.02, 0.02]


def warm_run(small, seed, path=None, callbacks=()):
    trainer = make_trainer(seed=seed, schedule=StepDecay(3e-3, step_size=1, gamma=0.7),
                           warmup_steps=8, checkpoint_path=path, callbacks=list(callbacks))
    return trainer, DataLoader(small[0], 32, shuffle=True, seed=5)  # 6 steps per epoch


@pytest.mark.parametrize("stop_epoch, stop_step", [(0, 2), (1, 1)])
def test_warmup_survives_resume_exactly(backend, small, tmp_path, stop_epoch, stop_step):
    straight, loader = warm_run(small, seed=1)
    straight.fit(loader, val_loader(small), epochs=3)

    first, loader = warm_run(small, seed=1, callbacks=[StopAt(stop_epoch, stop_step)])
    first.fit(loader, val_loader(small), epochs=3)
    path = first.save(tmp_path / "stopped.safetensors")
    resumed, loader = warm_run(small, seed=42)
    resumed.resume(path)
    resumed.fit(loader, val_loader(small), epochs=3)
    for name, value in weights(straight.model).items():
        assert_same(backend, weights(resumed.model)[name], value)
    for got, want in zip(resumed.history, straight.history, strict=True):
        for key in REPRODUCIBLE:
            assert_same(backend, np.float64(got[key]), np.float64(want[key]))


# --------------------------------------------------------------------------------------------
# log lines instead of progress bars

EPOCH_LINE = r"epoch {e}/{n}: train loss \d+\.\d{{4}} acc \d\.\d{{4}} \| val loss \d+\.\d{{4}} " \
             r"acc \d\.\d{{4}} \| \d+ img/s, \d+\.\d s"


def test_progress_off_a_terminal_prints_one_line_per_epoch(backend, small, capsys):
    trainer = make_trainer(progress=True)  # capsys's stderr is not a terminal
    trainer.fit(train_loader(small), val_loader(small), epochs=2)
    out, err = capsys.readouterr()
    assert out == "" and "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 2, err
    for e, line in enumerate(lines, start=1):
        assert re.fullmatch(EPOCH_LINE.format(e=e, n=2), line), line


def test_progress_on_a_terminal_draws_bars_and_no_lines(backend, small, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    make_trainer(progress=True).fit(train_loader(small), val_loader(small), epochs=1)
    assert "\r" in terminal.getvalue() and "train loss" not in terminal.getvalue()


@pytest.mark.parametrize("sync_every, steps", [(1, [2, 4, 6]), (4, [4, 6])])
def test_progress_log_every_n_steps(backend, small, capsys, sync_every, steps):
    trainer = make_trainer(sync_every=sync_every)
    trainer.fit(DataLoader(small[0], 32), val_loader(small), epochs=1,
                callbacks=[ProgressLog(every=2)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(steps) + 1
    for step, line in zip(steps, lines):
        assert re.fullmatch(rf"epoch 1/1 step {step}/6: loss \d+\.\d{{4}} acc \d\.\d{{4}} \| "
                            r"\d+ img/s", line), line
    assert re.fullmatch(EPOCH_LINE.format(e=1, n=1), lines[-1]), lines[-1]


# --------------------------------------------------------------------------------------------
# no device reads between syncs


def test_callbacks_and_warmup_read_nothing_from_the_device_between_syncs(monkeypatch, small):
    """As tests/test_no_host_sync.py, through fit with callbacks: array-api-strict arrays refuse
    every conversion to the host while the whole epoch runs (the metric syncs are stubbed)."""
    train = small[0].subset(np.arange(64))
    with anycnn.use_backend("array_api_strict"):
        recorder = Recorder()
        recorder.on_epoch_end = lambda *args: None  # its weight snapshots read the device
        callbacks = [recorder, ProgressLog(every=1), EarlyStopping("train_loss"),
                     BestCheckpoint("unused.safetensors", "train_loss")]
        trainer = make_trainer(sync_every=1000, warmup_steps=3, callbacks=callbacks)
        loader = DataLoader(train, 16, shuffle=True, device_resident=True)
        next(iter(loader))  # the one-off upload of the dataset

        def refuse(self, *args, **kwargs):
            raise AssertionError("device-to-host read during training")

        for name in ("__bool__", "__int__", "__float__", "__index__", "__array__",
                     "__dlpack__"):
            monkeypatch.setattr(array_api_strict._array_object.Array, name, refuse)
        monkeypatch.setattr(_Sums, "host", lambda self: (1.0, 0.0, self.seen))
        monkeypatch.setattr(BestCheckpoint, "_save", lambda self, trainer: None)
        trainer.fit(loader, epochs=1)
    assert [log["synced"] for log in recorder.logs] == [False, False, False, True]
    assert [log["global_step"] for log in recorder.logs] == [1, 2, 3, 4]
