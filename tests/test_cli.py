"""The ``anycnn`` command line: train / evaluate / info / plot, in-process through
``anycnn.cli.commands`` and as ``python -m anycnn`` subprocesses; user mistakes give one error line,
exit status 2 and no traceback.

The runs use the backend under test (``ANYCNN_BACKEND``), lenet5 and ``--limit`` to stay fast.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import anycnn
from anycnn import backend as backend_module
from anycnn.backend import BACKEND_NAMES, CHOICES
from anycnn.cli.commands import main
from anycnn.data.datasets import DATASETS
from anycnn.models import MODELS
from anycnn.optim.optimizers import OPTIMIZERS
from anycnn.optim.schedules import SCHEDULES

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--epochs", "1", "--limit", "256", "--batch-size", "64", "--quiet"]
RECORD_KEYS = {"epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
               "seconds", "images_per_s"}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run in a scratch folder, and put back whichever backend was current (the CLI's
    ``--backend`` switches it for the rest of the process)."""
    monkeypatch.chdir(tmp_path)
    saved = backend_module._current
    yield
    backend_module._current = saved


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def python_m_anycnn(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "anycnn", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run shared by the tests that need a checkpoint or a history."""
    out = tmp_path_factory.mktemp("run") / "lenet5"
    saved = backend_module._current
    try:
        assert main(["train", *QUICK, "--out", str(out)]) == 0
    finally:
        backend_module._current = saved
    return out


def assert_usage_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("anycnn: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


# --------------------------------------------------------------------------------------------
# train


def test_train_writes_checkpoint_history_and_final_line(capsys, tmp_path):
    code, out, err = cli(capsys, "train", *QUICK, "--out", tmp_path / "run")
    assert code == 0, err
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file()
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history) == 1 and RECORD_KEYS <= set(history[0])
    record = history[0]
    assert record["epoch"] == 1 and record["images_per_s"] > 0
    assert 0.0 < record["val_accuracy"] <= 1.0 and record["val_loss"] > 0
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"final validation accuracy 0\.\d{4} \(loss \d+\.\d{4}\); checkpoint "
                        r".*checkpoint\.safetensors; history .*history\.json", last), last
    assert f"{record['val_accuracy']:.4f}" in last
    assert "epoch 1/1" not in out  # --quiet: no per-epoch lines


def test_train_prints_epochs_and_resumes(capsys, tmp_path, trained):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    code, out, err = cli(capsys, "train", "--epochs", "2", "--limit", "256", "--resume",
                         "--out", run)
    assert code == 0, err
    assert "resumed from" in out and "at epoch 2" in out
    assert "epoch 2/2: train loss" in out
    history = json.loads((run / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    assert history[0] == json.loads((trained / "history.json").read_text())[0]


def test_train_other_options(capsys, tmp_path):
    code, _, err = cli(capsys, "train", *QUICK, "--optimizer", "sgd", "--lr", "0.05",
                       "--schedule", "step", "--label-smoothing", "0.1", "--model", "lenet5",
                       "--out", tmp_path / "sgd")
    assert code == 0, err
    assert json.loads((tmp_path / "sgd" / "history.json").read_text())[0]["lr"] == 0.05


def test_train_early_stop_prints_one_line_exits_0_and_stays_stopped(capsys, tmp_path):
    from anycnn.io.checkpoint import load_checkpoint

    run = tmp_path / "run"
    argv = ["train", *QUICK, "--epochs", "4", "--early-stop", "1", "--min-delta", "100",
            "--out", run]  # only epoch 1 counts as better: stops after epoch 2
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    history = json.loads((run / "history.json").read_text())
    line = (f"early stopping at epoch 2 (best epoch 1, val_loss "
            f"{history[0]['val_loss']:.4f})")
    assert line in out.splitlines() and len(history) == 2
    assert out.strip().splitlines()[-1].startswith("final validation accuracy")
    assert "interrupted" not in err
    losses = [r["val_loss"] for r in history]  # best.safetensors ignores --min-delta
    assert load_checkpoint(run / "best.safetensors").epoch == losses.index(min(losses)) + 1
    saved = (run / "checkpoint.safetensors").read_bytes()
    # resuming an early-stopped run trains nothing and says so again
    code, out, err = cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert line in out.splitlines()
    assert (run / "checkpoint.safetensors").read_bytes() == saved
    assert len(json.loads((run / "history.json").read_text())) == 2


def test_train_monitor_chooses_what_best_safetensors_keeps(capsys, tmp_path):
    from anycnn.io.checkpoint import load_checkpoint

    code, out, err = cli(capsys, "train", "--epochs", "2", "--limit", "256", "--monitor",
                         "train_loss", "--out", tmp_path / "run")
    assert code == 0, err
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    losses = [r["train_loss"] for r in history]
    best = losses.index(min(losses)) + 1
    assert f"best train_loss {min(losses):.4f} at epoch {best}: " in out
    assert load_checkpoint(tmp_path / "run" / "best.safetensors").epoch == best


@pytest.mark.slow
def test_train_piped_logs_lines_not_bars_with_warmup(tmp_path):
    """Not on a terminal: no progress bars, one line per epoch, --log-every step lines."""
    from anycnn.optim.schedules import Cosine

    run = python_m_anycnn("train", "--epochs", "2", "--limit", "256", "--batch-size", "64",
                          "--log-every", "2", "--warmup-steps", "8", "--out", "run",
                          cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr and "%|" not in run.stderr and "it/s" not in run.stderr
    lines = run.stdout.splitlines()
    for e in (1, 2):
        assert [line[:14] for line in lines if line.startswith(f"epoch {e}/2 step")] == \
            [f"epoch {e}/2 step 2/4"[:14], f"epoch {e}/2 step 4/4"[:14]]
        assert sum(line.startswith(f"epoch {e}/2: train loss") for line in lines) == 1
    assert "epoch" not in run.stderr
    # 4 steps per epoch: epoch 1 ends at step 4 of the 8-step ramp, epoch 2 at the schedule
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["lr"] for r in history] == [1e-3 * 4 / 8, Cosine(1e-3, 2)(1)]


# --------------------------------------------------------------------------------------------
# evaluate, info, plot


def test_evaluate_prints_loss_and_accuracy(capsys, trained):
    code, out, err = cli(capsys, "evaluate", trained / "checkpoint.safetensors")
    assert code == 0, err
    match = re.fullmatch(r"mnist-sample test: loss (\d+\.\d{4}) accuracy (0\.\d{4}|1\.0000) "
                         r"\(2000 images\)", out.splitlines()[0])  # then top-5, worst classes
    assert match, out
    history = json.loads((trained / "history.json").read_text())
    assert float(match.group(2)) == pytest.approx(history[-1]["val_accuracy"], abs=1e-4)
    assert float(match.group(1)) == pytest.approx(history[-1]["val_loss"], abs=1e-3)
    assert cli(capsys, "evaluate", trained)[1] == out  # the run folder names its checkpoint
    code, _, err = cli(capsys, "evaluate", trained / "history.json")
    assert_usage_error(code, err, "history.json is not a safetensors checkpoint",
                       "it is a text file starting '[")


def test_summary_prints_the_table(capsys):
    code, out, err = cli(capsys, "summary", "--model", "simple-cnn")
    assert code == 0 and err == "", err
    lines = out.splitlines()
    assert lines[:2] == ["model simple-cnn, 10 classes", "Sequential on input (None, 28, 28, 1)"]
    assert lines[5].split() == ["0", "(Conv2D)", "(None,", "28,", "28,", "32)", "320", "451,584"]
    assert "Total params: 421,642 (1.61 MiB)" in lines
    assert "Forward FLOPs per image: 8,482,304 (8.48 M)" in lines


def test_summary_takes_the_shape_from_the_options_or_the_dataset(capsys):
    code, out, _ = cli(capsys, "summary", "--input-shape", "32,32,3", "--num-classes", "5")
    assert code == 0 and out.startswith("model lenet5, 5 classes\n")
    assert "(None, 32, 32, 3)" in out
    assert re.search(r"^0 \(Conv2D\) +\(None, 32, 32, 6\) +456 ", out, re.M), out
    assert re.search(r"^11 \(Dense\) +\(None, 5\) ", out, re.M), out
    code, out, _ = cli(capsys, "summary", "--dataset", "mnist-sample", "--model", "bn-cnn")
    assert code == 0 and out.startswith("model bn-cnn, 10 classes\n")
    assert "Non-trainable params: 384" in out


def test_summary_of_a_run_folder_or_checkpoint(capsys, trained, tmp_path):
    code, preset, err = cli(capsys, "summary", "--model", "LeNet5")  # any case
    assert code == 0, err
    checkpoint = trained / "checkpoint.safetensors"
    for given in (trained, checkpoint):
        code, out, err = cli(capsys, "summary", given)
        assert code == 0 and err == "", err
        first, rest = out.split("\n", 1)
        assert first == f"model lenet5 from {checkpoint}, 10 classes"
        assert rest == preset.split("\n", 1)[1]  # the checkpoint's model: the preset's table
    code, out, err = cli(capsys, "summary", trained, "--input-shape", "32,32,1")
    assert_usage_error(code, err, "the model expects 28x28x1 images")  # lenet5's Dense
    assert out == ""
    png = tmp_path / "cat.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    code, _, err = cli(capsys, "summary", png)
    assert_usage_error(code, err, f"{png} is not a safetensors checkpoint (it looks like a PNG "
                       "image)")


@pytest.mark.parametrize(("head", "what"), [
    (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff\xe0", "a JPEG image"),
    (b"PK\x03\x04", "a zip archive (PyTorch's .pth/.pt format"),
    (b"\x80\x02", "a Python pickle"), (b"\x08\x07\x12\x07pytorch", "an ONNX model"),
    (b"\x93NUMPY\x01\x00", "a NumPy .npy array file"),
    (b"\x01\x02\x03\x04\x05\x06\x07\x08\xff\xfe", "its first bytes are not a safetensors "
                                            "header"),
])
def test_a_file_that_is_no_checkpoint_says_what_it_looks_like(capsys, tmp_path, head, what):
    path = tmp_path / "given.safetensors"
    path.write_bytes(head + bytes(range(256)) * 4)
    commands = [["evaluate", path], ["predict", path, path], ["summary", path]]
    if importlib.util.find_spec("onnx") is not None:  # without it, export says so first
        commands.append(["export", path, "m.onnx"])
    for command in commands:
        code, _, err = cli(capsys, *command)
        assert_usage_error(code, err, f"{path} is not a safetensors checkpoint", what)
        assert "header length" not in err


def test_every_backend_is_listed_wherever_backends_are(capsys):
    """The --backend help of every command, and every table and list of the docs that names
    the backends (performance guide's environment variables, the index, README, backends
    guide), hold every backend."""
    from anycnn.cli.commands import build_parser

    for name, sub in build_parser().commands.items():
        action = next((a for a in sub._actions if "--backend" in a.option_strings), None)
        if action is not None:
            assert all(b in action.help for b in BACKEND_NAMES), (name, action.help)
    performance = (ROOT / "docs" / "guides" / "performance.md").read_text()
    row, = [line for line in performance.splitlines() if line.startswith("| `ANYCNN_BACKEND` |")]
    assert all(f"`{b}`" in row for b in BACKEND_NAMES), row
    for page in (ROOT / "docs" / "index.md", ROOT / "README.md",
                 ROOT / "docs" / "guides" / "backends.md"):
        rows = {line.split("|")[1].strip() for line in page.read_text().splitlines()
                if line.startswith("| `")}
        assert {f"`{b}`" for b in BACKEND_NAMES} <= rows, page


def test_model_names_in_any_case(capsys, tmp_path):
    from anycnn.io.pretrained import lookup
    from anycnn.models import build_model, model_spec

    assert model_spec("LeNet5")["name"] == "lenet5"
    assert model_spec("Simple_CNN")["name"] == "simple-cnn"
    assert model_spec(" MobileNet-V3-Small ")["name"] == "mobilenet_v3_small"
    assert build_model("ResNet-Mini").model_spec["name"] == "resnet-mini"
    assert lookup("ResNet18").arch == "resnet18"
    code, _, err = cli(capsys, "train", "--model", "LeNet5", *QUICK, "--limit", "64",
                       "--out", tmp_path / "run")
    assert code == 0, err
    saved = anycnn.io.checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert saved.config["model"] == saved.model_spec["name"] == "lenet5"  # the canonical name
    code, _, err = cli(capsys, "train", "--model", "LENET5", *QUICK, "--limit", "64",
                       "--epochs", "2", "--out", tmp_path / "run", "--resume")
    assert code == 0, err  # the same model: resumes


def test_a_limit_above_the_data_is_a_warning(capsys, tmp_path):
    code, _, err = cli(capsys, "train", *QUICK, "--limit", "100000", "--out", tmp_path / "r")
    assert code == 0, err
    warning, = [line for line in err.splitlines() if "--limit" in line]
    assert warning == ("anycnn: warning: --limit 100000 is more than the 8000 training images "
                       "of mnist-sample: training on all 8000")
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    assert len(history) == 1
    code, _, err = cli(capsys, "train", *QUICK, "--limit", "8000", "--out", tmp_path / "s",
                       "--epochs", "1")
    assert code == 0 and "warning" not in err, err


def test_augmentation_defaults_are_printed(capsys, tmp_path):
    """32x32 RGB images get crop=4,flip and auto normalisation by default: one line says so
    (not with --quiet, nor when the options are given)."""
    Image = pytest.importorskip("PIL.Image")
    import numpy as np

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "rgb" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "rgb" / c / f"{i}.png")
    base = ["train", "--dataset", tmp_path / "rgb", "--epochs", "1", "--batch-size", "4",
            "--model", "simple-cnn"]
    code, out, err = cli(capsys, *base, "--out", tmp_path / "r1")
    assert code == 0, err
    line, = [line for line in out.splitlines() if line.startswith("defaults applied")]
    assert line == ("defaults applied (32x32x3 images): --augment crop=4,flip (random crops "
                    "and flips of the training images); --normalize auto (the training "
                    "split's per-channel mean/std). Pass --augment none / --normalize none to "
                    "turn them off")
    code, out, err = cli(capsys, *base, "--out", tmp_path / "r2", "--augment", "flip")
    assert code == 0, err
    assert [line for line in out.splitlines() if line.startswith("defaults applied")] == [
        "defaults applied (32x32x3 images): --normalize auto (the training split's "
        "per-channel mean/std). Pass --normalize none to turn it off"]  # only what defaulted
    for extra in (["--quiet"], ["--augment", "none", "--normalize", "none"]):
        code, out, err = cli(capsys, *base, "--out", tmp_path / "r3", *extra)
        assert code == 0 and "defaults applied" not in out, err
    code, out, err = cli(capsys, *base, "--out", tmp_path / "r1", "--epochs", "2", "--resume")
    assert code == 0 and "defaults applied" not in out, err  # recorded: not defaults any more


def test_info_lists_every_backend(capsys):
    code, out, _ = cli(capsys, "info", "--backend", "numpy")
    assert code == 0
    assert "backend: numpy" in out
    listed = [line.split()[1] for line in out.splitlines() if line.startswith("  ")]
    assert listed == list(BACKEND_NAMES)
    assert re.search(r"^  yes numpy ", out, re.MULTILINE)


def test_info_says_which_arrays_the_compiled_kernels_take(capsys, monkeypatch):
    """Kept kernels serve torch CPU tensors too; kernels compiled in memory only NumPy's."""
    from anycnn.kernels import kernel_cache

    for kept, says in ((True, "NumPy arrays, torch CPU tensors"),
                       (False, "NumPy arrays; torch tensors on torch's operators")):
        monkeypatch.setattr(kernel_cache, "ahead_of_time", lambda kept=kept: kept)
        code, out, _ = cli(capsys, "info", "--backend", "numpy")
        assert code == 0 and f"compiled kernels (convolution, BatchNorm; {says})" in out


def test_plot_writes_png(capsys, trained, tmp_path):
    pytest.importorskip("matplotlib")
    code, out, err = cli(capsys, "plot", trained / "history.json", "-o", tmp_path / "x.png")
    assert code == 0, err
    assert out.strip() == f"wrote {tmp_path / 'x.png'}"
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_names_the_run_and_counts_epochs_in_whole_numbers(capsys, trained, tmp_path,
                                                               monkeypatch):
    """Title from the checkpoint beside the history (model and dataset), "validation" for the
    history's val_* curve (as the history calls it, also where it is the dataset's test
    split), integer epoch ticks, and ``.png`` added to an output without an extension."""
    pytest.importorskip("matplotlib")
    from anycnn import plot

    code, out, err = cli(capsys, "plot", trained / "history.json", "-o", tmp_path / "curves")
    assert code == 0, err
    assert (tmp_path / "curves.png").is_file() and out.strip() == f"wrote {tmp_path}/curves.png"
    drawn = []
    monkeypatch.setattr(plot, "_save", lambda fig, output: drawn.append(fig) or Path(output))
    assert cli(capsys, "plot", trained / "history.json")[0] == 0
    fig, = drawn
    assert fig._suptitle.get_text() == "lenet5 on mnist-sample"
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "validation"]
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "history.json").write_bytes((trained / "history.json").read_bytes())
    assert cli(capsys, "plot", lone / "history.json")[0] == 0  # no checkpoint: no title
    assert drawn[1]._suptitle is None
    assert [t.get_text() for t in drawn[1].axes[0].get_legend().get_texts()] == [
        "train", "validation"]


