"""Compiled Halide pipelines, built once per machine and kept on disk (behind the shim).

The compiled kernels of :mod:`~anycnn.kernels.native` and :mod:`~anycnn.kernels.native_norm`
are Halide pipelines. Each is described by a *builder*, a function of hashable arguments
(dtype, tiles, fused options) that returns ``(func, images, params)``: the output Func and its
ImageParams and Params by name, in the order of the compiled function's arguments.
:func:`pipeline` turns a builder into a function of the same arguments returning a
:class:`Pipeline`, which runs on NumPy arrays.

Where a C compiler is found (``$CC``, else ``cc``), a pipeline is compiled ahead of time to an
object file (without Halide's runtime), linked into a shared library and kept in the cache
directory, beside one shared library holding Halide's runtime (its thread pool, shared by every
kernel). A later process loads the library with :mod:`ctypes` and never imports Halide: its
first step costs about a warm step, and the compiler's memory (100-200 MB) is not paid.

- Directory: ``$ANYCNN_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/anycnn/kernels`` (default
  ``~/.cache/anycnn/kernels``), then one subdirectory per Halide version and CPU (its model and
  flags): ``halide-21.0.0-<cpu digest>/``. ``ANYCNN_KERNEL_CACHE=0`` keeps nothing on disk:
  every process then compiles its kernels in memory (Halide's JIT), as without a C compiler.
- Entry: ``<builder>-<digest>.so`` and ``.json``. The digest covers the builder's name, its
  arguments and the source of the kernel modules (a changed schedule is a new entry, never a
  stale one); the ``.json`` is written last and records the library's SHA-256 and its file's
  identity (size, inode, modification and change times): a missing or partial entry, or a
  library whose identity differs from its record and whose SHA-256 then differs too, is
  compiled again, never loaded. A library whose identity matches its record is loaded
  without reading it (hashing every library cost a cached process about 1.5 ms).
- Writes go to temporary files, flushed to disk, renamed into place: processes compiling the
  same kernel at once (test workers, ranks of a data-parallel run) each leave a whole entry,
  and a record is written only once its library is on disk.
- ``host.json`` records Halide's host target (its vector features shape the kernels' tiles),
  so a cached run learns it without Halide.

The pipelines' argument order is fixed by their builders; arrays are passed as
``halide_buffer_t`` descriptors of the NumPy arrays' memory (Halide's axes are NumPy's
reversed), scalars as 32-bit ints.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import halide_call, threads

__all__ = ["Pipeline", "cache_dir", "describe", "host_target", "kept_library", "pipeline",
           "runtime"]

#: the modules whose source shapes the compiled code (their digest is part of every key)
SOURCE_MODULES = ("anycnn.kernels.native", "anycnn.kernels.native_norm",
                  "anycnn.kernels.native_bn", "anycnn.kernels.native_sum",
                  "anycnn.kernels.native_narrow", "anycnn.kernels.native_planar",
                  "anycnn.kernels.native_wgrad", "anycnn.kernels.native_stamp",
                  "anycnn.kernels.native_winograd",
                  "anycnn.kernels.kernel_cache")

_build_lock = threading.Lock()  # one pipeline compiled at a time
_jit_lock = threading.Lock()  # an in-memory pipeline's parameters are set, then it runs


# --------------------------------------------------------------------------------------------
# Where the entries live


def cache_root() -> Path | None:
    """The cache directory before the per-version subdirectory, or None when
    ``ANYCNN_KERNEL_CACHE=0`` keeps nothing on disk."""
    env = os.environ.get("ANYCNN_KERNEL_CACHE")
    if env == "0":
        return None
    if env:
        return Path(env)
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "anycnn" / "kernels"


@functools.cache
def _cpu_fingerprint() -> str:
    """The CPU's model and feature flags (Linux: /proc/cpuinfo; elsewhere what the platform
    module says): machines that differ here get separate entries."""
    if hasattr(os, "uname"):  # what platform.machine() and system() read, without importing it
        facts = [os.uname().machine, os.uname().sysname]
    else:  # pragma: no cover - Windows
        import platform

        facts = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part") and line not in facts:
                    facts.append(line.strip())
    except OSError:
        import platform

        facts.append(platform.processor())
    return hashlib.sha256("\n".join(facts).encode()).hexdigest()[:16]


@functools.cache
def _halide_version() -> str:
    """The installed Halide's version: from the name of the one ``halide-VERSION.dist-info``
    folder beside the package that imports (one directory listing; ``importlib.metadata``
    searches every ``sys.path`` entry and parses the metadata, which cost 2-6 ms of a cached
    process's first step), else from ``importlib.metadata``; ``"unknown"`` without Halide."""
    try:
        spec = importlib.util.find_spec("halide")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or ()) if spec is not None else ():
        found = _dist_info_versions(Path(location).parent, "halide")
        if len(found) == 1:
            return found[0]
    from importlib import metadata  # about 10 ms to import: only where the folder is ambiguous

    try:
        return metadata.version("halide")
    except metadata.PackageNotFoundError:
        return "unknown"


