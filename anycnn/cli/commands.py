"""The ``anycnn`` command: ``train``, ``evaluate``, ``predict``, ``info``, ``plot``, ``bench``,
``summary`` and ``export`` (ONNX, :mod:`anycnn.io.onnx`); the image-folder options and
``predict`` live in :mod:`anycnn.cli.predict`.

A user's mistake (bad option, missing file, unusable backend, bad checkpoint) prints one line
``anycnn: error: ...`` and exits with status 2; an interrupted training run saves a checkpoint,
prints how to resume and exits with 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from .. import __version__
from ..errors import AnycnnError, ConfigError

EXIT_USAGE = 2


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default, unless it has none or states it in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if any(action.default is none for none in (None, False, argparse.SUPPRESS)) or (
                "default" in text):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line with our prefix, and shows defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _backend_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", help="numpy | cupy | torch | array_api_strict | auto "
                        "(default: $ANYCNN_BACKEND, else auto)")


def build_parser() -> argparse.ArgumentParser:
    from ..data.datasets import DATASETS
    from ..models import MODELS
    from ..optim.optimizers import OPTIMIZERS
    from ..optim.schedules import SCHEDULES
    from .predict import add_folder_options, add_predict_arguments

    parser = _Parser(prog="anycnn", description="Train and evaluate CNNs on any array backend.")
    parser.add_argument("--version", action="version", version=f"anycnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.commands = sub.choices  # name -> its parser

    t = sub.add_parser("train", help="train a model and write a checkpoint and history")
    t.add_argument("--dataset", default="mnist-sample", help=f"one of {', '.join(DATASETS)}, "
                   "or the path of an image folder (one subfolder per class)")
    t.add_argument("--data-dir", help="folder holding the dataset's files "
                   "(IDX; CIFAR: the binary version's folder or .tar.gz)")
    add_folder_options(t)
    t.add_argument("--model", default="lenet5", help=f"one of {', '.join(MODELS)}")
    t.add_argument("--epochs", type=int, default=8, help="epochs to train in total")
    t.add_argument("--batch-size", type=int, default=64,
                   help="images per step (the global batch: on N ranks each takes 1/N of it)")
    t.add_argument("--optimizer", default="adam", help=f"one of {', '.join(OPTIMIZERS)}")
    t.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 1e-3 for adam/adamw, 0.05 for sgd)")
    t.add_argument("--momentum", type=float, default=None,
                   help="SGD momentum (default 0.9; only for --optimizer sgd)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="L2 (sgd, adam) or "
                   "decoupled (adamw) weight decay")
    t.add_argument("--schedule", default="cosine", help=f"one of {', '.join(SCHEDULES)}")
    t.add_argument("--label-smoothing", type=float, default=0.0,
                   help="share of each target spread over all classes")
    t.add_argument("--seed", type=int, default=0,
                   help="initial weights and the shuffling order")
    t.add_argument("--limit", type=int, default=None, metavar="N",
                   help="train on the first N training images only (quick runs)")
    t.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="floating-point precision of weights and activations")
    t.add_argument("--augment", default=None, metavar="SPEC",
                   help="random crop/flip of training batches: none, or items separated by "
                   "commas: crop (padding 1/8 of the image side), crop=P, flip, pad=zeros|edge "
                   "(default: crop=4,flip for 32x32 RGB images, none otherwise)")
    t.add_argument("--normalize", default=None, choices=["auto", "none"],
                   help="auto: subtract the training split's per-channel mean and divide by its "
                   "std (recorded in the checkpoint, applied by evaluate); default: auto for "
                   "32x32 RGB images, none otherwise")
    t.add_argument("--device-resident", action="store_true",
                   help="keep the dataset on the device (GPU) and batch there")
    t.add_argument("--on-nan", default="stop", choices=["stop", "skip"],
                   help="on a NaN/inf loss: stop, or skip that step")
    t.add_argument("--out", default=None, help="output folder (default runs/<model>-<dataset>)")
    t.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (a file, or a run folder), else from "
                   "OUT/checkpoint.safetensors; OUT defaults to the checkpoint's folder")
    t.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    t.add_argument("--warmup-steps", type=int, default=0, metavar="N",
                   help="ramp the lr up linearly over the first N steps (default: 0)")
    t.add_argument("--early-stop", type=int, default=None, metavar="PATIENCE",
                   help="stop after PATIENCE epochs without a better --monitor (default: off)")
    t.add_argument("--monitor", default="val_loss", metavar="KEY",
                   help="metric for --early-stop and best.safetensors (default: val_loss; "
                   "or val_accuracy, train_loss, train_accuracy)")
    t.add_argument("--min-delta", type=float, default=0.0, metavar="X",
                   help="smallest change --early-stop counts as better (default: 0)")
    t.add_argument("--log-every", type=int, default=0, metavar="N",
                   help="also print a line every N steps (default: 0, off)")
    t.add_argument("--compile", action="store_true",
                   help="run each training step as one jax.jit-compiled function (jax backend)")
    t.add_argument("--sync-bn", action="store_true",
                   help="on several ranks, BatchNorm statistics of the global batch instead of "
                   "each rank's share (three small allreduces per layer and step)")
    t.add_argument("--workers", type=int, default=None, metavar="N",
                   help="train data-parallel on N processes of this machine (runs the same "
                   "command under the installed mpiexec; needs pip install 'anycnn[mpi]'; "
                   "or start it yourself: mpiexec -n N anycnn train ...)")
    _backend_option(t)

    e = sub.add_parser("evaluate", help="loss, accuracy, top-k and per-class accuracy of a "
                       "checkpoint")
    e.add_argument("checkpoint", help="a checkpoint file, or a run folder holding "
                   "checkpoint.safetensors")
    e.add_argument("--dataset", default=None, help="default: the one it was trained on")
    e.add_argument("--data-dir", help="folder holding the dataset's files (default: the one "
                   "it was trained with)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="which split to evaluate")
    e.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    e.add_argument("--top-k", default=None, metavar="K[,K...]",
                   help="top-k accuracies to report (default: 1,5, or 1 with fewer than 5 "
                   "classes)")
    e.add_argument("--json", action="store_true",
                   help="print one JSON object: loss, accuracy, top-k, per-class accuracy with "
                   "class names, confusion matrix (rows true class, columns predicted)")
    e.add_argument("--confusion-plot", default=None, metavar="FILE",
                   help="also draw the confusion matrix into FILE (.png/.svg/.pdf; needs "
                   "matplotlib)")
    _backend_option(e)

    r = sub.add_parser("predict", help="the most likely classes of image files, prepared as in "
                       "training")
    add_predict_arguments(r)
    _backend_option(r)

    i = sub.add_parser("info", help="which backend would be used, and why; all backends")
    _backend_option(i)

    p = sub.add_parser("plot", help="draw loss and accuracy curves from a history.json, or the "
                       "confusion matrix from the output of evaluate --json")
    p.add_argument("history", metavar="FILE",
                   help="a history.json, or a file holding the output of anycnn evaluate --json")
    p.add_argument("-o", "--output", default="curves.png",
                   help="image file to write (.png unless it ends in .svg or .pdf)")

    s = sub.add_parser("summary", help="a model's layers with output shapes, parameter counts "
                       "and FLOPs")
    s.add_argument("--model", default="lenet5", help=f"one of {', '.join(MODELS)}")
    s.add_argument("--dataset", default=None, help="take the image shape and class count from "
                   f"this dataset (one of {', '.join(DATASETS)}, or an image folder; it is "
                   "loaded)")
    s.add_argument("--data-dir", help="folder holding the dataset's files "
                   "(IDX; CIFAR: the binary version's folder or .tar.gz)")
    s.add_argument("--input-shape", default=None, metavar="H,W,C",
                   help="image shape, height and width equal (default: 28,28,1)")
    s.add_argument("--num-classes", type=int, default=None, metavar="K",
                   help="classes (default: the dataset's, else 10)")
    _backend_option(s)

    x = sub.add_parser("export", help="write a checkpoint's model as an ONNX file (standard "
                       "operators, NHWC input [batch, H, W, C], output logits [batch, K]; "
                       "needs pip install 'anycnn[onnx]')")
    x.add_argument("checkpoint", help="a checkpoint file, or a run folder holding "
                   "checkpoint.safetensors")
    x.add_argument("output", metavar="MODEL.onnx", help="the ONNX file to write")
    x.add_argument("--opset", type=int, default=None,
                   help="ONNX opset version, 17 or newer (default: 17)")
    x.add_argument("--layout", default="nhwc", choices=["nhwc", "nchw"],
                   help="the graph input's layout (nhwc: as anycnn takes images, transposed "
                   "to NCHW inside the graph)")
    _backend_option(x)

    b = sub.add_parser("bench", help="time training steps against PyTorch")
    from .bench import add_arguments

    add_arguments(b)
    _backend_option(b)
    return parser


def _select_backend(name: str | None):
    from ..backend import get_backend, use_backend

    if name:
        use_backend(name)
    return get_backend()


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


class _StopOnSignal:
    """First SIGINT/SIGTERM: ask the trainer to stop after the current step. Second: exit now
    (checkpoints are written atomically, so nothing on disk is corrupted)."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            print("\nanycnn: second signal, exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        if self.trainer.comm.rank == 0:  # mpiexec forwards the signal to every rank
            print(f"\nanycnn: {signal.Signals(signum).name} received: stopping after this "
                  "step (send it again to exit at once)", file=sys.stderr, flush=True)
        self.trainer.request_stop(signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _write_json_atomic(path: Path, data) -> None:
    from ..io.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def _check_train_options(args) -> None:
    """The options of ``train`` added for callbacks, checked before any data is loaded."""
    import dataclasses
    import math

    from ..train.trainer import EpochRecord

    for option, value in (("--warmup-steps", args.warmup_steps), ("--log-every", args.log_every),
                          ("--early-stop", args.early_stop)):
        if value is not None and value < 0:
            raise ConfigError(f"{option} must be >= 0, got {value}")
    monitors = [f.name for f in dataclasses.fields(EpochRecord)
                if "loss" in f.name or "accuracy" in f.name]
    if args.monitor not in monitors:
        raise ConfigError(f"--monitor must be one of {', '.join(monitors)}, got {args.monitor!r}")
    if not (math.isfinite(args.min_delta) and args.min_delta >= 0):
        raise ConfigError(f"--min-delta must be a finite number >= 0, got {args.min_delta}")
    if args.min_delta and args.early_stop is None:
        raise ConfigError("--min-delta only applies to --early-stop: add --early-stop PATIENCE")
    if args.log_every and args.quiet:
        raise ConfigError("--log-every prints lines that --quiet turns off: drop one of them")


def _history_file(path: Path):
    """A callback that rewrites ``history.json`` (atomically) after every epoch."""
    from ..train.callbacks import Callback

    class HistoryFile(Callback):
        def on_epoch_end(self, trainer, epoch, record) -> None:
            if trainer.comm.rank == 0:
                _write_json_atomic(path, trainer.history)

    return HistoryFile()


def _start_workers(args) -> int:
    """``--workers N``: run this command again on N ranks under ``mpiexec`` (replaces this
    process, so signals reach mpiexec, which forwards them to every rank)."""
    from ..dist import launcher_env, workers_command

    if launcher_env() is not None:
        raise ConfigError("--workers starts mpiexec itself; under mpiexec or srun drop it (the "
                          "launcher's -n sets the number of processes)")
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    argv = _without_option(args.argv, "--workers")
    command = workers_command(args.workers, argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
    return 0  # pragma: no cover - execv does not return


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE``."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == option:
            skip = True
        elif not item.startswith(option + "="):
            out.append(item)
    return out


def _join_ranks(args):
    """The communicator of this process (several ranks under an MPI launcher; making it pins
    each machine's ranks to disjoint cores). On N > 1 ranks: an uncaught error on any rank ends
    the job, and only rank 0 prints (the others keep stderr for their own errors)."""
    from ..dist import get_communicator, install_abort_hook

    comm = get_communicator()
    if comm.size > 1:
        install_abort_hook(comm)
        if comm.rank != 0:
            args.quiet = True
            sys.stdout = open(os.devnull, "w")
    return comm


def _load_on_node_leader_first(comm, load):
    """``load()`` on each node's first rank, then on the others (one download per node)."""
    if comm.size == 1:
        return load()
    if comm.local_rank == 0:
        data = load()
        comm.barrier()
        return data
    comm.barrier()
    return load()


def cmd_train(args) -> int:
    from .. import random
    from ..data.augment import parse_augment, preprocess_record
    from ..data.dataloader import DataLoader
    from ..io.checkpoint import RUN_CHECKPOINT, load_checkpoint
    from ..models import build_model, model_spec
    from ..optim.optimizers import OPTIMIZERS
    from ..optim.schedules import make_schedule
    from ..train.callbacks import BestCheckpoint, EarlyStopping, ProgressLog
    from ..train.trainer import Trainer
    from .predict import load_train_data, normalise_dataset

    if args.workers is not None:
        return _start_workers(args)
    backend = _select_backend(args.backend)
    args.dataset = normalise_dataset(args.dataset)
    out, resume_from = _output_folder(args)
    saved, saved_config = None, {}
    if resume_from is not None:  # read once: for its settings here, its state below
        saved = load_checkpoint(resume_from)
        saved_config = _settings_from_checkpoint(args, saved)
    if args.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {args.optimizer!r}; valid names: "
                          f"{', '.join(OPTIMIZERS)}")
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {args.epochs}")
    if args.momentum is not None and args.optimizer != "sgd":
        raise ConfigError(f"--momentum applies to --optimizer sgd only; {args.optimizer} "
                          "would ignore it")
    ckpt_path, history_path = out / RUN_CHECKPOINT, out / "history.json"
    spec_check = model_spec(args.model)  # validate the name before loading data
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    make_schedule(args.schedule, 1.0, args.epochs)  # validate the name before loading data
    if args.lr is not None and not 0 < args.lr < float("inf"):
        raise ConfigError(f"--lr must be a finite number > 0, got {args.lr}")
    # the values used, as recorded in checkpoints and compared on --resume
    if args.lr is None:
        args.lr = 0.05 if args.optimizer == "sgd" else 1e-3
    if args.momentum is None and args.optimizer == "sgd":
        args.momentum = 0.9
    _check_train_options(args)
    if args.augment is not None:
        parse_augment(args.augment)  # the syntax, before loading data
    comm = _join_ranks(args)
    data = _load_on_node_leader_first(comm, lambda: load_train_data(args,
                                                                    progress=not args.quiet))
    if args.limit is not None and args.limit < len(data.train):
        import dataclasses

        import numpy as np

        data = dataclasses.replace(data, train=data.train.subset(np.arange(args.limit)))
    h, _w, c = data.image_shape
    augment, normalize = _preprocessing(args, data, saved_config)
    args.preprocess = preprocess_record(augment, normalize, data)
    spec = {**spec_check, "num_classes": data.num_classes, "in_channels": c, "image_size": h}
    how = backend.reason.split(":")[0] if backend.reason.startswith("auto") else "requested"
    ranks = f" x {comm.size} ranks ({comm.name})" if comm.size > 1 else ""
    _say(args.quiet, f"anycnn {__version__}: {backend.name} on {backend.device} ({how}){ranks}; "
         f"{data.name}: {len(data.train)} train / {len(data.val)} val; model {args.model}")
    random.manual_seed(args.seed)
    model = build_model(spec)
    if args.dtype != "float32":
        model.to(args.dtype)
    lr = args.lr
    opt_kwargs = {"weight_decay": args.weight_decay}
    if args.optimizer == "sgd":
        opt_kwargs["momentum"] = args.momentum
    if args.sync_bn:
        from ..nn.layers import sync_batchnorm

        sync_batchnorm(model, comm)
    optimizer = OPTIMIZERS[args.optimizer](model.parameters(), lr=lr, **opt_kwargs)
    from ..nn.losses import SoftmaxCrossEntropy

    # after each epoch's checkpoint: best.safetensors, early stopping, the log line, history
    best = BestCheckpoint(out / "best.safetensors", args.monitor)
    early = (EarlyStopping(args.monitor, args.early_stop, args.min_delta)
             if args.early_stop is not None else None)
    callbacks = [best, *([early] if early else []),
                 *([] if args.quiet else [ProgressLog(args.log_every)]),
                 _history_file(history_path)]
    trainer = Trainer(model, optimizer, SoftmaxCrossEntropy(args.label_smoothing),
                      schedule=make_schedule(args.schedule, lr, args.epochs), model_spec=spec,
                      checkpoint_path=ckpt_path, on_nonfinite=args.on_nan,
                      progress=not args.quiet, callbacks=callbacks,
                      warmup_steps=args.warmup_steps, comm=comm, compile=args.compile,
                      config={k: v for k, v in vars(args).items()
                              if k not in ("func", "given", "argv", "workers")})
    if resume_from is not None:
        trainer.resume(saved)
        _say(args.quiet, f"resumed from {resume_from} at epoch {trainer.epoch + 1}, "
             f"step {trainer.step}")
    if comm.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    loader_opts = dict(device_resident=args.device_resident, dtype=args.dtype)
    train_loader = DataLoader(data.train, args.batch_size, shuffle=True, seed=args.seed,
                              augment=augment, normalize=normalize, **loader_opts)
    val_loader = DataLoader(data.val, 256, normalize=normalize, **loader_opts)
    # a run that early stopping ended stays ended when resumed with the same options
    ended = early is not None and trainer.step == 0 and bool(trainer.history) and \
        early.review(trainer.history)
    import numpy as np

    # NumPy's overflow warnings would bury the one-line NaN report; the trainer checks the loss
    with _StopOnSignal(trainer) as stopper, np.errstate(over="ignore", invalid="ignore",
                                                         divide="ignore"):
        if trainer.epoch < args.epochs and not ended:
            trainer.fit(train_loader, val_loader, epochs=args.epochs)
        elif not ended and comm.rank == 0:
            print(f"anycnn: nothing to train: {resume_from} has completed {trainer.epoch} of "
                  f"{args.epochs} epochs; pass --epochs N (N > {trainer.epoch}) to train more",
                  file=sys.stderr)
        if stopper.signum is not None:  # saved with the handlers still on: a second signal
            trainer.save(ckpt_path)     # exits at once
    if stopper.signum is not None:
        if comm.rank != 0:
            return 128 + stopper.signum
        print(f"anycnn: interrupted ({trainer.stopped}) at epoch {trainer.epoch + 1}, step "
              f"{trainer.step}; checkpoint saved to {ckpt_path}. Resume with the same command "
              "plus --resume", file=sys.stderr)
        return 128 + stopper.signum
    if comm.rank != 0:  # rank 0 reports
        return 0
    if trainer.skipped_steps:
        print(f"anycnn: warning: {trainer.skipped_steps} step(s) skipped because the loss was "
              "NaN or infinite (--on-nan skip)", file=sys.stderr)
    if early is not None and early.stopped_epoch is not None:
        print(f"early stopping at epoch {early.stopped_epoch} (best epoch {early.best_epoch}, "
              f"{args.monitor} {early.best:.4f})")
    if best.review(trainer.history) is not None:
        _say(args.quiet, f"best {args.monitor} {best.best:.4f} at epoch {best.best_epoch}: "
             f"{best.path}")
    last = trainer.history[-1]
    print(f"final validation accuracy {last['val_accuracy']:.4f} (loss {last['val_loss']:.4f}); "
          f"checkpoint {ckpt_path}; history {history_path}")
    return 0


def _preprocessing(args, data, saved_config: dict):
    """(Augment or None, Normalize or None) of a training run, from ``--augment`` and
    ``--normalize`` or their defaults for the image shape; ``args`` then hold the resolved
    choices (what the checkpoint records). A resumed run reuses the recorded statistics."""
    from ..data.augment import Normalize, default_normalize, parse_augment, read_preprocess

    augment = parse_augment(args.augment or "auto", data.image_shape)
    args.augment = augment.spec() if augment is not None else "none"
    if args.normalize is None:
        args.normalize = "auto" if default_normalize(data.image_shape) else "none"
    if args.normalize == "none":
        return augment, None
    _, recorded = read_preprocess(saved_config.get("preprocess"))
    return augment, recorded or Normalize.from_images(data.train.images)


def _output_folder(args) -> tuple[Path, Path | None]:
    """(the run's output folder, the checkpoint to resume from or None), checked.

    ``--resume`` alone resumes from ``OUT/checkpoint.safetensors``; ``--resume PATH`` from PATH
    (a checkpoint file, or a run folder holding one), and OUT then defaults to its folder.
    """
    from ..io.checkpoint import checkpoint_in
    from .predict import run_label

    default = f"runs/{args.model}-{run_label(args.dataset)}"
    resume = None
    if args.resume is not None:
        resume = checkpoint_in(args.resume or args.out or default)
        if not resume.is_file():
            raise ConfigError(f"--resume: no checkpoint at {resume}")
    out = Path(args.out) if args.out else (
        resume.parent if resume is not None else Path(default))
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--out {out}: {folder} is a file, not a directory")
    return out, resume


#: settings that define the training data: a resumed run must use the same
_DATA_SETTINGS = ("model", "dataset", "data_dir", "limit", "image_size", "channels", "val_split",
                  "normalize")

#: hyperparameters a resumed run may change (the user is warned, old -> new)
_TUNABLE_SETTINGS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
                     "schedule", "warmup_steps", "label_smoothing", "seed", "dtype", "on_nan",
                     "early_stop", "monitor", "min_delta", "device_resident", "bad_images",
                     "augment")


