"""NumPy fast paths equal their portable Array API expressions; batch regions combine right."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import array_api_compat.numpy as xp
import array_api_extra as xpx
import numpy as np
import pytest

import anycnn
from anycnn.kernels import fastpath
from anycnn.kernels import threads as kthreads
from anycnn.models import build_model
from anycnn.nn import functional as F


@pytest.fixture
def threads(monkeypatch):
    """The NumPy kernels on (these tests are about them, also under ``ANYCNN_FASTPATH=0``), two
    threads, and every call large enough to be split."""
    monkeypatch.setattr(kthreads, "ENABLED", True)
    monkeypatch.setenv("ANYCNN_NUM_THREADS", "2")
    monkeypatch.setattr(kthreads, "MIN_PARALLEL_SIZE", 1)


@pytest.fixture
def portable(monkeypatch):
    """A function that runs ``fn()`` with the NumPy fast paths off (the portable code)."""
    def run(fn):
        monkeypatch.setattr(kthreads, "ENABLED", False)
        try:
            return fn()
        finally:
            monkeypatch.setattr(kthreads, "ENABLED", True)

    monkeypatch.setattr(kthreads, "ENABLED", True)
    return run


def test_take_rows_sum_and_pad_match_portable(threads, portable, rng):
    x = rng.standard_normal((5, 40, 3)).astype(np.float32)
    index = rng.integers(0, 40, 77)
    np.testing.assert_array_equal(F.take_rows(x, index), np.take(x, index, axis=1))
    g = rng.standard_normal((5, 4, 6, 3)).astype(np.float32)
    np.testing.assert_array_equal(F.sum_axis1(g), portable(
        lambda: F.sum_axis1(g)))
    img = rng.standard_normal((3, 4, 5, 2)).astype(np.float32)
    for pads, value in (((1, 2, 0, 3), 0.0), ((0, 0, 2, 1), -np.inf), ((2, 2, 2, 2), 0.0)):
        expected = xpx.pad(img, ((0, 0), pads[:2], pads[2:], (0, 0)), constant_values=value)
        np.testing.assert_array_equal(F.pad_hw(img, pads, value), expected)
        slow = portable(lambda p=pads, v=value: F.pad_hw(img, p, v))
        np.testing.assert_array_equal(slow, expected)


@pytest.mark.parametrize("taps", [1, 2, 4, 9])
def test_window_max_and_masked_match_portable_with_ties(threads, portable, rng, taps):
    entries = np.round(rng.standard_normal((5, taps, 6, 3))).astype(np.float32)  # many ties
    fast_y, fast_mask = F.window_max(entries)
    dy = rng.standard_normal((5, 1, 6, 3)).astype(np.float32)
    fast_d = F.masked(fast_mask, dy)
    y, mask = portable(lambda: F.window_max(entries))
    np.testing.assert_array_equal(fast_y, y)
    np.testing.assert_array_equal(fast_mask, mask)
    assert (mask.sum(axis=1) == 1).all()  # exactly one first maximum per window
    np.testing.assert_array_equal(mask.argmax(axis=1), entries.argmax(axis=1))
    d = portable(lambda: F.masked(mask, dy))
    assert d.dtype == np.float32
    np.testing.assert_array_equal(fast_d, d)


@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_relu_and_relu_grad_match_portable(threads, portable, rng, with_bias):
    x = np.round(rng.standard_normal((5, 4, 3)), 1).astype(np.float32)  # exact zeros too
    bias = rng.standard_normal(3).astype(np.float32) if with_bias else None
    dy = rng.standard_normal((5, 4, 3)).astype(np.float32)
    fast = F.bias_relu(x, bias)
    fast_grad = F.relu_grad(fast, dy)
    slow = portable(lambda: F.bias_relu(x, bias))
    np.testing.assert_array_equal(fast, slow)
    np.testing.assert_array_equal(fast_grad, portable(lambda: F.relu_grad(slow, dy)))
    assert fast.dtype == fast_grad.dtype == np.float32


def test_fast_paths_only_engage_for_numpy(threads):
    import array_api_strict

    assert not kthreads.enabled(array_api_strict)
    assert kthreads._parallel(array_api_strict, 1 << 20, 8) == 0
    assert kthreads._parallel(xp, 1 << 20, 8) == 2


def _ranges_fn(n_feat=3):
    """fn(a, b) → (batch rows a..b, their sum, None), recording the calling threads."""
    seen = []

    def fn(a, b):
        time.sleep(0.002)  # long enough for the other thread to wake and take ranges too
        seen.append((a, b, threading.current_thread().name,
                     kthreads._parallel(xp, 1 << 30, 8)))
        rows = np.arange(a * n_feat, b * n_feat, dtype=np.float64).reshape(b - a, n_feat)
        return rows, rows.sum(axis=0), None

    return fn, seen


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_map_batch_concatenates_and_sums_in_threads(threads, monkeypatch, n):
    monkeypatch.setattr(kthreads, "CACHE_CHUNK_BYTES", 1)  # one image per chunk
    fn, seen = _ranges_fn()
    rows, total, nothing = kthreads.map_batch(xp, n, 1, fn, ("cat", "sum", "sum"))
    expected = np.arange(n * 3, dtype=np.float64).reshape(n, 3)
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_array_equal(total, expected.sum(axis=0))
    assert nothing is None
    assert sorted((a, b) for a, b, _, _ in seen) == [(i, i + 1) for i in range(n)]
    assert all(nested == 0 for *_, nested in seen)  # no splitting inside a region
    if n > 4:
        assert len({name for _, _, name, _ in seen}) == 2  # both threads took ranges


def test_map_batch_portable_path_chunks_by_bytes(portable):
    fn, seen = _ranges_fn()
    rows, total, _ = portable(lambda: kthreads.map_batch(xp, 10, 8, fn, ("cat", "sum", "sum"),
                                                         portable_chunk_bytes=32))
    np.testing.assert_array_equal(rows, np.arange(30.0).reshape(10, 3))
    np.testing.assert_array_equal(total, np.arange(30.0).reshape(10, 3).sum(axis=0))
    assert [(a, b) for a, b, *_ in seen] == [(0, 4), (4, 8), (8, 10)]
    seen.clear()
    portable(lambda: kthreads.map_batch(xp, 10, 8, fn, ("cat", "sum", "sum")))
    assert [(a, b) for a, b, *_ in seen] == [(0, 10)]  # no byte limit: one call


def test_map_batch_propagates_errors(threads):
    def fn(a, b):
        if a > 0:
            raise ValueError("bad chunk")
        return (np.zeros((b - a, 1)),)

    with pytest.raises(ValueError, match="bad chunk"):
        kthreads.map_batch(xp, 8, 1 << 30, fn, ("cat",))
    assert not getattr(kthreads._region, "active", False)


def _simple_cnn_grads(x, y):
    anycnn.manual_seed(0)
    model = build_model("simple-cnn")
    loss = anycnn.nn.SoftmaxCrossEntropy()
    loss.forward(model(anycnn.asarray(x)), anycnn.asarray(y))
    dx = model.backward(loss.backward())
    return [anycnn.to_numpy(dx)] + [anycnn.to_numpy(p.grad) for p in model.parameters()]


@pytest.mark.numpy_only  # the whole step under use_backend("numpy"): the same in every session
def test_training_step_fast_paths_match_portable_and_are_deterministic(rng, monkeypatch):
    """A whole simple-cnn step on NumPy: the fast paths (threads, cache-sized chunks) agree
    with the portable code to float32 rounding (the weight-gradient sums are split
    differently), and repeat bit for bit."""
    x = rng.random((6, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 6)
    monkeypatch.setenv("ANYCNN_NUM_THREADS", "2")
    monkeypatch.setattr(kthreads, "MIN_PARALLEL_SIZE", 1)
    monkeypatch.setattr(kthreads, "CACHE_CHUNK_BYTES", 1)  # one image per chunk
    with anycnn.use_backend("numpy"):
        monkeypatch.setattr(kthreads, "ENABLED", True)
        fast, again = _simple_cnn_grads(x, y), _simple_cnn_grads(x, y)
        monkeypatch.setattr(kthreads, "ENABLED", False)
        slow = _simple_cnn_grads(x, y)
    for a, b, c in zip(fast, again, slow):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6 * np.abs(c).max())


@pytest.mark.parametrize("shape", [(700, 5, 3), (6,), ()])
def test_update_rows_splits_in_place_updates(threads, rng, shape):
    y = rng.standard_normal(shape).astype(np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    calls = []

    def update(a, b):
        calls.append(a.shape)
        a *= 0.5
        a += b

    expected = y * np.float32(0.5) + x
    fastpath.update_rows(xp, update, y, x)
    np.testing.assert_array_equal(y, expected)
    assert len(calls) == (1 if shape == () else 2)  # one shard per thread


def test_map_batch_keeps_pieces_for_a_second_pass(threads, monkeypatch):
    monkeypatch.setattr(kthreads, "CACHE_CHUNK_BYTES", 2)  # two images per chunk

    def fn(a, b):
        return (np.arange(a, b, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32),)

    kept, = kthreads.map_batch(xp, 7, 1, fn, ("keep",))
    assert isinstance(kept, kthreads.Pieces)
    assert sorted((a, b) for a, b, _ in kept.parts) == [(0, 1), (1, 3), (3, 5), (5, 7)]
    np.testing.assert_array_equal(kept.part(1, 3)[:, 0], [1, 2])
    np.testing.assert_array_equal(kept.part(5, 6)[:, 0], [5])
    np.testing.assert_array_equal(kept.part(1, 7)[:, 0], [1, 2, 3, 4, 5, 6])  # across ranges
    with pytest.raises(ValueError, match="not all computed"):
        kept.part(5, 9)


@pytest.mark.parametrize("n, size, threads, expected", [
    (64, 16, 1, [(0, 16), (16, 32), (32, 48), (48, 64)]),
    (64, 16, 2, [(0, 8), (8, 24), (24, 40), (40, 56), (56, 64)]),
    (10, 4, 3, [(0, 1), (1, 3), (3, 7), (7, 10)]),
    (3, 4, 2, [(0, 2), (2, 3)]),
    (1, 1, 2, [(0, 1)]),
])
def test_ranges_start_staggered_per_thread(n, size, threads, expected):
    """With several threads the first ranges are shorter, so the threads run out of step."""
    assert kthreads._ranges(n, size, threads) == expected


def test_map_batch_works_in_a_forked_child(threads):
    """Helper threads do not survive fork(): a child must start its own, not wait forever."""
    import multiprocessing

    fn, _ = _ranges_fn()
    kthreads.map_batch(xp, 8, 1 << 30, fn, ("cat", "sum", "sum"))  # the parent's threads exist
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_child_map_batch)
    child.start()
    child.join(timeout=20)
    if child.is_alive():  # stuck waiting for a thread that does not exist
        child.kill()
        child.join()
    assert child.exitcode == 0


def _child_map_batch():
    import os as _os

    _os.environ["ANYCNN_NUM_THREADS"] = "2"
    kthreads.MIN_PARALLEL_SIZE = 1
    fn, _ = _ranges_fn()
    rows, _, _ = kthreads.map_batch(xp, 8, 1, fn, ("cat", "sum", "sum"))
    raise SystemExit(0 if rows.shape == (8, 3) else 1)


@pytest.mark.parametrize("shape", [(64, 300, 40), (8, 300, 128), (1, 50, 7), (3, 0, 5)])
def test_matmul_splits_equal_the_plain_product(threads, monkeypatch, rng, shape):
    """Row or column shards on the library's threads, each a one-thread BLAS call."""
    monkeypatch.setattr(fastpath, "MIN_PARALLEL_MACS", 1)
    m, k, n = shape
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    out = F.matmul(a, b)
    assert out.dtype == np.float32 and out.shape == (m, n)
    np.testing.assert_allclose(out, a @ b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(a @ b).max()))
    # transposed (strided) operands, as in the Dense weight gradient
    np.testing.assert_allclose(F.matmul(a.T, a), a.T @ a, rtol=1e-4, atol=1e-3)


