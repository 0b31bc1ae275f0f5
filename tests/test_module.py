"""Modules and containers: names, modes, gradient accumulation, dropout and batchnorm modes."""

from __future__ import annotations

import os

import numpy as np
import pytest

import anycnn
from anycnn import layers as L
from anycnn.errors import CheckpointError, ShapeError
from anycnn.models import MODELS, build_model, model_spec
from tests.rounding import assert_rounding_close


def test_sequential_names_are_stable_and_dotted(backend):
    model = build_model("bn-cnn")
    names = [n for n, _ in model.named_parameters()]
    assert names[:3] == ["0.weight", "1.weight", "1.bias"]
    buffers = [n for n, _ in model.named_buffers()]
    assert buffers[:2] == ["1.running_mean", "1.running_var"]
    assert len(model.parameters()) == len(names)
    assert set(model.state_dict()) == set(names) | set(buffers)


#: the ImageNet architectures on JAX: every eager operation of a new shape compiles (about a
#: minute per MobileNet); tests/test_torchvision_models.py covers them there (-m slow for all)
_JAX_SLOW = {"resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
             "efficientnet_b0", "convnext_tiny"}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow)
    if n in _JAX_SLOW and os.environ.get("ANYCNN_BACKEND") == "jax" else n for n in MODELS])
def test_presets_run_forward_and_backward(backend, rng, name):
    spec = model_spec(name)  # the preset's own input shape (32x32x3 for resnet20)
    # the ImageNet architectures take any size from 32x32: 64x64 keeps this quick
    spec["image_size"] = min(spec["image_size"], 64)
    shape = (2, spec["image_size"], spec["image_size"], spec["in_channels"])
    model = build_model(spec)
    x = anycnn.asarray(rng.random(shape, dtype=np.float32))
    y = model(x)
    classes = spec["num_classes"]  # 10, or ImageNet's 1000
    assert tuple(y.shape) == (2, classes)
    dx = model.backward(anycnn.asarray(np.ones((2, classes), np.float32)))
    assert tuple(dx.shape) == shape
    assert all(p.grad is not None and tuple(p.grad.shape) == p.shape for p in model.parameters())


def test_gradients_accumulate_until_zero_grad(backend, rng):
    layer = L.Dense(4, 3)
    x = anycnn.asarray(rng.random((2, 4), dtype=np.float32))
    dy = anycnn.asarray(np.ones((2, 3), np.float32))
    layer.forward(x)
    layer.backward(dy)
    once = anycnn.to_numpy(layer.weight.grad).copy()
    layer.forward(x)
    layer.backward(dy)
    np.testing.assert_allclose(anycnn.to_numpy(layer.weight.grad), 2 * once, rtol=1e-6)
    layer.zero_grad()
    assert layer.weight.grad is None and layer.bias.grad is None


def test_dropout_train_and_eval(backend, rng):
    layer = L.Dropout(0.25)
    x = anycnn.asarray(np.ones((200, 50), np.float32))
    y = anycnn.to_numpy(layer(x))
    kept = y != 0
    assert 0.70 < kept.mean() < 0.80
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)
    dx = anycnn.to_numpy(layer.backward(anycnn.asarray(np.ones((200, 50), np.float32))))
    np.testing.assert_array_equal(dx, y)  # gradient uses the same mask and scale
    layer.eval()
    np.testing.assert_array_equal(anycnn.to_numpy(layer(x)), anycnn.to_numpy(x))


