"""Grouped/depthwise and transposed convolutions, upsampling, GroupNorm and LayerNorm.

Against PyTorch autograd in float64 (outputs, input and every parameter gradient within 1e-8;
skipped without torch), by finite differences (tests/test_gradcheck.py's check), and their
errors; on the backend under test.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import anycnn
from anycnn import layers as L
from anycnn.errors import ConfigError, ShapeError
from anycnn.nn.sequential import Sequential
from tests.layer_cases import case_id, conv_transpose_cases, grouped_conv_cases
from tests.test_gradcheck import check_layer

HAVE_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
TOL = dict(rtol=1e-8, atol=1e-8)


def _nchw(a):
    return np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2)) if a.ndim == 4 else a)


def _nhwc(a):
    return np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a


def check_vs_torch(layer, x, reference, params, rng):
    """Run ``layer`` and ``reference(xt, **tensors)`` (torch, NCHW, float64) on ``x`` (NHWC)
    with the same random output gradient; compare output, input gradient and the gradient of
    every parameter. ``params`` maps a parameter name to ``(to_torch, from_torch)`` layout
    functions of host arrays."""
    import torch

    for p in layer.parameters():  # random values, not the (often constant) initial ones
        p.data = anycnn.asarray(rng.standard_normal(p.shape))
    tensors = {name: torch.tensor(np.ascontiguousarray(to_t(anycnn.to_numpy(
        getattr(layer, name).data))), requires_grad=True) for name, (to_t, _) in params.items()}
    xt = torch.tensor(_nchw(x), requires_grad=True)
    yt = reference(xt, **tensors)
    dy = rng.standard_normal(_nhwc(yt.detach().numpy()).shape)
    yt.backward(torch.tensor(_nchw(dy)))
    y = layer.forward(anycnn.asarray(x))
    dx = layer.backward(anycnn.asarray(dy))
    np.testing.assert_allclose(anycnn.to_numpy(y), _nhwc(yt.detach().numpy()), **TOL)
    np.testing.assert_allclose(anycnn.to_numpy(dx), _nhwc(xt.grad.numpy()), **TOL)
    assert {name for name, _ in layer.named_parameters()} == set(params)
    for name, (_, from_t) in params.items():
        np.testing.assert_allclose(anycnn.to_numpy(getattr(layer, name).grad),
                                   from_t(tensors[name].grad.numpy()), **TOL, err_msg=name)


def _same(a):
    return a


# --------------------------------------------------------------------------------------------
# Grouped and depthwise Conv2D


def _grouped(case, dtype="float64"):
    c = case["shape"][-1]
    return L.Conv2D(c, case["out"], case["kernel_size"], case["stride"], case["padding"],
                    case["dilation"], bias=case["bias"], groups=case["groups"], dtype=dtype)


@needs_torch
@pytest.mark.parametrize("case", grouped_conv_cases(), ids=case_id)
def test_grouped_conv2d_vs_torch(backend, rng, case):
    import torch

    layer = _grouped(case)
    params = {"weight": (lambda a: np.transpose(a, (3, 2, 0, 1)),
                         lambda a: np.transpose(a, (2, 3, 1, 0)))}
    if case["bias"]:
        params["bias"] = (_same, _same)

    def reference(xt, weight, bias=None):
        return torch.nn.functional.conv2d(xt, weight, bias, case["stride"], case["padding"],
                                          case["dilation"], case["groups"])

    check_vs_torch(layer, rng.standard_normal(case["shape"]), reference, params, rng)


@pytest.mark.parametrize("case", grouped_conv_cases(6), ids=case_id)
def test_grouped_conv2d_gradcheck(backend, rng, case):
    check_layer(_grouped(case), rng.standard_normal(case["shape"]), rng)


def test_grouped_conv2d_equals_dense_conv_with_block_diagonal_weight(backend, rng):
    """Without torch: a grouped convolution is the dense one with zeros between the groups."""
    grouped = L.Conv2D(4, 6, 3, padding=1, groups=2, dtype="float64")
    dense = L.Conv2D(4, 6, 3, padding=1, dtype="float64")
    w = anycnn.to_numpy(grouped.weight.data)  # (3, 3, 2, 6)
    full = np.zeros((3, 3, 4, 6))
    full[:, :, :2, :3], full[:, :, 2:, 3:] = w[..., :3], w[..., 3:]
    dense.weight.data = anycnn.asarray(full)
    x = anycnn.asarray(rng.standard_normal((2, 5, 6, 4)))
    np.testing.assert_allclose(anycnn.to_numpy(grouped.forward(x)),
                               anycnn.to_numpy(dense.forward(x)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("args, message", [
    (dict(in_channels=6, out_channels=8, groups=4),
     "Conv2D: in_channels (6) must be divisible by groups (4)"),
    (dict(in_channels=4, out_channels=6, groups=4),
     "Conv2D: out_channels (6) must be divisible by groups (4)"),
    (dict(in_channels=3, out_channels=5, groups=2),
     "Conv2D: in_channels (3) and out_channels (5) must be divisible by groups (2)"),
    (dict(in_channels=4, out_channels=4, groups=0),
     "Conv2D: groups must be an int >= 1, got 0"),
])
def test_grouped_conv2d_errors(backend, args, message):
    with pytest.raises(ConfigError) as err:
        L.Conv2D(kernel_size=3, **args)
    assert str(err.value) == message


def test_grouped_conv_is_not_fused_and_ungrouped_still_is(backend, rng):
    """fusion.execution_plan leaves a grouped Conv2D → ReLU → MaxPool2D to the layers (same
    result as unfused), while a groups=1 block is still fused."""
    from anycnn.nn.fusion import ConvPoolRun

    def model(groups):
        anycnn.manual_seed(3)
        return Sequential(L.Conv2D(4, 4, 3, padding=1, groups=groups, dtype="float64"),
                          L.ReLU(), L.MaxPool2D(2))

    x = anycnn.asarray(rng.standard_normal((2, 6, 6, 4)))
    for groups in (2, 4):
        fused, plain = model(groups), model(groups)
        plain.fuse = False
        y = fused.forward(x)
        assert not any(isinstance(step, ConvPoolRun) for step in fused._plan)
        np.testing.assert_array_equal(anycnn.to_numpy(y), anycnn.to_numpy(plain.forward(x)))
    dense = model(1)
    dense.forward(x)
    assert isinstance(dense._plan[0], ConvPoolRun)


@pytest.mark.parametrize("groups, cout", [(2, 6), (4, 4), (4, 8)], ids=["grouped", "depthwise",
                                                                       "depthwise_x2"])
def test_grouped_conv2d_fastpath_matches_portable(monkeypatch, rng, groups, cout):
    """NumPy: chunked, two-thread fast path equals the portable whole-batch code (float32)."""
    from anycnn.kernels import threads as kthreads
    from tests.rounding import assert_rounding_close

    monkeypatch.setenv("ANYCNN_NUM_THREADS", "2")
    monkeypatch.setattr(kthreads, "CACHE_CHUNK_BYTES", 1 << 14)  # several chunks
    x = rng.standard_normal((9, 7, 6, 4)).astype(np.float32)
    dy = rng.standard_normal((9, 4, 3, cout)).astype(np.float32)
    results = []
    with anycnn.use_backend("numpy"):
        for enabled in (True, False):
            monkeypatch.setattr(kthreads, "ENABLED", enabled)
            anycnn.manual_seed(5)
            layer = L.Conv2D(4, cout, 3, stride=2, padding=1, groups=groups)
            y = layer.forward(anycnn.asarray(x))
            dx = layer.backward(anycnn.asarray(dy))
            results.append([anycnn.to_numpy(a) for a in (y, dx, layer.weight.grad,
                                                         layer.bias.grad)])
    for fast, portable in zip(*results):
        assert_rounding_close(fast, portable)


# --------------------------------------------------------------------------------------------
# ConvTranspose2D


def _transposed(case, dtype="float64"):
    opts = {k: case[k] for k in ("kernel_size", "stride", "padding", "output_padding",
                                 "dilation", "bias")}
    return L.ConvTranspose2D(case["shape"][-1], case["out"], **opts,
                             groups=case.get("groups", 1), dtype=dtype)


def _swap_layout(a):
    """(kh, kw, in, out) <-> torch's (in, out, kh, kw): the same permutation both ways."""
    return np.transpose(a, (2, 3, 0, 1))


