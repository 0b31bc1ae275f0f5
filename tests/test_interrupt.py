"""Issue 26 item 2: ``Trainer.fit`` in Python keeps the CLI's promise "interrupting loses
nothing". SIGINT (or SIGTERM) sent to a script mid-epoch saves the run at the step, prints one
line on how to resume and ends with ``KeyboardInterrupt`` raised from ``fit`` (no thread-pool
traceback) or exit status 143; the kept checkpoint resumes bit for bit (NumPy) to the
uninterrupted run's numbers. In-process: without ``checkpoint_path`` the trainer keeps the run
and ``fit`` goes on; beside a ``BestCheckpoint`` file otherwise; a second signal interrupts at
once; handlers installed by someone else are left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import anycnn
from anycnn.data.dataloader import DataLoader
from anycnn.data.datasets import load_dataset
from anycnn.io import checkpoint as C
from anycnn.optim import SGD
from anycnn.train.callbacks import BestCheckpoint, Callback
from anycnn.train.trainer import Trainer
from tests.test_train import tiny_model

ROOT = Path(__file__).resolve().parents[1]
POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")

#: a script training with Trainer.fit: ``python script.py full|run|resume CHECKPOINT``
SCRIPT = textwrap.dedent('''
    import sys
    import time

    import numpy as np

    import anycnn
    from anycnn.data import DataLoader, load_dataset
    from anycnn.models import build_model, model_spec
    from anycnn.optim import OneCycle, RMSprop
    from anycnn.train import Trainer
    from anycnn.train.callbacks import Callback

    mode, path = sys.argv[1], sys.argv[2]
    data = load_dataset("mnist-sample")
    train = DataLoader(data.train.subset(np.arange(256)), 16, shuffle=True, seed=0)
    val = DataLoader(data.val.subset(np.arange(64)), 64)


    class Announce(Callback):
        def on_step_end(self, trainer, step, logs):
            print(f"step {trainer.epoch} {step}", flush=True)
            time.sleep(0.02)  # time for the signal to land inside the epoch


    anycnn.manual_seed(0)
    spec = model_spec("lenet5")
    model = build_model(spec)
    trainer = Trainer(model, RMSprop(model.parameters(), lr=1e-3, momentum=0.5),
                      schedule=OneCycle(1e-3, epochs=2, steps_per_epoch=len(train)),
                      clip_grad_norm=1.0, ema=0.9, model_spec=spec, checkpoint_path=path,
                      progress=False, callbacks=[Announce()])
    if mode == "resume":
        trainer.resume(path)
    trainer.fit(train, val, epochs=2)
    print("done", flush=True)
''')


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("script") / "train_script.py"
    path.write_text(SCRIPT)
    return path


def env():
    return {**os.environ, "ANYCNN_BACKEND": "numpy",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run(script: Path, mode: str, ckpt: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(script), mode, str(ckpt)], cwd=ckpt.parent,
                            env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "done"
    return result


def interrupt(script: Path, ckpt: Path, sig: int) -> tuple[int, str]:
    """Start the script, send ``sig`` at the 5th step of the second epoch; (status, stderr)."""
    proc = subprocess.Popen([sys.executable, str(script), "run", str(ckpt)], cwd=ckpt.parent,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "step 1 5":
                proc.send_signal(sig)
                break
        else:
            pytest.fail(f"the script ended first: {proc.communicate(timeout=60)[1]}")
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "done" not in out
    return proc.returncode, err


def comparable(path: Path) -> dict:
    ckpt = C.load_checkpoint(path)
    history = [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")}
               for r in ckpt.extra["history"]]
    return {"position": (ckpt.epoch, ckpt.step), "history": history,
            "model": ckpt.tensors, "ema": ckpt.ema_state["arrays"],
            "optimizer": ckpt.optimizer_state["arrays"]}


def assert_same_checkpoint(got: dict, want: dict) -> None:
    assert got["position"] == want["position"] == (2, 0)
    assert got["history"] == want["history"]  # losses, accuracies, rates: bitwise
    for part in ("model", "ema", "optimizer"):
        assert got[part].keys() == want[part].keys()
        for name, value in want[part].items():
            np.testing.assert_array_equal(got[part][name], value, err_msg=f"{part} {name}")


@pytest.fixture(scope="module")
def uninterrupted(script, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("full") / "run.safetensors"
    run(script, "full", ckpt)
    return comparable(ckpt)


@POSIX
def test_sigint_in_a_script_saves_prints_one_line_and_resumes_exactly(script, tmp_path,
                                                                     uninterrupted):
    ckpt = tmp_path / "run.safetensors"
    status, err = interrupt(script, ckpt, signal.SIGINT)
    assert status == -signal.SIGINT, err  # an uncaught KeyboardInterrupt, as Python ends on
    stopped = C.load_checkpoint(ckpt)
    assert stopped.epoch == 1 and 5 <= stopped.step < 16  # mid-epoch, at the step
    lines = [line for line in err.splitlines() if line.startswith("anycnn: SIGINT:")]
    assert lines == [f"anycnn: SIGINT: training stopped at epoch 2, step {stopped.step}; "
                     f"checkpoint saved to {ckpt}. Resume with trainer.resume({str(ckpt)!r}) "
                     "and the same fit(...) call"], err
    assert "SIGINT received: stopping after this step" in err
    # the KeyboardInterrupt comes from fit itself: two frames (the script, fit), no pool
    assert err.count("Traceback") == 1 and err.count('\n  File "') == 2, err
    assert "concurrent" not in err and "threading" not in err and "kernels" not in err
    assert err.rstrip().endswith(f"KeyboardInterrupt: training stopped by SIGINT at epoch 2, "
                                 f"step {stopped.step}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors"]  # no temp file
    run(script, "resume", ckpt)
    assert_same_checkpoint(comparable(ckpt), uninterrupted)


@POSIX
def test_sigterm_in_a_script_saves_and_exits_143(script, tmp_path, uninterrupted):
    ckpt = tmp_path / "run.safetensors"
    status, err = interrupt(script, ckpt, signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    step = C.load_checkpoint(ckpt).step
    assert f"anycnn: SIGTERM: training stopped at epoch 2, step {step}; checkpoint saved" in err
    run(script, "resume", ckpt)
    assert_same_checkpoint(comparable(ckpt), uninterrupted)


# --------------------------------------------------------------------------------------------
# in this process: the signal raised by a callback


class SignalAt(Callback):
    """Raise ``sig`` (``times`` times) in this process at step ``step`` of epoch ``epoch``."""

    def __init__(self, epoch: int, step: int, sig: int = signal.SIGINT, times: int = 1):
        self.at, self.sig, self.times = (epoch, step), sig, times

    def on_step_end(self, trainer, step, logs):
        if (trainer.epoch, step) == self.at:
            for _ in range(self.times):
                signal.raise_signal(self.sig)


@pytest.fixture
def default_handlers():
    """Python's own SIGINT/SIGTERM handling (what a script starts with), put back after."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, handler in old.items():
        signal.signal(s, handler)


