"""``anycnn bench --workers``: data-parallel step times over MPI ranks.

The real run starts ``mpiexec`` jobs as subprocesses (under a timeout: a hang is a failure) and
is skipped when mpi4py or mpiexec is missing; the error and validation tests need no MPI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from anycnn.cli import bench
from anycnn.cli.commands import main
from anycnn.errors import ConfigError, DistributedError

ROOT = Path(__file__).resolve().parents[1]
_LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "MV2_", "HYDRA_", "MPIR_", "SLURM_")


def _mpiexec_or_skip() -> str:
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install 'anycnn[mpi]')")
    from anycnn.dist import find_mpiexec

    try:
        return find_mpiexec()
    except DistributedError as exc:
        pytest.skip(str(exc))


def test_real_run_on_one_and_two_ranks(tmp_path):
    _mpiexec_or_skip()
    out = tmp_path / "workers.json"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_LAUNCHER_PREFIXES) and k != "ANYCNN_DIST"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-m", "anycnn", "bench", "--backend", "numpy",
                          "--workers", "1", "2", "--model", "lenet5", "--batch-sizes", "16",
                          "--steps", "2", "--warmup", "1", "--rounds", "1", "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    table = [line for line in run.stdout.splitlines() if re.match(r"\| 16 \| \d \|", line)]
    assert [line.split("|")[2].strip() for line in table] == ["1", "2"]
    results = json.loads(out.read_text())
    assert results["mode"] == "workers" and results["workers"] == [1, 2]
    rows = results["rows"]
    assert [(r["batch"], r["ranks"]) for r in rows] == [(16, 1), (16, 2)]
    for r in rows:
        assert r["path"] == "parallel_step" and r["communicator"] == "mpi"
        for key in ("step_ms", "images_per_s", "speedup", "efficiency", "allreduce_ms",
                    "buffer_mb"):
            assert r[key] > 0, (key, r)
        assert 0 <= r["allreduce_share"] <= 1
        assert r["allreduce_ms_min_rank"] <= r["allreduce_ms"] <= r["allreduce_ms_max_rank"]
        assert sum(r["share_per_rank"]) == 16 and len(r["threads_per_rank"]) == r["ranks"]
        assert f"-n {r['ranks']} " in r["command"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["train_step_ms"] > 0
    # lenet5: 61,706 parameters + the 4 trailer numbers, float32
    assert rows[0]["buffer_mb"] == rows[1]["buffer_mb"] == pytest.approx(61710 * 4 / 1e6)


def _no_mpiexec(monkeypatch, tmp_path):
    """Nothing beside a fake sys.executable, nothing on PATH."""
    (tmp_path / "bin").mkdir()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))


def _bench(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["bench", "--backend", "numpy", "--model", "lenet5", "--batch-sizes", "16",
                 *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_missing_mpiexec_is_one_line_with_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "mpi4py" else None)
    _no_mpiexec(monkeypatch, tmp_path)
    code, out, err = _bench(capsys, "--workers", "2")
    assert code == 2 and "|" not in out
    assert len(err.strip().splitlines()) == 1
    assert "no mpiexec found" in err and "pip install 'anycnn[mpi]'" in err


def test_missing_mpi4py_is_one_line_with_the_install_command(monkeypatch, capsys):
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name, *a: None)
    code, _, err = _bench(capsys, "--workers", "2")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "mpi4py is not installed" in err and "pip install 'anycnn[mpi]'" in err


def test_compare_torch_outside_a_checkout_is_one_line(monkeypatch, capsys):
    """PyTorch's worker is tools/bench_torch.py of a checkout: a wheel without it says so."""
    monkeypatch.setattr(bench, "TORCH_WORKER", ("tools", "no-such-worker.py"))
    code, out, err = _bench(capsys, "--compare-torch")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "run it from a repository checkout" in err and "tools/no-such-worker.py" in err


def test_worker_counts():
    assert bench.worker_counts([3]) == [1, 2, 3]
    assert bench.worker_counts([1]) == [1]
    assert bench.worker_counts([1, 2]) == [1, 2]
    assert bench.worker_counts([4, 2]) == [1, 2, 4]  # the 1-rank baseline is always there
    assert bench.worker_counts([2, 2]) == [1, 2]
    for bad in ([0], [2, -1], [True]):
        with pytest.raises(ConfigError, match="positive rank counts"):
            bench.worker_counts(bad)


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "positive rank counts"),
    (["--workers", "2", "--compare-torch"], "drop --compare-torch"),
    (["--workers", "2", "--script"], "drop --script"),
    (["--workers", "2", "--gemm"], "drop --gemm"),
    (["--workers", "32"], r"global batch sizes \[16\] are smaller than 32 ranks"),
    (["--workers", "2", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["--workers", "2", "--model", "no-such-model"], "no-such-model"),
])
def test_argument_validation(argv, message, monkeypatch, tmp_path, capsys):
    _no_mpiexec(monkeypatch, tmp_path)  # validation comes before looking for MPI
    code, _, err = _bench(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert "mpiexec" not in err


def test_workers_needs_a_count(capsys):
    assert main(["bench", "--workers"]) == 2
    assert "--workers: expected at least one argument" in capsys.readouterr().err
