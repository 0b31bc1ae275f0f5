"""What every ``anycnn`` command shares: the parser classes, the ``--backend`` option, backend
selection, quiet-aware printing, and one-line error reports.

A user's mistake prints one line ``anycnn: error: ...`` and exits with :data:`EXIT_USAGE`.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from ..errors import ConfigError

EXIT_USAGE = 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default, unless it has none or states it in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if any(action.default is none for none in (None, False, argparse.SUPPRESS)) or (
                "default" in text):
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line with our prefix, and shows defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str) -> None:  # type: ignore[override]
        # "argument --epochs: must be >= 1, got 0" (an option type's message) reads
        # "--epochs must be >= 1, got 0"; "argument --x: --x ..." names the option once;
        # any other "argument --x: ..." reads "--x: ..."
        match = re.fullmatch(r"argument ([^:]+): (.*)", message, re.DOTALL)
        if match:
            option, rest = match.groups()
            message = (rest if rest.startswith(option + " ") or rest.startswith(option + ":")
                       else f"{option} {rest}" if rest.startswith("must ")
                       else f"{option}: {rest}")
        raise ConfigError(message)


# ------------------------------------------------------------------ option types (argparse)
# Checked while the arguments are parsed, before any file or dataset is read; a bad value is
# one line "anycnn: error: --batch-size must be an integer >= 1, got 0".


def _number(kind: type, text: str, low: float, low_open: bool = False,
            high: float | None = None, high_open: bool = True) -> Any:
    import math

    name = "an integer" if kind is int else "a finite number"
    bounds = f"{'>' if low_open else '>='} {low:g}" if high is None else (
        f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {name} {bounds}, got {text!r}") from None
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and (
        high is None or (value < high if high_open else value <= high))
    if not ok:
        what = "" if kind is int else f"{name} "
        raise argparse.ArgumentTypeError(f"must be {what}{bounds}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1."""
    return _number(int, text, 1)


def count(text: str) -> int:
    """An argparse ``type``: an integer >= 0."""
    return _number(int, text, 0)


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    return _number(float, text, 0, low_open=True)


def non_negative_float(text: str) -> float:
    """An argparse ``type``: a finite number >= 0."""
    return _number(float, text, 0)


def fraction(text: str) -> float:
    """An argparse ``type``: a number in [0, 1)."""
    return _number(float, text, 0, high=1)


def open_fraction(text: str) -> float:
    """An argparse ``type``: a number in (0, 1)."""
    return _number(float, text, 0, low_open=True, high=1)


def model_name(text: str) -> str:
    """An argparse ``type``: a preset's name in any case, ``-`` and ``_`` alike, as the preset
    spells it (what checkpoints record): ``LeNet5`` -> ``lenet5``."""
    from ..models import MODELS, canonical_model_name

    try:
        return canonical_model_name(text, MODELS)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def backend_option(parser: argparse.ArgumentParser) -> None:
    """The ``--backend`` option of the commands that compute."""
    from ..backend import backend_help

    parser.add_argument("--backend", help=backend_help())


def select_backend(name: str | None):
    """Switch to backend ``name`` when given; return the backend in use."""
    from ..backend import get_backend, use_backend

    if name:
        use_backend(name)
    return get_backend()


def say(quiet: bool, text: str) -> None:
    """Print ``text`` (flushed) unless ``quiet``."""
    if not quiet:
        print(text, flush=True)


def one_line(text: str) -> str:
    """An error message on one line (multi-line ones, e.g. lists of folders, are joined)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    out = lines[0] if lines else ""
    for line in lines[1:]:
        out += (" " if out.endswith(":") else "; ") + line
    return out


def fail(message: str, every_rank: bool = False) -> int:
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
