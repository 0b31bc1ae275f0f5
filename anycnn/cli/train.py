"""``anycnn train``: train a model and write a checkpoint and history.

Writes ``OUT/checkpoint.safetensors`` after every epoch, ``OUT/best.safetensors`` for the best
``--monitor`` value and ``OUT/history.json``; an interrupted run saves a checkpoint, prints how
to resume and exits with 130 (SIGINT) or 143 (SIGTERM). The output folder and ``--resume`` are
:mod:`anycnn.cli.resume`'s, the processes (``--workers``, ranks) :mod:`anycnn.cli.launch`'s,
the signal handling :mod:`anycnn.train.interrupt`'s, and image folders
:mod:`anycnn.cli.folders`'.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import __version__
from ..errors import ConfigError
from .common import (
    backend_option,
    count,
    fraction,
    model_name,
    non_negative_float,
    open_fraction,
    positive_float,
    positive_int,
    say,
    select_backend,
)

HELP = "train a model and write a checkpoint and history"

#: the line ``anycnn train`` prints at the start when ``--augment`` mixes images
MIXED_ACCURACY = ("note: --augment mixes images (mixup/cutmix): train acc counts an image right "
                  "when the top class is the one that kept the larger share of it; val acc is "
                  "measured on unmixed images")
#: the same under ``--multi-label`` (accuracy is label accuracy there)
MIXED_LABEL_ACCURACY = ("note: --augment mixes images (mixup/cutmix): train acc is the label "
                        "accuracy against the mixed targets (a label counts as present when its "
                        "mixed target is >= 0.5); val acc is measured on unmixed images")


def add_arguments(t: argparse.ArgumentParser) -> None:
    """The arguments of ``anycnn train``."""
    from ..data.datasets import DATASETS
    from ..models import MODELS
    from ..optim.optimizers import OPTIMIZERS
    from ..optim.schedules import SCHEDULES
    from .finetune import add_arguments as add_finetune_options
    from .folders import add_folder_options
    from .losses import add_loss_options

    t.add_argument("--dataset", default="mnist-sample", help=f"one of {', '.join(DATASETS)}, "
                   "or the path of an image folder (one subfolder per class)")
    t.add_argument("--data-dir", help="folder holding the dataset's files "
                   "(IDX; CIFAR: the binary version's folder or .tar.gz)")
    add_folder_options(t)
    add_loss_options(t)
    t.add_argument("--model", default="lenet5", type=model_name,
                   help=f"one of {', '.join(MODELS)} (any case)")
    add_finetune_options(t)
    t.add_argument("--epochs", type=positive_int, default=8, help="epochs to train in total")
    t.add_argument("--batch-size", type=positive_int, default=64,
                   help="images per step (the global batch: on N ranks each takes 1/N of it)")
    t.add_argument("--optimizer", default="adam", help=f"one of {', '.join(OPTIMIZERS)}")
    t.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate (default 1e-3 for adam/adamw/rmsprop, 0.05 for sgd; the "
                   "peak rate with --schedule onecycle)")
    t.add_argument("--momentum", type=non_negative_float, default=None,
                   help="momentum of --optimizer sgd (default 0.9) or rmsprop (default 0)")
    t.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="L2 (sgd, adam) or "
                   "decoupled (adamw) weight decay")
    t.add_argument("--schedule", default="cosine", help=f"one of {', '.join(SCHEDULES)} "
                   "(cosine: per epoch; cosine-per-step and onecycle: per step; plateau: "
                   "divide by 10 when --monitor stops improving)")
    t.add_argument("--plateau-patience", type=count, default=2, metavar="N",
                   help="--schedule plateau: epochs without improvement before the lr is "
                   "divided by 10 (default: 2)")
    t.add_argument("--clip-grad-norm", type=positive_float, default=None, metavar="MAX",
                   help="scale the gradients so that their total 2-norm is at most MAX "
                   "(default: off)")
    t.add_argument("--clip-grad-value", type=positive_float, default=None, metavar="MAX",
                   help="clip every gradient element to [-MAX, MAX] (default: off)")
    t.add_argument("--ema", type=open_fraction, default=None, metavar="DECAY",
                   help="keep an exponential moving average of the weights (e.g. 0.999), "
                   "validate and save it beside the weights; evaluate, predict and export then "
                   "use it (default: off)")
    t.add_argument("--label-smoothing", type=fraction, default=0.0,
                   help="share of each target spread over all classes")
    t.add_argument("--seed", type=count, default=0,
                   help="initial weights and the shuffling order")
    t.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="train on the first N training images only (quick runs)")
    t.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="floating-point precision of weights and activations")
    t.add_argument("--augment", default=None, metavar="SPEC",
                   help="random crop/flip of training batches: none, or items separated by "
                   "commas: crop (padding 1/8 of the image side), crop=P, pad=zeros|edge; or "
                   "rrc (random-resized crop to the --preprocess crop, else the image size), "
                   "rrc=S, scale=LO:HI (default 0.08:1), ratio=LO:HI (default 0.75:1.3333); "
                   "and flip; on the device: rotate=D (degrees, up to 180), jitter=V "
                   "(brightness, contrast, saturation; V in [0, 1]) or brightness=V, "
                   "contrast=V, saturation=V, hue=H (H in [0, 0.5]), erase=P (random erasing "
                   "with probability P), mixup=A, cutmix=A (soft targets) "
                   "(default: crop=4,flip for 32x32 RGB images, none otherwise)")
    t.add_argument("--normalize", default=None, choices=["auto", "none", "imagenet"],
                   help="auto: subtract the training split's per-channel mean and divide by its "
                   "std; imagenet: ImageNet's mean/std (recorded in the checkpoint, applied by "
                   "evaluate and predict); default: imagenet with --preprocess imagenet, auto "
                   "for 32x32 RGB images, none otherwise")
    t.add_argument("--device-resident", action="store_true",
                   help="keep the dataset on the device (GPU) and batch there")
    t.add_argument("--on-nan", default="stop", choices=["stop", "skip"],
                   help="on a NaN/inf loss: stop, or skip that step")
    t.add_argument("--out", default=None, help="output folder (default runs/<model>-<dataset>)")
    t.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (a file, or a run folder), else from "
                   "OUT/checkpoint.safetensors; OUT defaults to the checkpoint's folder")
    t.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    t.add_argument("--warmup-steps", type=count, default=0, metavar="N",
                   help="ramp the lr up linearly over the first N steps (default: 0)")
    t.add_argument("--early-stop", type=count, default=None, metavar="PATIENCE",
                   help="stop after PATIENCE epochs without a better --monitor (default: off)")
    t.add_argument("--monitor", default="val_loss", metavar="KEY",
                   help="metric for --early-stop and best.safetensors (default: val_loss; "
                   "or val_accuracy, train_loss, train_accuracy)")
    t.add_argument("--min-delta", type=non_negative_float, default=0.0, metavar="X",
                   help="smallest change --early-stop counts as better (default: 0)")
    t.add_argument("--log-every", type=count, default=0, metavar="N",
                   help="also print a line every N steps (default: 0, off)")
    t.add_argument("--compile", action="store_true",
                   help="run each training step as one jax.jit-compiled function (jax backend)")
    t.add_argument("--sync-bn", action="store_true",
                   help="on several ranks, BatchNorm statistics of the global batch instead of "
                   "each rank's share (three small allreduces per layer and step)")
    t.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="train data-parallel on N processes of this machine (runs the same "
                   "command under the installed mpiexec; needs pip install 'anycnn[mpi]'; "
                   "or start it yourself: mpiexec -n N anycnn train ...)")
    backend_option(t)


# ------------------------------------------------------------------------------------- checks


def check_options(args) -> dict:
    """Check the options that need no data, fill in the defaults of ``--lr`` and
    ``--momentum`` (the values used, as recorded in checkpoints and compared on ``--resume``),
    and return the model's spec."""
    from ..data.augment import parse_augment
    from ..models import model_spec
    from ..optim.optimizers import OPTIMIZERS
    from ..optim.schedules import make_schedule
    from .finetune import check as check_finetune
    from .losses import check_loss_options
    from .transforms import check_preprocess_options

    if args.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {args.optimizer!r}; valid names: "
                          f"{', '.join(OPTIMIZERS)}")
    if args.momentum is not None and args.optimizer not in ("sgd", "rmsprop"):
        raise ConfigError(f"--momentum applies to --optimizer sgd and rmsprop only; "
                          f"{args.optimizer} would ignore it")
    spec = model_spec(args.model)  # validate the name before loading data
    check_finetune(args)
    # validate the name before loading data
    make_schedule(args.schedule, 1.0, args.epochs, steps_per_epoch=1)
    if args.plateau_patience != 2 and args.schedule != "plateau":
        raise ConfigError("--plateau-patience applies to --schedule plateau only")
    if args.lr is None:
        args.lr = 0.05 if args.optimizer == "sgd" else 1e-3
    if args.momentum is None and args.optimizer == "sgd":
        args.momentum = 0.9
    _check_callback_options(args)
    if args.augment is not None:
        parse_augment(args.augment)  # the syntax, before loading data
    check_preprocess_options(args)  # --preprocess (ImageNet-style geometry)
    _check_image_size_option(args, spec["name"])
    check_loss_options(args)  # --loss, --class-weights, --multi-label
    return spec


