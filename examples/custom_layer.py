"""Write your own layer: a Module with forward and backward, checked by finite differences.

Scale multiplies each channel (last, NHWC axis) by a learnable factor. check_gradients tests
backward (float64, current backend) and names a wrong gradient; the model then trains.

Run:  python examples/custom_layer.py [--epochs 1] [--limit 2000]
"""

import argparse

import numpy as np

import anycnn
from anycnn import layers as L
from anycnn.backend import namespace_of
from anycnn.data import DataLoader
from anycnn.testing import check_gradients

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--limit", type=int, default=2000, help="use the first N training images")
args = parser.parse_args()


class Scale(anycnn.Module):
    """``y = x * scale``: x is (..., C), the parameter ``scale`` is (C,)."""

    def __init__(self, channels: int, init: float = 1.0) -> None:
        self.scale = anycnn.Parameter(anycnn.asarray(np.full(channels, init, np.float32)))

    def forward(self, x):  # x: any backend's array
        self._x = x  # what backward needs
        return x * self.scale.data

    def backward(self, dy, input_grad=True):
        xp = namespace_of(dy)  # NumPy, CuPy, torch or array-api-strict: the same code
        self.scale.accumulate(xp.sum(dy * self._x, axis=tuple(range(dy.ndim - 1))))
        return dy * self.scale.data


class Broken(Scale):  # a bug to catch: dx lacks the scale
    def backward(self, dy, input_grad=True):
        return super().backward(dy) / self.scale.data


x = anycnn.asarray(np.random.default_rng(0).standard_normal((2, 4, 4, 3)), dtype="float32")
print(check_gradients(Scale(3, init=0.5), x))
try:
    check_gradients(Broken(3, init=0.5), x)
except AssertionError as error:
    print("caught:", str(error).splitlines()[0])
model = anycnn.Sequential(L.Conv2D(1, 8, 3, padding=1), Scale(8), L.ReLU(), L.MaxPool2D(2),
                          L.Flatten(), L.Dense(14 * 14 * 8, 10))
model.summary((28, 28, 1))
data = anycnn.data.datasets.load_dataset("mnist-sample")
trainer = anycnn.train.Trainer(model, anycnn.optim.Adam(model.parameters(), 1e-2), progress=False)
trainer.fit(DataLoader(data.train.subset(np.arange(args.limit)), 64, shuffle=True),
            DataLoader(data.val, 256), epochs=args.epochs)
print(f"val accuracy {trainer.history[-1]['val_accuracy']:.3f}; learned scale",
      np.round(anycnn.to_numpy(model[1].scale.data), 2))
