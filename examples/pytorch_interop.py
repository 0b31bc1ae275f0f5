"""Move a trained anycnn model to PyTorch and back.

Trains LeNet-5 briefly, exports a PyTorch ``state_dict`` (torch names and layouts: Conv2d weights
(out, in, kh, kw), Linear weights (out, in), the first Linear's inputs reordered from NHWC to NCHW
flattening), builds the equivalent ``torch.nn.Sequential``, checks both give the same logits,
fine-tunes one step in PyTorch and imports the weights back into anycnn.
Prints a message and exits 0 when torch is not installed.

Run:  python examples/pytorch_interop.py [--limit 2000]
"""

import argparse
import sys

import numpy as np

import anycnn
from anycnn.data import DataLoader, load_dataset
from anycnn.io import from_torch_state_dict, to_torch_state_dict, torch_module
from anycnn.models import build_model
from anycnn.train.trainer import Trainer, predict

try:
    import torch
except ImportError:
    print("torch is not installed; skipping. Install it with: pip install -r backends/torch.txt")
    sys.exit(0)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--limit", type=int, default=2000, help="train on the first N images")
args = parser.parse_args()

data = load_dataset("mnist-sample")
anycnn.manual_seed(0)
model = build_model("lenet5")
Trainer(model, anycnn.optim.Adam(model.parameters()), progress=False).fit(
    DataLoader(data.train.subset(np.arange(args.limit)), 64, shuffle=True))

state = to_torch_state_dict(model)  # {name: NumPy array}, PyTorch layouts
print({name: tuple(a.shape) for name, a in list(state.items())[:2]}, "...")
net = torch_module(model).eval()  # nn.Sequential with the same weights, NCHW input

x = data.val.images[:256].astype(np.float32) / 255  # NHWC for anycnn
ours = predict(model, anycnn.asarray(x))
with torch.no_grad():
    theirs = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()  # NCHW for torch
print(f"max |logit difference| anycnn vs torch: {np.abs(ours - theirs).max():.2e}")
np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)

# One SGD step in PyTorch, then bring the changed weights back.
net.train()
y = torch.from_numpy(data.val.labels[:256])
torch.nn.functional.cross_entropy(net(torch.from_numpy(x).permute(0, 3, 1, 2)), y).backward()
torch.optim.SGD(net.parameters(), lr=0.1).step()
from_torch_state_dict(model, net.state_dict())
with torch.no_grad():
    theirs = net.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
np.testing.assert_allclose(predict(model, anycnn.asarray(x)), theirs, rtol=1e-4, atol=1e-4)
print("imported the fine-tuned torch weights back: logits match again")
