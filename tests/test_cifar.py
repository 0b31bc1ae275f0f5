"""anycnn.data.cifar: the CIFAR-10/100 binary reader, lookup, archive extraction and verified
download.

Every file is generated here in the official binary format, with fewer records than the real
ones: the ``small`` fixture replaces the official per-file record counts (50,000/10,000) by small
ones, as tests replace pinned digests. Downloads come from a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest

from anycnn import cifar, datasets
from anycnn.data.cifar import read_cifar_file, read_class_names
from anycnn.data.datasets import load_dataset, validation_is_test
from anycnn.errors import ConfigError, DataError
from tests import test_datasets, test_reliability

# fixtures shared with the IDX and CLI tests: isolated cache and system folders, a file server
# on 127.0.0.1, the CLI run in-process
isolated, file_server = test_datasets.isolated, test_datasets.file_server
isolated_env, run_main = test_reliability.isolated_env, test_reliability.run_main

NAMES = {
    "cifar10": "airplane automobile bird cat deer dog frog horse ship truck".split(),
    "cifar100": [f"class_{i:02d}" for i in range(100)],
}
TRAIN_PER_FILE = {"cifar10": 2, "cifar100": 6}  # cifar10 has five train files: 10 images
TEST_RECORDS = 4


def encode(name: str, images: np.ndarray, labels: np.ndarray, coarse=None) -> bytes:
    """The official binary encoding: per record the label byte(s), then the red, green and blue
    planes of the NHWC ``images``, each row-major."""
    n = len(labels)
    planes = np.transpose(images, (0, 3, 1, 2)).reshape(n, 3 * 32 * 32)
    heads = [labels[:, None]]
    if name == "cifar100":
        coarse = labels % 20 if coarse is None else coarse
        heads.insert(0, np.asarray(coarse)[:, None])
    return np.concatenate([*heads, planes], axis=1).astype(np.uint8).tobytes()


def make_cifar(folder: Path, name: str, seed: int = 0) -> dict:
    """Write a small dataset ``name`` into ``folder`` (the extracted layout); return its arrays
    as {"train": (images, labels), "test": (images, labels)}."""
    layout = cifar.LAYOUTS[name]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, files, n in (("train", layout.train_files, TRAIN_PER_FILE[name]),
                            ("test", layout.test_files, TEST_RECORDS)):
        parts = []
        for file in files:
            images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            labels = rng.integers(0, layout.num_classes, n).astype(np.uint8)
            (folder / file).write_bytes(encode(name, images, labels))
            parts.append((images, labels))
        out[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    (folder / layout.names_file).write_text("\n".join(NAMES[name]) + "\n\n")
    for extra in layout.extra_files:
        (folder / extra).write_text("extra\n")
    return out


def make_archive(path: Path, folder: Path, name: str, extra=()) -> bytes:
    """A .tar.gz laid out like the official one (``<folder name>/<file>``) holding the files of
    ``folder``, plus ``extra`` TarInfo members (with data for regular files); return its bytes."""
    layout = cifar.LAYOUTS[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=layout.folder, recursive=False)
        for file in sorted(os.listdir(folder)):
            tar.add(folder / file, arcname=f"{layout.folder}/{file}")
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path.read_bytes()


def member(name: str, data: bytes | None = b"x", kind=tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if data is not None and kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


@pytest.fixture
def small(monkeypatch):
    """Small per-file record counts instead of the official ones, for both datasets."""
    for name, layout in cifar.LAYOUTS.items():
        monkeypatch.setitem(cifar.LAYOUTS, name, dataclasses.replace(
            layout, train_records=TRAIN_PER_FILE[name], test_records=TEST_RECORDS))


def cache_of(root: Path, name: str = "cifar10") -> Path:
    return root / "cache" / "anycnn" / name


def assert_nothing_half_written(root: Path, name: str = "cifar10") -> None:
    """The cache holds no extracted folder, no temporary folder, no partial download."""
    cache = cache_of(root, name)
    assert not cache.exists() or sorted(p.name for p in cache.iterdir()) == []


# ------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_record_layout_byte_by_byte(tmp_path, name):
    """Bytes placed by hand: label byte(s), then R, G, B planes, each row-major 32x32."""
    heads = [7] if name == "cifar10" else [19, 99]
    record = bytearray(heads + [0] * 3072)
    base = len(heads)
    record[base + 32 * 5 + 6] = 11             # red at row 5, column 6
    record[base + 1024 + 32 * 31 + 0] = 22     # green at row 31, column 0
    record[base + 2048 + 32 * 0 + 31] = 33     # blue at row 0, column 31
    second = bytes([3] if name == "cifar10" else [0, 42]) + bytes(range(256)) * 12
    path = tmp_path / "one.bin"
    path.write_bytes(bytes(record) + second)
    images, labels = read_cifar_file(path, name)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert images.flags.c_contiguous
    assert labels.dtype == np.int64 and labels.tolist() == ([7, 3] if name == "cifar10"
                                                           else [99, 42])  # fine labels
    assert (images[0, 5, 6, 0], images[0, 31, 0, 1], images[0, 0, 31, 2]) == (11, 22, 33)
    assert int(images[0].astype(int).sum()) == 66
    # second record: byte k of each plane is k % 256 (pixel row i, column j is byte 32 i + j)
    np.testing.assert_array_equal(images[1, 2, 3], [(32 * 2 + 3) % 256] * 3)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_round_trip(tmp_path, name):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, cifar.LAYOUTS[name].num_classes, 5).astype(np.uint8)
    path = tmp_path / "data.bin"
    path.write_bytes(encode(name, images, labels))
    out_images, out_labels = read_cifar_file(path, name, records=5)
    np.testing.assert_array_equal(out_images, images)
    np.testing.assert_array_equal(out_labels, labels)


@pytest.mark.parametrize(("name", "size"), [
    ("cifar10", 0), ("cifar10", 3072), ("cifar10", 3074), ("cifar10", 2 * 3073 - 1),
    ("cifar100", 3073), ("cifar100", 3 * 3074 + 1),
])
def test_truncated_or_foreign_files_name_the_file(tmp_path, name, size):
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(b"\1" * size)
    record = cifar.LAYOUTS[name].record_bytes
    with pytest.raises(DataError, match=rf"{size} bytes is not a whole number of {record}-byte "
                                        rf"{name} records: truncated or not CIFAR binary") as info:
        read_cifar_file(path, name)
    assert str(path) in str(info.value)


def test_record_count_is_checked_when_given(tmp_path):
    path = tmp_path / "test_batch.bin"
    path.write_bytes(encode("cifar10", np.zeros((2, 32, 32, 3), np.uint8), np.zeros(2, np.uint8)))
    assert len(read_cifar_file(path, "cifar10")[1]) == 2
    with pytest.raises(DataError, match=r"test_batch\.bin: holds 2 records; the cifar10 file "
                                        r"holds 10000"):
        read_cifar_file(path, "cifar10", records=10000)


@pytest.mark.parametrize(("name", "labels", "coarse", "message"), [
    ("cifar10", [0, 10], None, r"record 1: label 10 is out of range \[0, 10\); not cifar10"),
    ("cifar10", [255, 3, 200], None, r"record 0: label 255 is out of range \[0, 10\)"),
    ("cifar100", [5, 100], [0, 1], r"record 1: fine label 100 is out of range \[0, 100\)"),
    ("cifar100", [5, 6], [20, 1], r"record 0: coarse label 20 is out of range \[0, 20\)"),
], ids=["cifar10-10", "cifar10-255", "cifar100-fine", "cifar100-coarse"])
def test_label_values_out_of_range(tmp_path, name, labels, coarse, message):
    n = len(labels)
    path = tmp_path / "train.bin"
    path.write_bytes(encode(name, np.zeros((n, 32, 32, 3), np.uint8), np.array(labels),
                            None if coarse is None else np.array(coarse)))
    with pytest.raises(DataError, match=message) as info:
        read_cifar_file(path, name)
    assert str(path) in str(info.value)


def test_missing_file_or_directory_cannot_be_opened(tmp_path):
    for path in (tmp_path / "nothere.bin", tmp_path):
        with pytest.raises(DataError, match="cannot open"):
            read_cifar_file(path)
        with pytest.raises(DataError, match="cannot open"):
            read_class_names(path, 10)


def test_unknown_names():
    with pytest.raises(ConfigError, match="valid names: cifar10, cifar100"):
        read_cifar_file("x.bin", "cifar-11")
    with pytest.raises(ConfigError, match="cifar10, cifar100"):
        load_dataset("cifar")


def test_class_names(tmp_path):
    path = tmp_path / "batches.meta.txt"
    path.write_bytes(b"airplane\r\n  automobile \n\nbird\n\n\n")
    assert read_class_names(path, 3) == ("airplane", "automobile", "bird")
    with pytest.raises(DataError, match=r"batches\.meta\.txt: 3 class names; expected 10"):
        read_class_names(path, 10)
    path.write_text("cat\ndog\ncat\n")
    with pytest.raises(DataError, match="class names repeat"):
        read_class_names(path, 3)
    path.write_bytes(b"cat\n\xff\xfe\n")
    with pytest.raises(DataError, match="not UTF-8"):
        read_class_names(path, 2)
    path.write_bytes(b"a\n" * (cifar.MAX_NAMES_BYTES // 2 + 1))
    with pytest.raises(DataError, match="larger than"):
        read_class_names(path, 10)


def test_pinned_official_archives():
    for name, layout in cifar.LAYOUTS.items():
        assert len(layout.sha256) == 64 and int(layout.sha256, 16) >= 0
        assert layout.archive.startswith(name.replace("cifar", "cifar-")) and \
            layout.archive.endswith("-binary.tar.gz")
        assert name in datasets.DATASETS and validation_is_test(name)
    assert cifar.LAYOUTS["cifar10"].sha256 != cifar.LAYOUTS["cifar100"].sha256
    assert cifar.MIRRORS == ("https://www.cs.toronto.edu/~kriz/",)


# ------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_load_extracted_folder(isolated, small, name):
    layout = cifar.LAYOUTS[name]
    arrays = make_cifar(isolated / "d" / layout.folder, name)
    splits = load_dataset(name, data_dir=isolated / "d", download=False)
    n_train = TRAIN_PER_FILE[name] * len(layout.train_files)
    assert (len(splits.train), len(splits.val)) == (n_train, TEST_RECORDS)
    assert splits.test is splits.val and splits.name == name
    assert splits.image_shape == (32, 32, 3) and splits.num_classes == len(NAMES[name])
    assert splits.class_names == tuple(NAMES[name])
    assert splits.source == str(isolated / "d" / layout.folder)
    for split, part in (("train", splits.train), ("test", splits.test)):
        assert part.images.dtype == np.uint8 and part.labels.dtype == np.int64
        np.testing.assert_array_equal(part.images, arrays[split][0])  # batches in file order
        np.testing.assert_array_equal(part.labels, arrays[split][1])


def test_official_counts_are_required(isolated):
    """Without the test layout, a file with fewer records than the official one is refused."""
    make_cifar(isolated / "d", "cifar10")
    with pytest.raises(DataError, match=r"data_batch_1\.bin: holds 2 records; the cifar10 file "
                                        r"holds 10000"):
        load_dataset("cifar10", data_dir=isolated / "d", download=False)


def test_lookup_order(isolated, small, monkeypatch):
    folder = cifar.LAYOUTS["cifar10"].folder
    seen = {}
    for where, seed in (("system", 1), ("cache", 2), ("env", 3)):
        base = {"system": isolated / "system" / "cifar10",
                "cache": cache_of(isolated), "env": isolated / "env" / "cifar10"}[where]
        seen[where] = make_cifar(base / folder, "cifar10", seed=seed)["train"][1]
        if where == "env":
            monkeypatch.setenv("ANYCNN_DATA", str(isolated / "env"))
        got = load_dataset("cifar10", download=False)
        np.testing.assert_array_equal(got.train.labels, seen[where])
        assert got.source == str(base / folder)
    # an explicit folder wins; it may be the extracted folder itself, hold it, or hold <name>/
    for explicit, files in ((isolated / "x1", isolated / "x1"),
                            (isolated / "x2", isolated / "x2" / folder),
                            (isolated / "x3", isolated / "x3" / "cifar10" / folder)):
        labels = make_cifar(files, "cifar10", seed=9)["train"][1]
        got = load_dataset("cifar10", data_dir=explicit, download=False)
        np.testing.assert_array_equal(got.train.labels, labels)
        assert got.source == str(files)


def test_incomplete_folder_is_skipped(isolated, small, monkeypatch):
    folder = cifar.LAYOUTS["cifar10"].folder
    make_cifar(isolated / "system" / "cifar10" / folder, "cifar10", seed=1)
    make_cifar(isolated / "env" / "cifar10" / folder, "cifar10", seed=2)
    (isolated / "env" / "cifar10" / folder / "batches.meta.txt").unlink()
    monkeypatch.setenv("ANYCNN_DATA", str(isolated / "env"))
    assert load_dataset("cifar10", download=False).source.startswith(str(isolated / "system"))


@pytest.mark.parametrize("download", [False, True])
def test_explicit_data_dir_never_falls_back(isolated, small, download):
    make_cifar(cache_of(isolated) / "cifar-10-batches-bin", "cifar10")
    partial = isolated / "partial" / "cifar-10-batches-bin"
    make_cifar(partial, "cifar10")
    (partial / "test_batch.bin").unlink()
    (partial / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match=r"partial/cifar-10-batches-bin lacks 2 of the 7 cifar10 "
                       r"files: data_batch_3\.bin, test_batch\.bin, and holds no "
                       r"cifar-10-binary\.tar\.gz \(an explicit data dir is the only place"):
        load_dataset("cifar10", data_dir=isolated / "partial", download=download)
    with pytest.raises(DataError, match="nowhere: no such directory"):
        load_dataset("cifar10", data_dir=isolated / "nowhere", download=download)
    (isolated / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty holds neither cifar-10-binary\.tar\.gz nor the "
                       r"cifar10 files \(data_batch_1\.bin, .*batches\.meta\.txt\), in itself "
                       r"or in cifar-10-batches-bin/ \(an explicit"):
        load_dataset("cifar10", data_dir=isolated / "empty", download=download)


def test_not_found_says_where_to_put_the_files(isolated):
    with pytest.raises(DataError) as info:
        load_dataset("cifar100", download=False)
    message = str(info.value)
    for text in ("cifar-100-binary.tar.gz", "cifar-100-binary/", "--data-dir", "ANYCNN_DATA",
                 str(cache_of(isolated, "cifar100")), str(isolated / "system" / "cifar100"),
                 "binary version"):
        assert text in message


# ----------------------------------------------------------------------------------- archives


def test_archive_is_extracted_into_the_cache_once(isolated, small, monkeypatch):
    arrays = make_cifar(isolated / "src" / "a", "cifar10", seed=1)
    archive = isolated / "data" / "cifar-10-binary.tar.gz"
    blob = make_archive(archive, isolated / "src" / "a", "cifar10")
    splits = load_dataset("cifar10", data_dir=isolated / "data", download=False)
    target = cache_of(isolated) / "cifar-10-batches-bin"
    assert splits.source == f"{target} (extracted from {archive})"
    np.testing.assert_array_equal(splits.train.images, arrays["train"][0])
    assert splits.class_names == tuple(NAMES["cifar10"])
    assert sorted(p.name for p in cache_of(isolated).iterdir()) == ["cifar-10-batches-bin"]
    assert (target / cifar.ARCHIVE_TAG).read_text().strip() == hashlib.sha256(blob).hexdigest()
    assert sorted(p.name for p in target.iterdir()) == sorted(
        [cifar.ARCHIVE_TAG, *os.listdir(isolated / "src" / "a")])

    def no_extraction(*args):
        raise AssertionError("extracted again")

    with monkeypatch.context() as m:  # the same archive again: the extraction is reused
        m.setattr(cifar, "_extract_members", no_extraction)
        again = load_dataset("cifar10", data_dir=isolated / "data", download=False)
        np.testing.assert_array_equal(again.train.labels, arrays["train"][1])
    # another archive in its place replaces the extraction
    other = make_cifar(isolated / "src" / "b", "cifar10", seed=2)
    make_archive(archive, isolated / "src" / "b", "cifar10")
    replaced = load_dataset("cifar10", data_dir=isolated / "data", download=False)
    np.testing.assert_array_equal(replaced.train.labels, other["train"][1])
    assert sorted(p.name for p in cache_of(isolated).iterdir()) == ["cifar-10-batches-bin"]


def test_archive_in_the_system_folder(isolated, small):
    make_cifar(isolated / "src", "cifar100")
    make_archive(isolated / "system" / "cifar100" / "cifar-100-binary.tar.gz", isolated / "src",
                 "cifar100")
    splits = load_dataset("cifar100", download=False)
    assert splits.source.startswith(str(cache_of(isolated, "cifar100") / "cifar-100-binary"))
    assert splits.num_classes == 100 and len(splits.train) == TRAIN_PER_FILE["cifar100"]


UNSAFE = {
    "traversal": (member("cifar-10-batches-bin/../../evil.bin"), "absolute path or '..'"),
    "absolute": (member("/tmp/anycnn-evil.bin"), "absolute path or '..'"),
    "symlink": (member("cifar-10-batches-bin/link", None, tarfile.SYMTYPE, "/etc/passwd"),
                "links are not extracted"),
    "hardlink": (member("cifar-10-batches-bin/hard", None, tarfile.LNKTYPE,
                        "cifar-10-batches-bin/test_batch.bin"), "links are not extracted"),
    "fifo": (member("cifar-10-batches-bin/fifo", None, tarfile.FIFOTYPE),
             "not a regular file"),
    "other-dir": (member("cifar-10-batches-bin/sub", None, tarfile.DIRTYPE),
                  "not a regular file"),
    "unexpected-name": (member("cifar-10-batches-bin/run.sh"), "holds only"),
    "outside-folder": (member("data_batch_1.bin"), "holds only"),
    "python-version": (member("cifar-10-batches-py/data_batch_1"), "holds only"),
    "repeated": (member("cifar-10-batches-bin/readme.html"), "appears twice"),
}


@pytest.mark.parametrize("kind", list(UNSAFE))
def test_unsafe_or_unexpected_members_are_refused(isolated, small, kind):
    bad, message = UNSAFE[kind]
    make_cifar(isolated / "src", "cifar10")
    archive = isolated / "data" / "cifar-10-binary.tar.gz"
    make_archive(archive, isolated / "src", "cifar10", extra=[bad])
    with pytest.raises(DataError, match=message) as info:
        load_dataset("cifar10", data_dir=isolated / "data", download=False)
    assert str(archive) in str(info.value) and repr(bad[0].name) in str(info.value)
    assert_nothing_half_written(isolated)
    assert not (isolated / "evil.bin").exists() and not Path("/tmp/anycnn-evil.bin").exists()


def test_oversized_member_is_refused(isolated, small, monkeypatch):
    monkeypatch.setattr(cifar, "MAX_MEMBER_BYTES", 3073 * 3)
    make_cifar(isolated / "src", "cifar10")
    (isolated / "src" / "test_batch.bin").write_bytes(b"\0" * 3073 * 4)
    make_archive(isolated / "data" / "cifar-10-binary.tar.gz", isolated / "src", "cifar10")
    with pytest.raises(DataError, match=r"test_batch\.bin'.*12292 bytes is more than"):
        load_dataset("cifar10", data_dir=isolated / "data", download=False)
    assert_nothing_half_written(isolated)


def test_archive_lacking_a_file(isolated, small):
    make_cifar(isolated / "src", "cifar10")
    (isolated / "src" / "data_batch_5.bin").unlink()
    make_archive(isolated / "data" / "cifar-10-binary.tar.gz", isolated / "src", "cifar10")
    with pytest.raises(DataError, match=r"lacks cifar-10-batches-bin/ data_batch_5\.bin"):
        load_dataset("cifar10", data_dir=isolated / "data", download=False)
    assert_nothing_half_written(isolated)


@pytest.mark.parametrize("damage", ["cut", "garbage", "not-gzip", "empty"])
def test_corrupt_archive(isolated, small, damage):
    make_cifar(isolated / "src", "cifar10")
    archive = isolated / "data" / "cifar-10-binary.tar.gz"
    blob = make_archive(archive, isolated / "src", "cifar10")
    if damage == "cut":
        blob = blob[: len(blob) // 2]
    elif damage == "garbage":
        blob = blob[:20] + bytes(range(256)) * 8 + blob[20 + 2048:]
    elif damage == "not-gzip":
        blob = b"just some text, not an archive\n" * 10
    else:
        blob = b""
    archive.write_bytes(blob)
    with pytest.raises(DataError, match=r"not a readable \.tar\.gz archive") as info:
        load_dataset("cifar10", data_dir=isolated / "data", download=False)
    assert str(archive) in str(info.value)
    assert_nothing_half_written(isolated)


def test_archive_with_a_bad_record_file_is_not_published(isolated, small):
    """The files are validated before the extraction is renamed into place."""
    make_cifar(isolated / "src", "cifar10")
    path = isolated / "src" / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-7])
    make_archive(isolated / "data" / "cifar-10-binary.tar.gz", isolated / "src", "cifar10")
    with pytest.raises(DataError, match=r"data_batch_2\.bin: 6139 bytes .* truncated or not "
                                        "CIFAR binary"):
        load_dataset("cifar10", data_dir=isolated / "data", download=False)
    assert_nothing_half_written(isolated)


def test_interrupted_extraction_leaves_nothing_and_keeps_the_previous_one(isolated, small,
                                                                          monkeypatch):
    first = make_cifar(isolated / "src" / "a", "cifar10", seed=1)
    archive = isolated / "data" / "cifar-10-binary.tar.gz"
    make_archive(archive, isolated / "src" / "a", "cifar10")
    copy, calls = cifar._copy_member, []

    def interrupted(source, target, size):
        calls.append(size)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the third file
        copy(source, target, size)

    monkeypatch.setattr(cifar, "_copy_member", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("cifar10", data_dir=isolated / "data", download=False)
    assert_nothing_half_written(isolated)
    # with a complete extraction in place, an interrupted replacement leaves it untouched
    monkeypatch.setattr(cifar, "_copy_member", copy)
    load_dataset("cifar10", data_dir=isolated / "data", download=False)
    target = cache_of(isolated) / "cifar-10-batches-bin"
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    make_cifar(isolated / "src" / "b", "cifar10", seed=2)
    make_archive(archive, isolated / "src" / "b", "cifar10")
    calls.clear()
    monkeypatch.setattr(cifar, "_copy_member", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("cifar10", data_dir=isolated / "data", download=False)
    assert sorted(p.name for p in cache_of(isolated).iterdir()) == ["cifar-10-batches-bin"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    np.testing.assert_array_equal(
        load_dataset("cifar10", download=False).train.labels, first["train"][1])


# ----------------------------------------------------------------------------------- download


def serve(root: Path, name: str, seed: int = 0) -> tuple[bytes, dict]:
    """Put a generated official-format archive of ``name`` under the served root."""
    layout = cifar.LAYOUTS[name]
    arrays = make_cifar(root.parent / f"src-{name}", name, seed=seed)
    blob = make_archive(root / name / layout.archive, root.parent / f"src-{name}", name)
    return blob, arrays


def pin(monkeypatch, name: str, digest: str) -> None:
    monkeypatch.setitem(cifar.LAYOUTS, name, dataclasses.replace(cifar.LAYOUTS[name],
                                                                 sha256=digest))


def test_download_success(isolated, small, file_server, monkeypatch):
    root, url = file_server
    blob, arrays = serve(root, "cifar10")
    pin(monkeypatch, "cifar10", hashlib.sha256(blob).hexdigest())
    splits = load_dataset("cifar10", base_url=url, progress=False)
    target = cache_of(isolated) / "cifar-10-batches-bin"
    assert splits.source.startswith(f"{target} (extracted from ")
    np.testing.assert_array_equal(splits.train.images, arrays["train"][0])
    np.testing.assert_array_equal(splits.test.labels, arrays["test"][1])
    # the archive is deleted once extracted; no partial files anywhere
    assert sorted(p.name for p in cache_of(isolated).iterdir()) == ["cifar-10-batches-bin"]
    (root / "cifar10" / "cifar-10-binary.tar.gz").unlink()  # from now on the cache serves
    assert load_dataset("cifar10", base_url=url, progress=False).source == str(target)


def test_download_url_from_environment(isolated, small, file_server, monkeypatch):
    root, url = file_server
    blob, arrays = serve(root, "cifar100")
    pin(monkeypatch, "cifar100", hashlib.sha256(blob).hexdigest())
    monkeypatch.setenv("ANYCNN_DATA_URL", url)
    splits = load_dataset("cifar100", progress=False)
    np.testing.assert_array_equal(splits.train.labels, arrays["train"][1])
    assert splits.class_names == tuple(NAMES["cifar100"])


def test_tampered_download_is_deleted(isolated, small, file_server, monkeypatch):
    root, url = file_server
    blob, _ = serve(root, "cifar10")
    official = cifar.LAYOUTS["cifar10"].sha256  # the generated archive is not the official one
    with pytest.raises(DataError, match="SHA-256 mismatch") as info:
        load_dataset("cifar10", base_url=url, progress=False)
    message = str(info.value)
    assert "cifar-10-binary.tar.gz" in message and official in message
    assert hashlib.sha256(blob).hexdigest() in message and "deleted" in message
    assert_nothing_half_written(isolated)


def test_download_missing_on_server(isolated, small, file_server):
    _, url = file_server
    with pytest.raises(DataError, match="downloading cifar10 failed") as info:
        load_dataset("cifar10", base_url=url, progress=False)
    message = str(info.value)
    assert "cifar10/cifar-10-binary.tar.gz: HTTP Error 404" in message
    assert "cifar-10-batches-bin/" in message and str(cache_of(isolated)) in message
    assert_nothing_half_written(isolated)


def test_download_unreachable_official_location(isolated, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(cifar, "MIRRORS", (f"http://127.0.0.1:{port}/kriz/",))
    with pytest.raises(DataError, match="downloading cifar100 failed") as info:
        load_dataset("cifar100", progress=False)
    assert f"127.0.0.1:{port}/kriz/cifar-100-binary.tar.gz" in str(info.value)
    assert str(isolated / "system" / "cifar100") in str(info.value)
    assert_nothing_half_written(isolated, "cifar100")


# ---------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet-mini", "resnet20"])
def test_cli_train_and_evaluate_on_generated_cifar(isolated_env, small, backend, capsys, model):
    data = isolated_env / "data"
    make_cifar(data / "cifar-10-batches-bin", "cifar10")
    out = isolated_env / "run"
    rc, stdout, err = run_main(["train", "--dataset", "cifar10", "--data-dir", data, "--model",
                                model, "--epochs", "1", "--batch-size", "4", "--quiet",
                                "--backend", backend.name, "--out", out], capsys)
    assert rc == 0, err
    assert "final validation accuracy" in stdout and (out / "checkpoint.safetensors").is_file()
    rc, stdout, err = run_main(["evaluate", out, "--backend", backend.name], capsys)
    assert rc == 0, err
    lines = stdout.splitlines()
    assert lines[0].startswith("cifar10 test: loss ") and lines[0].endswith(
        f"({TEST_RECORDS} images)")
    worst = next(line for line in lines if line.startswith("worst classes: "))
    assert any(name in worst for name in NAMES["cifar10"])  # names from batches.meta.txt


def test_cli_cifar100_summary_and_broken_file(isolated_env, small, capsys):
    data = isolated_env / "data"
    make_cifar(data, "cifar100")
    rc, stdout, err = run_main(["summary", "--model", "lenet5", "--dataset", "cifar100",
                                "--data-dir", data, "--backend", "numpy"], capsys)
    assert rc == 0, err
    assert "model lenet5, 100 classes" in stdout and "input (None, 32, 32, 3)" in stdout
    (data / "test.bin").write_bytes((data / "test.bin").read_bytes()[:-1])
    rc, _, err = run_main(["train", "--dataset", "cifar100", "--data-dir", data, "--backend",
                           "numpy", "--quiet", "--out", isolated_env / "run"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "test.bin" in err and "truncated or not CIFAR binary" in err
