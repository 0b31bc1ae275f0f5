"""ONNX export of the pretrained-network architectures (issue 24): ResNet, MobileNet,
EfficientNet and ConvNeXt, written as code, exported with their new layers mapped to native
operators, and run by onnxruntime.

Each model gets non-trivial eval-mode values at 64x64 (BatchNorm statistics of a training-mode
pass, random norm affine parameters, ConvNeXt's layer scales of order 1 instead of 1e-6, so
every branch counts in the logits); onnxruntime's float32 logits must equal anycnn's eval
forward within the tolerance of test_onnx_export (``rtol=1e-5``, ``atol=1e-5`` times the
largest logit). The compiled kernels are switched off: they are compared with the portable
code in test_native.py, and compiling them for every shape of eight networks costs minutes.
"""

from __future__ import annotations

import numpy as np
import pytest

import anycnn
from anycnn.autograd import no_grad
from anycnn.io.onnx import to_onnx
from anycnn.kernels import native
from anycnn.models import build_model
from anycnn.nn.layers import BatchNorm2D, Conv2D, LayerNorm

from .test_onnx_export import (
    ARCHITECTURES,
    anycnn_out,
    assert_close,
    cli,
    isolated,
    run_onnx,
    session,
)

__all__ = ["isolated"]  # a fixture of test_onnx_export, used here

SIZE, CLASSES = 64, 5
#: ResNet-50's float32 rounding (53 layers of up to 4608-term sums) alone moves anycnn's own
#: logits by 2e-5 to 5e-5 of their scale from its float64 forward (measured here), so neither
#: runtime can be within 1e-5 of the other: 1e-4 for it, the tests' 1e-5 for the rest
TOLERANCE = {"resnet50": 1e-4}
#: what each architecture's graph must be made of (its layers' own operators, none traced)
NATIVE_OPS = {
    "resnet18": {"Conv", "BatchNormalization", "Relu", "MaxPool", "Add", "GlobalAveragePool",
                 "Gemm"},
    "mobilenet_v2": {"Conv", "BatchNormalization", "Clip", "Add", "GlobalAveragePool", "Gemm"},
    "mobilenet_v3_small": {"Conv", "BatchNormalization", "HardSwish", "HardSigmoid", "Relu",
                           "GlobalAveragePool", "Mul", "Gemm"},
    "efficientnet_b0": {"Conv", "BatchNormalization", "Sigmoid", "Mul", "GlobalAveragePool",
                        "Gemm"},
    "convnext_tiny": {"Conv", "LayerNormalization", "MatMul", "Erf", "Gemm"},
}
NATIVE_OPS["resnet34"] = NATIVE_OPS["resnet50"] = NATIVE_OPS["resnet18"]
NATIVE_OPS["mobilenet_v3_large"] = NATIVE_OPS["mobilenet_v3_small"]


@pytest.fixture(autouse=True)
def _portable(monkeypatch):
    monkeypatch.setattr(native, "ENABLED", False)


def prepared(name: str, seed: int = 0):
    """``build_model(name)`` at 64x64 in eval mode with non-trivial values (see the module
    docstring)."""
    anycnn.manual_seed(seed)
    model = build_model(name, num_classes=CLASSES, image_size=SIZE)
    rng = np.random.default_rng(seed)
    state = {}
    for module_name, module in [("", model), *_named_modules(model)]:
        if isinstance(module, BatchNorm2D | LayerNorm) and module.weight is not None:
            c = module.weight.data.shape[0]
            state[f"{module_name}weight"] = rng.uniform(0.5, 1.5, c)
            state[f"{module_name}bias"] = rng.uniform(-0.2, 0.2, c)
        if isinstance(module, BatchNorm2D):
            module.momentum = 1.0  # the statistics of one training pass
    for param_name, p in model.named_parameters():
        if param_name.endswith("layer_scale"):
            state[param_name] = rng.uniform(0.2, 1.0, p.data.shape[0])
    head = model.get_classifier()  # logits of order 1 (MobileNet's head starts at std 0.01)
    state[f"{model.head}.weight"] = rng.normal(0.0, head.in_features ** -0.5,
                                               tuple(head.weight.data.shape))
    state[f"{model.head}.bias"] = rng.uniform(-0.5, 0.5, head.out_features)
    model.load_state_dict(state, strict=False)
    model.train()
    with no_grad():
        model(anycnn.asarray(inputs(8, seed + 100)))
    model.eval()
    return model


