"""The stride-1 weight-gradient kernel (:mod:`anycnn.kernels.native_wgrad`): it is chosen where
it applies (forced on here whatever the CPU's registers, so the test runs everywhere) and gives
the float64 reference's weight gradient within rounding over chunks of rows, chunks of whole
images, a last part of the images left, asymmetric and 'valid' padding, kernels of 1x3 to 7x7
and both float dtypes; it declines what it does not compute."""

from __future__ import annotations

import numpy as np
import pytest

from anycnn.kernels import native, native_wgrad
from tests.rounding import assert_rounding_close


def _reference(x, dy, kernel, pads):
    """The weight gradient (kh, kw, C_in, C_out) in float64, one einsum per tap."""
    kh, kw = kernel
    top, bottom, left, right = pads
    ho, wo = dy.shape[1:3]
    xp = np.pad(x.astype(np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
    return np.stack([np.stack([np.einsum("nhwc,nhwd->cd", xp[:, i:i + ho, j:j + wo],
                                         dy.astype(np.float64)) for j in range(kw)])
                     for i in range(kh)])


@pytest.fixture(autouse=True)
def direct_kernels(monkeypatch):
    """The direct kernels: these tests are about the chunked kernel, and a 3x3 stride-1 layer
    of 2048 outputs or more would otherwise take the Winograd one (native_winograd)."""
    monkeypatch.setenv("ANYCNN_WINOGRAD", "0")


@pytest.fixture
def wide_registers(monkeypatch):
    """The kernel's tiles for 32 vector registers, whatever the CPU's (on a CPU with 16 they
    spill but stay correct): the same tiles on every machine."""
    monkeypatch.setattr(native_wgrad, "registers", lambda: native.Registers(512, 32))


CASES = [
    # (n, h, w, c_in, c_out in vectors, kernel, pads)
    (3, 20, 40, 16, 1, (3, 3), (1, 1, 1, 1)),     # chunks of rows: two of 10 rows of 40
    (10, 8, 8, 16, 2, (3, 3), (1, 1, 1, 1)),      # chunks of 2 whole images, a last part of 2
    (5, 7, 9, 24, 1, (3, 3), (0, 0, 0, 0)),       # 'valid', 3 input channels a tile
    (4, 10, 7, 16, 2, (5, 5), (2, 1, 0, 2)),      # uneven padding, 4 input channels a tile
    (6, 5, 13, 8, 1, (1, 3), (0, 0, 1, 1)),       # a 1x3 kernel: 8 rows of taps ... 1
    (2, 6, 6, 16, 1, (7, 7), (3, 3, 3, 3)),       # 7x7: 3 taps of one row, 3 padded rows
    (9, 6, 6, 3, 1, (3, 3), (2, 2, 2, 2)),        # three input channels, pad 2 (10x10 out)
]


@pytest.mark.usefixtures("native_on", "wide_registers")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[3]}ch-k{c[5][0]}x{c[5][1]}" for c in CASES])
def test_chunked_weight_gradient_matches_reference(monkeypatch, rng, dtype, case):
    n, h, w, cin, vectors, kernel, pads = case
    lanes = native.vector_lanes(dtype)
    cout = vectors * lanes
    ho = h + pads[0] + pads[1] - kernel[0] + 1
    wo = w + pads[2] + pads[3] - kernel[1] + 1
    x = rng.normal(size=(n, h, w, cin)).astype(dtype)
    dy = rng.normal(size=(n, ho, wo, cout)).astype(dtype)
    chosen = []
    tiling = native_wgrad.tiling
    monkeypatch.setattr(native_wgrad, "tiling",
                        lambda *a: chosen.append(tiling(*a)) or chosen[-1])
    got = native.conv2d_weight_grad(x, dy, kernel, 1, pads)
    assert chosen and chosen[0] is not None, "the chunked kernel was not used"
    assert_rounding_close(got, _reference(x, dy, kernel, pads).astype(dtype), err_msg=str(case))


@pytest.mark.usefixtures("native_on", "wide_registers")
def test_chunks_span_rows_and_images():
    """The cases above cover both ways of chunking: several chunks of rows per image, and
    several whole images per chunk dividing both the whole parts and the last one."""
    assert native_wgrad.tiling(1, False, (16, 16), 16, (3, 3), (20, 40), 4, 3) == (8, 10, 1)
    assert native_wgrad.tiling(1, False, (16, 32), 16, (3, 3), (8, 8), 4, 3) == (8, 8, 1)
    assert native_wgrad.tiling(1, False, (16, 32), 16, (3, 3), (8, 8), 8, 4) == (8, 8, 4)
    assert native_wgrad.tiling(1, False, (64, 64), 16, (3, 3), (8, 8), 16, 0) == (8, 8, 8)
    assert native_wgrad.tiling(1, False, (24, 16), 16, (3, 3), (7, 9), 4, 1) == (8, 7, 1)
    assert native_wgrad.tiling(1, False, (16, 16), 16, (5, 5), (10, 7), 4, 2) == (4, 10, 2)


@pytest.mark.usefixtures("native_on", "wide_registers")
def test_declines_what_it_does_not_compute(monkeypatch):
    args = ((16, 16), 16, (3, 3), (8, 8), 4, 0)
    assert native_wgrad.tiling(1, False, *args) is not None
    assert native_wgrad.tiling(2, False, *args) is None           # stride 2
    assert native_wgrad.tiling(1, True, *args) is None            # a pooled gradient
    assert native_wgrad.tiling(1, False, (16, 24), *args[1:]) is None  # C_out not in vectors
    assert native_wgrad.tiling(1, False, (16, 16), 16, (3, 25), (8, 30), 4, 0) is None
    monkeypatch.setattr(native_wgrad, "registers", lambda: native.Registers(256, 16))
    assert native_wgrad.tiling(1, False, *args) == (4, 8, 4)     # 16 registers: 12 sums
    assert native_wgrad.tiling(1, False, (3, 16), *args[1:]) is None  # 9: not faster there


@pytest.mark.usefixtures("native_on")
@pytest.mark.parametrize("cin", [16, 24])
def test_tiles_for_sixteen_registers_match_reference(monkeypatch, rng, cin):
    """With 16 vector registers (AVX2): tiles of 4 input channels by 3 taps."""
    monkeypatch.setattr(native_wgrad, "registers", lambda: native.Registers(256, 16))
    x = rng.normal(size=(6, 9, 12, cin)).astype(np.float32)
    dy = rng.normal(size=(6, 9, 12, 2 * native.vector_lanes(np.float32))).astype(np.float32)
    chosen = []
    tiling = native_wgrad.tiling
    monkeypatch.setattr(native_wgrad, "tiling",
                        lambda *a: chosen.append(tiling(*a)) or chosen[-1])
    got = native.conv2d_weight_grad(x, dy, (3, 3), 1, (1, 1, 1, 1))
    assert chosen and chosen[0] is not None and chosen[0][0] == 4
    assert_rounding_close(got, _reference(x, dy, (3, 3), (1, 1, 1, 1)).astype(np.float32))
