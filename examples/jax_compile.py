"""Train on JAX eagerly and with the whole step compiled by jax.jit, and compare the two.

Shows: ANYCNN_BACKEND=jax through anycnn.use_backend, Trainer(compile=True) (forward, loss,
backward and optimizer update as one XLA program, retraced per batch shape), that compiled and
eager steps give the same weights (float64), and their step times side by side (medians).

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
parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
args = parser.parse_args()

if importlib.util.find_spec("jax") is None:
    print("skipping: jax is not installed (pip install -r backends/jax.txt)")
    raise SystemExit(0)


def make_trainer(compile: bool, dtype: str) -> Trainer:
    anycnn.manual_seed(0)  # the same initial weights for both
    model = build_model(args.model)
    model.to(dtype)
    return Trainer(model, SGD(model.parameters(), lr=0.01, momentum=0.9), compile=compile,
                   progress=False)


def batches(dtype: str, count: int, shape: tuple) -> list:
    rng = np.random.default_rng(0)
    return [(anycnn.asarray(rng.random((args.batch, *shape)), dtype=dtype),
             anycnn.asarray(rng.integers(0, 10, args.batch))) for _ in range(count)]


def timed_steps(trainer: Trainer, data: list) -> list[float]:
    times = []
    for x, y in data:
        start = time.perf_counter()
        loss, _ = trainer.train_step(x, y, False)
        loss.block_until_ready()  # JAX dispatches asynchronously
        times.append((time.perf_counter() - start) * 1e3)
    return times


with anycnn.use_backend("jax"):
    spec = build_model(args.model).model_spec
    shape = (spec["image_size"], spec["image_size"], spec["in_channels"])
    # 1. the same weights: 3 steps in float64, eager vs compiled
    check = batches("float64", 3, shape)
    weights = []
    for compile in (False, True):
        trainer = make_trainer(compile, "float64")
        timed_steps(trainer, check)
        weights.append([anycnn.to_numpy(p.data) for p in trainer.optimizer.params])
    diff = max(float(np.abs(a - b).max()) for a, b in zip(*weights))
    print(f"{args.model}: compiled vs eager weights after 3 float64 steps: max |diff| {diff:.1e}")

    # 2. step times: alternating rounds, first call (compilation) excluded
    data = batches(args.dtype, args.steps + 1, shape)
    trainers = {"eager": make_trainer(False, args.dtype),
                "compiled": make_trainer(True, args.dtype)}
    medians: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            medians[name].append(statistics.median(timed_steps(trainer, data)[1:]))
    eager, compiled = (statistics.median(medians[k]) for k in ("eager", "compiled"))
    print(f"{args.model}, batch {args.batch}, {args.dtype}: eager {eager:.2f} ms/step, compiled "
          f"{compiled:.2f} ms/step ({eager / compiled:.1f}x faster); per-round medians: eager "
          + " / ".join(f"{t:.2f}" for t in medians["eager"]) + ", compiled "
          + " / ".join(f"{t:.2f}" for t in medians["compiled"]))
