"""Where dataset files are looked for, and verified downloads: shared by the IDX datasets
(:mod:`anycnn.data.datasets`) and CIFAR (:mod:`anycnn.data.cifar`); the image-folder cache
(:mod:`anycnn.data.imagefolder`) lives under the same user cache.

Lookup order for dataset ``name`` (:func:`search_dirs`): an explicit ``data_dir`` (or its
``<name>/`` subfolder) is the only place looked at; otherwise ``$ANYCNN_DATA/<name>/``, the user
cache ``$XDG_CACHE_HOME/anycnn/<name>/`` (default ``~/.cache/anycnn/<name>/``), then
``/usr/share/datasets/<name>/``. Downloads (:func:`fetch`) go through a temporary file and are
kept only when their SHA-256 matches the pinned digest (the full 64 hex digits, or a prefix of
at least 8 where only a prefix is published, as for torchvision's weight files:
:func:`sha256_matches`). Pretrained weights (:mod:`anycnn.io.pretrained`) use the same helpers.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..errors import ConfigError, DataError

DATA_ENV = "ANYCNN_DATA"
URL_ENV = "ANYCNN_DATA_URL"
SYSTEM_DATA_DIR = Path("/usr/share/datasets")
DOWNLOAD_TIMEOUT = 30.0  # seconds without data before a download is abandoned


def cache_dir(name: str) -> Path:
    """The user cache for dataset ``name``: ``$XDG_CACHE_HOME/anycnn/<name>`` or
    ``~/.cache/anycnn/<name>``."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "anycnn" / name


def search_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The directories searched for dataset ``name``, in order (see the module docstring)."""
    if data_dir is not None:
        return [Path(data_dir), Path(data_dir) / name]
    dirs = []
    if os.environ.get(DATA_ENV):
        dirs.append(Path(os.environ[DATA_ENV]) / name)
    dirs += [cache_dir(name), SYSTEM_DATA_DIR / name]
    return dirs


def search_list(name: str) -> str:
    """The directories searched for dataset ``name``, one indented line each, in order (for
    error messages; unlike :func:`search_dirs` it also names an unset ``$ANYCNN_DATA``)."""
    lines = ["--data-dir DIR (or DIR/" + name + "), which is then the only place looked at"]
    env = os.environ.get(DATA_ENV)
    lines.append(str(Path(env) / name) if env else f"${DATA_ENV}/{name} (${DATA_ENV} is not set)")
    lines += [str(cache_dir(name)), str(SYSTEM_DATA_DIR / name)]
    return "\n".join(f"  {line}" for line in lines)


#: the shortest SHA-256 prefix a pin may be (torchvision's file names carry 8 hex digits)
MIN_SHA256_PREFIX = 8


def check_pin(pinned: str) -> str:
    """``pinned`` in lower case, checked to be a SHA-256 or a prefix of one: 8 to 64 hex digits.

    Raises:
        ConfigError: it is not (a mistake in a pinned table or a caller's ``sha256=``).
    """
    low = str(pinned).lower()
    if not MIN_SHA256_PREFIX <= len(low) <= 64 or any(c not in "0123456789abcdef" for c in low):
        raise ConfigError(f"pinned SHA-256 {pinned!r} is not {MIN_SHA256_PREFIX} to 64 hex "
                          "digits")
    return low


def sha256_matches(actual: str, pinned: str) -> bool:
    """Whether the hex digest ``actual`` matches ``pinned``: the full SHA-256 (64 hex digits)
    or a prefix of it of at least :data:`MIN_SHA256_PREFIX` digits (case-insensitive; the pin
    is checked by :func:`check_pin`)."""
    return actual.lower().startswith(check_pin(pinned))


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 hex digest of the file at ``path``, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download_bases(name: str, base_url: str | None, mirrors: tuple[str, ...]) -> list[str]:
    """The base URLs to download dataset ``name``'s files from, in order: ``<base_url>/<name>/``
    (or ``$ANYCNN_DATA_URL/<name>/``) when one is given, else ``mirrors``."""
    base_url = base_url or os.environ.get(URL_ENV)
    return [base_url.rstrip("/") + f"/{name}/"] if base_url else list(mirrors)


def fetch(name: str, filename: str, bases: list[str], dest: Path, sha256: str, progress: bool,
          hint: str) -> Path:
    """Download ``filename`` from the first of ``bases`` that serves it to ``dest`` (kept only if
    its SHA-256 matches ``sha256``, the full digest or a prefix: :func:`sha256_matches`; see
    :func:`_download_file`) and return ``dest``.

    Raises:
        DataError: the digest differs, or every base failed: the message lists each URL with its
            error, then ``hint`` (where to put the files by hand).
    """
    check_pin(sha256)  # a bad pin is a ConfigError before any transfer
    failures = []
    for base in bases:
        url = base + filename
        try:
            _download_file(url, dest, sha256, progress)
            return dest
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            failures.append(f"{url}: {exc}")
    tried = "\n".join(f"  {f}" for f in failures)
    raise DataError(f"downloading {name} failed:\n{tried}\n{hint}")


def _download_file(url: str, dest: Path, sha256: str, progress: bool) -> None:
    """Download ``url`` to ``dest`` through a temporary file; keep it only if its SHA-256 matches.

    Raises:
        DataError: the digest differs (the partial file is deleted).
        OSError, http.client.HTTPException, ValueError: the transfer failed.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, \
                urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            show = progress and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                      disable=not show) as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        actual = digest.hexdigest()
        if not sha256_matches(actual, sha256):
            expected = sha256 if len(sha256) == 64 else f"a digest starting {sha256}"
            raise DataError(f"{dest.name} from {url}: SHA-256 mismatch: expected {expected}, "
                            f"got {actual}; the download was deleted")
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
