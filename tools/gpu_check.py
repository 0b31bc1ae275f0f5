"""The prepared GPU check: one short, bounded run of everything that needs an NVIDIA GPU.

Run on a machine with an NVIDIA GPU (no network needed)::

    python tools/gpu_check.py --out DIR [--wheels DIR] [--budget-s 420]

Steps, each in its own process group with its own timeout (a step that runs over is killed and
reported as ``timeout``; one the remaining budget cannot hold is ``skipped``):

1. ``wheels``: installs the pure-Python wheels anycnn needs that this Python lacks
   (array-api-compat, array-api-extra, array-api-strict) from ``--wheels`` with
   ``pip install --no-index --find-links DIR --no-deps --target TMP`` (nothing is fetched); the
   repository itself is made importable through ``PYTHONPATH``, which needs no build.
2. ``environment``: ``nvidia-smi``, driver, Python, NumPy/CuPy/PyTorch versions, ``anycnn info``.
3. ``train``: ``anycnn train --backend cupy --dataset mnist-sample --epochs 1``.
4. ``train-nccl``: the same under ``ANYCNN_DIST=nccl`` and ``mpiexec -n 1`` (skipped without
   ``mpiexec``).
5. ``nccl-smoke``: a 1-rank NCCL communicator (``get_communicator("nccl")``): allreduce and
   broadcast of a CuPy buffer, and three ``Trainer.parallel_step`` calls (under ``mpiexec -n 1``
   when there is one, else an MPI singleton; skipped when mpi4py cannot start MPI).
6. ``bench-simple-cnn`` / ``bench-resnet20``: ``anycnn bench --backend cupy --compare-torch``
   (PyTorch eager NCHW and channels_last on the same GPU) at batch 64 and 256, and 128.
7. ``tests``: the test suite with ``ANYCNN_BACKEND=cupy ANYCNN_REQUIRE_BACKEND=1 pytest -x``
   (with ``--timeout`` per test when pytest-timeout is installed), in the time that is left.

Writes ``DIR/gpu-report.md`` (rewritten after every step, so a killed check still leaves one),
``DIR/gpu-report.json`` and the raw logs and bench JSON: 8 files at most, each capped at 8 MiB.
Exit status 0 when no step failed or timed out (skipped steps are listed with their reason), 1
otherwise, 2 on a usage error or when there is no NVIDIA GPU.

``--dry-run`` runs the same plumbing on the NumPy backend with tiny sizes (no GPU needed);
``--prepare-wheels DIR`` downloads the wheels for the offline machine (where pip has network).

This script lives in the repository, not in the anycnn wheel (a harness for CI, not library
code); it runs the repository's own anycnn (through ``PYTHONPATH``). It imports only the standard
library at load time: it must start before the wheels that anycnn needs are installed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the steps that run a helper of this script import it from here
TOOLS = Path(__file__).resolve().parent

#: distribution -> import name: the pure-Python runtime needs the GPU machine lacks
WHEELS = {"array-api-compat": "array_api_compat", "array-api-extra": "array_api_extra",
          "array-api-strict": "array_api_strict"}
#: versions --prepare-wheels fetches when this Python has none installed (pyproject's floors)
WHEEL_FLOORS = {"array-api-compat": ">=1.11", "array-api-extra": ">=0.8",
                "array-api-strict": ">=2.3"}
WHEELS_MAX_BYTES = 2 * 1024 * 1024
LOG_MAX_BYTES = 8 * 1024 * 1024
#: seconds kept back from the budget for writing the report
RESERVE_S = 8.0
#: a step the remaining budget gives less than this is skipped, not started
MIN_STEP_S = 3.0
#: a step's process exits with this to say "skipped" (its last output line is the reason)
EXIT_SKIP = 77
TARGET_RATIO = 1.5
REPORT = "gpu-report.md"

STATUSES = ("passed", "failed", "timeout", "skipped")


@dataclass
class Step:
    """One command of the check. ``cmd`` None: skipped with ``note`` as the reason."""

    name: str
    cmd: list[str] | None
    timeout_s: float
    log: str
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""
    summarize: object = None  # callable(Result) -> str: the key numbers


@dataclass
class Result:
    name: str
    status: str
    seconds: float
    timeout_s: float
    returncode: int | None
    note: str
    log: str | None
    command: str | None


# --------------------------------------------------------------------------------------------
# Running one step


def gpu_missing() -> str | None:
    """Why there is no usable NVIDIA GPU, or None when ``nvidia-smi -L`` lists one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no NVIDIA GPU: nvidia-smi is not on PATH"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no NVIDIA GPU: nvidia-smi -L failed ({exc})"
    if out.returncode != 0 or "GPU" not in out.stdout:
        return f"no NVIDIA GPU: nvidia-smi -L printed {out.stdout.strip() or out.stderr.strip()!r}"
    return None


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def cap_file(path: Path, limit: int = LOG_MAX_BYTES) -> None:
    """Keep a log under ``limit`` bytes: its first and last halves, with a marker between."""
    try:
        size = path.stat().st_size
    except OSError:
        return
    if size <= limit:
        return
    half = limit // 2 - 100
    with open(path, "rb") as f:
        head = f.read(half)
        f.seek(size - half)
        tail = f.read()
    marker = f"\n[... {size - 2 * half} bytes cut by gpu_check ...]\n".encode()
    path.write_bytes(head + marker + tail)