def test_a_small_matmul_leaves_the_blas_threads_alone(monkeypatch, rng):
    """Below SMALL_GEMM_MACS the product is the BLAS's own (which runs it on the calling
    thread): the loaded BLAS libraries are not looked up; a larger one limits them first."""
    def looked_up():
        raise LookupError("the BLAS libraries were looked up")

    monkeypatch.setattr(kthreads, "_blas_libraries", looked_up)
    a = rng.standard_normal((32, 64)).astype(np.float32)
    b = rng.standard_normal((64, 10)).astype(np.float32)
    assert 32 * 64 * 10 < fastpath.SMALL_GEMM_MACS
    np.testing.assert_array_equal(F.matmul(a, b), a @ b)
    big = rng.standard_normal((64, 64 * 16)).astype(np.float32)
    with pytest.raises(LookupError):
        F.matmul(big, big.T)


def test_one_blas_thread_nests_and_restores(rng):
    from threadpoolctl import threadpool_info, threadpool_limits

    # the libraries one_blas_thread controls: those loaded at its first use (NumPy's BLAS); a
    # BLAS loaded later (torch's, when another test imported torch first) is not the fast path's
    controlled = {lib.filepath for lib in kthreads._blas_libraries()}
    assert controlled

    def blas_threads():
        return {lib["num_threads"] for lib in threadpool_info()
                if lib["user_api"] == "blas" and lib["filepath"] in controlled}

    with threadpool_limits(2, user_api="blas"):
        with kthreads.one_blas_thread():
            assert blas_threads() == {1}
            with kthreads.one_blas_thread():
                assert blas_threads() == {1}
            assert blas_threads() == {1}  # the inner exit leaves the outer limit alone
        assert blas_threads() == {2}
        with pytest.raises(ZeroDivisionError), kthreads.one_blas_thread():
            1 / 0  # noqa: B018
        assert blas_threads() == {2}


