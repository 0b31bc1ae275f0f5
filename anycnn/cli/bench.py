"""``anycnn bench``: training-step and inference timings, side by side with PyTorch.

Method (the numbers in BENCHMARKS.md come from here):

* Every measurement runs in a fresh worker process (``python -m anycnn.cli.bench WORKER-JSON``) with
  the BLAS/OpenMP thread count fixed, so the two frameworks never share a process or warm caches.
* One training step = ``zero_grad``, forward, softmax cross-entropy, backward, SGD (momentum 0.9)
  step, on random float32 input of the model's image size; GPU steps end with a device sync.
* Workers for anycnn and PyTorch (NCHW, and channels_last when asked) run *alternately* for
  ``--rounds`` rounds; each worker reports the median of its timed steps, and the table shows the
  median over rounds and the ratio anycnn / PyTorch (below 1.0 means anycnn is faster).
* ``--script`` also times the path users' own scripts take: a fresh interpreter that imports
  NumPy before anycnn, without the ``OPENBLAS_THREAD_TIMEOUT`` that the ``anycnn`` command sets
  before NumPy loads, as the "script" column next to the command's; the ratio script / command
  should be 1.0 (anycnn never wakes the BLAS's own threads, so their idle spinning cannot cost).
* Peak memory is the worker's peak resident set (``VmHWM``); "above base" subtracts the resident
  set measured just before the first step (libraries, model and data loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from ..errors import ConfigError

FRAMEWORKS = ("anycnn", "anycnn-script", "torch", "torch-cl")

#: how the script path's worker starts: NumPy imported first, then the worker module as __main__
_SCRIPT_BOOT = "import numpy, runpy; runpy.run_module('anycnn.cli.bench', run_name='__main__')"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="simple-cnn")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--steps", type=int, default=20, help="timed steps per worker")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per worker")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per framework")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="BLAS/torch threads (default: all cores)")
    p.add_argument("--script", action="store_true",
                   help="also time the path of a user's script (NumPy imported first, no "
                   "OPENBLAS_THREAD_TIMEOUT) beside the command's")
    p.add_argument("--compare-torch", action="store_true",
                   help="also time the same model in PyTorch (NCHW and channels_last)")
    p.add_argument("--gemm", action="store_true",
                   help="measure the float32 GEMM peak and report the fraction reached")
    p.add_argument("--epoch-dataset", default=None,
                   help="also time one full training epoch on this dataset (e.g. fashion-mnist)")
    p.add_argument("--json", default=None, help="write all results to this JSON file")


# --------------------------------------------------------------------------------------------
# Worker side (runs in its own process)


def _rss_mib(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time_steps(step, sync, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _anycnn_worker(cfg: dict) -> dict:
    import numpy as np

    import anycnn
    from anycnn.backend import synchronize
    from anycnn.models import build_model

    backend = anycnn.get_backend()
    anycnn.manual_seed(0)
    model = build_model(cfg["model"])
    if cfg["dtype"] != "float32":
        model.to(cfg["dtype"])
    size = model_input_shape(cfg["model"])
    rng = np.random.default_rng(0)
    b = cfg["batch"]
    x = anycnn.asarray(rng.random((b, *size), dtype=np.float32).astype(cfg["dtype"]))
    y = anycnn.asarray(rng.integers(0, 10, b))
    loss_fn = anycnn.nn.losses.SoftmaxCrossEntropy()
    opt = anycnn.optim.optimizers.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        model.zero_grad()
        loss_fn.forward(model.forward(x), y)
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()

    def infer():
        model.forward(x)

    sync = lambda: synchronize(backend)  # noqa: E731
    base = _rss_mib("VmRSS")
    train = _time_steps(step, sync, cfg["warmup"], cfg["steps"])
    model.eval()
    inference = _time_steps(infer, sync, 1, cfg["steps"])
    return {"train_ms": train, "infer_ms": inference, "base_mib": base,
            "peak_mib": _rss_mib("VmHWM"), "backend": backend.name,
            "device": str(backend.device),
            "openblas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT")}


def _torch_worker(cfg: dict, channels_last: bool) -> dict:
    import numpy as np
    import torch

    from anycnn.io.interop import torch_module
    from anycnn.models import build_model

    torch.set_num_threads(cfg["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.get("gpu") else "cpu")
    dtype = getattr(torch, cfg["dtype"])
    size = model_input_shape(cfg["model"])
    net = torch_module(build_model(cfg["model"]), size).to(device=device, dtype=dtype)
    rng = np.random.default_rng(0)
    b = cfg["batch"]
    x = torch.tensor(rng.random((b, size[2], size[0], size[1]), dtype=np.float32),
                     dtype=dtype, device=device)
    y = torch.tensor(rng.integers(0, 10, b), device=device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    def infer():
        with torch.no_grad():
            net(x)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base = _rss_mib("VmRSS")
    train = _time_steps(step, sync, cfg["warmup"], cfg["steps"])
    net.eval()
    inference = _time_steps(infer, sync, 1, cfg["steps"])
    return {"train_ms": train, "infer_ms": inference, "base_mib": base,
            "peak_mib": _rss_mib("VmHWM"), "backend": "torch", "device": str(device)}


def _gemm_worker(cfg: dict) -> dict:
    """Best float32 GEMM rate of NumPy's BLAS on square matrices, GFLOP/s."""
    import numpy as np

    n = 2048
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    a @ b
    best = min(_time_steps(lambda: a @ b, lambda: None, 1, 10))
    return {"gflops": 2 * n**3 / (best / 1e3) / 1e9}