def test_batchnorm_modes_differ_and_eval_uses_running_stats(backend, rng):
    layer = L.BatchNorm2D(2, momentum=1.0)
    x = rng.standard_normal((8, 3, 3, 2)).astype(np.float32) * 2 + 5
    y_train = anycnn.to_numpy(layer(anycnn.asarray(x)))
    np.testing.assert_allclose(y_train.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    layer.eval()
    y_eval = anycnn.to_numpy(layer(anycnn.asarray(x)))
    unbiased = x.var(axis=(0, 1, 2), ddof=1)
    expected = (x - x.mean(axis=(0, 1, 2))) / np.sqrt(unbiased + 1e-5)
    np.testing.assert_allclose(y_eval, expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(y_eval, y_train)


def test_train_eval_propagate_to_children(backend):
    model = build_model("bn-cnn").eval()
    assert all(not m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


def test_load_state_dict_rejects_a_different_model(backend):
    a, b = build_model("lenet5"), build_model("simple-cnn")
    with pytest.raises(CheckpointError, match=r"0\.weight.*\(3, 3, 1, 32\).*\(5, 5, 1, 6\)"):
        a.load_state_dict(b.state_dict())


def test_load_state_dict_round_trip(backend, rng):
    a = build_model("lenet5")
    anycnn.manual_seed(99)
    b = build_model("lenet5")
    b.load_state_dict({k: anycnn.to_numpy(v) for k, v in a.state_dict().items()})
    x = anycnn.asarray(rng.random((2, 28, 28, 1), dtype=np.float32))
    np.testing.assert_array_equal(anycnn.to_numpy(a(x)), anycnn.to_numpy(b(x)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_conv_relu_pool_matches_unfused(backend, rng, dtype):
    from anycnn.nn.fusion import ConvPoolRun

    anycnn.manual_seed(5)
    fused = build_model("simple-cnn").to(dtype)
    anycnn.manual_seed(5)
    plain = build_model("simple-cnn").to(dtype)
    plain.fuse = False
    for a, b in zip(fused.layers, plain.layers):  # non-zero biases exercise the rewrite
        if isinstance(a, L.Conv2D):
            a.bias.data = b.bias.data = anycnn.asarray(
                rng.standard_normal(a.bias.shape) * 0.1, dtype=dtype)
    x = anycnn.asarray(rng.random((3, 28, 28, 1)).astype(dtype))
    y_fused, y_plain = fused(x), plain(x)
    assert [len(s.blocks) for s in fused._plan if isinstance(s, ConvPoolRun)] == [2]
    assert not any(isinstance(s, ConvPoolRun) for s in plain._plan)
    # the fused block hands the BLAS other matrix shapes: equal up to reordered sums
    assert_rounding_close(anycnn.to_numpy(y_fused), anycnn.to_numpy(y_plain))
    dy = anycnn.asarray(rng.standard_normal((3, 10)).astype(dtype))
    dx_fused, dx_plain = fused.backward(dy), plain.backward(dy)
    tol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(anycnn.to_numpy(dx_fused), anycnn.to_numpy(dx_plain), atol=tol)
    for (name, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters()):
        np.testing.assert_allclose(anycnn.to_numpy(p.grad), anycnn.to_numpy(q.grad),
                                   rtol=tol, atol=tol, err_msg=name)
    fused(x)
    assert fused.backward(dy, input_grad=False) is None
    with pytest.raises(RuntimeError, match="called twice"):
        fused.backward(dy)  # backward consumes the forward's columns, as PyTorch's graph


def test_chunked_convolution_equals_one_piece(backend, rng, monkeypatch):
    """Convolution forward and backward a chunk of images at a time (the portable byte limit,
    or NumPy's cache-sized chunks) equal the whole batch at once."""
    from anycnn import functional as F
    from anycnn.kernels import threads as kthreads

    layer = L.Conv2D(3, 4, 3, stride=(2, 1), padding=1, dtype="float64")
    x = anycnn.asarray(rng.standard_normal((5, 7, 6, 3)))
    dy = anycnn.asarray(rng.standard_normal((5, 4, 6, 4)))

    def run():
        layer.zero_grad()
        y = anycnn.to_numpy(layer(x))
        dx = anycnn.to_numpy(layer.backward(dy))
        return y, dx, anycnn.to_numpy(layer.weight.grad), anycnn.to_numpy(layer.bias.grad)

    monkeypatch.setenv("ANYCNN_NUM_THREADS", "1")
    whole = run()
    monkeypatch.setattr(F, "COL2IM_CHUNK_BYTES", 1)  # one image per chunk
    monkeypatch.setattr(kthreads, "CACHE_CHUNK_BYTES", 1)
    monkeypatch.setenv("ANYCNN_NUM_THREADS", "2")
    chunked = run()
    # per-chunk GEMMs against one: the BLAS may order each sum differently per shape
    for a, b in zip(chunked, whole):
        assert_rounding_close(a, b)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("images_per_chunk", [None, 1])
def test_conv_pool_run_with_mixed_blocks_matches_layers(backend, rng, monkeypatch,
                                                        images_per_chunk, compiled):
    """A run of four fused blocks whose second pooling overlaps: the others go through the
    pool-plane path (depth first, also one image per chunk on two threads), or each through
    the compiled kernel where it applies (``compiled``), the second through the general path;
    values and gradients equal the unfused layers."""
    from anycnn import functional as F
    from anycnn.kernels import native
    from anycnn.kernels import threads as kthreads
    from anycnn.nn.fusion import ConvPoolRun, ConvReluMaxPool

    if compiled and not (backend.name == "numpy" and native.available(np)):
        pytest.skip("the compiled kernels apply only to NumPy with halide installed")
    monkeypatch.setattr(native, "ENABLED", compiled)
    # these narrow layers would be left to the NumPy path (a speed rule): take them compiled
    monkeypatch.setattr(native, "channels_fill_vectors", lambda channels, dtype: True)

    def make():
        anycnn.manual_seed(4)
        return anycnn.Sequential(
            L.Conv2D(2, 3, 3, padding=1, dtype="float64"), L.ReLU(), L.MaxPool2D(2),
            L.Conv2D(3, 4, 3, padding=1, dtype="float64"), L.ReLU(),
            L.MaxPool2D(3, stride=2),
            L.Conv2D(4, 5, 3, padding=1, dtype="float64"), L.ReLU(), L.MaxPool2D(2),
            L.Conv2D(5, 3, 1, dtype="float64"), L.ReLU(), L.MaxPool2D(1), L.Flatten())

    if images_per_chunk:
        monkeypatch.setattr(F, "COL2IM_CHUNK_BYTES", 1)
        monkeypatch.setattr(kthreads, "CACHE_CHUNK_BYTES", 1)
        monkeypatch.setenv("ANYCNN_NUM_THREADS", "2")
    fused, plain = make(), make()
    plain.fuse = False
    for a, b in zip(fused.layers, plain.layers):
        if isinstance(a, L.Conv2D):
            a.bias.data = b.bias.data = anycnn.asarray(rng.standard_normal(a.bias.shape) * 0.3)
    x = anycnn.asarray(rng.standard_normal((3, 18, 17, 2)))
    y = fused(x)
    run, = fused._plan[:-1]
    assert isinstance(run, ConvPoolRun) and len(run.blocks) == 4
    # each block in one kernel (compiled, or torch's own operators), but block 1 (general)
    if compiled or (backend.name == "torch" and kthreads.switched_on()):
        assert [type(part).__name__ for part in run._saved] == [
            "_CompiledStep", "ConvReluMaxPool", "_CompiledStep", "_CompiledStep"]
    else:  # segments: block 0 alone (block 1 overlaps), block 1 (general), blocks 2-3 together
        assert [getattr(part, "blocks", None) is None for part in run._saved] == [
            False, True, False]
        assert isinstance(run._saved[1], ConvReluMaxPool) and len(run._saved[2].blocks) == 2
    assert_rounding_close(anycnn.to_numpy(y), anycnn.to_numpy(plain(x)))
    dy = anycnn.asarray(rng.standard_normal(tuple(y.shape)))
    np.testing.assert_allclose(anycnn.to_numpy(fused.backward(dy)),
                               anycnn.to_numpy(plain.backward(dy)), atol=1e-12)
    for (name, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters()):
        np.testing.assert_allclose(anycnn.to_numpy(p.grad), anycnn.to_numpy(q.grad), atol=1e-12,
                                   err_msg=name)
    with pytest.raises(RuntimeError, match="called twice"):
        fused.backward(dy)


def test_conv_pool_run_reports_a_bad_block_by_its_layer(backend, rng):
    """A later block of a depth-first segment checks its input shape before anything runs."""
    net = anycnn.Sequential(L.Conv2D(1, 3, 3, padding=1), L.ReLU(), L.MaxPool2D(2),
                            L.Conv2D(4, 2, 3, padding=1), L.ReLU(), L.MaxPool2D(2))
    x = anycnn.asarray(rng.random((2, 8, 8, 1), dtype=np.float32))
    with pytest.raises(ShapeError, match="Conv2D expects 4 channels on the last axis, got input "
                                         r"shape \(2, 4, 4, 3\)"):
        net(x)
    assert net._plan[0]._saved is None  # nothing was computed or kept


@pytest.mark.parametrize("pool, planes", [
    (dict(kernel_size=2), True),                         # disjoint, odd sizes drop a row/col
    (dict(kernel_size=(2, 1), stride=(3, 2)), True),     # disjoint with gaps between windows
    (dict(kernel_size=3, stride=2), False),              # overlapping: the gathered fallback
    (dict(kernel_size=2, padding=1), False),             # padded: the gathered fallback
    (dict(kernel_size=2, ceil_mode=True), False),        # partial windows: the fallback
], ids=["tiles", "gaps", "overlap", "padded", "ceil"])
def test_fused_block_matches_layers_for_any_pooling(backend, rng, pool, planes):
    from anycnn.nn.fusion import ConvPoolRun, ConvReluMaxPool

    def make():
        anycnn.manual_seed(2)
        return anycnn.Sequential(L.Conv2D(2, 3, 3, padding=1, dtype="float64"), L.ReLU(),
                                 L.MaxPool2D(**pool), L.Flatten())

    fused, plain = make(), make()
    plain.fuse = False
    fused[0].bias.data = plain[0].bias.data = anycnn.asarray(rng.standard_normal(3) * 0.3)
    x = anycnn.asarray(rng.standard_normal((2, 9, 7, 2)))
    y = fused(x)
    assert isinstance(fused._plan[0], ConvPoolRun)
    # the general path saves the block itself, the pool-plane path a segment of blocks
    assert isinstance(fused._plan[0]._saved[0], ConvReluMaxPool) != planes
    assert_rounding_close(anycnn.to_numpy(y), anycnn.to_numpy(plain(x)))
    dy = anycnn.asarray(rng.standard_normal(tuple(y.shape)))
    np.testing.assert_allclose(anycnn.to_numpy(fused.backward(dy)),
                               anycnn.to_numpy(plain.backward(dy)), atol=1e-12)
    for p, q in zip(fused.parameters(), plain.parameters()):
        np.testing.assert_allclose(anycnn.to_numpy(p.grad), anycnn.to_numpy(q.grad), atol=1e-12)
