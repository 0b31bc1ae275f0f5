"""``anycnn train --out`` / ``--resume``: the run's output folder, and the settings a resumed
run takes from its checkpoint (refused when they change the data or the model, listed in a
warning when they change a hyperparameter)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import AnycnnError, ConfigError

#: settings that define the training data: a resumed run must use the same
DATA_SETTINGS = ("model", "dataset", "data_dir", "limit", "image_size", "channels", "val_split",
                 "normalize", "preprocess_spec", "multi_label")

#: hyperparameters a resumed run may change (the user is warned, old -> new)
TUNABLE_SETTINGS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
                    "schedule", "warmup_steps", "label_smoothing", "seed", "dtype", "on_nan",
                    "early_stop", "monitor", "min_delta", "device_resident", "bad_images",
                    "augment", "weights", "freeze", "lr_backbone", "unfreeze_at", "loss",
                    "class_weights", "plateau_patience", "clip_grad_norm", "clip_grad_value",
                    "ema")


#: the command-line spelling of a setting whose name differs from its option's
OPTION_NAMES = {"preprocess_spec": "--preprocess"}


def output_folder(args) -> tuple[Path, Path | None]:
    """(the run's output folder, the checkpoint to resume from or None), checked.

    ``--resume`` alone resumes from ``OUT/checkpoint.safetensors``; ``--resume PATH`` from PATH
    (a checkpoint file, or a run folder holding one), and OUT then defaults to its folder.
    """
    from ..io.checkpoint import checkpoint_in
    from .folders import run_label

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


def settings_from_checkpoint(args, saved) -> dict:
    """Take the run's settings from the checkpoint to resume, unless given on the command line;
    returns the checkpoint's recorded config (``{}`` when there is none).

    A given setting that differs is refused when it changes the data or the model
    (:data:`DATA_SETTINGS`), and listed old -> new in a warning otherwise. Display options
    (``--quiet``, ``--log-every``) and ``--backend`` are never taken from the checkpoint.
    """
    path = saved.path
    config = saved.config
    if not config:
        return {}  # saved from Python: nothing recorded to compare with
    given = getattr(args, "given", None)  # None: every setting counts as given
    changed = []
    for key in (*DATA_SETTINGS, *TUNABLE_SETTINGS):
        if key not in config:
            continue
        if given is not None and key not in given:
            setattr(args, key, config[key])
        elif config[key] != getattr(args, key) and not (
                key == "augment" and same_augment(config[key], args.augment, config)):
            option = OPTION_NAMES.get(key, "--" + key.replace("_", "-"))
            if key in DATA_SETTINGS:
                raise ConfigError(
                    f"--resume: {path} was trained with {option} {config[key]}, not "
                    f"{getattr(args, key)}; resume with the same data and model, or start a "
                    "new run with another --out")
            changed.append(f"{option[2:]} {config[key]} -> {getattr(args, key)}")
    if changed:
        print(f"anycnn: warning: resuming {path} with changed settings: {', '.join(changed)}",
              file=sys.stderr)
    return config


def same_augment(recorded: str, given: str | None, config: dict) -> bool:
    """Whether ``--augment`` text ``given`` means the recorded (normalised) ``recorded``
    spec: both parsed for the recorded image size (``rrc`` is ``rrc=32`` on 32x32 images,
    ``crop`` is ``crop=4``), so a resumed run given the same augmentation is not warned."""
    from ..data.augment import parse_augment

    if given is None or recorded is None:
        return given == recorded
    size = (config.get("preprocess") or {}).get("image_size")
    channels = (config.get("preprocess") or {}).get("channels", 3)
    if not (isinstance(size, list) and len(size) == 2):
        return False
    shape = (int(size[0]), int(size[1]), int(channels))

    def spec(text: str) -> str:
        augment = parse_augment(text, shape, output_size=shape[0])
        return augment.spec() if augment is not None else "none"

    try:
        return spec(given) == spec(recorded)
    except AnycnnError:
        return False  # a bad --augment is reported when the run parses it
