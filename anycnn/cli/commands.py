"""The ``anycnn`` command: its parser and :func:`main` (the console entry point).

Each command is a module of :mod:`anycnn.cli` with ``HELP``, ``add_arguments(parser)`` and
``run(args)``: ``train``, ``evaluate``, ``predict``, ``info``, ``plot`` (``plot_command``),
``summary``, ``export`` (ONNX, :mod:`anycnn.io.onnx`) and ``bench``. What they share (the parser
classes, ``--backend``, one-line errors) is :mod:`anycnn.cli.common`.

A user's mistake (bad option, missing file, unusable backend, bad checkpoint) prints one line
``anycnn: error: ...`` and exits with status 2; an interrupted training run saves a checkpoint,
prints how to resume and exits with 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from .. import __version__
from ..errors import AnycnnError, ConfigError
from .common import EXIT_USAGE, Parser, fail, one_line

#: command name -> its module in this package, in the order ``anycnn --help`` lists them
COMMANDS = {"train": "train", "evaluate": "evaluate", "predict": "predict", "info": "info",
            "plot": "plot_command", "summary": "summary", "export": "export", "bench": "bench"}


def command_module(name: str):
    """The module of command ``name`` (imported on first use; none loads an array library at
    import)."""
    return importlib.import_module(f".{COMMANDS[name]}", __package__)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``anycnn`` and of each command (``parser.commands``: name -> parser)."""
    parser = Parser(prog="anycnn", description="Train and evaluate CNNs on any array backend.")
    parser.add_argument("--version", action="version", version=f"anycnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    parser.commands = sub.choices  # name -> its parser
    for name in COMMANDS:
        module = command_module(name)
        module.add_arguments(sub.add_parser(name, help=module.HELP))
    return parser


def _given_options(argv: list[str] | None, args: argparse.Namespace) -> frozenset[str]:
    """The destinations of the options that ``argv`` sets for ``args.command`` (the others
    hold their defaults): parsed again with every default replaced by a marker."""
    unset = object()
    probe = build_parser()
    probe.commands[args.command].set_defaults(
        **{dest: unset for dest in vars(args) if dest != "command"})
    given = vars(probe.parse_args(argv))
    return frozenset(k for k, v in given.items() if v is not unset) - {"command"}


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


def main(argv: list[str] | None = None) -> int:
    """Run ``anycnn`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
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
        return command_module(args.command).run(args)
    except AnycnnError as exc:
        return fail(one_line(str(exc)), getattr(exc, "every_rank", False))
    except FileNotFoundError as exc:
        return fail(f"no such file: {exc.filename}")
    except PermissionError as exc:
        return fail(f"permission denied: {exc.filename}")
    except BrokenPipeError:  # `anycnn info | head`: the reader left; stop quietly like cat
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as exc:  # not a directory, disk full, read-only file system, ...
        where = f": {exc.filename}" if exc.filename else ""
        return fail(f"{exc.strerror or exc}{where}")
    except KeyboardInterrupt:
        print("anycnn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
