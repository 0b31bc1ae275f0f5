"""The same seed on two or three backends gives the same model and the same training run.

Builds LeNet-5 with seed 0 on NumPy and on array-api-strict (and on PyTorch tensors when torch is
installed), checks that the initial weights are bit-identical, then takes a few Adam steps on the
same batches and prints the losses side by side (equal up to float32 rounding).

Run:  python examples/backend_swap.py [--steps 5]
"""

import argparse
import importlib.util

import numpy as np

import anycnn
from anycnn.dataloader import DataLoader
from anycnn.datasets import load_dataset
from anycnn.losses import SoftmaxCrossEntropy
from anycnn.models import build_model

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=5)
args = parser.parse_args()

backends = ["numpy", "array_api_strict"]
if importlib.util.find_spec("torch") is not None:
    backends.append("torch")
data = load_dataset("mnist-sample")

weights, losses = {}, {}
for name in backends:
    with anycnn.use_backend(name):  # switches back when the block ends
        anycnn.manual_seed(0)
        model = build_model("lenet5")
        weights[name] = {k: anycnn.to_numpy(v).copy() for k, v in model.state_dict().items()}
        optimizer = anycnn.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = SoftmaxCrossEntropy()
        losses[name] = []
        for step, (x, y) in enumerate(DataLoader(data.train, 64, shuffle=True, seed=0)):
            if step == args.steps:
                break
            model.zero_grad()
            losses[name].append(float(anycnn.to_numpy(loss_fn(model(x), y))))
            model.backward(loss_fn.backward())
            optimizer.step()

reference = backends[0]
for name in backends[1:]:
    for key, value in weights[reference].items():
        assert np.array_equal(value, weights[name][key]), f"{key} differs on {name}"
    np.testing.assert_allclose(losses[name], losses[reference], rtol=1e-4)
print("initial weights: bit-identical on", ", ".join(backends))
print("step  " + "".join(f"{name:>18}" for name in backends))
for step in range(args.steps):
    print(f"{step + 1:>4}  " + "".join(f"{losses[name][step]:>18.7f}" for name in backends))
