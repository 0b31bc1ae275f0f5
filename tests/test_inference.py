"""Eval mode's fast path (:mod:`anycnn.nn.inference`): BatchNorm folded into the convolution
before it, the ReLU and the residual sum in the convolution's pass. Folded forwards equal the
layer-by-layer forward (float64, tight tolerance) on every backend and kernel path; the fold is
never stale (new arrays, in-place optimizer steps, new running statistics, a new eps, train()
then eval()); it never touches the real parameters (training after eval, checkpoints)."""

from __future__ import annotations

import numpy as np
import pytest

import anycnn
from anycnn.backend import writes_in_place
from anycnn.io.checkpoint import load_checkpoint, save_checkpoint
from anycnn.kernels import native
from anycnn.kernels import threads as kthreads
from anycnn.models import build_model, model_spec
from anycnn.nn import BatchNorm2D, Conv2D, Dense, Flatten, MaxPool2D, ReLU, Residual, Sequential
from anycnn.nn.inference import ConvReLU, DenseReLU, EvalPlan, fold_batch_norm, unfolded
from anycnn.nn.modes import suspended
from anycnn.optim.optimizers import SGD
from anycnn.train.inference import predict

PRESETS = ["lenet5", "simple-cnn", "bn-cnn", "resnet20", "resnet-mini"]
WITH_BN = ["bn-cnn", "resnet20", "resnet-mini"]


@pytest.fixture(params=["compiled", "numpy", "portable"])
def kernels(request, monkeypatch):
    """On NumPy, each test three times: with the compiled kernels (where halide is
    installed), the NumPy fast paths alone (``ANYCNN_NATIVE=0``) and the portable code alone
    (``ANYCNN_FASTPATH=0``); once on the other backends."""
    if anycnn.get_backend().name != "numpy":
        if request.param != "compiled":
            pytest.skip("the kernel switches are NumPy's")
        return request.param
    if request.param == "compiled" and not native.available(np):
        pytest.skip("the compiled kernels are off here (anycnn info says why)")
    monkeypatch.setattr(native, "ENABLED", request.param == "compiled")
    monkeypatch.setattr(kthreads, "ENABLED", request.param != "portable")
    return request.param


def _watch(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name``: the returned list gets each call's arguments."""
    calls, kernel = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append((a, kw)) or kernel(*a, **kw))
    return calls


def _host(a):
    return np.array(anycnn.to_numpy(a))


def _norms(model):
    return [m for m in model.modules() if type(m) is BatchNorm2D]


def _scramble_norms(model, rng):
    """Give every BatchNorm2D random affine parameters and running statistics (as after
    training), so a wrong fold cannot pass for the identity."""
    for bn in _norms(model):
        c = bn.num_features
        bn.weight.data = anycnn.asarray(rng.normal(1.0, 0.5, c))
        bn.bias.data = anycnn.asarray(rng.normal(0.0, 0.5, c))
        bn.running_mean = anycnn.asarray(rng.normal(0.0, 0.5, c))
        bn.running_var = anycnn.asarray(rng.random(c) + 0.5)


def _model(name, rng):
    """A preset in float64 with scrambled BatchNorms, in eval mode, and a batch for it."""
    spec = model_spec(name)
    model = build_model(name)
    model.to("float64")
    _scramble_norms(model, rng)
    model.eval()
    side = spec["image_size"] if name != "resnet20" else 16  # fully convolutional: smaller
    x = anycnn.asarray(rng.normal(size=(3, side, side, spec["in_channels"])))
    return model, x


def _reference(model, x):
    """The forward layer by layer: nothing fused, nothing folded."""
    with suspended():
        return _host(model.forward(x))


def _close(actual, expected):
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(_host(actual), expected, rtol=0, atol=1e-11 * scale)


