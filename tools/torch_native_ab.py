"""The torch backend's CPU tensors on the compiled kernels against torch's operators, alternated
in one process (``anycnn/kernels/torch_native.py``).

The compiled kernels take torch CPU tensors while ``torch_native.active()`` holds; this script
switches that decision round by round, so both paths see the same memory, warm caches and noise.

    PYTHONPATH=. python3 tools/torch_native_ab.py resnet20 --batch 32 --mode train
    PYTHONPATH=. python3 tools/torch_native_ab.py simple-cnn --batch 1 --mode eval
    PYTHONPATH=. python3 tools/torch_native_ab.py resnet20 --batch 8 --halide-pool

``--halide-pool`` leaves the kernels' parallel loops on Halide's own thread pool (not handed to
torch's OpenMP threads, ``anycnn/kernels/openmp_tasks.py``): the two pools then take turns on
the cores, which is why the hand-over is a condition of the compiled kernels taking torch
tensors. Prints medians (ms) and the compiled / torch's operators ratio.
"""

from __future__ import annotations

import argparse
import sys

from winograd_ab import alternate, model_call


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", nargs="?", default="resnet20", help="the preset")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--mode", choices=["train", "eval"], default="train")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--halide-pool", action="store_true",
                   help="keep Halide's own threads (no hand-over to torch's OpenMP threads)")
    args = p.parse_args()
    import anycnn
    from anycnn.kernels import torch_native

    anycnn.use_backend("torch")
    if not args.halide_pool and not torch_native.active():
        p.error("the compiled kernels do not take torch tensors here (see anycnn info)")
    from anycnn.errors import AnycnnError

    try:
        call = model_call(args.name, args.batch, args.mode)
    except AnycnnError as e:  # an unknown preset, a bad batch: one line
        p.error(str(e))

    def switch(key: str) -> None:
        torch_native._active = key == "1"

    medians = alternate({"1": call, "0": call}, args.rounds, switch=switch)
    ours, theirs = medians["1"] * 1e3, medians["0"] * 1e3
    pool = "Halide's pool" if args.halide_pool else "torch's OpenMP threads"
    print(f"{args.name} batch {args.batch} {args.mode}: compiled kernels ({pool}) {ours:.3f} "
          f"ms, torch's operators {theirs:.3f} ms, ratio {ours / theirs:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
