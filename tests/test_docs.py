"""The documentation: every code block of README.md and docs/ runs, and the API reference covers
every public name.

Each page is one test: its blocks run in order in one fresh folder (the current directory), the
``python`` blocks in one shared namespace (a later block uses what an earlier one made), the
``bash`` blocks with ``bash -euo pipefail`` and this environment's ``anycnn`` and ``python`` first
on ``PATH``. Two exceptions, both visible on the page:

* a block whose info string has a title starting with ``Not run in CI`` (e.g. ```` ```bash
  title="Not run in CI: needs an NVIDIA GPU" ````) is skipped; the site shows the title above it;
* lines starting with ``pip install`` are left out: the test environment is installed already.

``text`` blocks are output or file trees and are not run; any other language is an error, so no
code block goes untested by accident. The pages run on one backend only (numpy, the nox session
that also has MPI), to keep CI time low; the reference check runs everywhere (it is cheap).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)
SKIP = re.compile(r'title="Not run in CI\b')
RUN = {"python", "bash"}
NOT_CODE = {"text"}


def code_blocks(page: Path) -> list[tuple[int, str, str, str]]:
    """``(line, language, info string, body)`` of each fenced block of ``page``."""
    text = page.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        info = m["info"].strip()
        line = text.count("\n", 0, m.start()) + 1
        out.append((line, info.split(" ")[0], info, textwrap.dedent(m["body"])))
    return out


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_public_name_has_a_docstring_and_a_reference_entry():
    assert _hooks().problems() == []


def test_the_reference_check_finds_a_missing_entry(monkeypatch):
    hooks = _hooks()
    entries = hooks.api_entries()
    monkeypatch.setattr(hooks, "api_entries", lambda: entries - {"anycnn.nn.layers.Conv2D"})
    assert hooks.problems() == [
        "anycnn.nn.layers.Conv2D has no '::: anycnn.nn.layers.Conv2D' entry under docs/api/"]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_code_blocks_have_a_known_language(page):
    for line, lang, _info, _body in code_blocks(page):
        assert lang in RUN | NOT_CODE, f"{page.name}:{line}: block language {lang!r}"


#: shell blocks that already ran to success in this process: the same commands stand on more
#: than one page (README.md and docs/index.md share their quick start), and run once
_SHELL_BLOCKS_RUN: set[str] = set()


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_code_blocks_run(page, tmp_path, monkeypatch):
    if os.environ.get("ANYCNN_BACKEND", "auto") not in ("auto", "numpy"):
        pytest.skip("the documentation's code runs in the numpy session only")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))   # image folders decode here
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "ANYCNN_NUM_THREADS": os.environ.get("ANYCNN_NUM_THREADS", "1")}
    namespace: dict = {"__name__": "__docs__"}
    for line, lang, info, body in code_blocks(page):
        if lang not in RUN or SKIP.search(info):
            continue
        where = f"{page.relative_to(ROOT)}:{line}"
        if lang == "python":
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(body, where, "exec"), namespace)
            continue
        script = "\n".join(s for s in body.splitlines() if not s.lstrip().startswith("pip install"))
        if script in _SHELL_BLOCKS_RUN:
            continue
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, timeout=300,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"{where}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        _SHELL_BLOCKS_RUN.add(script)