def _settings_from_checkpoint(args, saved) -> dict:
    """Take the run's settings from the checkpoint to resume, unless given on the command line;
    returns the checkpoint's recorded config (``{}`` when there is none).

    A given setting that differs is refused when it changes the data or the model
    (:data:`_DATA_SETTINGS`), and listed old -> new in a warning otherwise. Display options
    (``--quiet``, ``--log-every``) and ``--backend`` are never taken from the checkpoint.
    """
    path = saved.path
    config = saved.config
    if not config:
        return {}  # saved from Python: nothing recorded to compare with
    given = getattr(args, "given", None)  # None: every setting counts as given
    changed = []
    for key in (*_DATA_SETTINGS, *_TUNABLE_SETTINGS):
        if key not in config:
            continue
        if given is not None and key not in given:
            setattr(args, key, config[key])
        elif config[key] != getattr(args, key):
            option = "--" + key.replace("_", "-")
            if key in _DATA_SETTINGS:
                raise ConfigError(
                    f"--resume: {path} was trained with {option} {config[key]}, not "
                    f"{getattr(args, key)}; resume with the same data and model, or start a "
                    "new run with another --out")
            changed.append(f"{option[2:]} {config[key]} -> {getattr(args, key)}")
    if changed:
        print(f"anycnn: warning: resuming {path} with changed settings: {', '.join(changed)}",
              file=sys.stderr)
    return config


