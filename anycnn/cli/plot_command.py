"""``anycnn plot``: loss and accuracy curves from a ``history.json``, or the confusion matrix
from the output of ``anycnn evaluate --json`` (drawn by :mod:`anycnn.cli.plot`)."""

from __future__ import annotations

import argparse

HELP = ("draw loss and accuracy curves from a history.json, or the confusion matrix from the "
        "output of evaluate --json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``anycnn plot``."""
    p.add_argument("history", metavar="FILE",
                   help="a history.json, or a file holding the output of anycnn evaluate --json")
    p.add_argument("-o", "--output", default="curves.png",
                   help="image file to write (.png unless it ends in .svg or .pdf)")


def run(args) -> int:
    """``anycnn plot``."""
    from .plot import plot_file

    written = plot_file(args.history, args.output)
    print(f"wrote {written}")
    return 0