def _dist_info_versions(folder: Path, name: str) -> list[str]:
    """The versions named by ``folder``'s ``NAME-VERSION.dist-info`` entries (the wheel
    standard's spelling; the name compared case-insensitively)."""
    prefix, suffix = f"{name.lower()}-", ".dist-info"
    try:
        with os.scandir(folder) as entries:
            return [e.name[len(prefix):-len(suffix)] for e in entries
                    if e.name.lower().startswith(prefix) and e.name.endswith(suffix)]
    except OSError:
        return []


def cache_dir() -> Path | None:
    """This machine's and Halide version's directory of entries (None: no disk cache)."""
    return _cache_dir_under(os.environ.get("ANYCNN_KERNEL_CACHE"),
                            os.environ.get("XDG_CACHE_HOME"), os.environ.get("HOME"))


@functools.lru_cache(maxsize=8)
def _cache_dir_under(*environment: str | None) -> Path | None:
    """:func:`cache_dir`, memoised on the values of the variables it reads (``environment``:
    the key only). It is asked at every kernel's first use; building the path each time cost
    about 40 us."""
    root = cache_root()
    if root is None:
        return None
    return root / f"halide-{_halide_version()}-{_cpu_fingerprint()}"


@functools.cache
def _compiler() -> str | None:
    """The C compiler that links the shared libraries (None: none found, or Windows)."""
    if sys.platform == "win32":
        return None
    return shutil.which(os.environ.get("CC") or "cc")


#: why this process stopped keeping kernels on disk (the directory could not be written, the
#: compiler failed), or None
_not_kept: str | None = None


def ahead_of_time() -> bool:
    """Whether pipelines are compiled to shared libraries kept on disk (else in memory)."""
    return cache_dir() is not None and _compiler() is not None and _not_kept is None


def describe() -> str:
    """Where compiled kernels are kept, for ``anycnn info``."""
    if cache_dir() is None:
        return "compiled in each process (ANYCNN_KERNEL_CACHE=0)"
    if _compiler() is None:
        return "compiled in each process (no C compiler to link them: set CC)"
    if _not_kept is not None:
        return f"compiled in this process ({_not_kept})"
    return f"compiled once, kept in {cache_dir()}"


@functools.cache
def _source_digest() -> str:
    digest = hashlib.sha256()
    for name in SOURCE_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"cannot find the source of {name}")
        digest.update(Path(spec.origin).read_bytes())
    return digest.hexdigest()


def entry_name(builder: str, args: tuple) -> str:
    """The file stem of the entry of ``builder`` over ``args``."""
    return _stem(builder, f"{builder}{args!r}")


def _stem(builder: str, key: str) -> str:
    """:func:`entry_name` from the entry's ``key`` (the builder's name and its arguments'
    repr, which is worth computing once: a dtype's repr costs about 10 us)."""
    digest = hashlib.sha256(f"{key}{_source_digest()}".encode()).hexdigest()
    return f"{builder.rsplit('.', 1)[-1].strip('_')}-{digest[:20]}"


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _identity(path: Path | str) -> list[int]:
    """The file's size, inode, modification and change times (ns): any write to it, or its
    replacement, changes at least one (the change time cannot be set back by ``touch``)."""
    st = os.stat(path)
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _record_library(path: Path) -> dict:
    """The record fields of the library ``path``, just renamed into place: its SHA-256 and
    its identity."""
    return {"sha256": _sha256(path), "file": _identity(path)}


