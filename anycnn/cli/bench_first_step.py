"""``anycnn bench --first-step``: a new process's first training step, against a warm step.

For each batch size and round, two fresh worker processes train the model for
``--steps`` steps: the first with an empty compiled-kernel cache (a new machine: every kernel is
compiled), the second with the cache the first left (every later process). Each reports its
first step (forward, backward, optimizer step: where kernels are compiled or loaded) and the
median of its later steps. The table gives the medians over the rounds and the ratio of the
warm-cache first step to a warm step, which the compiled-kernel cache keeps near 1, and the
minor page faults of the cached process's first step against a warm step's: the first step
is where the operating system maps (and zeroes) the step's working memory, page by page, for
the first time; later steps reuse the memory the allocator kept. It also counts the
compiled-kernel libraries each process had mapped after its first step: the cached process
opens Halide's runtime and the bundle the first process linked as it exited
(:mod:`~anycnn.kernels.kernel_bundle`), not one library per kernel.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .bench import TrainingStep, _report, _run_worker, rss_mib, time_steps


def minor_faults() -> int:
    """This process's minor page faults so far (0 where the platform does not count them)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def kernel_libraries() -> int | None:
    """How many shared libraries of the compiled-kernel cache this process has mapped (Halide's
    runtime, kernels, bundles); None where ``/proc/self/maps`` cannot be read."""
    from ..kernels import kernel_cache

    root = kernel_cache.cache_root()
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    if root is None:
        return 0
    prefix = os.path.join(os.path.realpath(root), "")
    return len({line.split(maxsplit=5)[-1] for line in maps.splitlines()
                if line.endswith(".so") and line.split(maxsplit=5)[-1].startswith(prefix)})


def first_step_worker(cfg: dict) -> dict:
    """Worker side: the first step's and the later steps' milliseconds and minor page faults
    (the later steps': medians), the kernel libraries mapped by then, whether Halide was
    imported, and the peak resident set (MiB)."""
    bench = TrainingStep(cfg)
    faults = minor_faults()
    start = time.perf_counter()
    bench.step()
    bench.sync()
    first = (time.perf_counter() - start) * 1e3
    first_faults = minor_faults() - faults
    libraries = kernel_libraries()
    later, later_faults = [], []
    for _ in range(cfg["steps"]):
        faults = minor_faults()
        later += time_steps(bench.step, bench.sync, 0, 1)
        later_faults.append(minor_faults() - faults)
    return {"first_ms": first, "warm_ms": statistics.median(later),
            "first_faults": first_faults, "warm_faults": statistics.median(later_faults),
            "libraries": libraries, "halide_imported": "halide" in sys.modules,
            "peak_mib": rss_mib("VmHWM")}


def run_first_step(args: argparse.Namespace) -> int:
    """Driver side of ``--first-step`` (the backend is already selected)."""
    from ..backend import get_backend

    backend = get_backend()
    results: dict[str, Any] = {"model": args.model, "backend": backend.name,
                               "threads": args.threads, "dtype": args.dtype, "rows": []}
    print(f"anycnn bench --first-step: {args.model}, backend {backend.name}, "
          f"{args.threads} threads, {args.rounds} rounds", flush=True)
    for batch in args.batch_sizes:
        runs: dict[str, list[dict]] = {"cold": [], "warm": []}
        for _ in range(args.rounds):
            cfg = {"kind": "first-step", "model": args.model, "batch": batch,
                   "dtype": args.dtype, "steps": args.steps, "gpu": False}
            with tempfile.TemporaryDirectory() as cache:
                for kind in ("cold", "warm"):
                    runs[kind].append(_run_worker(cfg, args.threads,
                                                  ANYCNN_KERNEL_CACHE=cache,
                                                  ANYCNN_BACKEND=backend.name))
        row = {"batch": batch}
        for kind, outs in runs.items():
            row[kind] = {key: statistics.median(o[key] for o in outs)
                         for key in ("first_ms", "warm_ms", "peak_mib", "first_faults",
                                     "warm_faults")}
            row[kind]["halide_imported"] = any(o["halide_imported"] for o in outs)
            row[kind]["libraries"] = outs[-1]["libraries"]
        row["warm_first_over_step"] = row["warm"]["first_ms"] / row["warm"]["warm_ms"]
        results["rows"].append(row)
    return _report(format_first_step_table(results), results, args.json)


def format_first_step_table(results: dict) -> str:
    """A Markdown table of :func:`run_first_step`'s results."""
    head = ["batch", "first step, empty cache ms", "first step, cached ms", "warm step ms",
            "cached first / warm", "page faults cached first / warm",
            "peak MiB empty / cached", "kernel libraries empty / cached",
            "Halide imported when cached"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in results["rows"]:
        cold, warm = row["cold"], row["warm"]
        lines.append("| " + " | ".join([
            str(row["batch"]), f"{cold['first_ms']:.0f}", f"{warm['first_ms']:.0f}",
            f"{warm['warm_ms']:.1f}", f"{row['warm_first_over_step']:.2f}x",
            f"{warm['first_faults']:.0f} / {warm['warm_faults']:.0f}",
            f"{cold['peak_mib']:.0f} / {warm['peak_mib']:.0f}",
            f"{_count(cold['libraries'])} / {_count(warm['libraries'])}",
            "yes" if warm["halide_imported"] else "no"]) + " |")
    return "\n".join(lines)


def _count(value: int | None) -> str:
    return "n/a" if value is None else str(value)
