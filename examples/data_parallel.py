"""Train one model on several processes with the Python API (data parallel over MPI).

Shows: the communicator a Trainer picks by itself (MPI under mpiexec, else one process), the
global batch each rank takes its share of, synchronised BatchNorm statistics, printing and
saving on rank 0 only, and ending the whole job when one rank fails.

Run:  mpiexec -n 2 python examples/data_parallel.py [--epochs 2] [--limit N] [--out runs/dp]
      python examples/data_parallel.py   (the same script on one process)
Needs: pip install 'anycnn[mpi]' for mpiexec. Backend: $ANYCNN_BACKEND (default auto).
"""

import argparse
from pathlib import Path

import numpy as np

import anycnn
from anycnn.data import DataLoader, load_dataset
from anycnn.dist import get_communicator, install_abort_hook
from anycnn.models import build_model, model_spec
from anycnn.nn import sync_batchnorm
from anycnn.optim import SGD
from anycnn.train import Trainer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--limit", type=int, default=None, help="use the first N training images")
parser.add_argument("--out", default="runs/dp")
args = parser.parse_args()

comm = get_communicator()  # MPI when mpiexec started us, else a single process
install_abort_hook(comm)  # an uncaught error on any rank ends the whole job, never a hang
say = print if comm.rank == 0 else (lambda *a, **k: None)

data = load_dataset("mnist-sample")
train_set = data.train if args.limit is None else data.train.subset(np.arange(args.limit))
say(f"{comm.size} rank(s) ({comm.name}), backend {anycnn.get_backend().name}")

anycnn.manual_seed(0)  # every rank builds the same model; rank 0's weights are broadcast anyway
spec = model_spec("bn-cnn", num_classes=data.num_classes)
model = build_model(spec)
sync_batchnorm(model, comm)  # BatchNorm statistics of the global batch (no-op on one process)
trainer = Trainer(model, SGD(model.parameters(), lr=0.05, momentum=0.9), model_spec=spec,
                  progress=False, comm=comm)

# batch_size is the global batch: on N ranks each computes its share of every batch of 64
train_loader = DataLoader(train_set, batch_size=64, shuffle=True, seed=0, drop_last=True)
val_loader = DataLoader(data.val, batch_size=256)
for record in trainer.fit(train_loader, val_loader, epochs=args.epochs):
    say(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, "
        f"val accuracy {record['val_accuracy']:.4f}, {record['images_per_s']:.0f} images/s")

if comm.rank == 0:
    Path(args.out).mkdir(parents=True, exist_ok=True)
path = trainer.save(Path(args.out) / "checkpoint.safetensors")  # collective: rank 0 writes
say(f"saved {path}")
