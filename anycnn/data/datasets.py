"""Datasets: IDX files on disk, a bundled MNIST sample, and the full MNIST / Fashion-MNIST.

CIFAR-10 / CIFAR-100 are read by :mod:`anycnn.data.cifar` (same lookup order, same download checks);
:func:`load_dataset` loads every built-in dataset by name.

Layouts (what every loader returns):

* images: ``np.uint8``, shape ``(N, H, W, C)``, channels last (NHWC); MNIST-style data have
  ``C = 1``.
* labels: ``np.int64``, shape ``(N,)``, each in ``[0, num_classes)``.

Data stay on the host here as raw ``uint8``; :class:`anycnn.data.DataLoader` scales batches to
``[0, 1]`` floats and moves them to the current backend. An :class:`ArrayDataset` built from your
own arrays may also hold ``float32`` / ``float64`` images already in ``[0, 1]``, which the
DataLoader uses as they are.

Where :func:`load_dataset` looks for ``mnist`` / ``fashion-mnist`` (each file may be gzipped,
``NAME.gz``, or not, ``NAME``): an explicit ``data_dir`` is the only place looked at (it, or its
``<name>/`` subfolder, must hold all four files; otherwise the error names the missing ones, with no
fall back and no download). Without one, the first directory holding all four files wins:

1. ``$ANYCNN_DATA/<name>/``;
2. the user cache ``$XDG_CACHE_HOME/anycnn/<name>/`` (default ``~/.cache/anycnn/<name>/``);
3. ``/usr/share/datasets/<name>/`` (Debian's ``dataset-fashion-mnist`` installs Fashion-MNIST there;
   Debian has no MNIST package, the same layout is searched for it anyway).

Otherwise, if ``download`` is true, the missing ``.gz`` files are fetched into the user cache and
checked against pinned SHA-256 digests (:data:`SHA256`). Local files are not checked against those
digests: Debian recompresses its copies, so their bytes differ from the upstream archives, and
:func:`read_idx` validates every file's structure anyway.
"""

from __future__ import annotations

import gzip
import importlib.resources
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .arrays import IMAGE_DTYPES, ArrayDataset, Splits  # noqa: F401 (also importable from here)
from .sources import (  # noqa: F401 (also importable from here)
    DATA_ENV,
    DOWNLOAD_TIMEOUT,
    SYSTEM_DATA_DIR,
    URL_ENV,
    cache_dir,
    download_bases,
    fetch,
    search_dirs,
    search_list,
)

#: The CIFAR datasets, read from their official binary version by :mod:`anycnn.data.cifar`.
CIFAR_DATASETS = ("cifar10", "cifar100")
DATASETS = ("mnist-sample", "mnist", "fashion-mnist", *CIFAR_DATASETS)

#: The four IDX files of a full dataset, by role.
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: Where the ``.gz`` archives are downloaded from, tried in order. ``$ANYCNN_DATA_URL`` (or the
#: ``base_url`` argument) replaces this list by one root URL that holds ``<name>/<file>.gz``.
MIRRORS = {
    "mnist": (
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
}

#: SHA-256 of the upstream ``.gz`` archives; a download is kept only if its digest matches.
#: MNIST t10k: computed from the canonical files bundled in ``anycnn/data``. MNIST train and all of
#: Fashion-MNIST: the digests published for the upstream archives (the Fashion-MNIST ones belong to
#: the files whose MD5s the Zalando README lists; Debian's recompressed copies differ).
SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz":
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz":
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz":
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz":
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz":
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz":
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz":
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz":
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}

CLASS_NAMES = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
}

SAMPLE_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
SAMPLE_SPLIT_SEED = 1998  # fixed: everyone gets the same 8,000 / 2,000 split of the sample
SAMPLE_TRAIN_SIZE = 8000


# ---------------------------------------------------------------------------------------- IDX files

