"""The library's threads: batch-parallel regions over a small pool, and the BLAS kept on one
thread meanwhile (behind the shim; used by the NumPy kernels and by :func:`map_batch`).

- :func:`map_batch` runs a whole per-image computation (a convolution block) chunk by chunk:
  on NumPy each chunk small enough to stay in the CPU caches, the chunks shared between
  threads, with the BLAS limited to one thread per caller meanwhile (one core per thread, no
  oversubscription); on other namespaces the chunks run in order on the calling thread.
- :func:`one_blas_thread`, :func:`num_threads` and the shard helpers serve the NumPy kernels
  of :mod:`anycnn.kernels.fastpath`.

``ANYCNN_NUM_THREADS`` sets the thread count (default: the CPUs this process may use); 1 runs
everything on the calling thread. ``ANYCNN_FASTPATH=0`` turns the NumPy kernels off (every
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


def switched_on() -> bool:
    """Whether the NumPy kernels are on (``ANYCNN_FASTPATH``, read at first use)."""
    global ENABLED
    if ENABLED is None:
        ENABLED = os.environ.get("ANYCNN_FASTPATH", "1") != "0"
    return ENABLED


def enabled(xp: Any) -> bool:
    """True when the NumPy kernels apply to namespace ``xp``."""
    return switched_on() and array_api_compat.is_numpy_namespace(xp)


def takes(*arrays: Any) -> bool:
    """Whether a NumPy kernel computes a call on ``arrays``: the kernels are on and every
    array given (None: an absent operand) is a NumPy array."""
    return switched_on() and all(a is None or isinstance(a, np.ndarray) for a in arrays)


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
