"""The training loop reads nothing back to the host between progress updates.

On a GPU every device→host read stalls the pipeline. array-api-strict stands in for the device:
its arrays are patched so that any conversion to a Python scalar or a host array fails while
training steps run between two metric reads, and host→device uploads are counted.
"""

from __future__ import annotations

import array_api_strict
import pytest

import anycnn
from anycnn import backend as B
from anycnn.data.dataloader import DataLoader
from anycnn.data.datasets import load_dataset
from anycnn.models import build_model
from anycnn.train.trainer import Trainer, _Sums

RECIPES = {  # issue 26: clipping, the weight average and RMSprop stay on the device too
    "sgd": (lambda m: anycnn.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), {}),
    "rmsprop-clip-ema": (lambda m: anycnn.optim.RMSprop(m.parameters(), momentum=0.5,
                                                         centered=True),
                         {"clip_grad_norm": 1.0, "clip_grad_value": 0.1, "ema": 0.9}),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_training_steps_do_not_touch_the_host(monkeypatch, recipe):
    data = load_dataset("mnist-sample")
    train = data.train.subset(list(range(64)))
    make_optimizer, options = RECIPES[recipe]
    with anycnn.use_backend("array_api_strict"):
        anycnn.manual_seed(0)
        model = build_model("lenet5")
        trainer = Trainer(model, make_optimizer(model), progress=False, sync_every=1000,
                          **options)
        loader = DataLoader(train, 16, shuffle=True, device_resident=True)
        next(iter(loader))  # the one-off upload of the dataset happens before the steps

        reads, uploads = [], []

        def refuse(self, *args, **kwargs):
            reads.append(1)
            raise AssertionError("device-to-host read inside a training step")

        for name in ("__bool__", "__int__", "__float__", "__index__", "__array__",
                     "__dlpack__"):
            monkeypatch.setattr(array_api_strict._array_object.Array, name, refuse)
        real_asarray = B.asarray
        monkeypatch.setattr("anycnn.data.dataloader.asarray",
                            lambda *a, **k: uploads.append(1) or real_asarray(*a, **k))
        monkeypatch.setattr(_Sums, "host", lambda self: (0.0, 0.0, self.seen))
        loader.set_epoch(0)
        for x, y in loader:
            trainer.train_step(x, y, check=False)
        assert not reads
        assert len(uploads) == 1  # the epoch's order, once


def test_cpu_pace_training_still_checks_labels():
    with anycnn.use_backend("numpy"):
        model = build_model("lenet5")
        trainer = Trainer(model, anycnn.optim.SGD(model.parameters(), lr=0.01), progress=False)
        x = anycnn.asarray([[[[0.0]] * 28] * 28], dtype="float32")
        with pytest.raises(anycnn.ShapeError, match="labels must be in"):
            trainer.train_step(x, anycnn.asarray([12]), check=True)
