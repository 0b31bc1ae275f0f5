"""Models written as code: reuse of one layer instance, per-call state, several losses and
outputs, freezing, Dense on any rank, and forward-only modules in the Trainer, checkpoints,
summaries and PyTorch state_dicts."""

from __future__ import annotations

import numpy as np
import pytest

import anycnn
from anycnn import layers as L
from anycnn import losses, optim
from anycnn.autograd import Variable
from anycnn.nn.module import Module
from anycnn.nn.sequential import Sequential
from anycnn.testing import check_gradients


def host(a):
    return anycnn.to_numpy(a)


class Block(Module):
    """conv → BN → ReLU → conv → BN, plus the input, ReLU; ``self.relu`` called twice (as
    torchvision's BasicBlock does)."""

    def __init__(self, c, dtype="float64"):
        self.conv1 = L.Conv2D(c, c, 3, padding=1, bias=False, dtype=dtype)
        self.bn1 = L.BatchNorm2D(c, dtype=dtype)
        self.conv2 = L.Conv2D(c, c, 3, padding=1, bias=False, dtype=dtype)
        self.bn2 = L.BatchNorm2D(c, dtype=dtype)
        self.relu = L.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class TinyNet(Module):
    def __init__(self, dtype="float64"):
        self.stem = L.Conv2D(1, 4, 3, padding=1, dtype=dtype)
        self.block = Block(4, dtype)
        self.pool = L.GlobalAvgPool2D()
        self.fc1 = L.Dense(4, 3, dtype=dtype)

    def forward(self, x):
        return self.fc1(self.pool(self.block(self.stem(x))))


def test_forward_only_models_pass_check_gradients(backend, rng):
    x = anycnn.asarray(rng.standard_normal((2, 6, 6, 1)))
    assert check_gradients(TinyNet(), x).ok
    assert check_gradients(Block(3), anycnn.asarray(rng.standard_normal((2, 5, 5, 3)))).ok


def test_one_relu_twice_in_a_sequential_gives_the_right_input_gradient(backend, rng):
    relu = L.ReLU()
    model = Sequential(L.Dense(4, 5, dtype="float64"), relu, L.Dense(5, 5, dtype="float64"),
                       relu)
    assert check_gradients(model, anycnn.asarray(rng.standard_normal((3, 4)))).ok


def test_one_conv_twice_adds_its_gradients(backend, rng):
    conv = L.Conv2D(2, 2, 3, padding=1, dtype="float64")
    model = Sequential(conv, L.Tanh(), conv)
    x = anycnn.asarray(rng.standard_normal((2, 5, 5, 2)))
    assert check_gradients(model, x).ok


def test_a_then_b_then_backward_of_a(backend, rng):
    """Each model(x) carries its own graph: A's loss goes back through A's activations."""
    anycnn.manual_seed(3)
    model = TinyNet()
    xa, xb = (anycnn.asarray(rng.standard_normal((2, 6, 6, 1))) for _ in range(2))
    labels = anycnn.asarray(np.array([0, 2]))
    loss_fn = losses.SoftmaxCrossEntropy()
    model.zero_grad()  # training mode: A's BatchNorm batch statistics belong to A's graph
    loss_fn(model(Variable(xa)), labels).backward()
    only_a = [host(p.grad) for p in model.parameters()]
    model.zero_grad()
    out_a = model(Variable(xa))
    model(Variable(xb))  # B in between
    loss_fn(out_a, labels).backward()
    for got, want in zip((host(p.grad) for p in model.parameters()), only_a):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_layer_interface_refuses_to_guess_which_forward(backend, rng):
    model = Sequential(L.Dense(3, 2, dtype="float64"))
    x = anycnn.asarray(rng.standard_normal((4, 3)))
    model.forward(x)
    y = model.forward(x)
    with pytest.raises(RuntimeError, match=r"ran forward 2 times .* cannot tell"):
        model.backward(y)
    y = model.forward(x)
    model.backward(y)  # one forward, one backward: fine
    with pytest.raises(RuntimeError, match=r"before forward, or twice|backward"):
        TinyNet().backward(y)
    net = TinyNet()
    out = net.forward(anycnn.asarray(rng.standard_normal((2, 6, 6, 1))))
    net.backward(out)
    with pytest.raises(RuntimeError, match="twice for one forward"):
        net.backward(out)
    with anycnn.no_grad():  # evaluation forwards do not count
        model.forward(x)
    model.backward(model.forward(x))


