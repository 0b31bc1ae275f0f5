"""CIFAR-10 and CIFAR-100, read from their official *binary* version (fixed-size records).

File layouts (https://www.cs.toronto.edu/~kriz/cifar.html, "binary version"; no headers, no
pickle: the "python version" of the same data is never read):

* CIFAR-10, folder ``cifar-10-batches-bin/``: ``data_batch_1.bin`` ... ``data_batch_5.bin``
  (10,000 records each: the 50,000 training images, in that order), ``test_batch.bin`` (10,000),
  ``batches.meta.txt`` (the 10 class names, one a line) and ``readme.html``. A record is 3073
  bytes: the label (0-9), then the image's 3072 pixel bytes.
* CIFAR-100, folder ``cifar-100-binary/``: ``train.bin`` (50,000 records), ``test.bin``
  (10,000), ``fine_label_names.txt`` (100 names) and ``coarse_label_names.txt`` (20). A record
  is 3074 bytes: the coarse label (0-19), the fine label (0-99), then the 3072 pixel bytes.
  anycnn uses the fine labels (100 classes).

The 3072 pixel bytes of a 32x32 image are three planes, red then green then blue, each 1024
bytes in row-major order: the value of channel ``c`` at row ``i``, column ``j`` is byte
``1024 * c + 32 * i + j``. :func:`read_cifar_file` returns them channels last: ``uint8``
images of shape ``(N, 32, 32, 3)`` and ``int64`` labels of shape ``(N,)``.

Where :func:`load_cifar` looks (the order of :func:`anycnn.data.sources.search_dirs`: only the
explicit ``data_dir`` and its ``<name>/`` subfolder when one is given; else
``$ANYCNN_DATA/<name>/``, the user cache ``~/.cache/anycnn/<name>/``, then
``/usr/share/datasets/<name>/``), in each directory ``D`` in turn: the extracted folder
``D/cifar-10-batches-bin/`` (resp. ``cifar-100-binary/``), the files directly in ``D``, then the
official archive ``D/cifar-10-binary.tar.gz`` (resp. ``cifar-100-binary.tar.gz``). The first
complete one wins. An archive is extracted into the user cache (``<cache>/<folder>/``, tagged
with the archive's SHA-256 so that a later load of the same archive reuses it and another
archive replaces it), safely (only the official member names, no links, no absolute or ``..``
paths) and atomically (into a temporary folder, validated, then renamed: an interrupted or
failed extraction leaves nothing behind). If nothing is found and ``download`` is true, the
official archive is fetched into the user cache (from ``$ANYCNN_DATA_URL/<name>/`` when set),
kept only if its SHA-256 matches :attr:`CifarLayout.sha256`, extracted, then deleted.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import ConfigError, DataError
from .arrays import ArrayDataset, Splits
from .sources import (
    cache_dir,
    download_bases,
    fetch,
    search_dirs,
    search_list,
    sha256_of,
)

IMAGE_SHAPE = (32, 32, 3)
PIXEL_BYTES = 32 * 32 * 3

#: Where the official archives are downloaded from (``$ANYCNN_DATA_URL`` replaces it).
MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)

#: The biggest archive member accepted (CIFAR-100's train.bin is 153.7 MB).
MAX_MEMBER_BYTES = 256 << 20
#: The biggest class-name file accepted.
MAX_NAMES_BYTES = 64 << 10
#: File in an extracted folder holding the SHA-256 of the archive it came from.
ARCHIVE_TAG = ".archive-sha256"
_CHUNK = 1 << 20
_CHUNK_RECORDS = 4096  # records read at a time (12.6 MB)


@dataclass(frozen=True)
class CifarLayout:
    """What one CIFAR dataset's official binary version holds.

    Attributes:
        name: the dataset name (``cifar10`` / ``cifar100``).
        folder: the folder the archive extracts to.
        archive: the official archive's file name.
        sha256: SHA-256 of the official archive (a download is kept only if it matches).
        labels: ``(kind, number of values)`` of each label byte at the start of a record, in
            file order; the last one is the class label.
        names_file: the file holding one class name per line.
        train_files, test_files: the record files of each split, in order.
        train_records, test_records: records in each train / test file (the official counts;
            tests replace the layout to read smaller files).
        extra_files: other files of the official archive (extracted, not needed).
    """

    name: str
    folder: str
    archive: str
    sha256: str
    labels: tuple[tuple[str, int], ...]
    names_file: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    train_records: int
    test_records: int
    extra_files: tuple[str, ...] = ()

    @property
    def record_bytes(self) -> int:
        """Bytes per record: the label bytes, then :data:`PIXEL_BYTES`."""
        return len(self.labels) + PIXEL_BYTES

    @property
    def num_classes(self) -> int:
        return self.labels[-1][1]

    @property
    def required_files(self) -> tuple[str, ...]:
        """The files a folder must hold to be read."""
        return (*self.train_files, *self.test_files, self.names_file)


# Digests: the SHA-256 of the archives at the URLs below, as pinned by several independent
# dataset loaders (MLDatasets.jl, torchvision-ruby, gomlx); the official page lists only MD5s
# (c32a1d4a... for CIFAR-10, 03b5dce0... for CIFAR-100).
LAYOUTS = {
    "cifar10": CifarLayout(
        name="cifar10", folder="cifar-10-batches-bin", archive="cifar-10-binary.tar.gz",
        sha256="c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
        labels=(("label", 10),), names_file="batches.meta.txt",
        train_files=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        test_files=("test_batch.bin",), train_records=10000, test_records=10000,
        extra_files=("readme.html",)),
    "cifar100": CifarLayout(
        name="cifar100", folder="cifar-100-binary", archive="cifar-100-binary.tar.gz",
        sha256="58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
        labels=(("coarse label", 20), ("fine label", 100)), names_file="fine_label_names.txt",
        train_files=("train.bin",), test_files=("test.bin",), train_records=50000,
        test_records=10000, extra_files=("coarse_label_names.txt",)),
}


def layout_of(name: str) -> CifarLayout:
    """The :class:`CifarLayout` of ``name``; ConfigError for other names."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ConfigError(f"unknown CIFAR dataset {name!r}; valid names: "
                          f"{', '.join(LAYOUTS)}") from None


