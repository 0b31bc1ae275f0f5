"""Where a new process's first training step spends its extra time: its first-touch page faults
(the forward's and the backward's), and the step again with that memory touched beforehand.

    PYTHONPATH=. python3 tools/first_step_memory.py --model resnet20 --batch 32
    PYTHONPATH=. python3 tools/first_step_memory.py --model resnet20 --batch 32 --pretouch 120

Run it with the kernels cached and the ``.pyc`` files written (``python3 -m compileall -q
anycnn``; an environment with ``PYTHONDONTWRITEBYTECODE=1`` makes every new process compile
the kernel modules' source inside its first step). ``--pretouch MIB`` writes and frees that many
MiB of heap before the step (glibc keeps it: ``ANYCNN_TUNE_MALLOC`` raises the trim threshold),
so the step's buffers find their pages mapped: a measurement of the faults' share, not a fix
(the pages are paid for before the step instead). Prints the first step's and the median warm
step's milliseconds and minor faults, and the fresh memory the forward and backward touched.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import statistics
import sys
import time

from anycnn.cli.bench_first_step import minor_faults as _faults


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="warm steps after the first")
    p.add_argument("--pretouch", type=int, default=0, metavar="MIB")
    args = p.parse_args()
    from anycnn.cli.bench import TrainingStep

    bench = TrainingStep({"model": args.model, "batch": args.batch, "dtype": "float32",
                          "gpu": False})
    if args.pretouch:
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        size = args.pretouch << 20
        block = libc.malloc(ctypes.c_size_t(size))
        ctypes.memset(block, 1, size)
        libc.free(ctypes.c_void_p(block))
    model, loss = bench.model, bench.loss
    start, f0 = time.perf_counter(), _faults()
    model.zero_grad()
    loss.forward(model.forward(bench.x), bench.y)
    f1 = _faults()
    model.backward(loss.backward(), input_grad=False)
    bench.opt.step()
    bench.sync()
    first, f2 = (time.perf_counter() - start) * 1e3, _faults()
    warm, warm_faults = [], []
    for _ in range(args.steps):
        t, f = time.perf_counter(), _faults()
        bench.step()
        bench.sync()
        warm.append((time.perf_counter() - t) * 1e3)
        warm_faults.append(_faults() - f)
    page = resource.getpagesize() / 2**20
    w = statistics.median(warm)
    print(f"{args.model} batch {args.batch}, pretouch {args.pretouch} MiB: first step "
          f"{first:.1f} ms ({f2 - f0} faults: forward {(f1 - f0) * page:.1f} MiB, backward "
          f"{(f2 - f1) * page:.1f} MiB), warm step {w:.1f} ms ({statistics.median(warm_faults):.0f}"
          f" faults), first / warm {first / w:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
