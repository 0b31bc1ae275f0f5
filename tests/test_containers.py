"""Residual, Concat and Identity: PyTorch autograd and finite differences agree with their
forward and backward (float64, training mode, nested), names and modes go through them, fusion
still applies inside them, shape errors name both shapes, and the ResNet presets and a nested
model round-trip through checkpoints, PyTorch state_dicts and the ``anycnn train`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest

import anycnn
from anycnn import backend as backend_module
from anycnn import layers as L
from anycnn import losses, optim
from anycnn.errors import ConfigError, ShapeError
from anycnn.nn.containers import Concat, Identity, Residual
from anycnn.nn.module import spatial_size
from anycnn.nn.sequential import Sequential
from tests.rounding import assert_rounding_close
from tests.test_gradcheck import check_layer

# --------------------------------------------------------------------------------------------
# Models under test (float64 unless said otherwise)


def residual_identity(dtype="float64"):
    return Residual(Sequential(
        L.Conv2D(3, 3, 3, padding=1, dtype=dtype), L.BatchNorm2D(3, dtype=dtype), L.ReLU(),
        L.Conv2D(3, 3, 3, padding=1, bias=False, dtype=dtype), L.BatchNorm2D(3, dtype=dtype)))


def residual_projection(dtype="float64"):
    """A stride-2 basic block with the 1x1-conv + BatchNorm shortcut (7x6x3 → 4x3x4)."""
    return Residual(
        Sequential(L.Conv2D(3, 4, 3, stride=2, padding=1, bias=False, dtype=dtype),
                   L.BatchNorm2D(4, dtype=dtype), L.ReLU(),
                   L.Conv2D(4, 4, 3, padding=1, bias=False, dtype=dtype),
                   L.BatchNorm2D(4, dtype=dtype)),
        Sequential(L.Conv2D(3, 4, 1, stride=2, bias=False, dtype=dtype),
                   L.BatchNorm2D(4, dtype=dtype)))


def concat_three(dtype="float64"):
    return Concat(L.Identity(), L.Conv2D(3, 2, 3, padding=1, dtype=dtype),
                  Sequential(L.Conv2D(3, 4, 1, dtype=dtype), L.BatchNorm2D(4, dtype=dtype),
                             L.ReLU()))


def concat_two(dtype="float64"):
    return Concat(Sequential(L.AvgPool2D(3, stride=1, padding=1), L.Conv2D(3, 2, 1, dtype=dtype)),
                  L.Identity())


def unet_level(dtype="float64"):
    """A U-Net level with a residual bottleneck, inside a network with a residual head: the
    inner path halves the size (a fused Conv2D → ReLU → MaxPool2D block) and ``Upsample2D``
    restores it before ``Concat`` joins it to the skip connection."""
    inner = Sequential(
        L.Conv2D(4, 4, 3, padding=1, dtype=dtype), L.ReLU(), L.MaxPool2D(2),
        Residual(Sequential(L.Conv2D(4, 4, 3, padding=1, bias=False, dtype=dtype),
                            L.BatchNorm2D(4, dtype=dtype), L.ReLU())),
        L.Upsample2D(2))
    return Sequential(
        L.Conv2D(2, 4, 3, padding=1, dtype=dtype), L.ReLU(),
        Concat(L.Identity(), inner),
        Residual(Sequential(L.Conv2D(8, 8, 1, dtype=dtype), L.ReLU())),
        L.Conv2D(8, 3, 1, dtype=dtype), L.GlobalAvgPool2D(), L.Dense(3, 2, dtype=dtype))


CASES = {  # name: (model factory, NHWC input shape)
    "residual_identity": (residual_identity, (3, 5, 6, 3)),
    "residual_projection": (residual_projection, (3, 7, 6, 3)),
    "concat_three": (concat_three, (2, 5, 5, 3)),
    "concat_two": (concat_two, (2, 4, 5, 3)),
    "unet_level": (unet_level, (2, 6, 8, 2)),
}


def randomize(model, rng):
    """Non-trivial values in every parameter (BatchNorm scales around 1)."""
    for name, p in model.named_parameters():
        values = rng.standard_normal(p.shape) * 0.5
        if name.endswith("weight") and len(p.shape) == 1:
            values += 1.0
        p.data = anycnn.asarray(values, dtype=anycnn.backend.dtype_name(p.data))


def host(a):
    return anycnn.to_numpy(a)


# --------------------------------------------------------------------------------------------
# The same model tree evaluated by PyTorch, op by op, with autograd


def torch_layout(a: np.ndarray) -> np.ndarray:
    """anycnn weight layout → PyTorch's: conv (kh, kw, in, out) → (out, in, kh, kw), dense
    (in, out) → (out, in); vectors unchanged."""
    return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T if a.ndim == 2 else a


def anycnn_layout(a: np.ndarray) -> np.ndarray:
    return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T if a.ndim == 2 else a


def torch_reference(torch, module, t, params, buffers, prefix=""):
    """PyTorch's value of an anycnn module tree on NCHW ``t``, using the leaf tensors
    ``params`` and running statistics ``buffers`` (both by anycnn name). Residual is written
    as a sum and Concat as ``cat`` on the channel axis: the definitions under test."""
    F = torch.nn.functional
    w = params.get(prefix + "weight")
    b = params.get(prefix + "bias")
    if isinstance(module, Sequential):
        for name, child in module.named_children():
            t = torch_reference(torch, child, t, params, buffers, f"{prefix}{name}.")
        return t
    if isinstance(module, Residual):
        return (torch_reference(torch, module.body, t, params, buffers, prefix + "body.")
                + torch_reference(torch, module.shortcut, t, params, buffers,
                                  prefix + "shortcut."))
    if isinstance(module, Concat):
        return torch.cat([torch_reference(torch, child, t, params, buffers, f"{prefix}{name}.")
                          for name, child in module.named_children()], dim=1)
    if isinstance(module, Identity):
        return t
    if isinstance(module, L.Conv2D):
        top, _, left, _ = module.pads
        return F.conv2d(t, w, b, module.stride, (top, left), module.dilation)
    if isinstance(module, L.BatchNorm2D):
        return F.batch_norm(t, buffers[prefix + "running_mean"], buffers[prefix + "running_var"],
                            w, b, training=module.training, momentum=module.momentum,
                            eps=module.eps)
    if isinstance(module, L.ReLU):
        return F.relu(t)
    if isinstance(module, L.MaxPool2D):
        return F.max_pool2d(t, module.kernel_size, module.stride, module.padding)
    if isinstance(module, L.AvgPool2D):
        return F.avg_pool2d(t, module.kernel_size, module.stride, module.padding,
                            count_include_pad=module.count_include_pad)
    if isinstance(module, L.GlobalAvgPool2D):
        return t.mean(dim=(2, 3))
    if isinstance(module, L.Dense):
        return F.linear(t, w, b)
    if isinstance(module, L.Upsample2D):
        return F.interpolate(t, scale_factor=module.scale_factor, mode=module.mode,
                             **({"align_corners": False} if module.mode == "bilinear" else {}))
    raise AssertionError(f"no reference for {type(module).__name__}")


def nchw(torch, a):
    return torch.tensor(np.ascontiguousarray(a.transpose(0, 3, 1, 2)) if a.ndim == 4 else a)


def close(actual, expected, what):
    """Within 1e-8 relative to the largest expected magnitude (float64)."""
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=1e-8, atol=1e-8 * scale, err_msg=what)


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_autograd(backend, torch, rng, case):
    """Output, input gradient, every parameter gradient and the BatchNorm running statistics
    equal PyTorch autograd's on the same tree (training mode, float64)."""
    make, shape = CASES[case]
    model = make()
    randomize(model, rng)
    x = rng.standard_normal(shape)
    params = {name: torch.tensor(torch_layout(host(p.data)), requires_grad=True)
              for name, p in model.named_parameters()}
    buffers = {name: torch.tensor(host(v)) for name, v in model.named_buffers()}
    xt = nchw(torch, x).requires_grad_(True)
    yt = torch_reference(torch, model, xt, params, buffers)

    y = model(anycnn.asarray(x))
    expected = yt.detach().numpy()
    expected = expected.transpose(0, 2, 3, 1) if expected.ndim == 4 else expected
    close(host(y), expected, "output")
    dy = rng.standard_normal(expected.shape)
    yt.backward(nchw(torch, dy))
    dx = model.backward(anycnn.asarray(dy))
    close(host(dx), xt.grad.numpy().transpose(0, 2, 3, 1), "input gradient")
    for name, p in model.named_parameters():
        close(host(p.grad), anycnn_layout(params[name].grad.numpy()), name)
    for name, value in model.named_buffers():
        close(host(value), buffers[name].numpy(), name)


