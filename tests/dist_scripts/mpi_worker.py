"""Run under ``mpiexec`` by tests/test_dist_comm.py (never by pytest itself).

``python mpi_worker.py MODE FOLDER``; each rank appends JSON lines ``{"rank": ..., ...}`` to
``FOLDER/rank-R.json`` (lines printed by two ranks to the shared stdout can interleave).

Modes:
    collectives: allreduce/broadcast of numpy, torch and array-api-strict buffers, object
        collectives, node-local ranks; each rank checks its own results.
    raise: abort hook installed; rank 1 raises while rank 0 waits in an allreduce.
    kill: rank 1 kills itself with SIGKILL while rank 0 waits in an allreduce.
    bind: bind_to_cores, then the affinity and anycnn's thread count.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time

import numpy as np

from anycnn.dist import bind_to_cores, get_communicator, install_abort_hook
from anycnn.errors import ShapeError
from anycnn.kernels import threads as kthreads


def emit(comm, **fields):
    path = os.path.join(sys.argv[2], f"rank-{comm.rank}.json")
    with open(path, "a") as f:
        f.write(json.dumps({"rank": comm.rank, "size": comm.size, **fields}) + "\n")


def values(rank, n, dtype):
    """Rank-dependent values whose sum over ranks is not exact in floating point order."""
    base = np.arange(n, dtype=dtype) / dtype(7)
    return (base * (rank + 1) + dtype(0.1) * rank).astype(dtype)


def collectives(comm):
    out = {"name": comm.name, "local_rank": comm.local_rank, "local_size": comm.local_size}
    digests = []
    for dtype in (np.float32, np.float64):
        buf = values(comm.rank, 1001, dtype)
        result = comm.allreduce_(buf)
        expected = values(0, 1001, dtype)
        for r in range(1, comm.size):  # the same order as MPI's reduction is not promised:
            expected = expected + values(r, 1001, dtype)  # compare with a tolerance here,
        out[f"numpy_{np.dtype(dtype).name}_inplace"] = result is buf
        out[f"numpy_{np.dtype(dtype).name}_close"] = bool(np.allclose(result, expected))
        digests.append(hashlib.sha256(result.tobytes()).hexdigest())  # ...and exactly here
    big = comm.allreduce_(values(comm.rank, 300_001, np.float32))  # MPI's large-message path
    digests.append(hashlib.sha256(big.tobytes()).hexdigest())
    refused = []
    for bad in (np.zeros((2, 3)), np.zeros(8)[::2], np.zeros(3, dtype=np.int64)):
        try:
            comm.allreduce_(bad)
        except ShapeError as exc:
            refused.append(str(exc))
    readonly = np.zeros(3)
    readonly.flags.writeable = False
    try:
        comm.broadcast_(readonly)
    except ShapeError as exc:
        refused.append(str(exc))
    out["refused"] = refused
    exact = comm.allreduce_(np.full(64, comm.rank + 1.0, dtype=np.float32))
    out["small_ints_exact"] = bool(np.all(exact == comm.size * (comm.size + 1) / 2))

    import torch

    t = torch.full((5,), float(comm.rank + 1), dtype=torch.float32)
    tr = comm.allreduce_(t)
    out["torch_type"] = type(tr).__module__ + "." + type(tr).__name__
    out["torch_inplace"] = tr is t
    out["torch_values"] = tr.tolist()

    import array_api_strict as xps

    s = xps.asarray(np.full(3, comm.rank + 1.0), dtype=xps.float64)
    sr = comm.allreduce_(s)
    out["strict_type"] = type(sr).__module__.split(".")[0]
    out["strict_device_same"] = sr.device == s.device
    out["strict_values"] = np.asarray(sr).tolist()

    root = comm.size - 1
    b = np.full(4, float(comm.rank), dtype=np.float64)
    out["bcast"] = comm.broadcast_(b, root=root).tolist()
    bt = comm.broadcast_(torch.full((2,), float(comm.rank), dtype=torch.float64), root=root)
    out["bcast_torch"] = bt.tolist()
    out["gather"] = comm.allgather_object({"r": comm.rank})
    out["bobj"] = comm.broadcast_object(f"from {comm.rank}" if comm.rank == root else None,
                                        root=root)
    comm.barrier()
    out["digests"] = digests
    emit(comm, **out)


def fail(comm, how):
    install_abort_hook(comm)
    if comm.rank == 1:
        time.sleep(0.2)  # let rank 0 enter the allreduce
        if how == "raise":
            raise ValueError("boom on purpose")
        os.kill(os.getpid(), signal.SIGKILL)
    emit(comm, state="waiting")
    comm.allreduce_(np.zeros(8))
    emit(comm, state="not reached")


def bind(comm):
    chosen = bind_to_cores(comm)
    emit(comm, local_rank=comm.local_rank, chosen=chosen,
         affinity=sorted(os.sched_getaffinity(0)), threads=kthreads.num_threads())


def main():
    mode = sys.argv[1]
    comm = get_communicator()
    if mode == "collectives":
        collectives(comm)
    elif mode in ("raise", "kill"):
        fail(comm, mode)
    elif mode == "bind":
        bind(comm)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
