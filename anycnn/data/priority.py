"""How a data worker process asks to be scheduled: a little below the training step, in short
time slices.

:func:`lower` runs once at a worker's start (:mod:`anycnn.data.workers`), with the loader's
``worker_nice``:

* ``os.nice(worker_nice)``: a little lower priority (a smaller share of a contended core), where
  the platform has ``os.nice``. Lowering one's own priority needs no privilege.
* Short time slices, on Linux 6.12 and later: ``sched_setattr`` with the policy and nice value
  unchanged and ``sched_runtime`` = :data:`SLICE_NS` (0.1 ms), the *custom slice* the kernel's
  EEVDF scheduler grants a normal task. By default a task runs up to its slice (0.75 ms or more,
  times ``1 + log2(CPUs)``) before a task that woke on its core may preempt it, so a training
  thread waking for its share of a parallel region could wait that long behind a worker while
  the region's other threads sit idle. With 0.1 ms slices the worker gives way within 0.1 ms;
  its share of the CPU is unchanged, so it never starves (unlike ``SCHED_IDLE`` or nice 19,
  which starved the workers when other programs kept the cores busy). The call takes the raw
  system call (Python has no wrapper): it is made on x86-64 and arm64 Linux only and is best
  effort, so an older kernel (which accepts and ignores the field, or refuses it) or a refusal
  changes nothing but the slice.

Neither changes what a worker computes, only when it runs. ``worker_nice=0`` leaves the
workers' scheduling exactly as the calling process's.
"""

from __future__ import annotations

import os
import platform
import sys

#: the time slice a data worker asks for (nanoseconds; the kernel takes 0.1 ms to 100 ms)
SLICE_NS = 100_000

#: ``sched_setattr``'s system call number by machine (the same on every Linux of that machine)
_SCHED_SETATTR = {"x86_64": 314, "amd64": 314, "aarch64": 274, "arm64": 274}


def lower(nice: int) -> None:
    """Add ``nice`` to this process's nice value and ask for short time slices (module
    docstring); nothing when ``nice`` is 0."""
    if not nice:
        return
    if hasattr(os, "nice"):
        os.nice(nice)
    short_slices(SLICE_NS)


def short_slices(slice_ns: int) -> bool:
    """Ask Linux for time slices of ``slice_ns`` nanoseconds for the calling thread, its policy
    (normal only) and nice value kept; True when the kernel accepted the request (a kernel
    before 6.12 accepts it and keeps its default slice)."""
    number = _SCHED_SETATTR.get(platform.machine().lower())
    if not sys.platform.startswith("linux") or number is None:
        return False
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            return False
        import ctypes

        class SchedAttr(ctypes.Structure):  # struct sched_attr, SCHED_ATTR_SIZE_VER0 (48 bytes)
            _fields_ = [("size", ctypes.c_uint32), ("policy", ctypes.c_uint32),
                        ("flags", ctypes.c_uint64), ("nice", ctypes.c_int32),
                        ("priority", ctypes.c_uint32), ("runtime", ctypes.c_uint64),
                        ("deadline", ctypes.c_uint64), ("period", ctypes.c_uint64)]

        attr = SchedAttr(ctypes.sizeof(SchedAttr), os.SCHED_OTHER, 0, os.nice(0), 0, slice_ns,
                         0, 0)
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(number, 0, ctypes.byref(attr), 0) == 0
    except (OSError, AttributeError, ValueError):
        return False