@needs_torch
@pytest.mark.parametrize("case", conv_transpose_cases(), ids=case_id)
def test_conv_transpose2d_vs_torch(backend, rng, case):
    import torch

    params = {"weight": (_swap_layout, _swap_layout)}
    if case["bias"]:
        params["bias"] = (_same, _same)

    def reference(xt, weight, bias=None):
        return torch.nn.functional.conv_transpose2d(
            xt, weight, bias, case["stride"], case["padding"], case["output_padding"],
            case.get("groups", 1), case["dilation"])

    check_vs_torch(_transposed(case), rng.standard_normal(case["shape"]), reference, params,
                   rng)


@pytest.mark.parametrize("case", conv_transpose_cases()[:7], ids=case_id)
def test_conv_transpose2d_gradcheck(backend, rng, case):
    check_layer(_transposed(case), rng.standard_normal(case["shape"]), rng)


def test_conv_transpose2d_is_the_adjoint_of_conv2d(backend, rng):
    """Without torch: <conv(u), v> == <u, convT(v)> for the same weight (no bias)."""
    conv = L.Conv2D(3, 2, (3, 2), stride=2, padding=1, dilation=(1, 2), bias=False,
                    dtype="float64")
    up = L.ConvTranspose2D(2, 3, (3, 2), stride=2, padding=1, output_padding=(0, 1),
                           dilation=(1, 2), bias=False, dtype="float64")
    w = rng.standard_normal((3, 2, 3, 2))  # conv (kh, kw, 3, 2) = transposed (kh, kw, 2, 3)^T
    conv.weight.data = anycnn.asarray(w)
    up.weight.data = anycnn.asarray(np.ascontiguousarray(np.transpose(w, (0, 1, 3, 2))))
    u = rng.standard_normal((2, 7, 8, 3))
    cu = anycnn.to_numpy(conv.forward(anycnn.asarray(u)))
    v = rng.standard_normal(cu.shape)
    tv = anycnn.to_numpy(up.forward(anycnn.asarray(v)))
    assert tv.shape == u.shape
    assert np.sum(cu * v) == pytest.approx(np.sum(u * tv), rel=1e-12)