def test_a_graph_is_backpropagated_once(backend, rng):
    model = TinyNet()
    loss = losses.SoftmaxCrossEntropy()(model(anycnn.asarray(rng.standard_normal((2, 6, 6, 1)))),
                                        anycnn.asarray(np.array([0, 1])))
    loss.backward()
    with pytest.raises(RuntimeError, match="a second time"):
        loss.backward()


def test_two_losses_and_two_outputs(backend, rng):
    class TwoHeads(Module):
        def __init__(self):
            self.body = L.Dense(4, 6, dtype="float64")
            self.cls = L.Dense(6, 3, dtype="float64")
            self.reg = L.Dense(6, 2, dtype="float64")

        def forward(self, x):
            xp = anycnn.namespace_of(x)
            h = xp.tanh(self.body(x))
            return self.cls(h), self.reg(h)

    anycnn.manual_seed(4)
    model = TwoHeads()
    x = anycnn.asarray(rng.standard_normal((5, 4)))
    labels = anycnn.asarray(np.array([0, 1, 2, 1, 0]))
    target = anycnn.asarray(rng.standard_normal((5, 2)))
    ce, mse = losses.SoftmaxCrossEntropy(), losses.MSELoss()
    logits, box = model(x)
    total = ce(logits, labels) + 0.5 * mse(box, target)
    total.backward()
    summed = {n: host(p.grad) for n, p in model.named_parameters()}
    # the same through the layer interface, one gradient per output
    model.zero_grad()
    logits, box = model.forward(x)
    ce.forward(logits, labels)
    mse.forward(box, target)
    model.backward((ce.backward(), 0.5 * mse.backward()))
    for n, p in model.named_parameters():
        np.testing.assert_allclose(host(p.grad), summed[n], rtol=1e-12, atol=1e-14)
    assert check_gradients(_FirstOutput(model), x).ok


class _FirstOutput(Module):
    def __init__(self, inner):
        self.inner = inner

    def forward(self, x):
        logits, box = self.inner(x)
        return logits + box[:, :1]


def test_gradient_accumulation_over_micro_batches(backend, rng):
    anycnn.manual_seed(5)
    model = TinyNet()
    x = anycnn.asarray(rng.standard_normal((4, 6, 6, 1)))
    y = anycnn.asarray(np.array([0, 1, 2, 1]))
    ce = losses.SoftmaxCrossEntropy()
    model.eval()  # per-batch BatchNorm statistics would differ between the two splits
    ce(model(x), y).backward()
    whole = [host(p.grad) for p in model.parameters()]
    model.zero_grad()
    for part in (slice(0, 2), slice(2, 4)):
        (ce(model(x[part, ...]), y[part]) * 0.5).backward()
    for p, want in zip(model.parameters(), whole):
        np.testing.assert_allclose(host(p.grad), want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Freezing


def test_frozen_parameters_get_no_gradient_and_do_not_move(backend, rng):
    anycnn.manual_seed(6)
    model = Sequential(L.Conv2D(1, 4, 3, padding=1, dtype="float64"),
                       L.BatchNorm2D(4, dtype="float64"), L.ReLU(), L.GlobalAvgPool2D(),
                       L.Dense(4, 3, dtype="float64"))
    backbone = Sequential(*model.layers[:4])
    backbone.freeze(eval=True)
    before = {n: host(v).copy() for n, v in model.state_dict().items()}
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    ce = losses.SoftmaxCrossEntropy()
    x = anycnn.asarray(rng.standard_normal((4, 6, 6, 1)))
    y = anycnn.asarray(np.array([0, 1, 2, 1]))
    model.train()
    assert not model[1].training and model[4].training  # frozen BatchNorm kept in eval
    for _ in range(3):
        model.zero_grad()
        ce(model(x), y).backward()
        assert all(p.grad is None for p in backbone.parameters())
        opt.step()
    after = {n: host(v) for n, v in model.state_dict().items()}
    for name in before:
        moved = not np.array_equal(before[name], after[name])
        assert moved == name.startswith("4."), name  # BatchNorm statistics unchanged too
    backbone.unfreeze()
    model.train()
    assert model[1].training and all(p.requires_grad for p in model.parameters())


def test_a_frozen_prefix_runs_no_backward(backend, rng, monkeypatch):
    model = Sequential(L.Conv2D(1, 4, 3, padding=1), L.ReLU(), L.Flatten(), L.Dense(64, 2))
    model[0].freeze()
    called = []
    monkeypatch.setattr(L.Conv2D, "backward", lambda *a, **k: called.append(a))
    model.forward(anycnn.asarray(rng.standard_normal((2, 4, 4, 1)), dtype="float32"))
    model.backward(anycnn.asarray(np.ones((2, 2), np.float32)), input_grad=False)
    assert not called and model[3].weight.grad is not None


def test_trainer_keeps_frozen_batchnorm_in_eval(backend, rng):
    from anycnn.data.dataloader import DataLoader
    from anycnn.data.datasets import ArrayDataset
    from anycnn.train.trainer import Trainer

    anycnn.manual_seed(7)
    model = Sequential(L.Conv2D(1, 4, 3, padding=1), L.BatchNorm2D(4), L.ReLU(),
                       L.GlobalAvgPool2D(), L.Dense(4, 2))
    Sequential(*model.layers[:3]).freeze(eval=True)
    stats = host(model[1].running_mean).copy()
    data = ArrayDataset(rng.random((16, 5, 5, 1), dtype=np.float32),
                        rng.integers(0, 2, 16), 2)
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.1),
                      losses.SoftmaxCrossEntropy(), progress=False)
    trainer.fit(DataLoader(data, 8), epochs=1)
    np.testing.assert_array_equal(host(model[1].running_mean), stats)


