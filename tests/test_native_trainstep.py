"""The compiled training-step passes of :mod:`anycnn.kernels.native_norm` added for resnet20's
step: BatchNorm's two statistics in one sweep (``channel_moments``) and a ReLU's gradient
(``relu_grad``), each against the portable function and a float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from anycnn.kernels import native_bn, native_norm
from anycnn.nn import functional as F
from tests.rounding import assert_rounding_close
from tests.test_resnet_fastpaths import batch_norm_run


def _exact_moments(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 sums and squared deviations of ``rows``, cast back to its dtype."""
    r = rows.astype(np.float64)
    sums = r.sum(axis=0)
    squares = ((r - sums / r.shape[0]) ** 2).sum(axis=0)
    return sums.astype(rows.dtype), squares.astype(rows.dtype)


@pytest.mark.usefixtures("native_on")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, c", [(1, 16), (49, 16), (50, 32), (437, 64), (4096, 16)])
def test_moments_match_float64_sums(monkeypatch, rng, dtype, m, c):
    """One sweep's statistics (blocks of 50 rows: one, several, a remainder of one row...)
    equal the float64 ones within rounding, on rows far from zero (mean 1000, spread 1),
    where a sum of squares minus the squared sum would cancel to noise in float32, and whose
    blocks' means differ (the merge's between-block term matters)."""
    monkeypatch.setattr(native_norm, "MOMENT_ROWS", 50)
    rows = (1000.0 + rng.normal(size=(m, c)) + np.linspace(0, 3, m)[:, None]).astype(dtype)
    sums, squares = native_norm.moments(rows)
    want_sums, want_squares = _exact_moments(rows)
    assert sums.dtype == squares.dtype == dtype
    assert_rounding_close(sums, want_sums, err_msg="sums")
    assert_rounding_close(squares, want_squares, err_msg="squared deviations")


@pytest.mark.usefixtures("native_on")
def test_channel_moments_kernel_and_portable_agree(rng):
    """``F.channel_moments`` runs the compiled sweep on NumPy rows and agrees with its
    portable body (``channel_sums``, then ``squared_deviations`` from that mean)."""
    rows = rng.normal(2.0, 3.0, size=(3000, 32)).astype(np.float32)
    calls = []
    kernel = native_norm.moments
    native_norm.moments = lambda r: calls.append(r.shape) or kernel(r)
    try:
        got = F.channel_moments(rows)
    finally:
        native_norm.moments = kernel
    assert calls == [(3000, 32)]
    for a, e in zip(got, F.channel_moments.portable(rows)):
        assert_rounding_close(a, e)


@pytest.mark.usefixtures("native_on")
@pytest.mark.parametrize("relu", [False, True])
def test_training_batch_norm_takes_its_statistics_in_one_sweep(monkeypatch, rng, relu):
    """A compiled training BatchNorm calls the one-sweep statistics (and not the two-pass
    ones), and its outputs, running statistics and gradients equal the portable path's
    (its per-channel arithmetic in NumPy: :mod:`~anycnn.kernels.native_bn` off)."""
    monkeypatch.setattr(native_bn, "ENABLED", False)
    monkeypatch.setattr(native_norm, "MOMENT_ROWS", 50)
    calls = []
    kernel = native_norm.moments
    monkeypatch.setattr(native_norm, "moments", lambda r: calls.append(r.shape) or kernel(r))
    sqdev = native_norm.squared_deviations
    monkeypatch.setattr(native_norm, "squared_deviations",
                        lambda *a: pytest.fail("two-pass statistics ran") or sqdev(*a))
    run = batch_norm_run(rng, (3, 9, 7, 16), np.float32, True, relu)
    compiled = run()
    assert calls == [(189, 16)]
    from anycnn.kernels import native

    monkeypatch.setattr(native, "ENABLED", False)
    from anycnn.kernels import threads as kthreads

    monkeypatch.setattr(kthreads, "ENABLED", False)
    portable = run()
    for name, a, e in zip(("y", "mean", "var", "dx", "dgamma", "dbeta"), compiled, portable):
        assert_rounding_close(a, e, err_msg=name)