@pytest.mark.parametrize("args, error, message", [
    (dict(stride=2, output_padding=2), ConfigError,
     "ConvTranspose2D output_padding (2, 2) must be smaller than the stride (2, 2) or the "
     "dilation (1, 1) on each axis"),
    (dict(stride=(1, 3), dilation=(2, 1), output_padding=(1, 3)), ConfigError,
     "ConvTranspose2D output_padding (1, 3) must be smaller than the stride (1, 3) or the "
     "dilation (2, 1) on each axis"),
    (dict(padding=3), ShapeError,
     "ConvTranspose2D: input of spatial size (2, 2) gives an output of size (-2, -2) "
     "(padding (3, 3) too large for kernel (3, 3))"),
])
def test_conv_transpose2d_errors(backend, args, error, message):
    with pytest.raises(error) as err:
        layer = L.ConvTranspose2D(1, 1, 3, **args)
        layer.forward(anycnn.asarray(np.zeros((1, 2, 2, 1), np.float32)))
    assert str(err.value) == message


@pytest.mark.parametrize("groups, cout", [(1, 4), (3, 6), (3, 3)],
                         ids=["dense", "grouped", "depthwise"])
def test_conv_transpose2d_fastpath_matches_portable(monkeypatch, rng, groups, cout):
    """NumPy: chunked, two-thread fast path equals the portable whole-batch code (float32)."""
    from anycnn.kernels import threads as kthreads
    from tests.rounding import assert_rounding_close

    monkeypatch.setenv("ANYCNN_NUM_THREADS", "2")
    monkeypatch.setattr(kthreads, "CACHE_CHUNK_BYTES", 1 << 14)
    x = rng.standard_normal((9, 4, 5, 3)).astype(np.float32)
    dy = rng.standard_normal((9, 8, 10, cout)).astype(np.float32)
    results = []
    with anycnn.use_backend("numpy"):
        for enabled in (True, False):
            monkeypatch.setattr(kthreads, "ENABLED", enabled)
            anycnn.manual_seed(5)
            layer = L.ConvTranspose2D(3, cout, 3, stride=2, padding=1, output_padding=1,
                                      groups=groups)
            y = layer.forward(anycnn.asarray(x))
            dx = layer.backward(anycnn.asarray(dy))
            results.append([anycnn.to_numpy(a) for a in (y, dx, layer.weight.grad,
                                                         layer.bias.grad)])
    for fast, portable in zip(*results):
        assert_rounding_close(fast, portable)


