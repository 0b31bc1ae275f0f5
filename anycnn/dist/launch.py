"""Starting a data-parallel job: which launcher, which communicator, which CPUs, which command.

* :func:`launcher_env` tells from environment variables whether an MPI launcher started this
  process. :func:`get_communicator` uses it for ``ANYCNN_DIST=auto`` (the default), so a plain
  ``python -m anycnn ...`` never imports mpi4py.
* :func:`install_abort_hook` makes one failing rank end the job. Without it a rank that dies of
  an exception waits in ``MPI_Finalize`` while the others wait in their next collective: the job
  hangs (measured with MPICH 5: it never ends). ``Abort`` ends every rank in ~0.5 s.
* :func:`bind_to_cores` gives each rank of a node its own slice of the CPUs, so anycnn's thread
  count (which follows the process's CPU affinity) is cores / local ranks.
* :func:`find_mpiexec` and :func:`workers_command` build the command that runs anycnn on N ranks.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import threading
import traceback
from typing import Any

from ..kernels import threads
from ..errors import AnycnnError, DistributedError
from ..launcher import launcher_env, launcher_rank, launcher_size  # noqa: F401 - re-exported
from .comm import Communicator, SingleProcess

ENV_VAR = "ANYCNN_DIST"
CHOICES = ("auto", "single", "mpi", "nccl")
_communicator: Communicator | None = None
INSTALL_HINT = "pip install 'anycnn[mpi]'  (or: pip install mpi4py mpich)"


def _resolve_kind(kind: str | None) -> str:
    requested = kind if kind is not None else (os.environ.get(ENV_VAR) or "auto")
    name = str(requested).strip().lower()
    if name not in CHOICES:
        source = "kind" if kind is not None else ENV_VAR
        raise DistributedError(
            f"unknown communicator {requested!r} ({source}); valid names: {', '.join(CHOICES)}")
    if name == "auto":
        name = "mpi" if launcher_env() is not None else "single"
    return name


def _make(name: str) -> Communicator:
    if name == "single":
        return SingleProcess()
    from .mpi import MPICommunicator

    mpi = MPICommunicator()
    bind_to_cores(mpi)  # collective, as the communicator's own start-up
    if name == "mpi":
        return mpi
    from ..backend import get_backend

    backend = get_backend()
    if backend.name != "cupy":
        raise DistributedError(
            f"the nccl communicator needs the cupy backend, but the backend is {backend.name!r}; "
            "set ANYCNN_BACKEND=cupy, or use ANYCNN_DIST=mpi")
    from .nccl import NCCLCommunicator

    return NCCLCommunicator(mpi)


def get_communicator(kind: str | None = None) -> Communicator:
    """The process-wide communicator, made at first call and cached.

    Args:
        kind: ``"auto"``, ``"single"``, ``"mpi"`` or ``"nccl"``; None reads ``ANYCNN_DIST``
            (default ``auto``: MPI when :func:`launcher_env` finds a launcher, else single).
            ``nccl`` is MPI for start-up plus NCCL for buffers, and needs the cupy backend.
            Making an MPI (or NCCL) communicator is collective: every rank calls it, and the
            ranks of each machine are pinned to disjoint cores then (:func:`bind_to_cores`).

    Raises:
        DistributedError: an unknown name (the valid ones are listed), mpi4py missing (with the
            install hint), cupy/NCCL unusable, or a different kind than the cached one.
    """
    global _communicator
    if _communicator is not None and kind is None:
        return _communicator
    name = _resolve_kind(kind)
    if _communicator is not None:
        if _communicator.name != name:
            raise DistributedError(
                f"the communicator is already {_communicator.name!r}; cannot switch to "
                f"{name!r} in the same process")
        return _communicator
    _communicator = _make(name)
    return _communicator


def current_communicator() -> Communicator | None:
    """The communicator :func:`get_communicator` has made in this process, or None (makes
    none: error reporting uses it to learn whether other ranks are waiting)."""
    return _communicator


def reset_communicator() -> None:
    """Forget the cached communicator (tests)."""
    global _communicator
    _communicator = None


def install_abort_hook(comm: Communicator) -> bool:
    """Make an uncaught exception on any rank end the whole job (when ``comm.size > 1``).

    Sets ``sys.excepthook`` and ``threading.excepthook``: the failing rank prints
    ``anycnn: rank R/N failed: ExcType: message`` first (then the traceback, for exceptions that
    are not anycnn's own documented errors) and calls ``comm.abort(1)``. An error that every rank
    raises at the same point (``every_rank`` set: a configuration mismatch, a NaN loss, both
    decided from values all ranks share) is printed by rank 0 alone, and every rank exits
    normally instead. Returns whether it installed the hooks. ``SystemExit`` is not an exception these hooks see: leave a multi-rank job with
    ``comm.abort(code)``, not ``sys.exit(code)`` on one rank.
    """
    if comm.size <= 1:
        return False
    previous_thread_hook = threading.excepthook

    def report_and_abort(exc_type: type[BaseException], exc: BaseException | None,
                         tb: Any) -> None:
        every_rank = bool(getattr(exc, "every_rank", False))
        try:
            if every_rank and comm.rank != 0:
                return
            text = f"{exc_type.__name__}: {exc}" if str(exc) else exc_type.__name__
            print(f"anycnn: rank {comm.rank}/{comm.size} failed: {text}", file=sys.stderr,
                  flush=True)
            if not issubclass(exc_type, AnycnnError):
                traceback.print_exception(exc_type, exc, tb, file=sys.stderr)
                sys.stderr.flush()
        finally:
            if not every_rank:
                comm.abort(1)

    def thread_hook(args: Any) -> None:
        if issubclass(args.exc_type, SystemExit):
            previous_thread_hook(args)
            return
        report_and_abort(args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = report_and_abort
    threading.excepthook = thread_hook
    return True


def _slice(cpus: list[int], index: int, parts: int) -> list[int]:
    """Contiguous part ``index`` of ``parts`` of ``cpus`` (at least one CPU each)."""
    n = len(cpus)
    start = index * n // parts
    stop = max(start + 1, (index + 1) * n // parts)
    return cpus[start:stop]


def bind_to_cores(comm: Communicator) -> list[int] | None:
    """Pin each rank of a node to its own contiguous slice of the node's usable CPUs.

    Collective: every rank must call it (it gathers the ranks' affinities). Binds only when
    several ranks share a node and all of them may run on the same CPUs (the launcher did not
    bind them, e.g. hydra's default ``-bind-to none``); local rank ``r`` of ``n`` then gets part
    ``r`` of ``n`` of the sorted CPU list, so ``threads.num_threads()`` becomes cores / ranks.
    ``ANYCNN_NUM_THREADS``, when set, still decides the thread count. ``ANYCNN_BIND_CORES=0``
    turns binding off. Returns the CPUs this rank was bound to, or None when it left them alone.
    """
    if comm.size <= 1 or not hasattr(os, "sched_setaffinity"):
        return None
    mine = sorted(os.sched_getaffinity(0))
    everyone = comm.allgather_object((socket.gethostname(), comm.local_rank, mine))
    if os.environ.get("ANYCNN_BIND_CORES", "1") == "0":
        return None
    host = socket.gethostname()
    node = [cpus for name, _, cpus in everyone if name == host]
    if len(node) <= 1 or any(cpus != mine for cpus in node):
        return None  # alone on this node, or already bound by the launcher
    chosen = _slice(mine, comm.local_rank, comm.local_size)
    os.sched_setaffinity(0, chosen)
    threads._usable_cpus.cache_clear()
    return chosen


def find_mpiexec() -> str:
    """Path of ``mpiexec``: the one next to ``sys.executable`` (a venv's bin) first, then PATH.

    Raises:
        DistributedError: none found (with the install hint).
    """
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("mpiexec")
    if found:
        return found
    raise DistributedError(
        f"no mpiexec found (looked next to {sys.executable} and on PATH). Fix: {INSTALL_HINT}")


@functools.cache
def _mpiexec_flavour(mpiexec: str) -> str:
    """``"hydra"`` (MPICH, Intel MPI), ``"openmpi"`` or ``"unknown"``, from ``--version``."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = out.stdout + out.stderr
    if "HYDRA" in text or "Intel(R) MPI" in text:
        return "hydra"
    if "Open MPI" in text or "OpenRTE" in text:
        return "openmpi"
    return "unknown"


def _bind_flags(flavour: str, n: int) -> list[str]:
    """Launcher flags giving each of ``n`` ranks its own contiguous slice of our CPUs.

    Hydra's ``-bind-to core`` would bind every rank to one core (one thread each); an explicit
    ``-bind-to user:0+1,2+3`` list gives each rank cores / n. Open MPI binds by itself unless
    told not to; ``--bind-to none`` leaves the split to :func:`bind_to_cores`.
    """
    if flavour == "hydra":
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            list(range(os.cpu_count() or 1))
        parts = ["+".join(str(c) for c in _slice(cpus, r, n)) for r in range(n)]
        return ["-bind-to", "user:" + ",".join(parts)]
    if flavour == "openmpi":
        return ["--bind-to", "none"]
    return []


def workers_command(n: int, argv: list[str]) -> list[str]:
    """The command that runs ``python -m anycnn <argv>`` on ``n`` ranks of this machine.

    ``[mpiexec, "-n", N, <binding flags>, sys.executable, "-m", "anycnn", *argv]``.

    Raises:
        DistributedError: ``n`` < 1, or no mpiexec.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DistributedError(f"number of workers must be a positive integer, got {n!r}")
    mpiexec = find_mpiexec()
    return [mpiexec, "-n", str(n), *_bind_flags(_mpiexec_flavour(mpiexec), n),
            sys.executable, "-m", "anycnn", *[str(a) for a in argv]]
