"""``anycnn bench``: training-step and inference timings, side by side with PyTorch.

Method (the numbers in BENCHMARKS.md come from here):

* Every measurement runs in a fresh worker process (``python -m anycnn.cli.bench WORKER-JSON``;
  PyTorch's: ``python tools/bench_torch.py WORKER-JSON``, a script of the repository checkout,
  not of the wheel) with the BLAS/OpenMP thread count fixed, so the two frameworks never share a
  process or warm caches.
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
* ``--infer`` times eval-mode forwards instead, beside onnxruntime on the model exported to
  ONNX and PyTorch (:mod:`anycnn.cli.bench_infer`).
* ``--workers`` times data-parallel training instead (:func:`run_workers`): for each rank count
  ``k`` one ``mpiexec -n k`` job of the worker (``anycnn.dist.workers_command``'s launcher and
  binding flags; every rank calls ``bind_to_cores``) trains on a random global batch split into
  contiguous shares, through ``Trainer.parallel_step``. One rank runs the same data-parallel path
  (pack, ``allreduce_`` over a one-rank MPI communicator, unpack); its plain ``train_step`` is
  timed too, as a reference. A step's time is the slowest rank's; the time inside
  ``comm.allreduce_`` is measured by wrapping it. Rank counts alternate within each round.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DistributedError
from .common import backend_option, count, model_name, positive_int, select_backend

HELP = "time training steps (or, with --infer, inference) against PyTorch and onnxruntime"

FRAMEWORKS = ("anycnn", "anycnn-script", "torch", "torch-cl")

#: how the script path's worker starts: NumPy imported first, then the worker module as __main__
_SCRIPT_BOOT = "import numpy, runpy; runpy.run_module('anycnn.cli.bench', run_name='__main__')"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``anycnn bench``."""
    p.add_argument("--model", default="simple-cnn", type=model_name)
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[64, 256])
    p.add_argument("--steps", type=positive_int, default=20, help="timed steps per worker")
    p.add_argument("--warmup", type=count, default=3, help="untimed steps per worker")
    p.add_argument("--rounds", type=positive_int, default=3,
                   help="alternating rounds per framework")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1,
                   help="BLAS/torch threads (default: all cores)")
    p.add_argument("--script", action="store_true",
                   help="also time the path of a user's script (NumPy imported first, no "
                   "OPENBLAS_THREAD_TIMEOUT) beside the command's")
    p.add_argument("--input-grad", action="store_true",
                   help="also time the step with the first layer's input gradient (the default "
                   "model.backward(dy) of a hand-written loop; on with --script), alternated "
                   "step by step with the step without it")
    p.add_argument("--first-step", action="store_true",
                   help="time a new process's first training step instead: with an empty "
                   "compiled-kernel cache, then with the cache the first process left")
    p.add_argument("--compare-torch", action="store_true",
                   help="also time the same model in PyTorch (NCHW and channels_last)")
    p.add_argument("--gemm", action="store_true",
                   help="measure the float32 GEMM peak and report the fraction reached")
    p.add_argument("--epoch-dataset", default=None,
                   help="also time one full training epoch on this dataset (e.g. fashion-mnist)")
    p.add_argument("--workers", type=int, nargs="+", default=None, metavar="N",
                   help="time data-parallel training over MPI instead: one N means 1..N ranks, "
                   "several are the rank counts to run (1, the baseline, is always added); "
                   "needs mpi4py and mpiexec")
    p.add_argument("--infer", action="store_true",
                   help="time eval-mode forwards instead, beside onnxruntime (the same model "
                   "exported to ONNX, the same threads) and PyTorch where they are installed")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    backend_option(p)


# --------------------------------------------------------------------------------------------
# Worker side (runs in its own process)