def _tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    body = [ln for ln in text if not ln.startswith("=====")]
    return " / ".join(ln.strip() for ln in body[-lines:])


def run_step(step: Step, out: Path, deadline: float, base_env: dict[str, str]) -> Result:
    """Run ``step`` in its own process group, output appended to ``out/step.log``.

    The timeout is the step's own, shortened to what is left before ``deadline`` (a monotonic
    time) less the reserve; when over, the whole group gets SIGTERM, then SIGKILL 3 s later.
    """
    log = out / step.log
    command = None if step.cmd is None else shlex.join(step.cmd)
    if step.cmd is None:
        return Result(step.name, "skipped", 0.0, 0.0, None, step.note, None, None)
    left = deadline - time.monotonic() - RESERVE_S
    timeout = min(step.timeout_s, left)
    if left < MIN_STEP_S:
        return Result(step.name, "skipped", 0.0, 0.0, None,
                      f"the overall budget is spent ({max(left, 0):.0f} s left)", None, command)
    env = {**base_env, **step.env}
    t0 = time.monotonic()
    with open(log, "a") as f:
        f.write(f"===== {step.name}: {command} (timeout {timeout:.0f} s) =====\n")
        f.flush()
        try:
            proc = subprocess.Popen(step.cmd, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=REPO,
                                    start_new_session=True)
        except OSError as exc:
            f.write(f"could not start: {exc}\n")
            return Result(step.name, "failed", 0.0, timeout, None, f"could not start: {exc}",
                          step.log, command)
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, signal.SIGKILL)
                rc = proc.wait()
        _kill_group(proc.pid, signal.SIGKILL)  # anything the step left running
        seconds = time.monotonic() - t0
        if timed_out:
            status = "timeout"
        elif rc == 0:
            status = "passed"
        elif rc == EXIT_SKIP:
            status = "skipped"
        else:
            status = "failed"
        f.write(f"===== {step.name}: {status} in {seconds:.1f} s (exit {rc}) =====\n")
    cap_file(log)
    result = Result(step.name, status, seconds, timeout, rc, "", step.log, command)
    if timed_out:
        result.note = f"killed after {timeout:.0f} s; last output: {_tail(log)[:300]}"
    elif status == "skipped":
        result.note = _tail(log)[:300]
    if step.summarize is not None and status in ("passed", "failed", "timeout"):
        try:
            key = step.summarize(result)
        except Exception as exc:  # a summary must never break the check
            key = f"(no summary: {type(exc).__name__}: {exc})" if status == "passed" else ""
        if key:
            result.note = f"{key}; {result.note}" if result.note else key
    if status == "failed" and not result.note:
        result.note = _tail(log, 2)[:300]
    return result