@pytest.mark.parametrize("name", PRESETS)
def test_folded_forward_equals_layer_by_layer(backend, kernels, rng, name):
    model, x = _model(name, rng)
    expected = _reference(model, x)
    for bn in _norms(model):
        bn._ctx = None  # what the layer-by-layer forward kept
    _close(model.forward(x), expected)
    if name in WITH_BN:  # folded: no BatchNorm ran, each holds its fold
        assert all(bn._ctx is None and bn._derived is not None for bn in _norms(model))
    with unfolded():  # the fusions without the fold agree too
        _close(model.forward(x), expected)
    if name in WITH_BN:
        assert all(bn._ctx is not None for bn in _norms(model))


def test_fold_formula(backend, rng):
    """fold_batch_norm is conv → BN written as one convolution (with and without a bias)."""
    conv, bn = Conv2D(3, 4, 3, padding=1, dtype="float64"), BatchNorm2D(4, eps=0.1)
    bn.to("float64")
    _scramble_norms(Sequential(bn), rng)
    conv.eval(), bn.eval()
    x = anycnn.asarray(rng.normal(size=(2, 5, 5, 3)))
    expected = _host(bn.forward(conv.forward(x)))
    for bias in (conv.bias.data, None):
        w, b = fold_batch_norm(conv.weight.data, bias, bn.weight.data, bn.bias.data,
                               bn.running_mean, bn.running_var, bn.eps)
        y = anycnn.nn.functional.conv2d_forward(x, w, b, (1, 1), conv.pads, (1, 1))[0]
        if bias is None:  # the convolution's own bias, scaled, is then missing
            y = y + conv.bias.data * (bn.weight.data / (bn.running_var + bn.eps) ** 0.5)
        _close(y, expected)


def test_fold_is_kept_while_nothing_changes(backend, rng):
    model, x = _model("resnet-mini", rng)
    model.forward(x)
    twins = [bn._derived.twin for bn in _norms(model)]
    model.forward(x)
    assert [bn._derived.twin for bn in _norms(model)] == twins
    model.eval()  # a switch to eval folds again
    assert all(bn._derived is None for bn in _norms(model))


def _first_pair(model):
    conv, bn = model[0], model[1]
    assert type(conv) is Conv2D and type(bn) is BatchNorm2D
    return conv, bn


def _sequentials(model):
    return [m for m in model.modules() if isinstance(m, Sequential)]


def test_eval_plan_is_kept_while_nothing_changes(backend, rng):
    """Each Sequential keeps its eval plan (folds and fusions) between forwards; train() and
    eval() drop it."""
    model, x = _model("resnet-mini", rng)
    model.forward(x)
    kept = [s._derived for s in _sequentials(model)]
    plans = [s._plan for s in _sequentials(model)]
    assert all(isinstance(k, EvalPlan) for k in kept)
    model.forward(x)
    assert all(s._derived is k for s, k in zip(_sequentials(model), kept))
    assert all(s._plan is p for s, p in zip(_sequentials(model), plans))
    for mode in ("train", "eval"):
        getattr(model, mode)()
        assert all(s._derived is None for s in _sequentials(model))
    model.train()
    model.forward(x)  # training keeps none
    assert all(s._derived is None for s in _sequentials(model))
    model.eval()
    model.forward(x)
    model.fuse = False  # then the layers run as they are, the kept plan unused
    model.forward(x)
    assert model._plan == model.layers


@pytest.mark.parametrize("change", ["weight", "gamma", "beta", "running_mean", "running_var",
                                    "eps", "load_state_dict", "to", "stride", "bias",
                                    "no bias", "layer", "layer attribute"])
