"""The compiled sum of a stack of parts (:mod:`anycnn.kernels.native_sum`): NumPy's
``parts.sum(axis=0)`` bit for bit, signed zeros, infinities and NaN included."""

from __future__ import annotations

import numpy as np
import pytest

from anycnn.kernels import native_sum

pytestmark = pytest.mark.usefixtures("native_on")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 3, 3, 16, 16), (8, 3, 3, 64, 64), (13, 1, 1, 32, 48),
                                   (3, 70000)])
def test_compiled_sum_gives_numpys_bits(monkeypatch, rng, dtype, shape):
    """One part, several, a count past the vector width, sizes of several task widths; values
    of very different magnitudes, so that adding in another order would round differently."""
    monkeypatch.setattr(native_sum, "MIN_ELEMENTS", 1)
    calls = []
    pipeline = native_sum._parts_pipeline
    monkeypatch.setattr(native_sum, "_parts_pipeline",
                        lambda *a: calls.append(a) or pipeline(*a))
    parts = (rng.normal(size=shape) * 10.0 ** rng.integers(-6, 6, size=shape)).astype(dtype)
    flat = parts.reshape(shape[0], -1)
    flat[:, :4] = [[-0.0, np.inf, np.nan, 1.0]] * shape[0]
    flat[0, 3] = -np.inf
    got = native_sum.sum_parts(parts)
    assert calls, "the compiled sum ran"
    with np.errstate(invalid="ignore"):
        want = parts.sum(axis=0)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


def test_other_parts_are_left_to_numpy(monkeypatch, rng):
    """Below MIN_ELEMENTS, a view that is not C-contiguous, or parts whose size is no
    multiple of the vector lanes: NumPy's own sum."""
    monkeypatch.setattr(native_sum, "_parts_pipeline", lambda *a: pytest.fail("compiled"))
    small = rng.normal(size=(2, 16)).astype(np.float32)
    np.testing.assert_array_equal(native_sum.sum_parts(small), small.sum(axis=0))
    wide = rng.normal(size=(4, 40000)).astype(np.float32)[:, ::2]
    np.testing.assert_array_equal(native_sum.sum_parts(wide), wide.sum(axis=0))
    odd = rng.normal(size=(4, 70001)).astype(np.float32)
    np.testing.assert_array_equal(native_sum.sum_parts(odd), odd.sum(axis=0))