def _given_options(argv: list[str] | None, args: argparse.Namespace) -> frozenset[str]:
    """The destinations of the options that ``argv`` sets for ``args.command`` (the others
    hold their defaults): parsed again with every default replaced by a marker."""
    unset = object()
    probe = build_parser()
    probe.commands[args.command].set_defaults(
        **{dest: unset for dest in vars(args) if dest != "command"})
    given = vars(probe.parse_args(argv))
    return frozenset(k for k, v in given.items() if v is not unset) - {"command"}


def _top_k_option(text: str | None, num_classes: int) -> tuple[int, ...]:
    from ..train.metrics import check_top_k

    if text is None:
        return (1, 5) if num_classes >= 5 else (1,)
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--top-k expects positive integers separated by commas, got "
                          f"{text!r}") from None
    return check_top_k(values, num_classes)


def cmd_evaluate(args) -> int:
    from ..data.augment import read_preprocess
    from ..data.dataloader import DataLoader
    from ..io.checkpoint import checkpoint_in, load_model
    from ..train.metrics import to_json, worst_classes
    from ..train.trainer import evaluate
    from .predict import load_eval_data

    _select_backend(args.backend)
    if args.confusion_plot:
        from .plot import pyplot

        pyplot()  # no matplotlib: say so before the evaluation, not after
    model, state = load_model(checkpoint_in(args.checkpoint))
    config = state.config
    _, normalize = read_preprocess(config.get("preprocess"))  # as in training
    name = args.dataset or config.get("dataset") or "mnist-sample"
    num_classes = model.model_spec["num_classes"]
    top_k = _top_k_option(args.top_k, num_classes)
    data = load_eval_data(name, args.data_dir or config.get("data_dir"), config,
                          progress=not args.json)
    split = getattr(data, args.split)
    names = data.class_names if len(data.class_names) == num_classes else None
    result = evaluate(model, DataLoader(split, args.batch_size, normalize=normalize),
                      top_k=top_k, confusion=True, class_names=names)
    written = None
    if args.confusion_plot:
        from .plot import plot_confusion

        written = plot_confusion(result["confusion_matrix"], result["class_names"],
                                 args.confusion_plot,
                                 title=f"confusion matrix — {name} {args.split}")
    if args.json:
        report = {"checkpoint": str(args.checkpoint), "dataset": name, "split": args.split,
                  **to_json(result)}
        print(json.dumps(report))
        if written:
            print(f"wrote {written}", file=sys.stderr)
        return 0
    print(f"{name} {args.split}: loss {result['loss']:.4f} accuracy {result['accuracy']:.4f} "
          f"({result['count']} images)")
    beyond_1 = [f"top-{k} accuracy {v:.4f}" for k, v in result["top_k_accuracy"].items() if k != 1]
    if beyond_1:
        print(", ".join(beyond_1))
    worst = worst_classes(result, 3)
    if worst:
        print("worst classes: " + ", ".join(f"{n} {a:.4f}" for n, a in worst))
    if written:
        print(f"wrote {written}")
    return 0


