"""Data parallel training support: communicators (single process, MPI, NCCL) and launch helpers.

Importing this package imports nothing heavy: mpi4py and cupy are imported only when an MPI or
NCCL communicator is made. The public names are loaded on first access.
"""

from __future__ import annotations

from .._lazy import lazy_exports, names

_EXPORTS = {
    **names("comm", "Communicator", "SingleProcess", "check_buffer"),
    **names("mpi", "MPICommunicator"),
    **names("nccl", "NCCLCommunicator"),
    **names("launch", "launcher_env", "launcher_rank", "launcher_size", "get_communicator",
            "current_communicator", "reset_communicator",
            "install_abort_hook", "bind_to_cores", "find_mpiexec", "workers_command"),
    **names("sync", "sync_batchnorm"),
    **names("gradients", "average_gradients"),
}
_SUBMODULES = {m: m for m in ("comm", "gradients", "launch", "mpi", "nccl", "sync")}
__all__ = sorted([*_EXPORTS, *_SUBMODULES])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _SUBMODULES, globals())