@pytest.mark.parametrize("case", ["residual_projection", "concat_three", "unet_level"])
def test_finite_differences(backend, rng, case):
    make, shape = CASES[case]
    model = make()
    randomize(model, rng)
    check_layer(model, rng.standard_normal(shape), rng, directions=2)


def test_identity_paths(backend, rng):
    x = rng.standard_normal((2, 3, 4, 5))
    dy = rng.standard_normal((2, 3, 4, 10))
    both = Concat(Identity(), Identity())
    np.testing.assert_array_equal(host(both(anycnn.asarray(x))), np.concatenate([x, x], -1))
    np.testing.assert_array_equal(host(both.backward(anycnn.asarray(dy))),
                                  dy[..., :5] + dy[..., 5:])
    double = Residual(Identity())
    np.testing.assert_array_equal(host(double(anycnn.asarray(x))), 2 * x)
    np.testing.assert_array_equal(host(double.backward(anycnn.asarray(dy[..., :5]))),
                                  2 * dy[..., :5])


@pytest.mark.parametrize("case", ["residual_projection", "concat_three"])
def test_input_grad_false_still_gives_every_parameter_gradient(backend, rng, case):
    """With the container first (its input gradient is needed by nobody), every path still
    accumulates its parameter gradients, equal to those of a full backward pass."""
    make, shape = CASES[case]
    x = anycnn.asarray(rng.standard_normal(shape))
    grads = []
    for input_grad in (True, False):
        anycnn.manual_seed(3)
        model = Sequential(make(), L.GlobalAvgPool2D())
        y = model(x)
        dy = anycnn.asarray(np.ones(tuple(y.shape)))
        dx = model.backward(dy, input_grad=input_grad)
        assert (dx is None) != input_grad
        grads.append({name: host(p.grad) for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert_rounding_close(grads[1][name], grads[0][name], err_msg=name)


# --------------------------------------------------------------------------------------------
# Names, modes, state


def test_names_are_dotted_attribute_paths(backend):
    model = unet_level()
    names = [n for n, _ in model.named_parameters()]
    assert names == [
        "0.weight", "0.bias",
        "2.1.0.weight", "2.1.0.bias", "2.1.3.body.0.weight", "2.1.3.body.1.weight",
        "2.1.3.body.1.bias",
        "3.body.0.weight", "3.body.0.bias",
        "4.weight", "4.bias", "6.weight", "6.bias"]
    assert [n for n, _ in model.named_buffers()] == ["2.1.3.body.1.running_mean",
                                                     "2.1.3.body.1.running_var"]
    assert model[2][1][3].body[0].weight is dict(model.named_parameters())["2.1.3.body.0.weight"]
    block = residual_projection()
    assert [n for n, _ in block.named_parameters()][-3:] == [
        "shortcut.0.weight", "shortcut.1.weight", "shortcut.1.bias"]
    assert isinstance(Residual(Identity()).shortcut, Identity)  # no tensors, no names


def test_state_modes_and_dtype_go_through_containers(backend, rng):
    anycnn.manual_seed(1)
    model = unet_level("float32")
    anycnn.manual_seed(2)
    other = unet_level("float32")
    x = anycnn.asarray(rng.standard_normal((2, 6, 8, 2)), dtype="float32")
    model(x)  # moves the BatchNorm running statistics
    other.load_state_dict({k: host(v) for k, v in model.state_dict().items()})
    model.eval()
    other.eval()
    assert not any(m.training for m in model.modules())
    assert sum(isinstance(m, L.BatchNorm2D) for m in model.modules()) == 1
    np.testing.assert_array_equal(host(other(x)), host(model(x)))
    model.train()
    assert all(m.training for m in model.modules())
    model.backward(model(x) * 0 + 1)
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    model.to("float64")
    assert {anycnn.backend.dtype_name(v) for v in model.state_dict().values()} == {"float64"}
    y = model(anycnn.asarray(rng.standard_normal((2, 6, 8, 2))))
    assert anycnn.backend.dtype_name(y) == "float64"


def test_public_names_and_repr():
    assert anycnn.Residual is L.Residual is Residual
    assert anycnn.Concat is L.Concat is Concat and anycnn.Identity is L.Identity is Identity
    text = repr(Residual(Sequential(L.Conv2D(2, 2, 3, padding=1), L.ReLU())))
    assert text.splitlines()[0] == "Residual("
    assert "(body): Sequential(" in text and "(shortcut): Identity()" in text
    text = repr(Concat(Identity(), L.MaxPool2D(3, stride=1, padding=1)))
    assert "(0): Identity()" in text and "(1): MaxPool2D(" in text


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="Residual body is int, not a Module"):
        Residual(3)
    with pytest.raises(ConfigError, match="Residual shortcut is list"):
        Residual(Identity(), [Identity()])
    with pytest.raises(ConfigError, match="Concat branch 1 is str"):
        Concat(Identity(), "relu")
    with pytest.raises(ConfigError, match="at least one branch"):
        Concat()


# --------------------------------------------------------------------------------------------
# Shapes


def test_shape_errors_name_the_container_and_both_shapes(backend):
    x = anycnn.asarray(np.zeros((2, 8, 8, 4), np.float32))
    with pytest.raises(ShapeError, match=(
            r"Residual: the body maps input \(2, 8, 8, 4\) to \(2, 4, 4, 8\), but the identity "
            r"shortcut keeps \(2, 8, 8, 4\).*Conv2D\(4, 8, 1, stride=2, bias=False\)")):
        Residual(L.Conv2D(4, 8, 3, stride=2, padding=1))(x)
    with pytest.raises(ShapeError, match=r"body gives \(2, 4, 4, 8\) but the shortcut gives "
                                         r"\(2, 8, 8, 8\)"):
        Residual(L.Conv2D(4, 8, 3, stride=2, padding=1), L.Conv2D(4, 8, 1))(x)
    with pytest.raises(ShapeError, match=r"Concat: for input \(2, 8, 8, 4\) branch 0 gives "
                                         r"\(2, 8, 8, 4\) but branch 2 gives \(2, 4, 4, 4\)"):
        Concat(Identity(), L.ReLU(), L.MaxPool2D(2))(x)
    with pytest.raises(ShapeError, match="branch 1 gives \\(2, 256\\)"):
        Concat(Identity(), L.Flatten())(x)


def test_output_hw_through_containers():
    level = unet_level()
    assert level[2].output_hw((6, 8)) == (6, 8)
    assert level[2][1].output_hw((6, 8)) == (6, 8)
    assert residual_projection().output_hw((7, 6)) == (4, 3)
    assert Concat(Identity(), L.MaxPool2D(2)).output_hw((8, 8)) is None  # they disagree
    assert Concat(L.Flatten(), L.MaxPool2D(2)).output_hw((8, 8)) == (4, 4)  # one knows


def test_flatten_mismatch_is_explained_after_containers(backend):
    """The Dense-after-Flatten hint sees through a Residual (its output_hw)."""
    model = Sequential(L.Conv2D(1, 2, 3, padding=1), residual_identity_2(), L.MaxPool2D(2),
                       L.Flatten(), L.Dense(2 * 7 * 7, 3))
    with pytest.raises(ShapeError, match="the model expects 14x14x1 images"):
        model(anycnn.asarray(np.zeros((1, 16, 16, 1), np.float32)))


def residual_identity_2():
    return Residual(Sequential(L.Conv2D(2, 2, 3, padding=1), L.ReLU()))


# --------------------------------------------------------------------------------------------
# Fusion inside containers


def unfused(model):
    for m in model.modules():
        if isinstance(m, Sequential):
            m.fuse = False
    return model


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_block_runs_inside_a_residual_body(backend, rng, dtype):
    from anycnn.nn.fusion import ConvPoolRun

    def make():
        anycnn.manual_seed(6)
        return Sequential(
            Residual(Sequential(L.Conv2D(2, 4, 3, padding=1, dtype=dtype), L.ReLU(),
                                L.MaxPool2D(2), L.Conv2D(4, 4, 3, padding=1, dtype=dtype)),
                     Sequential(L.AvgPool2D(2), L.Conv2D(2, 4, 1, dtype=dtype))),
            Concat(Identity(), Sequential(L.Conv2D(4, 3, 3, padding=1, dtype=dtype), L.ReLU(),
                                          L.MaxPool2D(3, stride=1, padding=1))),
            L.GlobalAvgPool2D(), L.Dense(7, 3, dtype=dtype))

    fused, plain = make(), unfused(make())
    for a, b in zip(fused.parameters(), plain.parameters()):
        a.data = b.data = anycnn.asarray(rng.standard_normal(a.shape) * 0.3, dtype=dtype)
    x = anycnn.asarray(rng.standard_normal((3, 8, 10, 2)), dtype=dtype)
    y_fused, y_plain = host(fused(x)), host(plain(x))
    body, branch = fused[0].body, fused[1][1]
    assert isinstance(body._plan[0], ConvPoolRun) and len(body._plan) == 2
    assert body._plan[0]._saved is not None  # the block ran fused (pool-plane segment)
    assert isinstance(branch._plan[0], ConvPoolRun)
    assert not any(isinstance(s, ConvPoolRun) for s in plain[0].body._plan)
    assert_rounding_close(y_fused, y_plain)
    dy = anycnn.asarray(rng.standard_normal((3, 3)), dtype=dtype)
    dx_fused, dx_plain = host(fused.backward(dy)), host(plain.backward(dy))
    tol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(dx_fused, dx_plain, atol=tol)
    for (name, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters()):
        np.testing.assert_allclose(host(p.grad), host(q.grad), rtol=tol, atol=tol, err_msg=name)


# --------------------------------------------------------------------------------------------
# Presets, checkpoints and PyTorch state_dicts


def train_step(model, x, classes):
    """One SGD step in training mode (moves weights and BatchNorm statistics)."""
    model.train()
    loss = losses.SoftmaxCrossEntropy()
    loss.forward(model(anycnn.asarray(x)), anycnn.asarray(np.arange(x.shape[0]) % classes))
    model.backward(loss.backward(), input_grad=False)
    optim.SGD(model.parameters(), lr=0.05).step()


def images(shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def assert_logits_close(actual, expected):
    """float32 logits within 1e-5 relative to their largest magnitude."""
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def test_resnet20_structure(backend):
    from anycnn.models import build_model

    model = build_model("resnet20")
    assert model.model_spec == {"name": "resnet20", "num_classes": 10, "in_channels": 3,
                                "image_size": 32}
    blocks = [m for m in model.layers if isinstance(m, Residual)]
    assert len(blocks) == 9
    convs = [m for m in model.modules() if isinstance(m, L.Conv2D)]
    assert len(convs) == 1 + 2 * 9 + 2  # stem, blocks, two projection shortcuts
    projected = [i for i, b in enumerate(blocks) if not isinstance(b.shortcut, Identity)]
    assert projected == [3, 6]
    for i in projected:
        conv, bn = blocks[i].shortcut.layers
        assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and conv.bias is None
        assert isinstance(bn, L.BatchNorm2D)
    assert [b.body[0].out_channels for b in blocks] == [16] * 3 + [32] * 3 + [64] * 3
    assert sum(int(np.prod(p.shape)) for p in model.parameters()) == 272_474
    assert spatial_size(model.layers[:-2], (32, 32)) == (8, 8)  # before pooling


def test_bench_counts_flops_through_containers():
    """``anycnn bench`` sizes: resnet20's multiply-adds, summed by hand per convolution
    (Ho * Wo * kh * kw * C_in * C_out), include bodies and projection shortcuts."""
    from anycnn.cli.bench import flops_per_image, model_input_shape

    assert model_input_shape("resnet20") == (32, 32, 3)
    assert model_input_shape("resnet-mini") == (28, 28, 1)
    macs = (32 * 32 * 9 * 3 * 16                                    # stem
            + 6 * 32 * 32 * 9 * 16 * 16                             # stage 1: 3 blocks
            + 16 * 16 * 9 * 16 * 32 + 5 * 16 * 16 * 9 * 32 * 32    # stage 2
            + 16 * 16 * 16 * 32                                     # its 1x1 shortcut
            + 8 * 8 * 9 * 32 * 64 + 5 * 8 * 8 * 9 * 64 * 64         # stage 3
            + 8 * 8 * 32 * 64                                       # its 1x1 shortcut
            + 64 * 10)                                              # Dense
    flops = flops_per_image("resnet20")
    assert flops["forward"] == 2 * macs
    assert flops["train"] == 3 * 2 * macs - 2 * 32 * 32 * 9 * 3 * 16  # no stem input gradient


def test_resnet20_checkpoint_from_numpy_loads_here(backend, tmp_path):
    x = images((2, 32, 32, 3), seed=1)
    with anycnn.use_backend("numpy"):
        from anycnn.models import build_model

        anycnn.manual_seed(0)
        source = build_model("resnet20")
        train_step(source, images((4, 32, 32, 3)), 10)
        source.eval()
        expected = host(source(anycnn.asarray(x)))
        path = anycnn.save(source, tmp_path / "resnet20.safetensors")
    model, checkpoint = anycnn.load_model(path)
    assert checkpoint.model_spec["name"] == "resnet20"
    assert_logits_close(host(model.eval()(anycnn.asarray(x))), expected)


def test_nested_model_checkpoint_from_numpy_loads_here(backend, tmp_path):
    x = images((2, 6, 8, 2), seed=2)
    with anycnn.use_backend("numpy"):
        anycnn.manual_seed(0)
        source = unet_level("float32")
        train_step(source, images((3, 6, 8, 2)), 2)
        source.eval()
        expected = host(source(anycnn.asarray(x)))
        path = anycnn.save(source, tmp_path / "unet.safetensors")
    anycnn.manual_seed(1)
    model = anycnn.load_weights(unet_level("float32"), path).eval()
    assert_logits_close(host(model(anycnn.asarray(x))), expected)


def torch_logits(torch, module, x):
    with torch.no_grad():
        return module(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


@pytest.mark.parametrize("name", ["resnet20", "nested"])
def test_torch_state_dict_round_trip(backend, torch, name):
    from anycnn.io.interop import from_torch_state_dict, to_torch_state_dict, torch_module
    from anycnn.models import build_model

    if name == "resnet20":
        make, shape, classes = (lambda: build_model("resnet20")), (32, 32, 3), 10
    else:
        make, shape, classes = (lambda: unet_level("float32")), (6, 8, 2), 2
    model = make()
    train_step(model, images((4, *shape)), classes)
    model.eval()
    x = images((2, *shape), seed=3)
    state = to_torch_state_dict(model, shape)
    module = torch_module(model, shape, copy_weights=False).eval()
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})  # strict
    assert set(state) == set(module.state_dict())
    assert_logits_close(torch_logits(torch, module, x), host(model(anycnn.asarray(x))))

    with torch.no_grad():  # new values everywhere, then back into a fresh anycnn model
        gen = torch.Generator().manual_seed(0)
        for key, tensor in module.state_dict().items():
            if not key.endswith("num_batches_tracked"):
                values = torch.rand(tensor.shape, generator=gen, dtype=tensor.dtype)
                tensor.copy_(0.5 + values if key.endswith("running_var") else values - 0.5)
    fresh = make().eval()
    from_torch_state_dict(fresh, module.state_dict(), shape)
    assert_logits_close(host(fresh(anycnn.asarray(x))), torch_logits(torch, module, x))


def test_torch_module_mirrors_the_tree(backend, torch):
    from anycnn.io.interop import to_torch_state_dict, torch_module

    model = unet_level("float32")
    module = torch_module(model, (6, 8, 2))
    assert type(module[2]).__name__ == "Concat" and type(module[3]).__name__ == "Residual"
    assert isinstance(module[2][0], torch.nn.Identity)
    assert isinstance(module[3].shortcut, torch.nn.Identity)
    assert "2.1.3.body.1.running_mean" in to_torch_state_dict(model)
    assert "2.1.3.body.1.num_batches_tracked" in module.state_dict()


def test_flatten_after_concat_exports_with_the_joined_channel_count(backend, torch):
    """The Dense after Flatten is reordered for the channels Concat joins (2 + 3)."""
    from anycnn.io.interop import torch_module

    model = Sequential(L.Conv2D(1, 2, 3), Concat(Identity(), L.Conv2D(2, 3, 1)), L.Flatten(),
                       L.Dense(5 * 6 * 6, 2))
    x = images((2, 8, 8, 1))
    assert_logits_close(torch_logits(torch, torch_module(model, (8, 8, 1)), x),
                        host(model(anycnn.asarray(x))))


def test_interop_refuses_joined_flat_features(backend):
    from anycnn.io.interop import to_torch_state_dict

    model = Sequential(L.Conv2D(1, 2, 3), Concat(L.Flatten(), L.Flatten()), L.Dense(72, 2))
    with pytest.raises(ConfigError, match=r"layer 1 \(Concat\) joins flattened features"):
        to_torch_state_dict(model, (8, 8, 1))
    model = Sequential(L.Conv2D(1, 2, 3), Concat(Identity(), L.MaxPool2D(2)))
    with pytest.raises(ConfigError, match=r"layer 1 \(Concat\): its paths give different h"):
        to_torch_state_dict(model, (8, 8, 1))


# --------------------------------------------------------------------------------------------
# The command line


@pytest.fixture
def restore_backend():
    saved = backend_module._current
    yield
    backend_module._current = saved


@pytest.mark.slow
def test_train_resnet_mini_and_reload(backend, tmp_path, restore_backend, capsys):
    from anycnn.cli.commands import main

    out = tmp_path / "run"
    assert main(["train", "--model", "resnet-mini", "--limit", "256", "--epochs", "1",
                 "--quiet", "--out", str(out)]) == 0
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and np.isfinite(history[0]["val_loss"])
    model, checkpoint = anycnn.load_model(out / "checkpoint.safetensors")
    assert checkpoint.model_spec == {"name": "resnet-mini", "num_classes": 10,
                                     "in_channels": 1, "image_size": 28}
    assert sum(isinstance(m, Residual) for m in model.modules()) == 3
    saved = checkpoint.tensors
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(host(value), saved[name], err_msg=name)
    probs = anycnn.predict_proba(model, np.zeros((3, 28, 28, 1), np.uint8))
    assert probs.shape == (3, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
