"""torchvision's published ImageNet weights: where they are, how to check them, how their inputs
were prepared, and the 1000 class names.

:data:`PRETRAINED` pins, for each architecture of :mod:`anycnn.models` built with torchvision's
tensor names, the weight files torchvision publishes (``https://download.pytorch.org/models/``)
as :class:`PretrainedWeights`. ``weights="imagenet"`` is :data:`DEFAULT`, torchvision's own
default (``weights="DEFAULT"``): ``IMAGENET1K_V1`` where it is the only file, ``IMAGENET1K_V2``
for ``resnet50``, ``mobilenet_v2`` and ``mobilenet_v3_large``, whose second file scores higher on
ImageNet (top-1 80.86 vs 76.13, 72.15 vs 71.88, 75.27 vs 74.04) with the same architecture
and tensors; ``"imagenet1k_v1"`` / ``"imagenet1k_v2"`` pick a file explicitly.

**Checking.** torchvision publishes no full SHA-256 of its files, only the first 8 hex digits of
it, in the file name (``resnet18-f37072fd.pth``; ``torch.hub`` checks the same prefix). A
download is kept only when its SHA-256 starts with that prefix (a full digest is checked in full
where one is pinned: ``efficientnet_b0``'s). A mismatch is refused and the file deleted.

**Where files go.** :func:`weight_file` looks for the file in the user cache
(``$XDG_CACHE_HOME/anycnn/weights/``, default ``~/.cache/anycnn/weights/``), then in torch's hub
cache (``$TORCH_HOME/hub/checkpoints/``, default ``~/.cache/torch/hub/checkpoints/``), using a
copy only if its hash matches (a bad copy in anycnn's cache is deleted and fetched again);
otherwise it downloads into the user cache, through a temporary file, from the published URL or
from ``<base_url>/<file name>`` where ``base_url`` (or ``$ANYCNN_WEIGHTS_URL``) names a mirror.

**Preprocessing** (:meth:`PretrainedWeights.preprocess`): what torchvision's eval transform for
those weights does, as data: resize the shorter side to ``resize`` pixels with the
``interpolation`` filter, take the central ``crop`` x ``crop`` square, scale to ``[0, 1]`` and
normalise with ImageNet's ``mean`` and ``std`` (RGB).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, DataError
from .weights import import_torch

#: environment variable naming a mirror of torchvision's weight files (``<URL>/<file name>``)
URL_ENV = "ANYCNN_WEIGHTS_URL"
#: the user-cache folder (under ``~/.cache/anycnn/``) weight files are downloaded into
CACHE_NAME = "weights"
#: ImageNet's per-channel mean and standard deviation of ``[0, 1]`` RGB pixels
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the package file holding the 1000 ImageNet class names, one a line, in class order
CLASSES_FILE = "imagenet_classes.txt"


@dataclass(frozen=True)
class PretrainedWeights:
    """One published weight file.

    Attributes:
        arch: the architecture (``anycnn.models.MODELS`` name, torchvision's builder name).
        tag: torchvision's name of the weights (``"IMAGENET1K_V1"``).
        url: where torchvision publishes the file.
        sha256: the file's SHA-256, or its first 8 (or more) hex digits (torchvision publishes
            only those, in the file name).
        resize, crop, interpolation: the eval preprocessing (module docstring).
        top1: torchvision's published ImageNet-1K top-1 accuracy, percent.
    """

    arch: str
    tag: str
    url: str
    sha256: str
    resize: int
    crop: int
    top1: float
    interpolation: str = "bilinear"

    @property
    def filename(self) -> str:
        """The file name (the URL's last part)."""
        return self.url.rsplit("/", 1)[-1]

    def preprocess(self) -> dict[str, Any]:
        """``{"resize", "crop", "mean", "std", "interpolation"}``: the eval preprocessing, as
        JSON-able data."""
        return {"resize": self.resize, "crop": self.crop, "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD), "interpolation": self.interpolation}

    def record(self) -> dict[str, Any]:
        """What :func:`anycnn.load_weights` attaches to a model as ``model.pretrained``:
        ``{"weights": "imagenet", "name", "tag", "url", "sha256", "top1", "preprocess",
        "classes"}`` (``classes``: the 1000 names)."""
        return {"weights": "imagenet", "name": self.arch, "tag": self.tag, "url": self.url,
                "sha256": self.sha256, "top1": self.top1, "preprocess": self.preprocess(),
                "classes": list(imagenet_classes())}


def _tv(arch: str, tag: str, file: str, top1: float, resize: int = 256, crop: int = 224,
        interpolation: str = "bilinear", sha256: str | None = None) -> PretrainedWeights:
    prefix = file.rsplit("-", 1)[-1].split(".")[0]
    return PretrainedWeights(arch, tag, f"https://download.pytorch.org/models/{file}",
                             sha256 or prefix, resize, crop, top1, interpolation)


# From torchvision 0.28's models/{resnet,mobilenetv2,mobilenetv3,efficientnet,convnext}.py
# (each *_Weights enum: url, ImageClassification's crop_size/resize_size/interpolation, acc@1).
# efficientnet_b0's full SHA-256 is the digest torch.hub reports for that file (quoted in
# pytorch/vision issues #7744 and #8064, which renamed the file to carry its prefix).
PRETRAINED: dict[str, dict[str, PretrainedWeights]] = {
    "resnet18": {"IMAGENET1K_V1": _tv("resnet18", "IMAGENET1K_V1", "resnet18-f37072fd.pth",
                                      69.758)},
    "resnet34": {"IMAGENET1K_V1": _tv("resnet34", "IMAGENET1K_V1", "resnet34-b627a593.pth",
                                      73.314)},
    "resnet50": {
        "IMAGENET1K_V1": _tv("resnet50", "IMAGENET1K_V1", "resnet50-0676ba61.pth", 76.130),
        "IMAGENET1K_V2": _tv("resnet50", "IMAGENET1K_V2", "resnet50-11ad3fa6.pth", 80.858,
                             resize=232),
    },
    "mobilenet_v2": {
        "IMAGENET1K_V1": _tv("mobilenet_v2", "IMAGENET1K_V1", "mobilenet_v2-b0353104.pth",
                             71.878),
        "IMAGENET1K_V2": _tv("mobilenet_v2", "IMAGENET1K_V2", "mobilenet_v2-7ebf99e0.pth",
                             72.154, resize=232),
    },
    "mobilenet_v3_small": {
        "IMAGENET1K_V1": _tv("mobilenet_v3_small", "IMAGENET1K_V1",
                             "mobilenet_v3_small-047dcff4.pth", 67.668),
    },
    "mobilenet_v3_large": {
        "IMAGENET1K_V1": _tv("mobilenet_v3_large", "IMAGENET1K_V1",
                             "mobilenet_v3_large-8738ca79.pth", 74.042),
        "IMAGENET1K_V2": _tv("mobilenet_v3_large", "IMAGENET1K_V2",
                             "mobilenet_v3_large-5c1a4163.pth", 75.274, resize=232),
    },
    "efficientnet_b0": {
        "IMAGENET1K_V1": _tv(
            "efficientnet_b0", "IMAGENET1K_V1", "efficientnet_b0_rwightman-7f5810bc.pth",
            77.692, interpolation="bicubic",
            sha256="7f5810bc96def8f7552d5b7e68d53c4786f81167d28291b21c0d90e1fca14934"),
    },
    "convnext_tiny": {
        "IMAGENET1K_V1": _tv("convnext_tiny", "IMAGENET1K_V1", "convnext_tiny-983f1562.pth",
                             82.520, resize=236),
    },
}

#: the file ``weights="imagenet"`` means for each architecture (torchvision's default)
DEFAULT = {arch: ("IMAGENET1K_V2" if "IMAGENET1K_V2" in files else "IMAGENET1K_V1")
           for arch, files in PRETRAINED.items()}


def is_weights_name(source: Any) -> bool:
    """Whether ``source`` names published weights (``"imagenet"``, ``"imagenet1k_v1"``,
    ``"imagenet1k_v2"``, any case) rather than a file path. Only strings are names."""
    return isinstance(source, str) and source.lower() in ("imagenet", "imagenet1k_v1",
                                                          "imagenet1k_v2")


def lookup(arch: str, weights: str = "imagenet") -> PretrainedWeights:
    """The pinned file for architecture ``arch`` and weights name ``weights``.

    Raises:
        ConfigError: no published weights for ``arch`` (those with some are listed), or no
            such version for it (its versions are listed).
    """
    from ..models import canonical_model_name

    try:  # any case, - and _ alike, as build_model
        arch = canonical_model_name(arch, PRETRAINED)
    except ConfigError:
        pass  # said below
    files = PRETRAINED.get(arch)
    if files is None:
        raise ConfigError(f"no published ImageNet weights for model {arch!r}; models with "
                          f"them: {', '.join(PRETRAINED)}")
    tag = DEFAULT[arch] if weights.lower() == "imagenet" else weights.upper()
    if tag not in files:
        raise ConfigError(f"model {arch!r} has no {weights!r} weights; it has "
                          f"{', '.join(t.lower() for t in files)} ('imagenet' is "
                          f"{DEFAULT[arch].lower()})")
    return files[tag]


@functools.cache
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1K class names in class-index order (torchvision's names, shipped in
    the package as ``anycnn/io/imagenet_classes.txt``)."""
    text = resources.files(__package__).joinpath(CLASSES_FILE).read_text(encoding="utf-8")
    names = tuple(line for line in text.splitlines() if line)
    if len(names) != 1000:  # pragma: no cover - a broken installation
        raise DataError(f"{CLASSES_FILE} in the anycnn package holds {len(names)} names, "
                        "not 1000: reinstall anycnn")
    return names


def _torch_cache() -> Path:
    home = os.environ.get("TORCH_HOME")
    if not home:
        root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        home = str(Path(root) / "torch")
    return Path(home) / "hub" / "checkpoints"


def weight_file(entry: PretrainedWeights, base_url: str | None = None,
                progress: bool = True) -> Path:
    """The local path of ``entry``'s file, checked against its pinned hash: a cached copy, or
    a fresh download (module docstring).

    Raises:
        DataError: the download failed (each URL tried is named with its error, and where to
            put the file by hand is said) or its hash differs from the pin (the file is
            deleted).
    """
    from ..data.sources import cache_dir, fetch, sha256_matches, sha256_of

    own = cache_dir(CACHE_NAME) / entry.filename
    for path in (own, _torch_cache() / entry.filename):
        if path.is_file():
            if sha256_matches(sha256_of(path), entry.sha256):
                return path
            if path == own:  # never keep a bad file of ours
                path.unlink(missing_ok=True)
    base_url = base_url or os.environ.get(URL_ENV)
    bases = [base_url.rstrip("/") + "/"] if base_url else [entry.url.rsplit("/", 1)[0] + "/"]
    hint = (f"Download {entry.url} yourself and put it in {own.parent}/, or load it with "
            f"anycnn.load_weights(model, PATH); ${URL_ENV} names a mirror")
    return fetch(f"{entry.arch} {entry.tag} weights", entry.filename, bases, own, entry.sha256,
                 progress, hint)


def load_pretrained(model: Any, weights: str = "imagenet", *, arch: str | None = None,
                    strict: bool = True, base_url: str | None = None,
                    progress: bool = True) -> Any:
    """Load published weights into ``model`` (what :func:`anycnn.load_weights` does for a
    weights name); returns the :class:`~anycnn.nn.module.LoadResult`.

    ``arch`` defaults to ``model.model_spec["name"]`` (set by
    :func:`anycnn.models.build_model`). After loading, ``model.pretrained`` is
    :meth:`PretrainedWeights.record` and ``model.class_names`` the 1000 class names.

    Raises:
        ConfigError: no architecture known, or no such weights for it.
        CheckpointError: PyTorch is not installed (said before anything is downloaded), or
            the tensors do not fit the model.
        DataError: as :func:`weight_file`.
    """
    from .interop import from_torch_state_dict
    from .weights import read_state_dict

    if arch is None:
        spec = getattr(model, "model_spec", None)
        arch = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(arch, str):
            raise ConfigError(f"which architecture are {weights!r} weights for? The model has "
                              "no model_spec (it was not built by anycnn.models.build_model): "
                              "pass arch=, e.g. load_weights(model, 'imagenet', "
                              "arch='resnet18')")
    entry = lookup(arch, weights)
    import_torch(entry.filename, f"loading torchvision's {arch} weights (a .pth file)")
    path = weight_file(entry, base_url, progress)
    try:
        result = from_torch_state_dict(model, read_state_dict(path), strict=strict)
    except CheckpointError as exc:
        spec = getattr(model, "model_spec", None)
        classes = spec.get("num_classes") if isinstance(spec, dict) else None
        if classes is None or classes == len(imagenet_classes()) or "reset_classifier" in str(exc):
            raise
        raise CheckpointError(f"{exc}; ImageNet weights have {len(imagenet_classes())} "
                              f"classes and this model {classes}: build it with "
                              f"num_classes={len(imagenet_classes())}, load, then replace "
                              "its head") from exc
    model.pretrained = entry.record()
    model.class_names = list(model.pretrained["classes"])
    return result


def pretrained(name: str, weights: str | os.PathLike = "imagenet", num_classes: int | None = None,
               *, base_url: str | None = None, progress: bool = True) -> Any:
    """Build torchvision architecture ``name`` with trained weights (``anycnn.pretrained``):
    ``weights="imagenet"`` (torchvision's published file, as :func:`anycnn.load_weights`
    downloads it) or the path of a weight file in torchvision's names (``.safetensors``,
    ``.pth``). With ``num_classes`` other than the file's, the classifier is then replaced by
    a new one (:meth:`~anycnn.models.backbone.Backbone.reset_classifier`), ready for
    fine-tuning::

        model = anycnn.pretrained("resnet18", "imagenet", num_classes=5)

    Raises:
        ConfigError: an unknown architecture, or no such published weights.
        CheckpointError, DataError: as :func:`anycnn.load_weights`.
    """
    from ..models import build_model
    from .checkpoint import load_weights
    from .interop import from_torch_state_dict
    from .weights import read_state_dict

    if is_weights_name(weights):
        model = build_model(name, num_classes=len(imagenet_classes()))
        load_weights(model, weights, base_url=base_url, progress=progress)
    else:
        state = read_state_dict(weights)
        model = build_model(name)
        head = state.get(f"{model.head}.weight")
        if head is None:
            raise CheckpointError(f"{weights}: no {model.head}.weight, the classifier of "
                                  f"{name}: is it a {name} weight file?")
        if int(head.shape[0]) != model.model_spec["num_classes"]:  # the file's class count
            model.reset_classifier(int(head.shape[0]))
        from_torch_state_dict(model, state)
    if num_classes is not None and num_classes != model.model_spec["num_classes"]:
        model.reset_classifier(num_classes)
    return model
