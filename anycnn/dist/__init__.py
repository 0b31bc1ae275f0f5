"""Data parallel training support: communicators (single process, MPI, NCCL) and launch helpers.

Importing this package imports nothing heavy: mpi4py and cupy are imported only when an MPI or
NCCL communicator is made. The public names are loaded on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Communicator": "comm",
    "SingleProcess": "comm",
    "check_buffer": "comm",
    "MPICommunicator": "mpi",
    "NCCLCommunicator": "nccl",
    "launcher_env": "launch",
    "get_communicator": "launch",
    "reset_communicator": "launch",
    "install_abort_hook": "launch",
    "bind_to_cores": "launch",
    "find_mpiexec": "launch",
    "workers_command": "launch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'anycnn.dist' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
