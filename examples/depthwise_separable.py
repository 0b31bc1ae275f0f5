"""A MobileNet-style network: depthwise-separable blocks (a depthwise 3x3 convolution, one filter
per channel, then a pointwise 1x1 convolution that mixes the channels), trained on MNIST.

Conv2D(C, C, 3, groups=C) is the depthwise convolution: its weight is (3, 3, 1, C), nine
numbers per channel, where a dense 3x3 convolution would need (3, 3, C, C). The block costs
about 1/9 + 1/C of the dense convolution's multiply-adds and parameters.

Run:  python examples/depthwise_separable.py [--epochs 2] [--limit 3000]
"""

import argparse
import math

import numpy as np

import anycnn
from anycnn import layers as L
from anycnn.data import DataLoader, load_dataset
from anycnn.train import Trainer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--limit", type=int, default=3000, help="use the first N training images")
args = parser.parse_args()


def separable(cin: int, cout: int, stride: int = 1) -> list[anycnn.Module]:
    """Depthwise 3x3 (stride) -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU."""
    return [L.Conv2D(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
            L.BatchNorm2D(cin), L.ReLU(),
            L.Conv2D(cin, cout, 1, bias=False), L.BatchNorm2D(cout), L.ReLU()]


anycnn.manual_seed(0)
model = anycnn.Sequential(
    L.Conv2D(1, 16, 3, stride=2, padding=1, bias=False), L.BatchNorm2D(16), L.ReLU(),  # 14x14
    *separable(16, 32),             # 14x14
    *separable(32, 64, stride=2),   # 7x7
    *separable(64, 64),             # 7x7
    L.GlobalAvgPool2D(), L.Dense(64, 10))
depthwise = model[9]  # the second block's depthwise convolution
print(f"depthwise weight {depthwise.weight.shape}: {math.prod(depthwise.weight.shape)} numbers "
      f"(a dense 3x3 convolution: {3 * 3 * 32 * 32})")
print("parameters:", sum(math.prod(p.shape) for p in model.parameters()))

data = load_dataset("mnist-sample")
train_set = data.train.subset(np.arange(min(args.limit, len(data.train))))
trainer = Trainer(model, anycnn.optim.Adam(model.parameters(), lr=1e-2), progress=False)
for r in trainer.fit(DataLoader(train_set, 64, shuffle=True), DataLoader(data.val, 256),
                     epochs=args.epochs):
    print(f"epoch {r['epoch']}: train loss {r['train_loss']:.3f}, "
          f"val loss {r['val_loss']:.3f}, val acc {r['val_accuracy']:.3f}")