# --------------------------------------------------------------------------------------------
# Dense on any rank, and forward-only modules everywhere a model goes


def test_dense_applies_to_the_last_axis(backend, rng):
    layer = L.Dense(3, 5, dtype="float64")
    x = rng.standard_normal((2, 4, 4, 3))
    y = host(layer.forward(anycnn.asarray(x)))
    w, b = host(layer.weight.data), host(layer.bias.data)
    np.testing.assert_allclose(y, x @ w + b, rtol=1e-12)
    assert check_gradients(layer, anycnn.asarray(x)).ok
    assert check_gradients(L.Dense(3, 2, dtype="float64"),
                           anycnn.asarray(rng.standard_normal((3,)))).ok


def test_forward_only_model_trains_saves_summarises_and_exports_names(backend, rng, tmp_path):
    from anycnn.data.dataloader import DataLoader
    from anycnn.data.datasets import ArrayDataset
    from anycnn.train.trainer import Trainer

    anycnn.manual_seed(8)
    model = TinyNet("float32")
    data = ArrayDataset(rng.random((32, 6, 6, 1), dtype=np.float32), rng.integers(0, 3, 32), 3)
    trainer = Trainer(model, optim.Adam(model.parameters(), lr=1e-2),
                      losses.SoftmaxCrossEntropy(), progress=False)
    history = trainer.fit(DataLoader(data, 8, shuffle=True, seed=0), epochs=3)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    names = [n for n, _ in model.named_parameters()]
    assert names[:3] == ["stem.weight", "stem.bias", "block.conv1.weight"]
    path = anycnn.save(model, tmp_path / "tiny.safetensors")
    fresh = TinyNet("float32")
    anycnn.load_weights(fresh, path)
    x = anycnn.asarray(rng.random((2, 6, 6, 1), dtype=np.float32))
    model.eval()
    fresh.eval()
    np.testing.assert_array_equal(host(fresh.forward(x)), host(model.forward(x)))
    text = str(anycnn.summary(model, (6, 6, 1)))
    assert "block.conv1" in text and "fc1" in text
    from anycnn.io.interop import from_torch_state_dict, to_torch_state_dict

    state = to_torch_state_dict(model)
    assert state["fc1.weight"].shape == (3, 4)  # torch's (out, in)
    assert state["block.conv1.weight"].shape == (4, 4, 3, 3)  # torch's (out, in, kh, kw)
    other = TinyNet("float32")
    from_torch_state_dict(other, state)
    other.eval()
    np.testing.assert_array_equal(host(other.forward(x)), host(model.forward(x)))


# --------------------------------------------------------------------------------------------
# Hand-written data-parallel loops


class _TwoRanks:
    """A stand-in communicator of two ranks whose other rank holds ``other`` (flat)."""

    size, rank = 2, 0

    def __init__(self, other):
        self.other = other

    def allreduce_(self, buf):
        return buf + anycnn.asarray(self.other, dtype=anycnn.backend.dtype_name(buf))