def _check_image_size_option(args, model: str) -> None:
    """An image folder's ``--image-size`` (or ``--preprocess`` crop) below the model's
    smallest input, refused before the folder is decoded."""
    from ..errors import ShapeError
    from ..models import MIN_IMAGE_SIZE
    from .folders import is_image_folder
    from .transforms import parse_preprocess

    minimum = MIN_IMAGE_SIZE.get(model, 1)
    parsed = parse_preprocess(getattr(args, "preprocess_spec", None))
    option, size = (("--image-size", args.image_size) if parsed is None else
                    ("--preprocess crop", parsed[1]))
    if size is not None and size < minimum and is_image_folder(args.dataset):
        raise ShapeError(f"{option} {size} is too small for {model}: it takes images of at "
                         f"least {minimum}x{minimum}")


def check_input_size(args, data) -> None:
    """The loaded images against the model's smallest input (:data:`~anycnn.models.
    MIN_IMAGE_SIZE`), with how to resize an image folder."""
    from ..errors import ShapeError
    from ..models import MIN_IMAGE_SIZE
    from .folders import is_image_folder

    minimum = MIN_IMAGE_SIZE.get(args.model, 1)
    h, w, _ = data.val.image_shape
    if min(h, w) < minimum:
        hint = (f"; pass --image-size {minimum} (or more) to resize them"
                if is_image_folder(args.dataset) else "")
        raise ShapeError(f"{args.model} takes images of at least {minimum}x{minimum}, but the "
                         f"images of {data.name} are {h}x{w}{hint}")


