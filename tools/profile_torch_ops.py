"""Where a torch-backend training step's time goes: each torch operator that
``anycnn.kernels.torch_ops`` calls, timed by wall clock per step, beside the step itself.

    PYTHONPATH=. taskset -c 1 python3 tools/profile_torch_ops.py --model simple-cnn --threads 1

Every ``torch.ops.aten`` call the kernels make is wrapped with a timer, keyed by operator and
first operand's shape (NCHW views of anycnn's NHWC tensors); the table is the median per step
over ``--steps`` steps, then the step's median and what the operators leave (the Python around
them, the Dense layers' matmuls, the loss and the optimizer, which run as plain tensor calls).

Why not ``torch.profiler``: under it the step's large temporaries come from fresh pages again
(measured: ~3400 page faults per simple-cnn step profiled, 0-20 without), so the operators that
first write a large new buffer (max-pool backward's ``fill_``, the first convolution's output)
show 1-3 ms of page faults that a plain step does not pay.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

from anycnn.cli.bench import THREAD_VARS  # loads no NumPy: set them first


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="simple-cnn")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    for var in THREAD_VARS:
        os.environ[var] = str(args.threads)
    os.environ["ANYCNN_BACKEND"] = "torch"
    import numpy  # noqa: F401 - as a user's script: NumPy first
    import torch

    from anycnn.cli.bench import TrainingStep
    from anycnn.kernels import torch_ops

    aten = torch.ops.aten
    spent: dict[tuple, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()

    class Timed:
        """``torch.ops.aten`` with each operator call timed."""

        def __getattr__(self, name):
            op = getattr(aten, name)

            def timed(*a, **kw):
                start = time.perf_counter()
                out = op(*a, **kw)
                key = (name, tuple(getattr(a[0], "shape", ())))
                spent[key] += time.perf_counter() - start
                calls[key] += 1
                return out

            return timed

    bench = TrainingStep({"kind": "anycnn", "model": args.model, "batch": args.batch,
                          "dtype": "float32"})
    for _ in range(3):
        bench.step()
    torch_ops._aten = Timed
    per_step: dict[tuple, list[float]] = collections.defaultdict(list)
    steps = []
    for _ in range(args.steps):
        spent.clear()
        start = time.perf_counter()
        bench.step()
        steps.append((time.perf_counter() - start) * 1e3)
        for key, seconds in spent.items():
            per_step[key].append(seconds * 1e3)
    rows = sorted(((statistics.median(v), k) for k, v in per_step.items()), reverse=True)
    for ms, (name, shape) in rows:
        print(f"{ms:8.3f} ms  x{calls[(name, shape)] // args.steps}  {name} {list(shape)}")
    in_ops = sum(ms for ms, _ in rows)
    step = statistics.median(steps)
    print(f"step {step:.2f} ms (median of {args.steps}, {args.threads} thread(s)); torch_ops' "
          f"operators {in_ops:.2f} ms; the rest {step - in_ops:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