# --------------------------------------------------------------------------------------------
# Upsample2D


UPSAMPLE_CASES = [(mode, scale, shape) for mode in ("nearest", "bilinear")
                  for scale, shape in ((2, (2, 4, 5, 3)), (3, (1, 3, 2, 2)),
                                       ((2, 3), (2, 5, 4, 1)), ((3, 1), (1, 1, 6, 2)))]


@needs_torch
@pytest.mark.parametrize("mode, scale, shape", UPSAMPLE_CASES)
def test_upsample2d_vs_torch(backend, rng, mode, scale, shape):
    import torch

    extra = {"align_corners": False} if mode == "bilinear" else {}

    def reference(xt):
        return torch.nn.functional.interpolate(xt, scale_factor=scale, mode=mode, **extra)

    check_vs_torch(L.Upsample2D(scale, mode), rng.standard_normal(shape), reference, {}, rng)


@pytest.mark.parametrize("mode, scale, shape", UPSAMPLE_CASES[::2] + UPSAMPLE_CASES[5::2])
def test_upsample2d_gradcheck(backend, rng, mode, scale, shape):
    check_layer(L.Upsample2D(scale, mode), rng.standard_normal(shape), rng)


def test_upsample2d_values_without_torch(backend):
    """Nearest repeats blocks; bilinear (align_corners=False) of [0, 1] by 2 along W is
    [0, 0.25, 0.75, 1] (edges clamped); constant images stay constant."""
    x = anycnn.asarray(np.array([0.0, 1.0]).reshape(1, 1, 2, 1))
    near = anycnn.to_numpy(L.Upsample2D((1, 2)).forward(x))
    np.testing.assert_array_equal(near.reshape(-1), [0, 0, 1, 1])
    lin = anycnn.to_numpy(L.Upsample2D((1, 2), "bilinear").forward(x))
    np.testing.assert_allclose(lin.reshape(-1), [0, 0.25, 0.75, 1], rtol=0, atol=1e-15)
    ones = L.Upsample2D(3, "bilinear").forward(anycnn.asarray(np.ones((2, 3, 4, 2))))
    np.testing.assert_allclose(anycnn.to_numpy(ones), np.ones((2, 9, 12, 2)), atol=1e-15)
    assert L.Upsample2D(2.0).scale_factor == (2, 2)
    assert L.Upsample2D(2).output_hw((3, 5)) == (6, 10)


@pytest.mark.parametrize("args, message", [
    ((1.5,), "Upsample2D scale_factor must be an integer >= 1 or a pair of them, got 1.5"),
    (((2, 0.5),), "Upsample2D scale_factor must be an integer >= 1 or a pair of them, got "
                  "(2, 0.5)"),
    ((0,), "Upsample2D scale_factor must be an integer >= 1 or a pair of them, got 0"),
    ((2, "bicubic"), "Upsample2D mode must be one of nearest, bilinear; got 'bicubic'"),
])
def test_upsample2d_errors(args, message):
    with pytest.raises(ConfigError) as err:
        L.Upsample2D(*args)
    assert str(err.value) == message


