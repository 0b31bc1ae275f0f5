"""Shared fixtures: the backend under test comes from ANYCNN_BACKEND (numpy when unset).

If that backend cannot be used here, every test that needs it is skipped with the reason, unless
ANYCNN_REQUIRE_BACKEND=1, in which case the whole run fails.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import anycnn
from anycnn.errors import BackendError

REQUESTED = os.environ.get("ANYCNN_BACKEND", "numpy") or "numpy"


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