# --------------------------------------------------------------------------------------------
# Helpers the steps run in their own processes


def print_environment() -> None:
    """The ``environment`` step: versions, GPU and ``anycnn info`` (every part guarded)."""
    print(f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    print(f"host: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)")
    print(f"python: {sys.version.split()[0]} at {sys.executable}")
    smi = shutil.which("nvidia-smi")
    for args in (["-L"], ["--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"]):
        if smi is None:
            print("nvidia-smi: not on PATH")
            break
        try:
            out = subprocess.run([smi, *args], capture_output=True, text=True, timeout=30)
            print(f"nvidia-smi {args[0]}: {(out.stdout or out.stderr).strip()}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"nvidia-smi {args[0]}: failed ({exc})")
    from importlib import metadata

    for dist in ("numpy", "cupy-cuda13x", "cupy-cuda12x", "cupy", "torch", "mpi4py",
                 "nvidia-nccl-cu13", "nvidia-nccl-cu12", "pytest", "pytest-timeout",
                 "hypothesis", *WHEELS):
        try:
            print(f"{dist}: {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    try:
        import cupy

        rt = cupy.cuda.runtime
        print(f"cupy CUDA runtime {rt.runtimeGetVersion()}, driver {rt.driverGetVersion()}, "
              f"devices {rt.getDeviceCount()}")
    except Exception as exc:
        print(f"cupy: unusable ({type(exc).__name__}: {exc})")
    try:
        import torch

        cuda = torch.cuda.is_available()
        print(f"torch CUDA {torch.version.cuda}, available {cuda}, cuDNN "
              f"{torch.backends.cudnn.version() if cuda else None}"
              + (f", device {torch.cuda.get_device_name(0)}" if cuda else ""))
    except Exception as exc:
        print(f"torch: unusable ({type(exc).__name__}: {exc})")
    sys.stdout.flush()
    from anycnn.cli.commands import main

    print("$ anycnn info", flush=True)
    code = main(["info"])
    sys.exit(code)


def dist_smoke(kind: str) -> None:
    """The ``nccl-smoke`` step on one rank: allreduce, broadcast and parallel steps.

    Exits with :data:`EXIT_SKIP` (the reason on the last line) when MPI cannot start.
    """
    if importlib.util.find_spec("mpi4py") is None:
        print("SKIP: mpi4py is not installed, so no MPI (or NCCL) communicator can start")
        sys.exit(EXIT_SKIP)
    try:
        from mpi4py import MPI  # noqa: F401  (a singleton MPI when no launcher started us)
    except Exception as exc:
        print(f"SKIP: mpi4py cannot start MPI ({type(exc).__name__}: {exc}); carry an MPI "
              "(e.g. the mpich wheel) to run this step")
        sys.exit(EXIT_SKIP)
    import math

    import numpy as np

    import anycnn
    from anycnn.backend import synchronize, to_numpy
    from anycnn.dist import get_communicator
    from anycnn.models import build_model
    from anycnn.train.parallel import DataParallel
    from anycnn.train.trainer import Trainer

    comm = get_communicator(kind)
    backend = anycnn.get_backend()
    ref = np.arange(4096, dtype=np.float32)
    buf = anycnn.asarray(ref)
    comm.allreduce_(buf)
    comm.broadcast_(buf, root=0)
    synchronize(backend)
    reduced_ok = bool(np.array_equal(to_numpy(buf), ref * comm.size))
    anycnn.manual_seed(0)
    model = build_model("simple-cnn")
    opt = anycnn.optim.optimizers.SGD(model.parameters(), lr=0.01, momentum=0.9)
    trainer = Trainer(model, opt, progress=False, comm=comm)
    if trainer._parallel is None:  # one rank: force the data-parallel path (pack, allreduce_)
        trainer._parallel = DataParallel(comm)
    rng = np.random.default_rng(0)
    x = anycnn.asarray(rng.random((32, 28, 28, 1), dtype=np.float32))
    y = anycnn.asarray(rng.integers(0, 10, 32))
    losses = []
    t0 = time.perf_counter()
    for _ in range(3):
        losses.append(trainer.parallel_step(x, y).loss)
    synchronize(backend)
    out = {"communicator": comm.name, "ranks": comm.size, "backend": backend.name,
           "device": str(backend.device), "allreduce_ok": reduced_ok, "losses": losses,
           "steps_s": round(time.perf_counter() - t0, 3)}
    print(json.dumps(out), flush=True)
    ok = reduced_ok and all(math.isfinite(v) for v in losses)
    sys.exit(0 if ok else 1)


# --------------------------------------------------------------------------------------------
# The plan


def find_mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("mpiexec")


def missing_wheels() -> list[str]:
    """The distributions of :data:`WHEELS` this Python cannot import."""
    return [d for d, mod in WHEELS.items() if importlib.util.find_spec(mod) is None]


def _history_note(run_dir: Path):
    def summarize(result: Result) -> str:
        hist = json.loads((run_dir / "history.json").read_text())
        last = hist[-1]
        return (f"epoch {last.get('epoch')}: val_accuracy {last.get('val_accuracy', 0):.4f}, "
                f"{last.get('images_per_s', 0):.0f} img/s, {last.get('seconds', 0):.1f} s")
    return summarize


def _json_line_note(result: Result, out: Path) -> str:
    for line in reversed((out / result.log).read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            d = json.loads(line)
            return (f"{d['communicator']} on {d['ranks']} rank(s), {d['device']}: allreduce "
                    f"{'ok' if d['allreduce_ok'] else 'WRONG'}, losses "
                    f"{', '.join(f'{v:.4f}' for v in d['losses'])}")
    return ""


def bench_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"]


def _bench_note(path: Path):
    def summarize(result: Result) -> str:
        parts = []
        for row in bench_rows(path):
            a = row["anycnn"]
            cell = f"batch {row['batch']}: {a['train']:.2f} ms ({a['images_per_s']:.0f} img/s)"
            if "torch" in row:
                cell += (f", torch {row['torch']['train']:.2f} ms -> "
                         f"{row['ratio_vs_torch']:.2f}x")
            if "torch-cl" in row:
                cell += f", channels_last {row['ratio_vs_torch-cl']:.2f}x"
            parts.append(cell)
        return "; ".join(parts)
    return summarize


def _pytest_note(result: Result, out: Path) -> str:
    lines = (out / result.log).read_text(errors="replace").splitlines()
    for line in reversed(lines):
        if line.startswith("====="):  # gpu_check's own header and footer lines
            continue
        s = line.strip("= ").strip()
        if " in " in s and any(w in s for w in ("passed", "failed", "error", "skipped")):
            return s
    dots = sum(ln.count(".") for ln in lines if ln and set(ln.split(" ")[0]) <= set(".sFEx"))
    return f"about {dots} tests passed before it stopped" if dots else ""


def _helper(call: str) -> str:
    """Python code that imports this script from :data:`TOOLS` and makes ``call`` (one of the
    helpers above, in a step's own process)."""
    return f"import sys; sys.path.insert(0, {str(TOOLS)!r}); import gpu_check; gpu_check.{call}"


def plan(args: argparse.Namespace, out: Path, tmp: Path) -> list[Step]:
    """The steps, in order. ``--dry-run``: numpy backend, tiny sizes."""
    py = sys.executable
    dry = args.dry_run
    backend = "numpy" if dry else "cupy"
    dist = "mpi" if dry else "nccl"
    be = {"ANYCNN_BACKEND": backend}
    steps: list[Step] = []

    missing = missing_wheels()
    if not missing:
        steps.append(Step("wheels", None, 0, "env.txt",
                          note="nothing to install: " + ", ".join(WHEELS) + " import already"))
    elif args.wheels is None:
        why = f"missing {', '.join(missing)}; pass --wheels DIR (made by --prepare-wheels)"
        steps.append(Step("wheels", [py, "-c", f"import sys; print({why!r}); sys.exit(1)"], 10,
                          "env.txt"))
    else:
        steps.append(Step("wheels", [py, "-m", "pip", "install", "--no-index", "--find-links",
                                     str(Path(args.wheels).resolve()), "--no-deps",
                                     "--no-compile", "--disable-pip-version-check", "--target",
                                     str(tmp / "site"), *missing], 90, "env.txt",
                          summarize=lambda r: f"installed {', '.join(missing)}"))
    steps.append(Step("environment", [py, "-c", _helper("print_environment()")],
                      60, "env.txt", env=be))

    tiny = ["--limit", "256"] if dry else []
    run_dir = tmp / "train"
    train = [py, "-m", "anycnn", "train", "--backend", backend, "--dataset", "mnist-sample",
             "--model", "simple-cnn", "--epochs", "1", "--batch-size", "64", "--optimizer",
             "sgd", "--lr", "0.05", "--momentum", "0.9", "--quiet", "--device-resident", *tiny]
    steps.append(Step("train", [*train, "--out", str(run_dir)], 120, "train.log", env=be,
                      summarize=_history_note(run_dir)))
    mpiexec = find_mpiexec()
    dist_env = {**be, "ANYCNN_DIST": dist}
    if mpiexec:
        nccl_dir = tmp / "train-nccl"
        steps.append(Step("train-nccl", [mpiexec, "-n", "1", *train, "--out", str(nccl_dir)],
                          120, "train.log", env=dist_env, summarize=_history_note(nccl_dir)))
    else:
        steps.append(Step("train-nccl", None, 0, "train.log",
                          note="no mpiexec here: the 1-rank nccl-smoke stands in"))
    smoke = [py, "-c", _helper(f"dist_smoke({dist!r})")]
    steps.append(Step("nccl-smoke", [mpiexec, "-n", "1", *smoke] if mpiexec else smoke, 90,
                      "train.log", env=dist_env,
                      summarize=lambda r: _json_line_note(r, out)))

    torch_there = importlib.util.find_spec("torch") is not None
    compare = ["--compare-torch"] if torch_there else []
    size = (["--steps", "1", "--warmup", "1", "--rounds", "1", "--threads", "2"] if dry
            else ["--steps", "10", "--warmup", "3", "--rounds", "2"])
    for model, batches, cap in (("simple-cnn", ["64", "256"], 150), ("resnet20", ["128"], 110)):
        if dry:
            batches = [str(max(2, int(b) // 32)) for b in batches]
        path = out / f"bench-{model}.json"
        steps.append(Step(f"bench-{model}", [py, "-m", "anycnn", "bench", "--backend", backend,
                                             "--model", model, "--batch-sizes", *batches,
                                             *size, *compare, "--json", str(path)],
                          cap, "bench.log", env=be, summarize=_bench_note(path),
                          note="" if torch_there else "torch is not installed: no comparison"))

    timeout = ["--timeout", "120"] if importlib.util.find_spec("pytest_timeout") else []
    # the dry run: one quick file; on the GPU: the whole suite but the check's own dry run
    which = (["tests/test_backend.py"] if dry
             else ["--deselect", "tests/test_gpu_check.py::test_dry_run_end_to_end"])
    steps.append(Step("tests", [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                *timeout, *which], 300, "pytest.log",
                      env={**be, "ANYCNN_REQUIRE_BACKEND": "1"},
                      summarize=lambda r: _pytest_note(r, out)))
    return steps


# --------------------------------------------------------------------------------------------
# The report


def key_ratio(out: Path) -> dict | None:
    """simple-cnn's anycnn / PyTorch training-step ratio at batch 256 (else the largest)."""
    path = out / "bench-simple-cnn.json"
    try:
        rows = bench_rows(path)
    except (OSError, ValueError, KeyError):
        return None
    rows = [r for r in rows if "ratio_vs_torch" in r]
    if not rows:
        return None
    row = next((r for r in rows if r["batch"] == 256), max(rows, key=lambda r: r["batch"]))
    best = min(row["ratio_vs_torch"], row.get("ratio_vs_torch-cl", float("inf")))
    return {"batch": row["batch"], "anycnn_ms": row["anycnn"]["train"],
            "torch_ms": row["torch"]["train"], "ratio": row["ratio_vs_torch"],
            "ratio_channels_last": row.get("ratio_vs_torch-cl"),
            "torch_device": row["torch"].get("device"),
            "within_target": row["ratio_vs_torch"] <= TARGET_RATIO, "best_ratio": best}


def write_report(out: Path, results: list[Result], meta: dict) -> int:
    """Write ``gpu-report.md`` and ``gpu-report.json``; return the exit status."""
    bad = [r for r in results if r.status in ("failed", "timeout")]
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    done = meta.get("finished", False)
    verdict = ("FAIL" if bad else "PASS") if done else "RUNNING (incomplete)"
    ratio = key_ratio(out)
    lines = [
        "# anycnn GPU check",
        "",
        f"- result: **{verdict}** ({', '.join(f'{n} {s}' for s, n in counts.items())})",
        f"- mode: {meta['mode']}, backend {meta['backend']}",
        f"- started: {meta['started']}; took {meta.get('seconds', 0):.1f} s of a "
        f"{meta['budget_s']:.0f} s budget",
        f"- host: {meta['host']}; Python {meta['python']}",
        f"- GPU: {meta['gpu']}",
        "",
        "## Key numbers",
        "",
    ]
    if ratio:
        cl = ratio["ratio_channels_last"]
        lines.append(
            f"- simple-cnn training step at batch {ratio['batch']}: anycnn "
            f"{ratio['anycnn_ms']:.2f} ms, PyTorch ({ratio['torch_device']}) "
            f"{ratio['torch_ms']:.2f} ms: ratio **{ratio['ratio']:.2f}x**"
            + (f" (vs channels_last {cl:.2f}x)" if cl is not None else "")
            + f"; target <= {TARGET_RATIO}x: {'met' if ratio['within_target'] else 'NOT met'}")
    else:
        lines.append("- no anycnn / PyTorch ratio (the simple-cnn bench did not finish, or ran "
                     "without torch)")
    for r in results:
        if r.status != "skipped" and r.note and r.name.startswith(("bench", "train", "nccl",
                                                                   "tests")):
            lines.append(f"- {r.name}: {r.note}")
    lines += ["", "## Steps", "", "| step | status | seconds | timeout s | exit | note |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        note = r.note.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.timeout_s:.0f} | "
                     f"{'' if r.returncode is None else r.returncode} | {note} |")
    lines += ["", "## Commands", ""]
    lines += [f"- {r.name}: `{r.command}`" for r in results if r.command]
    env = out / "env.txt"
    if env.exists():
        lines += ["", "## Environment (env.txt)", "", "```",
                  *env.read_text(errors="replace").splitlines()[:80], "```"]
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    lines += ["", "## Files", "", *(f"- {n}" for n in sorted({*files, REPORT, "gpu-report.json"}))]
    (out / REPORT).write_text("\n".join(lines) + "\n")
    data = {"meta": meta, "key_ratio": ratio, "steps": [asdict(r) for r in results],
            "verdict": verdict}
    (out / "gpu-report.json").write_text(json.dumps(data, indent=2))
    return 1 if bad else 0


def check(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    tmp = Path(tempfile.mkdtemp(prefix="anycnn-gpu-check-"))
    (tmp / "site").mkdir()
    path = os.pathsep.join(p for p in (str(tmp / "site"), str(REPO),
                                       os.environ.get("PYTHONPATH", "")) if p)
    base_env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    meta = {"mode": "dry-run (numpy, tiny sizes)" if args.dry_run else "gpu",
            "backend": "numpy" if args.dry_run else "cupy",
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": args.budget_s, "host": f"{platform.node()} ({os.cpu_count()} CPUs)",
            "python": f"{sys.version.split()[0]} {sys.executable}",
            "gpu": gpu_missing() or "nvidia-smi -L lists one (see env.txt)"}
    steps = plan(args, out, tmp)
    if args.only:
        steps = [s for s in steps if s.name in args.only]
    results: list[Result] = []
    try:
        for step in steps:
            print(f"gpu_check: {step.name} ...", flush=True)
            result = run_step(step, out, deadline, base_env)
            if step.note and step.note not in result.note:
                result.note = "; ".join(n for n in (result.note, step.note) if n)
            results.append(result)
            print(f"gpu_check: {result.name} {result.status} ({result.seconds:.1f} s) "
                  f"{result.note}", flush=True)
            meta["seconds"] = time.monotonic() - t0
            write_report(out, results, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta["seconds"] = time.monotonic() - t0
    meta["finished"] = True
    code = write_report(out, results, meta)
    print(f"gpu_check: wrote {out / REPORT} ({'PASS' if code == 0 else 'FAIL'})", flush=True)
    return code


# --------------------------------------------------------------------------------------------
# Preparing the wheels (on a machine with network)


def wheel_specs() -> list[str]:
    """``name==version`` of this Python's copies (the ones tested here), else pyproject's floor."""
    from importlib import metadata

    specs = []
    for dist in WHEELS:
        try:
            specs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            specs.append(dist + WHEEL_FLOORS[dist])
    return specs


def prepare_wheels(folder: str) -> int:
    dest = Path(folder)
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):  # one version of each: two would stop the install there
        if old.name.split("-")[0].replace("_", "-").lower() in WHEELS:
            old.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--disable-pip-version-check", "-d", str(dest),
           *wheel_specs()]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        print(f"gpu_check: pip download failed (exit {proc.returncode})", file=sys.stderr)
        return 1
    files = sorted(dest.iterdir())
    total = sum(p.stat().st_size for p in files if p.is_file())
    for p in files:
        print(f"  {p.name}  {p.stat().st_size / 1024:.0f} KiB")
    print(f"gpu_check: {len(files)} files, {total / 1024:.0f} KiB in {dest}")
    if total > WHEELS_MAX_BYTES:
        print(f"gpu_check: {dest} holds {total} bytes, over the {WHEELS_MAX_BYTES} allowed",
              file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python tools/gpu_check.py",
        description="The prepared GPU check: environment, cupy test suite, bench against "
        "PyTorch on the GPU, short training runs (NCCL too); one report.")
    p.add_argument("--out", help="folder for gpu-report.md and the raw logs (<= 8 files)")
    p.add_argument("--wheels", default=None,
                   help="folder of array-api-* wheels to install offline when missing")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="seconds for the whole check; each step is cut to what is left")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU needed: the same steps on the numpy backend, tiny sizes")
    p.add_argument("--only", nargs="+", default=None, metavar="STEP",
                   help="run only these steps (names as in the report)")
    p.add_argument("--prepare-wheels", default=None, metavar="DIR",
                   help="download the wheels for --wheels into DIR with pip, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.prepare_wheels:
        return prepare_wheels(args.prepare_wheels)
    if not args.out:
        print("gpu_check: error: --out DIR is required", file=sys.stderr)
        return 2
    if args.budget_s <= RESERVE_S + MIN_STEP_S:
        print(f"gpu_check: error: --budget-s must exceed {RESERVE_S + MIN_STEP_S:.0f}",
              file=sys.stderr)
        return 2
    if not args.dry_run:
        why = gpu_missing()
        if why:
            print(f"gpu_check: refused: {why} (use --dry-run to run the same steps on numpy)",
                  file=sys.stderr)
            return 2
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
