"""The compiled kernels' parallel loops on an OpenMP runtime's threads (torch's), not Halide's.

Halide's runtime runs a kernel's parallel loop on its own thread pool. In a process where
another library runs its operators on an OpenMP team (torch on a CPU: ATen's parallel backend
is OpenMP), the two pools take turns on the same cores: after each of its operators OpenMP's
threads spin waiting for more work while Halide's wake up for theirs, and the reverse. Measured
on an AMD EPYC (2 cores), a 3x3 convolution kernel called right after torch's operators took
1.1-1.9 ms against 0.45 ms alone; torch's operators slowed as well. Handing Halide's loops to
the OpenMP runtime torch already runs (:func:`share_threads`) puts both on one team of threads:
the kernel then took 0.55-1.0 ms there, and resnet20's torch-backend training step through the
compiled kernels 0.77x its time on torch's own operators (`tools/torch_native_ab.py`).

:data:`SOURCE` is the loop body handed to ``GOMP_parallel``: each of the team's threads takes
the loop's iterations one at a time from a shared counter (Halide's own pool hands them out the
same way) and the first failure's code is returned. It is compiled with the kernels' C compiler
into the kernel cache (:func:`~anycnn.kernels.kernel_cache.kept_library`), not linked to any
OpenMP library: the address of the process's ``GOMP_parallel`` is handed to it at run time, so
it joins whichever team the process has (libgomp's, or LLVM's and Intel's runtimes, which export
the same entry). The team is the OpenMP runtime's current one (``torch.set_num_threads``
sizes it), or ``ANYCNN_NUM_THREADS`` threads where that is set. Where kernels are compiled in
memory (no C compiler, ``ANYCNN_KERNEL_CACHE=0``) nothing is handed over and
:func:`share_threads` says so. A child forked after the hand-over runs its kernels on Halide's
own pool again (GNU OpenMP's threads do not survive a fork).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import threading
from pathlib import Path

from . import kernel_cache

__all__ = ["SOURCE", "share_threads", "shared"]

#: Halide's ``halide_do_par_for`` on ``GOMP_parallel`` (C; ``anycnn_use`` sets its address and
#: the threads a loop asks for)
SOURCE = r"""
#include <stdint.h>

typedef int (*halide_task)(void *user_context, int index, uint8_t *closure);
typedef void (*gomp_parallel_fn)(void (*body)(void *), void *data, unsigned threads,
                                 unsigned flags);

static gomp_parallel_fn gomp_parallel;
static unsigned team; /* threads a loop asks for; 0: the OpenMP runtime's current team */

struct loop {
    void *user_context;
    halide_task task;
    int min, extent;
    uint8_t *closure;
    int next;   /* the next iteration to take, shared by the team */
    int failed; /* the first nonzero code a task returned */
};

static void take_iterations(void *data) {
    struct loop *loop = data;
    for (;;) {
        int i = __atomic_fetch_add(&loop->next, 1, __ATOMIC_RELAXED);
        if (i >= loop->extent || __atomic_load_n(&loop->failed, __ATOMIC_RELAXED)) {
            return;
        }
        int code = loop->task(loop->user_context, loop->min + i, loop->closure);
        if (code) {
            int none = 0;
            __atomic_compare_exchange_n(&loop->failed, &none, code, 0, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED);
        }
    }
}

int anycnn_do_par_for(void *user_context, halide_task task, int min, int extent,
                      uint8_t *closure) {
    struct loop loop = {user_context, task, min, extent, closure, 0, 0};
    if (extent > 1) {
        gomp_parallel(take_iterations, &loop, team, 0);
    } else {
        take_iterations(&loop);
    }
    return loop.failed;
}

void anycnn_use(void *parallel, int threads) {
    gomp_parallel = (gomp_parallel_fn)parallel;
    team = threads > 0 ? (unsigned)threads : 0;
}
"""

_lock = threading.Lock()
_shared: str | None = None  # the OpenMP library handed Halide's loops, once handed
_forked = False  # this process is a fork of one that handed them over
_bridge: list[ctypes.CDLL] = []  # the bridge's library, once loaded (kept while Halide calls it)


def shared() -> str | None:
    """How this process's compiled kernels run their parallel loops, once
    :func:`share_threads` has handed them over (None before)."""
    return _shared


def _make(folder: Path) -> None:
    source = folder / "openmp_tasks.c"
    source.write_text(SOURCE)
    try:
        subprocess.run([kernel_cache._compiler(), "-O2", "-fPIC", "-c", str(source), "-o",
                        str(folder / "openmp_tasks.o")], check=True, capture_output=True,
                       text=True)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"compiling the OpenMP bridge failed: {e.stderr.strip()}") from e


def share_threads(library: str = "torch") -> bool:
    """Run every compiled kernel's parallel loops on the team of this process's OpenMP runtime
    (its ``GOMP_parallel``, as ``library`` loaded it) from now on; True once done (also when
    done before), False where it cannot be: kernels compiled in memory, no ``GOMP_parallel``
    in the process, or the bridge could not be built (the kernels keep Halide's pool)."""
    global _shared
    with _lock:
        if _shared is not None:
            return True
        if _forked:
            return False
        runtime = kernel_cache.runtime()
        if runtime is None:
            return False
        try:
            parallel = ctypes.cast(ctypes.CDLL(None).GOMP_parallel, ctypes.c_void_p)
        except AttributeError:
            return False
        digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
        try:
            path = kernel_cache.kept_library(kernel_cache.cache_dir(),
                                             f"openmp-tasks-{digest}", _make)
            bridge = ctypes.CDLL(str(path))
        except (OSError, RuntimeError):
            return False
        threads = int(os.environ.get("ANYCNN_NUM_THREADS") or 0)  # else torch's own count
        bridge.anycnn_use(parallel, ctypes.c_int(max(0, threads)))
        _run_loops_with(runtime, bridge.anycnn_do_par_for)
        _bridge.append(bridge)
        _shared = f"{library}'s OpenMP threads"
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_halides_pool_in_child)
        return True


def _halides_pool_in_child() -> None:
    """In a forked child, give the loops back to Halide's own pool: GNU OpenMP's team does not
    survive a fork (a child's next parallel region waits forever, as torch's own operators do
    there), Halide's pool starts afresh. The child never hands them over again."""
    global _shared, _forked
    runtime = kernel_cache.runtime()
    if runtime is not None:
        _run_loops_with(runtime, runtime.halide_default_do_par_for)
    _shared, _forked = None, True


def _run_loops_with(runtime: ctypes.CDLL, do_par_for: ctypes._CFuncPtr) -> None:
    """Make ``do_par_for`` (a C function of the bridge or of Halide's runtime) the function
    Halide's ``runtime`` runs every kernel's parallel loops with."""
    runtime.halide_set_custom_do_par_for(ctypes.cast(do_par_for, ctypes.c_void_p))

