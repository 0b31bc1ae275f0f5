"""Measured native fast paths behind the shim (the array-api-extra way).

Each function here has the same result as its portable Array API expression (given in its
docstring, and used for every other backend); on NumPy, large calls are split along the batch
axis over a small thread pool, because NumPy runs ``take`` and reductions on one core while
releasing the GIL. Tests check each fast path against the portable expression.

``ANYCNN_NUM_THREADS`` sets the pool size (default: the CPUs this process may use); 1 turns the
fast paths off.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import array_api_compat

#: below this many output elements the portable path is used (thread hand-off costs ~20 us)
MIN_PARALLEL_SIZE = 1 << 18

_pool: tuple[int, ThreadPoolExecutor] | None = None  # (size, pool), made at first use


def num_threads() -> int:
    env = os.environ.get("ANYCNN_NUM_THREADS")
    if env:
        return max(1, int(env))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool[0] != threads:
        _pool = (threads, ThreadPoolExecutor(threads, thread_name_prefix="anycnn"))
    return _pool[1]


def _shards(n: int, threads: int) -> list[tuple[int, int]]:
    step = -(-n // threads)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _parallel(xp: Any, out_size: int, batch: int) -> int:
    """Number of threads to use for a call, or 0 for the portable path."""
    if batch < 2 or out_size < MIN_PARALLEL_SIZE or not array_api_compat.is_numpy_namespace(xp):
        return 0
    threads = min(num_threads(), batch)
    return threads if threads > 1 else 0


def _run_shards(threads: int, n: int, work) -> None:
    """Run ``work(start, stop)`` over ``threads`` batch shards of ``range(n)`` and wait.

    The calling thread takes the first shard itself (one hand-off fewer per call)."""
    (a0, b0), *rest = _shards(n, threads)
    jobs = [_executor(threads - 1).submit(work, a, b) for a, b in rest]
    work(a0, b0)
    for job in jobs:
        job.result()


def take_rows(xp: Any, x: Any, index: Any) -> Any:
    """``xp.take(x, index, axis=1)`` for ``x`` of shape (N, R, C) and a 1-D ``index``."""
    n, _, c = x.shape
    threads = _parallel(xp, n * index.shape[0] * c, n)
    if not threads:
        return xp.take(x, index, axis=1)
    import numpy as np

    out = np.empty((n, index.shape[0], c), dtype=x.dtype)
    # mode="clip": with mode="raise" (the default) NumPy buffers `out`, 3-4x slower; the
    # indices are built in range by construction
    _run_shards(threads, n, lambda a, b: np.take(x[a:b], index, 1, out[a:b], "clip"))
    return out


def sum_axis1(xp: Any, x: Any) -> Any:
    """``xp.sum(x, axis=1)`` for ``x`` of shape (N, K, ...)."""
    n = x.shape[0]
    threads = _parallel(xp, math.prod(x.shape), n)
    if not threads:
        return xp.sum(x, axis=1)
    import numpy as np

    out = np.empty((n, *x.shape[2:]), dtype=x.dtype)
    _run_shards(threads, n, lambda a, b: np.sum(x[a:b], 1, None, out[a:b]))
    return out


def masked(xp: Any, mask: Any, x: Any) -> Any:
    """``xp.astype(mask, x.dtype) * x`` for a boolean ``mask`` broadcastable against ``x``
    along every axis but the first (both have the batch first)."""
    shape = tuple(max(a, b) for a, b in zip(mask.shape, x.shape))
    threads = _parallel(xp, math.prod(shape), shape[0])
    if not threads:
        return xp.astype(mask, x.dtype) * x
    import numpy as np

    out = np.empty(shape, dtype=x.dtype)  # bool * float multiplies without a cast pass
    _run_shards(threads, shape[0], lambda a, b: np.multiply(mask[a:b], x[a:b], out=out[a:b]))
    return out


def bias_relu(xp: Any, x: Any, bias: Any) -> Any:
    """``xp.maximum(x + bias, 0.0)`` for ``x`` (N, ..., C) and ``bias`` (C,) or None."""
    threads = _parallel(xp, math.prod(x.shape), x.shape[0])
    if not threads:
        return xp.maximum(x if bias is None else x + bias, 0.0)
    import numpy as np

    out = np.empty(x.shape, dtype=x.dtype)

    def work(a: int, b: int) -> None:
        if bias is None:
            np.maximum(x[a:b], 0.0, out=out[a:b])
        else:
            np.add(x[a:b], bias, out=out[a:b])
            np.maximum(out[a:b], 0.0, out=out[a:b])

    _run_shards(threads, x.shape[0], work)
    return out


def relu_grad(xp: Any, y: Any, dy: Any) -> Any:
    """``xp.astype(y > 0, dy.dtype) * dy``: the gradient through a ReLU whose output is ``y``."""
    threads = _parallel(xp, math.prod(dy.shape), dy.shape[0])
    if not threads:
        return masked(xp, y > 0, dy)
    import numpy as np

    out = np.empty(dy.shape, dtype=dy.dtype)
    _run_shards(threads, dy.shape[0],
                lambda a, b: np.multiply(np.greater(y[a:b], 0), dy[a:b], out=out[a:b]))
    return out


def window_max(xp: Any, entries: Any) -> tuple[Any, Any]:
    """Maximum over axis 1 of ``entries`` (N, K, ...) and the boolean mask of the *first* tap
    reaching it in each window (ties go to the lowest k, as in PyTorch): ``(y, mask)``."""
    n, k = entries.shape[0], entries.shape[1]
    threads = _parallel(xp, math.prod(entries.shape), n)
    if not threads:
        y = xp.max(entries, axis=1)
        taken = entries[:, 0, ...] == y
        firsts = [taken]
        for j in range(1, k):
            first = (entries[:, j, ...] == y) & ~taken
            taken = taken | first
            firsts.append(first)
        return y, xp.stack(firsts, axis=1)
    import numpy as np

    y = np.empty((n, *entries.shape[2:]), dtype=entries.dtype)
    mask = np.empty(entries.shape, dtype=bool)

    def work(a: int, b: int) -> None:
        e, top, m = entries[a:b], y[a:b], mask[a:b]
        np.max(e, axis=1, out=top)
        np.equal(e[:, 0], top, out=m[:, 0])
        taken = m[:, 0].copy()
        for j in range(1, k):
            np.equal(e[:, j], top, out=m[:, j])
            m[:, j] &= ~taken
            taken |= m[:, j]

    _run_shards(threads, n, work)
    return y, mask
