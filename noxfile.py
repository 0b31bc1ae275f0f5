"""The per-backend test matrix, lint, and benchmarks.

`nox` runs lint and one `tests(backend=NAME)` session per file `backends/NAME.txt`, each in its own
virtual environment, with `ANYCNN_BACKEND=NAME`. The numpy session installs the `mpi` extra, so the
data-parallel tests run there on real `mpiexec` jobs (the other sessions skip them), and the `onnx`
extra with ndonnx, so the ONNX export tests run there too (skipped elsewhere). The cupy
session skips without an NVIDIA GPU unless `ANYCNN_REQUIRE_BACKEND=1`, which turns the skip into a
failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nox

ROOT = Path(__file__).parent
BACKENDS = sorted(p.stem for p in (ROOT / "backends").glob("*.txt"))

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


def _nvidia_gpu() -> str | None:
    """Why there is no usable NVIDIA GPU, or None when one answers."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no NVIDIA GPU: nvidia-smi is not on PATH"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no NVIDIA GPU: nvidia-smi failed ({exc})"
    if out.returncode != 0 or "GPU" not in out.stdout:
        return f"no NVIDIA GPU: nvidia-smi -L printed {out.stdout.strip() or out.stderr.strip()!r}"
    return None


@nox.session
@nox.parametrize("backend", BACKENDS)
def tests(session: nox.Session, backend: str) -> None:
    """Run the whole suite on one backend."""
    required = os.environ.get("ANYCNN_REQUIRE_BACKEND") == "1"
    if backend == "cupy":
        why = _nvidia_gpu()
        if why and required:
            session.error(f"cupy backend required (ANYCNN_REQUIRE_BACKEND=1) but {why}")
        if why:
            session.skip(f"{why}; set ANYCNN_REQUIRE_BACKEND=1 to make this a failure")
    session.install("-r", f"backends/{backend}.txt", "-r", "backends/torch.txt")
    # the numpy session also runs the data-parallel tests on real mpiexec jobs (MPICH wheel)
    # and the ONNX export tests (onnx, onnxruntime; ndonnx for tracing layers of your own)
    session.install("-e", ".[mpi,onnx]" if backend == "numpy" else ".", "--group", "test")
    if backend == "numpy":
        session.install("ndonnx")
    env = {"ANYCNN_BACKEND": backend}
    session.run("python", "-m", "anycnn", "info", env=env)
    session.run("python", "-m", "pytest", *(session.posargs or ["-q"]), env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, tests, examples and this file."""
    session.install("--group", "lint")
    session.run("ruff", "check", "anycnn", "tests", "examples", "noxfile.py")


@nox.session
def bench(session: nox.Session) -> None:
    """The reference benchmark against PyTorch (see BENCHMARKS.md); pass options after --."""
    session.install("-e", ".", "-r", "backends/torch.txt")
    session.run("anycnn", "bench", *(session.posargs or ["--compare-torch"]))