def _library_matches(path: Path, meta: dict) -> bool:
    """Whether ``path`` is the library ``meta`` (a record) describes: its identity as
    recorded, else (the file was copied, or touched) its SHA-256 as recorded, in which case
    ``meta``'s identity is updated, for the caller to write back."""
    if meta.get("file") == _identity(path):
        return True
    if meta["sha256"] != _sha256(path):
        return False
    meta["file"] = _identity(path)
    return True


# --------------------------------------------------------------------------------------------
# The host target and Halide's runtime


def _halide():
    import halide

    return halide


@functools.cache
def host_target() -> str:
    """Halide's host target string (``x86-64-linux-avx-avx2-avx512...``), from ``host.json``
    when the cache has it (no Halide import), else from Halide (and then recorded)."""
    directory = cache_dir()
    record = directory / "host.json" if directory is not None else None
    if record is not None:
        try:
            return json.loads(record.read_text())["target"]
        except (OSError, ValueError, KeyError):
            pass
    target = str(_halide().get_host_target())
    if record is not None:
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(record, json.dumps({"target": target}).encode())
        except OSError:
            pass  # a read-only cache: the target is asked of Halide each time
    return target


def _link(objects: list[Path], out: Path) -> None:
    """Link ``objects`` into the shared library ``out`` (through a temporary file)."""
    import subprocess  # only where kernels are compiled or bundled: not in a cached first step

    flags = ["-shared"]
    if sys.platform == "darwin":
        flags += ["-undefined", "dynamic_lookup"]
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        subprocess.run([_compiler(), *flags, "-o", str(tmp), *map(str, objects)], check=True,
                       capture_output=True, text=True)
        fd = os.open(tmp, os.O_RDONLY)
        try:  # on disk before its record is written: a crash cannot leave a record of garbage
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"linking a compiled kernel failed: {e.stderr.strip()}") from e
    finally:
        tmp.unlink(missing_ok=True)


_runtime: ctypes.CDLL | None = None
_errors = threading.local()  # .message: the last error Halide's runtime reported on a thread


@ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_char_p)
def _on_error(user_context: Any, message: bytes) -> None:
    """Halide's error handler (its default prints and aborts the process): keep the message
    for :meth:`Pipeline.run` to raise."""
    _errors.message = message.decode(errors="replace").strip()


def kept_library(directory: Path, name: str, make: Callable[[Path], None]) -> Path:
    """The shared library ``name`` of the cache ``directory`` (Halide's runtime, the OpenMP
    bridge of :mod:`~anycnn.kernels.openmp_tasks`): kept as the kernels are (a record written
    last, checked before loading), else made again: ``make(folder)`` writes the object files
    to link into ``folder`` (a temporary folder in ``directory``)."""
    path, record = directory / f"{name}.so", directory / f"{name}.json"
    try:
        if _checked(record, path, json.loads(record.read_bytes())) is not None:
            return path
    except (OSError, ValueError, KeyError, TypeError):
        pass
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        make(Path(tmp))
        _link(sorted(Path(tmp).glob("*.o")), path)
    _write_atomic(record, json.dumps(_record_library(path)).encode())
    return path


def _load_runtime(directory: Path) -> None:
    """Load (building it first if needed) the shared Halide runtime, into the global symbol
    scope the kernels' libraries resolve against, and size its thread pool to
    :func:`~anycnn.kernels.threads.num_threads` (unless ``HL_NUM_THREADS`` is set)."""
    global _runtime
    if _runtime is not None:
        return

    def make(folder: Path) -> None:
        hl = _halide()
        hl.compile_standalone_runtime(str(folder / "runtime.o"), hl.Target(host_target()))

    path = kept_library(directory, "runtime", make)
    _runtime = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    _runtime.halide_set_error_handler(_on_error)
    if "HL_NUM_THREADS" not in os.environ:
        _runtime.halide_set_num_threads(ctypes.c_int(threads.num_threads()))


def runtime() -> ctypes.CDLL | None:
    """Halide's runtime library the kept kernels run on (loaded, built first if needed), or
    None where kernels are compiled in memory (no cache directory, no C compiler)."""
    directory = cache_dir()
    if directory is None or not ahead_of_time():
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _load_runtime(directory)
    except (OSError, RuntimeError):
        return None
    return _runtime


# --------------------------------------------------------------------------------------------
# Pipelines


