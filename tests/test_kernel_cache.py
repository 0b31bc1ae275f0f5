"""The on-disk cache of compiled kernels (``anycnn.kernels.kernel_cache``): a second process
loads what the first compiled without importing Halide and computes the same bits; a corrupt or
partial entry is compiled again, never loaded; entries are keyed by the kernel's arguments and
the kernel modules' source; without a C compiler (or with ``ANYCNN_KERNEL_CACHE=0``) kernels
are compiled in memory, as before; a Halide error is an exception, not an abort."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from anycnn.kernels import kernel_bundle, kernel_cache

pytestmark = pytest.mark.skipif(importlib.util.find_spec("halide") is None or
                                kernel_cache._compiler() is None,
                                reason="needs halide and a C compiler")

# a residual block of 16 channels: convolutions (forward, both gradients), BatchNorm's passes
STEP = r"""
import hashlib, sys
import numpy as np
import anycnn
from anycnn import nn

rng = np.random.default_rng(0)
body = nn.Sequential(nn.Conv2D(16, 16, 3, padding=1, bias=False), nn.BatchNorm2D(16), nn.ReLU(),
                     nn.Conv2D(16, 16, 3, padding=1, bias=False), nn.BatchNorm2D(16))
model = nn.Sequential(nn.Residual(body), nn.ReLU())
x = rng.standard_normal((4, 8, 8, 16)).astype(np.float32)
y = model(x)
dx = model.backward(np.ones_like(y))
digest = hashlib.sha256()
for a in (y, dx, *[p.grad for p in model.parameters()]):
    digest.update(np.ascontiguousarray(a).tobytes())
