"""torch CPU tensors through the compiled kernels (``anycnn.kernels.torch_native``), their
parallel loops on torch's OpenMP threads (``anycnn.kernels.openmp_tasks``): a training step and
an eval forward equal the NumPy backend's and torch's own operators', the compiled kernels do
run, results are torch tensors, and what the kernels cannot take (CUDA-like tensors,
bfloat16, the kernels off, kernels compiled in memory) goes on to torch's operators."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

import anycnn
from anycnn.kernels import dispatch, kernel_cache, native, openmp_tasks

torch = pytest.importorskip("torch")
from anycnn.kernels import torch_native  # noqa: E402  (imports torch's kernels)

if not native.available(np) or not kernel_cache.ahead_of_time():
    pytest.skip("the compiled kernels are off or compiled in memory here", allow_module_level=True)


@pytest.fixture
def bridged(monkeypatch):
    """torch tensors to the compiled kernels, whatever an earlier test left decided."""
    monkeypatch.setattr(torch_native, "_active", None)
    assert torch_native.active()
    return monkeypatch


def _step(backend: str, name: str, shape: tuple, input_grad: bool) -> dict[str, np.ndarray]:
    """One training step of preset ``name`` (seed 0) on ``backend`` and its eval forward
    after: the outputs, the loss, every gradient and the updated running statistics, as NumPy."""
    with anycnn.use_backend(backend):
        anycnn.manual_seed(0)
        model = anycnn.models.build_model(name, image_size=shape[1])
        g = np.random.default_rng(1)
        x = anycnn.asarray(g.standard_normal(shape).astype(np.float32))
        y = anycnn.asarray(g.integers(0, 10, shape[0]))
        loss = anycnn.nn.losses.SoftmaxCrossEntropy()
        model.zero_grad()
        out = model.forward(x)
        value = loss.forward(out, y)
        dx = model.backward(loss.backward(), input_grad=input_grad)
        got = {"out": out, "loss": value}
        if input_grad:
            got["dx"] = dx
        for key, p in model.named_parameters():
            got[f"grad {key}"] = p.grad
        for key, v in model.state_dict().items():
            if "running" in key:
                got[key] = v
        model.eval()
        got["eval"] = model.forward(x)
        return {k: anycnn.to_numpy(v) for k, v in got.items()}


def _calls(monkeypatch) -> list[str]:
    """The compiled kernels' entry points this test's calls reached (a spy on each)."""
    seen: list[str] = []
    for module, name in ((native, "conv2d_weight_grad"), (native, "_forward")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, _n=name, **k: seen.append(_n)
                            or _r(*a, **k))
    return seen


@pytest.mark.parametrize("name,shape,input_grad", [
    ("resnet20", (4, 16, 16, 3), False),
    ("simple-cnn", (4, 28, 28, 1), True),
])
def test_a_step_equals_the_numpy_backend_and_torchs_operators(bridged, name, shape,
                                                                input_grad):
    """A training step and an eval forward on the torch backend through the compiled kernels
    equal the NumPy backend's (the same kernels: up to threads' summation order) and torch's
    own operators' (the compiled kernels switched off for torch tensors), and the compiled
    kernels did compute them."""
    want = _step("numpy", name, shape, input_grad)
    seen = _calls(bridged)
    got = _step("torch", name, shape, input_grad)
    assert "conv2d_weight_grad" in seen and "_forward" in seen
    bridged.setattr(torch_native, "_active", False)
    seen.clear()
    theirs = _step("torch", name, shape, input_grad)
    assert not seen  # torch's operators, not the compiled kernels
    assert got.keys() == want.keys() == theirs.keys()
    for key in want:
        scale = max(1.0, float(np.abs(want[key]).max()))
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=key)
        np.testing.assert_allclose(theirs[key], got[key], rtol=1e-3, atol=1e-4 * scale,
                                   err_msg=key)


def test_results_are_torch_tensors(bridged):
    """A convolution's result is a torch tensor equal to the NumPy call's, and a training
    BatchNorm's new running statistics are torch tensors (the caller keeps them), the input
    ones left as they were."""
    from anycnn.nn import functional as F

    g = np.random.default_rng(0)
    with anycnn.use_backend("torch"):
        x = torch.from_numpy(g.standard_normal((2, 16, 16, 16)).astype(np.float32))
        w = torch.from_numpy(g.standard_normal((3, 3, 16, 16)).astype(np.float32))
        y = F.conv2d_forward(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1))[0]
        assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
        want = F.conv2d_forward(x.numpy(), w.numpy(), None, (1, 1), (1, 1, 1, 1), (1, 1))[0]
        np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5)
        mean, var = torch.zeros(16), torch.ones(16)
        _, _, new_mean, new_var = F.batch_norm_forward(x, torch.ones(16), torch.zeros(16),
                                                       mean, var, True, 0.1, 1e-5)
        assert isinstance(new_mean, torch.Tensor) and isinstance(new_var, torch.Tensor)
        moved = 0.1 * x.numpy().reshape(-1, 16).mean(0)
        np.testing.assert_allclose(new_mean.numpy(), moved, rtol=1e-4, atol=1e-6)
        assert not mean.any() and bool((var == 1).all())


def test_what_the_compiled_kernels_cannot_take_goes_to_torchs_operators(bridged):
    """CUDA-like (meta) tensors, bfloat16 tensors, NumPy arrays and calls with the compiled
    kernels off are declined: torch's operators (or the portable code) take them."""
    from anycnn.nn.functional.conv import conv_windows

    conv2d = dispatch.kernels_for("conv2d")[0]
    assert conv2d.__module__ == "anycnn.kernels.torch_native"
    win = conv_windows((8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    ok = (torch.ones(1, 8, 8, 16), torch.ones(3, 3, 16, 16))
    assert conv2d(*ok, None, win, 1) is not dispatch.DECLINE
    meta = (torch.ones(1, 8, 8, 16, device="meta"), torch.ones(3, 3, 16, 16, device="meta"))
    assert conv2d(*meta, None, win, 1) is dispatch.DECLINE
    bf16 = tuple(a.to(torch.bfloat16) for a in ok)
    assert conv2d(*bf16, None, win, 1) is dispatch.DECLINE
    assert conv2d(*(a.numpy() for a in ok), None, win, 1) is dispatch.DECLINE
    bridged.setattr(torch_native, "_active", None)
    bridged.setattr(native, "ENABLED", False)
    assert conv2d(*ok, None, win, 1) is dispatch.DECLINE


def test_the_names_are_every_compiled_kernels():
    """Every dispatch name a compiled kernel registers under is offered torch tensors."""
    dispatch.kernels_for("conv2d")  # every kernel module loaded
    compiled = {name for name, kernels in dispatch._kernels.items()
                if any(k.__module__ in torch_native.COMPILED_MODULES for k in kernels)}
    assert compiled == set(torch_native.NAMES)


def test_a_pooled_gradient_of_torchs_forward_is_not_taken_by_the_compiled_kernels():
    """The compiled kernels' ``pooled_gradient`` declines another forward's state (torch's
    operators keep a ``PooledBlock``): a block's forward and backward go the same way."""
    from anycnn.kernels import torch_ops

    block = torch_ops.PooledBlock(torch.ones(1, 2, 4, 4), torch.zeros(1, 2, 2, 2), None, (2, 2))
    assert native.pooled_gradient(np.ones((1, 2, 2, 2)), block, (2, 2)) is dispatch.DECLINE


_SHARED = """
import ctypes, numpy as np, torch
from anycnn.kernels import kernel_cache, native, openmp_tasks
x = np.random.default_rng(0).standard_normal((8, 32, 32, 16)).astype(np.float32)
w = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
alone = native.conv2d(x, w, None, 1, (1, 1, 1, 1), (32, 32))
assert openmp_tasks.shared() is None and openmp_tasks.share_threads()
assert openmp_tasks.shared() == "torch's OpenMP threads"
runtime = kernel_cache.runtime()
runtime.halide_set_custom_do_par_for.restype = ctypes.c_void_p
ours = runtime.halide_set_custom_do_par_for(None)
runtime.halide_set_custom_do_par_for(ctypes.c_void_p(ours))
bridge = [l for l in open('/proc/self/maps').read().split() if 'openmp-tasks-' in l]
assert bridge, 'the bridge library is not loaded'
lib = ctypes.CDLL(bridge[0])
assert ours == ctypes.cast(lib.anycnn_do_par_for, ctypes.c_void_p).value
torch.set_num_threads(2)
shared = native.conv2d(x, w, None, 1, (1, 1, 1, 1), (32, 32))
assert np.array_equal(alone, shared)
print('ok')
"""


def test_the_kernels_loops_run_on_torchs_openmp_threads():
    """After :func:`openmp_tasks.share_threads`, Halide's runtime hands its parallel loops to
    the bridge (the handler it holds is the bridge's), and a kernel computes the same result
    there as on Halide's pool (a new process: the handler stays for the process's life)."""
    out = subprocess.run([sys.executable, "-c", _SHARED], capture_output=True, text=True,
                         env={**os.environ, "ANYCNN_BACKEND": "numpy"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_kernels_compiled_in_memory_keep_torchs_operators():
    """Without the kernel cache (kernels compiled in memory) there is no runtime library to
    hand the loops over: torch tensors keep torch's operators."""
    code = ("import torch\nfrom anycnn.kernels import torch_native, openmp_tasks\n"
            "assert not openmp_tasks.share_threads() and not torch_native.active()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "ANYCNN_KERNEL_CACHE": "0"})
    assert out.returncode == 0, out.stderr


def test_a_failing_loop_reports_its_code():
    """A task's nonzero code comes back from the bridge's loop (Halide turns it into the
    kernel's error); a loop of one iteration runs it on the calling thread."""
    assert openmp_tasks.share_threads()
    lib = openmp_tasks._bridge[0]  # the library this process handed GOMP_parallel to
    ran = []
    task_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)

    @task_type
    def task(_context, index, _closure):
        ran.append(index)
        return -7 if index == 3 else 0

    lib.anycnn_do_par_for.argtypes = [ctypes.c_void_p, task_type, ctypes.c_int, ctypes.c_int,
                                      ctypes.c_void_p]
    assert lib.anycnn_do_par_for(None, task, 10, 1, None) == 0
    assert lib.anycnn_do_par_for(None, task, 0, 4, None) == -7
    assert sorted(ran)[:5] == [0, 1, 2, 3, 10]


_FORKED = """
import multiprocessing as mp, numpy as np, torch, anycnn
from anycnn.kernels import torch_native, openmp_tasks
from anycnn.nn import functional as F
anycnn.use_backend("torch")
g = np.random.default_rng(0)
x = torch.from_numpy(g.standard_normal((8, 32, 32, 16)).astype(np.float32))
w = torch.from_numpy(g.standard_normal((3, 3, 16, 16)).astype(np.float32))
def conv():
    return F.conv2d_forward(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1))[0].numpy()
want = conv()
assert torch_native.active() and openmp_tasks.shared()
def child(q):
    q.put((conv(), openmp_tasks.shared(), openmp_tasks.share_threads()))
ctx = mp.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start()
try:
    got, shared, again = q.get(timeout=60)  # read before joining: the result fills the pipe
except Exception:
    p.kill()
    raise SystemExit("the forked child hung")
p.join(60)
assert p.exitcode == 0 and shared is None and not again
assert np.allclose(got, want, rtol=1e-5, atol=1e-4)
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="no fork here")
def test_a_forked_child_runs_its_kernels_on_halides_pool():
    """A child forked after the hand-over gets Halide's own pool back (GNU OpenMP's threads do
    not survive a fork: its next parallel region would wait forever) and computes the same
    convolution; it never hands its loops over again."""
    out = subprocess.run([sys.executable, "-c", _FORKED], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


_ONE_THREAD = """
import ctypes, threading, torch
from anycnn.kernels import openmp_tasks
assert openmp_tasks.share_threads()
lib = openmp_tasks._bridge[0]
task_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
seen = set()
task = task_type(lambda _c, i, _d: seen.add(threading.get_native_id()) or 0)
lib.anycnn_do_par_for.argtypes = [ctypes.c_void_p, task_type, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_void_p]
assert lib.anycnn_do_par_for(None, task, 0, 64, None) == 0
assert seen == {threading.get_native_id()}, seen
print("ok")
"""


def test_anycnn_num_threads_sizes_the_team():
    """``ANYCNN_NUM_THREADS=1`` keeps the handed-over loops on the calling thread (else the
    team is torch's own)."""
    out = subprocess.run([sys.executable, "-c", _ONE_THREAD], capture_output=True, text=True,
                         env={**os.environ, "ANYCNN_NUM_THREADS": "1"}, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