def _epoch_worker(cfg: dict) -> dict:
    import anycnn
    from anycnn.data.dataloader import DataLoader
    from anycnn.data.datasets import load_dataset
    from anycnn.models import build_model
    from anycnn.train.trainer import Trainer

    data = load_dataset(cfg["dataset"], progress=False)
    anycnn.manual_seed(0)
    model = build_model(cfg["model"])
    opt = anycnn.optim.optimizers.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = DataLoader(data.train, cfg["batch"], shuffle=True)
    trainer = Trainer(model, opt, progress=False)
    t0 = time.perf_counter()
    trainer.fit(loader, None, epochs=1)
    return {"epoch_s": time.perf_counter() - t0, "images": len(data.train),
            "train_accuracy": trainer.history[-1]["train_accuracy"]}


def worker_main(cfg: dict) -> dict:
    kind = cfg["kind"]
    if kind in ("anycnn", "anycnn-script"):
        return _anycnn_worker(cfg)
    if kind in ("torch", "torch-cl"):
        return _torch_worker(cfg, channels_last=kind == "torch-cl")
    if kind == "gemm":
        return _gemm_worker(cfg)
    if kind == "epoch":
        return _epoch_worker(cfg)
    raise ConfigError(f"unknown worker kind {kind!r}")


# --------------------------------------------------------------------------------------------
# Driver side


def model_input_shape(name: str) -> tuple[int, int, int]:
    """(H, W, C) input of a preset: its default spec's (28x28x1 for the MNIST-sized presets,
    32x32x3 for ``resnet20``)."""
    from ..models import model_spec

    spec = model_spec(name)
    return (spec["image_size"], spec["image_size"], spec["in_channels"])


def flops_per_image(name: str) -> dict[str, float]:
    """Forward and training-step FLOPs per image of a preset (conv and dense GEMMs only, as
    counted by :func:`anycnn.summary`).

    Training counts forward + weight gradient + input gradient (none for the first layer,
    which gets the images).
    """
    from ..backend import use_backend
    from ..models import build_model
    from ..nn.summarize import call_flops

    with use_backend("numpy"):
        flops = call_flops(build_model(name), model_input_shape(name))
    forward = float(sum(flops))
    first = next((f for f in flops if f), 0)
    return {"forward": forward, "train": 3 * forward - first}