print(digest.hexdigest(), "halide" in sys.modules)
"""


def _step(cache, **env) -> tuple[str, bool]:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("ANYCNN_NATIVE", "ANYCNN_FASTPATH", "ANYCNN_BACKEND")}
    environ.update({"ANYCNN_KERNEL_CACHE": str(cache), "ANYCNN_BACKEND": "numpy", **env})
    out = subprocess.run([sys.executable, "-c", STEP], capture_output=True, text=True,
                         env=environ, timeout=300)
    assert out.returncode == 0, out.stderr
    digest, imported = out.stdout.split()
    return digest, imported == "True"


def _entries(cache) -> list:
    return sorted(p for p in cache.glob("*/*.so")
                  if p.name != "runtime.so" and not p.name.startswith("bundle-"))


def _bundle(cache) -> dict:
    (record,) = cache.glob(f"*/{kernel_bundle.RECORD}")
    return json.loads(record.read_text())


def test_a_second_process_loads_the_kernels_without_halide(tmp_path):
    first, compiled = _step(tmp_path)
    assert compiled and _entries(tmp_path), "the first process compiled and kept its kernels"
    second, imported = _step(tmp_path)
    assert not imported, "a process whose kernels are all cached never imports Halide"
    assert second == first
    in_memory, _ = _step(tmp_path / "unused", ANYCNN_KERNEL_CACHE="0")
    assert in_memory == first and not (tmp_path / "unused").exists()
    assert _step(tmp_path, ANYCNN_NATIVE="0")[0] != first  # the digest sees the kernels' bits


def test_a_corrupt_or_partial_entry_is_compiled_again(tmp_path):
    first, _ = _step(tmp_path)
    libraries = _entries(tmp_path)
    libraries[0].write_bytes(b"not a library")                  # corrupt
    libraries[1].with_suffix(".json").write_text("{\"key\": ")   # a torn record
    libraries[2].with_suffix(".json").unlink()                   # never finished
    (libraries[3].parent / "runtime.so").write_bytes(b"\0" * 64)
    bundle = libraries[0].parent / _bundle(tmp_path)["library"]
    bundle.write_bytes(bundle.read_bytes()[:1000])                # a torn bundle
    again, recompiled = _step(tmp_path)
    assert recompiled and again == first
    for library in libraries[:3]:
        record = json.loads(library.with_suffix(".json").read_text())
        assert record["sha256"] == kernel_cache._sha256(library)
    record = _bundle(tmp_path)  # linked again at the exit of the process that loaded one by one
    assert record["sha256"] == kernel_cache._sha256(libraries[0].parent / record["library"])
    assert not _step(tmp_path)[1]


def test_a_copied_cache_is_hashed_once_then_trusted(tmp_path):
    """A copied library (new inode and change time) is checked against its recorded SHA-256
    once and its record refreshed; later processes load it without reading it."""
    import shutil

    first, _ = _step(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copies = _entries(tmp_path / "b")
    stale = [json.loads(p.with_suffix(".json").read_text())["file"] for p in copies]
    assert all(record != kernel_cache._identity(p) for record, p in zip(stale, copies))
    again, recompiled = _step(tmp_path / "b")  # its kernels come from the copied bundle
    assert again == first and not recompiled
    record = _bundle(tmp_path / "b")
    assert record["file"] == kernel_cache._identity(copies[0].parent / record["library"])
    (copies[0].parent / kernel_bundle.RECORD).unlink()  # now from the entries, one by one
    again, recompiled = _step(tmp_path / "b")
    assert again == first and not recompiled
    for library in copies:
        record = json.loads(library.with_suffix(".json").read_text())
        assert record["file"] == kernel_cache._identity(library)
        assert record["sha256"] == kernel_cache._sha256(library)


def test_a_library_is_loaded_without_hashing_only_while_its_file_is_untouched(
        monkeypatch, tmp_path):
    monkeypatch.setenv("ANYCNN_KERNEL_CACHE", str(tmp_path))
    scale = kernel_cache.pipeline(_scale_builder)
    scale(4)
    directory = kernel_cache.cache_dir()
    (library,) = directory.glob("scale_builder-*.so")
    record = library.with_suffix(".json")
    stem, key = library.stem, f"{__name__}._scale_builder(4,)"
    meta = json.loads(record.read_bytes())
    hashed = []
    monkeypatch.setattr(kernel_cache, "_sha256", lambda path: hashed.append(path) or "x")
    assert kernel_cache._load(directory, stem, key) is not None and not hashed
    assert kernel_cache._library_matches(library, dict(meta))
    # the same bytes rewritten in place, its modification time set back: the change time moved
    stat, data = library.stat(), library.read_bytes()
    for _ in range(200):  # file times are coarse (a clock tick): rewrite until ctime moves
        # overwritten, not truncated: this process has the library mapped, and truncating a
        # mapped library discards the loader's relocated pages (a segfault at exit)
        with open(library, "r+b") as f:
            f.write(data)
        os.utime(library, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        if library.stat().st_ctime_ns != stat.st_ctime_ns:
            break
        time.sleep(0.005)
    assert kernel_cache._identity(library)[:3] == meta["file"][:3]
    assert kernel_cache._load(directory, stem, key) is None and hashed  # hash "x" differs


MAPPED = STEP + r"""
import os
from pathlib import Path
cache = os.path.join(os.path.realpath(os.environ["ANYCNN_KERNEL_CACHE"]), "")
mapped = {line.split()[-1] for line in open("/proc/self/maps") if line.rstrip().endswith(".so")}
names = [Path(m).name for m in mapped if m.startswith(cache)]
print(sum(n.startswith("bundle-") for n in names),
      sum("pipeline-" in n or "builder-" in n for n in names), file=sys.stderr)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_second_process_opens_one_bundle_of_its_kernels(tmp_path):
    _step(tmp_path)
    record = _bundle(tmp_path)
    entries = _entries(tmp_path)
    assert len(record["entries"]) == len(entries) >= kernel_bundle.BUNDLE_AFTER
    assert {e["stem"] for e in record["entries"].values()} == {p.stem for p in entries}
    environ = {k: v for k, v in os.environ.items()
               if k not in ("ANYCNN_NATIVE", "ANYCNN_FASTPATH", "ANYCNN_BACKEND")}
    environ.update({"ANYCNN_KERNEL_CACHE": str(tmp_path), "ANYCNN_BACKEND": "numpy"})
    out = subprocess.run([sys.executable, "-c", MAPPED], capture_output=True, text=True,
                         env=environ, timeout=300)
    assert out.returncode == 0, out.stderr
    bundles, single = map(int, out.stderr.split()[-2:])
    assert (bundles, single) == (1, 0), "one library for all the kernels"
    assert _bundle(tmp_path) == record, "a process served by the bundle leaves it alone"


