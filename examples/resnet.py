"""Build a small ResNet from Residual blocks and train it on the bundled MNIST sample.

A basic block is Residual(body, shortcut) followed by ReLU: the body is conv 3x3 → BatchNorm →
ReLU → conv 3x3 → BatchNorm, and the shortcut is the identity, or a strided 1x1 convolution +
BatchNorm where the block changes the size or the channel count. Backward runs through both
paths and adds their gradients; parameter names are dotted paths ("3.body.0.weight").

Run:  python examples/resnet.py [--epochs 2] [--limit 4000]
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
parser.add_argument("--limit", type=int, default=4000, help="use the first N training images")
args = parser.parse_args()


def block(cin: int, cout: int, stride: int = 1) -> list:
    body = anycnn.Sequential(L.Conv2D(cin, cout, 3, stride, padding=1, bias=False),
                             L.BatchNorm2D(cout), L.ReLU(),
                             L.Conv2D(cout, cout, 3, padding=1, bias=False), L.BatchNorm2D(cout))
    shortcut = None  # identity: y = body(x) + x
    if stride != 1 or cin != cout:
        shortcut = anycnn.Sequential(L.Conv2D(cin, cout, 1, stride, bias=False),
                                     L.BatchNorm2D(cout))
    return [L.Residual(body, shortcut), L.ReLU()]


anycnn.manual_seed(0)
model = anycnn.Sequential(
    L.Conv2D(1, 16, 3, padding=1, bias=False), L.BatchNorm2D(16), L.ReLU(),  # 28x28x16
    *block(16, 16), *block(16, 32, stride=2), *block(32, 64, stride=2),      # 7x7x64
    L.GlobalAvgPool2D(), L.Dense(64, 10))
blocks = [m for m in model.modules() if isinstance(m, L.Residual)]
weights = sum(math.prod(p.shape) for p in model.parameters())
print(f"{len(blocks)} residual blocks, {weights} weights")
print("shortcut tensors:", [n for n, _ in model.named_parameters() if ".shortcut." in n][:3])

data = load_dataset("mnist-sample")
train_set = data.train.subset(np.arange(min(args.limit, len(data.train))))
trainer = Trainer(model, anycnn.optim.Adam(model.parameters(), lr=3e-3), progress=False)
for r in trainer.fit(DataLoader(train_set, 64, shuffle=True), DataLoader(data.val, 256),
                     epochs=args.epochs):
    print(f"epoch {r['epoch']}: train loss {r['train_loss']:.3f}, val acc {r['val_accuracy']:.3f}")
guesses = anycnn.predict(model, data.val.images[:8]).argmax(axis=1)
print("predicted:", guesses, "actual:", data.val.labels[:8])
print(f"validation accuracy {trainer.history[-1]['val_accuracy']:.4f}")
