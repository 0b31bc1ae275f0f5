"""The per-backend test matrix, lint, and benchmarks.

`nox` runs lint, the documentation build (`docs`) and one `tests(backend=NAME)` session per file
`backends/NAME.txt`, each in its own virtual environment, with `ANYCNN_BACKEND=NAME`. The numpy
session installs the `mpi` extra, so the data-parallel tests run there on real `mpiexec` jobs,
and the `onnx` extra with ndonnx, so the ONNX export tests run there too (the other sessions skip
both); it also runs every code block of the documentation. The cupy session skips without an
NVIDIA GPU unless `ANYCNN_REQUIRE_BACKEND=1`, which turns the skip into a failure.

CI time. The numpy session runs every test (the quick ones in parallel, then the slow ones). The
other backend sessions run `-m "not slow" --backend-sample 4` (tests/conftest.py): every test
function of the layer, functional, container, optimizer, immutable-namespace, backend-shim and
gradient-check files, since those are what a backend's arrays go through and where a backend breaks
(each with its first parametrisation and a fixed half of the others: more kernel sizes and paddings
run the same array operations, and on JAX every new shape is a new compile), and of every other
file its first test plus a fixed quarter picked by a hash of the test id (CLI, data readers,
checkpoints, callbacks ... mostly exercise host-side plumbing that numpy already covers in full;
the sample still imports and runs each file on each backend); tests that run on NumPy whatever
the session's backend (the compiled kernels' own tests, `numpy_only` runs) are left to the numpy
session, which runs them once. The selection is deterministic, and
`nox -s "tests(backend='jax')" -- -q -m "not slow"` runs a backend in full. These sessions run
their tests in one process per core (pytest-xdist `-n auto`, 2 on CI: they hold no end-to-end runs
that time themselves), and so does the numpy session for its tests not marked `slow`; its
end-to-end runs (`-m slow`: subprocess trainings, the documentation's code blocks, the examples)
run after those, in processes of their own, also two at a time (mostly process start-up,
imports and single-threaded Python); only the tests marked `serial` (one that compares two
timings) run after that, alone. The tests share one compiled-kernel cache (tests/conftest.py
pins `ANYCNN_KERNEL_CACHE`): a clean CI machine compiles each kernel once, not once more in every
test that points `XDG_CACHE_HOME` at a scratch folder. torch stays installed in every session:
test_vs_torch, test_new_layers and test_containers compare each layer computed on *the backend
under test* with PyTorch autograd, which no other backend's run replaces, and torchvision's model
definitions are the reference for the pretrained architectures. Sessions are created with uv when
it is installed (`.ci/run` installs it; about 30 s against about 2 min with pip for a backend's
environment here), else with virtualenv.

`nox -s gpu` runs the prepared GPU check (`tools/gpu_check.py`) on a machine with an NVIDIA
GPU and network; on the offline machine lent for GPU checks, run the module directly with that
machine's python3 instead (BENCHMARKS.md, "GPU check").
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
BACKENDS = sorted(p.stem for p in (ROOT / "backends").glob("*.txt"))

nox.options.sessions = ["lint", "docs", "tests"]
nox.options.reuse_existing_virtualenvs = True
# uv when it is on PATH (much faster installs), virtualenv otherwise
nox.options.default_venv_backend = "uv|virtualenv"
#: the reference networks of tests/test_torchvision_models.py (its model code only: the wheel is
#: built for CUDA torch, and the test imports it with its compiled operators stubbed out)
TORCHVISION = "torchvision==0.28.0"
#: non-numpy backend sessions: core files in full, 1 in SAMPLE of the other tests (see above)
SAMPLE = 4
#: the jax session's XLA compiler settings: every eager operation of a new shape is compiled,
#: and without the fusion emitters, at LLVM optimisation level 0, each compiles faster (the
#: session: 557 s -> 223 s with pytest-xdist on 2 cores, measured); the same operations and
#: dtypes, so the same results up to rounding (users' runs keep XLA's defaults)
JAX_TEST_XLA_FLAGS = ("--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")


def _nvidia_gpu() -> str | None:
    """Why there is no usable NVIDIA GPU, or None when one answers (the GPU check's own test,
    loaded from its file: it needs nothing but the standard library)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.gpu_missing()


