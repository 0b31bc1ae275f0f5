"""What every ``anycnn`` command shares: the parser classes, the ``--backend`` option, backend
selection, quiet-aware printing, and one-line error reports.

A user's mistake prints one line ``anycnn: error: ...`` and exits with :data:`EXIT_USAGE`.
"""

from __future__ import annotations

import argparse
import sys

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
        raise ConfigError(message)


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
