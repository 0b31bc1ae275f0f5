"""``anycnn.summary`` / ``Module.summary`` on the backend under test: exact rows for the presets
(shapes, parameter counts, FLOPs equal to the ones ``anycnn bench`` quotes), nested containers,
modules a pass does not reach, and a model left exactly as it was, also when its forward raises."""

from __future__ import annotations

import math

import numpy as np
import pytest

import anycnn
from anycnn import layers as L
from anycnn.cli.bench import flops_per_image
from anycnn.errors import ConfigError, ShapeError
from anycnn.models import MODELS, build_model
from anycnn.nn.fusion import ConvPoolRun
from anycnn.nn.module import Module
from anycnn.nn.summarize import SummaryRow

LENET5 = [  # name, type, output shape, params, forward FLOPs per image
    ("0", "Conv2D", (None, 28, 28, 6), 156, 235_200),
    ("1", "ReLU", (None, 28, 28, 6), 0, 0),
    ("2", "MaxPool2D", (None, 14, 14, 6), 0, 0),
    ("3", "Conv2D", (None, 10, 10, 16), 2_416, 480_000),
    ("4", "ReLU", (None, 10, 10, 16), 0, 0),
    ("5", "MaxPool2D", (None, 5, 5, 16), 0, 0),
    ("6", "Flatten", (None, 400), 0, 0),
    ("7", "Dense", (None, 120), 48_120, 96_000),
    ("8", "ReLU", (None, 120), 0, 0),
    ("9", "Dense", (None, 84), 10_164, 20_160),
    ("10", "ReLU", (None, 84), 0, 0),
    ("11", "Dense", (None, 10), 850, 1_680),
]
SIMPLE_CNN = [
    ("0", "Conv2D", (None, 28, 28, 32), 320, 451_584),
    ("1", "ReLU", (None, 28, 28, 32), 0, 0),
    ("2", "MaxPool2D", (None, 14, 14, 32), 0, 0),
    ("3", "Conv2D", (None, 14, 14, 64), 18_496, 7_225_344),
    ("4", "ReLU", (None, 14, 14, 64), 0, 0),
    ("5", "MaxPool2D", (None, 7, 7, 64), 0, 0),
    ("6", "Flatten", (None, 3136), 0, 0),
    ("7", "Dense", (None, 128), 401_536, 802_816),
    ("8", "ReLU", (None, 128), 0, 0),
    ("9", "Dense", (None, 10), 1_290, 2_560),
]
#: anycnn bench's FLOPs per image before it used the summary (BENCHMARKS.md quotes simple-cnn's)
BENCH_FLOPS = {"lenet5": (833_040, 2_263_920), "simple-cnn": (8_482_304, 24_995_328),
               "bn-cnn": (36_579_584, 109_287_168),
               # residual presets: counted through Residual bodies and shortcuts
               "resnet20": (81_626_368, 243_994_368), "resnet-mini": (18_691_840, 55_849_728),
               # the same network written as code: the same count
               "resnet20-code": (81_626_368, 243_994_368),
               # the torchvision architectures at 224x224x3, 1000 classes: forward / 2 is
               # torchvision's published multiply-adds (1.81, 3.66, 4.09, 0.30, 0.06, 0.22,
               # 0.39, 4.46 G)
               "resnet18": (3_628_146_688, 10_648_412_160),
               "resnet34": (7_327_522_816, 21_746_540_544),
               "resnet50": (8_178_368_512, 24_299_077_632),
               "mobilenet_v2": (601_548_544, 1_782_969_600),
               "mobilenet_v3_small": (113_020_800, 328_224_384),
               "mobilenet_v3_large": (433_179_520, 1_288_700_544),
               "efficientnet_b0": (771_629_504, 2_293_212_480),
               "convnext_tiny": (8_911_062_528, 26_704_286_208)}


def _rows(s):
    return [(r.name, r.type, r.output_shape, r.params, r.flops) for r in s.rows]