def test_a_bundle_links_only_checked_objects_of_its_source(monkeypatch, tmp_path):
    monkeypatch.setenv("ANYCNN_KERNEL_CACHE", str(tmp_path))
    scale = kernel_cache.pipeline(_scale_builder)
    for width in (2, 4, 8):
        scale(width)
    directory = kernel_cache.cache_dir()
    state = kernel_bundle._state(directory)
    assert len(state.used) == 3 and state.outside == 3
    objects = sorted(directory.glob("scale_builder-*.o"))
    objects[0].write_bytes(objects[0].read_bytes()[:100])  # a torn object file
    library = kernel_bundle.build(state)
    record = _bundle(tmp_path)
    assert library.name == record["library"] and len(record["entries"]) == 2
    assert objects[0].stem not in {e["stem"] for e in record["entries"].values()}
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = np.empty_like(x)
    fresh = kernel_bundle._Directory(directory)  # as a later process reads it
    key, entry = next(iter(record["entries"].items()))
    builder = key.split("(", 1)[0]
    monkeypatch.setitem(kernel_bundle._directories, directory, fresh)
    kernel_bundle.lookup(directory, builder, key).run({"a": x}, {"k": 3}, [out])
    np.testing.assert_array_equal(out, x * 3)
    assert fresh.library is not None
    # a record naming another key's function for this key is not believed
    other = next(e for k, e in record["entries"].items() if k != key)
    monkeypatch.setitem(fresh.record["entries"], key, other)
    assert kernel_bundle.lookup(directory, builder, key) is None
    monkeypatch.setitem(fresh.record["entries"], key, entry)
    scale(16)  # a kernel the bundle lacks: noted in `fresh`, as in a later process
    assert fresh.outside == 1 and fresh.previous == library.name
    again = kernel_bundle.build(fresh)
    assert len(_bundle(tmp_path)["entries"]) == 3 and again.exists()
    assert not library.exists(), "the bundle it replaced is removed"
    monkeypatch.setattr(kernel_cache, "_source_digest", lambda: "edited")
    assert kernel_bundle._Directory(directory).record is None  # kernels of other source