def inputs(n: int, seed: int) -> np.ndarray:
    """``n`` NHWC float32 images of standard normal values, as mean/std normalised photos
    are (uniform [0, 1] values would make the stem's BatchNorm cancel a large mean, which
    float32 rounding in the 50 layers after it makes an error of 3e-5 in either runtime)."""
    return np.random.default_rng(seed).standard_normal((n, SIZE, SIZE, 3)).astype(np.float32)


def _named_modules(model, prefix=""):
    for name, child in model.named_children():
        yield f"{prefix}{name}.", child
        yield from _named_modules(child, f"{prefix}{name}.")


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_architecture_matches_onnxruntime(backend, name):
    model = prepared(name)
    proto = to_onnx(model)
    assert proto.opset_import[0].version == 17  # nothing traced with ndonnx
    ops = {node.op_type for node in proto.graph.node}
    assert NATIVE_OPS[name] <= ops, NATIVE_OPS[name] - ops
    # every operator once: as many Conv nodes as Conv2D layers, and no constants but the
    # model's own tensors (a trace also records the inner operations of the forward-only
    # blocks its mapped containers call; those are left out, not written as dead nodes)
    convs = sum(isinstance(m, Conv2D) for _, m in _named_modules(model))
    assert [node.op_type for node in proto.graph.node].count("Conv") == convs
    stored = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    assert stored <= sum(int(np.prod(a.shape)) for a in model.state_dict().values()) + 1000
    made_by = {node.output[0]: node for node in proto.graph.node}
    for node in proto.graph.node:  # no Transpose undoing the one before it
        before = made_by.get(node.input[0])
        if node.op_type == "Transpose" and before is not None and before.op_type == "Transpose":
            perm = next(a.ints for a in before.attribute)
            assert [perm[i] for i in next(a.ints for a in node.attribute)] != [0, 1, 2, 3]
    inp, out = proto.graph.input[0], proto.graph.output[0]
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == [
        "batch", SIZE, SIZE, 3]
    assert out.name == "logits"
    sess = session(proto)
    x = inputs(2, 7)
    want = anycnn_out(model, x)
    assert np.abs(want).max() > 0.1 and np.std(want) > 0.01  # logits that tell errors apart
    tol = TOLERANCE.get(name, 1e-5)
    assert_close(run_onnx(sess, x), want, rtol=tol, atol=tol)


def test_convnext_at_opset_20_uses_gelu(backend):
    """From opset 20 GELU is the ``Gelu`` operator (exact, as the model's)."""
    model = prepared("convnext_tiny", seed=1)
    proto = to_onnx(model, opset=20)
    ops = {node.op_type for node in proto.graph.node}
    assert "Gelu" in ops and "Erf" not in ops
    x = inputs(1, 3)
    assert_close(run_onnx(session(proto), x), anycnn_out(model, x))


def test_cli_export_of_a_saved_architecture(backend, isolated, capsys):
    model = prepared("mobilenet_v3_small")
    anycnn.save(model, "m.safetensors", model_spec=model.model_spec)
    code, out, err = cli(capsys, "export", "m.safetensors", "m.onnx")
    assert code == 0, err
    assert out.startswith(f"wrote m.onnx (mobilenet_v3_small, opset 17): input [batch, {SIZE}, "
                          f"{SIZE}, 3] NHWC")
    loaded, _ = anycnn.load_model("m.safetensors")
    loaded.eval()
    x = inputs(3, 5)
    want = anycnn_out(loaded, x)
    np.testing.assert_array_equal(want, anycnn_out(model, x))  # the checkpoint is the model
    assert_close(run_onnx(session("m.onnx"), x), want)
