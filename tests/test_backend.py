"""The backend shim: selection, errors, isolation, device rules and cross-backend equality."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import anycnn
from anycnn import backend as B
from anycnn import layers as L
from anycnn.errors import BackendError, BackendMismatchError
from anycnn.models import build_model
from tests.conftest import REQUESTED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ANYCNN_")}
    full_env.update(env)
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=120)


def test_session_runs_on_the_requested_backend(backend, xp):
    """Each nox session checks anycnn really runs where it asked to."""
    assert backend.name == REQUESTED
    y = L.Dense(3, 2)(anycnn.asarray(np.ones((1, 3), np.float32)))
    assert B.backend_label(y) == REQUESTED
    assert anycnn.get_backend().name == REQUESTED


def test_unknown_backend_lists_valid_names():
    with pytest.raises(BackendError) as info:
        anycnn.use_backend("tensorflow")
    msg = str(info.value)
    assert "tensorflow" in msg
    for name in B.CHOICES:
        assert name in msg


def test_unusable_backend_says_why_and_how_to_fix(monkeypatch):
    monkeypatch.setattr(B, "_cuda_device_count", lambda: (0, "cupy is not importable (test)"))
    with pytest.raises(BackendError) as info:
        B.resolve("cupy")
    msg = str(info.value)
    assert "cupy" in msg and "not importable" in msg and "backends/cupy.txt" in msg


def test_missing_backend_package_names_the_fix(monkeypatch):
    real_import = B.importlib.import_module

    def fake_import(name, *args):
        if "torch" in name:
            exc = ImportError("No module named 'torch'")
            exc.name = "torch"
            raise exc
        return real_import(name, *args)

    monkeypatch.setattr(B.importlib, "import_module", fake_import)
    with pytest.raises(BackendError, match=r"torch.*not installed.*backends/torch.txt"):
        B.resolve("torch")


def test_auto_without_gpu_picks_numpy_and_says_why(monkeypatch):
    monkeypatch.setattr(B, "_cuda_device_count", lambda: (0, "no CUDA device (test)"))
    backend = B.resolve("auto")
    assert backend.name == "numpy"
    assert "no CUDA device (test)" in backend.reason


def test_auto_with_gpu_picks_cupy(monkeypatch):
    monkeypatch.setattr(B, "_cuda_device_count", lambda: (1, "cupy sees 1 CUDA device(s)"))
    fake = B.Backend("cupy", None, "cuda:0", "")
    made = []
    monkeypatch.setattr(B, "_make", lambda name, reason: made.append((name, reason)) or fake)
    assert B.resolve("auto") is fake
    assert made == [("cupy", "auto: cupy sees 1 CUDA device(s)")]


def test_environment_variable_is_read_at_first_use(monkeypatch):
    monkeypatch.setattr(B, "_current", None)
    monkeypatch.setenv("ANYCNN_BACKEND", "array_api_strict")
    assert anycnn.get_backend().name == "array_api_strict"
    monkeypatch.setenv("ANYCNN_BACKEND", "numpy")  # later changes do not switch silently
    assert anycnn.get_backend().name == "array_api_strict"


def test_use_backend_context_manager_restores(backend):
    other = "array_api_strict" if backend.name != "array_api_strict" else "numpy"
    with anycnn.use_backend(other) as b:
        assert b.name == other and anycnn.get_backend().name == other
    assert anycnn.get_backend().name == backend.name


def test_asarray_keeps_dtype_and_to_numpy_round_trips(backend, xp):
    for dtype in (np.float32, np.float64, np.int64, np.uint8):
        host = np.arange(6, dtype=dtype).reshape(2, 3)
        arr = anycnn.asarray(host)
        assert arr.dtype == getattr(xp, np.dtype(dtype).name)
        back = anycnn.to_numpy(arr)
        assert back.dtype == dtype
        np.testing.assert_array_equal(back, host)


def test_mixing_backends_is_an_error_naming_both(backend):
    other = "array_api_strict" if backend.name != "array_api_strict" else "numpy"
    layer = L.Dense(3, 2)
    with anycnn.use_backend(other):
        x = anycnn.asarray(np.ones((1, 3), np.float32))
    with pytest.raises(BackendMismatchError) as info:
        layer.forward(x)
    assert backend.name in str(info.value) and other in str(info.value)


def test_mixing_devices_is_an_error():
    import array_api_strict as strict

    with anycnn.use_backend("array_api_strict"):
        layer = L.Dense(3, 2)
    x = strict.ones((1, 3), device=strict.Device("device1"))
    with pytest.raises(BackendMismatchError, match="different devices"):
        layer.forward(x)


def test_torch_tensors_namespace_as_the_generic_checks_give_it():
    """The shortcut for plain torch tensors answers as array-api-compat does, and mixed
    libraries, mixed devices and tensor subclasses still get the generic checks."""
    torch = pytest.importorskip("torch")
    import array_api_compat

    a, b = torch.zeros(2), torch.ones(3)
    xp = array_api_compat.array_namespace(a)
    assert B.namespace_of(a, None, b) is xp and B.namespace_of(None, a) is xp
    assert B.namespace_of(torch.nn.Parameter(a)) is xp  # a subclass: the generic path
    with pytest.raises(BackendMismatchError, match="different backends"):
        B.namespace_of(a, np.zeros(2))
    with pytest.raises(BackendMismatchError, match="different devices"):
        B.namespace_of(a, torch.zeros(2, device="meta"))


def test_same_seed_gives_bit_identical_weights_on_every_backend():
    weights = {}
    for name in ("numpy", "array_api_strict", "torch"):
        try:
            ctx = anycnn.use_backend(name)
        except BackendError:
            continue
        with ctx:
            anycnn.manual_seed(42)
            model = build_model("simple-cnn")
            weights[name] = {k: anycnn.to_numpy(v) for k, v in model.state_dict().items()}
    assert len(weights) >= 2
    first = next(iter(weights.values()))
    for other in weights.values():
        for key, value in first.items():
            assert other[key].dtype == value.dtype == np.float32
            np.testing.assert_array_equal(other[key], value)


def test_forward_matches_numpy_in_float32(backend, rng):
    """Same weights and input: the backend under test agrees with NumPy within 1e-5."""
    x = rng.random((3, 28, 28, 1), dtype=np.float32)
    with anycnn.use_backend("numpy"):
        anycnn.manual_seed(3)
        ref_model = build_model("simple-cnn")
        ref = anycnn.to_numpy(ref_model(anycnn.asarray(x)))
    anycnn.manual_seed(3)
    model = build_model("simple-cnn")
    out = model(anycnn.asarray(x))
    assert out.dtype == backend.xp.float32
    np.testing.assert_allclose(anycnn.to_numpy(out), ref, rtol=1e-5, atol=1e-5)


def test_float64_in_float64_out(backend, rng):
    layer = L.Conv2D(2, 3, 3, dtype="float64")
    y = layer(anycnn.asarray(rng.standard_normal((1, 5, 5, 2))))
    assert y.dtype == backend.xp.float64
    model = build_model("lenet5").to("float64")
    assert all(p.data.dtype == backend.xp.float64 for p in model.parameters())


def test_import_reads_nothing_and_numpy_backend_needs_neither_torch_nor_cupy():
    """Run anycnn on NumPy with torch and cupy imports blocked: nothing reaches for them."""
    result = run_python("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "cupy", "jax", "array_api_strict"):
                    raise ImportError(f"blocked import of {name}")
        sys.meta_path.insert(0, Block())
        import numpy as np
        import anycnn
        from anycnn import backend
        assert backend._current is None, "backend resolved at import"
        from anycnn.models import build_model
        model = build_model("simple-cnn")
        loss = anycnn.nn.SoftmaxCrossEntropy()
        x = anycnn.asarray(np.zeros((2, 28, 28, 1), np.float32))
        loss.forward(model(x), anycnn.asarray(np.array([1, 2])))
        model.backward(loss.backward())
        assert anycnn.get_backend().name == "numpy"
        bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "cupy", "array_api_strict")]
        assert not bad, bad
        print("ok")
    """, ANYCNN_BACKEND="numpy")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_plain_import_imports_no_backend_library():
    result = run_python("""
        import sys, anycnn
        print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'cupy',
              'array_api_strict')))
    """, ANYCNN_BACKEND="torch")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_import_is_lazy_and_the_cli_tunes_blas_before_numpy_loads():
    result = run_python("""
        import os, sys
        import anycnn
        assert "numpy" not in sys.modules, "import anycnn loaded numpy"
        from anycnn.cli import commands as cli
        cli.tune_blas_threads()
        print(os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4"
    late = run_python("""
        import os, numpy, anycnn.cli.commands
        anycnn.cli.commands.tune_blas_threads()
        print(os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
    """)
    assert late.stdout.strip() == "None"  # too late to matter: left alone
    mine = run_python("""
        import os, anycnn.cli.commands
        anycnn.cli.commands.tune_blas_threads()
        print(os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
    """, OPENBLAS_THREAD_TIMEOUT="10")
    assert mine.stdout.strip() == "10"  # the user's choice wins
