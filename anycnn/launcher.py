"""How this process was started: the launcher (mpiexec, srun...) and its rank and size, read
from the launcher's environment variables before any MPI library loads.

These are plain readers of ``os.environ`` with no imports beyond the standard library, so any
layer may ask whether it runs as one of several ranks (the optimizers warn when a hand-written
loop under ``mpiexec`` never averages its gradients); :mod:`anycnn.dist.launch` re-exports them.
"""

from __future__ import annotations

import os

#: Slurm step ids at or above this are not ``srun`` steps (batch script 0xfffffffe, extern
#: container 0xffffffff, interactive and pending steps just below)
_SLURM_SPECIAL_STEPS = 0xFFFFFFF0


def _int_env(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def launcher_env() -> str | None:
    """The launcher that started this process, from its environment; None for a plain start.

    ======================== ==================================================================
    ``"openmpi"``            ``OMPI_COMM_WORLD_SIZE`` (Open MPI's ``mpirun``; checked first
                             because Open MPI 5 also sets the PMIx variables)
    ``"mvapich"``            ``MV2_COMM_WORLD_SIZE``
    ``"pmix"``               ``PMIX_RANK`` (PMIx launchers, ``srun --mpi=pmix``)
    ``"pmi"``                ``PMI_RANK`` and ``PMI_SIZE`` (MPICH/Intel MPI hydra ``mpiexec``,
                             ``srun --mpi=pmi2``)
    ``"slurm"``              an ``srun`` step of more than one task without those variables:
                             ``SLURM_STEP_ID`` is a real step id and ``SLURM_STEP_NUM_TASKS``
                             (or, if absent, ``SLURM_NTASKS``) is above 1
    ======================== ==================================================================

    An ``sbatch`` script itself is not a launch: Slurm sets ``SLURM_PROCID=0`` and
    ``SLURM_NTASKS`` (the allocation's task count) there too, but the script is one process,
    and treating it as rank 0 of N would wait forever for N-1 ranks that nobody started. So a
    bare ``SLURM_PROCID``, and the batch step's own id, do not count; a one-task ``srun`` step
    is a single process.
    """
    env = os.environ
    if "OMPI_COMM_WORLD_SIZE" in env:
        return "openmpi"
    if "MV2_COMM_WORLD_SIZE" in env:
        return "mvapich"
    if "PMIX_RANK" in env:
        return "pmix"
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return "pmi"
    step = _int_env("SLURM_STEP_ID")
    if step is None:
        step = _int_env("SLURM_STEPID")
    if step is not None and 0 <= step < _SLURM_SPECIAL_STEPS:
        tasks = _int_env("SLURM_STEP_NUM_TASKS")
        if tasks is None:
            tasks = _int_env("SLURM_NTASKS")
        if tasks is not None and tasks > 1:
            return "slurm"
    return None


def launcher_rank() -> int | None:
    """This process's rank as the launcher's environment gives it (None without a launcher),
    read before MPI starts: so that only rank 0 reports a mistake every rank makes."""
    if launcher_env() is None:
        return None
    for name in ("OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK",
                 "SLURM_PROCID"):
        rank = _int_env(name)
        if rank is not None:
            return rank
    return None


def launcher_size() -> int | None:
    """The number of ranks the launcher started (None without a launcher), from its
    environment, before MPI starts."""
    if launcher_env() is None:
        return None
    for name in ("OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE",
                 "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        size = _int_env(name)
        if size is not None:
            return size
    return None
