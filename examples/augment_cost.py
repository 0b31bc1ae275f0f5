"""What random crops, flips and normalisation cost per batch, next to a training step.

Times DataLoader batches without and with ``Augment(crop=2, flip=True)`` (and ``normalize``),
and simple-cnn training steps, in alternating rounds; prints medians and the augmentation's share
of a batch fetch + step. Uses Fashion-MNIST when installed, else the bundled MNIST sample.

Run:  python examples/augment_cost.py [--batches 200] [--steps 30] [--rounds 5]
"""

import argparse
import statistics
import time

import anycnn
from anycnn.data import Augment, DataLoader, load_dataset
from anycnn.models import build_model
from anycnn.optim import SGD
from anycnn.train import Trainer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--batches", type=int, default=200)
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--rounds", type=int, default=5)
parser.add_argument("--dataset", default="fashion-mnist")
args = parser.parse_args()
try:
    data = load_dataset(args.dataset, download=False)
except anycnn.DataError:  # not installed here
    data = load_dataset("mnist-sample")
kinds = {"plain": {}, "crop2+flip": {"augment": Augment(crop=2, flip=True)},
         "crop2+flip+norm": {"augment": Augment(crop=2, flip=True), "normalize": "auto"}}
loaders = {k: DataLoader(data.train, 64, shuffle=True, **kw) for k, kw in kinds.items()}
anycnn.manual_seed(0)
model = build_model("simple-cnn", in_channels=data.image_shape[2],
                    image_size=data.image_shape[0], num_classes=data.num_classes)
trainer = Trainer(model, SGD(model.parameters(), lr=0.01), progress=False)
times = {k: [] for k in [*kinds, "step"]}
for r in range(args.rounds):  # alternate: a busy moment hits every kind alike
    for kind, loader in loaders.items():
        loader.set_epoch(r)
        start = time.perf_counter()
        for _ in zip(range(args.batches), loader):
            pass
        times[kind].append((time.perf_counter() - start) / args.batches * 1e3)
    batches = [batch for _, batch in zip(range(args.steps + 3), loaders["plain"])]
    for x, y in batches[:3]:  # untimed warm-up
        trainer.train_step(x, y, check=True)
    start = time.perf_counter()
    for x, y in batches[3:]:
        trainer.train_step(x, y, check=True)
    times["step"].append((time.perf_counter() - start) / args.steps * 1e3)
ms = {k: statistics.median(v) for k, v in times.items()}
print(f"{data.name}, batch 64, medians of {args.rounds} rounds (ms per batch):")
for kind in kinds:  # the extra time of each kind over plain batches
    extra = ms[kind] - ms["plain"]
    print(f"  {kind:<16} {ms[kind]:.3f} ms  (+{extra:.3f} ms = "
          f"{extra / (ms['plain'] + ms['step']):+.1%} of a fetch + step)")
print(f"  simple-cnn training step {ms['step']:.2f} ms")
