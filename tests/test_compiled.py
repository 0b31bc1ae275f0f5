"""Trainer(compile=True): the JAX training step as one jax.jit function equals the eager step
(float64), survives a batch-size change, updates BatchNorm buffers, skips NaN steps, resumes from
checkpoints; other backends and host-random layers are refused."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

import anycnn
from anycnn.errors import ConfigError
from anycnn.models import build_model
from anycnn.nn import Dense, Dropout, Flatten, Sequential, SoftmaxCrossEntropy
from anycnn.optim import SGD, Adam, AdamW, decay_groups, split_groups
from anycnn.train import Trainer


def test_compile_needs_the_jax_backend():
    with anycnn.use_backend("numpy"):
        model = Sequential(Flatten(), Dense(4, 2))
        with pytest.raises(ConfigError, match="needs the jax backend"):
            Trainer(model, SGD(model.parameters(), lr=0.1), compile=True)


needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                               reason="jax is not installed (pip install -r backends/jax.txt)")


def _run(model_name, compile, opt, sizes, shape, on_nonfinite="stop", poison=None, **options):
    with anycnn.use_backend("jax"):
        anycnn.manual_seed(0)
        model = build_model(model_name)
        model.to("float64")
        trainer = Trainer(model, opt(model), PoisonedLoss(), compile=compile,
                          progress=False, on_nonfinite=on_nonfinite, **options)
        rng = np.random.default_rng(0)
        losses = []
        for i, n in enumerate(sizes):
            x = rng.random((n, *shape))
            y = rng.integers(0, 10, n)
            if poison == i:
                y[0] = -1  # PoisonedLoss: a NaN loss
            loss, _ = trainer.train_step(anycnn.asarray(x, dtype="float64"), anycnn.asarray(y),
                                         True)
            losses.append(None if loss is None else float(anycnn.to_numpy(loss)))
        state = {k: anycnn.to_numpy(v) for k, v in model.state_dict().items()}
        return state, losses, trainer


class PoisonedLoss(SoftmaxCrossEntropy):
    """Cross-entropy, NaN when a label is -1 (a traceable way to make one step's loss NaN)."""

    def forward(self, logits, labels):
        xp = anycnn.backend.namespace_of(logits)
        bad = labels < 0
        loss = super().forward(logits, xp.where(bad, 0, labels))
        return loss + xp.where(xp.any(bad), xp.nan, 0.0)


OPTS = {"sgd": lambda m: SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                             weight_decay=1e-3),
        "adam": lambda m: Adam(m.parameters(), lr=1e-2, weight_decay=1e-3),
        "sgd-groups": lambda m: SGD(split_groups(m, m[-1], lr_backbone=5e-3, no_decay=("bias",)),
                                    lr=0.05, momentum=0.9, weight_decay=1e-2),
        "adamw-groups": lambda m: AdamW(
            [{**g, "betas": (0.5, 0.9)} if g["name"] == "no_decay" else {**g, "lr": 3e-3}
             for g in decay_groups(m, 0.1)], lr=1e-2)}


@needs_jax
@pytest.mark.parametrize("opt", sorted(OPTS))
def test_compiled_steps_equal_eager_steps(opt):
    sizes = [8, 8, 5]  # the last batch is smaller: a second compilation
    want, want_losses, _ = _run("lenet5", False, OPTS[opt], sizes, (28, 28, 1))
    got, got_losses, trainer = _run("lenet5", True, OPTS[opt], sizes, (28, 28, 1))
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-12)
    assert all(s["step"] == 3 for s in trainer.optimizer.state)


@needs_jax
def test_compiled_steps_clip_and_average_as_eager_steps():
    """Gradient clipping runs inside the compiled step, the weight average after it; RMSprop
    compiles too (issue 26)."""
    from anycnn.optim import RMSprop

    options = dict(clip_grad_norm=0.5, clip_grad_value=0.02, ema=0.9)
    opt = lambda m: RMSprop(m.parameters(), lr=1e-2, momentum=0.5, centered=True)  # noqa: E731
    want, want_losses, eager = _run("lenet5", False, opt, [8, 8, 8], (28, 28, 1), **options)
    got, got_losses, trainer = _run("lenet5", True, opt, [8, 8, 8], (28, 28, 1), **options)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(anycnn.to_numpy(trainer.ema.averages[name]),
                                   anycnn.to_numpy(eager.ema.averages[name]), rtol=1e-10,
                                   atol=1e-12, err_msg=name)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-12)
    unclipped, _, _ = _run("lenet5", False, opt, [8, 8, 8], (28, 28, 1), ema=0.9)
    assert any(not np.allclose(unclipped[k], want[k]) for k in want)  # the clipping acted
    assert trainer.ema.updates == 3