class Pipeline:
    """A compiled pipeline: :meth:`run` computes its outputs from NumPy arrays and ints."""

    def __init__(self, name: str, images: list[str], params: list[str],
                 library: _Library | None = None, jit: tuple | None = None) -> None:
        self.name, self.images, self.params = name, images, params
        self._function = getattr(library, name) if library is not None else None
        self._calls = None
        if self._function is not None:
            self._function.restype = ctypes.c_int
            self._calls = halide_call.Calls(self._function, len(images))
        self._jit = jit  # (func, ImageParams, Params) compiled in memory

    def run(self, arrays: dict[str, np.ndarray], scalars: dict[str, int],
            outputs: list[np.ndarray]) -> None:
        """Compute ``outputs`` (C-contiguous innermost, of the pipeline's types; several for a
        Tuple-valued pipeline) from ``arrays`` (each ImageParam by name, as
        :func:`~anycnn.kernels.native.operand` made it, held by the caller) and ``scalars``."""
        if self._calls is None:
            self._run_jit(arrays, scalars, outputs)
            return
        operands = [arrays[name] for name in self.images]
        operands += outputs
        _errors.message = None
        code = self._calls(operands, tuple([scalars[name] for name in self.params]))
        if code != 0:
            raise RuntimeError(f"compiled kernel {self.name} failed: "
                               f"{_errors.message or f'Halide error {code}'}")

    def _run_jit(self, arrays, scalars, outputs) -> None:
        hl = _halide()
        func, images, params = self._jit
        with _jit_lock:  # the parameters are set, then the pipeline runs: one caller at a time
            for name, a in arrays.items():
                images[name].set(hl.Buffer(a))
            for name, value in scalars.items():
                params[name].set(int(value))
            buffers = [hl.Buffer(o) for o in outputs]
            _realize(func, buffers[0] if len(buffers) == 1 else buffers)


_pool_started = False


def _realize(func, buffer) -> None:
    """``func.realize(buffer)`` of an in-memory pipeline; the first call sizes Halide's JIT
    thread pool, which reads ``HL_NUM_THREADS`` when it starts, to
    :func:`~anycnn.kernels.threads.num_threads` (unless the user set it), without leaving the
    variable for child processes to inherit."""
    global _pool_started
    if _pool_started:
        func.realize(buffer)
        return
    ours = "HL_NUM_THREADS" not in os.environ
    if ours:
        os.environ["HL_NUM_THREADS"] = str(threads.num_threads())
    try:
        func.realize(buffer)
    finally:
        if ours:
            os.environ.pop("HL_NUM_THREADS", None)
        _pool_started = True


def _checked(record: Path, library: Path, meta: dict) -> dict | None:
    """``meta`` (the record ``record`` read) when ``library`` is the library it describes
    (:func:`_library_matches`; a refreshed identity is written back), else None."""
    known = meta.get("file")
    if not _library_matches(library, meta):
        return None
    if meta["file"] != known:
        try:
            _write_atomic(record, json.dumps(meta, indent=1).encode())
        except OSError:
            pass  # a read-only cache: the next process hashes the library again
    return meta


def _load(directory: Path, stem: str, key: str) -> Pipeline | None:
    """The entry ``stem`` when it is whole and its record names ``key``, else None."""
    record, library = Path(f"{directory}/{stem}.json"), Path(f"{directory}/{stem}.so")
    try:
        meta = json.loads(record.read_bytes())
        if meta["key"] != key or _checked(record, library, meta) is None:
            return None
        _load_runtime(directory)
        return Pipeline(meta["function"], meta["images"], meta["params"],
                        library=_Library(library))
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None


class _Library:
    """A shared library opened with ``dlopen`` (never closed): its functions, by attribute,
    are ctypes functions returning ``int``. Lighter than :class:`ctypes.CDLL`, which builds a
    class per library (about 40 us each, and a cached first step opens dozens)."""

    def __init__(self, path: Path) -> None:
        dl = _dl()
        self._handle = dl.dlopen(os.fsencode(path), _DLOPEN_MODE)
        if not self._handle:
            raise OSError(f"cannot load {path}: {_dlerror(dl)}")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        dl = _dl()
        address = dl.dlsym(self._handle, name.encode())
        if not address:
            raise AttributeError(f"{name}: {_dlerror(dl)}")
        return _FUNCTION(address)