def _check_callback_options(args) -> None:
    """The options of ``train`` added for callbacks, checked before any data is loaded."""
    import dataclasses

    from ..train.trainer import EpochRecord

    monitors = [f.name for f in dataclasses.fields(EpochRecord)
                if "loss" in f.name or "accuracy" in f.name]
    if args.monitor not in monitors:
        raise ConfigError(f"--monitor must be one of {', '.join(monitors)}, got {args.monitor!r}")
    if args.min_delta and args.early_stop is None:
        raise ConfigError("--min-delta only applies to --early-stop: add --early-stop PATIENCE")
    if args.log_every and args.quiet:
        raise ConfigError("--log-every prints lines that --quiet turns off: drop one of them")


# ----------------------------------------------------------------------------------- the data


def load_training_data(args, comm):
    """The training data (``--limit``: its first N training images; a limit above the
    training split's size trains on all of it, with a warning), loaded once per node."""
    from .folders import load_train_data
    from .launch import load_on_node_leader_first

    data = load_on_node_leader_first(comm, lambda: load_train_data(args,
                                                                   progress=not args.quiet))
    if args.limit is not None and args.limit < len(data.train):
        import dataclasses

        import numpy as np

        data = dataclasses.replace(data, train=data.train.subset(np.arange(args.limit)))
    elif args.limit is not None and args.limit > len(data.train) and comm.rank == 0:
        print(f"anycnn: warning: --limit {args.limit} is more than the {len(data.train)} "
              f"training images of {data.name}: training on all {len(data.train)}",
              file=sys.stderr)
    return data