def test_loading_the_cache_module_spares_what_only_compiling_needs():
    """A script's first kernel imports the cache module inside its first step:
    importlib.metadata (about 10 ms) and subprocess are imported only to compile or link."""
    code = ("import sys, anycnn; before = set(sys.modules); "
            "import anycnn.kernels.kernel_cache; print(*sorted(set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    added = set(out.stdout.split())
    assert "anycnn.kernels.kernel_cache" in added
    assert not added & {"importlib.metadata", "subprocess"}


def test_entries_are_keyed_by_arguments_source_cpu_and_halide(monkeypatch, tmp_path):
    monkeypatch.setenv("ANYCNN_KERNEL_CACHE", str(tmp_path))
    name = "anycnn.kernels.native._forward_pipeline"
    a = kernel_cache.entry_name(name, (np.dtype(np.float32), 1))
    assert a == kernel_cache.entry_name(name, (np.dtype(np.float32), 1))
    assert a != kernel_cache.entry_name(name, (np.dtype(np.float64), 1))
    monkeypatch.setattr(kernel_cache, "_source_digest", lambda: "edited")
    assert a != kernel_cache.entry_name(name, (np.dtype(np.float32), 1))
    directory = kernel_cache.cache_dir()
    assert directory.parent == tmp_path
    assert kernel_cache._halide_version() in directory.name
    assert kernel_cache._cpu_fingerprint() in directory.name
    monkeypatch.setenv("ANYCNN_KERNEL_CACHE", "0")
    assert kernel_cache.cache_dir() is None and not kernel_cache.ahead_of_time()
    assert "ANYCNN_KERNEL_CACHE=0" in kernel_cache.describe()


def test_without_a_c_compiler_kernels_compile_in_memory(monkeypatch, tmp_path):
    monkeypatch.setenv("ANYCNN_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(kernel_cache, "_compiler", lambda: None)
    assert not kernel_cache.ahead_of_time() and "no C compiler" in kernel_cache.describe()
    scale = kernel_cache.pipeline(_scale_builder)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = np.empty_like(x)
    scale(4).run({"a": x}, {"k": 3}, [out])
    np.testing.assert_array_equal(out, x * 3)
    assert not list(tmp_path.glob("*/*.so"))


def _scale_builder(width: int):
    """out[x, y] = a[x, y] * k, vectorised by ``width`` (a tiny pipeline for these tests)."""
    import halide as hl

    a, k = hl.ImageParam(hl.Float(32), 2, "a"), hl.Param(hl.Int(32), "k")
    x, y = hl.Var("x"), hl.Var("y")
    out = hl.Func("out")
    out[x, y] = a[x, y] * hl.cast(hl.Float(32), k)
    out.vectorize(x, width, hl.TailStrategy.GuardWithIf)
    return out, {"a": a}, {"k": k}


def test_a_kernel_error_is_an_exception_not_an_abort(monkeypatch, tmp_path):
    monkeypatch.setenv("ANYCNN_KERNEL_CACHE", str(tmp_path))
    scale = kernel_cache.pipeline(_scale_builder)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = np.empty_like(x)
    scale(4).run({"a": x}, {"k": 2}, [out])
    np.testing.assert_array_equal(out, x * 2)
    assert list(tmp_path.glob("*/scale_builder-*.so"))
    with pytest.raises(RuntimeError, match=r"scale_builder.*failed"):
        scale(4).run({"a": x[:, :2]}, {"k": 2}, [out])  # the input smaller than the output


def test_an_unwritable_cache_compiles_in_memory_with_one_warning(monkeypatch, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache's folder should be")
    monkeypatch.setenv("ANYCNN_KERNEL_CACHE", str(blocked))
    monkeypatch.setattr(kernel_cache, "_not_kept", None)
    scale = kernel_cache.pipeline(_scale_builder)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = np.empty_like(x)
    with pytest.warns(RuntimeWarning, match="not kept on disk"):
        scale(4).run({"a": x}, {"k": 5}, [out])
    np.testing.assert_array_equal(out, x * 5)
    assert not kernel_cache.ahead_of_time() and "unusable" in kernel_cache.describe()


def test_the_halide_version_is_read_from_its_dist_info_folder(monkeypatch, tmp_path):
    """The version comes from the one ``halide-VERSION.dist-info`` folder beside the package
    (no search of every path entry); importlib.metadata answers where that is ambiguous."""
    import importlib.metadata

    for name in ("halide-21.0.0.dist-info", "Halide_Extra-3.dist-info", "halide-x.egg-info",
                 "halide"):
        (tmp_path / name).mkdir()
    assert kernel_cache._dist_info_versions(tmp_path, "halide") == ["21.0.0"]
    assert kernel_cache._dist_info_versions(tmp_path / "missing", "halide") == []
    installed = importlib.metadata.version("halide")
    kernel_cache._halide_version.cache_clear()
    try:
        assert kernel_cache._halide_version() == installed
        monkeypatch.setattr(kernel_cache, "_dist_info_versions", lambda folder, name: ["1", "2"])
        kernel_cache._halide_version.cache_clear()
        assert kernel_cache._halide_version() == installed
    finally:
        kernel_cache._halide_version.cache_clear()
