"""Loss and accuracy curves from a ``history.json`` (matplotlib is an optional extra)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError, DataError


def read_history(path: str | Path) -> list[dict]:
    """The list of epoch records in a ``history.json``; DataError if it is not one."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such history file") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable JSON history ({exc})") from None
    if not isinstance(records, list) or not records or not all(
            isinstance(r, dict) and "epoch" in r and "train_loss" in r for r in records):
        raise DataError(f"{path}: expected a non-empty list of epoch records "
                        "(as written by anycnn train)")
    return records


def plot_history(history: str | Path, output: str | Path) -> Path:
    """Draw train/validation loss and accuracy per epoch into ``output`` (PNG, SVG or PDF)."""
    records = read_history(history)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'anycnn[plot]'") from None
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        if any(r.get(key) is not None for r in records):
            ax_loss.plot(epochs, [r.get(key) for r in records], marker="o", label=label)
    for key, label in (("train_accuracy", "train"), ("val_accuracy", "validation")):
        if any(r.get(key) is not None for r in records):
            ax_acc.plot(epochs, [r.get(key) for r in records], marker="o", label=label)
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.set(title="accuracy", xlabel="epoch")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    output = Path(output)
    try:
        fig.savefig(output, dpi=120)
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return output
