"""The cross-path tolerance admits reordered sums and nothing coarser (it must be able to fail)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.rounding import assert_rounding_close


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reordered_sums_pass_and_real_defects_fail(rng, dtype):
    a = rng.standard_normal((64, 300)).astype(dtype)
    b = rng.standard_normal((300, 8)).astype(dtype)
    whole = a @ b
    # the same dot products summed in another order: forward, then in reversed halves
    other = (a[:, :150] @ b[:150]) + (a[:, 150:][:, ::-1] @ b[150:][::-1])
    assert_rounding_close(other, whole)
    for defect in (whole + np.asarray(1e-3, dtype) * np.abs(whole).max(),  # a shifted value
                   whole - a[:, :1] @ b[:1]):  # a missing tap
        with pytest.raises(AssertionError):
            assert_rounding_close(defect, whole)
    with pytest.raises(AssertionError):  # a different precision is not rounding
        assert_rounding_close(whole.astype(np.float64 if dtype == np.float32 else np.float32),
                              whole)
