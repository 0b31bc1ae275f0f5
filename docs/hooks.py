"""MkDocs hooks: the API reference must cover every public name of anycnn.

A public name is one a package re-exports (the ``_EXPORTS`` table of ``anycnn`` and of each
subpackage) or one listed in ``EXTRA`` below (names the guides teach from modules without such a
table). Each must have a docstring and a ``::: module.Name`` entry on a page under ``docs/api/``,
and that entry must be rendered (its anchor present in the built HTML). A miss fails the build;
``tests/test_docs.py`` runs the same checks without building.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

DOCS = Path(__file__).parent
PACKAGES = ("anycnn", "anycnn.nn", "anycnn.data", "anycnn.optim", "anycnn.train", "anycnn.io",
            "anycnn.dist")
#: module -> public names of modules that have no ``_EXPORTS`` table
EXTRA = {
    "anycnn.backend": ("namespace_of", "backend_names"),
    "anycnn.backends.spec": ("BackendSpec",),
    "anycnn.train.view": ("TrainerView",),
    "anycnn.models": ("model_spec", "build_model", "check_image_size", "canonical_model_name",
                      "resnet18", "resnet34", "resnet50",
                      "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
                      "efficientnet_b0", "convnext_tiny"),
    "anycnn.models.backbone": ("Backbone",),
    "anycnn.testing": ("check_gradients", "GradientReport", "GradientCheckError"),
}
_ENTRY = re.compile(r"^::: ([\w.]+)\s*$", re.MULTILINE)


def public_objects() -> dict[str, object]:
    """``{canonical path: object}`` of every public name (``anycnn.nn.layers.Conv2D``, ...)."""
    found = {}
    tables = [(p, list(importlib.import_module(p)._EXPORTS)) for p in PACKAGES]
    for package, names in [*tables, *EXTRA.items()]:
        module = importlib.import_module(package)
        for name in names:
            obj = getattr(module, name)
            found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def api_entries() -> set[str]:
    """The ``::: path`` entries of the pages under ``docs/api/``."""
    return {m for page in sorted((DOCS / "api").glob("*.md"))
            for m in _ENTRY.findall(page.read_text(encoding="utf-8"))}


def problems() -> list[str]:
    """Public names without a docstring or without a reference entry (empty when all is well)."""
    entries = api_entries()
    out = []
    for path, obj in sorted(public_objects().items()):
        if not (getattr(obj, "__doc__", None) or "").strip():
            out.append(f"{path} has no docstring")
        if path not in entries:
            out.append(f"{path} has no '::: {path}' entry under docs/api/")
    return out


def unrendered(site_dir: Path) -> list[str]:
    """Public names whose entry has no anchor in the built API pages."""
    html = "".join(p.read_text(encoding="utf-8") for p in (site_dir / "api").rglob("*.html"))
    return [path for path in sorted(public_objects()) if f'id="{path}"' not in html]


def on_pre_build(config, **kwargs) -> None:
    from mkdocs.exceptions import PluginError

    found = problems()
    if found:
        raise PluginError("API reference incomplete:\n  " + "\n  ".join(found))


def on_post_build(config, **kwargs) -> None:
    from mkdocs.exceptions import PluginError

    missing = unrendered(Path(config["site_dir"]))
    if missing:
        raise PluginError("API entries not rendered:\n  " + "\n  ".join(missing))
