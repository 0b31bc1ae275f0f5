"""Running real ``mpiexec`` jobs from the tests: a clean child environment, the mpiexec to use
(or a skip naming what is missing), and a run under a timeout (a hang is a failure, never a
stuck suite). pytest itself never runs under mpiexec."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anycnn.dist import launch
from anycnn.errors import DistributedError

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tests" / "dist_scripts"

#: environment variables of launchers: a child must not think the test process was launched
LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "MV2_", "SLURM_", "HYDRA_", "MPI_LOCAL",
                     "I_MPI_")


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables, with the repository importable
    and the numpy backend (plus ``extra``)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(LAUNCHER_PREFIXES) and k not in ("ANYCNN_DIST",)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["ANYCNN_BACKEND"] = "numpy"
    env.update(extra)
    return env


def mpiexec_or_skip() -> str:
    """The mpiexec anycnn would use; skips the test when mpi4py or mpiexec is missing."""
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install 'anycnn[mpi]')")
    try:
        return launch.find_mpiexec()
    except DistributedError as exc:
        pytest.skip(str(exc))


def run_ranks(n: int, args: list[str], timeout: float = 60, **env: str
              ) -> tuple[subprocess.CompletedProcess, float]:
    """``mpiexec -n n python ARGS...``: (the finished process, its wall seconds)."""
    cmd = [mpiexec_or_skip(), "-n", str(n), sys.executable, *args]
    start = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(**env),
                         timeout=timeout, check=False)
    return out, time.monotonic() - start
