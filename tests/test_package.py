"""The package layout: every name a package re-exports resolves to the object its module defines,
and importing the packages loads no array library."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import anycnn

PACKAGES = ["anycnn", "anycnn.nn", "anycnn.data", "anycnn.train", "anycnn.optim", "anycnn.io",
            "anycnn.dist"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_export_resolves_to_its_definition(package):
    pkg = importlib.import_module(package)
    for name, module in pkg._EXPORTS.items():
        defined = getattr(importlib.import_module(f".{module}", package), name)
        assert getattr(pkg, name) is defined, name
    for name, module in pkg._SUBMODULES.items():
        assert getattr(pkg, name) is importlib.import_module(f"{package}.{module}"), name
    assert set(pkg.__all__) <= set(dir(pkg))


def test_old_flat_names_stay_attributes_of_anycnn():
    assert anycnn.layers is importlib.import_module("anycnn.nn.layers")
    assert anycnn.optim.SGD is importlib.import_module("anycnn.optim.optimizers").SGD
    assert anycnn.datasets.load_dataset is anycnn.data.load_dataset
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        anycnn.nn.nonexistent  # noqa: B018


def test_importing_the_packages_loads_no_array_library():
    code = ("import sys, anycnn, anycnn.nn, anycnn.data, anycnn.train, anycnn.optim, anycnn.io, "
            "anycnn.cli\nprint(sorted(m for m in ('numpy', 'torch', 'cupy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
