"""A data-parallel training run for tests/test_dist_train.py, started under ``mpiexec`` (or
alone, as the single-process reference).

Usage: ``python train_worker.py CONFIG.json`` where the JSON object holds ``out`` (rank 0 writes
``out`` as ``.npz``: the final parameters and buffers, plus ``history``), and optionally
``examples``, ``batch``, ``epochs``, ``bn`` (a model with BatchNorm), ``sync_bn`` (its
statistics synchronised over the ranks), ``augment``,
``batch_on_rank`` ({rank: batch}: a misconfigured rank), ``raise_on_rank`` ([rank, step]),
``nan_on_rank`` ([rank, step]), ``on_nonfinite``, ``pid_dir`` (each rank writes its process id
to ``pid_dir/rank-R.pid`` once it has trained a step), ``groups`` (parameter groups: see
:func:`optimizer`), ``freeze`` (the first convolution's weight frozen), ``clip_grad_norm`` and
``ema`` (the Trainer's options; the averages are written too, keyed ``ema:<name>``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

import anycnn
from anycnn.data import ArrayDataset, Augment, DataLoader
from anycnn.dist import get_communicator, install_abort_hook
from anycnn.nn import (
    BatchNorm2D,
    Conv2D,
    Dense,
    Flatten,
    MaxPool2D,
    ReLU,
    Sequential,
    SoftmaxCrossEntropy,
    sync_batchnorm,
)
from anycnn.optim import SGD, split_groups
from anycnn.train import Trainer


def dataset(n: int, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 4, size=n).astype(np.int64)
    return ArrayDataset(images, labels, 4)


def model(bn: bool) -> Sequential:
    anycnn.manual_seed(1)
    layers = [Conv2D(1, 4, 3, padding=1), *([BatchNorm2D(4)] if bn else []), ReLU(),
              MaxPool2D(2), Flatten(), Dense(64, 4)]
    return Sequential(*layers)


def optimizer(net: Sequential, groups: bool) -> SGD:
    """SGD with momentum; with ``groups``, a slower backbone, weight decay but not on biases."""
    if not groups:
        return SGD(net.parameters(), lr=0.1, momentum=0.9)
    return SGD(split_groups(net, net[-1], lr_backbone=0.03, no_decay=("bias",)), lr=0.1,
               momentum=0.9, weight_decay=0.01)


def main(path: str) -> int:
    cfg = json.loads(open(path).read())
    comm = get_communicator()
    install_abort_hook(comm)
    batch = int(cfg.get("batch_on_rank", {}).get(str(comm.rank), cfg.get("batch", 12)))
    net = model(cfg.get("bn", False))
    if cfg.get("freeze"):
        net[0].weight.requires_grad = False
    if cfg.get("sync_bn"):
        sync_batchnorm(net, comm)
    loss_fn = SoftmaxCrossEntropy()
    if "raise_on_rank" in cfg and comm.rank == cfg["raise_on_rank"][0]:
        forward, calls = loss_fn.forward, [0]

        def failing(logits, y):
            calls[0] += 1
            if calls[0] == cfg["raise_on_rank"][1]:
                raise RuntimeError("injected failure")
            return forward(logits, y)

        loss_fn.forward = failing
    if "nan_on_rank" in cfg and comm.rank == cfg["nan_on_rank"][0]:
        forward, calls = loss_fn.forward, [0]

        def poisoned(logits, y):
            calls[0] += 1
            out = forward(logits, y)
            return out * float("nan") if calls[0] == cfg["nan_on_rank"][1] else out

        loss_fn.forward = poisoned
    trainer = Trainer(net, optimizer(net, cfg.get("groups", False)), loss_fn, comm=comm,
                      progress=False, on_nonfinite=cfg.get("on_nonfinite", "stop"),
                      clip_grad_norm=cfg.get("clip_grad_norm"), ema=cfg.get("ema"))
    if "pid_dir" in cfg:
        step, done = trainer.parallel_step, []

        def announced(x, y):
            out = step(x, y)
            if not done:
                done.append(True)
                (Path(cfg["pid_dir"]) / f"rank-{comm.rank}.pid").write_text(str(os.getpid()))
            return out

        trainer.parallel_step = announced
    augment = Augment(crop=1, flip=True) if cfg.get("augment") else None
    train = DataLoader(dataset(cfg.get("examples", 50)), batch, shuffle=True, seed=3,
                       augment=augment)
    val = DataLoader(dataset(21, seed=1), 8)
    trainer.fit(train, val, epochs=cfg.get("epochs", 2))
    if comm.rank == 0:
        state = {k: anycnn.to_numpy(v) for k, v in net.state_dict().items()}
        if trainer.ema is not None:
            state.update({f"ema:{k}": anycnn.to_numpy(v)
                          for k, v in trainer.ema.averages.items()})
        np.savez(cfg["out"], history=json.dumps(trainer.history),
                 skipped=trainer.skipped_steps, **state)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
