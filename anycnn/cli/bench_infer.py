"""``anycnn bench --infer``: eval-mode forward timings, side by side with onnxruntime and PyTorch.

Method (as :mod:`anycnn.cli.bench`'s): every measurement runs in a fresh worker process with
the thread counts fixed, the frameworks alternate for ``--rounds`` rounds, each worker reports
the median of its ``--steps`` timed calls after ``--warmup`` untimed ones, and the table shows
the median over rounds.

* **anycnn**: the seeded preset in eval mode, ``model.forward(x)`` under ``no_grad`` (what
  ``predict`` and ``evaluate`` run: BatchNorm folded into the convolutions,
  :mod:`anycnn.nn.inference`) on random float images.
* **onnxruntime** (where ``onnx`` and ``onnxruntime`` are installed; float32, CPU backends):
  the same model exported by :func:`anycnn.io.onnx.to_onnx` (the graph ``anycnn export``
  writes: NHWC input), run by ``CPUExecutionProvider`` with ``intra_op_num_threads`` set to
  the same thread count and every graph optimisation on (its default); the worker also
  reports the largest difference between its logits and anycnn's.
* **PyTorch** eager, NCHW and channels_last (where torch is installed and the repository's
  ``tools/bench_torch.py`` is there), ``net.eval()`` under ``torch.no_grad()``.

A baseline that cannot run here is left out of the table with a note saying why.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from typing import Any

from ..errors import ConfigError

#: the workers of an ``--infer`` run, in table order
FRAMEWORKS = ("anycnn", "onnxruntime", "torch", "torch-cl")


def anycnn_worker(cfg: dict) -> dict:
    """Eval-mode forward times of anycnn (the worker of kind ``anycnn`` with ``infer_only``)."""
    import anycnn
    from anycnn.backend import synchronize

    from .bench import _model_and_batch, rss_mib, time_steps

    backend = anycnn.get_backend()
    model, images, _ = _model_and_batch(cfg)
    x = anycnn.asarray(images)
    model.eval()
    base = rss_mib("VmRSS")
    with anycnn.no_grad():
        times = time_steps(lambda: model.forward(x), lambda: synchronize(backend),
                           cfg["warmup"], cfg["steps"])
    return {"infer_ms": times, "base_mib": base, "peak_mib": rss_mib("VmHWM"),
            "backend": backend.name, "device": str(backend.device)}


def onnxruntime_worker(cfg: dict) -> dict:
    """Forward times of onnxruntime on the model exported from the same seeded preset (the
    worker of kind ``onnxruntime``; NumPy backend)."""
    import numpy as np
    import onnxruntime as ort

    import anycnn
    from anycnn.io.onnx import to_onnx

    from .bench import _model_and_batch, rss_mib, time_steps

    model, images, _ = _model_and_batch(cfg)
    model.eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = cfg["threads"]
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(to_onnx(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: images}
    with anycnn.no_grad():
        ours = anycnn.to_numpy(model.forward(anycnn.asarray(images)))
    diff = float(np.max(np.abs(session.run(None, feed)[0] - ours)))
    base = rss_mib("VmRSS")
    times = time_steps(lambda: session.run(None, feed), lambda: None, cfg["warmup"],
                       cfg["steps"])
    return {"infer_ms": times, "base_mib": base, "peak_mib": rss_mib("VmHWM"),
            "max_abs_diff": diff, "onnxruntime": ort.__version__}


def baselines(dtype: str, gpu: bool) -> tuple[list[str], list[str]]:
    """The workers an ``--infer`` run can start here (anycnn first), and a note for each
    baseline left out, saying why."""
    from .bench import TORCH_WORKER, torch_worker_script

    workers, notes = ["anycnn"], []
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        notes.append(f"onnxruntime: skipped, {' and '.join(missing)} not installed "
                     "(pip install 'anycnn[onnx]')")
    elif dtype != "float32":
        notes.append(f"onnxruntime: skipped, its CPU convolutions take float32, not {dtype}")
    elif gpu:
        notes.append("onnxruntime: skipped, it runs on the CPU here and the backend on a GPU")
    else:
        workers.append("onnxruntime")
    if importlib.util.find_spec("torch") is None:
        notes.append("PyTorch: skipped, torch is not installed (pip install -r "
                     "backends/torch.txt)")
    else:
        try:
            torch_worker_script()
        except ConfigError:
            notes.append(f"PyTorch: skipped, its worker {'/'.join(TORCH_WORKER)} is part of a "
                         "repository checkout, not of an installed anycnn")
        else:
            workers += ["torch", "torch-cl"]
    return workers, notes


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_infer(args: argparse.Namespace) -> int:
    """``anycnn bench --infer``: for each batch size, the workers of :func:`baselines`
    alternating for ``--rounds`` rounds; prints the table (and writes ``--json``)."""
    import os

    from ..backend import get_backend, uses_gpu
    from .bench import _report, _run_worker

    for flag, name in ((args.script, "--script"), (args.gemm, "--gemm"),
                       (args.epoch_dataset, "--epoch-dataset")):
        if flag:
            raise ConfigError(f"--infer times eval-mode forwards only; drop {name}")
    backend = get_backend()
    gpu = uses_gpu(backend)
    workers, notes = baselines(args.dtype, gpu)
    os.environ["ANYCNN_BACKEND"] = backend.name
    results: dict[str, Any] = {
        "mode": "infer", "model": args.model, "backend": backend.name,
        "device": str(backend.device), "threads": args.threads, "dtype": args.dtype,
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "frameworks": workers, "notes": notes, "rows": []}
    print(f"anycnn bench --infer: {args.model}, backend {backend.name} on {backend.device}, "
          f"{args.threads} threads, {args.dtype}, {args.rounds} alternating rounds x "
          f"{args.steps} forwards (+{args.warmup} warmup) of {', '.join(workers)}", flush=True)
    for batch in args.batch_sizes:
        per: dict[str, list[dict]] = {w: [] for w in workers}
        for _ in range(args.rounds):
            for worker in workers:
                cfg = {"kind": worker, "model": args.model, "batch": batch,
                       "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup,
                       "threads": args.threads, "gpu": gpu, "infer_only": True}
                per[worker].append(_run_worker(cfg, args.threads))
        row: dict[str, Any] = {"batch": batch}
        for worker, outs in per.items():
            row[worker] = {"infer": _median([_median(o["infer_ms"]) for o in outs]),
                           "rounds_infer_ms": [_median(o["infer_ms"]) for o in outs],
                           "peak": _median([o["peak_mib"] for o in outs])}
            if "max_abs_diff" in outs[-1]:
                row[worker]["max_abs_diff"] = max(o["max_abs_diff"] for o in outs)
        ours = row["anycnn"]["infer"]
        row["anycnn"]["images_per_s"] = batch / ours * 1e3
        for worker in workers[1:]:
            row[f"ratio_vs_{worker}"] = ours / row[worker]["infer"]
        results["rows"].append(row)
    return _report(format_infer_table(results), results, args.json)


def format_infer_table(results: dict) -> str:
    """A Markdown table of :func:`run_infer`'s results, with its notes."""
    workers = results["frameworks"]
    head = ["batch", "anycnn ms", "img/s"]
    for worker in workers[1:]:
        head += [f"{worker} ms", f"anycnn / {worker}"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in results["rows"]:
        a = row["anycnn"]
        cells = [str(row["batch"]), f"{a['infer']:.2f}", f"{a['images_per_s']:.0f}"]
        for worker in workers[1:]:
            cells += [f"{row[worker]['infer']:.2f}", f"{row['ratio_vs_' + worker]:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["eval-mode forward, median of each worker's forwards, median over rounds; "
             "anycnn / X below 1.0 means anycnn is faster"]
    diffs = [row["onnxruntime"]["max_abs_diff"] for row in results["rows"]
             if "onnxruntime" in row]
    if diffs:
        notes.append(f"onnxruntime logits vs anycnn's: max |difference| {max(diffs):.1e}")
    notes += results["notes"]
    return "\n".join([*lines, "", *notes])
