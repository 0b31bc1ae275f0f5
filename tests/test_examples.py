"""Every script in examples/ runs (in a subprocess, with small arguments) and says what it shows."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

#: every example is an end-to-end subprocess run: in the numpy session only (noxfile.py)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

#: quick arguments per script (the defaults are for people; these keep the suite fast)
QUICK_ARGS = {
    "train_mnist.py": ["--epochs", "1", "--limit", "512"],
    "backend_swap.py": ["--steps", "3"],
    "custom_model.py": ["--epochs", "1", "--limit", "256"],
    "custom_layer.py": ["--epochs", "1", "--limit", "256"],
    "pytorch_interop.py": ["--limit", "256"],
    "resnet.py": ["--epochs", "1", "--limit", "256"],
    "depthwise_separable.py": ["--epochs", "1", "--limit", "256"],
    "unet.py": ["--epochs", "1", "--limit", "1024"],
    "allreduce_cost.py": ["--models", "lenet5", "--calls", "3", "--warmup", "1"],
    "jax_compile.py": ["--batch", "8", "--steps", "2", "--rounds", "1"],
    "data_parallel.py": ["--epochs", "1", "--limit", "256"],
    "onnx_export.py": ["--models", "lenet5", "resnet-mini", "--batch-sizes", "2",
                       "--repeats", "1"],
    "augment_cost.py": ["--batches", "5", "--steps", "2", "--rounds", "1", "--dataset",
                        "mnist-sample"],
    "resized_crop_cost.py": ["--batch", "4", "--size", "40", "--crop", "24", "--rounds", "1"],
}


#: backends an example may need that anycnn does not install (see backends/*.txt)
OPTIONAL = {"torch": "backends/torch.txt", "array_api_strict": "backends/array_api_strict.txt",
            "cupy": "backends/cupy.txt"}


def run_example(name: str, tmp_path: Path, *args: str,
                hide: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``examples/name`` with its quick arguments; the modules in ``hide`` fail to import
    there, as if they were not installed (shadowed by stubs first on ``PYTHONPATH``)."""
    stubs = tmp_path / "not-installed"
    stubs.mkdir(exist_ok=True)
    for module in hide:
        message = f"No module named {module!r}"
        (stubs / f"{module}.py").write_text(
            f"raise ModuleNotFoundError({message!r}, name={module!r})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(stubs) if hide else "", str(ROOT), os.environ.get("PYTHONPATH")) if p)}
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


def test_custom_layer(tmp_path):
    out = run_example("custom_layer.py", tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [["input", "ok"], ["scale", "ok"]]
    assert lines[2].startswith("caught: gradient of 'input' of Broken differs from finite "
                               "differences: at index ")
    assert any(line.split()[:2] == ["1", "(Scale)"] and line.split()[-2:] == ["8", "0"]
               for line in lines), out.stdout
    assert lines[-1].startswith("val accuracy ") and "learned scale [" in lines[-1]


def test_resnet(tmp_path):
    out = run_example("resnet.py", tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "3 residual blocks, 77754 weights"
    assert lines[1] == ("shortcut tensors: ['5.shortcut.0.weight', '5.shortcut.1.weight', "
                        "'5.shortcut.1.bias']")
    assert lines[2].startswith("epoch 1: train loss ") and "predicted:" in lines[3]
    assert lines[4].startswith("validation accuracy 0.")


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_pytorch_interop(tmp_path):
    out = run_example("pytorch_interop.py", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "logits match again" in out.stdout


def test_pytorch_interop_without_torch(tmp_path):
    """With torch missing, the example says how to install it in one line and exits 0."""
    out = run_example("pytorch_interop.py", tmp_path, hide=("torch",))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stdout.splitlines() == [
        "torch is not installed; skipping. Install it with: pip install -r backends/torch.txt"]


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None
                    or importlib.util.find_spec("onnx") is None,
                    reason="onnx/onnxruntime not installed")
def test_onnx_export(tmp_path):
    out = run_example("onnx_export.py", tmp_path)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[2:]]
    assert [row[:2] for row in rows] == [["lenet5", "2"], ["resnet-mini", "2"]]
    assert all(float(row[-1]) < 1e-4 for row in rows)


def test_onnx_export_without_onnx(tmp_path):
    out = run_example("onnx_export.py", tmp_path, hide=("onnx", "onnxruntime"))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stdout.splitlines() == [
        "onnx or onnxruntime is not installed; skipping. Install them with: "
        "pip install 'anycnn[onnx]'"]


def test_backend_swap_without_torch_compares_the_others(tmp_path):
    out = run_example("backend_swap.py", tmp_path, hide=("torch",))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    skipped = [line for line in out.stdout.splitlines() if line.startswith("skipping")]
    assert len(skipped) == 1 and "skipping torch: " in skipped[0]
    assert "pip install -r backends/torch.txt" in skipped[0]
    assert "bit-identical on numpy, array_api_strict\n" in out.stdout


def test_backend_swap_with_nothing_to_compare_exits_0(tmp_path):
    out = run_example("backend_swap.py", tmp_path, hide=("torch", "array_api_strict"))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout
    for line, name in zip(lines, ["array_api_strict", "torch"]):
        assert line.startswith(f"skipping {name}: ") and f"pip install -r {OPTIONAL[name]}" in line


def test_unet(tmp_path):
    out = run_example("unet.py", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Concat" in out.stdout and "Upsample2D" in out.stdout  # the summary table
    noisy, denoised = map(float, re.findall(r"noisy input (\S+), denoised (\S+)",
                                            out.stdout)[0])
    assert denoised < 0.75 * noisy, out.stdout


def test_augment_cost(tmp_path):
    out = run_example("augment_cost.py", tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "mnist-sample, batch 64, medians of 1 rounds (ms per batch):"
    assert [line.split()[0] for line in lines[1:4]] == ["plain", "crop2+flip", "crop2+flip+norm"]
    assert lines[4].startswith("  simple-cnn training step ")


def test_depthwise_separable(tmp_path):
    out = run_example("depthwise_separable.py", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "depthwise weight (3, 3, 1, 32): 288 numbers" in out.stdout
    assert "epoch 1: train loss" in out.stdout and "val acc" in out.stdout


@pytest.mark.parametrize("name", ["train_mnist.py", "custom_model.py", "custom_layer.py",
                                  "resnet.py", "depthwise_separable.py", "unet.py",
                                  "augment_cost.py", "onnx_export.py"])
def test_other_examples_need_no_optional_backend(name):
    """Only backend_swap.py and pytorch_interop.py (tested above with the package missing) may
    use an optional backend: the others neither import one nor ask for one by name."""
    tree = ast.parse((EXAMPLES / name).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import | ast.ImportFrom)
                for alias in (node.names if isinstance(node, ast.Import) else
                              [ast.alias(node.module or "")])}
    named = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)}
    assert not (imported | named) & set(OPTIONAL), name


def test_resized_crop_cost(tmp_path):
    out = run_example("resized_crop_cost.py", tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["matrices", "gather"]
    assert "per batch of 4, 40 -> 24" in lines[0]
    assert lines[2].startswith("largest difference ") and float(lines[2].split()[-1]) < 1e-5
