"""Namespaces without in-place updates (JAX, dask): the optimizers' functional path gives the
in-place path's numbers exactly, never touches the arrays it was given, and an in-place update
of immutable arrays is an error, never a silent no-op; unknown array types are refused with a
clear error instead of being read back as object arrays."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import anycnn
from anycnn import backend
from anycnn.errors import BackendError
from anycnn.kernels import fastpath
from anycnn.nn import Parameter
from anycnn.optim import SGD, Adam, AdamW, RMSprop
from anycnn.optim import optimizers as optimizers_module

OPTIMIZERS = {
    "sgd": lambda p: SGD(p, lr=0.1),
    "sgd-momentum-wd": lambda p: SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "sgd-nesterov": lambda p: SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: Adam(p, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda p: AdamW(p, lr=1e-2),
    "rmsprop": lambda p: RMSprop(p, lr=1e-2, weight_decay=1e-2),
    "rmsprop-centered-momentum": lambda p: RMSprop(p, lr=1e-2, momentum=0.9, centered=True),
}


def _run(make, steps: int, immutable: bool, monkeypatch):
    rng = np.random.default_rng(0)
    params = [Parameter(rng.normal(size=(7, 5))), Parameter(rng.normal(size=(3,)))]
    opt = make(params)
    seen = []
    with monkeypatch.context() as m:
        if immutable:
            m.setattr(optimizers_module, "writes_in_place", lambda xp: False)
        for _ in range(steps):
            for p in params:
                p.grad = rng.normal(size=p.shape)
            before = [(p.data, p.data.copy()) for p in params]
            state = [(a, a.copy()) for s in opt.state for k, a in s.items() if k != "step"]
            opt.step()
            seen.append((before, state))
    return [p.data for p in params], opt, seen


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_functional_updates_equal_in_place_updates_and_leave_inputs_alone(name, monkeypatch):
    want, _, _ = _run(OPTIMIZERS[name], 5, False, monkeypatch)
    got, opt, seen = _run(OPTIMIZERS[name], 5, True, monkeypatch)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    for before, state in seen:  # immutable semantics: nothing given was written to
        for array, copy in before + state:
            np.testing.assert_array_equal(array, copy)
    assert all(s["step"] == 5 for s in opt.state)


def test_ema_functional_updates_equal_in_place_updates_and_leave_inputs_alone(monkeypatch):
    from anycnn.nn import Dense
    from anycnn.optim import EMA
    from anycnn.optim import ema as ema_module

    def run(immutable):
        rng = np.random.default_rng(0)
        with anycnn.use_backend("numpy"):
            anycnn.manual_seed(0)
            model = Dense(7, 5)
            model.to("float64")
            ema = EMA(model, 0.9)
            seen = []
            with monkeypatch.context() as m:
                if immutable:
                    m.setattr(ema_module, "writes_in_place", lambda xp: False)
                for _ in range(4):
                    for p in model.parameters():
                        p.data = p.data + rng.normal(size=p.shape)
                    before = [(a, a.copy()) for a in ema.averages.values()]
                    ema.update()
                    seen.append(before)
        return ema.averages, seen

    want, _ = run(False)
    got, seen = run(True)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    for before in seen[1:]:  # after the first update (a copy): nothing given was written to
        for array, copy in before:
            np.testing.assert_array_equal(array, copy)


class Frozen:
    """An immutable array stand-in: ``a += 1`` makes a new object, as JAX arrays do."""

    def __init__(self, value):
        self.value = np.asarray(value, dtype=np.float64)

    def __iadd__(self, other):
        return Frozen(self.value + other)

    def __array__(self, dtype=None, copy=None):
        return self.value


class FrozenNamespace:
    __name__ = "frozenlib"

    @staticmethod
    def zeros(n):
        return Frozen(np.zeros(n))


def test_writes_in_place_knows_the_backends_and_probes_the_rest():
    import array_api_compat.numpy

    assert backend.writes_in_place(array_api_compat.numpy)
    try:
        import jax.numpy
    except ImportError:
        pass
    else:  # "jax.numpy": JAX's, not NumPy's, whatever the name's last part says
        assert not backend.writes_in_place(jax.numpy)
    assert not backend.writes_in_place(FrozenNamespace())
    with pytest.raises(BackendError, match="frozenlib arrays are immutable"):
        backend.require_in_place(FrozenNamespace(), "an optimizer step")


def test_in_place_fast_path_refuses_immutable_arrays():
    with pytest.raises(BackendError, match=r"fastpath\.update_rows updates arrays in place"):
        fastpath.update_rows(FrozenNamespace(), lambda w: None, np.zeros(3))


def test_to_numpy_refuses_arrays_it_cannot_read():
    class GraphNode:  # a lazy graph value: no __array__, no DLPack
        pass

    with pytest.raises(BackendError, match=r"cannot copy a .*GraphNode to the host"):
        backend.to_numpy(GraphNode())


def test_a_device_of_none_follows_the_other_arrays(monkeypatch):
    strict = pytest.importorskip("array_api_strict")
    import array_api_compat

    a = strict.asarray([1.0, 2.0])
    b = strict.asarray([1.0, 2.0], device=strict.Device("device1"))
    with pytest.raises(anycnn.BackendMismatchError, match="different devices"):
        backend.namespace_of(a, b)
    real = array_api_compat.device
    monkeypatch.setattr(array_api_compat, "device", lambda x: None if x is b else real(x))
    assert backend.namespace_of(a, b) is array_api_compat.array_namespace(a)  # b: traced


@pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                    reason="jax is not installed (pip install -r backends/jax.txt)")
@pytest.mark.parametrize("name", ["sgd-momentum-wd", "adam", "adamw",
                                  "rmsprop-centered-momentum"])
def test_optimizers_on_jax_give_numpys_weights(name):
    from anycnn.models import build_model
    from anycnn.nn import SoftmaxCrossEntropy

    def train(backend_name):
        with anycnn.use_backend(backend_name):
            anycnn.manual_seed(0)
            model = build_model("lenet5")
            model.to("float64")
            opt = OPTIMIZERS[name](model.parameters())
            loss_fn, rng = SoftmaxCrossEntropy(), np.random.default_rng(0)
            for _ in range(5):
                x = anycnn.asarray(rng.random((8, 28, 28, 1)), dtype="float64")
                y = anycnn.asarray(rng.integers(0, 10, 8))
                model.zero_grad()
                loss_fn.forward(model.forward(x), y)
                model.backward(loss_fn.backward(), input_grad=False)
                opt.step()
            return {k: anycnn.to_numpy(v) for k, v in model.state_dict().items()}

    want, got = train("numpy"), train("jax")
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-10, err_msg=key)