def preprocessing(args, data, saved_config: dict):
    """(augmentation or None, Normalize or None) of a training run, from ``--augment`` and
    ``--normalize`` or their defaults for the image shape; ``args`` then hold the resolved
    choices (what the checkpoint records). A resumed run reuses the recorded statistics."""
    from ..data.augment import default_normalize, parse_augment, read_preprocess
    from .transforms import check_augment_output, normalization

    augment = parse_augment(args.augment or "auto", data.image_shape,
                            output_size=data.val.image_shape[0])
    check_augment_output(augment, data)
    args.augment = augment.spec() if augment is not None else "none"
    if args.normalize is None:
        args.normalize = "auto" if default_normalize(data.val.image_shape) else "none"
    _, recorded = read_preprocess(saved_config.get("preprocess"))
    return augment, normalization(args, data, recorded)


def defaults_line(args, defaulted: list[str], data) -> str | None:
    """The line saying which augmentation and normalisation ``anycnn train`` switched on by
    default (``defaulted``: the options the user left unset, now resolved in ``args``), or
    None when the defaults switched nothing on."""
    on, off = [], []
    if "augment" in defaulted and args.augment != "none":
        kind = "random-resized crops" if "rrc" in args.augment else "random crops"
        flips = " and flips" if "flip" in args.augment else ""
        on.append(f"--augment {args.augment} ({kind}{flips} of the training images)")
        off.append("--augment none")
    if "normalize" in defaulted and args.normalize != "none":
        stats = "the training split's" if args.normalize == "auto" else "ImageNet's"
        on.append(f"--normalize {args.normalize} ({stats} per-channel mean/std)")
        off.append("--normalize none")
    if not on:
        return None
    h, w, c = data.val.image_shape
    return (f"defaults applied ({h}x{w}x{c} images): {'; '.join(on)}. Pass {' / '.join(off)} "
            f"to turn {'them' if len(on) > 1 else 'it'} off")


# -------------------------------------------------------------------------------- the trainer


def build_model(args, spec: dict, comm, resuming: bool = False):
    """The seeded model of ``spec`` in ``--dtype`` (BatchNorm synchronised with ``--sync-bn``),
    started from ``--weights`` unless the run resumes (:mod:`anycnn.cli.finetune`)."""
    from .. import random
    from ..models import build_model as build
    from .finetune import load_weights

    random.manual_seed(args.seed)
    model = build(spec)
    if args.weights is not None and not resuming:
        load_weights(args, model, spec["num_classes"])
    if args.dtype != "float32":
        model.to(args.dtype)
    if args.sync_bn:
        from ..dist.sync import sync_batchnorm

        sync_batchnorm(model, comm)
    return model


def make_optimizer(args, model):
    """``--optimizer`` over the model's parameters, with ``--lr``, ``--weight-decay`` and (SGD)
    ``--momentum``; with ``--lr-backbone``, two parameter groups (:mod:`.finetune`)."""
    from ..optim.optimizers import OPTIMIZERS
    from .finetune import parameter_groups

    opt_kwargs = {"weight_decay": args.weight_decay}
    if args.optimizer == "sgd":
        opt_kwargs["momentum"] = args.momentum
    elif args.optimizer == "rmsprop" and getattr(args, "momentum", None) is not None:
        opt_kwargs["momentum"] = args.momentum
    params = parameter_groups(args, model) or model.parameters()
    return OPTIMIZERS[args.optimizer](params, lr=args.lr, **opt_kwargs)


def _write_json_atomic(path: Path, data) -> None:
    from ..atomic import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def _history_file(path: Path):
    """A callback that rewrites ``history.json`` (atomically) after every epoch."""
    from ..train.callbacks import Callback

    class HistoryFile(Callback):
        def on_epoch_end(self, trainer, epoch, record) -> None:
            if trainer.comm.rank == 0:
                _write_json_atomic(path, trainer.history)

    return HistoryFile()


