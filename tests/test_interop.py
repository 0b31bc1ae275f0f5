"""PyTorch interop: state_dict names/layouts both ways, and torch_module gives the same logits."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import anycnn
from anycnn import layers as L
from anycnn import losses, optim
from anycnn.errors import CheckpointError, ConfigError
from anycnn.io.interop import from_torch_state_dict, to_torch_state_dict, torch_module
from anycnn.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def nhwc(n=4, h=28, w=28, c=1, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((n, h, w, c)).astype(dtype)


def anycnn_logits(model, x):
    return anycnn.to_numpy(model(anycnn.asarray(x)))


def torch_logits(torch, module, x):
    with torch.no_grad():
        return module(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


def train_once(model, x, classes=10):
    """One SGD step (moves BatchNorm running stats and weights off their initial values)."""
    model.train()
    loss = losses.SoftmaxCrossEntropy()
    y = np.arange(x.shape[0]) % classes
    loss.forward(model(anycnn.asarray(x)), anycnn.asarray(y))
    model.backward(loss.backward())
    optim.SGD(model.parameters(), lr=0.05).step()


def randomize_torch(torch, module):
    """Non-trivial values everywhere, including BatchNorm affine and running statistics."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            values = torch.rand(tensor.shape, generator=gen, dtype=tensor.dtype)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + values)
            else:
                tensor.copy_((values - 0.5) * 0.4)


@pytest.mark.parametrize("name", ["lenet5", "simple-cnn", "bn-cnn"])
def test_export_matches_torch(backend, torch, name):
    model = build_model(name)
    x = nhwc()
    if name == "bn-cnn":
        train_once(model, nhwc(n=8, seed=1))
    model.eval()
    state = to_torch_state_dict(model, (28, 28, 1))
    module = torch_module(model, (28, 28, 1), copy_weights=False).eval()
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})  # strict
    np.testing.assert_allclose(torch_logits(torch, module, x), anycnn_logits(model, x), **TOL)
    # torch_module copies the weights itself, and follows the model's mode
    module2 = torch_module(model, (28, 28, 1))
    assert not module2.training
    np.testing.assert_allclose(torch_logits(torch, module2, x), anycnn_logits(model, x), **TOL)


@pytest.mark.parametrize("name", ["lenet5", "simple-cnn", "bn-cnn"])
def test_import_matches_torch(backend, torch, name):
    model = build_model(name).eval()
    module = torch_module(model, (28, 28, 1), copy_weights=False).eval()
    randomize_torch(torch, module)
    from_torch_state_dict(model, module.state_dict(), (28, 28, 1))
    x = nhwc(seed=3)
    np.testing.assert_allclose(anycnn_logits(model, x), torch_logits(torch, module, x), **TOL)
    # and the round trip back to torch layout is exact
    for key, value in to_torch_state_dict(model, (28, 28, 1)).items():
        np.testing.assert_array_equal(value, module.state_dict()[key].numpy(), err_msg=key)


def test_names_and_layouts(backend):
    model = build_model("bn-cnn")
    state = to_torch_state_dict(model)  # channel count known from the convolutions
    assert state["0.weight"].shape == (32, 1, 3, 3)
    assert "0.bias" not in state  # bias=False
    assert state["16.weight"].shape == (10, 64)
    assert state["1.num_batches_tracked"].dtype == np.int64
    assert state["1.num_batches_tracked"].shape == ()
    assert set(state) == {*model.state_dict(), *(f"{i}.num_batches_tracked"
                                                 for i in (1, 4, 8, 11))}
    w = anycnn.to_numpy(model.state_dict()["0.weight"])
    np.testing.assert_array_equal(state["0.weight"], np.transpose(w, (3, 2, 0, 1)))


def test_flatten_order_is_permuted(backend):
    """Dense after Flatten: anycnn rows are (h, w, c), torch columns are (c, h, w)."""
    h, w, c = 3, 5, 2
    model = anycnn.Sequential(L.Flatten(), L.Dense(h * w * c, 4))
    state = to_torch_state_dict(model, (h, w, c))
    wa = anycnn.to_numpy(model.state_dict()["1.weight"])  # (h*w*c, out)
    wt = state["1.weight"]  # (out, c*h*w)
    for i, j, k in np.ndindex(h, w, c):
        np.testing.assert_array_equal(wt[:, (k * h + i) * w + j], wa[(i * w + j) * c + k])