BLAS_THREADS_IDLE = r"""
import os, sys, threading, time
import numpy as np  # the script path: NumPy first, no OPENBLAS_THREAD_TIMEOUT
# the BLAS's threads start with NumPy; any started later (Halide's pool) are not the BLAS's
blas_threads = [int(t) for t in os.listdir("/proc/self/task")
                if int(t) != threading.get_native_id()]
import anycnn
from anycnn.models import build_model

def cpu_seconds(tid):
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

name, input_grad = sys.argv[1], sys.argv[2] == "input-grad"
if name == "zoo":  # every other kind of GEMM: grouped, depthwise, transposed, Dense on rank 4
    from anycnn import nn
    model = nn.Sequential(
        nn.Conv2D(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2D(32, 32, 3, padding=1, groups=4),
        nn.Conv2D(32, 32, 3, padding=1, groups=32), nn.ConvTranspose2D(32, 16, 2, stride=2),
        nn.Dense(16, 16), nn.ReLU(), nn.MaxPool2D(4), nn.Flatten(), nn.Dense(1024, 10))
else:
    model = build_model(name)
side, channels = (28, 1) if name == "simple-cnn" else (16, 3)
rng = np.random.default_rng(0)
x = anycnn.asarray(rng.random((64, side, side, channels), dtype=np.float32))
y = anycnn.asarray(rng.integers(0, 10, 64))
loss, opt = anycnn.nn.SoftmaxCrossEntropy(), anycnn.optim.SGD(model.parameters(), lr=0.01)
def step():
    model.zero_grad()
    loss.forward(model(x), y)
    model.backward(loss.backward(), input_grad=input_grad)
    opt.step()
step()
assert blas_threads, "NumPy's BLAS started no threads: nothing to watch"
everyone = [int(t) for t in os.listdir("/proc/self/task")]
before = {t: cpu_seconds(t) for t in everyone}
for _ in range(25):
    step()
blas = sum(cpu_seconds(t) - before[t] for t in blas_threads)
mine = sum(cpu_seconds(t) - before[t] for t in everyone if t not in blas_threads)
print(f"{blas:.3f} {mine:.3f}")
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
@pytest.mark.numpy_only  # ANYCNN_BACKEND=numpy, in a subprocess: the same run in every session
@pytest.mark.parametrize("grad", ["input-grad", "no-input-grad"])
@pytest.mark.parametrize("model", ["simple-cnn", "resnet20", "zoo"])
def test_training_steps_never_wake_the_blas_threads(tmp_path, model, grad):
    """In a script that imports NumPy first, the BLAS's own threads stay asleep during steps:
    all parallel work runs on anycnn's threads and the compiled kernels' pool (an OpenBLAS
    thread, once woken, spins about 0.1 s on the core the next convolution chunk needs). Both
    the Trainer's step (no input gradient) and a hand-written loop's default ``backward(dy)``
    (the first layer's input gradient too), for a plain and a residual model."""
    script = tmp_path / "steps.py"
    script.write_text(BLAS_THREADS_IDLE)
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_THREAD_TIMEOUT", "ANYCNN_NUM_THREADS", "ANYCNN_FASTPATH")}
    env.update(OPENBLAS_NUM_THREADS="2", ANYCNN_BACKEND="numpy")
    out = subprocess.run([sys.executable, str(script), model, grad], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    blas, mine = map(float, out.stdout.split())
    assert mine > 0.05
    assert blas <= 0.02 + 0.05 * mine, (blas, mine)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", [(5, 7, 3, 4), (300, 70, 16)])
def test_add_and_add_relu_match_the_expressions(threads, monkeypatch, rng, relu, shape):
    """The residual sums (split over the threads, in chunks of rows) are exact: elementwise."""
    monkeypatch.setattr(kthreads, "MIN_PARALLEL_SIZE", 1)
    monkeypatch.setattr(fastpath, "CHANNEL_CHUNK", 64)
    x = rng.normal(size=shape).astype(np.float32)
    y = rng.normal(size=shape).astype(np.float32)
    got = F.add_relu(x, y) if relu else F.add(x, y)
    np.testing.assert_array_equal(got, np.maximum(x + y, 0.0) if relu else x + y)
    # a broadcast operand takes the plain expression
    np.testing.assert_array_equal(F.add(x, y[:1]), x + y[:1])


def test_compiled_kernels_are_offered_calls_before_the_numpy_ones():
    """The dispatch order follows dispatch.KERNEL_MODULES, not the order the kernel modules
    happen to import each other in (native imports fastpath first)."""
    from anycnn.kernels import dispatch

    order = dispatch.KERNEL_MODULES
    for name in ("channel_sums", "matmul", "conv2d", "take_rows"):
        modules = [k.__module__ for k in dispatch.kernels_for(name)]
        assert modules, name
        assert modules == sorted(modules, key=order.index), (name, modules)
    numpy_kernels = [k.__module__ for k in dispatch.kernels_for("channel_sums")
                     if k.__module__ not in dispatch.ONLY_FOR]  # torch's, once torch is loaded
    assert numpy_kernels == ["anycnn.kernels.native_norm", "anycnn.kernels.fastpath"]
