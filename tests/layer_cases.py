"""Deterministic grids of layer configurations shared by the reference, gradient and torch tests.

Each case is a plain dict of constructor options plus an input shape (NHWC). The grids cover
stride > 1, every padding form, dilation 2, non-square kernels and inputs, ceil_mode,
count_include_pad and batch size 1, and are filtered to configurations PyTorch accepts.
"""

from __future__ import annotations

import numpy as np

from anycnn.nn.geometry import conv_output_size, conv_padding, pool_output_size


def _conv_ok(case) -> bool:
    _n, h, w, _c = case["shape"]
    try:
        pads = conv_padding(case["padding"], case["kernel_size"], case["stride"], case["dilation"])
    except ValueError:
        return False
    ho = conv_output_size(h, case["kernel_size"][0], case["stride"][0], pads[0] + pads[1],
                          case["dilation"][0])
    wo = conv_output_size(w, case["kernel_size"][1], case["stride"][1], pads[2] + pads[3],
                          case["dilation"][1])
    return ho >= 1 and wo >= 1


def conv_cases(count: int = 24, seed: int = 7) -> list[dict]:
    named = [
        dict(shape=(1, 5, 5, 1), kernel_size=(3, 3), stride=(1, 1), padding=0, dilation=(1, 1),
             bias=True, out=2),
        dict(shape=(2, 7, 6, 3), kernel_size=(3, 2), stride=(2, 1), padding=(1, 0),
             dilation=(1, 1), bias=True, out=4),
        dict(shape=(2, 8, 9, 2), kernel_size=(3, 3), stride=(1, 1), padding=2, dilation=(2, 2),
             bias=False, out=3),
        dict(shape=(1, 6, 7, 2), kernel_size=(4, 2), stride=(1, 1), padding="same",
             dilation=(1, 2), bias=True, out=3),
        dict(shape=(3, 6, 6, 2), kernel_size=(2, 2), stride=(3, 2), padding="valid",
             dilation=(1, 1), bias=True, out=2),
        dict(shape=(2, 5, 8, 1), kernel_size=(1, 1), stride=(2, 3), padding=(0, 1),
             dilation=(1, 1), bias=True, out=3),
    ]
    rng = np.random.default_rng(seed)
    cases = list(named)
    while len(cases) < count:
        k = tuple(int(v) for v in rng.integers(1, 5, 2))
        s = tuple(int(v) for v in rng.integers(1, 4, 2))
        d = tuple(int(v) for v in rng.integers(1, 3, 2))
        kind = rng.integers(0, 4)
        padding = ["same", "valid", int(rng.integers(0, 3)),
                   tuple(int(v) for v in rng.integers(0, 3, 2))][kind]
        if padding == "same":
            s = (1, 1)
        case = dict(shape=(int(rng.integers(1, 4)), int(rng.integers(4, 10)),
                           int(rng.integers(4, 10)), int(rng.integers(1, 4))),
                    kernel_size=k, stride=s, padding=padding, dilation=d,
                    bias=bool(rng.integers(0, 2)), out=int(rng.integers(1, 5)))
        if _conv_ok(case):
            cases.append(case)
    return cases