@pytest.mark.parametrize("name, rows", [("lenet5", LENET5), ("simple-cnn", SIMPLE_CNN)])
def test_preset_rows(backend, name, rows):
    model = build_model(name)
    s = anycnn.summary(model, (28, 28, 1))
    assert _rows(s) == rows
    assert all(r.depth == 0 for r in s.rows)
    for row, layer in zip(s.rows, model.layers):
        assert row.params == sum(math.prod(p.shape) for p in layer.parameters())
    assert s.trainable_params == s.total_params == sum(math.prod(p.shape)
                                                       for p in model.parameters())
    assert s.flops == sum(r[4] for r in rows) == flops_per_image(name)["forward"]
    assert s.output_shape == (None, 10) and s.param_bytes == 4 * s.total_params
    text = str(s).splitlines()
    assert text[0] == "Sequential on input (None, 28, 28, 1)"
    first = rows[0]
    assert text[4].split() == [first[0], f"({first[1]})", *str(first[2]).split(),
                               f"{first[3]:,}", f"{first[4]:,}"]
    assert f"Total params: {s.total_params:,} (" in str(s)
    assert f"Forward FLOPs per image: {s.flops:,} (" in str(s)


@pytest.mark.parametrize("name", MODELS)
def test_bench_flops_are_unchanged(name):
    counts = flops_per_image(name)
    assert (counts["forward"], counts["train"]) == BENCH_FLOPS[name]


def test_buffers_are_non_trainable_params(backend):
    s = anycnn.summary(build_model("bn-cnn"), (28, 28, 1))
    assert s.non_trainable_params == 2 * (32 + 32 + 64 + 64)
    assert s.total_params == s.trainable_params + s.non_trainable_params
    assert s.rows[1] == SummaryRow("1", "BatchNorm2D", 0, (None, 28, 28, 32), 64, 0)


def _nested() -> anycnn.Sequential:
    return anycnn.Sequential(
        L.Conv2D(1, 4, 3, padding=1),
        anycnn.Sequential(L.ReLU(), anycnn.Sequential(L.Conv2D(4, 8, 3), L.ReLU()),
                          L.MaxPool2D(2)),
        L.Flatten(), L.Dense(8 * 3 * 3, 5))


def test_nested_containers(backend):
    model = _nested()
    s = anycnn.summary(model, (8, 8, 1))
    assert [(r.name, r.type, r.depth, r.output_shape) for r in s.rows] == [
        ("0", "Conv2D", 0, (None, 8, 8, 4)),
        ("1", "Sequential", 0, (None, 3, 3, 8)),
        ("1.0", "ReLU", 1, (None, 8, 8, 4)),
        ("1.1", "Sequential", 1, (None, 6, 6, 8)),
        ("1.1.0", "Conv2D", 2, (None, 6, 6, 8)),
        ("1.1.1", "ReLU", 2, (None, 6, 6, 8)),
        ("1.2", "MaxPool2D", 1, (None, 3, 3, 8)),
        ("2", "Flatten", 0, (None, 72)),
        ("3", "Dense", 0, (None, 5)),
    ]
    by_name = {r.name: r for r in s.rows}
    conv = 2 * 3 * 3 * 4 * 8 * 6 * 6
    assert by_name["1.1.0"].flops == by_name["1.1"].flops == by_name["1"].flops == conv
    assert by_name["1"].params == by_name["1.1.0"].params == 3 * 3 * 4 * 8 + 8
    assert s.flops == 2 * 9 * 4 * 64 + conv + 2 * 72 * 5
    assert s.total_params == sum(math.prod(p.shape) for p in model.parameters())
    assert "\n    1.1.0 (Conv2D)  " in str(s)  # indented by depth


