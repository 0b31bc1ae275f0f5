"""ONNX export (:mod:`anycnn.io.onnx`): onnxruntime runs the exported graph and matches anycnn.

Every preset (after a few SGD steps, so BatchNorm running statistics are not trivial) at batch
sizes 1, 3 and 64; every built-in layer and container on its own with random parameters; the
``anycnn export`` command end to end; the error paths. Float32 results are compared with
``rtol=1e-5`` and ``atol=1e-5`` times the output's largest magnitude (at least 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import anycnn
from anycnn import backend as backend_module
from anycnn.backend import namespace_of
from anycnn.cli.commands import main
from anycnn.errors import ConfigError, ShapeError
from anycnn.io.checkpoint import load_model
from anycnn.io.onnx import export_onnx, to_onnx
from anycnn.models import MODELS, build_model
from anycnn.nn import activations as A
from anycnn.nn import layers as L
from anycnn.nn import losses
from anycnn.nn.module import Module
from anycnn.optim import SGD

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the ImageNet architectures (issue 24): exported at 64x64 in test_onnx_architectures.py
ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small",
                 "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny")


def session(path_or_proto):
    data = path_or_proto if isinstance(path_or_proto, str) else path_or_proto.SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run_onnx(sess, x):
    return sess.run(None, {"input": x})[0]


def anycnn_out(model, x):
    return anycnn.to_numpy(model(anycnn.asarray(x)))


def assert_close(got, want, rtol=1e-5, atol=1e-5):
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale)


def images(n, h, w, c, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).random((n, h, w, c)).astype(dtype)


def sgd_steps(model, x, classes, steps=3):
    """A few SGD steps in training mode (BatchNorm running statistics move), then eval."""
    model.train()
    opt = SGD(model.parameters(), lr=0.05)
    y = np.arange(x.shape[0]) % classes
    for _ in range(steps):
        loss = losses.SoftmaxCrossEntropy()
        model.zero_grad()
        loss.forward(model(anycnn.asarray(x)), anycnn.asarray(y))
        model.backward(loss.backward())
        opt.step()
    model.eval()


def randomize(model, seed=0):
    """Non-trivial values in every parameter and buffer (running variances positive)."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, value in model.state_dict().items():
        shape = tuple(value.shape)
        values = rng.random(shape)
        state[name] = (0.5 + values) if name.endswith("running_var") else (values - 0.5)
    model.load_state_dict(state)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("name", [name for name in MODELS if name not in ARCHITECTURES])
def test_presets_match_onnxruntime(backend, tmp_path, name):
    anycnn.manual_seed(0)
    model = build_model(name)
    spec = model.model_spec
    h = w = spec["image_size"]
    c = spec["in_channels"]
    sgd_steps(model, images(8, h, w, c, seed=1), spec["num_classes"])
    path = export_onnx(model, tmp_path / f"{name}.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    assert not model.training  # export leaves the mode as it was
    sess = session(str(path))
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.shape) == ("input", ["batch", h, w, c])
    assert (out.name, out.shape) == ("logits", ["batch", spec["num_classes"]])
    for n in (1, 3, 64):
        x = images(n, h, w, c, seed=n)
        assert_close(run_onnx(sess, x), anycnn_out(model, x))


def test_graph_uses_native_operators(backend):
    model = build_model("resnet-mini")
    ops = {node.op_type for node in to_onnx(model).graph.node}
    assert {"Conv", "BatchNormalization", "Relu", "Add", "GlobalAveragePool", "Gemm"} <= ops
    assert not ops & {"Gather", "MatMul", "Einsum"}
    ops = [node.op_type for node in to_onnx(build_model("simple-cnn")).graph.node]
    assert ops.count("Transpose") == 1  # the input, once; the Dense rows are reordered instead
    assert ops.count("MaxPool") == 2


