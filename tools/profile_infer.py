"""Where an eval-mode forward's time goes: anycnn per operation against onnxruntime's own
per-node profile of the same model (exported as ``anycnn export`` does), on the same threads.

    ANYCNN_NUM_THREADS=2 HL_NUM_THREADS=2 OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 \\
        PYTHONPATH=. python3 tools/profile_infer.py --model resnet20 --batch 128

anycnn: the layer and kernel functions an eval forward calls are wrapped with timers (a stack:
each entry's own time, its callees' taken out), so the table shows the compiled kernels
(``halide ...``: the pipeline call itself), the Python around them (``py ...``: checks,
operands, output allocation) and each layer's own work, per forward, median over ``--steps``
forwards. The wrappers cost about a microsecond each: the unwrapped forward's median is shown
too. onnxruntime: ``SessionOptions.enable_profiling`` with ``intra_op_num_threads`` =
``--threads``; the per-node kernel times (median per node over the runs), summed by operator
type and shape, and the operators of the optimised graph (what it fused, its layouts).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
import sys
import tempfile
import time

#: how repeated timings are summed up: median, or min (--stat; a shared machine's least
#: disturbed run)
STAT = statistics.median


def _timed_forward(model, x, steps: int) -> list[float]:
    import anycnn

    times = []
    with anycnn.no_grad():
        for _ in range(3):
            model.forward(x)
        for _ in range(steps):
            t0 = time.perf_counter()
            model.forward(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


class _Stack:
    """Own time per label: each wrapped call's time less its wrapped callees'."""

    def __init__(self) -> None:
        self.frames: list[list[float]] = []  # [start, callee time]
        self.own: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)

    def wrap(self, owner, name: str, label) -> None:
        original = getattr(owner, name)
        stack = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            key = label(*args, **kwargs) if callable(label) else label
            frame = [time.perf_counter(), 0.0]
            stack.frames.append(frame)
            try:
                return original(*args, **kwargs)
            finally:
                stack.frames.pop()
                total = time.perf_counter() - frame[0]
                stack.own[key] += total - frame[1]
                stack.calls[key] += 1
                if stack.frames:
                    stack.frames[-1][1] += total

        setattr(owner, name, timed)


def _geometry(weight, out_hw, stride) -> str:
    kh, kw, cin, cout = weight.shape
    return f"{kh}x{kw} {cin}->{cout} s{stride} out {out_hw[0]}x{out_hw[1]}"


def anycnn_profile(model, images, steps: int) -> tuple[list[float], dict, dict]:
    """(unwrapped forward ms, own ms per label per forward, calls per forward)."""
    import anycnn
    from anycnn.kernels import kernel_cache, native
    from anycnn.nn import containers, fusion, inference, layers, sequential
    from anycnn.nn.functional import conv as fconv

    x = anycnn.asarray(images)
    model.eval()
    plain = _timed_forward(model, x, steps)
    st = _Stack()
    current = {"kernel": "?"}

    def kernel_label(tag):
        def label(x, weight, bias, stride, pads, out_hw, *rest, **kw):
            extra = ""
            addend = kw.get("addend", rest[0] if rest else None)
            if tag == "epilogue":
                extra = (" +add" if addend is not None else "") + (" relu" if kw.get(
                    "relu", rest[1] if len(rest) > 1 else False) else "")
            elif tag == "relu-maxpool":
                extra = f" pool {rest[0]}"
            current["kernel"] = f"{tag} {_geometry(weight, out_hw, stride)}{extra}"
            return f"py {current['kernel']}"
        return label

    st.wrap(native, "conv2d_epilogue", kernel_label("epilogue"))
    st.wrap(native, "conv2d_relu_maxpool", kernel_label("relu-maxpool"))
    st.wrap(native, "conv2d", kernel_label("conv"))
    st.wrap(native, "conv2d_relu_maxpool_eval", kernel_label("relu-maxpool"))

    def dense_label(x, weight, bias, relu=False):
        current["kernel"] = f"dense {x.shape[0]}x{x.shape[1]} @ {weight.shape[1]}" + (
            " relu" if relu else "")
        return f"py {current['kernel']}"

    st.wrap(native, "dense", dense_label)
    # the pipeline's own call: labelled by the kernel function that runs it
    st.wrap(kernel_cache.Pipeline, "run", lambda *a, **k: "halide " + current["kernel"])
    from anycnn.kernels import dispatch

    for name, fns in list(dispatch._kernels.items()):  # every registered kernel, by name
        holder = type("Holder", (), {})
        wrapped = []
        for i, fn in enumerate(fns):
            setattr(holder, f"k{i}", staticmethod(fn))
            st.wrap(holder, f"k{i}", f"kernel {name} ({fn.__module__.rsplit('.', 1)[-1]})")
            wrapped.append(getattr(holder, f"k{i}"))
        dispatch._kernels[name] = tuple(wrapped)
    for cls in (layers.Dense, layers.Flatten, layers.GlobalAvgPool2D, layers.ReLU,
                layers.MaxPool2D, layers.BatchNorm2D):
        st.wrap(cls, "forward", f"layer {cls.__name__}")
    st.wrap(layers.Conv2D, "_forward", "py Conv2D._forward (checks, dispatch)")
    st.wrap(fconv, "conv2d_forward", "py conv2d_forward (dispatch)")
    st.wrap(sequential.Sequential, "_run", "py Sequential (loop)")
    st.wrap(sequential, "inference_layers", "py fold lookup (inference_layers)")
    st.wrap(sequential, "execution_plan", "py execution_plan")
    st.wrap(sequential, "enter_tree", "py enter_tree")
    st.wrap(containers.Residual, "forward", "py Residual")
    st.wrap(fusion.ConvPoolRun, "forward", "py ConvPoolRun")
    st.wrap(fusion.ConvReluMaxPool, "forward_compiled", "py ConvReluMaxPool.forward_compiled")
    st.wrap(inference.ConvReLU, "forward", "py ConvReLU")
    st.wrap(fusion.ResidualReLU, "forward", "py ResidualReLU")
    st.wrap(model, "forward", "py model.forward (top)")
    with anycnn.no_grad():
        for _ in range(3):
            model.forward(x)
    st.own.clear()
    st.calls.clear()
    per_step: dict[str, list[float]] = collections.defaultdict(list)
    with anycnn.no_grad():
        for _ in range(steps):
            before = dict(st.own)
            model.forward(x)
            for key, value in st.own.items():
                per_step[key].append((value - before.get(key, 0.0)) * 1e3)
    own = {k: STAT(v) for k, v in per_step.items()}
    calls = {k: v / steps for k, v in st.calls.items()}
    return plain, own, calls


def ort_profile(model, images, threads: int, steps: int) -> tuple[list[float], dict, list]:
    """(session.run ms, median ms per node summed by (op, output shape), optimised graph ops)."""
    import onnxruntime as ort

    from anycnn.io.onnx import to_onnx

    proto = to_onnx(model).SerializeToString()
    feed_name = None
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
        feed_name = session.get_inputs()[0].name
        import onnx

        graph = onnx.load(options.optimized_model_filepath).graph
        ops = [(n.op_type, n.domain) for n in graph.node]
        plain = []
        for _ in range(3):
            session.run(None, {feed_name: images})
        for _ in range(steps):
            t0 = time.perf_counter()
            session.run(None, {feed_name: images})
            plain.append((time.perf_counter() - t0) * 1e3)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "ort")
        session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
        for _ in range(3 + steps):
            session.run(None, {feed_name: images})
        with open(session.end_profiling()) as f:
            events = json.load(f)
    nodes: dict[str, list[float]] = collections.defaultdict(list)
    kinds: dict[str, str] = {}
    runs = []
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            runs.append(e["dur"] / 1e3)
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        shape = args.get("output_type_shape", [])
        dims = "x".join(str(d) for d in (next(iter(shape[0].values())) if shape else []))
        nodes[e["name"]].append(e["dur"] / 1e3)
        kinds[e["name"]] = f"{args.get('op_name', '?')} -> {dims}"
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, durs in nodes.items():
        by_kind[kinds[name]] += STAT(durs[3:] or durs)
    return plain, dict(by_kind), ops, runs[3:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-ort", action="store_true")
    parser.add_argument("--stat", choices=("median", "min"), default="median")
    args = parser.parse_args(argv)
    global STAT
    STAT = min if args.stat == "min" else statistics.median
    from anycnn.cli.bench import _model_and_batch

    model, images, _ = _model_and_batch({"model": args.model, "batch": args.batch,
                                         "dtype": "float32"})
    model.eval()
    if not args.no_ort:
        plain_o, by_kind, ops, runs = ort_profile(model, images, args.threads, args.steps)
    plain, own, calls = anycnn_profile(model, images, args.steps)
    med = STAT(plain)
    print(f"## anycnn {args.model} batch {args.batch}: forward {med:.2f} ms (unwrapped "
          f"{args.stat}); wrapped sum of {args.stat}s {sum(own.values()):.2f} ms")
    for key, ms in sorted(own.items(), key=lambda kv: -kv[1]):
        print(f"{ms:8.3f} ms {calls.get(key, 0):5.1f} calls  {key}")
    if not args.no_ort:
        print(f"\n## onnxruntime: session.run {STAT(plain_o):.2f} ms ({args.stat}), "
              f"profiled model_run {STAT(runs):.2f} ms, node sum "
              f"{sum(by_kind.values()):.2f} ms")
        for key, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
            print(f"{ms:8.3f} ms  {key}")
        print("optimised graph:", collections.Counter(f"{d}:{o}" if d else o for o, d in ops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