@pytest.mark.usefixtures("native_on")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 5, 7, 16), (2, 4, 4, 64), (4100, 32)])
def test_relu_grad_kernel_matches_portable(rng, dtype, shape):
    """The compiled ReLU gradient equals the portable ``(y > 0) * dy`` exactly, signed zeros
    and NaN included: an infinite or NaN ``dy`` where the ReLU was off gives NaN there, as
    the product does; a NaN output lets nothing through."""
    y = rng.normal(size=shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    flat_y, flat_dy = y.reshape(-1), dy.reshape(-1)
    flat_y[:6] = [-1.0, 0.0, np.nan, 2.0, -3.0, 0.0]
    flat_dy[:6] = [np.inf, np.nan, 5.0, np.inf, -2.0, -1.0]
    got = native_norm._relu_grad(y, dy)
    assert got is not native_norm.DECLINE and got.shape == shape and got.dtype == dtype
    with np.errstate(invalid="ignore"):
        want = F.relu_grad.portable(y, dy)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    np.testing.assert_array_equal(F.relu_grad(y, dy), want)


@pytest.mark.usefixtures("native_on")
def test_relu_grad_kernel_declines_what_it_does_not_take(rng):
    """Channels that do not fill a vector, mixed dtypes or shapes, and non-NumPy arrays are
    left to the other kernels."""
    y = rng.normal(size=(4, 3)).astype(np.float32)
    assert native_norm._relu_grad(y, y) is native_norm.DECLINE
    z = rng.normal(size=(4, 16)).astype(np.float32)
    assert native_norm._relu_grad(z, z.astype(np.float64)) is native_norm.DECLINE
    assert native_norm._relu_grad(z, z[:2]) is native_norm.DECLINE
    assert native_norm._relu_grad(z.tolist(), z) is native_norm.DECLINE


def _relu_batch_norm_rows(rng, m, c, dtype):
    """BatchNorm → ReLU rows: ``(x, mean, inv_std, gamma, beta, y, dy)`` with ``y`` the
    compiled forward's output; channel 0's rows all sit at the mean with ``beta = 0`` (an
    output of exactly zero: the ReLU is off there), channel 1 has a negative gamma."""
    from anycnn.kernels import native_norm

    x = rng.normal(0.5, 2.0, size=(m, c)).astype(dtype)
    mean = x.mean(axis=0).astype(dtype)
    x[:, 0] = mean[0]
    inv_std = (1.0 / x.std(axis=0).clip(0.5)).astype(dtype)
    gamma = rng.normal(size=c).astype(dtype)
    beta = (0.1 * rng.normal(size=c)).astype(dtype)
    gamma[1], beta[0] = -abs(gamma[1]), 0.0
    y = native_norm.normalize(x, mean, inv_std, gamma, beta, True)
    dy = rng.normal(size=(m, c)).astype(dtype)
    return x, mean, inv_std, gamma, beta, y, dy


@pytest.mark.usefixtures("native_on")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, c", [(4100, 32), (77, 16)])
def test_relu_mask_taken_again_from_the_input_matches_the_output(monkeypatch, rng, dtype, m,
                                                                 c):
    """BatchNorm's backward passes that take the ReLU's mask again from the input rows
    (``affine``, ``y`` not read) give what reading the forward's output gives, in blocks of
    50 rows; a mask recomputed differently (even one element off in 4100 rows) would move
    the sums by far more than rounding. Without a mask the results differ (the test sees the
    mask)."""
    monkeypatch.setattr(native_norm, "BLOCK_ROWS", 50)
    x, mean, inv_std, gamma, beta, y, dy = _relu_batch_norm_rows(rng, m, c, dtype)
    assert not y[:, 0].any()
    k = [rng.normal(size=c).astype(dtype) for _ in range(3)]
    pairs = [(native_norm.grad_sums(dy, y, x, mean, inv_std),
              native_norm.grad_sums(dy, None, x, mean, inv_std, (gamma, beta)),
              native_norm.grad_sums(dy, None, x, mean, inv_std)),
             (native_norm.input_grad(dy, y, x, mean, inv_std, *k),
              native_norm.input_grad(dy, None, x, mean, inv_std, *k, (gamma, beta)),
              native_norm.input_grad(dy, None, x, mean, inv_std, *k))]
    for read, again, unmasked in pairs:
        for a, b, u in zip(read, again, unmasked):
            assert_rounding_close(b, a)
            assert not np.allclose(u, a)
    np.testing.assert_array_equal(pairs[1][1][:, 0], -k[1][0])  # g = 0 where y == 0


@pytest.mark.usefixtures("native_on")
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_relu_backward_takes_the_mask_from_the_input(monkeypatch, rng, training):
    """A compiled BatchNorm → ReLU backward passes the forward's (gamma, beta) to both
    passes (the mask from the input rows), copies taken at the forward: a beta changed in
    place between forward and backward does not move the mask (the passes called one by one:
    :mod:`~anycnn.kernels.native_bn` off; ``test_native_bn`` tests its own)."""
    monkeypatch.setattr(native_bn, "ENABLED", False)
    seen = []
    for name in ("grad_sums", "input_grad"):
        kernel = getattr(native_norm, name)
        monkeypatch.setattr(native_norm, name, lambda *a, _k=kernel, _n=name: seen.append(
            (_n, a[-1])) or _k(*a))
    shape = (3, 9, 7, 16)
    x = rng.normal(1.5, 2.0, size=shape).astype(np.float32)
    gamma, beta = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    rm, rv = np.zeros(16, np.float32), np.ones(16, np.float32)
    _, ctx, _, _ = F.batch_norm_forward(x, gamma, beta, rm, rv, training, 0.1, 1e-5, relu=True)
    want = F.batch_norm_backward(dy, ctx, gamma)
    saved = gamma.copy()
    beta += 5.0  # in place, after the forward: the mask is the forward's
    got = F.batch_norm_backward(dy, ctx, gamma)
    names = [n for n, _ in seen]
    assert names == ["grad_sums", "input_grad"] * 2
    for _, affine in seen:
        assert isinstance(affine, tuple)
        np.testing.assert_array_equal(affine[0], saved)
    for a, e in zip(got, want):
        np.testing.assert_array_equal(a, e)