def test_export_keeps_training_mode_and_weights(backend, tmp_path):
    model = build_model("bn-cnn")
    before = {k: anycnn.to_numpy(v).copy() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx")
    assert all(m.training for m in model.modules())
    after = model.state_dict()
    for k, v in before.items():
        np.testing.assert_array_equal(anycnn.to_numpy(after[k]), v)


def test_nchw_layout_and_newer_opset(backend, tmp_path):
    anycnn.manual_seed(2)
    model = build_model("resnet-mini")
    sgd_steps(model, images(4, 28, 28, 1), 10, steps=1)
    x = images(5, 28, 28, 1, seed=3)
    want = anycnn_out(model, x)
    sess = session(to_onnx(model, layout="nchw"))
    assert sess.get_inputs()[0].shape == ["batch", 1, 28, 28]
    assert_close(run_onnx(sess, np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))), want)
    assert_close(run_onnx(session(to_onnx(model, opset=21)), x), want)


# --------------------------------------------------------------------------------------------
# Every layer and container on its own


def _conv(*args, **kwargs):
    return L.Conv2D(*args, **kwargs)


LAYER_CASES = {
    "conv": ((7, 6, 3), lambda: _conv(3, 4, 3)),
    "conv-stride-pad": ((9, 8, 3), lambda: _conv(3, 5, (3, 2), stride=(2, 1), padding=(1, 0))),
    "conv-dilation": ((9, 9, 2), lambda: _conv(2, 3, 3, padding=2, dilation=2, bias=False)),
    "conv-same-even": ((6, 7, 2), lambda: _conv(2, 3, (4, 2), padding="same", dilation=(1, 2))),
    "conv-valid-stride": ((8, 7, 2), lambda: _conv(2, 2, 2, stride=(3, 2), padding="valid")),
    "conv-groups": ((6, 6, 4), lambda: _conv(4, 6, 3, padding=1, groups=2)),
    "conv-depthwise": ((6, 5, 4), lambda: _conv(4, 4, 3, padding=1, groups=4, bias=False)),
    "convT-stride": ((4, 5, 3), lambda: L.ConvTranspose2D(3, 2, 3, stride=2, padding=1,
                                                          output_padding=1)),
    "convT-dilation": ((4, 4, 2), lambda: L.ConvTranspose2D(2, 3, (2, 3), stride=(1, 2),
                                                            dilation=2, bias=False)),
    "convT-groups": ((3, 4, 4), lambda: L.ConvTranspose2D(4, 6, 2, stride=2, groups=2)),
    "maxpool": ((8, 8, 3), lambda: L.MaxPool2D(2)),
    "maxpool-pad": ((7, 9, 2), lambda: L.MaxPool2D(3, stride=2, padding=1)),
    "maxpool-ceil": ((7, 8, 2), lambda: L.MaxPool2D(2, ceil_mode=True)),
    "maxpool-ceil-pad": ((9, 6, 2), lambda: L.MaxPool2D((3, 2), stride=(2, 1), padding=(1, 0),
                                                        ceil_mode=True)),
    **{f"avgpool-{'ceil' if ceil else 'floor'}-{'incl' if incl else 'excl'}-pad{pad}":
       ((7, 8, 2), lambda ceil=ceil, incl=incl, pad=pad: L.AvgPool2D(
           3, stride=2, padding=pad, ceil_mode=ceil, count_include_pad=incl))
       for ceil in (False, True) for incl in (False, True) for pad in (0, 1)},
    "avgpool-ceil-rect": ((9, 5, 2), lambda: L.AvgPool2D((3, 2), stride=(2, 3), padding=(1, 1),
                                                         ceil_mode=True)),
    "global-avgpool": ((5, 6, 3), L.GlobalAvgPool2D),
    "upsample-nearest": ((3, 4, 2), lambda: L.Upsample2D(2)),
    "upsample-nearest-rect": ((3, 4, 2), lambda: L.Upsample2D((2, 3))),
    "upsample-bilinear": ((3, 4, 2), lambda: L.Upsample2D(2, mode="bilinear")),
    "upsample-bilinear-rect": ((4, 3, 2), lambda: L.Upsample2D((3, 2), mode="bilinear")),
    "batchnorm": ((4, 5, 3), lambda: L.BatchNorm2D(3, eps=1e-3)),
    "groupnorm": ((4, 5, 6), lambda: L.GroupNorm(3, 6)),
    "groupnorm-1": ((4, 5, 4), lambda: L.GroupNorm(1, 4, eps=1e-4)),
    "groupnorm-per-channel-no-affine": ((4, 5, 4), lambda: L.GroupNorm(4, 4, affine=False)),
    "layernorm": ((4, 5, 6), lambda: L.LayerNorm(6)),
    "layernorm-no-affine": ((4, 5, 6), lambda: L.LayerNorm(6, eps=1e-3, affine=False)),
    "relu": ((3, 4, 2), L.ReLU),
    "leaky-relu": ((3, 4, 2), lambda: L.LeakyReLU(0.2)),
    "sigmoid": ((3, 4, 2), L.Sigmoid),
    "tanh": ((3, 4, 2), L.Tanh),
    "dropout": ((3, 4, 2), lambda: L.Dropout(0.5)),
    "stochastic-depth": ((3, 4, 2), lambda: L.StochasticDepth(0.5)),
    "softmax-flat": ((3, 4, 2), lambda: anycnn.Sequential(L.Flatten(), A.Softmax(),
                                                          L.Dense(24, 3), A.Softmax(axis=1))),
    "flat-activations": ((3, 2, 4), lambda: anycnn.Sequential(
        L.Flatten(), A.Hardswish(), A.GELU(), L.Dense(24, 3))),
    "adaptive-avgpool-1": ((5, 6, 3), L.AdaptiveAvgPool2D),
    "adaptive-avgpool-divides": ((6, 8, 3), lambda: L.AdaptiveAvgPool2D((3, 2))),
    "adaptive-avgpool-uneven": ((7, 5, 3), lambda: L.AdaptiveAvgPool2D((3, 4))),
    "adaptive-avgpool-larger": ((3, 2, 2), lambda: L.AdaptiveAvgPool2D((4, 5))),
    "adaptive-avgpool-dense": ((7, 7, 3), lambda: anycnn.Sequential(
        L.AdaptiveAvgPool2D(2), L.Flatten(), L.Dense(12, 4))),
    "identity": ((3, 4, 2), anycnn.nn.Identity),
    "flatten": ((3, 4, 2), L.Flatten),
    "flatten-dense": ((3, 4, 5), lambda: anycnn.Sequential(L.Flatten(), L.Dense(60, 7))),
    "flatten-dense-no-bias": ((3, 4, 5), lambda: anycnn.Sequential(
        L.Flatten(), L.Tanh(), L.Dropout(), L.Dense(60, 4, bias=False), L.Dense(4, 3))),
    "flat-batchnorm": ((3, 2, 4), lambda: anycnn.Sequential(L.Flatten(), L.BatchNorm2D(24),
                                                            L.Dense(24, 3))),
    "flat-layernorm": ((3, 2, 4), lambda: anycnn.Sequential(L.Flatten(), L.LayerNorm(24))),
    "flat-groupnorm": ((3, 2, 4), lambda: anycnn.Sequential(L.Flatten(), L.GroupNorm(3, 24))),
    "global-pool-dense-bn": ((5, 5, 4), lambda: anycnn.Sequential(
        L.GlobalAvgPool2D(), L.BatchNorm2D(4), L.LayerNorm(4), L.Dense(4, 2))),
    "residual-identity": ((5, 5, 3), lambda: anycnn.nn.Residual(anycnn.Sequential(
        _conv(3, 3, 3, padding=1), L.BatchNorm2D(3), L.ReLU(), _conv(3, 3, 3, padding=1)))),
    "residual-projection": ((6, 7, 3), lambda: anycnn.nn.Residual(
        anycnn.Sequential(_conv(3, 4, 3, stride=2, padding=1), L.BatchNorm2D(4)),
        anycnn.Sequential(_conv(3, 4, 1, stride=2, bias=False), L.BatchNorm2D(4)))),
    "concat": ((5, 6, 3), lambda: anycnn.nn.Concat(
        _conv(3, 2, 1), anycnn.Sequential(_conv(3, 4, 3, padding=1), L.ReLU()),
        L.MaxPool2D(3, stride=1, padding=1))),
    "concat-one": ((5, 6, 3), lambda: anycnn.nn.Concat(_conv(3, 2, 1))),
    "nested": ((8, 8, 2), lambda: anycnn.Sequential(
        _conv(2, 4, 3, padding=1),
        anycnn.nn.Residual(anycnn.Sequential(
            anycnn.nn.Concat(_conv(4, 2, 1), anycnn.nn.Residual(_conv(4, 2, 3, padding=1),
                                                                _conv(4, 2, 1))),
            L.GroupNorm(2, 4), L.ReLU())),
        L.MaxPool2D(2), L.Upsample2D(2, mode="bilinear"), L.ConvTranspose2D(4, 3, 2, stride=2),
        L.AvgPool2D(2), L.Flatten(), L.Dense(8 * 8 * 3, 5))),
    "residual-flat": ((3, 3, 2), lambda: anycnn.Sequential(
        L.Flatten(), anycnn.nn.Residual(L.Dense(18, 18), anycnn.nn.Identity()), L.Dense(18, 2))),
    "residual-flat-mixed-order": ((3, 3, 2), lambda: anycnn.Sequential(
        L.Flatten(), anycnn.nn.Residual(L.Sigmoid(), L.Dense(18, 18)), L.Dense(18, 2))),
    "concat-flat": ((3, 3, 2), lambda: anycnn.Sequential(
        L.Flatten(), anycnn.nn.Concat(L.Dense(18, 3), L.Identity()))),
}


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_matches_onnxruntime(backend, case, opset):
    hwc, make = LAYER_CASES[case]
    anycnn.manual_seed(5)
    layer = make()
    model = randomize(layer if isinstance(layer, anycnn.Sequential) else anycnn.Sequential(layer))
    proto = to_onnx(model, input_shape=hwc, opset=opset)
    onnx.checker.check_model(proto, full_check=True)
    sess = session(proto)
    for n in (1, 4):
        x = images(n, *hwc, seed=n) * 2 - 1
        assert_close(run_onnx(sess, x), anycnn_out(model, x))