@needs_jax
def test_compiled_groups_follow_lr_changes_and_unfreezing():
    """Each group's rate is an input (a schedule's change needs no new compile); a change of
    what is compiled in (a group's weight decay, unfreezing) compiles again, as eager runs."""

    def run(compile):
        with anycnn.use_backend("jax"):
            anycnn.manual_seed(0)
            model = build_model("lenet5")
            model.to("float64")
            opt = OPTS["sgd-groups"](model)
            for p in model[0].parameters():
                p.requires_grad = False
            trainer = Trainer(model, opt, compile=compile, progress=False)
            rng = np.random.default_rng(0)
            for step in range(5):
                if step == 2:
                    opt.lr = 0.02
                if step == 3:
                    for p in model[0].parameters():
                        p.requires_grad = True
                if step == 4:
                    opt.param_groups[0]["weight_decay"] = 0.5
                x = anycnn.asarray(rng.random((4, 28, 28, 1)), dtype="float64")
                trainer.train_step(x, anycnn.asarray(rng.integers(0, 10, 4)), True)
            return {k: anycnn.to_numpy(v) for k, v in model.state_dict().items()}, trainer

    want, _ = run(False)
    got, _ = run(True)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-12, err_msg=name)


@needs_jax
def test_compiled_batchnorm_buffers_follow_the_eager_ones():
    want, _, _ = _run("resnet-mini", False, OPTS["sgd"], [6, 6], (28, 28, 1))
    got, _, _ = _run("resnet-mini", True, OPTS["sgd"], [6, 6], (28, 28, 1))
    assert any("running_mean" in k for k in got)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=1e-11, err_msg=name)


@needs_jax
def test_a_nan_step_is_skipped_without_writing_back():
    want, _, _ = _run("lenet5", True, OPTS["adam"], [4, 4], (28, 28, 1))
    got, losses, trainer = _run("lenet5", True, OPTS["adam"], [4, 4, 4], (28, 28, 1),
                                on_nonfinite="skip", poison=2)
    assert losses[2] is None and trainer.skipped_steps == 1
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@needs_jax
def test_compiled_fit_saves_and_resumes(tmp_path):
    from anycnn.data import ArrayDataset, DataLoader

    rng = np.random.default_rng(1)
    data = ArrayDataset(rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8),
                        rng.integers(0, 10, 40).astype(np.int64), 10)
    with anycnn.use_backend("jax"):
        anycnn.manual_seed(0)
        model = build_model("lenet5")
        trainer = Trainer(model, Adam(model.parameters(), lr=1e-3), compile=True,
                          progress=False, checkpoint_path=tmp_path / "c.safetensors")
        history = trainer.fit(DataLoader(data, 16, shuffle=True), epochs=2)
        assert len(history) == 2 and math.isfinite(history[-1]["train_loss"])
        model2 = build_model("lenet5")
        again = Trainer(model2, Adam(model2.parameters(), lr=1e-3), compile=True,
                        progress=False)
        again.resume(tmp_path / "c.safetensors")
        assert again.epoch == 2 and again.optimizer.state[0]["step"] == 6
        again.fit(DataLoader(data, 16, shuffle=True), epochs=3)
        assert len(again.history) == 3


@needs_jax
def test_dropout_is_refused_under_compile():
    with anycnn.use_backend("jax"):
        model = Sequential(Flatten(), Dropout(0.5), Dense(4, 2))
        with pytest.raises(ConfigError, match="cannot compile Dropout"):
            Trainer(model, SGD(model.parameters(), lr=0.1), compile=True)


@needs_jax
def test_a_forward_only_model_compiles_to_the_eager_steps():
    """A model written as code (derived backward, a BatchNorm and a ReLU called twice)
    traces into the compiled step and gives the eager losses and weights (float32, as the
    data loader delivers)."""
    from anycnn.data.arrays import ArrayDataset
    from anycnn.data.dataloader import DataLoader
    from tests.test_models_as_code import TinyNet

    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.random((24, 6, 6, 1), dtype=np.float32), rng.integers(0, 3, 24), 3)
    results = []
    with anycnn.use_backend("jax"):
        for compile in (False, True):
            anycnn.manual_seed(1)
            model = TinyNet("float32")
            trainer = Trainer(model, SGD(model.parameters(), lr=0.1), SoftmaxCrossEntropy(),
                              compile=compile, progress=False)
            history = trainer.fit(DataLoader(data, 8), epochs=2)
            results.append(([r["train_loss"] for r in history],
                             [anycnn.to_numpy(p.data) for p in model.parameters()]))
    (eager_loss, eager_w), (jit_loss, jit_w) = results
    np.testing.assert_allclose(jit_loss, eager_loss, rtol=1e-5)  # XLA fuses float32 sums
    for a, b in zip(jit_w, eager_w):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
