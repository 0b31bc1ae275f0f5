"""Time JAX training steps eagerly and with the whole step compiled by jax.jit.

Shows: ANYCNN_BACKEND=jax through anycnn.use_backend, and Trainer(compile=True): forward, loss,
backward and optimizer update as one XLA program (compiled once per batch shape; the first call
is excluded from the timings). tests/test_compiled.py checks that both give the same weights.

Run:  python examples/jax_compile.py [--model lenet5] [--batch 64] [--steps 20] [--rounds 3]
Needs: pip install -r backends/jax.txt (skips with a message without JAX).
"""

import argparse
import importlib.util
import statistics
import time

import numpy as np

import anycnn
from anycnn.models import build_model
from anycnn.optim import SGD
from anycnn.train import Trainer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="lenet5", help="a preset without Dropout")
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
parser.add_argument("--rounds", type=int, default=3, help="alternating eager/compiled rounds")
args = parser.parse_args()
if importlib.util.find_spec("jax") is None:
    print("skipping: jax is not installed (pip install -r backends/jax.txt)")
    raise SystemExit(0)

with anycnn.use_backend("jax"):
    trainers = {}
    for name in ("eager", "compiled"):
        anycnn.manual_seed(0)  # the same initial weights for both
        model = build_model(args.model)
        trainers[name] = Trainer(model, SGD(model.parameters(), lr=0.01, momentum=0.9),
                                 compile=name == "compiled", progress=False)
    spec = model.model_spec
    rng = np.random.default_rng(0)
    shape = (args.batch, spec["image_size"], spec["image_size"], spec["in_channels"])
    data = [(anycnn.asarray(rng.random(shape), dtype="float32"),
             anycnn.asarray(rng.integers(0, 10, args.batch))) for _ in range(args.steps + 1)]
    medians: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.rounds):  # alternate, so both see the same machine load
        for name, trainer in trainers.items():
            times = []
            for x, y in data:
                start = time.perf_counter()
                trainer.train_step(x, y, False)[0].block_until_ready()  # JAX runs async
                times.append((time.perf_counter() - start) * 1e3)
            medians[name].append(statistics.median(times[1:]))
    eager, compiled = (statistics.median(medians[k]) for k in ("eager", "compiled"))
    rounds = {k: " / ".join(f"{t:.2f}" for t in v) for k, v in medians.items()}
    print(f"{args.model}, batch {args.batch}, float32: eager {eager:.2f} ms/step, compiled "
          f"{compiled:.2f} ms/step ({eager / compiled:.1f}x faster); per-round medians: "
          f"eager {rounds['eager']}, compiled {rounds['compiled']}")
