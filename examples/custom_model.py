"""Build your own network from anycnn.nn.layers, train it, use train() / eval() modes, save it.

The model uses BatchNorm2D (batch statistics in training, running statistics in eval), Dropout
(random in training, identity in eval), AvgPool2D and GlobalAvgPool2D. Activations are NHWC and
Conv2D weights are (kh, kw, in, out). anycnn.save / anycnn.load_weights keep any Module.

Run:  python examples/custom_model.py [--epochs 2] [--limit 3000]
"""

import argparse

import numpy as np

import anycnn
from anycnn import layers as L
from anycnn.data import DataLoader, load_dataset
from anycnn.train import Trainer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--limit", type=int, default=3000, help="use the first N training images")
args = parser.parse_args()


def make_model() -> anycnn.Sequential:
    return anycnn.Sequential(
        L.Conv2D(1, 16, 3, padding=1, bias=False), L.BatchNorm2D(16), L.ReLU(),
        L.AvgPool2D(2),                                   # 28x28 -> 14x14
        L.Conv2D(16, 32, 3, padding="same", bias=False), L.BatchNorm2D(32), L.ReLU(),
        L.MaxPool2D(2),                                   # 14x14 -> 7x7
        L.Conv2D(32, 64, 3, padding=1, bias=False), L.BatchNorm2D(64), L.ReLU(),
        L.GlobalAvgPool2D(),                              # (N, 7, 7, 64) -> (N, 64)
        L.Dropout(0.25), L.Dense(64, 10),
    )


anycnn.manual_seed(0)
print(model := make_model())

data = load_dataset("mnist-sample")
train_set = data.train.subset(np.arange(min(args.limit, len(data.train))))
optimizer = anycnn.optim.AdamW(model.parameters(), lr=1e-2)
trainer = Trainer(model, optimizer, progress=False)
for r in trainer.fit(DataLoader(train_set, 64, shuffle=True), DataLoader(data.val, 256),
                     epochs=args.epochs):
    print(f"epoch {r['epoch']}: train loss {r['train_loss']:.3f}, val acc {r['val_accuracy']:.3f}")

images = anycnn.asarray(data.val.images[:4] / 255, dtype="float32")
model.train()  # Dropout drops and BatchNorm uses batch statistics: two calls differ
a, b = anycnn.to_numpy(model(images)), anycnn.to_numpy(model(images))
print("train mode, two forward passes equal?", np.array_equal(a, b))
model.eval()  # Dropout is the identity, BatchNorm uses its running statistics
a, b = anycnn.to_numpy(model(images)), anycnn.to_numpy(model(images))
print("eval mode,  two forward passes equal?", np.array_equal(a, b))
print("first BatchNorm running mean[:4]:", np.round(anycnn.to_numpy(model[1].running_mean)[:4], 3))
path = anycnn.save(model, "custom_model.safetensors")  # weights and BatchNorm statistics
restored = anycnn.load_weights(make_model(), path)  # the same code builds it, the file fills it
guesses = anycnn.predict(restored, data.val.images[:4]).argmax(axis=1)  # uint8 images in
print("predicted:", guesses, "actual:", data.val.labels[:4])