@pytest.fixture(scope="module")
def small():
    sample = load_dataset("mnist-sample")
    return sample.train.subset(np.arange(128)), sample.val.subset(np.arange(64))


def new_trainer(**options):
    anycnn.manual_seed(0)
    model = tiny_model()
    return Trainer(model, SGD(model.parameters(), lr=0.01, momentum=0.9), progress=False,
                   **options)


def weights(trainer):
    return {k: np.array(anycnn.to_numpy(v)) for k, v in trainer.model.state_dict().items()}


def test_without_a_path_the_trainer_keeps_the_run_and_fit_goes_on(backend, small, capsys,
                                                                  default_handlers):
    loader = DataLoader(small[0], 32, shuffle=True, seed=1)
    straight = new_trainer()
    straight.fit(loader, epochs=2)

    trainer = new_trainer(callbacks=[SignalAt(1, 2)])
    with pytest.raises(KeyboardInterrupt, match="training stopped by SIGINT at epoch 2, step 2"):
        trainer.fit(loader, epochs=2)
    err = capsys.readouterr().err
    assert "anycnn: SIGINT: training stopped at epoch 2, step 2; nothing saved" in err
    assert (trainer.epoch, trainer.step, trainer.stopped) == (1, 2, "SIGINT")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    trainer.callbacks = []
    trainer.fit(loader, epochs=2)  # goes on from the step
    for k, v in weights(straight).items():
        np.testing.assert_array_equal(weights(trainer)[k], v)