# ------------------------------------------------------------------------------------- reading


def read_cifar_file(path: str | os.PathLike, name: str = "cifar10",
                    records: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one record file of dataset ``name`` (see the module docstring for the layout).

    Args:
        records: the number of records the file must hold; ``None`` accepts any number >= 1.

    Returns:
        ``(images, labels)``: ``uint8`` ``(N, 32, 32, 3)`` (NHWC, RGB) and ``int64`` ``(N,)``,
        the class labels (CIFAR-100: the fine labels).

    Raises:
        DataError: naming the file, when it cannot be opened, is empty or its size is not a
            whole number of records ("truncated or not CIFAR binary"), holds another number of
            records than ``records``, or a label byte is out of range.
    """
    layout = layout_of(name)
    path = Path(path)
    count = _record_count(path, layout, records)
    images, labels = np.empty((count, *IMAGE_SHAPE), np.uint8), np.empty(count, np.int64)
    _read_into(path, layout, images, labels)
    return images, labels


def _record_count(path: Path, layout: CifarLayout, records: int | None) -> int:
    """The number of records in ``path``, from its size (see :func:`_check_size`)."""
    try:
        info = path.stat()
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{path}: cannot open (not a regular file)")
    _check_size(path, info.st_size, layout, records)
    return info.st_size // layout.record_bytes


def _read_into(path: Path, layout: CifarLayout, images: np.ndarray, labels: np.ndarray) -> None:
    """Fill ``images`` ``(N, 32, 32, 3)`` and ``labels`` ``(N,)`` from the N records of ``path``,
    a chunk of records at a time (the memory used is the output's, plus one chunk)."""
    record, heads = layout.record_bytes, len(layout.labels)
    try:
        with open(path, "rb") as stream:
            for start in range(0, len(labels), _CHUNK_RECORDS):
                n = min(_CHUNK_RECORDS, len(labels) - start)
                data = stream.read(n * record)
                if len(data) != n * record:
                    raise DataError(f"{path}: changed while being read (shorter than its size)")
                table = np.frombuffer(data, dtype=np.uint8).reshape(n, record)
                _check_labels(path, layout, table, start)
                pixels = table[:, heads:].reshape(n, 3, 32, 32)  # planes R, G, B; rows; columns
                images[start:start + n] = np.transpose(pixels, (0, 2, 3, 1))
                labels[start:start + n] = table[:, heads - 1]
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc.strerror or exc})") from exc