def test_zoo_matches_torch(backend, torch):
    """Every supported layer, odd sizes, nesting, flat BatchNorm and float64.

    Sizes: 9x5x2 -> conv (3, 2)/(2, 1) pad (1, 0) -> 5x4x4 -> 'same' -> 5x4x3 -> avg pool
    (ceil, pad 1) -> 6x5x3 -> max pool (ceil) -> 5x4x3 -> 60 flat features.
    """
    anycnn.manual_seed(3)
    model = anycnn.Sequential(
        L.Conv2D(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=1),
        L.BatchNorm2D(4), L.LeakyReLU(0.1),
        anycnn.Sequential(L.Conv2D(4, 3, 2, padding="same", bias=False), L.Tanh()),
        L.AvgPool2D(2, stride=1, padding=1, count_include_pad=False, ceil_mode=True),
        L.MaxPool2D(2, stride=1, ceil_mode=True),
        L.Flatten(), L.BatchNorm2D(5 * 4 * 3), L.Sigmoid(), L.Dropout(0.3),
        L.Dense(5 * 4 * 3, 5, bias=False), L.ReLU(), L.Dense(5, 3),
    ).to("float64")
    x = nhwc(n=5, h=9, w=5, c=2, seed=4, dtype=np.float64)
    train_once(model, x, classes=3)
    model.eval()
    module = torch_module(model, (9, 5, 2))
    assert next(module.parameters()).dtype == torch.float64
    np.testing.assert_allclose(torch_logits(torch, module, x), anycnn_logits(model, x),
                               rtol=1e-10, atol=1e-12)

    randomize_torch(torch, module)
    from_torch_state_dict(model, module.state_dict(), (9, 5, 2))
    np.testing.assert_allclose(anycnn_logits(model, x), torch_logits(torch, module, x),
                               rtol=1e-10, atol=1e-12)


def test_global_pool_keeps_indices_aligned(backend, torch):
    model = anycnn.Sequential(L.Conv2D(1, 3, 3), L.GlobalAvgPool2D(), L.Dense(3, 2))
    module = torch_module(model)
    assert set(module.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    x = nhwc(n=2, h=6, w=7)
    np.testing.assert_allclose(torch_logits(torch, module, x), anycnn_logits(model, x), **TOL)


def test_shape_mismatch_names_tensor_and_shapes(backend):
    lenet = to_torch_state_dict(build_model("lenet5"))
    target = build_model("simple-cnn")
    before = {k: anycnn.to_numpy(v).copy() for k, v in target.state_dict().items()}
    lenet = {k: v for k, v in lenet.items() if k in to_torch_state_dict(target)}
    with pytest.raises(CheckpointError) as info:
        from_torch_state_dict(target, lenet)
    msg = str(info.value)
    assert "'0.weight'" in msg and "(6, 1, 5, 5)" in msg and "(32, 1, 3, 3)" in msg
    for k, v in target.state_dict().items():
        np.testing.assert_array_equal(anycnn.to_numpy(v), before[k])


def test_missing_and_unexpected_keys(backend):
    model = build_model("bn-cnn")
    state = to_torch_state_dict(model)
    no_counters = {k: v for k, v in state.items() if "num_batches_tracked" not in k}
    from_torch_state_dict(model, no_counters)  # num_batches_tracked is optional
    with pytest.raises(CheckpointError, match=r"missing.*'16\.bias'"):
        from_torch_state_dict(model, {k: v for k, v in state.items() if k != "16.bias"})
    with pytest.raises(CheckpointError, match=r"unexpected.*'fc\.weight'"):
        from_torch_state_dict(model, {**state, "fc.weight": np.zeros((2, 2), np.float32)})


def test_input_shape_is_checked(backend):
    model = build_model("simple-cnn")
    with pytest.raises(ConfigError, match="input features"):
        to_torch_state_dict(model, (32, 32, 1))
    with pytest.raises(ConfigError, match="channels"):
        to_torch_state_dict(model, (28, 28, 3))
    with pytest.raises(ConfigError, match="input_shape"):
        to_torch_state_dict(anycnn.Sequential(L.Flatten(), L.Dense(12, 2)))


def test_unsupported_layer(backend):
    class Custom(anycnn.Module):
        def forward(self, x):
            return x

    class HandWritten(anycnn.Module):  # forward and backward: no PyTorch counterpart
        def forward(self, x):
            return x

        def backward(self, dy, input_grad=True):
            return dy

    with pytest.raises(ConfigError, match=r"layer 1 \(HandWritten\)"):
        to_torch_state_dict(anycnn.Sequential(L.Dense(2, 2), HandWritten()))
    # written as code: its tensors export by name, but there is no forward to mirror
    assert set(to_torch_state_dict(anycnn.Sequential(L.Dense(2, 2), Custom()))) == {
        "0.weight", "0.bias"}
    with pytest.raises(ConfigError, match=r"layer 1 \(Custom\) is written as code"):
        torch_module(anycnn.Sequential(L.Dense(2, 2), Custom()))


def test_import_does_not_load_torch():
    code = "import sys, anycnn.io.interop; print('torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANYCNN_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
