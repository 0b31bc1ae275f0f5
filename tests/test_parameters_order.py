"""``Module.parameters()`` lists exactly what ``named_parameters()`` yields, in its order, for
nested containers, and asks a module that overrides ``named_parameters`` itself."""

from __future__ import annotations

import anycnn
from anycnn import layers as L
from anycnn.models import build_model
from anycnn.nn.module import Module, Parameter


def _same(model: Module) -> None:
    named = [p for _, p in model.named_parameters()]
    listed = model.parameters()
    assert len(listed) == len(named)
    assert all(a is b for a, b in zip(listed, named, strict=True))


def test_parameters_follow_named_parameters_in_nested_models():
    anycnn.manual_seed(0)
    _same(build_model("resnet20"))
    _same(anycnn.nn.Sequential(L.Conv2D(3, 8, 3), anycnn.nn.Sequential(L.BatchNorm2D(8),
                                                                       L.ReLU()),
                               L.Flatten(), L.Dense(8, 2, bias=False)))


class _Tied(Module):
    """Lists a parameter it keeps in a dict, which attribute scanning would not find."""

    def __init__(self) -> None:
        self.store = {"w": Parameter(anycnn.asarray([1.0, 2.0]))}

    def named_parameters(self, prefix: str = ""):
        yield prefix + "store.w", self.store["w"]


def test_an_overriding_module_is_asked():
    anycnn.manual_seed(0)
    tied = _Tied()
    model = anycnn.nn.Sequential(L.Dense(2, 2), tied)
    _same(model)
    assert model.parameters()[-1] is tied.store["w"]
