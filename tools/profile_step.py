"""Where a training step's serial Python goes: the main thread's CPU time outside the compiled
kernels, per phase of ``anycnn bench``'s step (zero_grad, forward, loss, backward, optimizer).

    PYTHONPATH=. python3 tools/profile_step.py --model resnet20 --batch 32 --threads 2

Each compiled pipeline call (``halide_call.Calls``) is timed with ``time.thread_time``: the
main thread's CPU time less that spent inside kernel calls is the Python (and small NumPy
work) between them. Thread CPU time, unlike wall time, hardly moves when other processes
share the machine, so two checkouts can be compared on a busy one (run them alternately).
``--calls`` also counts Python function calls per step (cProfile; deterministic).
``--eval`` profiles an inference instead: the model in eval mode, ``forward`` under
``no_grad`` (as ``predict`` runs it), one phase.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from anycnn.cli.bench import THREAD_VARS  # loads no NumPy: set them first


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--calls", action="store_true", help="count Python calls per step too")
    p.add_argument("--eval", action="store_true", help="an eval-mode forward under no_grad")
    args = p.parse_args()
    for var in THREAD_VARS:
        os.environ[var] = str(args.threads)
    import numpy  # noqa: F401 - as a user's script: NumPy first

    from anycnn.cli.bench import TrainingStep
    from anycnn.kernels import halide_call

    inside = [0.0, 0]  # thread CPU seconds in kernel calls, calls
    clock = time.thread_time
    call = halide_call.Calls.__call__

    def timed_call(self, arrays, scalars):
        start = clock()
        try:
            return call(self, arrays, scalars)
        finally:
            inside[0] += clock() - start
            inside[1] += 1

    halide_call.Calls.__call__ = timed_call
    bench = TrainingStep({"kind": "anycnn", "model": args.model, "batch": args.batch,
                          "dtype": "float32"})
    phases: dict[str, list[tuple[float, int]]] = {}

    def phase(name, fn):
        inside[0], inside[1] = 0.0, 0
        start = clock()
        out = fn()
        phases.setdefault(name, []).append(((clock() - start - inside[0]) * 1e3, inside[1]))
        return out

    def step():
        m = bench.model
        phase("zero_grad", m.zero_grad)
        y = phase("forward", lambda: m.forward(bench.x))
        phase("loss", lambda: bench.loss.forward(y, bench.y))
        dy = phase("loss backward", bench.loss.backward)
        phase("backward", lambda: m.backward(dy, input_grad=False))
        phase("optimizer", bench.opt.step)

    if args.eval:
        import anycnn

        bench.model.eval()

        def step():
            with anycnn.no_grad():
                phase("eval forward", lambda: bench.model.forward(bench.x))

    for _ in range(3):
        step()
    phases.clear()
    for _ in range(args.steps):
        step()
    table = {name: {"python_ms": round(statistics.median(v[0] for v in runs), 3),
                    "kernel_calls": runs[-1][1]} for name, runs in phases.items()}
    table["total"] = {"python_ms": round(sum(v["python_ms"] for v in table.values()), 3),
                      "kernel_calls": sum(v["kernel_calls"] for v in table.values())}
    if args.calls:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.enable()
        for _ in range(5):
            step()
        profile.disable()
        table["total"]["python_calls"] = pstats.Stats(profile).total_calls // 5
    json.dump(table, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