def pool_cases(count: int = 24, seed: int = 11) -> list[dict]:
    named = [
        dict(shape=(1, 4, 4, 1), kernel_size=(2, 2), stride=None, padding=(0, 0),
             ceil_mode=False),
        dict(shape=(2, 5, 7, 3), kernel_size=(3, 3), stride=(2, 2), padding=(1, 1),
             ceil_mode=True),
        dict(shape=(2, 7, 6, 2), kernel_size=(3, 2), stride=(2, 1), padding=(1, 0),
             ceil_mode=False),
        dict(shape=(1, 5, 5, 2), kernel_size=(2, 2), stride=(2, 2), padding=(0, 0),
             ceil_mode=True),
        dict(shape=(3, 6, 5, 1), kernel_size=(3, 3), stride=(3, 3), padding=(1, 1),
             ceil_mode=True),
    ]
    rng = np.random.default_rng(seed)
    cases = list(named)
    while len(cases) < count:
        k = tuple(int(v) for v in rng.integers(1, 4, 2))
        s = tuple(int(v) for v in rng.integers(1, 4, 2)) if rng.integers(0, 3) else None
        p = tuple(int(rng.integers(0, ki // 2 + 1)) for ki in k)
        case = dict(shape=(int(rng.integers(1, 4)), int(rng.integers(3, 9)),
                           int(rng.integers(3, 9)), int(rng.integers(1, 4))),
                    kernel_size=k, stride=s, padding=p, ceil_mode=bool(rng.integers(0, 2)))
        st = s or k
        if all(pool_output_size(case["shape"][1 + i], k[i], st[i], p[i], case["ceil_mode"]) >= 1
               for i in range(2)):
            cases.append(case)
    return cases


def case_id(case: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in case.items()).replace(" ", "")


def grouped_conv_cases(count: int = 16, seed: int = 13) -> list[dict]:
    """Grouped and depthwise (``groups == C_in``, channel multiplier 1-2) convolutions."""
    named = [
        dict(shape=(2, 7, 6, 4), kernel_size=(3, 3), stride=(1, 1), padding=1, dilation=(1, 1),
             bias=True, out=6, groups=2),
        dict(shape=(2, 6, 6, 3), kernel_size=(3, 3), stride=(2, 2), padding=1, dilation=(1, 1),
             bias=True, out=3, groups=3),  # depthwise
        dict(shape=(1, 8, 7, 4), kernel_size=(2, 3), stride=(2, 1), padding=(1, 0),
             dilation=(1, 2), bias=False, out=8, groups=4),  # depthwise, multiplier 2
        dict(shape=(3, 5, 5, 6), kernel_size=(1, 1), stride=(1, 1), padding=0, dilation=(1, 1),
             bias=True, out=9, groups=3),
        dict(shape=(1, 6, 7, 2), kernel_size=(4, 2), stride=(1, 1), padding="same",
             dilation=(2, 1), bias=True, out=2, groups=2),
    ]
    rng = np.random.default_rng(seed)
    cases = list(named)
    while len(cases) < count:
        groups = int(rng.integers(2, 5))
        depthwise = bool(rng.integers(0, 2))
        cin = groups * (1 if depthwise else int(rng.integers(1, 3)))
        k = tuple(int(v) for v in rng.integers(1, 4, 2))
        s = tuple(int(v) for v in rng.integers(1, 3, 2))
        d = tuple(int(v) for v in rng.integers(1, 3, 2))
        padding = int(rng.integers(0, 2))
        case = dict(shape=(int(rng.integers(1, 3)), int(rng.integers(4, 9)),
                           int(rng.integers(4, 9)), cin),
                    kernel_size=k, stride=s, padding=padding, dilation=d,
                    bias=bool(rng.integers(0, 2)), out=groups * int(rng.integers(1, 3)),
                    groups=groups)
        if _conv_ok(case):
            cases.append(case)
    return cases


def conv_transpose_cases(count: int = 18, seed: int = 17) -> list[dict]:
    """Transposed convolutions over stride, padding, output_padding (< stride or < dilation),
    dilation and groups (incl. one output channel per group, the depthwise case), filtered to
    a positive output size."""
    named = [
        dict(shape=(2, 4, 5, 3), kernel_size=(3, 3), stride=(2, 2), padding=(1, 1),
             output_padding=(1, 1), dilation=(1, 1), bias=True, out=2),
        dict(shape=(1, 3, 4, 2), kernel_size=(2, 3), stride=(3, 1), padding=(0, 1),
             output_padding=(2, 0), dilation=(1, 2), bias=False, out=3),
        dict(shape=(2, 3, 3, 1), kernel_size=(3, 2), stride=(1, 1), padding=(0, 0),
             output_padding=(1, 0), dilation=(2, 1), bias=True, out=2),  # op < dilation only
        dict(shape=(1, 5, 4, 2), kernel_size=(4, 4), stride=(2, 2), padding=(3, 1),
             output_padding=(0, 1), dilation=(2, 1), bias=True, out=1),
        dict(shape=(2, 3, 4, 4), kernel_size=(3, 3), stride=(2, 2), padding=(1, 1),
             output_padding=(1, 0), dilation=(1, 1), bias=True, out=6, groups=2),
        dict(shape=(1, 4, 3, 6), kernel_size=(2, 3), stride=(2, 1), padding=(0, 1),
             output_padding=(1, 0), dilation=(1, 2), bias=False, out=3, groups=3),  # depthwise
        dict(shape=(2, 3, 3, 2), kernel_size=(3, 2), stride=(3, 2), padding=(1, 0),
             output_padding=(0, 1), dilation=(2, 1), bias=True, out=2, groups=2),  # depthwise
    ]
    rng = np.random.default_rng(seed)
    cases = list(named)
    while len(cases) < count:
        k = tuple(int(v) for v in rng.integers(1, 5, 2))
        s = tuple(int(v) for v in rng.integers(1, 4, 2))
        d = tuple(int(v) for v in rng.integers(1, 3, 2))
        p = tuple(int(v) for v in rng.integers(0, 3, 2))
        op = tuple(int(rng.integers(0, max(si, di))) for si, di in zip(s, d))
        case = dict(shape=(int(rng.integers(1, 3)), int(rng.integers(1, 6)),
                           int(rng.integers(1, 6)), int(rng.integers(1, 4))),
                    kernel_size=k, stride=s, padding=p, output_padding=op, dilation=d,
                    bias=bool(rng.integers(0, 2)), out=int(rng.integers(1, 4)), groups=1)
        if all((case["shape"][1 + i] - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + op[i] + 1 >= 1
               for i in range(2)):
            cases.append(case)
    return cases
