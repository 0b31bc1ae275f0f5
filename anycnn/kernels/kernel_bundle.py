"""Bundles of cached kernels: the kernels one process used, linked into one shared library.

A cached process's first step loads each compiled kernel it needs from the cache
(:mod:`~anycnn.kernels.kernel_cache`). Opened one by one, resnet20's 38 libraries cost
8-10 ms of its first step (``dlopen`` about 3 ms, more in a process with NumPy and its BLAS
loaded than alone; a record read, a file check and a ctypes function each); from one bundle,
about 2 ms. So:

- When a process exits having used at least :data:`BUNDLE_AFTER` cached kernels that no
  bundle held (loaded one by one, or compiled), and at most :data:`MAX_ENTRIES` in all, it
  links the object files of every kernel it used (and of the bundle it found, up to
  :data:`MAX_ENTRIES` kernels) into ``bundle-<digest>.so`` (50-75 ms for 38 kernels) and
  points ``bundle.json`` at it. (A process using more, such as a test suite, leaves the
  bundle as it was: its successor is unlikely to need the same kernels.)
- A later process reads ``bundle.json`` once, at its first kernel; each kernel the bundle holds
  is then looked up in that one library (opened at the first such kernel), and any other
  kernel is loaded from its own entry as before.

``bundle.json`` records the bundle library's SHA-256 and file identity (checked as an entry's
are: a bundle whose library was changed or replaced is not used), the kernel modules' source
digest (a bundle of kernels of other source is not used), and for each kernel key its entry's
stem, function name and argument names (the stem and function name are derived from the key
again before use, so a record cannot hand one key another key's kernel). Object files are
checked against the SHA-256 their entry's record holds before they are linked, so a torn
object file never reaches a bundle.
Nothing here ever fails a process: a bundle that cannot be read, opened or built is skipped.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import re
import threading
from pathlib import Path

from . import kernel_cache

#: cached kernels a process must have used outside any bundle for it to link one at exit
BUNDLE_AFTER = 4
#: the most kernels one bundle holds (the last process's kernels are kept first)
MAX_ENTRIES = 128
RECORD = "bundle.json"

_lock = threading.Lock()


class _Directory:
    """What this process knows of one cache directory's bundle, and what it used there."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.record: dict | None = None  # bundle.json, when it is of this source
        self.library: kernel_cache._Library | None = None
        self.failed = False  # the bundle's library could not be checked or opened
        self.used: dict[str, dict] = {}  # key -> {stem, function, images, params}
        self.outside = 0  # kernels used that the bundle did not hold
        self.previous: str | None = None  # the library bundle.json named, whatever its source
        try:
            record = json.loads((directory / RECORD).read_bytes())
            library = record.get("library")
            if isinstance(library, str) and _BUNDLE_NAME.fullmatch(library):
                self.previous = library
            if record["source"] == kernel_cache._source_digest() and isinstance(
                    record["entries"], dict):
                self.record = record
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass

    def open(self) -> kernel_cache._Library | None:
        if self.library is None and not self.failed:
            try:
                if not _BUNDLE_NAME.fullmatch(self.record["library"]):
                    raise OSError("a bundle library is named bundle-<20 hex digits>.so")
                path = self.directory / self.record["library"]
                if kernel_cache._checked(self.directory / RECORD, path, self.record) is None:
                    raise OSError("the bundle's library is not the one its record describes")
                kernel_cache._load_runtime(self.directory)
                self.library = kernel_cache._Library(path)
            except (OSError, ValueError, KeyError, TypeError):
                self.failed = True
        return self.library


_directories: dict[Path, _Directory] = {}


def _state(directory: Path) -> _Directory:
    state = _directories.get(directory)
    if state is None:
        state = _directories[directory] = _Directory(directory)
    return state


def lookup(directory: Path, builder: str, key: str) -> kernel_cache.Pipeline | None:
    """The pipeline of ``key`` (of the builder named ``builder``) from ``directory``'s bundle,
    or None where the bundle does not hold it (or cannot be used). The entry's stem and
    function name are derived from the key again, as for an entry of its own, not taken from
    the record."""
    state = _state(directory)
    entry = state.record["entries"].get(key) if state.record is not None else None
    if entry is None:
        return None
    try:
        stem = kernel_cache._stem(builder, key)
        if entry["stem"] != stem or entry["function"] != stem.replace("-", "_"):
            return None
        library = state.open()
        if library is None:
            return None
        found = kernel_cache.Pipeline(entry["function"], entry["images"], entry["params"],
                                      library=library)
    except (AttributeError, KeyError, TypeError):
        return None
    state.used[key] = entry
    return found


def note(directory: Path, key: str, stem: str, pipeline: kernel_cache.Pipeline) -> None:
    """Record that this process used the entry ``stem`` (of ``key``) outside a bundle."""
    state = _state(directory)
    with _lock:
        state.used[key] = {"stem": stem, "function": pipeline.name,
                           "images": list(pipeline.images), "params": list(pipeline.params)}
        state.outside += 1
        if state.outside == BUNDLE_AFTER:
            atexit.register(_bundle_at_exit, state)


def _bundle_at_exit(state: _Directory) -> None:
    try:
        build(state)
    except Exception:  # a process's exit never fails over a bundle
        pass


def build(state: _Directory) -> Path | None:
    """Link the bundle of the kernels ``state``'s process used (and of the bundle it found,
    within :data:`MAX_ENTRIES`); the new library's path, or None when the process used more
    than :data:`MAX_ENTRIES` kernels or fewer than two had whole object files."""
    directory = state.directory
    if len(state.used) > MAX_ENTRIES:
        return None
    entries = dict(state.used)
    if state.record is not None:
        for key, entry in state.record["entries"].items():
            if len(entries) >= MAX_ENTRIES:
                break
            entries.setdefault(key, entry)
    objects, kept = [], {}
    for key, entry in entries.items():
        obj = directory / f"{entry['stem']}.o"
        try:
            meta = json.loads((directory / f"{entry['stem']}.json").read_bytes())
            if meta["key"] != key or meta["object"] != kernel_cache._sha256(obj):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        objects.append(obj)
        kept[key] = entry
    if len(kept) < 2:
        return None
    digest = hashlib.sha256(" ".join(sorted(e["stem"] for e in kept.values())).encode())
    library = directory / f"bundle-{digest.hexdigest()[:20]}.so"
    kernel_cache._link(objects, library)
    record = {"library": library.name, "source": kernel_cache._source_digest(),
              **kernel_cache._record_library(library), "entries": kept}
    kernel_cache._write_atomic(directory / RECORD, json.dumps(record).encode())
    if state.previous is not None and state.previous != library.name:
        (directory / state.previous).unlink(missing_ok=True)  # one bundle per directory
    return library


_BUNDLE_NAME = re.compile(r"bundle-[0-9a-f]{20}\.so")