# IDX type code -> big-endian NumPy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CHUNK = 1 << 20


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped when it starts with ``1f 8b``, raw otherwise).

    Returns an array of the file's shape and dtype (uint8 for MNIST), in native byte order.
    The file is parsed as data only: the header is at most 20 bytes, and the payload is read in
    chunks, never more than the header claims nor more than the file holds, so a forged header
    cannot make the reader allocate beyond the file's own content.

    Raises:
        DataError: naming the file, when it is missing, is not IDX, its header is malformed, its
            data are truncated or followed by trailing bytes, or its gzip stream is corrupt.
    """
    path = Path(path)
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc.strerror or exc})") from exc
    with raw:
        if raw.read(2) != b"\x1f\x8b":
            raw.seek(0)
            return _parse_idx(raw, path)
        raw.seek(0)
        try:
            with gzip.GzipFile(fileobj=raw) as stream:
                return _parse_idx(stream, path)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt gzip stream ({exc})") from exc


def _read_upto(stream, limit: int) -> bytearray:
    """Up to ``limit`` bytes of ``stream``, read in chunks (never allocates more than it gets)."""
    out = bytearray()
    while len(out) < limit:
        chunk = stream.read(min(_CHUNK, limit - len(out)))
        if not chunk:
            break
        out += chunk
    return out


def _parse_idx(stream, path: Path) -> np.ndarray:
    """Parse the IDX content of an open binary ``stream``; see :func:`read_idx`."""
    header = _read_upto(stream, 4)
    if len(header) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(header)} bytes)")
    if header[0] != 0 or header[1] != 0:
        raise DataError(f"{path}: not an IDX file (magic starts {bytes(header[:2]).hex()}, "
                        "expected 0000)")
    code, ndim = header[2], header[3]
    if code not in _IDX_DTYPES:
        valid = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX data type code 0x{code:02x} (valid: {valid})")
    if not 1 <= ndim <= 4:
        raise DataError(f"{path}: IDX header gives {ndim} dimensions; expected 1 to 4")
    dims_raw = _read_upto(stream, 4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise DataError(f"{path}: truncated header: {ndim} dimension sizes need {4 * ndim} bytes, "
                        f"found {len(dims_raw)}")
    shape = struct.unpack(f">{ndim}I", dims_raw)
    if 0 in shape:
        raise DataError(f"{path}: IDX header gives an empty dimension: shape {shape}")
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = math.prod(shape) * dtype.itemsize
    data = _read_upto(stream, expected)  # a huge claimed size only reads what the file has
    if len(data) < expected:
        raise DataError(f"{path}: truncated: expected {expected} bytes of data for shape {shape}, "
                        f"found {len(data)}")
    extra = len(stream.read(_CHUNK))  # one chunk is enough to tell (no gzip-bomb scan)
    if extra:
        count = f"at least {extra}" if extra == _CHUNK else str(extra)
        raise DataError(f"{path}: {count} trailing bytes after the {expected} bytes of data "
                        f"for shape {shape}")
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


# --------------------------------------------------------------------------------------- loading


def validation_is_test(name: str) -> bool:
    """Whether :func:`load_dataset` returns the test split as the validation split of
    dataset ``name`` (true of every built-in dataset: none of them publishes a separate
    validation split), so that validation figures are test figures."""
    return str(name).strip().lower().replace("_", "-") in DATASETS


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = True,
                 progress: bool = True, base_url: str | None = None) -> Splits:
    """Load a dataset by name (see :data:`DATASETS`).

    * ``mnist-sample``: the 10,000 MNIST test images bundled with anycnn, split by a fixed
      permutation into 8,000 train and 2,000 validation images; ``test`` is ``val``. Needs no
      files and no network.
    * ``mnist``, ``fashion-mnist``: 60,000 train images; ``val`` is the official 10,000-image test
      set, and ``test`` is that same set (these datasets publish no separate validation split).
      Files are looked up as the module docstring says: only in ``data_dir`` when it is given;
      else ``download`` allows fetching missing ones into the user cache (from ``base_url``
      or ``$ANYCNN_DATA_URL`` if set, else :data:`MIRRORS`), with a progress bar when
      ``progress`` is true and stderr is a terminal.

    * ``cifar10``, ``cifar100``: 50,000 train images, ``val`` and ``test`` the official
      10,000-image test set; see :func:`anycnn.data.cifar.load_cifar`.

    Images are ``uint8`` NHWC ``(N, 28, 28, 1)`` (``(N, 32, 32, 3)`` for CIFAR), labels
    ``int64`` ``(N,)``.

    Raises:
        ConfigError: unknown name.
        DataError: files missing (the message lists where to put them, or which files an
            explicit ``data_dir`` lacks), malformed, or a download failed or did not match its
            pinned SHA-256.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if key == "mnist-sample":
        return _load_sample()
    if key in CIFAR_DATASETS:
        from .cifar import load_cifar

        return load_cifar(key, data_dir, download=download, progress=progress, base_url=base_url)
    directory = find_dataset_dir(key, data_dir)
    if directory is None and data_dir is not None:
        raise DataError(_missing_in(key, Path(data_dir)))
    if directory is None:
        if not download:
            raise DataError(f"dataset {key!r} not found and download=False. "
                            f"{_where_to_put(key)}")
        directory = _download_dataset(key, progress, base_url)
    train = _read_pair(directory, "train", key)
    test = _read_pair(directory, "test", key)
    if train.image_shape != test.image_shape:
        raise DataError(f"{directory}: train images are {train.image_shape} but test images are "
                        f"{test.image_shape}")
    return Splits(name=key, train=train, val=test, test=test, source=str(directory),
                  class_names=CLASS_NAMES[key])


