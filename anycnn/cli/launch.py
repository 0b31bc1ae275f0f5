"""The processes of ``anycnn train``: ``--workers N`` (this command again under ``mpiexec``),
joining the ranks and loading data once per node (stopping cleanly on SIGINT/SIGTERM is
:mod:`anycnn.train.interrupt`'s)."""

from __future__ import annotations

import os
import sys

from ..errors import ConfigError


def start_workers(args) -> int:
    """``--workers N``: run this command again on N ranks under ``mpiexec`` (replaces this
    process, so signals reach mpiexec, which forwards them to every rank)."""
    from ..dist import launcher_env, workers_command

    if launcher_env() is not None:
        raise ConfigError("--workers starts mpiexec itself; under mpiexec or srun drop it (the "
                          "launcher's -n sets the number of processes)")
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    argv = without_option(args.argv, "--workers")
    command = workers_command(args.workers, argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
    return 0  # pragma: no cover - execv does not return


def without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE``."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == option:
            skip = True
        elif not item.startswith(option + "="):
            out.append(item)
    return out


def join_ranks(args):
    """The communicator of this process (several ranks under an MPI launcher; making it pins
    each machine's ranks to disjoint cores). On N > 1 ranks: an uncaught error on any rank ends
    the job, and only rank 0 prints (the others keep stderr for their own errors)."""
    from ..dist import get_communicator, install_abort_hook

    comm = get_communicator()
    if comm.size > 1:
        install_abort_hook(comm)
        if comm.rank != 0:
            args.quiet = True
            sys.stdout = open(os.devnull, "w")
    return comm


def load_on_node_leader_first(comm, load):
    """``load()`` on each node's first rank, then on the others (one download per node)."""
    if comm.size == 1:
        return load()
    if comm.local_rank == 0:
        data = load()
        comm.barrier()
        return data
    comm.barrier()
    return load()
