"""A hand-written data-parallel loop (run under mpiexec by tests/test_dist_train.py): a model
written as code, ``loss.backward()``, then ``anycnn.dist.average_gradients`` unless the first
argument is ``skip``. Prints whether the ranks end with the same weights."""

import sys

import numpy as np

import anycnn
from anycnn import layers as L
from anycnn.data import DataLoader, load_dataset


class Net(anycnn.Module):
    def __init__(self):
        self.conv, self.fc = L.Conv2D(1, 4, 3), L.Dense(4, 10)

    def forward(self, x):
        xp = anycnn.namespace_of(x)
        return self.fc(xp.mean(self.conv(x), axis=(1, 2)))


anycnn.manual_seed(0)
comm = anycnn.dist.get_communicator()
model = Net()
opt = anycnn.optim.SGD(model.parameters(), lr=0.1)
loss_fn = anycnn.nn.SoftmaxCrossEntropy()
data = load_dataset("mnist-sample").train.subset(np.arange(256))
for x, y in DataLoader(data, 64, shuffle=True, seed=0, shard=(comm.rank, comm.size)):
    model.zero_grad()
    loss_fn(model(x), y).backward()
    if sys.argv[1] != "skip":
        anycnn.dist.average_gradients(model)
    opt.step()
w = np.asarray(anycnn.to_numpy(model.fc.weight.data), dtype=np.float64).ravel()
mean = comm.allreduce_(w.copy()) / comm.size
print(f"rank {comm.rank}: same weights {bool(np.allclose(mean, w, rtol=0, atol=1e-7))}")