def _load_sample() -> Splits:
    resources = importlib.resources.files("anycnn") / "data"
    arrays = []
    for filename in SAMPLE_FILES:
        with importlib.resources.as_file(resources / filename) as path:
            arrays.append(read_idx(path))
    full = _to_dataset(*arrays, num_classes=10, where="bundled mnist-sample")
    order = np.random.default_rng(SAMPLE_SPLIT_SEED).permutation(len(full))
    train = full.subset(np.sort(order[:SAMPLE_TRAIN_SIZE]))
    val = full.subset(np.sort(order[SAMPLE_TRAIN_SIZE:]))
    return Splits(name="mnist-sample", train=train, val=val, test=val,
                  source="bundled MNIST t10k sample (anycnn/data), split 8000/2000",
                  class_names=CLASS_NAMES["mnist"])


def _to_dataset(images: np.ndarray, labels: np.ndarray, num_classes: int,
                where: str) -> ArrayDataset:
    """Wrap IDX arrays ``(N, H, W)`` uint8 and ``(N,)`` as an NHWC :class:`ArrayDataset`."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{where}: expected uint8 images of shape (N, H, W), got "
                        f"{images.dtype} of shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{where}: expected labels of shape (N,), got shape {labels.shape}")
    try:
        return ArrayDataset(images[..., None], labels, num_classes)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from exc


def _read_pair(directory: Path, split: str, key: str) -> ArrayDataset:
    images_path = _find_file(directory, FILES[f"{split}_images"])
    labels_path = _find_file(directory, FILES[f"{split}_labels"])
    return _to_dataset(read_idx(images_path), read_idx(labels_path),
                       num_classes=len(CLASS_NAMES[key]), where=f"{directory} ({split})")


def _find_file(directory: Path, stem: str) -> Path | None:
    """``directory/stem.gz`` or ``directory/stem``, whichever exists (gzipped first)."""
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def find_dataset_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first of :func:`search_dirs` that holds all four files of ``name``, or ``None``."""
    for directory in search_dirs(name, data_dir):
        if all(_find_file(directory, stem) for stem in FILES.values()):
            return directory
    return None


def _missing_in(name: str, data_dir: Path) -> str:
    """Why an explicit ``data_dir`` does not hold dataset ``name``: the files it lacks."""
    if not data_dir.is_dir():
        return f"data dir {data_dir}: no such directory (it should hold the {name} IDX files)"
    best = max((data_dir / name, data_dir), key=lambda d: sum(
        _find_file(d, stem) is not None for stem in FILES.values()))
    missing = [f"{stem}[.gz]" for stem in FILES.values() if _find_file(best, stem) is None]
    return (f"data dir {best} lacks {len(missing)} of the 4 {name} files: {', '.join(missing)} "
            f"(an explicit data dir is the only place looked at)")


def _where_to_put(name: str) -> str:
    """Instructions naming the files and the directories searched for them, in order."""
    files = ", ".join(f"{stem}.gz" for stem in FILES.values())
    text = (f"Put the four files {files} (gzipped or not) into one of these directories, "
            "searched in this order:\n" + search_list(name))
    if name == "fashion-mnist":
        text += "\nOn Debian/Ubuntu: apt install dataset-fashion-mnist"
    return text


# -------------------------------------------------------------------------------------- download


def _download_dataset(name: str, progress: bool, base_url: str | None) -> Path:
    """Fetch the missing ``.gz`` files of ``name`` into :func:`cache_dir`; return that dir."""
    bases = download_bases(name, base_url, MIRRORS[name])
    target = cache_dir(name)
    for stem in FILES.values():
        if _find_file(target, stem):
            continue
        filename = f"{stem}.gz"
        fetch(name, filename, bases, target / filename, SHA256[name][filename], progress,
              hint=_where_to_put(name))
    return target


def __getattr__(name: str):
    """``ImageFolder`` and ``load_image_folder`` live in :mod:`anycnn.data.imagefolder`; they
    are re-exported here lazily, on first access (this module never imports it at load time)."""
    if name in ("ImageFolder", "load_image_folder"):
        from . import imagefolder

        return getattr(imagefolder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