@nox.session
@nox.parametrize("backend", BACKENDS)
def tests(session: nox.Session, backend: str) -> None:
    """Run the suite on one backend: all of it on numpy; the core files and a sample elsewhere."""
    required = os.environ.get("ANYCNN_REQUIRE_BACKEND") == "1"
    if backend == "cupy":
        why = _nvidia_gpu()
        if why and required:
            session.error(f"cupy backend required (ANYCNN_REQUIRE_BACKEND=1) but {why}")
        if why:
            session.skip(f"{why}; set ANYCNN_REQUIRE_BACKEND=1 to make this a failure")
    session.install("-r", f"backends/{backend}.txt", "-r", "backends/torch.txt", TORCHVISION)
    # the numpy session also runs the data-parallel tests on real mpiexec jobs (MPICH wheel)
    # and the ONNX export tests (onnx, onnxruntime; ndonnx for tracing layers of your own)
    session.install("-e", ".[mpi,onnx]" if backend == "numpy" else ".", "--group", "test")
    if backend == "numpy":
        session.install("ndonnx")
    env = {"ANYCNN_BACKEND": backend}
    if backend == "jax" and "XLA_FLAGS" not in os.environ:
        env["XLA_FLAGS"] = JAX_TEST_XLA_FLAGS
    session.run("python", "-m", "anycnn", "info", env=env)
    # slow end-to-end runs (subprocess trainings, the examples) exercise the same plumbing on
    # every backend: they run in the numpy session only, which keeps CI short as backends grow;
    # the other sessions run the core files in full and a fixed sample of the rest (see above)
    if session.posargs:
        session.run("python", "-m", "pytest", *session.posargs, env=env)
    elif backend == "numpy":  # every test: the quick ones, then the end-to-end runs, in
        # parallel (each group in processes of its own); then the one timing comparison, alone
        session.run("python", "-m", "pytest", "-q", "-m", "not slow", "-n", "auto", env=env)
        session.run("python", "-m", "pytest", "-q", "-m", "slow and not serial", "-n", "auto",
                    env=env)
        session.run("python", "-m", "pytest", "-q", "-m", "serial", env=env,
                    success_codes=[0, 5])  # 5: none collected (no test marked serial)
    else:
        session.run("python", "-m", "pytest", "-q", "-m", "not slow", "--backend-sample",
                    str(SAMPLE), "-n", "auto", env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, tests, tools, examples, the docs hooks and this file; then the
    package's layering contract (pyproject's ``[tool.importlinter]``: no upward import)."""
    session.install("-e", ".", "--group", "lint")
    session.run("ruff", "check", "anycnn", "tests", "tools", "examples", "docs", "noxfile.py")
    session.run("lint-imports", "--no-cache")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/ with warnings as errors (broken links, missing
    references, a public name without a docstring or reference entry: see docs/hooks.py)."""
    session.install("-e", ".", "--group", "docs")
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """The reference benchmark against PyTorch (see BENCHMARKS.md); pass options after --."""
    session.install("-e", ".", "-r", "backends/torch.txt")
    session.run("anycnn", "bench", *(session.posargs or ["--compare-torch"]))


@nox.session
def gpu(session: nox.Session) -> None:
    """The prepared GPU check on a GPU machine with network: cupy, CUDA torch, the test group.

    Writes gpu-report.md and its logs to runs/gpu-check (or the folder given after --). Offline
    (the lent GPU machine has no network), run `python3 tools/gpu_check.py --out DIR
    --wheels .gpu-wheels` with the machine's own python3 instead: see BENCHMARKS.md.
    """
    why = _nvidia_gpu()
    if why:
        session.error(f"the GPU check needs an NVIDIA GPU: {why}")
    # torch unpinned: from PyPI on Linux that is the CUDA build (backends/torch.txt pins the CPU
    # wheel of the project machines); pytest-timeout bounds each test
    session.install("-r", "backends/cupy.txt", "torch", "pytest-timeout")
    session.install("-e", ".[mpi,nccl]", "--group", "test")
    out = session.posargs[0] if session.posargs else "runs/gpu-check"
    session.run("python", "tools/gpu_check.py", "--out", out, *session.posargs[1:])