def rss_mib(field: str) -> float:
    """This process's ``VmRSS`` / ``VmHWM`` (``field``) in MiB (``ru_maxrss`` without /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(step, sync, warmup: int, steps: int) -> list[float]:
    """Milliseconds of each of ``steps`` calls of ``step`` (each ended by ``sync``), after
    ``warmup`` untimed ones."""
    return time_alternating([step], sync, warmup, steps)[0]


def time_alternating(steps_of: list, sync, warmup: int, steps: int) -> list[list[float]]:
    """Milliseconds of each function of ``steps_of`` over ``steps`` rounds (each call ended by
    ``sync``), one call of each per round, in reversed order every other round, after
    ``warmup`` untimed rounds: a shared machine's slow spells fall on all of them alike, so
    their ratio compares like with like."""
    for _ in range(warmup):
        for step in steps_of:
            step()
    sync()
    times: list[list[float]] = [[] for _ in steps_of]
    for r in range(steps):
        order = range(len(steps_of)) if r % 2 == 0 else reversed(range(len(steps_of)))
        for k in order:
            t0 = time.perf_counter()
            steps_of[k]()
            sync()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def _model_and_batch(cfg: dict) -> tuple:
    """The seeded model of ``cfg`` (in its dtype) and one random host batch: ``(model, images
    (B, H, W, C) of cfg["dtype"], int64 labels (B,))``, the same in every worker."""
    import numpy as np

    import anycnn
    from anycnn.models import build_model

    anycnn.manual_seed(0)
    model = build_model(cfg["model"])
    if cfg["dtype"] != "float32":
        model.to(cfg["dtype"])
    rng = np.random.default_rng(0)
    shape = (cfg["batch"], *model_input_shape(cfg["model"]))
    images = rng.random(shape, dtype=np.float32).astype(cfg["dtype"])
    return model, images, rng.integers(0, 10, cfg["batch"])


class TrainingStep:
    """The benchmarked training step of ``cfg``'s model on its batch (:func:`_model_and_batch`):
    ``zero_grad``, forward, softmax cross-entropy, backward, SGD step. ``step(input_grad)``
    runs one (``input_grad=False`` is the Trainer's backward; True is the default
    ``model.backward(dy)`` of a hand-written loop); ``sync()`` waits for the device."""

    def __init__(self, cfg: dict) -> None:
        import anycnn

        self.backend = anycnn.get_backend()
        self.model, images, labels = _model_and_batch(cfg)
        self.x, self.y = anycnn.asarray(images), anycnn.asarray(labels)
        self.loss = anycnn.nn.losses.SoftmaxCrossEntropy()
        self.opt = anycnn.optim.optimizers.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def step(self, input_grad: bool = False) -> None:
        self.model.zero_grad()
        self.loss.forward(self.model.forward(self.x), self.y)
        self.model.backward(self.loss.backward(), input_grad=input_grad)
        self.opt.step()

    def sync(self) -> None:
        from anycnn.backend import synchronize

        synchronize(self.backend)


def _anycnn_worker(cfg: dict) -> dict:
    bench = TrainingStep(cfg)
    base = rss_mib("VmRSS")
    if cfg.get("input_grad"):  # the two steps alternated: their ratio side by side
        train, with_grad = time_alternating([bench.step, lambda: bench.step(True)], bench.sync,
                                            cfg["warmup"], cfg["steps"])
        out = {"train_ms": train, "train_input_grad_ms": with_grad}
    else:
        out = {"train_ms": time_steps(bench.step, bench.sync, cfg["warmup"], cfg["steps"])}
    bench.model.eval()
    inference = time_steps(lambda: bench.model.forward(bench.x), bench.sync, 1, cfg["steps"])
    return {**out, "infer_ms": inference, "base_mib": base,
            "peak_mib": rss_mib("VmHWM"), "backend": bench.backend.name,
            "device": str(bench.backend.device),
            "openblas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT")}


def _gemm_worker(cfg: dict) -> dict:
    """Best float32 GEMM rate of NumPy's BLAS on square matrices, GFLOP/s."""
    import numpy as np

    n = 2048
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    a @ b
    best = min(time_steps(lambda: a @ b, lambda: None, 1, 10))
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