ACTIVATION_CASES = {
    "relu6": A.ReLU6, "hardsigmoid": A.Hardsigmoid, "hardswish": A.Hardswish, "silu": A.SiLU,
    "gelu": A.GELU, "gelu-tanh": lambda: A.GELU("tanh"), "softmax-channels": A.Softmax,
    "softmax-height": lambda: A.Softmax(axis=1), "softmax-width": lambda: A.Softmax(axis=-2),
    "softmax-batch": lambda: A.Softmax(axis=0)}


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("case", list(ACTIVATION_CASES))
def test_activation_matches_onnxruntime(backend, case, opset):
    """The activations of anycnn.nn.activations over [-8, 8] (both ends of ReLU6, Hardsigmoid
    and Hardswish included), at opset 17 and at 20, where GELU is the ``Gelu`` operator."""
    model = anycnn.Sequential(ACTIVATION_CASES[case]())
    proto = to_onnx(model, input_shape=(5, 6, 7), opset=opset)
    ops = [node.op_type for node in proto.graph.node]
    assert ("Gelu" in ops) == (case.startswith("gelu") and opset >= 20), ops
    sess = session(proto)
    for n in (1, 3):
        x = images(n, 5, 6, 7, seed=n) * 16 - 8
        x.flat[:4] = [-3.0, 3.0, 0.0, 6.0]  # the kinks
        assert_close(run_onnx(sess, x), anycnn_out(model, x))


