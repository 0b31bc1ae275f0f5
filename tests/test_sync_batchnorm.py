"""Synchronised BatchNorm statistics (BatchNorm2D.sync, F.batch_norm_forward/backward with
``reduce``): ranks simulated by threads that sum through a barrier, against one process on the
whole batch, in float64. The real-MPI runs are in test_dist_train.py."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import anycnn
from anycnn.errors import ConfigError
from anycnn.nn import BatchNorm2D, Sequential, sync_batchnorm
from anycnn.nn import functional as F


class ThreadGroup:
    """``size`` threads that sum 1-D arrays through a barrier (a stand-in for allreduce)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.parts: dict[int, np.ndarray] = {}
        self.barrier = threading.Barrier(size)
        self.calls = 0

    def reduce_for(self, rank: int):
        def reduce(v):
            self.parts[rank] = np.asarray(v)
            self.barrier.wait()
            total = sum(self.parts[r] for r in range(self.size))
            self.barrier.wait()
            if rank == 0:
                self.calls += 1
            return total
        return reduce

    def run(self, work):
        results, errors = [None] * self.size, []

        def target(r):
            try:
                results[r] = work(r, self.reduce_for(r))
            except Exception as exc:  # pragma: no cover - shown by the assertion below
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not errors, errors
        return results


@pytest.mark.parametrize("cuts", [(0, 3, 4, 9), (0, 5, 10)])
def test_synchronised_statistics_equal_the_whole_batch(cuts):
    rng = np.random.default_rng(0)
    c = 3
    x = rng.normal(2.0, 3.0, size=(cuts[-1], 4, 5, c))
    gamma, beta = rng.normal(size=c), rng.normal(size=c)
    rm, rv = np.zeros(c), np.ones(c)
    dy_global = rng.normal(size=x.shape)  # gradient of the global objective
    y, ctx, want_rm, want_rv = F.batch_norm_forward(x, gamma, beta, rm, rv, True, 0.1, 1e-5)
    want_dx, want_dgamma, want_dbeta = F.batch_norm_backward(dy_global, ctx, gamma)
    group = ThreadGroup(len(cuts) - 1)
    n = cuts[-1]

    def rank(r, reduce):
        lo, hi = cuts[r], cuts[r + 1]
        w = (hi - lo) / n
        yr, ctx_r, rm_r, rv_r = F.batch_norm_forward(x[lo:hi], gamma, beta, rm, rv, True, 0.1,
                                                     1e-5, reduce=reduce)
        dx, dgamma, dbeta = F.batch_norm_backward(dy_global[lo:hi] / w, ctx_r, gamma,
                                                  reduce=reduce)
        return yr, rm_r, rv_r, dx * w, dgamma * w, dbeta * w

    out = group.run(rank)
    np.testing.assert_allclose(np.concatenate([o[0] for o in out]), y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([o[3] for o in out]), want_dx, rtol=1e-10,
                               atol=1e-12)
    for o in out:  # the same running statistics on every rank: the whole batch's
        np.testing.assert_allclose(o[1], want_rm, rtol=1e-12)
        np.testing.assert_allclose(o[2], want_rv, rtol=1e-12)
    # each rank's dgamma/dbeta weighted by its share add up to the whole batch's
    np.testing.assert_allclose(sum(o[4] for o in out), want_dgamma, rtol=1e-10)
    np.testing.assert_allclose(sum(o[5] for o in out), want_dbeta, rtol=1e-10)
    assert group.calls == 3  # two sums in forward, one in backward


class FakeComm:
    def __init__(self, size):
        self.size, self.name = size, "fake"

    def allreduce_(self, buf):  # pragma: no cover - never called in these tests
        raise AssertionError("no collective expected")


def test_sync_batchnorm_sets_every_layer_and_only_acts_in_training():
    bn_a, bn_b = BatchNorm2D(2, dtype="float64"), BatchNorm2D(2, dtype="float64")
    model = Sequential(bn_a, Sequential(bn_b))
    assert sync_batchnorm(model, FakeComm(4)) == 2
    assert bn_a.sync.size == 4 and bn_b.sync.size == 4
    assert "sync=fake x 4" in repr(bn_a)
    model.eval()  # running statistics: no collective
    x = anycnn.asarray(np.ones((2, 3, 3, 2)), dtype="float64")  # on the backend under test
    np.testing.assert_allclose(anycnn.to_numpy(model.forward(x)),
                               anycnn.to_numpy(bn_b.forward(bn_a.forward(x))))
    model.train()
    bn_a.sync = FakeComm(1)  # one rank: the plain computation
    bn_a.forward(x)


def test_synchronised_batchnorm_refuses_empty_shares():
    from anycnn.data import ArrayDataset, DataLoader
    from anycnn.train.parallel import DataParallel

    model = Sequential(BatchNorm2D(1))
    sync_batchnorm(model, FakeComm(3))
    data = ArrayDataset(np.zeros((10, 2, 2, 1), dtype=np.uint8), np.zeros(10, dtype=np.int64), 2)
    parallel = DataParallel(FakeComm(3))
    parallel.check_shares(model, DataLoader(data, 5))  # 5 + 5: every rank has a share
    with pytest.raises(ConfigError, match="a batch of 1 leaves some of the 3 ranks nothing"):
        parallel.check_shares(model, DataLoader(data, 3))  # 3 + 3 + 3 + 1
    with pytest.raises(ConfigError, match="a batch of 2 leaves"):
        parallel.check_shares(model, DataLoader(data, 2))
    parallel.check_shares(model, DataLoader(data, 3, drop_last=True))
