"""What a random-resized crop costs per batch on NumPy, and why it is two matrix products.

Times RandomResizedCrop.apply (per-image interpolation matrices, Wy @ X @ Wx^T) against the
alternative of gathering each output pixel's filter taps with xp.take, on the same boxes of a
float32 batch, in alternating rounds; prints the medians and their largest difference.

Run:  python examples/resized_crop_cost.py [--batch 32] [--size 256] [--crop 224] [--rounds 5]
"""

import argparse
import statistics
import time

import numpy as np

from anycnn.data import RandomResizedCrop

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
for name, default in (("batch", 32), ("size", 256), ("crop", 224), ("rounds", 5)):
    parser.add_argument(f"--{name}", type=int, default=default)
args = parser.parse_args()
b, r, s = args.batch, args.size, args.crop
images = np.random.default_rng(0).random((b, r, r, 3), dtype=np.float32)
rrc = RandomResizedCrop(s, flip=True)
params = rrc.draw(0, 0, 0, b, (r, r))


def taps(start, length, flip):
    """(B, S, K) input rows and weights of each output row: the same triangle filter."""
    step = length / s
    support = np.maximum(step, 1.0)
    y = np.arange(s) + flip[:, None] * (s - 1 - 2 * np.arange(s))
    centre = start[:, None] + (y + 0.5) * step[:, None]
    first = np.maximum(np.floor(centre - support[:, None] + 0.5), start[:, None]).astype(int)
    k = first[..., None] + np.arange(int(np.ceil(2 * support.max())) + 1)
    w = np.clip(1 - np.abs((k + 0.5 - centre[..., None]) / support[:, None, None]), 0, None)
    w *= k < (start + length)[:, None, None]  # taps past the box weigh 0
    return np.minimum(k, r - 1), (w / w.sum(-1, keepdims=True)).astype(np.float32)


def gathered(x):
    rows, wy = taps(params[0], params[2], np.zeros(b))
    cols, wx = taps(params[1], params[3], params[4])
    g = np.take(x.reshape(b * r, r * 3), (rows + np.arange(b)[:, None, None] * r).ravel(), 0)
    y = (g.reshape(b, s, -1, r * 3) * wy[..., None]).sum(2).reshape(b, s, r, 3)
    yt = np.transpose(y, (0, 2, 1, 3)).reshape(b * r, s * 3)
    g = np.take(yt, (cols + np.arange(b)[:, None, None] * r).ravel(), 0)
    z = (g.reshape(b, s, -1, s * 3) * wx[..., None]).sum(2).reshape(b, s, s, 3)
    return np.transpose(z, (0, 2, 1, 3))


kinds = {"matrices": lambda x: np.ascontiguousarray(rrc.apply(x, params)), "gather": gathered}
times = {k: [] for k in kinds}
for kind, run in [item for _ in range(args.rounds) for item in kinds.items()]:
    start = time.perf_counter()
    run(images)
    times[kind].append((time.perf_counter() - start) * 1e3)
for kind, ms in times.items():
    print(f"{kind:9s} {statistics.median(ms):8.2f} ms per batch of {b}, {r} -> {s}")
print(f"largest difference {np.abs(kinds['matrices'](images) - gathered(images)).max():.2e}")
