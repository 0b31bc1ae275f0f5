"""The NumPy fast paths of a ResNet training step (BatchNorm's per-channel passes, the fused
BatchNorm → ReLU and Residual → ReLU runs) agree with the portable code within rounding, and
the portable code stays selectable (``fastpath.ENABLED``, ``ANYCNN_FASTPATH=0``)."""

from __future__ import annotations

import array_api_compat.numpy as npx
import numpy as np
import pytest

from anycnn import fastpath
from anycnn.nn import functional as F
from tests.rounding import assert_rounding_close


@pytest.fixture
def split(monkeypatch):
    """Two threads, every call split, and chunks of a few rows (many chunks per shard)."""
    monkeypatch.setenv("ANYCNN_NUM_THREADS", "2")
    monkeypatch.setattr(fastpath, "MIN_PARALLEL_SIZE", 1)
    monkeypatch.setattr(fastpath, "CHANNEL_CHUNK", 40)


def _portable(monkeypatch, fn):
    monkeypatch.setattr(fastpath, "ENABLED", False)
    try:
        return fn()
    finally:
        monkeypatch.setattr(fastpath, "ENABLED", True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(6, 5, 7, 3), (37, 4)])
def test_batch_norm_fast_path_matches_portable(split, monkeypatch, rng, dtype, relu, training,
                                               shape):
    monkeypatch.setattr(fastpath, "ENABLED", True)
    c = shape[-1]
    x = rng.normal(1.5, 2.0, size=shape).astype(dtype)
    gamma = rng.normal(size=c).astype(dtype)
    beta = rng.normal(size=c).astype(dtype)
    rm, rv = rng.normal(size=c).astype(dtype), rng.random(c).astype(dtype) + 0.5
    dy = rng.normal(size=shape).astype(dtype)

    def run():
        y, ctx, m, v = F.batch_norm_forward(x, gamma, beta, rm, rv, training, 0.1, 1e-5,
                                            relu=relu)
        return (y, m, v, *F.batch_norm_backward(dy, ctx, gamma))

    fast = run()
    slow = _portable(monkeypatch, run)
    for a, b in zip(fast, slow):
        assert_rounding_close(a, b)
    if relu:
        assert (fast[0] >= 0).all() and (fast[0] == 0).any()
    for a, b in zip(fast, run()):  # repeatable for a given thread count
        np.testing.assert_array_equal(a, b)


def test_per_channel_kernels_equal_their_portable_expressions(split, monkeypatch, rng):
    rows = rng.normal(size=(53, 6)).astype(np.float32)
    mean = rows.mean(axis=0)
    fast_sums = fastpath.channel_sums(npx, rows)
    assert fast_sums.dtype == np.float32
    assert_rounding_close(fast_sums, _portable(monkeypatch, lambda: fastpath.channel_sums(
        npx, rows)))
    centred, squares = fastpath.centre_rows(npx, rows, mean)
    np.testing.assert_array_equal(centred, rows - mean)  # elementwise: exact
    assert_rounding_close(squares, ((rows - mean) ** 2).sum(axis=0))