def test_plot_without_matplotlib(capsys, trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    code, _, err = cli(capsys, "plot", trained / "history.json", "-o", tmp_path / "x.png")
    assert_usage_error(code, err, "matplotlib", "pip install")
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------------------------
# user mistakes: one line, status 2, no traceback


def _not_safetensors(tmp_path: Path) -> Path:
    path = tmp_path / "fake.safetensors"
    path.write_text(json.dumps({"weights": [1, 2, 3]}) * 20)
    return path


def _tiny_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x00\x01")
    return path


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "nowhere" / "checkpoint.safetensors"


MISTAKES = {
    "unknown model": (["train", "--model", "resnet9"], ["'resnet9'", *MODELS]),
    "unknown dataset": (["train", "--dataset", "cifar"], ["'cifar'", *DATASETS]),
    "unknown optimizer": (["train", "--optimizer", "adagrad"], ["'adagrad'", *OPTIMIZERS]),
    "unknown backend": (["train", "--backend", "mxnet"], ["'mxnet'", *CHOICES]),
    "unknown schedule": (["train", "--schedule", "linear"], ["'linear'", *SCHEDULES]),
    "zero epochs": (["train", "--epochs", "0"], ["--epochs", "0"]),
    "negative lr": (["train", "--lr", "-0.1"], ["--lr", "-0.1"]),
    "zero limit": (["train", "--limit", "0"], ["--limit"]),
    "bad dtype": (["train", "--dtype", "int8"], ["--dtype", "int8"]),
    "missing checkpoint": (["evaluate", _missing], ["not found", "checkpoint.safetensors"]),
    "not safetensors": (["evaluate", _not_safetensors], ["fake.safetensors", "not"]),
    "truncated file": (["evaluate", _tiny_file], ["tiny.safetensors"]),
    "resume without checkpoint": (["train", "--resume", "--quiet", "--out", "empty"],
                                  ["--resume", "no checkpoint"]),
    "unknown option": (["train", "--epoch", "3", "--bogus"], ["unrecognized", "--bogus"]),
    "unknown command": (["fit"], ["invalid choice", "'fit'"]),
    "momentum with adam": (["train", "--momentum", "0.5"],
                           ["--momentum applies to --optimizer sgd and rmsprop only", "adam"]),
    "missing history": (["plot", "nothing.json"], ["nothing.json"]),
    "ema out of range": (["train", "--ema", "1.5"],
                         ["--ema must be a finite number in (0, 1)", "1.5"]),
    "zero clip norm": (["train", "--clip-grad-norm", "0"],
                       ["--clip-grad-norm must be a finite number > 0"]),
    "nan clip value": (["train", "--clip-grad-value", "nan"],
                       ["--clip-grad-value must be a finite number > 0"]),
    "plateau patience alone": (["train", "--plateau-patience", "4"],
                               ["--plateau-patience applies to --schedule plateau only"]),
    "negative patience": (["train", "--early-stop", "-1"], ["--early-stop must be >= 0", "-1"]),
    "unknown monitor": (["train", "--monitor", "val_acc"],
                        ["--monitor must be one of", "val_loss", "val_accuracy", "'val_acc'"]),
    "negative min delta": (["train", "--early-stop", "2", "--min-delta", "-0.1"],
                           ["--min-delta must be a finite number >= 0"]),
    "nan min delta": (["train", "--early-stop", "2", "--min-delta", "nan"], ["--min-delta"]),
    "min delta alone": (["train", "--min-delta", "0.1"], ["--min-delta only applies to",
                                                          "--early-stop"]),
    "negative warmup": (["train", "--warmup-steps", "-5"], ["--warmup-steps must be >= 0"]),
    "negative log every": (["train", "--log-every", "-1"], ["--log-every must be >= 0"]),
    "log every and quiet": (["train", "--log-every", "5", "--quiet"], ["--log-every", "--quiet"]),
    "patience word": (["train", "--early-stop", "three"],
                      ["--early-stop must be an integer >= 0, got 'three'"]),
    # numeric options are checked while the arguments are parsed, before any data is loaded
    # (cifar10 is not on this machine: loading it would fail first)
    "zero batch size": (["train", "--dataset", "cifar10", "--batch-size", "0"],
                        ["--batch-size must be >= 1, got 0"]),
    "negative seed": (["train", "--dataset", "cifar10", "--seed", "-1"],
                      ["--seed must be >= 0, got -1"]),
    "label smoothing 1": (["train", "--dataset", "cifar10", "--label-smoothing", "1"],
                          ["--label-smoothing must be a finite number in [0, 1), got 1"]),
    "nan lr": (["train", "--dataset", "cifar10", "--lr", "nan"],
               ["--lr must be a finite number > 0, got nan"]),
    "evaluate zero batch size": (["evaluate", _missing, "--batch-size", "0"],
                                 ["--batch-size must be >= 1, got 0"]),
    "summary channels first": (["summary", "--input-shape", "3,32,32"],
                               ["--input-shape 3,32,32 looks channels first (C,H,W)",
                                "channels last (H,W,C)", "did you mean 32,32,3?"]),
    "summary too small": (["summary", "--input-shape", "8,8,1"],
                          ["lenet5 takes images of at least 12x12", "image_size 8"]),
    "summary checkpoint and model": (["summary", _missing, "--model", "lenet5"],
                                     ["--model: a checkpoint's model is summarised as it was"]),
    "summary missing checkpoint": (["summary", _missing], ["not found",
                                                            "checkpoint.safetensors"]),
    "model in another case, unknown": (["train", "--model", "LeNet9"], ["'LeNet9'", *MODELS]),
    "summary unknown model": (["summary", "--model", "resnet9"], ["'resnet9'", *MODELS]),
    "summary bad input shape": (["summary", "--input-shape", "32x32"],
                                ["--input-shape", "H,W,C", "'32x32'"]),
    "summary non-square": (["summary", "--input-shape", "32,28,1"], ["square"]),
    "summary shape twice": (["summary", "--dataset", "mnist-sample", "--input-shape", "28,28,1"],
                            ["--dataset and --input-shape"]),
    "summary zero classes": (["summary", "--num-classes", "0"], ["--num-classes must be >= 1"]),
    "summary unknown dataset": (["summary", "--dataset", "cifar"], ["'cifar'", *DATASETS]),
}


@pytest.mark.parametrize("case", MISTAKES)
def test_user_mistake_is_one_line(capsys, tmp_path, case):
    argv, fragments = MISTAKES[case]
    argv = [a(tmp_path) if callable(a) else a for a in argv]
    code, _, err = cli(capsys, *argv)
    assert_usage_error(code, err, *fragments)


# --------------------------------------------------------------------------------------------
# python -m anycnn


@pytest.mark.slow
def test_python_m_anycnn_train_and_evaluate(tmp_path):
    run = python_m_anycnn("train", *QUICK, "--out", "run", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1].startswith("final validation accuracy")
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file()
    evaluated = python_m_anycnn("evaluate", "run/checkpoint.safetensors", "--split", "train",
                                cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert re.fullmatch(r"mnist-sample train: loss \S+ accuracy \S+ \(8000 images\)",
                        evaluated.stdout.splitlines()[0]), evaluated.stdout


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--model", "resnet9"], "unknown model"),
    (["evaluate", "missing.safetensors"], "not found"),
    (["train", "--nope"], "unrecognized arguments: --nope"),
])
def test_python_m_anycnn_user_mistake(tmp_path, argv, fragment):
    proc = python_m_anycnn(*argv, cwd=tmp_path)
    assert_usage_error(proc.returncode, proc.stderr, fragment)
    assert "Traceback" not in proc.stdout