@pytest.mark.parametrize("case", ["hardsigmoid", "hardswish", "silu", "relu6", "softmax-width"])
def test_activation_in_float64(backend, case):
    """A float64 graph computes Hardsigmoid and Hardswish as anycnn does (Clip, Div), not with
    the float32 attributes of ``HardSigmoid``."""
    anycnn.manual_seed(3)  # Dense for the model's dtype (a model without parameters is float32)
    model = randomize(anycnn.Sequential(L.Dense(7, 7), ACTIVATION_CASES[case]()).to("float64"))
    proto = to_onnx(model, input_shape=(5, 6, 7))
    assert not {"HardSigmoid", "HardSwish"} & {node.op_type for node in proto.graph.node}
    x = images(2, 5, 6, 7, dtype=np.float64) * 32 - 16
    assert_close(run_onnx(session(proto), x), anycnn_out(model, x), rtol=1e-12, atol=1e-12)


def test_adaptive_avgpool_uses_pooling_operators(backend):
    def ops(layer, hwc):
        return [n.op_type for n in to_onnx(anycnn.Sequential(layer), input_shape=hwc).graph.node]

    assert "GlobalAveragePool" in ops(L.AdaptiveAvgPool2D(1), (5, 7, 2))
    assert "AveragePool" in ops(L.AdaptiveAvgPool2D((2, 3)), (4, 9, 2))
    assert ops(L.AdaptiveAvgPool2D((2, 3)), (5, 9, 2)).count("MatMul") == 2  # 5 rows into 2