def cmd_info(args) -> int:
    from ..backend import ENV_VAR, probe_all, resolve

    requested = args.backend or os.environ.get(ENV_VAR) or "auto"
    print(f"anycnn {__version__}, Python {sys.version.split()[0]}")
    try:
        chosen = resolve(requested)
        print(f"backend: {chosen.name} on {chosen.device} — {chosen.reason} "
              f"(requested {requested!r})")
    except AnycnnError as exc:
        print(f"backend: unusable — {exc}")
        chosen = None
    print("available backends:")
    for row in probe_all():
        mark = "yes" if row["ok"] else "no "
        detail = f"{row['version']} on {row['device']}" if row["ok"] else row["detail"]
        print(f"  {mark} {row['name']:<17} {detail}")
    from .. import native

    print(f"compiled NumPy kernels (convolution, BatchNorm): {native.describe()}")
    return 0 if chosen is not None else EXIT_USAGE


def cmd_plot(args) -> int:
    from .plot import plot_file

    written = plot_file(args.history, args.output)
    print(f"wrote {written}")
    return 0


def cmd_bench(args) -> int:
    from .bench import run

    _select_backend(args.backend)
    return run(args)


def _image_shape_option(text: str) -> tuple[int, int, int]:
    """``--input-shape H,W,C`` as three positive integers with H == W (presets are square)."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--input-shape expects three positive integers H,W,C such as "
                          f"28,28,1; got {text!r}")
    if shape[0] != shape[1]:
        raise ConfigError(f"--input-shape {text}: the presets take square images (H == W)")
    return shape


def cmd_summary(args) -> int:
    from ..models import build_model, model_spec
    from ..nn.summarize import summary

    _select_backend(args.backend)
    spec = model_spec(args.model)
    if args.dataset is not None and args.input_shape is not None:
        raise ConfigError("--dataset and --input-shape both set the input shape: pass one")
    if args.num_classes is not None and args.num_classes < 1:
        raise ConfigError(f"--num-classes must be >= 1, got {args.num_classes}")
    classes = 10
    if args.input_shape is not None:
        shape = _image_shape_option(args.input_shape)
    elif args.dataset is not None:
        from .predict import load_data

        data = load_data(args.dataset, args.data_dir, {}, progress=False)
        shape, classes = data.image_shape, data.num_classes
    else:
        shape = (spec["image_size"], spec["image_size"], spec["in_channels"])
    classes = args.num_classes or classes
    model = build_model({**spec, "num_classes": classes, "in_channels": shape[2],
                         "image_size": shape[0]})
    print(f"model {args.model}, {classes} classes")
    print(summary(model, shape))
    return 0


def cmd_export(args) -> int:
    from ..io.checkpoint import checkpoint_in, load_model
    from ..io.onnx import export_onnx, import_onnx
    from .predict import preprocess_of

    onnx = import_onnx()  # no onnx: say so before loading anything
    _select_backend(args.backend)
    model, state = load_model(checkpoint_in(args.checkpoint))
    record, recorded = preprocess_of(state, model)
    metadata = {"preprocess": json.dumps(record)} if recorded else None  # for anycnn predict
    written = export_onnx(model, args.output, opset=args.opset, layout=args.layout,
                          metadata=metadata)
    opset = onnx.load(str(written)).opset_import[0].version
    spec = model.model_spec
    side, channels = spec["image_size"], spec["in_channels"]
    shape = (f"[batch, {side}, {side}, {channels}]" if args.layout == "nhwc" else
             f"[batch, {channels}, {side}, {side}]")
    print(f"wrote {written} ({spec['name']}, opset {opset}): input {shape} "
          f"{args.layout.upper()} {state.dtype}, output logits [batch, {spec['num_classes']}]")
    return 0


def cmd_predict(args) -> int:
    from .predict import cmd_predict as run

    _select_backend(args.backend)
    return run(args)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict,
            "info": cmd_info, "plot": cmd_plot, "bench": cmd_bench, "summary": cmd_summary,
            "export": cmd_export}


def _one_line(text: str) -> str:
    """An error message on one line (multi-line ones, e.g. lists of folders, are joined)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    out = lines[0] if lines else ""
    for line in lines[1:]:
        out += (" " if out.endswith(":") else "; ") + line
    return out


