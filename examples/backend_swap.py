"""The same seed on two or three backends gives the same model and the same training run.

Builds LeNet-5 with seed 0 on NumPy, array-api-strict and PyTorch tensors, checks that the initial
weights are bit-identical, then takes a few Adam steps on the same batches and prints the losses
side by side (equal up to float32 rounding). A backend not installed is skipped with its pip line.

Run:  python examples/backend_swap.py [--steps 5]
"""

import argparse

import numpy as np

import anycnn
from anycnn.data import DataLoader, load_dataset
from anycnn.models import build_model
from anycnn.nn import SoftmaxCrossEntropy

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=5)
args = parser.parse_args()

backends = []
for name in ["numpy", "array_api_strict", "torch"]:
    try:
        anycnn.backend.resolve(name)  # if unusable: BackendError, with the command that fixes it
        backends.append(name)
    except anycnn.BackendError as exc:
        print(f"skipping {name}: {exc}")
if len(backends) < 2:  # nothing to compare NumPy with
    raise SystemExit(0)
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
            loss = loss_fn(model(x), y)  # a Variable: the loss and how it was computed
            loss.backward()              # every parameter's .grad (no input gradient)
            optimizer.step()
            losses[name].append(float(loss))

reference = backends[0]
for name in backends[1:]:
    for key, value in weights[reference].items():
        assert np.array_equal(value, weights[name][key]), f"{key} differs on {name}"
    np.testing.assert_allclose(losses[name], losses[reference], rtol=1e-4)
print("initial weights: bit-identical on", ", ".join(backends))
print("step  " + "".join(f"{name:>18}" for name in backends))
for step in range(args.steps):
    print(f"{step + 1:>4}  " + "".join(f"{losses[name][step]:>18.7f}" for name in backends))
