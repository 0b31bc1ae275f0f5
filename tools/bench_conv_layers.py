"""Per-layer convolution timings: anycnn's compiled kernels against torch and onnxruntime.

Times resnet20's convolution shapes (NHWC float32, batch ``--batch``) in each direction
(forward, input gradient, weight gradient) for several implementations, each in its own
process, interleaved over ``--rounds`` rounds; prints the median time and GFLOP/s of each::

    python3 tools/bench_conv_layers.py --rounds 5 --anycnn new=/work/wt-x base=/tmp/base

``--anycnn NAME=PATH`` runs anycnn from the source tree at PATH (several give an A/B in one
run); ``torch`` is ``torch.nn.functional.conv2d`` on channels_last tensors and its backward
(``aten.convolution_backward``), ``ort`` onnxruntime's forward of a one-Conv model (NCHW), all
on ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial

#: (name, C_in, C_out, H=W of the input, kernel, stride) of resnet20's convolutions
LAYERS = [
    ("3-16", 3, 16, 32, 3, 1),
    ("16-16", 16, 16, 32, 3, 1),
    ("16-32s2", 16, 32, 32, 3, 2),
    ("32-32", 32, 32, 16, 3, 1),
    ("32-64s2", 32, 64, 16, 3, 2),
    ("64-64", 64, 64, 8, 3, 1),
    ("16-32s2 1x1", 16, 32, 32, 1, 2),
    ("32-64s2 1x1", 32, 64, 16, 1, 2),
]
#: simple-cnn's convolutions (each under a fused ReLU and 2x2 max pool: "pool" times that kernel)
SIMPLE_CNN = [("1-32", 1, 32, 28, 3, 1), ("32-64", 32, 64, 14, 3, 1)]
DIRECTIONS = ("fwd", "pool", "dx", "dw")


#: how one process sums up its repetitions: "median", or "min" (on a machine shared with
#: other work, the best repetition is the one least disturbed)
STAT = os.environ.get("BENCH_STAT", "median")


def _median_ms(fn, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * (min(times) if STAT == "min" else statistics.median(times))


def _shapes(layer, batch):
    _, cin, cout, size, k, s = layer
    pad = (k - 1) // 2
    out = (size + 2 * pad - k) // s + 1
    return cin, cout, size, k, s, pad, out


def _worker_anycnn(batch: int, reps: int) -> dict:
    import numpy as np

    from anycnn.kernels import native

    rng = np.random.default_rng(0)
    result = {}
    for layer in LAYERS:
        cin, cout, size, k, s, pad, out = _shapes(layer, batch)
        x = rng.standard_normal((batch, size, size, cin), dtype=np.float32)
        w = rng.standard_normal((k, k, cin, cout), dtype=np.float32)
        dy = rng.standard_normal((batch, out, out, cout), dtype=np.float32)
        pads = (pad, pad, pad, pad)
        if not native.applies(x, w, (s, s), pads, (1, 1), 1):
            continue
        result[(layer[0], "fwd")] = _median_ms(
            partial(native.conv2d, x, w, None, s, pads, (out, out)), reps)
        if out % 2 == 0:
            result[(layer[0], "pool")] = _median_ms(
                partial(native.conv2d_relu_maxpool, x, w, None, s, pads, (out, out), (2, 2)),
                reps)
        if native.input_grad_applies(w):
            result[(layer[0], "dx")] = _median_ms(
                partial(native.conv2d_input_grad, dy, w, s, pads, (size, size)), reps)
        result[(layer[0], "dw")] = _median_ms(
            partial(native.conv2d_weight_grad, x, dy, (k, k), s, pads), reps)
    return result


def _worker_torch(batch: int, reps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    result = {}
    cl = torch.channels_last
    with torch.no_grad():
        for layer in LAYERS:
            cin, cout, size, k, s, pad, out = _shapes(layer, batch)
            x = torch.randn(batch, cin, size, size, generator=g).to(memory_format=cl)
            w = torch.randn(cout, cin, k, k, generator=g).to(memory_format=cl)
            dy = torch.randn(batch, cout, out, out, generator=g).to(memory_format=cl)
            result[(layer[0], "fwd")] = _median_ms(
                partial(torch.nn.functional.conv2d, x, w, None, s, pad), reps)
            for name, mask in (("dx", [True, False, False]), ("dw", [False, True, False])):
                result[(layer[0], name)] = _median_ms(
                    partial(torch.ops.aten.convolution_backward, dy, x, w, None, [s, s],
                            [pad, pad], [1, 1], False, [0, 0], 1, mask), reps)
    return result


def _worker_ort(batch: int, reps: int, threads: int) -> dict:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    result = {}
    for layer in LAYERS:
        cin, cout, size, k, s, pad, out = _shapes(layer, batch)
        w = rng.standard_normal((cout, cin, k, k), dtype=np.float32)
        node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[k, k],
                                strides=[s, s], pads=[pad] * 4)
        graph = helper.make_graph(
            [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                           [batch, cin, size, size])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, cout, out, out])],
            [numpy_helper.from_array(w, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        x = rng.standard_normal((batch, cin, size, size), dtype=np.float32)
        result[(layer[0], "fwd")] = _median_ms(partial(session.run, None, {"x": x}), reps)
    return result


def _flops(layer, direction, batch) -> float:
    cin, cout, _, k, _, _, out = _shapes(layer, batch)
    return 2.0 * batch * out * out * cin * cout * k * k


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=int(os.environ.get("ANYCNN_NUM_THREADS", 2)))
    p.add_argument("--anycnn", nargs="*", default=[], metavar="NAME=PATH")
    p.add_argument("--layers", choices=("resnet20", "simple-cnn"), default="resnet20")
    p.add_argument("--torch", action="store_true")
    p.add_argument("--ort", action="store_true")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="each process's figure: the median or the best of its repetitions")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.layers == "simple-cnn":
        LAYERS[:] = SIMPLE_CNN
    if a.worker:
        kind = a.worker
        res = (_worker_anycnn(a.batch, a.reps) if kind == "anycnn" else
               _worker_torch(a.batch, a.reps, a.threads) if kind == "torch" else
               _worker_ort(a.batch, a.reps, a.threads))
        print(json.dumps([[k[0], k[1], v] for k, v in res.items()]))
        return
    impls = [(name, "anycnn", path) for name, path in (s.split("=", 1) for s in a.anycnn)]
    impls += [("torch", "torch", None)] * a.torch + [("ort", "ort", None)] * a.ort
    times: dict = {}
    for _ in range(a.rounds):
        for name, kind, path in impls:
            env = dict(os.environ, ANYCNN_NUM_THREADS=str(a.threads), BENCH_STAT=a.stat,
                       OMP_NUM_THREADS=str(a.threads))
            if path:
                env["PYTHONPATH"] = path
            out = subprocess.run([sys.executable, __file__, "--worker", kind, "--layers",
                                  a.layers, "--batch",
                                  str(a.batch), "--reps", str(a.reps), "--threads",
                                  str(a.threads)], env=env, check=True, capture_output=True,
                                 text=True).stdout
            for layer, direction, ms in json.loads(out.splitlines()[-1]):
                times.setdefault((layer, direction, name), []).append(ms)
    names = [i[0] for i in impls]
    print(f"batch {a.batch}, {a.threads} threads, median over {a.rounds} rounds of the {a.stat} "
          f"of {a.reps} repetitions")
    print("| layer | dir | " + " | ".join(f"{n} ms (GFLOP/s)" for n in names) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " |")
    for layer in LAYERS:
        for direction in DIRECTIONS:
            cells = []
            for n in names:
                ms = times.get((layer[0], direction, n))
                if ms is None:
                    cells.append("-")
                    continue
                med = statistics.median(ms)
                cells.append(f"{med:.3f} ({_flops(layer, direction, a.batch) / med / 1e6:.0f})")
            if any(c != "-" for c in cells):
                print(f"| {layer[0]} | {direction} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