def _check_labels(path: Path, layout: CifarLayout, table: np.ndarray, start: int) -> None:
    """DataError naming the first record of ``table`` (record ``start`` of the file on) whose
    label byte is out of range."""
    for column, (kind, count) in enumerate(layout.labels):
        bad = np.flatnonzero(table[:, column] >= count)
        if bad.size:
            first = int(bad[0])
            raise DataError(f"{path}: record {start + first}: {kind} {table[first, column]} is "
                            f"out of range [0, {count}); not {layout.name} binary data")


def _check_size(path: Path, size: int, layout: CifarLayout, records: int | None) -> None:
    """DataError unless ``size`` is a whole, non-zero number of records (``records`` if given)."""
    record = layout.record_bytes
    if size == 0 or size % record:
        raise DataError(f"{path}: {size} bytes is not a whole number of {record}-byte "
                        f"{layout.name} records: truncated or not CIFAR binary")
    if records is not None and size // record != records:
        raise DataError(f"{path}: holds {size // record} records; the {layout.name} file holds "
                        f"{records} (truncated, or another file)")


def read_class_names(path: str | os.PathLike, count: int) -> tuple[str, ...]:
    """The ``count`` class names of a CIFAR names file: UTF-8 text, one name a line; blank lines
    and surrounding spaces are ignored.

    Raises:
        DataError: naming the file, when it cannot be read, exceeds :data:`MAX_NAMES_BYTES`, is
            not UTF-8, or does not hold exactly ``count`` distinct names.
    """
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            raw = stream.read(MAX_NAMES_BYTES + 1)
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc.strerror or exc})") from exc
    if len(raw) > MAX_NAMES_BYTES:
        raise DataError(f"{path}: larger than {MAX_NAMES_BYTES} bytes; not a class name list")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != count:
        raise DataError(f"{path}: {len(names)} class names; expected {count}, one a line")
    if len(set(names)) != count:
        raise DataError(f"{path}: class names repeat ({count - len(set(names))} duplicate(s))")
    return names


def _read_split(folder: Path, files: tuple[str, ...], records: int,
                layout: CifarLayout) -> ArrayDataset:
    """The records of ``files`` (``records`` each), in order, read into one array."""
    for file in files:  # every size is checked before anything is read
        _record_count(folder / file, layout, records)
    total = records * len(files)
    images, labels = np.empty((total, *IMAGE_SHAPE), np.uint8), np.empty(total, np.int64)
    for i, file in enumerate(files):
        part = slice(i * records, (i + 1) * records)
        _read_into(folder / file, layout, images[part], labels[part])
    return ArrayDataset(images, labels, layout.num_classes)


def _read_folder(folder: Path, layout: CifarLayout, source: str) -> Splits:
    """The :class:`Splits` of an extracted folder; ``val`` and ``test`` are the test set."""
    names = read_class_names(folder / layout.names_file, layout.num_classes)
    train = _read_split(folder, layout.train_files, layout.train_records, layout)
    test = _read_split(folder, layout.test_files, layout.test_records, layout)
    return Splits(name=layout.name, train=train, val=test, test=test, source=source,
                  class_names=names)


# -------------------------------------------------------------------------------------- lookup


def _complete(folder: Path, layout: CifarLayout) -> bool:
    return all((folder / file).is_file() for file in layout.required_files)