def test_python_m_anycnn_version_and_help(tmp_path):
    version = python_m_anycnn("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"anycnn {anycnn.__version__}"
    helped = python_m_anycnn("train", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "--resume" in helped.stdout and "--limit" in helped.stdout


def test_closed_pipe_exits_quietly():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "anycnn", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # the reader goes away, like `anycnn info | head -1`
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "error" not in err


def test_bench_times_the_script_path_beside_the_command(tmp_path):
    """``anycnn bench --script``: a worker that imports NumPy first, without the command's
    OPENBLAS_THREAD_TIMEOUT, reported beside the command's worker."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    run = subprocess.run([sys.executable, "-m", "anycnn", "bench", "--backend", "numpy",
                          "--script", "--rounds", "1", "--steps", "1", "--warmup", "0",
                          "--batch-sizes", "2", "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "script / command" in run.stdout
    row, = json.loads(out.read_text())["rows"]
    assert row["anycnn"]["openblas_thread_timeout"] == "4"  # set by the command
    assert row["anycnn-script"]["openblas_thread_timeout"] is None
    assert row["script_ratio"] > 0


# --------------------------------------------------------------------------------------------
# no silent surprises: the command line says what it does and refuses what it would not do


def test_no_command_lists_the_commands(capsys):
    code, out, err = cli(capsys)
    assert code == 2 and out == ""
    for command in ("train", "evaluate", "info", "plot", "bench", "summary"):
        assert re.search(rf"^\s+{command}\s+\S", err, re.M), (command, err)


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("(default: 8)", "(default: 64)", "(default: adam)", "(default: cosine)",
                    "(default: 0)", "(default: lenet5)",
                    "sgd (default 0.9) or rmsprop (default 0)"):
        assert default in text, default
    assert "(default: None)" not in text and "(default: False)" not in text


def test_out_under_a_file_says_it_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    for out in (tmp_path / "taken", tmp_path / "taken" / "run"):
        code, _, err = cli(capsys, "train", *QUICK, "--out", out)
        assert_usage_error(code, err, f"{tmp_path / 'taken'} is a file, not a directory")


def test_start_banner_is_one_short_line(capsys):
    code, out, _ = cli(capsys, "train", "--epochs", "1", "--limit", "64", "--backend", "numpy")
    assert code == 0
    banner = out.splitlines()[0]
    assert banner.startswith("anycnn ") and "numpy on cpu (requested)" in banner
    assert len(banner) <= 100, banner


def test_resume_takes_a_checkpoint_or_a_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "train", *QUICK, "--out", run)[0] == 0
    other = tmp_path / "elsewhere"
    other.mkdir()
    os.chdir(other)  # OUT defaults to the checkpoint's folder, not runs/... here
    code, _, err = cli(capsys, "train", *QUICK, "--epochs", "2", "--resume",
                       run / "checkpoint.safetensors")
    assert code == 0, err
    assert len(json.loads((run / "history.json").read_text())) == 2
    assert not (other / "runs").exists()
    code, _, err = cli(capsys, "train", *QUICK, "--epochs", "3", "--resume", run)
    assert code == 0, err
    assert len(json.loads((run / "history.json").read_text())) == 3
    code, _, err = cli(capsys, "train", *QUICK, "--resume", tmp_path / "nothing.safetensors")
    assert_usage_error(code, err, "--resume: no checkpoint at", "nothing.safetensors")


def test_resume_refuses_other_data_and_lists_changed_settings(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "train", *QUICK, "--out", run)[0] == 0
    before = (run / "checkpoint.safetensors").read_bytes()
    for change, words in ((["--limit", "128"], "--limit 256, not 128"),
                          (["--dataset", "fashion-mnist"], "--dataset mnist-sample")):
        argv = [*QUICK, "--out", run, "--resume", *change]
        code, _, err = cli(capsys, "train", *argv)
        assert_usage_error(code, err, words, "resume with the same data")
    assert (run / "checkpoint.safetensors").read_bytes() == before
    code, _, err = cli(capsys, "train", *QUICK, "--out", run, "--resume", "--epochs", "2",
                       "--lr", "0.01", "--batch-size", "32")
    assert code == 0
    warning, = [line for line in err.splitlines() if "warning" in line]
    assert warning == (f"anycnn: warning: resuming {run / 'checkpoint.safetensors'} with "
                       "changed settings: epochs 1 -> 2, batch-size 64 -> 32, lr 0.001 -> 0.01")


def test_resume_from_a_path_keeps_the_run_settings(tmp_path, capsys):
    """``--resume PATH`` alone continues the run as it was started (model, data, optimizer,
    schedule); options given again override, and a finished run says there is nothing to do."""
    run = tmp_path / "run"
    argv = ["--model", "simple-cnn", "--optimizer", "sgd", "--lr", "0.02", "--limit", "128",
            "--batch-size", "32", "--seed", "3", "--quiet"]
    assert cli(capsys, "train", *argv, "--epochs", "2", "--out", tmp_path / "straight")[0] == 0
    assert cli(capsys, "train", *argv, "--epochs", "1", "--out", run)[0] == 0
    code, _, err = cli(capsys, "train", "--resume", run, "--epochs", "2")
    assert code == 0, err
    assert err.count("warning") == 1 and "epochs 1 -> 2" in err  # nothing else changed
    resumed = json.loads((run / "history.json").read_text())
    straight = json.loads((tmp_path / "straight" / "history.json").read_text())
    for a, b in zip(resumed, straight, strict=True):
        assert {k: v for k, v in a.items() if k not in ("seconds", "images_per_s")} == {
            k: v for k, v in b.items() if k not in ("seconds", "images_per_s")}
    code, _, err = cli(capsys, "train", "--resume", run)
    assert code == 0
    assert "nothing to train: " in err and "completed 2 of 2 epochs" in err
    code, _, err = cli(capsys, "train", "--resume", run, "--model", "lenet5")
    assert_usage_error(code, err, "trained with --model simple-cnn, not lenet5")


def test_evaluate_uses_the_loss_the_run_trained_with(capsys, tmp_path):
    """``--class-weights auto --label-smoothing 0.1``: evaluate's loss on the validation split
    is training's validation loss (not the plain cross-entropy's)."""
    out = tmp_path / "weighted"
    code, _, err = cli(capsys, "train", *QUICK, "--class-weights", "auto",
                       "--label-smoothing", "0.1", "--out", out)
    assert code == 0, err
    val_loss = json.loads((out / "history.json").read_text())[-1]["val_loss"]
    code, printed, err = cli(capsys, "evaluate", out, "--split", "val", "--json")
    assert code == 0, err
    assert json.loads(printed)["loss"] == pytest.approx(val_loss, rel=1e-4)


def test_resume_with_the_same_augment_is_not_a_change(tmp_path, capsys):
    """``--augment crop,flip`` is recorded as ``crop=3,flip`` (28x28 images): given again on
    resume it is the same setting, not a change; another one is listed."""
    from anycnn.cli.resume import same_augment

    run = tmp_path / "run"
    assert cli(capsys, "train", *QUICK, "--augment", "crop,flip", "--out", run)[0] == 0
    code, _, err = cli(capsys, "train", *QUICK, "--epochs", "2", "--augment", "crop,flip",
                       "--out", run, "--resume")
    assert code == 0, err
    warning, = [line for line in err.splitlines() if "warning" in line]
    assert warning.endswith("changed settings: epochs 1 -> 2"), warning
    config = {"preprocess": {"image_size": [32, 32], "channels": 3}}
    assert same_augment("rrc=32,flip,jitter=0.4,mixup=0.2", "rrc,flip,jitter=0.4,mixup=0.2",
                        config)
    assert same_augment("crop=4,flip", "crop,flip", config)
    assert not same_augment("crop=4,flip", "crop", config)
    assert not same_augment("crop=4,flip", "crop=x", config)  # reported by the run itself
