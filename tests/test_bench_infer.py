"""``anycnn bench --infer``: eval-mode forwards beside onnxruntime and PyTorch (tiny sizes, no
timing assertions: speed is BENCHMARKS.md's)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from anycnn.cli import bench, bench_infer
from anycnn.cli.commands import main

ROOT = Path(__file__).resolve().parents[1]


def _installed(*names: str) -> bool:
    return all(importlib.util.find_spec(n) is not None for n in names)


@pytest.mark.numpy_only  # --backend numpy, in a subprocess: the same run in every session
def test_real_run_reports_every_installed_baseline(tmp_path):
    out = tmp_path / "infer.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-m", "anycnn", "bench", "--backend", "numpy",
                          "--infer", "--model", "lenet5", "--batch-sizes", "2", "--steps", "1",
                          "--warmup", "0", "--rounds", "1", "--threads", "1", "--json",
                          str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert re.search(r"^\| batch \| anycnn ms \| img/s", run.stdout, re.M), run.stdout
    results = json.loads(out.read_text())
    assert results["mode"] == "infer" and results["threads"] == 1
    expected = ["anycnn"]
    if _installed("onnx", "onnxruntime"):
        expected.append("onnxruntime")
    if _installed("torch"):
        expected += ["torch", "torch-cl"]
    assert results["frameworks"] == expected
    row, = results["rows"]
    assert row["batch"] == 2 and row["anycnn"]["infer"] > 0
    for worker in expected[1:]:
        assert row[worker]["infer"] > 0 and row[f"ratio_vs_{worker}"] > 0
        assert f"| {worker} ms |" in run.stdout
    if "onnxruntime" in expected:  # the exported graph computes the same logits
        assert row["onnxruntime"]["max_abs_diff"] < 1e-4
        assert "onnxruntime logits vs anycnn's" in run.stdout


def test_missing_baselines_are_left_out_with_a_note(monkeypatch):
    monkeypatch.setattr(bench_infer.importlib.util, "find_spec", lambda name, *a: None)
    workers, notes = bench_infer.baselines("float32", gpu=False)
    assert workers == ["anycnn"]
    assert any("onnx and onnxruntime not installed" in n and "anycnn[onnx]" in n
               for n in notes)
    assert any("torch is not installed" in n for n in notes)


def test_onnxruntime_is_left_out_for_float64_and_gpus(monkeypatch):
    monkeypatch.setattr(bench_infer.importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(bench, "TORCH_WORKER", ("tools", "no-such-worker.py"))
    for dtype, gpu, why in (("float64", False, "float32, not float64"),
                            ("float32", True, "on a GPU")):
        workers, notes = bench_infer.baselines(dtype, gpu)
        assert workers == ["anycnn"]
        assert any(why in n for n in notes), notes
        assert any("tools/no-such-worker.py" in n for n in notes), notes


def test_table_lists_the_notes():
    results = {"frameworks": ["anycnn", "onnxruntime"], "notes": ["PyTorch: skipped, why"],
               "rows": [{"batch": 4, "anycnn": {"infer": 2.0, "images_per_s": 2000.0},
                         "onnxruntime": {"infer": 4.0, "max_abs_diff": 3e-6},
                         "ratio_vs_onnxruntime": 0.5}]}
    table = bench_infer.format_infer_table(results)
    assert "| 4 | 2.00 | 2000 | 4.00 | 0.50x |" in table
    assert "max |difference| 3.0e-06" in table and "PyTorch: skipped, why" in table


@pytest.mark.parametrize("argv, message", [
    (["--infer", "--script"], "drop --script"),
    (["--infer", "--gemm"], "drop --gemm"),
    (["--infer", "--workers", "2"], "drop --infer"),
])
def test_infer_refuses_what_it_does_not_time(argv, message, capsys):
    code = main(["bench", "--backend", "numpy", "--model", "lenet5", "--batch-sizes", "2",
                 *argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert message in err and "Traceback" not in err
