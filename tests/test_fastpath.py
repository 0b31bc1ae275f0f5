"""NumPy fast paths equal their portable Array API expressions, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

import anycnn
from anycnn import fastpath
from anycnn.models import build_model


@pytest.fixture
def threads(monkeypatch):
    monkeypatch.setenv("ANYCNN_NUM_THREADS", "2")
    monkeypatch.setattr(fastpath, "MIN_PARALLEL_SIZE", 1)


def test_take_rows_and_sum_match_portable_numpy(threads, rng):
    import array_api_compat.numpy as xp

    x = rng.standard_normal((5, 40, 3)).astype(np.float32)
    index = rng.integers(0, 40, 77)
    np.testing.assert_array_equal(fastpath.take_rows(xp, x, index), np.take(x, index, axis=1))
    g = rng.standard_normal((5, 4, 6, 3)).astype(np.float32)
    np.testing.assert_array_equal(fastpath.sum_axis1(xp, g), np.sum(g, axis=1))


def test_window_max_and_masked_match_portable_with_ties(threads, rng, monkeypatch):
    import array_api_compat.numpy as xp

    entries = np.round(rng.standard_normal((5, 4, 6, 3))).astype(np.float32)  # many ties
    fast_y, fast_mask = fastpath.window_max(xp, entries)
    dy = rng.standard_normal((5, 1, 6, 3)).astype(np.float32)
    fast_d = fastpath.masked(xp, fast_mask, dy)
    monkeypatch.setenv("ANYCNN_NUM_THREADS", "1")  # the portable expressions
    y, mask = fastpath.window_max(xp, entries)
    np.testing.assert_array_equal(fast_y, y)
    np.testing.assert_array_equal(fast_mask, mask)
    assert mask.sum(axis=1).max() == 1  # exactly one first maximum per window
    np.testing.assert_array_equal(mask.argmax(axis=1), entries.argmax(axis=1))
    d = fastpath.masked(xp, mask, dy)
    assert d.dtype == np.float32
    np.testing.assert_array_equal(fast_d, d)


@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_relu_and_relu_grad_match_portable(threads, rng, monkeypatch, with_bias):
    import array_api_compat.numpy as xp

    x = np.round(rng.standard_normal((5, 4, 3)), 1).astype(np.float32)  # exact zeros too
    bias = rng.standard_normal(3).astype(np.float32) if with_bias else None
    dy = rng.standard_normal((5, 4, 3)).astype(np.float32)
    fast = fastpath.bias_relu(xp, x, bias)
    fast_grad = fastpath.relu_grad(xp, fast, dy)
    monkeypatch.setenv("ANYCNN_NUM_THREADS", "1")
    portable = fastpath.bias_relu(xp, x, bias)
    np.testing.assert_array_equal(fast, portable)
    np.testing.assert_array_equal(fast_grad, fastpath.relu_grad(xp, portable, dy))
    assert fast.dtype == fast_grad.dtype == np.float32


def test_fast_paths_only_engage_for_numpy(threads):
    import array_api_strict as xp

    assert fastpath._parallel(xp, 1 << 20, 8) == 0


def test_training_step_is_identical_with_and_without_threads(rng, monkeypatch):
    """A whole simple-cnn step on NumPy: threaded fast paths change nothing."""
    x = rng.random((6, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 6)
    results = []
    for threads, minimum in (("1", 1 << 40), ("2", 1)):
        monkeypatch.setenv("ANYCNN_NUM_THREADS", threads)
        monkeypatch.setattr(fastpath, "MIN_PARALLEL_SIZE", minimum)
        with anycnn.use_backend("numpy"):
            anycnn.manual_seed(0)
            model = build_model("simple-cnn")
            loss = anycnn.losses.SoftmaxCrossEntropy()
            loss.forward(model(anycnn.asarray(x)), anycnn.asarray(y))
            dx = model.backward(loss.backward())
            results.append([anycnn.to_numpy(dx)] +
                           [anycnn.to_numpy(p.grad) for p in model.parameters()])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