# --------------------------------------------------------------------------------------------
# GroupNorm and LayerNorm

NORM_SHAPES = [(3, 4, 5, 6), (2, 3, 2, 6), (4, 6)]


@needs_torch
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("groups", [1, 2, 3, 6])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_vs_torch(backend, rng, shape, groups, affine):
    import torch

    layer = L.GroupNorm(groups, 6, eps=1e-3, affine=affine, dtype="float64")
    params = {"weight": (_same, _same), "bias": (_same, _same)} if affine else {}

    def reference(xt, weight=None, bias=None):
        return torch.nn.functional.group_norm(xt, groups, weight, bias, 1e-3)

    check_vs_torch(layer, rng.standard_normal(shape) * 3 + 1, reference, params, rng)


@needs_torch
@pytest.mark.parametrize("shape", [*NORM_SHAPES, (2, 3, 3, 1)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_vs_torch(backend, rng, shape, affine):
    import torch

    c = shape[-1]
    layer = L.LayerNorm(c, affine=affine, dtype="float64")
    params = {"weight": (_same, _same), "bias": (_same, _same)} if affine else {}

    def reference(xt, weight=None, bias=None):  # torch normalises the last axis: go NHWC
        last = xt.permute(0, 2, 3, 1) if xt.ndim == 4 else xt
        y = torch.nn.functional.layer_norm(last, (c,), weight, bias, 1e-5)
        return y.permute(0, 3, 1, 2) if xt.ndim == 4 else y

    check_vs_torch(layer, rng.standard_normal(shape) * 3 + 1, reference, params, rng)


@pytest.mark.parametrize("make, shape", [
    (lambda: L.GroupNorm(2, 4, dtype="float64"), (2, 3, 2, 4)),
    (lambda: L.GroupNorm(4, 4, affine=False, dtype="float64"), (2, 3, 3, 4)),
    (lambda: L.GroupNorm(3, 6, dtype="float64"), (3, 6)),
    (lambda: L.LayerNorm(5, dtype="float64"), (2, 3, 2, 5)),
    (lambda: L.LayerNorm(4, eps=1e-2, dtype="float64"), (3, 4)),
], ids=["gn", "gn_no_affine", "gn_nc", "ln", "ln_nc"])
def test_norm_gradcheck(backend, rng, make, shape):
    layer = make()
    for p in layer.parameters():
        p.data = anycnn.asarray(rng.standard_normal(p.shape))
    check_layer(layer, rng.standard_normal(shape), rng)


def test_norms_normalise_without_torch(backend, rng):
    """Each group (GroupNorm) or pixel (LayerNorm) has mean 0 and variance 1 after the layer
    with its initial weight 1 and bias 0, in training and eval alike."""
    x = rng.standard_normal((2, 3, 4, 6)) * 5 + 2
    gn = L.GroupNorm(3, 6, eps=1e-12, dtype="float64")
    y = anycnn.to_numpy(gn.forward(anycnn.asarray(x))).reshape(2, 12, 3, 2)
    np.testing.assert_allclose(y.mean(axis=(1, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(1, 3)), 1, atol=1e-9)
    ln = L.LayerNorm(6, eps=1e-12, dtype="float64").eval()
    y = anycnn.to_numpy(ln.forward(anycnn.asarray(x)))
    np.testing.assert_allclose(y.mean(axis=3), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=3), 1, atol=1e-9)
    assert [name for name, _ in gn.named_parameters()] == ["weight", "bias"]


@pytest.mark.parametrize("make, message", [
    (lambda: L.GroupNorm(4, 6), "GroupNorm: num_channels (6) must be divisible by num_groups (4)"),
    (lambda: L.GroupNorm(0, 6), "num_groups must be >= 1, got 0"),
    (lambda: L.LayerNorm(4, eps=0), "LayerNorm eps must be > 0, got 0"),
])
def test_norm_config_errors(backend, make, message):
    with pytest.raises(ConfigError) as err:
        make()
    assert str(err.value) == message


def test_norm_shape_errors(backend):
    with pytest.raises(ShapeError) as err:
        L.LayerNorm(4).forward(anycnn.asarray(np.zeros((2, 3, 4), np.float32)))
    assert str(err.value) == "LayerNorm expects NHWC or (N, C) input, got shape (2, 3, 4)"
    with pytest.raises(ShapeError) as err:
        L.GroupNorm(2, 4).forward(anycnn.asarray(np.zeros((2, 3, 3, 6), np.float32)))
    assert str(err.value) == ("GroupNorm expects 4 channels on the last axis, got input shape "
                              "(2, 3, 3, 6) (activations are NHWC)")


# --------------------------------------------------------------------------------------------
# PyTorch interop


def _new_layers_model():
    """Every new layer in one NHWC model for (8, 8, 4) images (float64)."""
    return Sequential(
        L.Conv2D(4, 8, 3, padding=1, groups=2, dtype="float64"), L.GroupNorm(4, 8,
                                                                           dtype="float64"),
        L.Conv2D(8, 8, 3, stride=2, padding=1, groups=8, dtype="float64"),  # depthwise
        L.LayerNorm(8, dtype="float64"), L.ReLU(),
        L.ConvTranspose2D(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2,
                          dtype="float64"),
        L.Upsample2D((2, 1), "bilinear"), L.Conv2D(6, 3, 1, dtype="float64"),
        L.Upsample2D(2), L.Flatten(), L.LayerNorm(3 * 32 * 16, dtype="float64"),
        L.Dense(3 * 32 * 16, 5, dtype="float64"))


@needs_torch
def test_interop_round_trip_with_new_layers(backend, rng):
    """Export to a torch state_dict and nn.Module (same outputs), import back (same tensors)."""
    import torch

    from anycnn.io.interop import from_torch_state_dict, to_torch_state_dict, torch_module

    model = _new_layers_model()
    for p in model.parameters():
        p.data = anycnn.asarray(rng.standard_normal(p.shape) * 0.3)
    x = rng.standard_normal((2, 8, 8, 4))
    y = anycnn.to_numpy(model.forward(anycnn.asarray(x)))
    state = to_torch_state_dict(model, (8, 8, 4))
    assert state["0.weight"].shape == (8, 2, 3, 3) and state["2.weight"].shape == (8, 1, 3, 3)
    assert state["5.weight"].shape == (8, 3, 3, 3) and state["1.weight"].shape == (8,)
    module = torch_module(model, (8, 8, 4))
    assert [type(m).__name__ for m in module][:7] == [
        "Conv2d", "GroupNorm", "Conv2d", "ChannelLayerNorm", "ReLU", "ConvTranspose2d",
        "Upsample"]
    with torch.no_grad():
        yt = module(torch.tensor(_nchw(x))).numpy()
    np.testing.assert_allclose(yt, y, rtol=1e-10, atol=1e-10)
    back = _new_layers_model()
    from_torch_state_dict(back, module.state_dict(), (8, 8, 4))
    for (name, a), (_, b) in zip(model.named_parameters(), back.named_parameters()):
        np.testing.assert_array_equal(anycnn.to_numpy(a.data), anycnn.to_numpy(b.data), name)


def test_interop_refuses_grouped_norm_of_flattened_images(backend):
    from anycnn.io.interop import to_torch_state_dict

    model = Sequential(L.Conv2D(1, 2, 3), L.Flatten(), L.GroupNorm(2, 8))
    with pytest.raises(ConfigError) as err:
        to_torch_state_dict(model, (4, 4, 1))
    assert str(err.value) == ("layer 2 (GroupNorm) normalises flattened NHWC features in "
                              "groups: PyTorch flattens NCHW, so its groups would hold other "
                              "features")