def _dp_worker(cfg: dict) -> dict | None:
    """One rank of an ``mpiexec -n k`` job: data-parallel steps through ``Trainer.parallel_step``.

    Rank 0 returns the job's numbers (every rank's per-step times), the others None.
    """
    import numpy as np

    import anycnn
    from anycnn.backend import synchronize
    from anycnn.data.dataloader import share_of
    from anycnn.dist import get_communicator, install_abort_hook
    from anycnn.kernels import threads
    from anycnn.train.parallel import TRAILER, DataParallel
    from anycnn.train.trainer import Trainer

    before = os.sched_getaffinity(0)
    comm = get_communicator("mpi")  # pins this machine's ranks to disjoint cores
    install_abort_hook(comm)
    bound = os.sched_getaffinity(0) != before
    backend = anycnn.get_backend()
    model, images, labels = _model_and_batch(cfg)  # the same weights on every rank
    b = cfg["batch"]
    start, stop = share_of(b, comm.rank, comm.size)
    x, y = anycnn.asarray(images[start:stop]), anycnn.asarray(labels[start:stop])
    opt = anycnn.optim.optimizers.SGD(model.parameters(), lr=0.01, momentum=0.9)
    trainer = Trainer(model, opt, progress=False, comm=comm)
    path = "parallel_step"
    if trainer._parallel is None:  # one rank: the Trainer would use train_step; time the DP path
        trainer._parallel = DataParallel(comm)
    params = sum(math.prod(p.shape) for p in opt.params)
    itemsize = np.dtype(cfg["dtype"]).itemsize

    reduce_ms: list[float] = []
    inner = comm.allreduce_

    def timed_allreduce(buf):
        t0 = time.perf_counter()
        out = inner(buf)
        reduce_ms.append((time.perf_counter() - t0) * 1e3)
        return out

    comm.allreduce_ = timed_allreduce
    sync = lambda: synchronize(backend)  # noqa: E731
    for _ in range(cfg["warmup"]):
        trainer.parallel_step(x, y)
    sync()
    comm.barrier()
    step_ms, step_reduce_ms = [], []
    for _ in range(cfg["steps"]):
        reduce_ms.clear()
        t0 = time.perf_counter()
        trainer.parallel_step(x, y)
        sync()
        step_ms.append((time.perf_counter() - t0) * 1e3)
        step_reduce_ms.append(sum(reduce_ms))
    comm.allreduce_ = inner
    plain_ms = None
    if comm.size == 1:  # reference: the single-process Trainer's own step, same model and batch
        plain_ms = time_steps(lambda: trainer.train_step(x, y, check=True), sync, 1,
                               cfg["steps"])
    mine = {"rank": comm.rank, "step_ms": step_ms, "allreduce_ms": step_reduce_ms,
            "share": stop - start, "threads": threads.num_threads(),
            "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "bound_by_anycnn": bound}
    everyone = comm.allgather_object(mine)
    if comm.rank != 0:
        return None
    return {"ranks": everyone, "path": path, "train_step_ms": plain_ms, "parameters": params,
            "buffer_bytes": (params + len(TRAILER)) * itemsize, "backend": backend.name,
            "device": str(backend.device), "communicator": comm.name}


def worker_main(cfg: dict) -> dict | None:
    kind = cfg["kind"]
    if kind == "anycnn" and cfg.get("infer_only"):
        from .bench_infer import anycnn_worker

        return anycnn_worker(cfg)
    if kind == "onnxruntime":
        from .bench_infer import onnxruntime_worker

        return onnxruntime_worker(cfg)
    if kind in ("anycnn", "anycnn-script"):
        return _anycnn_worker(cfg)
    if kind == "first-step":
        from .bench_first_step import first_step_worker

        return first_step_worker(cfg)
    if kind == "gemm":
        return _gemm_worker(cfg)
    if kind == "epoch":
        return _epoch_worker(cfg)
    if kind == "dp":
        return _dp_worker(cfg)
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


#: the thread counts a worker process is given (BLAS libraries, anycnn's threads, Halide's pool)
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "ANYCNN_NUM_THREADS", "HL_NUM_THREADS")


