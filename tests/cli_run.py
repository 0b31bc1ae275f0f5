"""Running the command line in-process from tests: :func:`cli`, the :func:`keep_backend`
context every such test needs (a command selects a backend; the test's is put back), and the
:func:`isolated` fixture (a scratch folder and image cache too)."""

from __future__ import annotations

import contextlib

import pytest

from anycnn import backend as backend_module
from anycnn.cli.commands import main


def cli(capsys, *argv) -> tuple[int, str, str]:
    """``anycnn ARGV...`` in this process: ``(exit code, stdout, stderr)`` of that command
    alone (output captured before it is discarded)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@contextlib.contextmanager
def keep_backend():
    """Put the current backend back afterwards (the commands select their own)."""
    saved = backend_module._current
    try:
        yield
    finally:
        backend_module._current = saved


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A scratch working folder and image cache, the backend put back afterwards: import it
    into a test module (``from .cli_run import isolated``) to use it there for every test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with keep_backend():
        yield
