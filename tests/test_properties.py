"""Property tests: layer shape arithmetic agrees with PyTorch's for random configurations.

For random kernel, stride, padding, dilation, ceil_mode, output_padding and input sizes, Conv2D,
MaxPool2D, AvgPool2D and ConvTranspose2D (on the backend under test) either produce the output
shape PyTorch's functional ops produce on zeros, or both refuse the configuration; anycnn's
refusal is always one of its own documented errors. Where the forward pass succeeds, backward
returns a gradient of the input's shape.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import anycnn
from anycnn import layers as L
from anycnn.errors import AnycnnError

torch = pytest.importorskip("torch")
TF = torch.nn.functional

#: JAX compiles every new shape it meets (seconds per example here); the geometry these
#: properties check is the same Python on every backend, so JAX runs a quarter of the examples
EXAMPLES = 25 if os.environ.get("ANYCNN_BACKEND") == "jax" else 100
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

sizes = st.integers(1, 11)
small = st.integers(1, 4)


def pairs(values):
    return st.one_of(values, st.tuples(values, values))


def pair(v):
    return v if isinstance(v, tuple) else (v, v)


def torch_shape(fn):
    """(Ho, Wo) from a torch call on zeros, or None if torch refuses the configuration."""
    try:
        return tuple(fn().shape[2:])
    except (RuntimeError, ValueError):
        return None


def anycnn_shape(make_layer, n, h, w, c, dtype=np.float32):
    """(Ho, Wo) of the layer's output on zeros, or None if anycnn refuses (checked: documented
    errors only); also checks the shape backward returns."""
    try:
        layer = make_layer()
        x = anycnn.asarray(np.zeros((n, h, w, c), dtype))
        y = layer.forward(x)
    except AnycnnError:
        return None
    xp = anycnn.get_backend().xp
    dx = layer.backward(xp.ones_like(y))
    assert tuple(dx.shape) == (n, h, w, c)
    assert y.shape[0] == n
    return tuple(y.shape[1:3])


@SETTINGS
@given(h=sizes, w=sizes, c=st.integers(1, 3), out=st.integers(1, 3), kernel=pairs(small),
       stride=pairs(small), dilation=pairs(st.integers(1, 3)),
       padding=st.one_of(pairs(st.integers(0, 3)), st.sampled_from(["same", "valid"])))
def test_conv2d_output_shape_matches_torch(session_backend, h, w, c, out, kernel, stride,
                                           dilation, padding):
    with anycnn.use_backend(session_backend.name):
        got = anycnn_shape(lambda: L.Conv2D(c, out, kernel, stride=stride, padding=padding,
                                            dilation=dilation), 1, h, w, c)
    kh, kw = pair(kernel)
    want = torch_shape(lambda: TF.conv2d(
        torch.zeros(1, c, h, w), torch.zeros(out, c, kh, kw), stride=stride, padding=padding,
        dilation=dilation))
    assert got == want


@SETTINGS
@given(h=sizes, w=sizes, kernel=pairs(small), stride=st.one_of(st.none(), pairs(small)),
       padding=pairs(st.integers(0, 2)), ceil_mode=st.booleans(), n=st.integers(1, 2))
def test_maxpool2d_output_shape_matches_torch(session_backend, h, w, kernel, stride, padding,
                                              ceil_mode, n):
    with anycnn.use_backend(session_backend.name):
        got = anycnn_shape(lambda: L.MaxPool2D(kernel, stride=stride, padding=padding,
                                               ceil_mode=ceil_mode), n, h, w, 2)
    want = torch_shape(lambda: TF.max_pool2d(torch.zeros(n, 2, h, w), kernel, stride=stride,
                                             padding=padding, ceil_mode=ceil_mode))
    assert got == want


@SETTINGS
@given(h=sizes, w=sizes, kernel=pairs(small), stride=st.one_of(st.none(), pairs(small)),
       padding=pairs(st.integers(0, 2)), ceil_mode=st.booleans(),
       count_include_pad=st.booleans())
def test_avgpool2d_output_shape_matches_torch(session_backend, h, w, kernel, stride, padding,
                                              ceil_mode, count_include_pad):
    with anycnn.use_backend(session_backend.name):
        got = anycnn_shape(lambda: L.AvgPool2D(kernel, stride=stride, padding=padding,
                                               ceil_mode=ceil_mode,
                                               count_include_pad=count_include_pad), 1, h, w, 1)
    want = torch_shape(lambda: TF.avg_pool2d(torch.zeros(1, 1, h, w), kernel, stride=stride,
                                             padding=padding, ceil_mode=ceil_mode,
                                             count_include_pad=count_include_pad))
    assert got == want


def test_the_strategies_reach_both_outcomes(session_backend):
    """Guard against a vacuous property: some configurations work, some are refused."""
    with anycnn.use_backend(session_backend.name):
        assert anycnn_shape(lambda: L.Conv2D(1, 1, 3, stride=2, padding=1), 1, 5, 6, 1) == (3, 3)
        assert anycnn_shape(lambda: L.Conv2D(1, 1, 4, dilation=3), 1, 5, 5, 1) is None
        assert anycnn_shape(lambda: L.MaxPool2D(3, 2, 1, ceil_mode=True), 1, 6, 6, 1) == (4, 4)
        assert anycnn_shape(lambda: L.AvgPool2D(2, padding=2), 1, 6, 6, 1) is None
        assert anycnn_shape(lambda: L.ConvTranspose2D(1, 1, 3, 2, 1, 1), 1, 4, 5, 1) == (8, 10)
        assert anycnn_shape(lambda: L.ConvTranspose2D(1, 1, 3, 2, 3), 1, 2, 2, 1) is None


@SETTINGS
@given(h=sizes, w=sizes, c=st.integers(1, 3), out=st.integers(1, 3), kernel=pairs(small),
       stride=pairs(small), dilation=pairs(st.integers(1, 3)),
       padding=pairs(st.integers(0, 3)), output_padding=pairs(st.integers(0, 3)))
def test_conv_transpose2d_output_shape_matches_torch(session_backend, h, w, c, out, kernel,
                                                     stride, dilation, padding, output_padding):
    with anycnn.use_backend(session_backend.name):
        got = anycnn_shape(lambda: L.ConvTranspose2D(
            c, out, kernel, stride=stride, padding=padding, output_padding=output_padding,
            dilation=dilation), 1, h, w, c)
    kh, kw = pair(kernel)
    want = torch_shape(lambda: TF.conv_transpose2d(
        torch.zeros(1, c, h, w), torch.zeros(c, out, kh, kw), stride=stride, padding=padding,
        output_padding=output_padding, dilation=dilation))
    assert got == want
