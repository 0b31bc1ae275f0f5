"""``anycnn info``: which backend would be used, and why; every backend's status; the compiled
NumPy kernels. Exits with status 2 when the requested backend is unusable."""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import AnycnnError
from .common import EXIT_USAGE, backend_option

HELP = "which backend would be used, and why; all backends"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``anycnn info``."""
    backend_option(parser)


def run(args) -> int:
    """``anycnn info``."""
    from ..backend import ENV_VAR, probe_all, resolve

    requested = args.backend or os.environ.get(ENV_VAR) or "auto"
    print(f"anycnn {__version__}, Python {sys.version.split()[0]}")
    try:
        chosen = resolve(requested)
        print(f"backend: {chosen.name} on {chosen.device} — {chosen.reason}")
    except AnycnnError as exc:
        print(f"backend: unusable — {exc}")
        chosen = None
    print("available backends:")
    for row in probe_all():
        mark = "yes" if row["ok"] else "no "
        detail = f"{row['version']} on {row['device']}" if row["ok"] else row["detail"]
        print(f"  {mark} {row['name']:<17} {detail}")
    from ..kernels import kernel_cache, native

    # torch CPU tensors take them only where their loops can go to torch's OpenMP threads,
    # which needs the kernels kept as libraries (anycnn.kernels.torch_native)
    served = ("NumPy arrays, torch CPU tensors" if kernel_cache.ahead_of_time()
              else "NumPy arrays; torch tensors on torch's operators")
    print(f"compiled kernels (convolution, BatchNorm; {served}): {native.describe()}")
    return 0 if chosen is not None else EXIT_USAGE
