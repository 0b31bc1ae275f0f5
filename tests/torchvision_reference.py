"""torchvision as a test reference: its model definitions without its compiled operators.

torchvision's PyPI wheel is built for CUDA torch; beside the CPU build of torch its compiled
operators do not register, and ``import torchvision`` fails in ``torch.library.register_fake``.
The model definitions need none of them, so :func:`import_torchvision` stubs that one function
while the import runs (tests only; anycnn never imports torchvision).
"""

from __future__ import annotations

import functools
import importlib.util

import pytest


@functools.cache
def _load():
    from tools.bench_torch import import_torchvision as load  # the one copy of the stub

    return load()


def import_torchvision():
    """The ``torchvision`` module, or a skip when torch or torchvision is not installed."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
        pytest.skip("torch and torchvision are needed for the reference networks")
    return _load()
