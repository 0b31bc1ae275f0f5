"""Export presets to ONNX, check the files, and time onnxruntime against anycnn's NumPy forward.

Each model is exported (``anycnn.io.export_onnx``), fully checked with ``onnx.checker``, run
by onnxruntime (CPU, ``--threads`` intra-op threads, 1 inter-op, sequential) on the NHWC batch
anycnn gets in eval mode; both timed in alternation, ``--repeats`` calls after 2 untimed ones,
medians in ms. Needs ``pip install 'anycnn[onnx]'``.
Run: python examples/onnx_export.py [--models simple-cnn resnet20] [--batch-sizes 64 256]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import anycnn
from anycnn.io import export_onnx
from anycnn.models import build_model

p = argparse.ArgumentParser()
p.add_argument("--models", nargs="+", default=["simple-cnn", "resnet20"])
p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
p.add_argument("--repeats", type=int, default=10)
p.add_argument("--threads", type=int, default=2)  # onnxruntime intra-op threads
args = p.parse_args()
try:
    import onnx
    import onnxruntime as ort
except ImportError:
    sys.exit(print("onnx or onnxruntime is not installed; skipping. Install them with: "
                   "pip install 'anycnn[onnx]'"))
anycnn.use_backend("numpy")
options = ort.SessionOptions()
options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
print(f"onnxruntime {ort.__version__}, {args.threads} intra-op thread(s); medians in ms")
print("model        batch   anycnn   onnxruntime  speed-up  max |difference|")
with tempfile.TemporaryDirectory() as folder:
    for name in args.models:
        anycnn.manual_seed(0)
        model = build_model(name).eval()
        path = str(export_onnx(model, Path(folder) / f"{name}.onnx"))
        onnx.checker.check_model(path, full_check=True)
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        spec = model.model_spec
        for n in args.batch_sizes:
            x = np.random.default_rng(n).random((n, spec["image_size"], spec["image_size"],
                                                 spec["in_channels"]), dtype=np.float32)
            runs = {"anycnn": lambda x, m=model: anycnn.to_numpy(m(anycnn.asarray(x))),
                    "onnxruntime": lambda x, s=session: s.run(None, {"input": x})[0]}
            times: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(args.repeats + 2):
                for kind, run in runs.items():
                    start = time.perf_counter()
                    run(x)
                    times[kind].append((time.perf_counter() - start) * 1e3)
            diff = np.abs(runs["anycnn"](x) - runs["onnxruntime"](x)).max()
            a, o = (float(np.median(times[k][2:])) for k in runs)  # 2 warm-up calls
            print(f"{name:<12} {n:>5} {a:>8.2f} {o:>13.2f} {a / o:>8.2f}x  {diff:.1e}")