def tune_blas_threads() -> None:
    """Make OpenBLAS's idle threads sleep at once instead of spinning (2**28 cycles by default).

    On a machine with few cores a spinning BLAS thread steals the core that anycnn's
    elementwise work and gathers run on between two matrix products (measured: about 20% of a
    simple-cnn training step on 2 cores). OpenBLAS reads ``OPENBLAS_THREAD_TIMEOUT`` when it
    loads, so this only acts before NumPy is imported; a value set by the user wins.
    """
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def _refuse_several_ranks(command: str) -> None:
    """Only ``train`` runs on several ranks: the other commands, started N times by a
    launcher, would each do the whole work and print it N times."""
    if command == "train":
        return
    from ..dist.launch import launcher_size

    size = launcher_size()
    if size is not None and size > 1:
        error = ConfigError(f"anycnn {command} runs on one process, but a launcher started "
                            f"{size}; run it without mpiexec/srun (only train is data-parallel)")
        error.every_rank = True
        raise error


def _fail(message: str, every_rank: bool = False) -> int:
    """Report a user-facing error in one line and return the exit status.

    Several ranks (``mpiexec``): a mistake every rank makes in the same place (bad options
    before MPI starts; a configuration mismatch or a NaN loss, which all ranks see) is printed
    by rank 0 alone and every rank exits; any other error is printed with its rank and ends the
    whole job (the other ranks may be waiting for this one in a collective).
    """
    from ..dist.launch import current_communicator, launcher_rank

    comm = current_communicator()
    if comm is not None and comm.size > 1 and not every_rank:
        print(f"anycnn: error on rank {comm.rank}/{comm.size}: {message}", file=sys.stderr,
              flush=True)
        comm.abort(EXIT_USAGE)
    rank = comm.rank if comm is not None else launcher_rank()
    if not rank:
        print(f"anycnn: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    tune_blas_threads()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:  # `anycnn` alone: say what it can do
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        args.given = _given_options(argv, args)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        _refuse_several_ranks(args.command)
        return COMMANDS[args.command](args)
    except AnycnnError as exc:
        return _fail(_one_line(str(exc)), getattr(exc, "every_rank", False))
    except FileNotFoundError as exc:
        return _fail(f"no such file: {exc.filename}")
    except PermissionError as exc:
        return _fail(f"permission denied: {exc.filename}")
    except BrokenPipeError:  # `anycnn info | head`: the reader left; stop quietly like cat
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as exc:  # not a directory, disk full, read-only file system, ...
        where = f": {exc.filename}" if exc.filename else ""
        return _fail(f"{exc.strerror or exc}{where}")
    except KeyboardInterrupt:
        print("anycnn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