def make_callbacks(args, out: Path, history_path: Path):
    """``(callbacks, best, early)``: after each epoch's checkpoint, ``best.safetensors``, early
    stopping (``early`` None without ``--early-stop``), the log line, ``history.json``."""
    from ..train.callbacks import BestCheckpoint, EarlyStopping, ProgressLog
    from .finetune import unfreeze_callback

    best = BestCheckpoint(out / "best.safetensors", args.monitor)
    early = (EarlyStopping(args.monitor, args.early_stop, args.min_delta)
             if args.early_stop is not None else None)
    freeze = [unfreeze_callback(args)] if args.freeze not in ("none", 0) else []
    callbacks = [*freeze, best, *([early] if early else []),
                 *([] if args.quiet else [ProgressLog(args.log_every)]),
                 _history_file(history_path)]
    return callbacks, best, early


def make_schedule_of(args, steps_per_epoch: int):
    """``--schedule`` with ``--lr``, ``--epochs``, ``--monitor`` and ``--plateau-patience``
    (``steps_per_epoch``: the training loader's length, for the per-step schedules)."""
    from ..optim.schedules import make_schedule

    return make_schedule(args.schedule, args.lr, args.epochs, steps_per_epoch=steps_per_epoch,
                         monitor=args.monitor, patience=args.plateau_patience)


def make_trainer(args, model, spec: dict, comm, ckpt_path: Path, callbacks: list,
                 steps_per_epoch: int, loss_fn=None):
    """The :class:`~anycnn.train.trainer.Trainer` of the run; its config is the command's
    options (recorded in every checkpoint). ``loss_fn``: default softmax cross-entropy with
    ``--label-smoothing`` (:func:`anycnn.cli.losses.make_loss` builds the run's)."""
    from ..nn.losses import SoftmaxCrossEntropy
    from ..train.trainer import Trainer

    loss_fn = loss_fn or SoftmaxCrossEntropy(args.label_smoothing)
    return Trainer(model, make_optimizer(args, model), loss_fn,
                   schedule=make_schedule_of(args, steps_per_epoch), model_spec=spec,
                   checkpoint_path=ckpt_path, on_nonfinite=args.on_nan,
                   progress=not args.quiet, callbacks=callbacks,
                   warmup_steps=args.warmup_steps, comm=comm, compile=args.compile,
                   clip_grad_norm=args.clip_grad_norm, clip_grad_value=args.clip_grad_value,
                   ema=args.ema,
                   config={k: v for k, v in vars(args).items()
                           if k not in ("func", "given", "argv", "workers")})


def make_loaders(args, data, augment, normalize):
    """``(train loader, validation loader)``: shuffled and augmented, and in order."""
    from ..data.dataloader import DataLoader

    loader_opts = dict(device_resident=args.device_resident, dtype=args.dtype)
    train_loader = DataLoader(data.train, args.batch_size, shuffle=True, seed=args.seed,
                              augment=augment, normalize=normalize, **loader_opts)
    val_loader = DataLoader(data.val, 256, normalize=normalize, **loader_opts)
    return train_loader, val_loader


# ------------------------------------------------------------------------------------ the run


def fit(args, trainer, loaders, early, resume_from: Path | None, ckpt_path: Path) -> int | None:
    """Train up to ``--epochs``; the signal that stopped the run (the checkpoint then saved),
    or None."""
    import numpy as np

    from ..train.interrupt import StopOnSignal

    # a run that early stopping ended stays ended when resumed with the same options
    ended = early is not None and trainer.step == 0 and bool(trainer.history) and \
        early.review(trainer.history)
    # NumPy's overflow warnings would bury the one-line NaN report; the trainer checks the loss
    with StopOnSignal(trainer) as stopper, np.errstate(over="ignore", invalid="ignore",
                                                        divide="ignore"):
        if trainer.epoch < args.epochs and not ended:
            trainer.fit(*loaders, epochs=args.epochs)
        elif not ended and trainer.comm.rank == 0:
            print(f"anycnn: nothing to train: {resume_from} has completed {trainer.epoch} of "
                  f"{args.epochs} epochs; pass --epochs N (N > {trainer.epoch}) to train more",
                  file=sys.stderr)
        if stopper.signum is not None:  # saved with the handlers still on: a second signal
            trainer.save(ckpt_path)     # exits at once
    return stopper.signum


