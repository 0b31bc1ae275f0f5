"""Train LeNet-5 on the bundled MNIST sample with the Python API, end to end.

Shows: load_dataset, DataLoader, build_model, Adam with a cosine schedule, Trainer.fit with
validation, saving and reloading a checkpoint, evaluate with top-k and per-class accuracy, and
predict / predict_topk on raw uint8 images.

Run:  python examples/train_mnist.py [--epochs 3] [--limit N] [--out runs/example]
Backend: $ANYCNN_BACKEND (default auto: CuPy with a GPU, else NumPy).
"""

import argparse
from pathlib import Path

import numpy as np

import anycnn
from anycnn.data import DataLoader, load_dataset
from anycnn.io import load_model
from anycnn.models import build_model, model_spec
from anycnn.optim import make_schedule
from anycnn.train.trainer import Trainer, evaluate, predict, predict_topk

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--limit", type=int, default=None, help="use the first N training images")
parser.add_argument("--out", default="runs/example")
args = parser.parse_args()

data = load_dataset("mnist-sample")  # 8,000 train / 2,000 validation images, uint8 NHWC
train_set = data.train if args.limit is None else data.train.subset(np.arange(args.limit))
print(f"backend {anycnn.get_backend().name}; {len(train_set)} train / {len(data.val)} val images")

anycnn.manual_seed(0)  # same seed, same initial weights on every backend
spec = model_spec("lenet5", num_classes=data.num_classes)
model = build_model(spec)
optimizer = anycnn.optim.Adam(model.parameters(), lr=1e-3)
trainer = Trainer(model, optimizer, schedule=make_schedule("cosine", 1e-3, args.epochs),
                  model_spec=spec, progress=False)

train_loader = DataLoader(train_set, batch_size=64, shuffle=True, seed=0)
val_loader = DataLoader(data.val, batch_size=256)
for record in trainer.fit(train_loader, val_loader, epochs=args.epochs):
    print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, "
          f"val loss {record['val_loss']:.4f}, val accuracy {record['val_accuracy']:.4f}")

# A checkpoint is one safetensors file holding weights, optimizer state and history.
Path(args.out).mkdir(parents=True, exist_ok=True)
path = trainer.save(Path(args.out) / "checkpoint.safetensors")
restored, _ = load_model(path)  # rebuilt from the stored model spec, on the current backend
result = evaluate(restored, val_loader, top_k=(1, 3), confusion=True, class_names=data.class_names)
print(f"reloaded {path}: val loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f}, "
      f"top-3 {result['top_k_accuracy'][3]:.4f}, per class {result['per_class_accuracy'].round(2)}")

# predict() takes uint8 (or [0, 1] float) NHWC images, one (H, W, C) or a batch; host results.
guesses = predict(restored, data.val.images[:8]).argmax(axis=1)
print("predicted:", " ".join(map(str, guesses)))
print("actual:   ", " ".join(map(str, data.val.labels[:8])))
classes, probs = predict_topk(restored, data.val.images[0], k=3)  # one image: (3,), (3,)
print("first image, top 3:", ", ".join(f"{c} ({p:.2f})" for c, p in zip(classes, probs)))