def _run_worker(cfg: dict, threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    start = ["-m", "anycnn.cli.bench"]
    if cfg["kind"] == "anycnn-script":
        env.pop("OPENBLAS_THREAD_TIMEOUT", None)
        start = ["-c", _SCRIPT_BOOT]
    proc = subprocess.run([sys.executable, *start, json.dumps(cfg)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConfigError(f"benchmark worker {cfg['kind']} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(args: argparse.Namespace) -> int:
    from ..backend import get_backend
    from ..models import model_spec

    model_spec(args.model)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        raise ConfigError("--steps and --rounds must be >= 1 and --warmup >= 0")
    backend = get_backend()
    frameworks = ["anycnn", "anycnn-script"] if args.script else ["anycnn"]
    if args.compare_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ConfigError("--compare-torch needs torch: pip install -r backends/torch.txt"
                              ) from None
        frameworks += ["torch", "torch-cl"]
    gpu = backend.name == "cupy" or (backend.name == "torch" and "cuda" in str(backend.device))
    results: dict[str, Any] = {"model": args.model, "backend": backend.name,
                               "device": str(backend.device), "threads": args.threads,
                               "dtype": args.dtype, "steps": args.steps, "rounds": args.rounds,
                               "flops_per_image": flops_per_image(args.model), "rows": []}
    os.environ["ANYCNN_BACKEND"] = backend.name
    if args.gemm:
        results["gemm_gflops"] = _run_worker({"kind": "gemm"}, args.threads)["gflops"]
    print(f"anycnn bench: {args.model}, backend {backend.name} on {backend.device}, "
          f"{args.threads} threads, {args.dtype}, {args.rounds} alternating rounds x "
          f"{args.steps} steps", flush=True)
    for batch in args.batch_sizes:
        per: dict[str, dict[str, list[float]]] = {f: {"train": [], "infer": [], "peak": [],
                                                      "above": []} for f in frameworks}
        env_seen: dict[str, str | None] = {}
        for _ in range(args.rounds):
            for fw in frameworks:
                cfg = {"kind": fw, "model": args.model, "batch": batch, "dtype": args.dtype,
                       "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                       "gpu": gpu}
                out = _run_worker(cfg, args.threads)
                per[fw]["train"].append(_median(out["train_ms"]))
                per[fw]["infer"].append(_median(out["infer_ms"]))
                per[fw]["peak"].append(out["peak_mib"])
                per[fw]["above"].append(out["peak_mib"] - out["base_mib"])
                env_seen[fw] = out.get("openblas_thread_timeout")
        row: dict[str, Any] = {"batch": batch}
        for fw in frameworks:
            row[fw] = {k: _median(v) for k, v in per[fw].items()}
            row[fw]["rounds_train_ms"] = per[fw]["train"]
            row[fw]["openblas_thread_timeout"] = env_seen[fw]
        train_ms = row["anycnn"]["train"]
        row["anycnn"]["images_per_s"] = batch / train_ms * 1e3
        row["anycnn"]["gflops"] = results["flops_per_image"]["train"] * batch / train_ms / 1e6
        if "gemm_gflops" in results:
            row["anycnn"]["fraction_of_gemm_peak"] = row["anycnn"]["gflops"] / results[
                "gemm_gflops"]
        if "anycnn-script" in row:
            row["script_ratio"] = row["anycnn-script"]["train"] / train_ms
        for fw in frameworks[1:]:
            if fw == "anycnn-script":
                continue
            row[f"ratio_vs_{fw}"] = train_ms / row[fw]["train"]
            row[f"infer_ratio_vs_{fw}"] = row["anycnn"]["infer"] / row[fw]["infer"]
        results["rows"].append(row)
    if args.epoch_dataset:
        results["epoch"] = _run_worker({"kind": "epoch", "model": args.model, "batch": 64,
                                        "dataset": args.epoch_dataset}, args.threads)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def format_table(results: dict) -> str:
    """A Markdown table of :func:`run`'s results."""
    fws = [f for f in FRAMEWORKS if results["rows"] and f in results["rows"][0]]
    script = "anycnn-script" in fws
    fws = [f for f in fws if f != "anycnn-script"]
    head = ["batch", "anycnn train ms", "img/s"]
    if script:
        head += ["script train ms", "script / command"]
    for fw in fws[1:]:
        head += [f"{fw} train ms", f"ratio vs {fw}"]
    head += ["anycnn infer ms"] + [f"{fw} infer ms" for fw in fws[1:]]
    head += ["anycnn peak MiB (above base)"] + [f"{fw} peak MiB (above base)" for fw in fws[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in results["rows"]:
        a = row["anycnn"]
        cells = [str(row["batch"]), f"{a['train']:.2f}", f"{a['images_per_s']:.0f}"]
        if script:
            cells += [f"{row['anycnn-script']['train']:.2f}", f"{row['script_ratio']:.2f}x"]
        for fw in fws[1:]:
            cells += [f"{row[fw]['train']:.2f}", f"{row['ratio_vs_' + fw]:.2f}x"]
        cells += [f"{a['infer']:.2f}"] + [f"{row[fw]['infer']:.2f}" for fw in fws[1:]]
        cells += [f"{row[fw]['peak']:.0f} ({row[fw]['above']:.0f})" for fw in fws]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"train FLOPs/image: {results['flops_per_image']['train'] / 1e6:.1f} M"]
    if "gemm_gflops" in results:
        fr = ", ".join(f"batch {r['batch']}: {r['anycnn']['gflops']:.1f} GFLOP/s = "
                       f"{100 * r['anycnn']['fraction_of_gemm_peak']:.0f}%"
                       for r in results["rows"])
        notes.append(f"float32 GEMM peak {results['gemm_gflops']:.1f} GFLOP/s; reached {fr}")
    if "epoch" in results:
        e = results["epoch"]
        notes.append(f"one epoch ({e['images']} images, batch 64): {e['epoch_s']:.1f} s")
    return "\n".join([*lines, "", *notes])


if __name__ == "__main__":
    print(json.dumps(worker_main(json.loads(sys.argv[1]))))
