"""Measured native fast paths behind the shim (the array-api-extra way).

Each function here has the same result as its portable Array API expression (given in its
docstring, and used for every other backend). On NumPy:

- the elementwise helpers use NumPy kernels written with ``out=`` (no cast passes, no stacks);
  outside a batch-parallel region, large calls are split along the batch axis over a small
  thread pool, because NumPy runs ``take`` and reductions on one core while releasing the GIL;
- :func:`map_batch` runs a whole per-image computation (a convolution block) chunk by chunk,
  each chunk small enough to stay in the CPU caches, the chunks shared between threads, with the
  BLAS limited to one thread per caller meanwhile (one core per thread, no oversubscription).

Tests check each fast path against the portable expression.

``ANYCNN_NUM_THREADS`` sets the thread count (default: the CPUs this process may use); 1 runs
everything on the calling thread. ``ANYCNN_FASTPATH=0`` turns the NumPy fast paths off (every
backend then runs the portable expressions).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import array_api_compat
import numpy as np

from .backend import require_in_place

#: below this many output elements the unsplit kernel is used (thread hand-off costs ~20 us)
MIN_PARALLEL_SIZE = 1 << 18

#: working set of one :func:`map_batch` chunk on NumPy (about one core's L2 cache, measured)
CACHE_CHUNK_BYTES = 8 << 20

_pool: tuple[int, _Workers] | None = None  # (size, workers), made at first use
_region = threading.local()  # .active: this thread runs a chunk of a batch-parallel region


def num_threads() -> int:
    env = os.environ.get("ANYCNN_NUM_THREADS")
    if env:
        return max(1, int(env))
    return _usable_cpus()


@functools.cache
def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: whether the NumPy kernels are on; None: read ``ANYCNN_FASTPATH`` at first use
ENABLED: bool | None = None


def enabled(xp: Any) -> bool:
    """True when the NumPy kernels apply to namespace ``xp``."""
    global ENABLED
    if ENABLED is None:
        ENABLED = os.environ.get("ANYCNN_FASTPATH", "1") != "0"
    return ENABLED and array_api_compat.is_numpy_namespace(xp)


class _Workers:
    """Helper threads taking jobs from one queue. Lighter than ``ThreadPoolExecutor``
    (measured: ~0.5 ms less per batch-64 training step, which hands work over ~10 times)."""

    def __init__(self, count: int) -> None:
        self._jobs: collections.deque = collections.deque()
        self._ready = threading.Condition()
        for i in range(count):
            threading.Thread(target=self._serve, name=f"anycnn-{i}", daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        with self._ready:
            self._jobs.append((future, fn, args))
            self._ready.notify()
        return future

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._jobs:
                    self._ready.wait()
                future, fn, args = self._jobs.popleft()
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller through the future
                future.set_exception(exc)


def _executor(threads: int) -> _Workers:
    global _pool
    if _pool is None or _pool[0] != threads:
        _watch_fork()
        _pool = (threads, _Workers(threads))
    return _pool[1]


@functools.cache
def _watch_fork() -> None:
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_forget_workers)


def _forget_workers() -> None:
    """After ``fork`` the helper threads do not exist in the child: make new ones there."""
    global _pool
    _pool = None


def _shards(n: int, threads: int) -> list[tuple[int, int]]:
    step = -(-n // threads)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _parallel(xp: Any, out_size: int, batch: int) -> int:
    """Number of threads to split a NumPy call over (0: run it unsplit)."""
    if (batch < 2 or out_size < MIN_PARALLEL_SIZE or getattr(_region, "active", False)
            or not enabled(xp)):
        return 0
    threads = min(num_threads(), batch)
    return threads if threads > 1 else 0


def _run_shards(threads: int, n: int, work: Callable[[int, int], Any]) -> list[Any]:
    """Run ``work(start, stop)`` over ``threads`` batch shards of ``range(n)``; their results.

    The calling thread takes the first shard itself (one hand-off fewer per call)."""
    (a0, b0), *rest = _shards(n, threads)
    jobs = [_executor(threads - 1).submit(work, a, b) for a, b in rest]
    first = work(a0, b0)
    return [first] + [job.result() for job in jobs]


def _split(xp: Any, out: Any, kernel: Callable[[int, int], None]) -> Any:
    """Run ``kernel(start, stop)``, which fills ``out[start:stop]``, over batch shards."""
    n = out.shape[0]
    threads = _parallel(xp, math.prod(out.shape), n)
    if threads:
        _run_shards(threads, n, kernel)
    else:
        kernel(0, n)
    return out


# --------------------------------------------------------------------------------------------
# Batch-parallel regions


@functools.cache
def _blas_libraries() -> tuple[Any, ...]:
    """threadpoolctl's controllers of the BLAS libraries loaded (NumPy's; found at first use)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return ()
    return tuple(lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas")


_blas_owner = threading.local()  # .held: this thread has limited the BLAS to one thread


@contextlib.contextmanager
def one_blas_thread():
    """Run the block with the BLAS on one thread: the calling one (nested uses cost nothing).

    The library's own threads supply the parallelism instead, so the BLAS's helper threads are
    never woken during a step. Woken, they would spin for a while after each call (OpenBLAS:
    2**28 cycles, about 0.1 s, unless ``OPENBLAS_THREAD_TIMEOUT`` was set before NumPy loaded)
    on the core that the next convolution chunk needs: measured 1.6x slower simple-cnn steps on
    2 cores. The thread count is process-wide while the block runs.
    """
    if getattr(_blas_owner, "held", False):
        yield
        return
    libs = _blas_libraries()
    before = [lib.get_num_threads() for lib in libs]
    _blas_owner.held = True
    try:
        for lib, count in zip(libs, before):
            if count != 1:
                lib.set_num_threads(1)
        yield
    finally:
        for lib, count in zip(libs, before):
            if count != 1:
                lib.set_num_threads(count)
        _blas_owner.held = False


#: a GEMM with fewer multiply-adds than this runs unsplit (waking a sleeping helper thread
#: costs 20-90 us on the project machine; 2**23 multiply-adds take about 100 us on one core)
MIN_PARALLEL_MACS = 1 << 23


def matmul(xp: Any, a: Any, b: Any) -> Any:
    """``a @ b`` for 2-D ``a`` (M, K) and ``b`` (K, N).

    NumPy: the BLAS runs on one thread per caller; a large product is split into row shards of
    ``a`` (column shards of ``b`` when N > M) computed on the library's threads. Every output
    element is one BLAS dot product of length K either way; which kernel the BLAS picks for a
    shard's shape may change its last bits, so results depend on the thread count (and are
    repeatable for a given one).
    """
    if not enabled(xp):
        return a @ b
    m, n = a.shape[0], b.shape[1]
    threads = 0 if getattr(_region, "active", False) else min(num_threads(), max(m, n))
    with one_blas_thread():
        if threads < 2 or m * n * a.shape[1] < MIN_PARALLEL_MACS:
            return a @ b
        out = np.empty((m, n), dtype=np.result_type(a.dtype, b.dtype))
        if m >= n:
            _run_shards(threads, m, lambda i, j: np.matmul(a[i:j], b, out=out[i:j]))
        else:
            _run_shards(threads, n, lambda i, j: np.matmul(a, b[:, i:j], out=out[:, i:j]))
    return out


def map_batch(xp: Any, n: int, per_image_bytes: int, fn: Callable[[int, int], tuple],
              kinds: tuple[str, ...], portable_chunk_bytes: int | None = None) -> tuple:
    """Run ``fn(start, stop)`` over consecutive image ranges covering ``range(n)``; combine.

    ``fn`` computes images ``start:stop`` and returns a tuple; ``kinds[i]`` says how item ``i``
    combines over the ranges: ``"cat"`` (batch-first arrays, joined along axis 0), ``"sum"``
    (added, in range order) or ``"keep"`` (left in pieces, see :class:`Pieces`: for a later
    pass over the same ranges, without a copy). ``None`` items stay ``None``.
    ``per_image_bytes`` is ``fn``'s working set per image.

    NumPy: ranges of about :data:`CACHE_CHUNK_BYTES` (at least one per thread; the first ones
    shorter, see :func:`_ranges`), taken in turn by :func:`num_threads` threads (whichever is
    free takes the next: a late-waking thread leaves no idle one behind) that run with a
    one-thread BLAS; ``"cat"`` items are copied into their output while still in cache.
    Other namespaces: ranges of ``portable_chunk_bytes`` (None: the whole batch in one call),
    in order. Results never depend on which thread ran what.
    """
    fast = enabled(xp)
    threads = 1
    if fast:
        if not getattr(_region, "active", False):
            threads = min(num_threads(), n)
        size = min(CACHE_CHUNK_BYTES // max(per_image_bytes, 1), -(-n // threads))
    else:
        size = (n if portable_chunk_bytes is None
                else portable_chunk_bytes // max(per_image_bytes, 1))
    ranges = _ranges(n, max(size, 1), threads)
    results: list[Any] = [None] * len(ranges)
    outs: list[Any] = [None] * len(kinds)
    taken = iter(range(len(ranges)))  # next() on it is atomic under the GIL
    failed: list[BaseException] = []
    lock = threading.Lock()

    def work() -> None:
        outer = getattr(_region, "active", False)
        _region.active = True
        try:
            for i in taken:
                if failed:
                    return
                a, b = ranges[i]
                r = list(fn(a, b))
                for k, kind in enumerate(kinds):
                    if kind == "keep" and r[k] is not None:
                        r[k] = (a, b, r[k])
                if fast:  # copy the "cat" items out now, while they are in cache
                    for k, kind in enumerate(kinds):
                        if kind == "cat" and r[k] is not None:
                            if outs[k] is None:
                                with lock:
                                    if outs[k] is None:
                                        outs[k] = _empty_like_batch(r[k], n)
                            outs[k][a:b] = r[k]
                            r[k] = None
                results[i] = r
        except BaseException as exc:  # re-raised by the caller, after every thread stopped
            failed.append(exc)
        finally:
            _region.active = outer

    if threads > 1:
        with one_blas_thread():
            jobs = [_executor(threads - 1).submit(work) for _ in range(threads - 1)]
            work()
            for job in jobs:
                job.result()
    elif fast:
        with one_blas_thread():
            work()
    else:
        work()
    if failed:
        raise failed[0]
    for k, kind in enumerate(kinds):
        items = [r[k] for r in results if r[k] is not None]
        if not items:
            continue
        if kind == "sum":
            total = items[0]
            for item in items[1:]:
                total = total + item
            outs[k] = total
        elif kind == "keep":
            outs[k] = Pieces(items)
        else:
            outs[k] = items[0] if len(items) == 1 else xp.concat(items, axis=0)
    return tuple(outs)


def _ranges(n: int, size: int, threads: int) -> list[tuple[int, int]]:
    """Consecutive ``(start, stop)`` ranges covering ``range(n)``, ``size`` images each, except
    that with several threads the first ``threads - 1`` are shorter (``size/threads``,
    ``2*size/threads``, ...; the last range takes what is left).

    The staggered start puts the threads out of step: running the same per-range code in step,
    they compete for the same resources at the same moments (memory bandwidth in the gathers
    and masks, the GIL between NumPy calls), while half a range apart one thread's memory-bound
    stages overlap the other's GEMMs. Measured on 2 cores: 4-5% faster training steps.
    """
    bounds = [0]
    for i in range(1, threads):
        step = max(1, size * i // threads)
        if bounds[-1] + step >= n:
            break
        bounds.append(bounds[-1] + step)
    bounds.extend(range(bounds[-1] + size, n, size))
    bounds.append(n)
    return list(itertools.pairwise(bounds))


class Pieces:
    """Batch-first arrays computed per image range by :func:`map_batch`, kept apart."""

    def __init__(self, parts: list[tuple[int, int, Any]]) -> None:
        self.parts = parts  # (start, stop, array of images start:stop)

    def part(self, start: int, stop: int) -> Any:
        """Images ``start:stop``: a view when they lie within one range, else a copy."""
        for a, b, array in self.parts:
            if a <= start and stop <= b:
                return array[start - a:stop - a, ...]
        pieces = [array[max(start, a) - a:min(stop, b) - a, ...]
                  for a, b, array in sorted(self.parts, key=lambda part: part[0])
                  if a < stop and start < b]
        if sum(p.shape[0] for p in pieces) != stop - start:
            raise ValueError(f"images {start}:{stop} were not all computed")
        return array_api_compat.array_namespace(pieces[0]).concat(pieces, axis=0)


def _empty_like_batch(part: Any, n: int) -> Any:
    return np.empty((n, *part.shape[1:]), dtype=part.dtype)


# --------------------------------------------------------------------------------------------
# Elementwise and gather kernels


def pad_hw(xp: Any, x: Any, pads: tuple[int, int, int, int], value: float) -> Any:
    """``xpx.pad`` of the H and W axes of NHWC ``x`` by (top, bottom, left, right), with
    ``value`` (NumPy: only the border is filled, without ``np.pad``'s ~70 us of overhead)."""
    top, bottom, left, right = pads
    if not enabled(xp):
        import array_api_extra as xpx

        return xpx.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=value)
    n, h, w, c = x.shape
    out = np.empty((n, h + top + bottom, w + left + right, c), dtype=x.dtype)
    out[:, :top] = value
    out[:, top + h:] = value
    out[:, top:top + h, :left] = value
    out[:, top:top + h, left + w:] = value
    out[:, top:top + h, left:left + w] = x
    return out


def update_rows(xp: Any, update: Callable[..., None], *arrays: Any) -> None:
    """Run ``update(*arrays)``, an in-place update of same-shaped arrays that treats every
    element alike (an optimizer step), on row shards of them in parallel when they are large
    (NumPy), else once on the whole arrays.

    Raises:
        BackendError: ``xp``'s arrays are immutable (JAX, dask): the update would do nothing.
    """
    require_in_place(xp, "fastpath.update_rows")
    shape = arrays[0].shape
    threads = _parallel(xp, math.prod(shape), shape[0] if shape else 1)
    if not threads:
        update(*arrays)
        return
    rows = [xp.reshape(a, (shape[0], -1)) for a in arrays]
    _run_shards(threads, shape[0], lambda a, b: update(*(r[a:b] for r in rows)))


def take_rows(xp: Any, x: Any, index: Any) -> Any:
    """``xp.take(x, index, axis=1)`` for ``x`` of shape (N, R, C) and a 1-D ``index``."""
    if not enabled(xp):
        return xp.take(x, index, axis=1)
    out = np.empty((x.shape[0], index.shape[0], x.shape[2]), dtype=x.dtype)
    # mode="clip": with mode="raise" (the default) NumPy buffers `out`, 3-4x slower; the
    # indices are built in range by construction
    return _split(xp, out, lambda a, b: np.take(x[a:b], index, 1, out[a:b], "clip"))


def sum_axis1(xp: Any, x: Any) -> Any:
    """``xp.sum(x, axis=1)`` for ``x`` of shape (N, K, ...)."""
    if not enabled(xp):
        return xp.sum(x, axis=1)
    out = np.empty((x.shape[0], *x.shape[2:]), dtype=x.dtype)
    return _split(xp, out, lambda a, b: np.sum(x[a:b], 1, None, out[a:b]))


def masked(xp: Any, mask: Any, x: Any) -> Any:
    """``xp.astype(mask, x.dtype) * x`` for a boolean ``mask`` broadcastable against ``x``
    along every axis but the first (both have the batch first)."""
    if not enabled(xp):
        return xp.astype(mask, x.dtype) * x
    out = np.empty(tuple(max(a, b) for a, b in zip(mask.shape, x.shape)), dtype=x.dtype)
    # bool * float multiplies without a cast pass
    return _split(xp, out, lambda a, b: np.multiply(mask[a:b], x[a:b], out=out[a:b]))


def bias_relu(xp: Any, x: Any, bias: Any) -> Any:
    """``xp.maximum(x + bias, 0.0)`` for ``x`` (N, ..., C) and ``bias`` (C,) or None."""
    if not enabled(xp):
        return xp.maximum(x if bias is None else x + bias, 0.0)
    out = np.empty(x.shape, dtype=x.dtype)

    def kernel(a: int, b: int) -> None:
        if bias is None:
            np.maximum(x[a:b], 0.0, out=out[a:b])
        else:
            np.add(x[a:b], bias, out=out[a:b])
            np.maximum(out[a:b], 0.0, out=out[a:b])

    return _split(xp, out, kernel)


def add(xp: Any, x: Any, y: Any) -> Any:
    """``x + y`` for same-shaped ``x`` and ``y`` (NumPy: large sums split over the threads)."""
    return add_relu(xp, x, y, relu=False)


def add_relu(xp: Any, x: Any, y: Any, relu: bool = True) -> Any:
    """``xp.maximum(x + y, 0.0)`` for same-shaped ``x`` and ``y`` (a residual sum and its ReLU;
    NumPy: one new array, the ReLU applied in place while its rows are in cache; without it
    when ``relu`` is False)."""
    if not enabled(xp) or x.shape != y.shape:
        return xp.maximum(x + y, 0.0) if relu else x + y
    out = np.empty(x.shape, dtype=np.result_type(x.dtype, y.dtype))
    rows = out.reshape(out.shape[0], -1) if out.ndim else out.reshape(1, 1)
    xr, yr = x.reshape(rows.shape), y.reshape(rows.shape)
    step = max(1, CHANNEL_CHUNK // max(rows.shape[1], 1))

    def kernel(a: int, b: int) -> None:
        for i in range(a, b, step):
            o = rows[i:min(i + step, b)]
            np.add(xr[i:i + o.shape[0]], yr[i:i + o.shape[0]], out=o)
            if relu:
                np.maximum(o, 0.0, out=o)

    _split(xp, rows, kernel)
    return out


def relu_grad(xp: Any, y: Any, dy: Any) -> Any:
    """``xp.astype(y > 0, dy.dtype) * dy``: the gradient through a ReLU whose output is ``y``."""
    if not enabled(xp):
        return xp.astype(y > 0, dy.dtype) * dy
    out = np.empty(dy.shape, dtype=dy.dtype)
    return _split(xp, out, lambda a, b: np.multiply(np.greater(y[a:b], 0), dy[a:b],
                                                    out=out[a:b]))


def window_max(xp: Any, entries: Any) -> tuple[Any, Any]:
    """Maximum over axis 1 of ``entries`` (N, K, ...) and the boolean mask of the *first* tap
    reaching it in each window (ties go to the lowest k, as in PyTorch): ``(y, mask)``."""
    n, k = entries.shape[0], entries.shape[1]
    if not enabled(xp):
        y = xp.max(entries, axis=1)
        taken = entries[:, 0, ...] == y
        firsts = [taken]
        for j in range(1, k):
            first = (entries[:, j, ...] == y) & ~taken
            taken = taken | first
            firsts.append(first)
        return y, xp.stack(firsts, axis=1)
    y = np.empty((n, *entries.shape[2:]), dtype=entries.dtype)
    mask = np.empty(entries.shape, dtype=bool)

    def kernel(a: int, b: int) -> None:
        e, top, m = entries[a:b], y[a:b], mask[a:b]
        if k == 1:
            np.copyto(top, e[:, 0])
        else:  # a chain of pairwise maxima is faster than np.max over axis 1 (measured)
            np.maximum(e[:, 0], e[:, 1], out=top)
            for j in range(2, k):
                np.maximum(top, e[:, j], out=top)
        np.equal(e[:, 0], top, out=m[:, 0])
        taken = m[:, 0].copy() if k > 2 else m[:, 0]
        for j in range(1, k):
            np.equal(e[:, j], top, out=m[:, j])
            np.greater(m[:, j], taken, out=m[:, j])  # bools: a > b is a & ~b
            if j < k - 1:
                np.logical_or(taken, m[:, j], out=taken)

    _split(xp, mask, kernel)
    return y, mask


# --------------------------------------------------------------------------------------------
# Per-channel passes (BatchNorm): rows (M, C) of channels-last data, in cache-sized chunks

#: elements of one chunk of a per-channel pass: the chunk and its temporaries stay in the L1/L2
#: caches, so a pass of several operations reads and writes main memory once
CHANNEL_CHUNK = 1 << 15


def _channel_rows(c: int) -> int:
    """Rows per chunk of a per-channel pass over (M, c) rows."""
    return max(1, CHANNEL_CHUNK // c)


@functools.lru_cache(maxsize=64)
def _ones_row(rows: int, dtype: str) -> np.ndarray:
    out = np.ones((1, rows), dtype=dtype)
    out.flags.writeable = False
    return out


def _tile(v: Any, rows: int) -> np.ndarray:
    """Per-channel ``v`` (C,) repeated for ``rows`` rows, flat: the operand of a flat chunk (a
    plain 1-D loop is faster than broadcasting over rows of a few channels, measured)."""
    return np.tile(np.asarray(v), rows)


def _over_row_chunks(xp: Any, rows: Any, chunk: Callable[[int, int], Any]) -> Any:
    """Run ``chunk(a, b)`` over cache-sized row ranges of ``rows`` (M, C), the ranges shared out
    between the threads in contiguous shards; the float64 sum of the results (or None).

    Chunks start at a shard's first row; the sums depend on the thread count (grouping),
    and are repeatable for a given one."""
    m, c = rows.shape
    r = _channel_rows(c)

    def shard(a0: int, b0: int) -> Any:
        total = None
        for a in range(a0, b0, r):
            part = chunk(a, min(a + r, b0))
            if part is not None:
                total = part.astype(np.float64) if total is None else total + part
        return total

    threads = _parallel(xp, m * c, m)
    parts = _run_shards(threads, m, shard) if threads else [shard(0, m)]
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def channel_sums(xp: Any, rows: Any) -> Any:
    """``xp.sum(rows, axis=0)`` for ``rows`` (M, C) (NumPy: GEMVs ``ones @ chunk`` summed in
    float64, ~7x faster than ``sum(axis=0)`` over 16 channels, measured)."""
    if not enabled(xp):
        return xp.sum(rows, axis=0)
    dtype = rows.dtype
    ones = _ones_row(_channel_rows(rows.shape[1]), dtype.name)
    total = _over_row_chunks(xp, rows, lambda a, b: ones[:, :b - a] @ rows[a:b])
    if total is None:  # no rows
        return np.zeros(rows.shape[1], dtype=dtype)
    return total.reshape(-1).astype(dtype)


def centre_rows(xp: Any, rows: Any, mean: Any) -> tuple[Any, Any]:
    """``(centred, sum of squares)``: ``centred = rows - mean`` and
    ``xp.sum(centred * centred, axis=0)`` for ``rows`` (M, C) and ``mean`` (C,)."""
    if not enabled(xp):
        centred = rows - mean
        return centred, xp.sum(centred * centred, axis=0)
    c = rows.shape[1]
    r = _channel_rows(c)
    dtype = rows.dtype
    ones = _ones_row(r, dtype.name)
    mean_t = _tile(mean, r)
    flat_in = rows.reshape(-1)
    centred = np.empty_like(rows)
    flat_out = centred.reshape(-1)

    def chunk(a: int, b: int) -> Any:
        k = (b - a) * c
        out = flat_out[a * c:a * c + k]
        np.subtract(flat_in[a * c:a * c + k], mean_t[:k], out=out)
        sq = np.multiply(out, out)
        return ones[:, :b - a] @ sq.reshape(b - a, c)

    total = _over_row_chunks(xp, rows, chunk)
    if total is None:  # no rows
        return centred, np.zeros(c, dtype=dtype)
    return centred, total.reshape(-1).astype(dtype)


def normalize_rows(xp: Any, centred: Any, inv_std: Any, gamma: Any, beta: Any,
                   relu: bool) -> tuple[Any, Any]:
    """``(xhat, y)``: ``xhat = centred * inv_std``, ``y = xhat * gamma + beta``, then
    ``xp.maximum(y, 0.0)`` when ``relu``; per-channel vectors (C,) against rows (M, C).
    NumPy: ``xhat`` is written over ``centred`` (which must be owned), one pass in chunks."""
    if not enabled(xp):
        xhat = centred * inv_std
        y = xhat * gamma + beta
        return xhat, (xp.maximum(y, 0.0) if relu else y)
    c = centred.shape[1]
    r = _channel_rows(c)
    inv_t, gamma_t, beta_t = _tile(inv_std, r), _tile(gamma, r), _tile(beta, r)
    y = np.empty_like(centred)
    flat_x, flat_y = centred.reshape(-1), y.reshape(-1)

    def chunk(a: int, b: int) -> None:
        k = (b - a) * c
        xh, out = flat_x[a * c:a * c + k], flat_y[a * c:a * c + k]
        np.multiply(xh, inv_t[:k], out=xh)
        np.multiply(xh, gamma_t[:k], out=out)
        np.add(out, beta_t[:k], out=out)
        if relu:
            np.maximum(out, 0.0, out=out)

    _over_row_chunks(xp, centred, chunk)
    return centred, y


def norm_grad_sums(xp: Any, dy: Any, xhat: Any, out: Any = None) -> tuple[Any, Any, Any]:
    """``(g, dbeta, dgamma)`` for rows (M, C): ``g = dy``, or the gradient through a ReLU whose
    output was ``out`` (:func:`relu_grad`); ``dbeta = xp.sum(g, axis=0)``,
    ``dgamma = xp.sum(g * xhat, axis=0)``. NumPy: one pass in chunks (``g`` is a new array
    when ``out`` is given, else ``dy`` itself)."""
    if not enabled(xp):
        g = dy if out is None else relu_grad(xp, out, dy)
        return g, xp.sum(g, axis=0), xp.sum(g * xhat, axis=0)
    c = dy.shape[1]
    r = _channel_rows(c)
    dtype = dy.dtype
    ones = _ones_row(r, dtype.name)
    g = dy if out is None else np.empty_like(dy)

    def chunk(a: int, b: int) -> Any:
        if out is not None:
            np.multiply(np.greater(out[a:b], 0), dy[a:b], out=g[a:b])
        gc = g[a:b]
        sums = np.empty((2, c), dtype=np.float64)
        sums[0] = ones[:, :b - a] @ gc
        sums[1] = ones[:, :b - a] @ np.multiply(gc, xhat[a:b])
        return sums

    total = _over_row_chunks(xp, dy, chunk)
    total = np.zeros((2, c), dtype=dtype) if total is None else total.astype(dtype)
    return g, total[0], total[1]


def norm_input_grad(xp: Any, g: Any, xhat: Any, scale: Any, dsum: Any, gsum: Any, count: int,
                    owned: bool = False) -> Any:
    """BatchNorm's input gradient ``(scale / count) * (count * g - dsum - xhat * gsum)`` for
    rows (M, C) and per-channel ``scale``, ``dsum``, ``gsum`` (C,). NumPy: one pass in chunks
    as ``g * scale - (xhat * (scale * gsum / count) + scale * dsum / count)`` (the same up to
    rounding), written over ``g`` when ``owned``."""
    if not enabled(xp):
        return (scale / count) * (count * g - dsum - xhat * gsum)
    c = g.shape[1]
    r = _channel_rows(c)
    k1 = _tile(scale, r)
    k2 = _tile(scale * dsum / count, r)
    k3 = _tile(scale * gsum / count, r)
    dx = g if owned else np.empty_like(g)
    flat_g, flat_x, flat_d = g.reshape(-1), xhat.reshape(-1), dx.reshape(-1)

    def chunk(a: int, b: int) -> None:
        k = (b - a) * c
        s = slice(a * c, a * c + k)
        t = np.multiply(flat_x[s], k3[:k])
        np.add(t, k2[:k], out=t)
        np.multiply(flat_g[s], k1[:k], out=flat_d[s])
        np.subtract(flat_d[s], t, out=flat_d[s])

    _over_row_chunks(xp, g, chunk)
    return dx