class _TwoPaths(Module):
    """Uses ``used`` only; ``spare`` never runs. Counts one FLOP per output value."""

    def __init__(self) -> None:
        self.used, self.spare = L.Dense(3, 2), L.Dense(3, 4)

    def forward(self, x):
        return self.used.forward(x)

    def flops(self, input_shape, output_shape):
        return math.prod(output_shape)


def test_own_flops_and_modules_the_pass_does_not_reach(backend):
    s = anycnn.summary(_TwoPaths(), (3,))
    assert _rows(s) == [("used", "Dense", (None, 2), 8, 12), ("spare", "Dense", None, 16, 0)]
    assert s.flops == 12 + 2  # the children's and the container's own
    assert str(s).splitlines()[5].split() == ["spare", "(Dense)", "-", "16", "0"]


def test_a_leaf_module_is_its_own_row(backend):
    s = anycnn.summary(L.Conv2D(3, 2, 1), (4, 4, 3))
    assert _rows(s) == [("", "Conv2D", (None, 4, 4, 2), 8, 2 * 6 * 16)]


def _state(model):
    return [(m, dict(vars(m)), m.training) for m in model.modules()], [
        (p, p.data, p.grad) for p in model.parameters()]


def test_the_model_is_left_as_it_was(backend):
    """Modes (mixed), no wrapped forward left, buffers, gradients, the fused plan, the RNG."""
    model = anycnn.Sequential(*build_model("simple-cnn").layers[:3], L.BatchNorm2D(32),
                              L.Dropout(0.5), L.Flatten())
    model[1].eval()
    x = anycnn.asarray(np.ones((2, 28, 28, 1)), dtype="float32")
    model.backward(model.forward(x))
    assert isinstance(model._plan[0], ConvPoolRun)  # the fast path, not the layers
    before = _state(model)
    rng_state = anycnn.random.get_state()
    s = anycnn.summary(model, (28, 28, 1))
    assert [r.output_shape for r in s.rows][:3] == [
        (None, 28, 28, 32), (None, 28, 28, 32), (None, 14, 14, 32)]  # seen through the fusion
    assert _state(model) == before
    assert not any("forward" in vars(m) for m in model.modules())
    assert anycnn.random.get_state() == rng_state
    model.forward(x)
    assert isinstance(model._plan[0], ConvPoolRun)  # fused again after the summary


def test_the_model_is_restored_when_its_forward_raises(backend):
    model = build_model("lenet5")
    model[2].eval()
    before = _state(model)
    with pytest.raises(ShapeError, match="Dense"):
        anycnn.summary(model, (32, 32, 1))
    assert _state(model) == before
    assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("shape", [(), (28, 0, 1), (28.5, 28, 1), "28", None])
def test_bad_input_shape(backend, shape):
    with pytest.raises(ConfigError, match="input_shape"):
        anycnn.summary(build_model("lenet5"), shape)


def test_module_summary_prints_the_table(backend):
    model = build_model("lenet5")
    printed = []
    assert model.summary((28, 28, 1), print_fn=printed.append) is None
    assert printed == [str(anycnn.summary(model, (28, 28, 1)))]


def test_float64_models_count_8_bytes(backend):
    model = build_model("lenet5").to("float64")
    s = anycnn.summary(model, (28, 28, 1))
    assert s.param_bytes == 8 * s.total_params
    assert s.activation_bytes == 8 * sum(math.prod(r.output_shape[1:]) for r in s.rows)


def test_transposed_convolution_flops_count_input_positions(backend):
    """A ConvTranspose2D spreads each input pixel over a kernel patch: 2 x weight size FLOPs
    per input position (here 5x6 inputs, weight 3x3x4x2), whatever the stride."""
    from anycnn import layers as L

    for stride in (1, 2):
        s = anycnn.summary(anycnn.Sequential(L.ConvTranspose2D(4, 2, 3, stride=stride)),
                           (5, 6, 4))
        assert s.rows[-1].flops == 2 * (3 * 3 * 4 * 2) * 5 * 6
