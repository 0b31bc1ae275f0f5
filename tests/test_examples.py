"""Every script in examples/ runs (in a subprocess, with small arguments) and says what it shows."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

#: quick arguments per script (the defaults are for people; these keep the suite fast)
QUICK_ARGS = {
    "train_mnist.py": ["--epochs", "1", "--limit", "512"],
    "backend_swap.py": ["--steps", "3"],
    "custom_model.py": ["--epochs", "1", "--limit", "256"],
    "pytorch_interop.py": ["--limit", "256"],
}


def run_example(name: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, str(EXAMPLES / name), *QUICK_ARGS[name], *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_every_example_is_covered_and_documented():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == sorted(QUICK_ARGS)
    for name in scripts:
        source = (EXAMPLES / name).read_text()
        doc = ast.get_docstring(ast.parse(source))
        assert doc and "Run:" in doc and f"examples/{name}" in doc, name
        assert len(source.splitlines()) <= 60, f"{name} is longer than 60 lines"


def test_train_mnist(tmp_path):
    out = run_example("train_mnist.py", tmp_path, "--out", "run")
    assert out.returncode == 0, out.stderr
    assert "epoch 1: train loss" in out.stdout
    assert "reloaded" in out.stdout and "predicted:" in out.stdout
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file()


def test_backend_swap(tmp_path):
    out = run_example("backend_swap.py", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "bit-identical on numpy, array_api_strict" in out.stdout
    rows = [line.split() for line in out.stdout.splitlines() if line[:4].strip().isdigit()]
    assert len(rows) == 3


def test_custom_model(tmp_path):
    out = run_example("custom_model.py", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "train mode, two forward passes equal? False" in out.stdout
    assert "eval mode,  two forward passes equal? True" in out.stdout


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_pytorch_interop(tmp_path):
    out = run_example("pytorch_interop.py", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "logits match again" in out.stdout


def test_pytorch_interop_without_torch(tmp_path):
    """With torch blocked, the example explains itself and exits 0."""
    (tmp_path / "torch.py").write_text("raise ImportError('torch blocked for this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    out = subprocess.run([sys.executable, str(EXAMPLES / "pytorch_interop.py")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "torch is not installed" in out.stdout