def test_fold_follows_new_values(backend, kernels, rng, change):
    """Whatever is replaced after a folded forward, the next forward uses it (the kept
    eval plans and folds are made again)."""
    model, x = _model("resnet-mini", rng)
    model.forward(x)
    conv, bn = _first_pair(model)
    c = bn.num_features
    if change == "to":
        model.to("float32")
        model.to("float64")
    elif change == "stride":
        conv.stride = (2, 2)
    elif change in ("bias", "no bias"):
        conv.bias = anycnn.nn.Parameter(anycnn.asarray(rng.normal(size=c)))
        if change == "no bias":
            model.forward(x)
            conv.bias = None
    elif change in ("layer", "layer attribute"):
        new = Conv2D(conv.in_channels, c, 3, padding=1, bias=False, dtype="float64").eval()
        if change == "layer":
            model[0] = new
        else:
            setattr(model, "0", new)
    elif change == "weight":
        conv.weight.data = anycnn.asarray(rng.normal(size=conv.weight.shape))
    elif change == "gamma":
        bn.weight.data = anycnn.asarray(rng.normal(size=c))
    elif change == "beta":
        bn.bias.data = anycnn.asarray(rng.normal(size=c))
    elif change == "running_mean":
        bn.running_mean = anycnn.asarray(rng.normal(size=c))
    elif change == "running_var":
        bn.running_var = anycnn.asarray(rng.random(c) + 2.0)
    elif change == "eps":
        bn.eps = 0.5
    else:
        other, _ = _model("resnet-mini", np.random.default_rng(7))
        model.load_state_dict(other.state_dict())
    _close(model.forward(x), _reference(model, x))


def test_fold_follows_in_place_optimizer_steps_in_eval_mode(backend, kernels, rng):
    """Training in eval mode (BatchNorm frozen): the eval-mode backward runs the forward
    again unfolded, and an optimizer updating the arrays in place is seen by the next
    forward (the parameters' version)."""
    model, x = _model("resnet-mini", rng)
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    conv, _ = _first_pair(model)
    before = conv.weight.data
    for _ in range(2):
        model.zero_grad()
        y = model.forward(x)
        model.backward(anycnn.asarray(np.ones(tuple(y.shape))))
        opt.step()
        _close(model.forward(x), _reference(model, x))
    if writes_in_place(anycnn.get_backend().xp):
        assert conv.weight.data is before  # the same array, changed in place


def test_in_place_write_is_seen_after_eval(backend, rng):
    """A hand-written in-place change is seen after ``model.eval()`` (or ``p.data = p.data``)."""
    if not writes_in_place(anycnn.get_backend().xp):
        pytest.skip("this backend's arrays are immutable")
    model, x = _model("resnet-mini", rng)
    model.forward(x)
    conv, bn = _first_pair(model)
    conv.weight.data[...] = 0.5 * conv.weight.data
    bn.running_var[...] = 3.0
    model.eval()
    _close(model.forward(x), _reference(model, x))
    conv.weight.data[...] = 2.0 * conv.weight.data
    conv.weight.data = conv.weight.data
    bn.running_var[...] = 5.0
    bn.running_var = bn.running_var * 1.0
    _close(model.forward(x), _reference(model, x))


def test_fold_follows_training_then_eval(backend, rng):
    """Eval, train (weights and running statistics move), eval again: the new values."""
    model, x = _model("resnet-mini", rng)
    first = _host(model.forward(x))
    model.train()
    opt = SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        model.zero_grad()
        y = model.forward(x)
        model.backward(anycnn.asarray(np.ones(tuple(y.shape))), input_grad=False)
        opt.step()
    model.eval()
    after = model.forward(x)
    _close(after, _reference(model, x))
    assert not np.allclose(_host(after), first)


def test_fold_never_touches_the_parameters(backend, rng, tmp_path):
    """Folded forwards leave every parameter and buffer as it was (the same arrays, the same
    values); a checkpoint saved in eval mode holds them, not the folded ones."""
    model, x = _model("resnet-mini", rng)
    state = model.state_dict()
    copies = {k: _host(v) for k, v in state.items()}
    model.forward(x)
    model.forward(x)
    for name, value in model.state_dict().items():
        assert value is state[name]
        np.testing.assert_array_equal(_host(value), copies[name])
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "eval.safetensors", model))
    assert set(ckpt.tensors) == set(copies)
    for name, value in copies.items():
        np.testing.assert_array_equal(ckpt.tensors[name], value)