def test_average_gradients_and_the_warning_for_a_loop_that_skips_it(backend, rng, monkeypatch):
    import warnings

    from anycnn.dist import average_gradients
    from anycnn.optim import averaging

    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setattr(averaging, "_warned", False)
    averaging._ranks.cache_clear()
    try:
        model = Sequential(L.Dense(3, 2, dtype="float64"))
        model[0].freeze()  # frozen parameters are left out
        model[0].bias.requires_grad = True
        opt = optim.SGD(model.parameters(), lr=0.1)
        x = anycnn.asarray(rng.standard_normal((4, 3)))
        model.zero_grad()
        anycnn.namespace_of(model(x)).sum(model(x)).backward()
        with pytest.warns(RuntimeWarning, match="one of 2 ranks.*average_gradients"):
            opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()  # once per process
        monkeypatch.setattr(averaging, "_warned", False)
        model.zero_grad()
        anycnn.namespace_of(model(x)).sum(model(x)).backward()
        mine = host(model[0].bias.grad).copy()
        average_gradients(model, _TwoRanks(np.array([10.0, 20.0])))
        np.testing.assert_allclose(host(model[0].bias.grad), (mine + np.array([10.0, 20.0])) / 2)
        assert model[0].weight.grad is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()  # averaged: no warning
    finally:
        averaging._ranks.cache_clear()


# --------------------------------------------------------------------------------------------
# BatchNorm's pass takes in the ReLU and the residual sum written after it


class _Reuse(Module):
    """A BatchNorm output read by a fused ReLU and again by another operation; a second
    BatchNorm whose output nobody reads (its statistics must still move)."""

    def __init__(self):
        self.bn = L.BatchNorm2D(3, dtype="float64")
        self.dead = L.BatchNorm2D(3, dtype="float64")
        self.relu = L.ReLU()

    def forward(self, x):
        h = self.bn(x)
        self.dead(x)
        return self.relu(h + x) + self.relu(h) * 2 + h


@pytest.mark.parametrize("make", [lambda: Block(3), _Reuse], ids=["block", "reuse"])
def test_fused_batchnorm_chains_equal_the_unfused_ones(backend, rng, make):
    from anycnn.nn.modes import suspended

    x = anycnn.asarray(rng.standard_normal((2, 5, 5, 3)))
    dy = anycnn.asarray(rng.standard_normal((2, 5, 5, 3)))
    results = []
    for fused in (True, False):
        anycnn.manual_seed(9)
        model = make()
        if fused:
            y = model.forward(x)
            dx = model.backward(dy)
        else:
            with suspended():
                y = model.forward(x)
                dx = model.backward(dy)
        results.append([host(y), host(dx)]
                       + [None if p.grad is None else host(p.grad) for p in model.parameters()]
                       + [host(b) for _, b in model.named_buffers()])
    for got, want in zip(*results):
        assert (got is None) == (want is None)  # an unused BatchNorm gets no gradient
        if got is not None:
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert check_gradients(make(), x).ok


def test_a_fused_batchnorm_moves_its_statistics_once(backend, rng):
    model = _Reuse()
    x = anycnn.asarray(rng.standard_normal((2, 5, 5, 3)))
    model.forward(x)
    mean = host(x).mean(axis=(0, 1, 2))
    for bn in (model.bn, model.dead):  # momentum 0.1 from zeros: one update is 0.1 * mean
        np.testing.assert_allclose(host(bn.running_mean), 0.1 * mean, rtol=1e-12)


def test_a_subclass_of_a_forward_only_model_overrides_forward(backend, rng):
    class Base(Module):
        def __init__(self):
            self.fc = L.Dense(2, 3, dtype="float64")

        def forward(self, x):
            return self.fc(x)

    class Doubled(Base):
        def forward(self, x):
            return super().forward(x) * 2

    x = anycnn.asarray(rng.standard_normal((4, 2)))
    model = Doubled()
    assert isinstance(model(x), Variable)
    np.testing.assert_allclose(host(model.forward(x)), 2 * host(Base.forward(model, x)))
    model.release()
    assert check_gradients(model, x).ok