#: the kernels' libraries resolve Halide's runtime (loaded globally) when they are opened
_DLOPEN_MODE = os.RTLD_NOW | os.RTLD_LOCAL if hasattr(os, "RTLD_NOW") else 0
_FUNCTION = ctypes.CFUNCTYPE(ctypes.c_int)  # cdecl: any number of arguments


@functools.cache
def _dl() -> ctypes.CDLL:
    """``dlopen``, ``dlsym`` and ``dlerror`` of this process (glibc 2.34+ and macOS have them
    in the C library, older glibc in libdl)."""
    dl = ctypes.CDLL(None)
    if not hasattr(dl, "dlopen"):
        dl = ctypes.CDLL("libdl.so.2")
    dl.dlopen.restype = dl.dlsym.restype = ctypes.c_void_p
    dl.dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
    dl.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    dl.dlerror.restype = ctypes.c_char_p
    return dl


def _dlerror(dl: ctypes.CDLL) -> str:
    message = dl.dlerror()
    return message.decode(errors="replace") if message else "unknown error"


def _compile(directory: Path, stem: str, key: str, built: tuple) -> Pipeline:
    """Compile ``built`` (a builder's result) ahead of time into the entry ``stem``."""
    hl = _halide()
    func, images, params = built
    function = stem.replace("-", "_")
    _load_runtime(directory)
    target = hl.Target(host_target()).with_feature(hl.TargetFeature.NoRuntime)
    arguments = [*images.values(), *params.values()]
    library = directory / f"{stem}.so"
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        obj = Path(tmp) / f"{stem}.o"
        func.compile_to_object(str(obj), arguments, function, target)
        _link([obj], library)
        object_sha256 = _sha256(obj)
        os.replace(obj, directory / obj.name)  # kept for bundles (kernel_bundle)
    meta = {"key": key, "function": function, "images": list(images),
            "params": list(params), **_record_library(library), "object": object_sha256}
    _write_atomic(directory / f"{stem}.json", json.dumps(meta, indent=1).encode())
    return Pipeline(function, list(images), list(params), library=_Library(library))


def _build(builder: Callable[..., tuple], args: tuple) -> Pipeline:
    """The pipeline of ``builder`` over ``args``: loaded from the cache, else compiled into
    it; compiled in memory where nothing can be kept (and from then on in this process, with
    one warning, when the cache directory cannot be written or the compiler fails)."""
    global _not_kept
    name = f"{builder.__module__}.{builder.__qualname__}"
    directory = cache_dir()
    if directory is not None and ahead_of_time():
        key = f"{name}{args!r}"
        found = kernel_bundle.lookup(directory, name, key)
        if found is not None:
            return found
        stem = _stem(name, key)
        found = _load(directory, stem, key)
        if found is not None:
            kernel_bundle.note(directory, key, stem, found)
            return found
        try:
            directory.mkdir(parents=True, exist_ok=True)
            found = _compile(directory, stem, key, builder(*args))
            kernel_bundle.note(directory, key, stem, found)
            return found
        except (OSError, RuntimeError) as exc:
            _not_kept = f"the kernel cache {directory} is unusable: {exc}"
            warnings.warn(f"anycnn: compiled kernels are not kept on disk: {_not_kept}; "
                          "set ANYCNN_KERNEL_CACHE to a writable folder, or to 0",
                          RuntimeWarning, stacklevel=2)
    hl = _halide()
    func, images, params = builder(*args)
    func.compile_jit(hl.Target(host_target()))
    return Pipeline(name, list(images), list(params), jit=(func, images, params))


def pipeline(builder: Callable[..., tuple]) -> Callable[..., Pipeline]:
    """Make ``builder`` (hashable arguments → ``(func, images, params)``) a function of the
    same arguments returning its :class:`Pipeline`: loaded from the cache, or compiled (and
    kept) at the first call with those arguments in this process, then held in memory."""
    held: dict[tuple, Pipeline] = {}

    @functools.wraps(builder)
    def get(*args: Any) -> Pipeline:
        found = held.get(args)
        if found is None:
            with _build_lock:
                found = held.get(args)
                if found is None:
                    found = held[args] = _build(builder, args)
        return found

    get.cache_clear = held.clear  # type: ignore[attr-defined]
    return get


from . import kernel_bundle  # noqa: E402 - it uses this module's loading functions