def report(args, trainer, best, early, ckpt_path: Path, history_path: Path) -> int:
    """Rank 0's closing lines: skipped steps, early stopping, the best epoch, the final
    validation figures and where the files are."""
    if trainer.skipped_steps:
        print(f"anycnn: warning: {trainer.skipped_steps} step(s) skipped because the loss was "
              "NaN or infinite (--on-nan skip)", file=sys.stderr)
    if early is not None and early.stopped_epoch is not None:
        print(f"early stopping at epoch {early.stopped_epoch} (best epoch {early.best_epoch}, "
              f"{args.monitor} {early.best:.4f})")
    if best.review(trainer.history) is not None:
        say(args.quiet, f"best {args.monitor} {best.best:.4f} at epoch {best.best_epoch}: "
            f"{best.path}")
    last = trainer.history[-1]
    print(f"final validation accuracy {last['val_accuracy']:.4f} (loss {last['val_loss']:.4f}); "
          f"checkpoint {ckpt_path}; history {history_path}")
    return 0


def run(args) -> int:
    """``anycnn train``."""
    from ..data.augment import mixes, preprocess_record
    from ..io.checkpoint import RUN_CHECKPOINT, load_checkpoint
    from .folders import labels_file_option, normalise_dataset
    from .launch import join_ranks, start_workers
    from .losses import make_loss
    from .resume import output_folder, settings_from_checkpoint
    from .transforms import eval_transform

    if args.workers is not None:
        return start_workers(args)
    backend = select_backend(args.backend)
    args.dataset = normalise_dataset(args.dataset)
    args.multi_label = labels_file_option(args.multi_label, args.dataset)  # for evaluate
    out, resume_from = output_folder(args)
    saved, saved_config = None, {}
    if resume_from is not None:  # read once: for its settings here, its state below
        saved = load_checkpoint(resume_from)
        saved_config = settings_from_checkpoint(args, saved)
    ckpt_path, history_path = out / RUN_CHECKPOINT, out / "history.json"
    defaulted = [k for k in ("augment", "normalize") if getattr(args, k) is None]
    spec_check = check_options(args)
    comm = join_ranks(args)
    data = load_training_data(args, comm)
    check_input_size(args, data)
    h, _w, c = data.val.image_shape  # the model's input (training images may be larger: rrc)
    augment, normalize = preprocessing(args, data, saved_config)
    args.preprocess = preprocess_record(augment, normalize, data,
                                        eval_transform(args, normalize))
    spec = {**spec_check, "num_classes": data.num_classes, "in_channels": c, "image_size": h}
    how = backend.reason.split(":")[0] if backend.reason.startswith("auto") else "requested"
    ranks = f" x {comm.size} ranks ({comm.name})" if comm.size > 1 else ""
    say(args.quiet, f"anycnn {__version__}: {backend.name} on {backend.device} ({how}){ranks}; "
        f"{data.name}: {len(data.train)} train / {len(data.val)} val; model {args.model}")
    defaults = defaults_line(args, defaulted, data)
    if defaults:
        say(args.quiet, defaults)
    if mixes(args.augment):
        say(args.quiet, MIXED_LABEL_ACCURACY if args.multi_label is not None else MIXED_ACCURACY)
    model = build_model(args, spec, comm, resuming=resume_from is not None)
    callbacks, best, early = make_callbacks(args, out, history_path)
    loaders = make_loaders(args, data, augment, normalize)
    trainer = make_trainer(args, model, spec, comm, ckpt_path, callbacks, len(loaders[0]),
                           loss_fn=make_loss(args, data))
    if resume_from is not None:
        trainer.resume(saved)
        if trainer.ema is not None:  # a changed --ema applies from here on
            trainer.ema.decay = args.ema
        say(args.quiet, f"resumed from {resume_from} at epoch {trainer.epoch + 1}, "
            f"step {trainer.step}")
    if comm.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    signum = fit(args, trainer, loaders, early, resume_from, ckpt_path)
    if signum is not None:
        if comm.rank != 0:
            return 128 + signum
        print(f"anycnn: interrupted ({trainer.stopped}) at epoch {trainer.epoch + 1}, step "
              f"{trainer.step}; checkpoint saved to {ckpt_path}. Resume with the same command "
              "plus --resume", file=sys.stderr)
        return 128 + signum
    if comm.rank != 0:  # rank 0 reports
        return 0
    return report(args, trainer, best, early, ckpt_path, history_path)