def test_training_after_eval_is_unchanged(backend, kernels, rng):
    """Two copies of a model: one evaluated (folded) between training steps, one not; their
    parameters stay identical, bit for bit."""
    models = [build_model("resnet-mini") for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x = anycnn.asarray(rng.normal(size=(4, 12, 12, 1)).astype(np.float32))
    opts = [SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    for _ in range(3):
        for i, (model, opt) in enumerate(zip(models, opts)):
            if i == 0:
                model.eval()
                model.forward(x)
            model.train()
            model.zero_grad()
            y = model.forward(x)
            model.backward(anycnn.asarray(np.ones(tuple(y.shape), np.float32)),
                           input_grad=False)
            opt.step()
    assert any(bn._derived is None for bn in _norms(models[0]))  # train() dropped the fold
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        np.testing.assert_array_equal(_host(a), _host(b), err_msg=name)


def test_eval_mode_gradients_equal_the_unfolded_ones(backend, kernels, rng):
    """A backward after a folded forward (saliency maps): input and parameter gradients as
    without folding; also through a recorded call (Variables)."""
    model, x = _model("resnet-mini", rng)
    dy = anycnn.asarray(rng.normal(size=(3, 10)))
    grads = []
    for fold in (True, False):
        model.zero_grad()
        if fold:
            model.forward(x)
        else:
            with suspended():
                model.forward(x)
        dx = model.backward(dy)
        grads.append([_host(dx)] + [_host(p.grad) for p in model.parameters()])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    model.zero_grad()
    out = model(x)
    (out * dy).sum().backward()
    for p, expected in zip(model.parameters(), grads[1][1:]):
        np.testing.assert_allclose(_host(p.grad), expected, rtol=1e-9, atol=1e-12)


def test_frozen_eval_backbone_is_not_folded_while_training(backend, rng):
    """freeze(eval=True) keeps BatchNorm in eval mode during training: the Sequential that
    trains is not folded (its backward must not pay a second forward)."""
    model = build_model("bn-cnn")
    model[:-1].freeze(eval=True)
    model.train()
    x = anycnn.asarray(rng.normal(size=(2, 28, 28, 1)).astype(np.float32))
    model.forward(x)
    assert all(bn._derived is None for bn in _norms(model))
    model.eval()
    model.forward(x)
    assert all(bn._derived is not None for bn in _norms(model))


def test_a_module_in_training_mode_deep_in_the_tree_stops_the_fold(backend, rng):
    """One module in training mode anywhere in an eval-mode model (here a residual body's
    last layer): nothing is folded, also after forwards that folded."""
    model, x = _model("resnet-mini", rng)
    model.forward(x)
    body = next(m for m in model.modules() if isinstance(m, Residual)).body
    body[-1].train()
    model.forward(x)
    own = {id(m) for m in model.modules()}
    for seq in _sequentials(model):
        steps = [m for step in seq._plan
                 for m in ([step] if isinstance(step, anycnn.nn.Module) else step.layers())]
        assert all(id(m) in own for m in steps)  # no folded stand-in


def test_predict_uses_the_fold(backend, rng):
    model, x = _model("bn-cnn", rng)
    model.train()
    logits = predict(model, _host(x))
    assert all(bn._derived is not None for bn in _norms(model))
    model.eval()
    np.testing.assert_allclose(logits, _reference(model, x), rtol=0, atol=1e-10)
    assert model.training is False


def test_no_fold_across_mismatched_layers(backend, rng):
    """A BatchNorm of another channel count or dtype is not folded: its error is as before."""
    model = Sequential(Conv2D(1, 4, 3), BatchNorm2D(5))
    model.eval()
    with pytest.raises(anycnn.errors.ShapeError, match="BatchNorm2D"):
        model.forward(anycnn.asarray(np.ones((1, 5, 5, 1), np.float32)))
    model = Sequential(Conv2D(1, 4, 3), BatchNorm2D(4, dtype="float64"))
    model.eval()
    with pytest.raises(anycnn.errors.ShapeError):
        model.forward(anycnn.asarray(np.ones((1, 5, 5, 1), np.float32)))
    assert model[1]._derived is None


@pytest.mark.parametrize("relu", [False, True])
def test_residual_body_ending_in_a_convolution(backend, kernels, rng, relu):
    """Conv2D.forward_add (the sum in the convolution's pass), in training and eval, forward
    and backward, against the layers one by one; a wrong shape names both paths."""
    body = Sequential(Conv2D(8, 8, 3, padding=1, dtype="float64"), ReLU(),
                      Conv2D(8, 8, 3, padding=1, dtype="float64"))
    layers = [Residual(body), ReLU()] if relu else [Residual(body)]
    model = Sequential(*layers)
    x = anycnn.asarray(rng.normal(size=(2, 6, 6, 8)))
    dy = anycnn.asarray(rng.normal(size=(2, 6, 6, 8)))
    for mode in ("train", "eval"):
        getattr(model, mode)()
        outs = []
        for fused in (True, False):
            model.zero_grad()
            if fused:
                y = model.forward(x)
            else:
                with suspended():
                    y = model.forward(x)
            dx = model.backward(dy)
            outs.append([_host(y), _host(dx)] + [_host(p.grad) for p in model.parameters()])
        for a, b in zip(*outs):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    bad = Residual(Sequential(Conv2D(8, 4, 3, padding=1)))
    with pytest.raises(anycnn.errors.ShapeError, match="Residual"):
        bad.forward(anycnn.asarray(np.ones((1, 6, 6, 8), np.float32)))


def test_conv_relu_runs_fused_in_eval_only(backend, rng):
    model = Sequential(Conv2D(2, 8, 3), ReLU(), Conv2D(8, 8, 3))
    x = anycnn.asarray(rng.normal(size=(2, 7, 7, 2)).astype(np.float32))
    model.forward(x)
    assert not any(isinstance(step, ConvReLU) for step in model._plan)
    model.eval()
    y = model.forward(x)
    assert isinstance(model._plan[0], ConvReLU)
    np.testing.assert_allclose(_host(y), _reference(model, x), rtol=1e-5, atol=1e-6)


def test_epilogue_kernel_equals_portable(backend, rng):
    """The compiled convolution with a bias, an addend and a ReLU in its kernel equals the
    portable expression (NaN kept by the ReLU, as NumPy's maximum)."""
    if anycnn.get_backend().name != "numpy" or not native.available(np):
        pytest.skip("the compiled kernels are off here")
    from anycnn.nn.functional.conv import conv_windows

    for dtype in (np.float32, np.float64):
        x = rng.normal(size=(3, 9, 7, 16)).astype(dtype)
        x[0, 0, 0, :] = np.nan
        w = rng.normal(size=(3, 3, 16, 32)).astype(dtype)
        b = rng.normal(size=32).astype(dtype)
        for stride, pads in ((1, (1, 1, 1, 1)), (2, (1, 1, 1, 1)), (1, (0, 0, 0, 0))):
            win = conv_windows((9, 7), (3, 3), (stride, stride), pads, (1, 1))
            plus = rng.normal(size=(3, *win.out, 32)).astype(dtype)
            plain = native.conv2d(x, w, None, stride, pads, win.out)
            for addend in (None, plus):
                for relu in (False, True):
                    if addend is None and not relu:
                        continue
                    got = native.conv2d_epilogue(x, w, b, stride, pads, win.out, addend, relu)
                    want = plain + b + (0 if addend is None else addend)
                    want = np.maximum(want, 0) if relu else want
                    np.testing.assert_allclose(got, want, rtol=1e-4 if dtype == np.float32
                                               else 1e-12, atol=1e-4 if dtype == np.float32
                                               else 1e-12)
                    assert np.isnan(got[0, 0, 0]).all()


class _ReadTwice(anycnn.nn.Module):
    """A convolution output that a BatchNorm takes in and something else reads as well."""

    def __init__(self) -> None:
        self.conv = Conv2D(3, 8, 3, padding=1, dtype="float64")
        self.bn = BatchNorm2D(8, dtype="float64")
        self.relu = ReLU()

    def forward(self, x):
        h = self.conv(x)
        return self.relu(self.bn(h) + h * 2.0)


@pytest.mark.parametrize("name", ["resnet20-code", "read-twice"])
def test_models_as_code_fold_with_gradients_off(backend, kernels, rng, name):
    """A model written as code folds ``bn(conv(x))`` (its ReLU and residual sum too) under
    no_grad, as predict and evaluate run it; with gradients on it runs its layers (and its
    eval-mode gradients are the layers')."""
    model = build_model(name) if name != "read-twice" else _ReadTwice()
    model.to("float64")
    _scramble_norms(model, rng)
    model.eval()
    x = anycnn.asarray(rng.normal(size=(2, 8, 8, 3)))
    expected = _reference(model, x)
    for bn in _norms(model):
        bn._ctx = None
    with anycnn.no_grad():
        _close(model.forward(x), expected)
    assert all(bn._ctx is None and bn._derived is not None for bn in _norms(model))
    out = model(x)  # gradients on: recorded, the BatchNorms run
    _close(out.data, expected)
    assert all(bn._ctx is not None for bn in _norms(model)
               if name == "read-twice" or not _in_sequential(model, bn))
    dy = anycnn.asarray(rng.normal(size=tuple(out.shape)))
    model.zero_grad()
    (out * dy).sum().backward()
    grads = [_host(p.grad) for p in model.parameters()]
    model.zero_grad()
    with suspended():
        (model(x) * dy).sum().backward()
    for got, want in zip(grads, (_host(p.grad) for p in model.parameters())):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("change", ["running_var", "eps", "weight in place"])
def test_models_as_code_fold_follows_new_values(backend, kernels, rng, change):
    """bn(conv(x)) of a model written as code, folded under no_grad, is folded again after
    its layers change (kept on the BatchNorm, checked at every forward)."""
    model = build_model("resnet20-code")
    model.to("float64")
    _scramble_norms(model, rng)
    model.eval()
    x = anycnn.asarray(rng.normal(size=(2, 8, 8, 3)))
    with anycnn.no_grad():
        model.forward(x)
    conv, bn = model.conv1, model.bn1
    assert bn._derived is not None
    if change == "running_var":
        bn.running_var = anycnn.asarray(rng.random(bn.num_features) + 2.0)
    elif change == "eps":
        bn.eps = 0.5
    elif change == "weight in place":
        if not writes_in_place(anycnn.get_backend().xp):
            pytest.skip("this backend's arrays are immutable")
        conv.weight.data[...] = 2.0 * conv.weight.data
        conv.weight.data = conv.weight.data  # as an optimizer step does
    expected = _reference(model, x)
    with anycnn.no_grad():
        _close(model.forward(x), expected)


def _in_sequential(model, bn):
    """Whether ``bn`` is a direct layer of a Sequential in ``model`` (folded there anyway)."""
    return any(isinstance(m, Sequential) and any(layer is bn for layer in m.layers)
               for m in model.modules())


def _pooled_cnn(dtype="float32"):
    """simple-cnn's shape, small: two Conv2D → ReLU → MaxPool2D blocks (channels filling
    whole vectors, so the compiled block kernel takes them), Flatten, Dense → ReLU, Dense."""
    return Sequential(Conv2D(2, 16, 3, padding=1, dtype=dtype), ReLU(), MaxPool2D(2),
                      Conv2D(16, 32, 3, padding=1, dtype=dtype), ReLU(), MaxPool2D(2),
                      Flatten(), Dense(32 * 2 * 2, 64, dtype=dtype), ReLU(),
                      Dense(64, 3, dtype=dtype))


def test_inference_block_writes_no_codes_and_backward_still_works(backend, kernels, rng,
                                                                   monkeypatch):
    """Under no_grad in eval mode (predict, evaluate) a compiled Conv-ReLU-MaxPool block
    writes its output alone (no pooling codes) and no layer keeps backward state; the output
    equals the layer-by-layer one, and a backward called all the same (it runs the forward
    again) gets the gradients of a forward with gradients on."""
    model = _pooled_cnn("float64")
    model.eval()
    x = anycnn.asarray(rng.normal(size=(3, 8, 8, 2)))
    dy = anycnn.asarray(rng.normal(size=(3, 3)))
    expected = _reference(model, x)
    model.zero_grad()
    model.forward(x)  # gradients on: codes kept
    model.backward(dy)
    want = [_host(p.grad) for p in model.parameters()]
    eval_calls = []
    if kernels == "compiled" and anycnn.get_backend().name == "numpy":
        monkeypatch.setattr(native, "channels_fill_vectors", lambda channels, dtype: True)
        eval_calls = _watch(monkeypatch, native, "conv2d_relu_maxpool_eval")
    model.zero_grad()
    with anycnn.no_grad():
        y = model.forward(x)
    _close(y, expected)
    if kernels == "compiled" and anycnn.get_backend().name == "numpy":
        assert len(eval_calls) == 2, "the inference kernel (no codes) was not used"
    kept = [m for m in model.modules() if getattr(m, "_ctx", None) is not None
            or getattr(m, "_x", None) is not None]
    assert not kept and model._plan[0]._saved is None, "an inference kept backward state"
    assert model._replay is not None  # the input, for a backward called all the same
    model.backward(dy)
    for p, expected_grad in zip(model.parameters(), want):
        np.testing.assert_allclose(_host(p.grad), expected_grad, rtol=1e-9, atol=1e-12)


def test_inference_pool_kernel_equals_the_training_one(rng):
    """The inference block kernel's output is the training kernel's, bit for bit (NaN too)."""
    if anycnn.get_backend().name != "numpy" or not native.available(np):
        pytest.skip("the compiled kernels are off here")
    for dtype, cin in ((np.float32, 3), (np.float64, 3), (np.float32, 1)):
        x = rng.normal(size=(3, 9, 8, cin)).astype(dtype)  # cin 1: pixels as the grid's vectors
        x[1, 2, 3, :] = np.nan
        w = rng.normal(size=(3, 3, cin, 32)).astype(dtype)
        b = rng.normal(size=32).astype(dtype)
        for pads, window in (((1, 1, 1, 1), (2, 2)), ((0, 0, 0, 0), (3, 2))):
            out_hw = (9 + pads[0] + pads[1] - 2, 8 + pads[2] + pads[3] - 2)
            want, _ = native.conv2d_relu_maxpool(x, w, b, 1, pads, out_hw, window)
            got = native.conv2d_relu_maxpool_eval(x, w, b, 1, pads, out_hw, window)
            np.testing.assert_array_equal(got, want)
            assert np.isnan(got).any()


def test_dense_relu_runs_fused_in_eval_only(backend, kernels, rng):
    """Dense → ReLU is one step in eval mode (the bias and the ReLU in one pass), equal to the
    layers one by one, with the same gradients; training runs the layers as written."""
    model = _pooled_cnn("float64")
    x = anycnn.asarray(rng.normal(size=(3, 8, 8, 2)))
    dy = anycnn.asarray(rng.normal(size=(3, 3)))
    model.forward(x)
    assert not any(isinstance(step, DenseReLU) for step in model._plan)
    model.eval()
    grads = []
    for fused in (True, False):
        model.zero_grad()
        if fused:
            y = model.forward(x)
            assert isinstance(model._plan[-2], DenseReLU)
            _close(y, _reference(model, x))
        else:
            with suspended():
                model.forward(x)
        grads.append([_host(model.backward(dy))] + [_host(p.grad) for p in model.parameters()])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_inference_of_a_folded_resnet_keeps_nothing(backend, kernels, rng):
    """resnet-mini under no_grad in eval mode: the same logits, no layer or fused step keeps
    backward state (residual bodies included), and a backward called all the same equals the
    one after a forward with gradients on."""
    model, x = _model("resnet-mini", rng)
    dy = anycnn.asarray(rng.normal(size=(3, 10)))
    with anycnn.no_grad():  # the first forward: nothing kept from before
        y = model.forward(x)
    kept = [m for m in model.modules()
            if any(getattr(m, a, None) is not None for a in ("_ctx", "_x", "_out", "_saved"))]
    kept += [s for m in model.modules() if isinstance(m, Sequential) and m is not model
             for s in [m._replay] if s is not None]
    assert not kept, f"an inference kept backward state in {kept[:3]}"
    model.zero_grad()
    got = [_host(model.backward(dy))] + [_host(p.grad) for p in model.parameters()]
    model.zero_grad()
    _close(y, _host(model.forward(x)))
    want = [_host(model.backward(dy))] + [_host(p.grad) for p in model.parameters()]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_dense_kernel_equals_numpy(rng):
    """The compiled Dense (product, bias, ReLU in one kernel) equals NumPy's up to rounding,
    for row counts that leave partial tiles and blocks, both dtypes, with and without the
    ReLU (a NaN kept by the ReLU, as NumPy's maximum)."""
    if anycnn.get_backend().name != "numpy" or not native.available(np):
        pytest.skip("the compiled kernels are off here")
    for m, k, n, dtype in ((64, 3136, 128, np.float32), (70, 333, 128, np.float32),
                           (130, 64, 64, np.float64), (3, 1000, 64, np.float64)):
        x = rng.normal(size=(m, k)).astype(dtype)
        x[1, 5] = np.nan
        w = (rng.normal(size=(k, n)) / np.sqrt(k)).astype(dtype)
        b = rng.normal(size=n).astype(dtype)
        assert native.dense_applies(x, w, b), (m, k, n, dtype)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        for bias in (b, None):
            want = x @ w + (0 if bias is None else bias)
            for relu in (False, True):
                got = native.dense(x, w, bias, relu)
                expected = np.where(np.isnan(want), want, np.maximum(want, 0)) if relu else want
                np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)
                assert np.isnan(got[1]).all()
    x = np.ones((64, 3136), np.float32)
    assert not native.dense_applies(x, np.ones((3136, 10), np.float32), None)  # 10 features
    assert not native.dense_applies(x[:2, :8], np.ones((8, 64), np.float32), None)  # small


def test_eval_dense_relu_uses_the_dense_kernel(backend, kernels, rng, monkeypatch):
    """An eval-mode Dense → ReLU large enough for the compiled Dense runs in it (under
    no_grad and with gradients on), equal to the layers one by one."""
    model = Sequential(Flatten(), Dense(96, 64, dtype="float64"), ReLU(),
                       Dense(64, 5, dtype="float64"))
    model[1].bias.data = anycnn.asarray(rng.normal(size=64))  # not the zeros it starts with
    model.eval()
    x = anycnn.asarray(rng.normal(size=(20, 4, 4, 6)))
    compiled = kernels == "compiled" and anycnn.get_backend().name == "numpy"
    calls = _watch(monkeypatch, native, "dense") if compiled else []
    expected = _reference(model, x)
    _close(model.forward(x), expected)
    with anycnn.no_grad():
        _close(model.forward(x), expected)
    if compiled:
        assert len(calls) == 2 and calls[0][0][3] is True, "the compiled Dense was not used"