def find_cifar(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first folder holding all of ``name``'s files, or official archive, in lookup order
    (module docstring), or ``None``. A folder is returned as a directory, an archive as a file."""
    layout = layout_of(name)
    for directory in search_dirs(name, data_dir):
        for folder in (directory / layout.folder, directory):
            if _complete(folder, layout):
                return folder
        if (directory / layout.archive).is_file():
            return directory / layout.archive
    return None


def _where_to_put(layout: CifarLayout) -> str:
    return (f"Put the official binary version of {layout.name} (the archive {layout.archive}, "
            f"or the folder {layout.folder}/ it holds) into one of these directories, searched "
            f"in this order:\n{search_list(layout.name)}\n"
            "It is at https://www.cs.toronto.edu/~kriz/cifar.html (the binary version)")


def _missing_in(layout: CifarLayout, data_dir: Path) -> str:
    """Why an explicit ``data_dir`` holds no ``layout`` dataset: the files it lacks."""
    if not data_dir.is_dir():
        return (f"data dir {data_dir}: no such directory (it should hold {layout.archive} or "
                f"the folder {layout.folder}/)")
    candidates = [base / sub for base in (data_dir, data_dir / layout.name)
                  for sub in (layout.folder, "")]
    best = max(candidates, key=lambda d: sum((d / f).is_file() for f in layout.required_files))
    missing = [f for f in layout.required_files if not (best / f).is_file()]
    rule = "(an explicit data dir is the only place looked at)"
    if len(missing) == len(layout.required_files):
        return (f"data dir {data_dir} holds neither {layout.archive} nor the {layout.name} "
                f"files ({', '.join(missing)}), in itself or in {layout.folder}/ {rule}")
    return (f"data dir {best} lacks {len(missing)} of the {len(layout.required_files)} "
            f"{layout.name} files: {', '.join(missing)}, and holds no {layout.archive} {rule}")


# ----------------------------------------------------------------------------------- archives


def _copy_member(source, target, size: int) -> None:
    """Copy an archive member's ``size`` bytes from ``source`` to ``target`` in chunks."""
    left = size
    while left > 0:
        chunk = source.read(min(_CHUNK, left))
        if not chunk:
            break
        target.write(chunk)
        left -= len(chunk)
    if left:
        raise EOFError(f"member ended {left} bytes early")


def _refuse(archive: Path, member: tarfile.TarInfo, why: str) -> DataError:
    return DataError(f"{archive}: refusing member {member.name!r}: {why}; not the official "
                     "CIFAR binary archive")


def _extract_members(archive: Path, layout: CifarLayout, target: Path) -> None:
    """Write the files of ``archive`` (official layout: ``<folder>/<file>``) flat into the
    existing, empty directory ``target``, refusing anything else.

    Refused (DataError naming the archive and the member): absolute paths, ``..``, links and
    special files, names other than the layout's files, repeated names, members larger than
    :data:`MAX_MEMBER_BYTES`; also an unreadable or truncated archive, or one lacking a
    required file. Members are streamed in one pass; nothing is written outside ``target``.
    """
    expected = {f"{layout.folder}/{file}" for file in (*layout.required_files,
                                                       *layout.extra_files)}
    seen: set[str] = set()
    try:
        with tarfile.open(archive, mode="r|gz") as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                if path.is_absolute() or ".." in path.parts or "\\" in member.name:
                    raise _refuse(archive, member, "absolute path or '..'")
                if member.issym() or member.islnk():
                    raise _refuse(archive, member, "links are not extracted")
                if member.isdir() and str(path) == layout.folder:
                    continue
                if not member.isreg():
                    raise _refuse(archive, member, "not a regular file")
                if str(path) not in expected:
                    raise _refuse(archive, member, f"the {layout.name} archive holds only "
                                  f"{layout.folder}/ with {', '.join(sorted(expected))}")
                if str(path) in seen:
                    raise _refuse(archive, member, "appears twice")
                if member.size > MAX_MEMBER_BYTES:
                    raise _refuse(archive, member, f"{member.size} bytes is more than the "
                                  f"{MAX_MEMBER_BYTES} accepted")
                seen.add(str(path))
                source = tar.extractfile(member)
                with source, open(target / path.name, "xb") as out:
                    _copy_member(source, out, member.size)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{archive}: not a readable .tar.gz archive ({exc})") from exc
    missing = [f for f in layout.required_files if f"{layout.folder}/{f}" not in seen]
    if missing:
        raise DataError(f"{archive}: lacks {layout.folder}/ {', '.join(missing)}; not the "
                        f"official {layout.name} binary archive")


def _load_archive(archive: Path, layout: CifarLayout, digest: str | None = None) -> Splits:
    """Read ``archive`` through its extraction in the user cache (made or replaced here,
    atomically, unless it is tagged with the archive's SHA-256 ``digest``)."""
    digest = digest or sha256_of(archive)
    parent = cache_dir(layout.name)
    target = parent / layout.folder
    source = f"{target} (extracted from {archive})"
    tag = target / ARCHIVE_TAG
    if _complete(target, layout) and tag.is_file() and tag.read_text().strip() == digest:
        return _read_folder(target, layout, source)
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{layout.folder}.", suffix=".part", dir=parent))
    try:
        _extract_members(archive, layout, staging)
        splits = _read_folder(staging, layout, source)  # validated before it is published
        (staging / ARCHIVE_TAG).write_text(digest + "\n")
        _publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return splits


def _publish(staging: Path, target: Path) -> None:
    """Rename the complete folder ``staging`` to ``target``, replacing an older ``target``."""
    try:
        os.rename(staging, target)
        return
    except OSError:
        if not target.exists() and not target.is_symlink():
            raise
    old = staging.with_name(staging.name + ".old")
    os.rename(target, old)
    os.rename(staging, target)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def _download(layout: CifarLayout, progress: bool, base_url: str | None) -> Splits:
    """Fetch the official archive into the user cache, check its SHA-256, extract, delete it."""
    bases = download_bases(layout.name, base_url, MIRRORS)
    archive = cache_dir(layout.name) / layout.archive
    fetch(layout.name, layout.archive, bases, archive, layout.sha256, progress,
          hint=_where_to_put(layout))
    splits = _load_archive(archive, layout, layout.sha256)
    with contextlib.suppress(FileNotFoundError):
        archive.unlink()
    return splits


# ------------------------------------------------------------------------------------- loading


def load_cifar(name: str, data_dir: str | os.PathLike | None = None, download: bool = True,
               progress: bool = True, base_url: str | None = None) -> Splits:
    """Load ``cifar10`` or ``cifar100`` (usually through :func:`anycnn.data.datasets.load_dataset`).

    Returns :class:`~anycnn.data.arrays.Splits`: ``train`` the 50,000 training images, ``val`` and
    ``test`` both the official 10,000-image test set (no separate validation split is
    published), ``class_names`` from the dataset's names file. Images ``uint8``
    ``(N, 32, 32, 3)``, labels ``int64`` ``(N,)`` (CIFAR-100: the 100 fine labels).

    Files are looked up, extracted and downloaded as the module docstring says; ``base_url``
    (else ``$ANYCNN_DATA_URL``) replaces the official download location by
    ``<base_url>/<name>/``; ``progress`` shows a download progress bar on a terminal.

    Raises:
        ConfigError: unknown name.
        DataError: files missing (the message says where to put them, or which files an explicit
            ``data_dir`` lacks), malformed, an archive with unsafe or unexpected members, or a
            download that failed or did not match the pinned SHA-256.
    """
    layout = layout_of(name)
    found = find_cifar(name, data_dir)
    if found is None and data_dir is not None:
        raise DataError(_missing_in(layout, Path(data_dir)))
    if found is None:
        if not download:
            raise DataError(f"dataset {name!r} not found and download=False. "
                            f"{_where_to_put(layout)}")
        return _download(layout, progress, base_url)
    if found.is_file():
        return _load_archive(found, layout)
    return _read_folder(found, layout, str(found))