def test_float64_model(backend):
    """float64 models export as float64 graphs (valid ONNX; onnxruntime's CPU Conv and pooling
    kernels are float32 only, so its run is checked on a model without them)."""
    anycnn.manual_seed(1)
    model = randomize(anycnn.Sequential(
        _conv(2, 3, 3, padding="same"), L.BatchNorm2D(3), L.ReLU(), L.AvgPool2D(2, ceil_mode=True),
        L.LayerNorm(3), L.Flatten(), L.Dense(3 * 3 * 3, 4)).to("float64"))
    proto = to_onnx(model, input_shape=(5, 5, 2))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    model = randomize(anycnn.Sequential(L.Flatten(), L.Dense(50, 4), L.Tanh(), L.Dense(4, 3))
                      .to("float64"))
    sess = session(to_onnx(model, input_shape=(5, 5, 2)))
    assert sess.get_inputs()[0].type == "tensor(double)"
    x = images(3, 5, 5, 2, dtype=np.float64)
    assert_close(run_onnx(sess, x), anycnn_out(model, x), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# The command


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = backend_module._current
    yield tmp_path
    backend_module._current = saved


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_export_end_to_end(backend, isolated, capsys):
    run = isolated / "run"
    code, _, err = cli(capsys, "train", "--dataset", "mnist-sample", "--limit", "256", "--epochs",
                       "1", "--model", "lenet5", "--out", run, "--backend", "numpy", "--quiet")
    assert code == 0, err
    code, out, err = cli(capsys, "export", run, "lenet5.onnx")
    assert code == 0, err
    assert out.startswith("wrote lenet5.onnx (lenet5, opset 17): input [batch, 28, 28, 1] NHWC")
    onnx.checker.check_model("lenet5.onnx", full_check=True)
    model, _ = load_model(run / "checkpoint.safetensors")
    model.eval()
    sess = session("lenet5.onnx")
    for n in (1, 3, 64):
        x = images(n, 28, 28, 1, seed=n)
        assert_close(run_onnx(sess, x), anycnn_out(model, x))
    proto = onnx.load("lenet5.onnx")
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["input_layout"] == "NHWC" and '"lenet5"' in props["model_spec"]
    code, _, err = cli(capsys, "export", run / "checkpoint.safetensors", "b.onnx", "--opset",
                       "18", "--layout", "nchw")
    assert code == 0, err
    x = images(2, 28, 28, 1)
    assert_close(run_onnx(session("b.onnx"), np.transpose(x, (0, 3, 1, 2)).copy()),
                 anycnn_out(model, x))


def test_cli_errors_are_one_line(backend, isolated, capsys, monkeypatch):
    code, out, err = cli(capsys, "export", "missing", "m.onnx")
    assert code == 2 and not out
    assert err.count("\n") == 1 and "not found" in err and "missing" in err

    anycnn.manual_seed(0)
    anycnn.save(build_model("lenet5"), "m.safetensors", model_spec=build_model("lenet5")
                .model_spec)
    code, _, err = cli(capsys, "export", "m.safetensors", "m.onnx", "--opset", "9")
    assert code == 2 and err.count("\n") == 1 and "opset must be" in err

    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` fails as when not installed
    code, _, err = cli(capsys, "export", "m.safetensors", "m.onnx")
    assert code == 2 and err.count("\n") == 1
    assert "pip install 'anycnn[onnx]'" in err
    assert not os.path.exists("m.onnx")


class Custom(Module):
    """A user-written layer with its own backward and no ONNX mapping (a layer written as
    code, forward only, is exported from a trace of its forward instead)."""

    def forward(self, x):
        return x * 2

    def backward(self, dy, input_grad=True):
        return dy * 2


def test_cli_unmappable_layer(backend, isolated, capsys, monkeypatch):
    import anycnn.models as models

    monkeypatch.setitem(sys.modules, "ndonnx", None)  # no tracing fallback

    spec = models.model_spec("lenet5")
    anycnn.save(build_model(spec), "m.safetensors", model_spec=spec)
    original = models.MODELS["lenet5"]
    monkeypatch.setitem(models.MODELS, "lenet5",
                        lambda **kw: anycnn.Sequential(*original(**kw).layers, Custom()))
    code, _, err = cli(capsys, "export", "m.safetensors", "m.onnx")
    assert code == 2 and err.count("\n") == 1
    assert "layer 12 (Custom) has no ONNX mapping" in err
    assert "pip install ndonnx to trace its forward instead" in err


# --------------------------------------------------------------------------------------------
# Errors in the Python API


def test_unmappable_layer_is_named(backend):
    with pytest.raises(ConfigError, match=r"layer 1 \(Custom\) has no ONNX mapping.*Conv2D"):
        to_onnx(anycnn.Sequential(L.ReLU(), Custom()), input_shape=(2, 2, 1), trace=False)
    nested = anycnn.Sequential(_conv(1, 2, 1), anycnn.nn.Residual(anycnn.Sequential(
        L.ReLU(), Custom())))
    with pytest.raises(ConfigError, match=r"layer 1\.body\.1 \(Custom\)"):
        to_onnx(nested, input_shape=(2, 2, 1), trace=False)
    with pytest.raises(ConfigError, match=r"layer model \(Custom\)"):
        to_onnx(Custom(), input_shape=(2, 2, 1), trace=False)


def test_argument_errors(backend, tmp_path):
    model = anycnn.Sequential(_conv(1, 2, 3))
    with pytest.raises(ConfigError, match=r"needs input_shape=\(H, W, C\)"):
        to_onnx(model)
    with pytest.raises(ConfigError, match="input_shape must be"):
        to_onnx(model, input_shape=(4, 4))
    with pytest.raises(ConfigError, match="layout must be"):
        to_onnx(model, input_shape=(4, 4, 1), layout="nwhc")
    with pytest.raises(ConfigError, match="opset must be"):
        to_onnx(model, input_shape=(4, 4, 1), opset=13)
    with pytest.raises(ShapeError, match=r"layer 0: Conv2D expects 1 channels"):
        to_onnx(model, input_shape=(4, 4, 3))
    with pytest.raises(ConfigError, match="needs NHWC input"):
        to_onnx(anycnn.Sequential(L.Flatten(), L.MaxPool2D(2)), input_shape=(4, 4, 1))
    assert not list(tmp_path.iterdir())


def test_missing_onnx_names_the_extra(backend, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ConfigError, match=r"pip install 'anycnn\[onnx\]'"):
        export_onnx(build_model("lenet5"), tmp_path / "m.onnx")


def test_importing_anycnn_does_not_import_onnx():
    code = ("import sys, anycnn, anycnn.io, anycnn.io.onnx, anycnn.cli.commands; "
            "anycnn.io.export_onnx; print('onnx' in sys.modules, 'onnxruntime' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANYCNN_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False False"


def test_subclass_with_its_own_forward_is_not_mapped_as_its_base(backend):
    class DoubledReLU(L.ReLU):
        def forward(self, x):
            return super().forward(x) * 2

    class PlainReLU(L.ReLU):
        pass

    to_onnx(anycnn.Sequential(PlainReLU()), input_shape=(2, 2, 1))
    with pytest.raises(ConfigError, match=r"layer 0 \(DoubledReLU\) has no ONNX mapping"):
        to_onnx(anycnn.Sequential(DoubledReLU()), input_shape=(2, 2, 1), trace=False)


# --------------------------------------------------------------------------------------------
# Layers with no mapping, traced with ndonnx


class ChannelScale(Module):
    """A user-written layer with a parameter: ``tanh(x * scale) + mean over the last axis``."""

    def __init__(self, channels):
        self.scale = anycnn.Parameter(anycnn.asarray(np.linspace(0.5, 2.0, channels,
                                                                 dtype=np.float32)))

    def forward(self, x):
        xp = namespace_of(x)
        return xp.tanh(x * self.scale.data) + xp.mean(x, axis=-1, keepdims=True)

    def backward(self, dy, input_grad=True):  # its own backward: exported through ndonnx
        raise NotImplementedError("an export-only test layer")


def test_unmapped_layers_are_traced_with_ndonnx(backend):
    pytest.importorskip("ndonnx")
    anycnn.manual_seed(6)
    model = randomize(anycnn.Sequential(
        _conv(2, 3, 3, padding=1), ChannelScale(3), L.BatchNorm2D(3),
        anycnn.nn.Residual(anycnn.Sequential(Custom(), _conv(3, 3, 1))), L.MaxPool2D(2),
        L.Flatten(), ChannelScale(12), L.Dense(12, 4)))
    proto = to_onnx(model, input_shape=(4, 4, 2))
    assert proto.opset_import[0].version >= 17  # ndonnx's own opset when higher
    ops = [node.op_type for node in proto.graph.node]
    assert {"Conv", "BatchNormalization", "MaxPool", "Gemm", "Tanh"} <= set(ops)
    sess = session(proto)
    for n in (1, 4):
        x = images(n, 4, 4, 2, seed=n)
        assert_close(run_onnx(sess, x), anycnn_out(model, x))
    assert type(model[1].scale.data).__module__.split(".")[0] != "ndonnx"  # put back


def test_tracing_errors_name_the_layer(backend):
    pytest.importorskip("ndonnx")
    model = anycnn.Sequential(ChannelScale(1))
    with pytest.raises(ConfigError, match=r"layer 0 \(ChannelScale\).*needs opset 2\d: export "
                       r"with opset=2\d"):
        to_onnx(model, input_shape=(2, 2, 1), opset=17)
    assert to_onnx(model, input_shape=(2, 2, 1), opset=21).opset_import[0].version == 21

    class HostOnly(Module):
        def forward(self, x):
            return anycnn.asarray(np.sort(anycnn.to_numpy(x), axis=-1))

    with pytest.raises(ConfigError, match=r"layer 0 \(HostOnly\): tracing its forward for "
                       "ONNX failed .*copied to NumPy"):
        to_onnx(anycnn.Sequential(HostOnly()), input_shape=(2, 2, 1))


# --------------------------------------------------------------------------------------------
# anycnn predict MODEL.onnx


def photo(path, seed, size=(20, 16)):
    image = pytest.importorskip("PIL.Image")
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    image.fromarray(pixels, "RGB").save(path)
    return str(path)


def predictions(capsys, model_path, *images):
    code, out, err = cli(capsys, "predict", model_path, *images, "--json", "--top-k", "3")
    assert code == 0, err
    return json.loads(out), err


def test_predict_with_an_onnx_file_matches_the_checkpoint(backend, isolated, capsys):
    anycnn.manual_seed(4)
    model = randomize(build_model("lenet5", num_classes=3, in_channels=3, image_size=12))
    record = {"version": 1, "image_size": [12, 12], "channels": 3, "resize": "bilinear",
              "scale": 255, "normalize": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]},
              "augment": None, "class_names": ["x", "y", "z"]}
    anycnn.save(model, "m.safetensors", extra={"preprocess": record})
    images = [photo(isolated / f"{i}.png", i) for i in range(3)]
    want, _ = predictions(capsys, "m.safetensors", *images)
    for layout in ("nhwc", "nchw"):
        assert cli(capsys, "export", "m.safetensors", f"{layout}.onnx", "--layout", layout)[0] == 0
        got, err = predictions(capsys, f"{layout}.onnx", *images)
        assert not err
        assert got["preprocess"] == record == want["preprocess"]
        for g, w in zip(got["predictions"], want["predictions"]):
            assert [e["name"] for e in g["top_k"]] == [e["name"] for e in w["top_k"]]
            np.testing.assert_allclose([e["probability"] for e in g["top_k"]],
                                       [e["probability"] for e in w["top_k"]], rtol=1e-5,
                                       atol=1e-6)


def test_predict_with_an_onnx_file_without_a_record(backend, isolated, capsys):
    model = build_model("lenet5", num_classes=4)
    export_onnx(model, "plain.onnx")
    got, err = predictions(capsys, "plain.onnx", photo(isolated / "p.jpg", 1))
    assert "records no preprocessing" in err and "grayscale, resized to 28x28" in err
    assert "from the model input" in err
    assert [e["name"] for e in got["predictions"][0]["top_k"]] == [
        str(e["index"]) for e in got["predictions"][0]["top_k"]]


def test_predict_onnx_errors_are_one_line(backend, isolated, capsys, monkeypatch):
    image = photo(isolated / "p.png", 0)
    code, _, err = cli(capsys, "predict", "missing.onnx", image)
    assert code == 2 and err.count("\n") == 1 and "no such file: missing.onnx" in err
    (isolated / "bad.onnx").write_bytes(b"not an onnx file")
    code, _, err = cli(capsys, "predict", "bad.onnx", image)
    assert code == 2 and err.count("\n") == 1 and "onnxruntime cannot load it" in err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, _, err = cli(capsys, "predict", "bad.onnx", image)
    assert code == 2 and err.count("\n") == 1 and "pip install 'anycnn[onnx]'" in err


# --------------------------------------------------------------------------------------------
# Modules written as code: their forward's operations, traced


@pytest.mark.parametrize("case", ["squeeze_excite", "channel_shuffle", "split_rms",
                                  "convnext_block", "every_operation",
                                  "forward_only_in_residual"])
def test_modules_written_as_code_match_onnxruntime(backend, case):
    from tests.test_autograd import CASES

    build, _, shapes = CASES[case]
    anycnn.manual_seed(8)
    inner = build(np.random.default_rng(8)).to("float32")
    hwc = shapes[0][1:]
    model = anycnn.Sequential(inner)
    proto = to_onnx(model, input_shape=hwc)
    onnx.checker.check_model(proto, full_check=True)
    assert "Conv" in {n.op_type for n in proto.graph.node} or case == "every_operation"
    sess = session(proto)
    for n in (1, 3):  # the batch axis stays dynamic
        x = images(n, *hwc, seed=n) * 2 - 1
        assert_close(run_onnx(sess, x), anycnn_out(model, x))


def test_unsupported_operation_of_code_is_named(backend):
    class Masked(Module):
        def forward(self, x):
            return x[x > 0.5]

    with pytest.raises(ConfigError, match=r"layer 0 \(Masked\): indexing with an array"):
        to_onnx(anycnn.Sequential(Masked()), input_shape=(2, 2, 1))
