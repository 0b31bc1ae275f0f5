"""Shared fixtures: the backend under test comes from ANYCNN_BACKEND (numpy when unset).

If that backend cannot be used here, every test that needs it is skipped with the reason, unless
ANYCNN_REQUIRE_BACKEND=1, in which case the whole run fails.

``--backend-sample N`` (what the nox sessions of the backends other than numpy pass) keeps every
test function of the files in ``CORE_FILES`` (layers, functional ops, containers, optimizers,
immutable namespaces, the backend shim, gradient checks: the code a backend's arrays go through)
with its first parametrisation and every one whose node id hashes to 0 modulo M
(``--core-sample M``, default 2: further kernel sizes, strides and paddings run the same array
operations again; on JAX each new shape is a new compile of every operation), and, of the other
files, the first test of each file and every test whose node id hashes to 0 modulo N; it leaves
out the tests that run on NumPy whatever the session's backend (``NUMPY_ONLY_FILES``, the tests
using the ``native_on`` fixture and those marked ``numpy_only``: each session would run the same
code again). The hash
is CRC-32: the same selection on every machine and every run, independent of collection order.
Those tests get the ``backend_core`` and ``backend_sample`` markers, so ``-m`` can pick them too.
The numpy session passes no option and runs everything.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest

import anycnn
from anycnn.errors import BackendError

REQUESTED = os.environ.get("ANYCNN_BACKEND", "numpy") or "numpy"

#: Test files run in full under ``--backend-sample``: what each backend's arrays go through.
CORE_FILES = frozenset({
    "test_backend.py",        # the backend shim, device rules, cross-backend equality
    "test_compiled.py",       # Trainer(compile=True) (JAX)
    "test_containers.py",     # Residual, Concat, Identity
    "test_gradcheck.py",      # finite differences of every layer and loss
    "test_losses.py",         # soft targets, class weights, BCE and focal losses, their metrics
    "test_immutable.py",      # optimizers on namespaces without in-place updates
    "test_module.py",         # modules, modes, gradient accumulation
    "test_new_layers.py",     # grouped/transposed convolutions, upsampling, norms
    "test_no_host_sync.py",   # no device-to-host reads in the training loop
    "test_param_groups.py",   # optimizer parameter groups against separate optimizers, torch
    "test_recipes.py",        # RMSprop, OneCycle, plateau, clipping, EMA against torch
    "test_reference.py",      # conv and pooling against direct loops
    "test_sync_batchnorm.py",  # BatchNorm statistics reduced across ranks
    "test_testing.py",        # anycnn.testing.check_gradients
    "test_vs_torch.py",       # every layer, loss and optimizer against PyTorch autograd
})


#: Test files every backend runs in full even under ``--backend-sample``: the issue's promise
#: that forward-only models match torch autograd on every backend is checked case by case.
FULL_FILES = frozenset({"test_autograd.py", "test_torchvision_models.py"})

#: Test files that never touch the backend under test (the compiled kernels' cache and calls, on
#: NumPy arrays, in this process or in subprocesses with ``ANYCNN_BACKEND=numpy``): under
#: ``--backend-sample`` they are left to the numpy session, as is every test that asks for the
#: ``native_on`` fixture (it runs the whole test on the NumPy backend, whichever the session's).
NUMPY_ONLY_FILES = frozenset({"test_halide_call.py", "test_kernel_cache.py"})


def pytest_addoption(parser):
    parser.addoption(
        "--backend-sample", type=int, default=0, metavar="N",
        help="run the CORE_FILES in full and about 1 in N of the other tests (deterministic); "
             "0 (default) runs everything")
    parser.addoption(
        "--core-sample", type=int, default=2, metavar="M",
        help="with --backend-sample: of each CORE_FILES test function, its first parametrisation "
             "and about 1 in M of the others")


def pytest_configure(config):
    """One kernel cache for the whole run: the compiled-kernel cache directory is fixed through
    ``ANYCNN_KERNEL_CACHE`` (to where it would be now) unless the caller set it, so that tests
    which point ``XDG_CACHE_HOME`` at a scratch folder (for image caches and downloads), and the
    CLI subprocesses they start, load the kernels earlier tests compiled instead of compiling
    every kernel again in an empty cache (on a clean CI machine: 0.4-1.5 s a kernel). Tests of
    the cache itself set ``ANYCNN_KERNEL_CACHE`` to folders of their own, as before."""
    if "ANYCNN_KERNEL_CACHE" not in os.environ:
        from anycnn.kernels import kernel_cache

        root = kernel_cache.cache_root()
        if root is not None:
            os.environ["ANYCNN_KERNEL_CACHE"] = str(root)


def pytest_collection_modifyitems(config, items):
    n = config.getoption("--backend-sample")
    m = max(1, config.getoption("--core-sample"))
    if n <= 1:
        return
    keep, drop, seen = [], [], set()
    for item in items:
        name = Path(str(item.fspath)).name
        function = (name, getattr(item, "originalname", item.name))
        hashed = zlib.crc32(item.nodeid.encode())
        if (name in NUMPY_ONLY_FILES or "native_on" in getattr(item, "fixturenames", ())
                or item.get_closest_marker("numpy_only")):
            drop.append(item)  # the same NumPy code in every session: the numpy session's
        elif name in FULL_FILES or (name in CORE_FILES and (function not in seen
                                                          or hashed % m == 0)):
            item.add_marker(pytest.mark.backend_core)
            keep.append(item)
        elif name not in CORE_FILES and (name not in seen or hashed % n == 0):
            item.add_marker(pytest.mark.backend_sample)
            keep.append(item)
        else:
            drop.append(item)
        seen.update((name, function))
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def session_backend():
    try:
        backend = anycnn.backend.resolve(REQUESTED)
    except BackendError as exc:
        if os.environ.get("ANYCNN_REQUIRE_BACKEND") == "1":
            pytest.exit(f"required backend unusable: {exc}", returncode=1)
        pytest.skip(f"backend {REQUESTED!r} unusable here: {exc}")
    return backend


@pytest.fixture
def backend(session_backend):
    """The backend under test, made current for the duration of one test."""
    with anycnn.use_backend(session_backend.name) as b:
        anycnn.manual_seed(0)
        yield b


@pytest.fixture
def xp(backend):
    """The Array API namespace of the backend under test."""
    return backend.xp


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def to_backend(array, dtype=None):
    """Host array → current backend (test helper)."""
    return anycnn.asarray(np.asarray(array), dtype=dtype)


@pytest.fixture
def native_on(monkeypatch):
    """The compiled kernels (:mod:`anycnn.kernels.native` and its siblings) on, on the NumPy
    backend (the only one they take), whichever backend the session tests; skipped without
    halide."""
    import importlib.util

    if importlib.util.find_spec("halide") is None:
        pytest.skip("halide is not installed")
    from anycnn.kernels import native
    from anycnn.kernels import threads as kthreads

    monkeypatch.setattr(native, "ENABLED", True)
    monkeypatch.setattr(kthreads, "ENABLED", True)
    with anycnn.use_backend("numpy"):
        yield
