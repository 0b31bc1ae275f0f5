"""Comparing results of two code paths that compute the same sums in different orders.

Bit-exactness is claimed only where the code guarantees it: the same code path, the same
summation order (a run repeated, a resumed run against an uninterrupted one, an elementwise
kernel against its portable expression). Two paths that hand the BLAS matrices of different
shapes — a whole batch against per-chunk GEMMs, a fused block against the unfused layers — get
the same products summed in an order the BLAS chooses per shape and per CPU (AVX2 or AVX-512
kernels, OpenBLAS or MKL, K split across threads or not). Their results agree to a few units
in the last place of the sums' magnitudes, not bit for bit.

:func:`assert_rounding_close` allows that: an absolute error of ``ULPS`` machine epsilons of
the largest magnitude in the expected array, and the same relative error. 256 ulps covers a
reordered sum of up to a few hundred terms (the worst case grows with the term count, the
typical case with its square root) while a real defect (a wrong tap, a missing bias, a
mis-chunked image) shows as an error of the order of the values themselves, 1e10 times larger
in float64.
"""

from __future__ import annotations

import numpy as np

#: units of machine epsilon allowed, relative to the largest expected magnitude
ULPS = 256


def assert_rounding_close(actual, expected, err_msg: str = "") -> None:
    """``actual`` equals ``expected`` up to the rounding of a reordered float sum."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    eps = np.finfo(expected.dtype).eps
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=ULPS * eps, atol=ULPS * eps * scale,
                               err_msg=err_msg)
