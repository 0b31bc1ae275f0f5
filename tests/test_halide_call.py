"""Calls of compiled kernels (``anycnn.kernels.halide_call``): a call's descriptors are packed
once per geometry and thread, then only the arrays' addresses change; a cached descriptor is
never used for arrays of another shape, strides or dtype, nor for other scalars, nor by
another thread."""

from __future__ import annotations

import importlib.util
import threading

import numpy as np
import pytest

from anycnn.kernels import halide_call, kernel_cache

pytestmark = pytest.mark.skipif(importlib.util.find_spec("halide") is None or
                                kernel_cache._compiler() is None,
                                reason="needs halide and a C compiler")


def _affine_builder(width: int):
    """out[x, y] = a[x, y] * k + b[x, y], vectorised by ``width``."""
    import halide as hl

    a, b = hl.ImageParam(hl.Float(32), 2, "a"), hl.ImageParam(hl.Float(32), 2, "b")
    k = hl.Param(hl.Int(32), "k")
    x, y = hl.Var("x"), hl.Var("y")
    out = hl.Func("out")
    out[x, y] = a[x, y] * hl.cast(hl.Float(32), k) + b[x, y]
    out.vectorize(x, width, hl.TailStrategy.GuardWithIf)
    return out, {"a": a, "b": b}, {"k": k}


@pytest.fixture(scope="module")
def affine(tmp_path_factory):
    """The compiled pipeline (ahead of time, into a cache of this module's own)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANYCNN_KERNEL_CACHE", str(tmp_path_factory.mktemp("kernels")))
        mp.setattr(kernel_cache, "_not_kept", None)
        compiled = kernel_cache.pipeline(_affine_builder)(4)
    assert compiled._calls is not None, "compiled in memory: these tests need the cache"
    return compiled


def _run(pipeline, a, b, k, out=None):
    out = np.empty(a.shape, np.float32) if out is None else out
    pipeline.run({"a": a, "b": b}, {"k": k}, [out])
    return out


def _values(shape, seed=0, dtype=np.float32):
    """Small integers: the kernel's fused multiply-add then rounds as NumPy does (exactly)."""
    return np.random.default_rng(seed).integers(-99, 100, shape).astype(dtype)


def test_a_plan_is_reused_for_new_arrays_of_its_geometry(affine):
    a, b = _values((3, 5)), _values((3, 5), 1)
    first = _run(affine, a, b, 2)
    plans = len(affine._calls.plans())
    a2, b2 = _values((3, 5), 2), _values((3, 5), 3)
    second = _run(affine, a2, b2, 2)
    assert len(affine._calls.plans()) == plans  # the same plan, new addresses
    np.testing.assert_array_equal(first, a * 2 + b)  # the first output left as it was
    np.testing.assert_array_equal(second, a2 * 2 + b2)


@pytest.mark.parametrize("case", ["shape", "input strides", "output strides", "scalar"])
def test_a_plan_is_not_used_for_another_geometry_or_scalar(affine, case):
    """Each call after a first one of the same ndim: a plan reused wrongly would read or
    write with the first call's extents or strides (or multiply by its k)."""
    a, b = _values((4, 6)), _values((4, 6), 1)
    np.testing.assert_array_equal(_run(affine, a, b, 3), a * 3 + b)
    if case == "shape":  # same number of elements
        a, b = _values((6, 4), 2), _values((6, 4), 3)
        np.testing.assert_array_equal(_run(affine, a, b, 3), a * 3 + b)
    elif case == "input strides":  # same shape, rows of a wider array
        a = _values((4, 10), 2)[:, :6]
        np.testing.assert_array_equal(_run(affine, a, b, 3), a * 3 + b)
    elif case == "output strides":  # rows of a wider array, written in place
        wide = np.zeros((4, 10), np.float32)
        _run(affine, a, b, 3, wide[:, :6])
        np.testing.assert_array_equal(wide[:, :6], a * 3 + b)
        assert not wide[:, 6:].any()
    else:
        np.testing.assert_array_equal(_run(affine, a, b, -2), a * -2 + b)


def test_a_plan_is_not_used_for_another_dtype(affine):
    """float32 and int32 arrays of one shape have the same strides: a plan keyed without the
    dtype would run on the int32 array as float32; Halide refuses the int32 descriptor."""
    a, b = _values((3, 4)), _values((3, 4), 1)
    np.testing.assert_array_equal(_run(affine, a, b, 2), a * 2 + b)
    ints = a.astype(np.int32)
    assert ints.strides == a.strides
    with pytest.raises(RuntimeError, match="type"):
        _run(affine, ints, b, 2)


def test_empty_and_read_only_arrays(affine):
    """An empty array (no buffer address through the buffer protocol) and a read-only one
    (refused by it) take NumPy's address."""
    empty = np.zeros((0, 4), np.float32)
    assert _run(affine, empty, empty, 2).shape == (0, 4)
    a, b = _values((2, 4)), _values((2, 4), 1)
    a.flags.writeable = False
    np.testing.assert_array_equal(_run(affine, a, b, 2), a * 2 + b)


def test_plans_are_per_thread(affine):
    """Threads running the same geometry and scalars at once each write the addresses of
    their arrays into a plan of their own."""
    threads = 4
    a = [_values((64, 64), s) for s in range(threads)]
    b = [_values((64, 64), 10 + s) for s in range(threads)]
    start = threading.Barrier(threads)
    plans, right = [None] * threads, [False] * threads

    def work(i: int):
        start.wait()
        outs = [_run(affine, a[i], b[i], 2) for _ in range(50)]
        plans[i] = list(affine._calls.plans().values())  # held: no id reused
        right[i] = all(np.array_equal(o, a[i] * 2 + b[i]) for o in outs)

    before = dict(affine._calls.plans())
    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all(right)
    assert all(len(mine) == 1 for mine in plans)  # one plan each
    assert len({id(mine[0].block) for mine in plans}) == threads  # not shared
    assert affine._calls.plans() == before  # and not this thread's


def test_plans_per_thread_are_bounded(affine, monkeypatch):
    monkeypatch.setattr(halide_call, "PLANS_PER_THREAD", 3)
    for n in range(1, 8):
        a = _values((2, n))
        np.testing.assert_array_equal(_run(affine, a, a, 1), a + a)
        assert len(affine._calls.plans()) <= 3
