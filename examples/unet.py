"""A small U-Net that removes noise from MNIST digits: an encoder-decoder whose skip connection
is a Concat of the full-resolution features with the upsampled coarse ones.

One level: Concat(Identity(), Sequential(MaxPool2D(2), convs at 14x14, Upsample2D(2))) gives
the decoder both the fine features (the Identity branch) and the coarse context. The output is
one channel per pixel, trained with MSELoss against the clean image in a plain training loop.

Run:  python examples/unet.py [--epochs 2] [--limit 2000]
"""

import argparse

import numpy as np

import anycnn
from anycnn import layers as L
from anycnn.data import DataLoader, load_dataset
from anycnn.nn import MSELoss

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--limit", type=int, default=2000, help="use the first N training images")
args = parser.parse_args()

anycnn.manual_seed(0)
coarse = anycnn.Sequential(L.MaxPool2D(2), L.Conv2D(16, 32, 3, padding=1), L.ReLU(),  # 14x14
                           L.Conv2D(32, 32, 3, padding=1), L.ReLU(),
                           L.Upsample2D(2, mode="bilinear"), L.Conv2D(32, 16, 1))   # 28x28x16
model = anycnn.Sequential(L.Conv2D(1, 16, 3, padding=1), L.ReLU(),                   # 28x28x16
                          L.Concat(L.Identity(), coarse),                             # 28x28x32
                          L.Conv2D(32, 16, 3, padding=1), L.ReLU(), L.Conv2D(16, 1, 1))
model.summary((28, 28, 1))

data = load_dataset("mnist-sample")
train_set = data.train.subset(np.arange(min(args.limit, len(data.train))))
rng = np.random.default_rng(0)
loss_fn, opt = MSELoss(), anycnn.optim.Adam(model.parameters(), lr=2e-3)


def noisy(clean):
    noise = rng.normal(0.0, 0.3, tuple(clean.shape)).astype(np.float32)
    return anycnn.asarray(np.clip(anycnn.to_numpy(clean) + noise, 0, 1))


loader = DataLoader(train_set, 32, shuffle=True)
for epoch in range(args.epochs):
    loader.set_epoch(epoch)
    for clean, _ in loader:
        model.zero_grad()
        loss = loss_fn(model(noisy(clean)), clean)
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
    print(f"epoch {epoch + 1}: last batch mse {float(anycnn.to_numpy(loss)):.4f}")
clean, _ = next(iter(DataLoader(data.val, 256)))
x = noisy(clean)
before = float(anycnn.to_numpy(loss_fn(x, clean)))
after = float(anycnn.to_numpy(loss_fn(model.eval()(x), clean)))
print(f"validation mse: noisy input {before:.4f}, denoised {after:.4f}")
