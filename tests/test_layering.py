"""The package's layering contract (pyproject's ``[tool.importlinter]``) holds, and it is not a
test that cannot fail: the same check refuses a copy of the package with one upward import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parent.parent


def _lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """Run import-linter over the ``anycnn`` package found in ``tree`` with the repo's contract."""
    code = ("import sys; from importlinter.cli import lint_imports_command; "
            "sys.exit(lint_imports_command())")
    return subprocess.run([sys.executable, "-c", code, "--config", str(ROOT / "pyproject.toml"),
                           "--no-cache"], cwd=tree, env={"PYTHONPATH": str(tree), "PATH": ""},
                          capture_output=True, text=True, timeout=300)


def _copy_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "anycnn", tmp_path / "anycnn",
                    ignore=shutil.ignore_patterns("__pycache__", "*.gz"))
    return tmp_path


def test_the_layers_contract_is_kept():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("module", "upward"), [
    ("kernels/dispatch.py", "from anycnn.nn import layers"),        # kernels -> nn
    ("nn/module.py", "from anycnn.train import trainer"),           # nn -> train
    ("backend.py", "import anycnn.kernels.fastpath"),               # backend -> kernels
])
def test_an_upward_import_breaks_the_contract(tmp_path, module, upward):
    tree = _copy_package(tmp_path)
    path = tree / "anycnn" / module
    path.write_text(path.read_text() + f"\n{upward}  # an upward import\n")
    result = _lint_imports(tree)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
