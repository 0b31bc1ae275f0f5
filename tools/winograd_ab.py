"""The Winograd kernels against the direct ones, alternated in one process (NumPy backend).

``ANYCNN_WINOGRAD`` is read at each call (``anycnn/kernels/native_winograd.py``), so one process
can alternate the two kernels block by block: both see the same memory, the same warm caches
and the same noise of a shared machine, and the medians compare like with like.

    PYTHONPATH=. python3 tools/winograd_ab.py model resnet20 --batch 32 --mode train
    PYTHONPATH=. python3 tools/winograd_ab.py model simple-cnn --batch 1 --mode eval
    PYTHONPATH=. python3 tools/winograd_ab.py layers --batch 64 --threads 1

``model``: a preset's training step (the bench's ``TrainingStep``) or eval-mode forward under
``no_grad``; rounds of 8 timed calls (after 2 untimed) per kernel, the order swapped each round.
``layers``: resnet20's 3x3 layers (16 channels at 32x32, 32 at 16x16, 64 at 8x8), each the eval
epilogue (with a residual addend and ReLU) and the weight gradient, same alternation. Prints
medians (ms) and the Winograd / direct ratio. ``--threads`` sets the kernels' threads (default:
the usable CPUs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from anycnn.cli.bench import THREAD_VARS  # loads no NumPy: set them first


def _winograd(key: str) -> None:
    os.environ["ANYCNN_WINOGRAD"] = key


def alternate(calls: dict, rounds: int, per_round: int = 8, switch=_winograd) -> dict:
    """Median seconds of each of ``calls`` ({"1": fn, "0": fn}: ANYCNN_WINOGRAD values, or
    whatever ``switch(key)`` sets before a key's round), alternated round by round."""
    times = {key: [] for key in calls}
    for r in range(rounds):
        for key in sorted(calls, reverse=r % 2 == 0):
            switch(key)
            for _ in range(2):
                calls[key]()
            for _ in range(per_round):
                start = time.perf_counter()
                calls[key]()
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def _report(label: str, medians: dict) -> None:
    w, d = medians["1"] * 1e3, medians["0"] * 1e3
    print(f"{label}: winograd {w:.3f} ms, direct {d:.3f} ms, ratio {w / d:.3f}")


def model_call(name: str, batch: int, mode: str):
    """A function running one training step (``mode="train"``, the bench's ``TrainingStep``)
    or one eval-mode forward under ``no_grad`` of preset ``name`` on the current backend."""
    import anycnn
    from anycnn.cli.bench import TrainingStep, _model_and_batch

    cfg = {"model": name, "batch": batch, "dtype": "float32", "seed": 0}
    if mode == "train":
        bench = TrainingStep(cfg)

        def call():
            bench.step(False)
            bench.sync()
        return call
    model, images, _ = _model_and_batch(cfg)
    model.eval()
    x = anycnn.asarray(images)

    def call():
        with anycnn.no_grad():
            model.forward(x)
    return call


def _model(args) -> None:
    call = model_call(args.name, args.batch, args.mode)
    _report(f"{args.name} batch {args.batch} {args.mode}",
            alternate({"1": call, "0": call}, args.rounds))


def _layers(args) -> None:
    import numpy as np

    from anycnn.kernels import native

    rng = np.random.default_rng(0)
    same = (1, 1, 1, 1)
    for c, hw in ((16, 32), (32, 16), (64, 8)):
        x = rng.standard_normal((args.batch, hw, hw, c)).astype(np.float32)
        w = (rng.standard_normal((3, 3, c, c)) / np.sqrt(9 * c)).astype(np.float32)
        b = rng.standard_normal(c).astype(np.float32)
        extra = rng.standard_normal((args.batch, hw, hw, c)).astype(np.float32)

        def forward(x=x, w=w, b=b, extra=extra, hw=hw):
            native.conv2d_epilogue(x, w, b, 1, same, (hw, hw), extra, True)

        def weight_grad(x=x, extra=extra):
            native.conv2d_weight_grad(x, extra, (3, 3), 1, same)

        label = f"{c} -> {c} channels at {hw}x{hw}, batch {args.batch}"
        _report(f"{label}, forward + addend + ReLU",
                alternate({"1": forward, "0": forward}, args.rounds))
        _report(f"{label}, weight gradient",
                alternate({"1": weight_grad, "0": weight_grad}, args.rounds))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["model", "layers"])
    p.add_argument("name", nargs="?", default="resnet20", help="the preset (model)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--mode", choices=["train", "eval"], default="train")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=0, help="0: the usable CPUs")
    args = p.parse_args()
    if args.threads:
        for var in THREAD_VARS:
            os.environ[var] = str(args.threads)
    (_model if args.what == "model" else _layers)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