def test_with_only_a_best_checkpoint_it_saves_beside_that_file(backend, small, tmp_path,
                                                               default_handlers, capsys):
    best = tmp_path / "best.safetensors"
    trainer = new_trainer(callbacks=[BestCheckpoint(best, "train_loss"),
                                     SignalAt(1, 3, signal.SIGTERM)])
    with pytest.raises(SystemExit) as stop:
        trainer.fit(DataLoader(small[0], 32), epochs=2)
    assert stop.value.code == 128 + signal.SIGTERM
    saved = C.load_checkpoint(tmp_path / "best.interrupted.safetensors")
    assert (saved.epoch, saved.step) == (1, 3)
    assert (C.load_checkpoint(best).epoch, C.load_checkpoint(best).step) == (1, 0)
    assert "checkpoint saved to " + str(tmp_path / "best.interrupted.safetensors") in \
        capsys.readouterr().err


def test_a_second_signal_interrupts_at_once(backend, small, tmp_path, default_handlers):
    path = tmp_path / "run.safetensors"
    trainer = new_trainer(checkpoint_path=path, callbacks=[SignalAt(0, 2, times=2)])
    with pytest.raises(KeyboardInterrupt) as info:
        trainer.fit(DataLoader(small[0], 32), epochs=1)
    assert "training stopped" not in str(info.value)  # raised by the second signal itself
    assert not path.exists()  # nothing saved: it did not wait for the step's end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_handlers_installed_by_someone_else_are_left_alone(backend, small, default_handlers):
    caught = []
    mine = lambda signum, frame: caught.append(signum)  # noqa: E731
    signal.signal(signal.SIGINT, mine)
    trainer = new_trainer(callbacks=[SignalAt(0, 2)])
    trainer.fit(DataLoader(small[0], 32), epochs=1)  # not stopped: the signal was not ours
    assert caught == [signal.SIGINT] and trainer.stopped is None and trainer.epoch == 1
    assert signal.getsignal(signal.SIGINT) is mine


class _Terminal:
    """A stderr that says it is a terminal and keeps what is written."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def test_the_stop_line_starts_a_new_line_only_on_a_terminal(monkeypatch, capsys):
    # issue 26 (new-user trial): `anycnn train ... 2>&1 | tail` showed a blank line before the
    # "interrupted ... resume with" line; a terminal needs the newline to leave the bar
    from anycnn.train.interrupt import StopOnSignal

    class Run:
        comm = type("Comm", (), {"rank": 0})()
        stopped = None

        def request_stop(self, reason):
            self.stopped = reason

    stopper = StopOnSignal(Run(), signals=())
    stopper._handle(signal.SIGINT, None)
    err = capsys.readouterr().err
    assert err == ("anycnn: SIGINT received: stopping after this step (send it again to exit "
                   "at once)\n")
    assert stopper.trainer.stopped == "SIGINT"
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    StopOnSignal(Run(), signals=())._handle(signal.SIGTERM, None)
    assert terminal.text.startswith("\nanycnn: SIGTERM received: stopping after this step")
