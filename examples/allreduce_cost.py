"""Raw cost of the data-parallel step's allreduce: the flat float32 gradient buffer of a model
(its parameters + the 4 trailer numbers), summed in place over the ranks through anycnn's MPI
communicator, as ``Trainer.parallel_step`` does, with nothing else running.

Each timed call starts right after a barrier, so it measures the collective, not waiting for a
slower rank. Prints, per model, the median over calls of the slowest rank's time and the
algorithm bandwidth (buffer bytes / time) and ring "bus" bandwidth (2(N-1)/N * bytes / time).

Run:  mpiexec -n 2 python examples/allreduce_cost.py [--models simple-cnn resnet20]
      [--calls 200] [--warmup 20]
      (without mpiexec it runs on one process, where the sum is a no-op: a smoke test)
"""

import argparse
import math
import statistics
import time

import numpy as np

from anycnn.dist import get_communicator
from anycnn.models import build_model

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--models", nargs="+", default=["simple-cnn", "resnet20"])
parser.add_argument("--calls", type=int, default=200)
parser.add_argument("--warmup", type=int, default=20)
args = parser.parse_args()
comm = get_communicator()  # MPI under mpiexec (which pins the ranks to cores)
n = comm.size
for name in args.models:
    params = sum(math.prod(p.shape) for p in build_model(name).parameters())
    buf = np.ones(params + 4, dtype=np.float32)
    times = []
    for _ in range(args.warmup + args.calls):
        comm.barrier()
        t0 = time.perf_counter()
        buf = comm.allreduce_(buf)
        times.append(time.perf_counter() - t0)
        buf[:] = 1.0
    slowest = [max(t) for t in zip(*comm.allgather_object(times[args.warmup:]))]
    if comm.rank == 0:
        ms = statistics.median(slowest) * 1e3
        nbytes = buf.nbytes
        print(f"{name}: {params:,} parameters, buffer {nbytes / 1e6:.2f} MB, {n} ranks: "
              f"allreduce median {ms:.3f} ms (min {min(slowest) * 1e3:.3f}, "
              f"max {max(slowest) * 1e3:.3f}) over {args.calls} calls; "
              f"{nbytes / ms / 1e6:.2f} GB/s algorithm, "
              f"{2 * (n - 1) / n * nbytes / ms / 1e6:.2f} GB/s bus", flush=True)