def _run_worker(cfg: dict, threads: int, **env_vars: str) -> dict:
    """Run the worker of ``cfg["kind"]`` in a new process with ``threads`` BLAS/OpenMP threads
    (and ``env_vars`` set); its JSON result."""
    env = {**os.environ, **env_vars}
    for var in THREAD_VARS:
        env[var] = str(threads)
    start = ["-m", "anycnn.cli.bench"]
    if cfg["kind"] == "anycnn-script":
        env.pop("OPENBLAS_THREAD_TIMEOUT", None)
        start = ["-c", _SCRIPT_BOOT]
    elif cfg["kind"] in ("torch", "torch-cl"):
        start = [str(torch_worker_script())]
    proc = subprocess.run([sys.executable, *start, json.dumps(cfg)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConfigError(f"benchmark worker {cfg['kind']} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


#: PyTorch's worker: a script of the repository checkout (tools/), not part of the wheel
TORCH_WORKER = ("tools", "bench_torch.py")


def torch_worker_script() -> Path:
    """The path of PyTorch's bench worker in the repository checkout this anycnn runs from.

    Raises:
        ConfigError: anycnn runs from an installed wheel, which has no ``tools/`` folder.
    """
    script = Path(__file__).resolve().parents[2].joinpath(*TORCH_WORKER)
    if not script.is_file():
        raise ConfigError("anycnn bench --compare-torch runs PyTorch's worker "
                          f"{'/'.join(TORCH_WORKER)} of a repository checkout, which this "
                          "installed anycnn lacks: run it from a repository checkout (git clone, "
                          "then pip install -e .)")
    return script


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")



def _report(table: str, results: dict, json_path: str | None) -> int:
    """Print ``table``; write ``results`` to ``json_path`` when given."""
    print(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {json_path}")
    return 0

def run(args: argparse.Namespace) -> int:
    """``anycnn bench``: on the backend of ``--backend``, the anycnn worker (and PyTorch's with
    ``--compare-torch``) for each batch size; ``--workers``: :func:`run_workers`."""
    from ..backend import get_backend
    from ..models import model_spec

    select_backend(args.backend)
    model_spec(args.model)
    if getattr(args, "workers", None) is not None:
        if getattr(args, "infer", False):
            raise ConfigError("--workers times data-parallel training; drop --infer")
        return run_workers(args)
    if getattr(args, "first_step", False):
        from .bench_first_step import run_first_step

        return run_first_step(args)
    if getattr(args, "infer", False):
        from .bench_infer import run_infer

        return run_infer(args)
    backend = get_backend()
    input_grad = args.script or getattr(args, "input_grad", False)
    frameworks = ["anycnn", "anycnn-script"] if args.script else ["anycnn"]
    if args.compare_torch:
        torch_worker_script()  # an installed wheel has none: say so before any timing
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ConfigError("--compare-torch needs torch: pip install -r backends/torch.txt"
                              ) from None
        frameworks += ["torch", "torch-cl"]
    from ..backend import uses_gpu

    gpu = uses_gpu(backend)
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
                                                      "above": [], "train_input_grad": []}
                                                  for f in frameworks}
        env_seen: dict[str, str | None] = {}
        device_seen: dict[str, str | None] = {}
        for _ in range(args.rounds):
            for fw in frameworks:
                cfg = {"kind": fw, "model": args.model, "batch": batch, "dtype": args.dtype,
                       "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                       "gpu": gpu, "input_grad": input_grad}
                out = _run_worker(cfg, args.threads)
                per[fw]["train"].append(_median(out["train_ms"]))
                if "train_input_grad_ms" in out:
                    per[fw]["train_input_grad"].append(_median(out["train_input_grad_ms"]))
                per[fw]["infer"].append(_median(out["infer_ms"]))
                per[fw]["peak"].append(out["peak_mib"])
                per[fw]["above"].append(out["peak_mib"] - out["base_mib"])
                env_seen[fw] = out.get("openblas_thread_timeout")
                device_seen[fw] = out.get("device")
        row: dict[str, Any] = {"batch": batch}
        for fw in frameworks:
            row[fw] = {k: _median(v) for k, v in per[fw].items()}
            row[fw]["rounds_train_ms"] = per[fw]["train"]
            row[fw]["openblas_thread_timeout"] = env_seen[fw]
            row[fw]["device"] = device_seen[fw]
        train_ms = row["anycnn"]["train"]
        row["anycnn"]["images_per_s"] = batch / train_ms * 1e3
        row["anycnn"]["gflops"] = results["flops_per_image"]["train"] * batch / train_ms / 1e6
        if "gemm_gflops" in results:
            row["anycnn"]["fraction_of_gemm_peak"] = row["anycnn"]["gflops"] / results[
                "gemm_gflops"]
        if "anycnn-script" in row:
            row["script_ratio"] = row["anycnn-script"]["train"] / train_ms
        if input_grad:
            row["input_grad_ratio"] = row["anycnn"]["train_input_grad"] / train_ms
        for fw in frameworks[1:]:
            if fw == "anycnn-script":
                continue
            row[f"ratio_vs_{fw}"] = train_ms / row[fw]["train"]
            row[f"infer_ratio_vs_{fw}"] = row["anycnn"]["infer"] / row[fw]["infer"]
        results["rows"].append(row)
    if args.epoch_dataset:
        results["epoch"] = _run_worker({"kind": "epoch", "model": args.model, "batch": 64,
                                        "dataset": args.epoch_dataset}, args.threads)
    return _report(format_table(results), results, args.json)


# --------------------------------------------------------------------------------------------
# Data-parallel driver (--workers)


def worker_counts(values: list[int]) -> list[int]:
    """The rank counts ``--workers`` asks for: ``[N]`` is 1..N, a list is itself plus 1."""
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ConfigError(f"--workers takes positive rank counts, got {values}")
    if len(values) == 1:
        return list(range(1, values[0] + 1))
    return sorted({1, *values})


def _check_mpi() -> str:
    """mpiexec's path, or one ConfigError line naming the install command."""
    if importlib.util.find_spec("mpi4py") is None:
        raise ConfigError("anycnn bench --workers needs mpi4py and mpiexec; mpi4py is not "
                          "installed. Fix: pip install 'anycnn[mpi]'")
    from ..dist import find_mpiexec

    try:
        return find_mpiexec()
    except DistributedError as exc:
        raise ConfigError(f"anycnn bench --workers needs mpi4py and mpiexec; {exc}") from None


def _dp_command(k: int, cfg: dict) -> list[str]:
    """``mpiexec -n k <binding flags> python -m anycnn.cli.bench CFG``."""
    from ..dist import workers_command

    cmd = workers_command(k, [])
    tail = [sys.executable, "-m", "anycnn"]
    if cmd[-3:] != tail:  # pragma: no cover - workers_command's documented form
        raise ConfigError(f"unexpected workers command {cmd}")
    return [*cmd[:-3], sys.executable, "-m", "anycnn.cli.bench", json.dumps(cfg)]


_LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "MV2_", "HYDRA_", "MPIR_", "SLURM_STEP")


def _run_dp_worker(cfg: dict, k: int, threads: int) -> dict:
    env = {key: v for key, v in os.environ.items()
           if not key.startswith(_LAUNCHER_PREFIXES) and key != "ANYCNN_DIST"}
    for var in THREAD_VARS:
        env[var] = str(max(1, threads // k))
    proc = subprocess.run(_dp_command(k, cfg), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConfigError(f"benchmark job on {k} ranks failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _dp_summary(out: dict) -> dict[str, Any]:
    """One job's medians over its timed steps: the step is the slowest rank's."""
    ranks = out["ranks"]
    steps = range(len(ranks[0]["step_ms"]))
    slowest = [max(r["step_ms"][i] for r in ranks) for i in steps]
    reduce = [[r["allreduce_ms"][i] for r in ranks] for i in steps]
    return {"step_ms": _median(slowest),
            "allreduce_ms": _median([statistics.fmean(v) for v in reduce]),
            "allreduce_ms_min_rank": _median([min(v) for v in reduce]),
            "allreduce_ms_max_rank": _median([max(v) for v in reduce]),
            "train_step_ms": _median(out["train_step_ms"]) if out["train_step_ms"] else None}


def run_workers(args: argparse.Namespace) -> int:
    """``anycnn bench --workers``: data-parallel step times on 1..N MPI ranks, side by side."""
    from ..backend import get_backend

    counts = worker_counts(args.workers)
    for flag, name in ((args.compare_torch, "--compare-torch"), (args.script, "--script"),
                       (args.gemm, "--gemm"), (args.epoch_dataset, "--epoch-dataset")):
        if flag:
            raise ConfigError(f"--workers times data-parallel training only; drop {name}")
    small = [b for b in args.batch_sizes if b < max(counts)]
    if small:
        raise ConfigError(f"global batch sizes {small} are smaller than {max(counts)} ranks: "
                          "every rank needs at least one image")
    mpiexec = _check_mpi()
    backend = get_backend()
    os.environ["ANYCNN_BACKEND"] = backend.name
    results: dict[str, Any] = {
        "mode": "workers", "model": args.model, "backend": backend.name,
        "device": str(backend.device), "threads": args.threads, "dtype": args.dtype,
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "workers": counts,
        "mpiexec": mpiexec, "rows": []}
    print(f"anycnn bench --workers: {args.model}, backend {backend.name} on {backend.device}, "
          f"{args.dtype}, ranks {counts}, {args.rounds} alternating rounds x {args.steps} steps "
          f"(+{args.warmup} warmup), global batches {args.batch_sizes}", flush=True)
    for batch in args.batch_sizes:
        per: dict[int, list[dict]] = {k: [] for k in counts}
        last: dict[int, dict] = {}
        cfg = {"kind": "dp", "model": args.model, "batch": batch, "dtype": args.dtype,
               "steps": args.steps, "warmup": args.warmup}
        for _ in range(args.rounds):
            for k in counts:
                out = _run_dp_worker(cfg, k, args.threads)
                per[k].append(_dp_summary(out))
                last[k] = out
        base = None
        for k in counts:
            rounds = per[k]
            row: dict[str, Any] = {"batch": batch, "ranks": k}
            for key in ("step_ms", "allreduce_ms", "allreduce_ms_min_rank",
                        "allreduce_ms_max_rank"):
                row[key] = _median([r[key] for r in rounds])
            row["rounds_step_ms"] = [r["step_ms"] for r in rounds]
            if k == 1:
                base = row["step_ms"]
                row["train_step_ms"] = _median([r["train_step_ms"] for r in rounds])
            out = last[k]
            row["images_per_s"] = batch / row["step_ms"] * 1e3
            row["speedup"] = base / row["step_ms"] if base else None
            row["efficiency"] = row["speedup"] / k if base else None
            row["allreduce_share"] = row["allreduce_ms"] / row["step_ms"]
            row["buffer_mb"] = out["buffer_bytes"] / 1e6
            row["parameters"] = out["parameters"]
            row["path"] = out["path"]
            row["communicator"] = out["communicator"]
            row["threads_per_rank"] = [r["threads"] for r in out["ranks"]]
            row["cpus_per_rank"] = [r["cpus"] for r in out["ranks"]]
            row["share_per_rank"] = [r["share"] for r in out["ranks"]]
            row["command"] = shlex.join(_dp_command(k, cfg))
            results["rows"].append(row)
    return _report(format_workers_table(results), results, args.json)


def format_workers_table(results: dict) -> str:
    """A Markdown table of :func:`run_workers`'s results."""
    head = ["global batch", "ranks", "threads/rank", "step ms", "img/s", "speed-up",
            "efficiency", "allreduce ms (min-max over ranks)", "allreduce share",
            "buffer MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results["rows"]:
        threads = sorted(set(r["threads_per_rank"]))
        cells = [str(r["batch"]), str(r["ranks"]), "/".join(map(str, threads)),
                 f"{r['step_ms']:.2f}", f"{r['images_per_s']:.0f}",
                 f"{r['speedup']:.2f}x" if r["speedup"] else "-",
                 f"{100 * r['efficiency']:.0f}%" if r["efficiency"] else "-",
                 f"{r['allreduce_ms']:.3f} ({r['allreduce_ms_min_rank']:.3f}-"
                 f"{r['allreduce_ms_max_rank']:.3f})",
                 f"{100 * r['allreduce_share']:.1f}%", f"{r['buffer_mb']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["step: median over timed steps of the slowest rank's step, median over rounds; "
             "1 rank runs Trainer.parallel_step too (pack, allreduce_ over a 1-rank MPI "
             "communicator, unpack); allreduce: time inside comm.allreduce_ per step, mean "
             "over ranks (includes waiting for the slowest rank)"]
    plain = [f"batch {r['batch']}: {r['train_step_ms']:.2f} ms (parallel_step / train_step "
             f"{r['step_ms'] / r['train_step_ms']:.2f}x)"
             for r in results["rows"] if r["ranks"] == 1 and r.get("train_step_ms")]
    if plain:
        notes.append("1 rank, plain Trainer.train_step: " + "; ".join(plain))
    return "\n".join([*lines, "", *notes])


def format_table(results: dict) -> str:
    """A Markdown table of :func:`run`'s results."""
    fws = [f for f in FRAMEWORKS if results["rows"] and f in results["rows"][0]]
    script = "anycnn-script" in fws
    fws = [f for f in fws if f != "anycnn-script"]
    input_grad = "input_grad_ratio" in results["rows"][0] if results["rows"] else False
    head = ["batch", "anycnn train ms", "img/s"]
    if input_grad:
        head += ["with input grad ms", "ratio"]
    if script:
        head += ["script train ms", "script / command"]
        head += ["script with input grad ms", "script / command"] if input_grad else []
    for fw in fws[1:]:
        head += [f"{fw} train ms", f"ratio vs {fw}"]
    head += ["anycnn infer ms"] + [f"{fw} infer ms" for fw in fws[1:]]
    head += ["anycnn peak MiB (above base)"] + [f"{fw} peak MiB (above base)" for fw in fws[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in results["rows"]:
        a = row["anycnn"]
        cells = [str(row["batch"]), f"{a['train']:.2f}", f"{a['images_per_s']:.0f}"]
        if input_grad:
            cells += [f"{a['train_input_grad']:.2f}", f"{row['input_grad_ratio']:.2f}x"]
        if script:
            s = row["anycnn-script"]
            cells += [f"{s['train']:.2f}", f"{row['script_ratio']:.2f}x"]
            if input_grad:
                cells += [f"{s['train_input_grad']:.2f}",
                          f"{s['train_input_grad'] / a['train_input_grad']:.2f}x"]
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
    _out = worker_main(json.loads(sys.argv[1]))
    if _out is not None:  # data-parallel jobs: rank 0 alone reports
        print(json.dumps(_out), flush=True)