def test_layers_in_a_plain_list_are_reported_and_module_list_holds_them(backend, rng):
    class InList(Module):
        def __init__(self):
            self.layers = [L.Dense(3, 3, dtype="float64"), L.Dense(3, 2, dtype="float64")]

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    class InModuleList(InList):
        def __init__(self):
            self.layers = anycnn.nn.ModuleList(
                [L.Dense(3, 3, dtype="float64")]).append(L.Dense(3, 2, dtype="float64"))

    x = anycnn.asarray(rng.standard_normal((4, 3)))
    with pytest.warns(UserWarning, match=r"InList.forward uses Dense that InList does not "
                      "hold as an attribute"):
        InList().forward(x)
    model = InModuleList()
    assert [n for n, _ in model.named_parameters()] == [
        "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    assert len(model.layers) == 2 and model.layers[1] is list(model.layers)[1]
    assert check_gradients(model, x).ok


# --------------------------------------------------------------------------------------------
# Re-heading a network (issue 24's first pieces)


def test_sequential_slicing_assignment_and_append(backend, rng):
    model = Sequential(L.Conv2D(1, 4, 3), L.ReLU(), L.GlobalAvgPool2D(), L.Dense(4, 10))
    backbone = model[:-1]
    assert isinstance(backbone, Sequential) and len(backbone) == 3
    assert backbone[0] is model[0]  # the same layers
    model[-1] = L.Dense(4, 2)
    x = anycnn.asarray(rng.random((2, 6, 6, 1), dtype=np.float32))
    assert tuple(model.forward(x).shape) == (2, 2)
    assert [n for n, _ in model.named_parameters()][-2:] == ["3.weight", "3.bias"]
    model.append(L.ReLU())
    assert len(model) == 5 and tuple(model.forward(x).shape) == (2, 2)
    with pytest.raises(IndexError, match="out of range"):
        model[7] = L.ReLU()
    from anycnn.errors import ConfigError

    with pytest.raises(ConfigError, match="not a Module"):
        model[0] = "conv"


def test_load_state_dict_strict_false_reports_missing_and_unexpected(backend, rng):
    from anycnn.errors import CheckpointError

    source = Sequential(L.Conv2D(1, 4, 3), L.ReLU(), L.GlobalAvgPool2D(), L.Dense(4, 10))
    state = {k: host(v) for k, v in source.state_dict().items()}
    target = Sequential(L.Conv2D(1, 4, 3), L.ReLU(), L.GlobalAvgPool2D(), L.Dense(4, 10),
                        L.Dense(10, 2))
    with pytest.raises(CheckpointError, match=r"'4.weight'.*strict=False"):
        target.load_state_dict(state)
    head = host(target[4].weight.data).copy()
    result = target.load_state_dict({**state, "extra.bias": np.zeros(2)}, strict=False)
    assert result.missing == ["4.weight", "4.bias"] and result.unexpected == ["extra.bias"]
    np.testing.assert_array_equal(host(target[0].weight.data), state["0.weight"])
    np.testing.assert_array_equal(host(target[4].weight.data), head)  # kept
    bad = {**state, "3.weight": np.zeros((4, 3))}
    with pytest.raises(CheckpointError, match=r"'3.weight' has shape"):
        target.load_state_dict(bad, strict=False)  # shapes must still agree
    assert target.load_state_dict({k: host(v) for k, v in target.state_dict().items()}) == (
        [], [])


class _SharedEncoder(Module):
    """One Sequential of fusable blocks (Conv → ReLU → MaxPool, BatchNorm → ReLU) applied to
    two inputs before one backward, as a siamese network does."""

    def __init__(self):
        self.encoder = Sequential(L.Conv2D(1, 8, 3), L.ReLU(), L.MaxPool2D(2),
                                  L.Conv2D(8, 8, 3, padding=1), L.BatchNorm2D(8), L.ReLU(),
                                  L.GlobalAvgPool2D(), L.Dense(8, 4))

    def forward(self, a, b):
        xp = anycnn.namespace_of(a)
        ea, eb = self.encoder(a), self.encoder(b)
        return xp.sum((ea - eb) ** 2) + 0.1 * xp.sum(ea ** 2)


def test_a_sequential_of_fused_blocks_called_twice_keeps_each_calls_state():
    """Each call's fused steps keep their own state until its backward: the gradients equal
    those with fusion suspended (every layer's own forward and backward, per-call state
    captured). A Sequential that reused one call's fused steps for the next fails this."""
    from anycnn.nn.modes import suspended

    rng = np.random.default_rng(0)
    a = anycnn.asarray(rng.standard_normal((4, 16, 16, 1)).astype(np.float32))
    b = anycnn.asarray(3 * rng.standard_normal((4, 16, 16, 1)).astype(np.float32))
    grads = []
    for fuse in (True, False):
        anycnn.manual_seed(0)
        net = _SharedEncoder()
        for _ in range(2):  # a second step: anything kept from the first must not leak
            for p in net.parameters():
                p.grad = None
            if fuse:
                net(a, b).backward()
            else:
                with suspended():
                    net(a, b).backward()
        grads.append({n: host(p.grad) for n, p in net.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        np.testing.assert_allclose(grads[0][name], grads[1][name], rtol=2e-4, atol=2e-5,
                                   err_msg=name)
