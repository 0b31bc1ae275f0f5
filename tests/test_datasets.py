"""anycnn.data.datasets: IDX reading, the bundled sample, directory lookup and verified
downloads."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import importlib.resources
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from anycnn import datasets
from anycnn.data import sources
from anycnn.data.datasets import ArrayDataset, load_dataset, read_idx
from anycnn.errors import ConfigError, DataError

_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def idx_bytes(array: np.ndarray, code: int | None = None) -> bytes:
    """The IDX encoding of ``array`` (header + big-endian data)."""
    kind = array.dtype.str[1:]
    code = _CODES[kind] if code is None else code
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# ------------------------------------------------------------------------------------------ IDX


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (2, 1, 3, 2)])
def test_idx_round_trip(tmp_path, gz, dtype, shape):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    out = read_idx(write_idx(tmp_path / "a.idx", array, gz=gz))
    assert out.shape == shape
    assert out.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(out, array)


def test_idx_huge_claimed_size_rejected_without_allocating(tmp_path):
    path = tmp_path / "huge.idx"
    path.write_bytes(bytes([0, 0, 0x0E, 4]) + struct.pack(">4I", *[0xFFFFFFFF] * 4) + b"\0" * 8)
    with pytest.raises(DataError, match=r"huge\.idx: truncated: expected \d+ bytes.*found 8"):
        read_idx(path)


def _header(code=0x08, ndim=1, dims=(4,)):
    return bytes([0, 0, code, ndim]) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize(("content", "message"), [
    (b"", "too short for an IDX header"),
    (b"\x01\x00\x08\x01" + struct.pack(">I", 4) + b"abcd", "not an IDX file"),
    (_header(code=0x07) + b"abcd", "unknown IDX data type code 0x07"),
    (_header(ndim=0, dims=()) + b"abcd", "0 dimensions"),
    (_header(ndim=5, dims=(1,) * 5) + b"abcd", "5 dimensions"),
    (_header(ndim=2, dims=(4,)), "truncated header"),
    (_header(dims=(0,)), "empty dimension"),
    (_header() + b"abc", "truncated: expected 4 bytes of data for shape \\(4,\\), found 3"),
    (_header(code=0x0C) + b"\0" * 15, "truncated: expected 16 bytes"),
    (_header() + b"abcdXY", "2 trailing bytes"),
], ids=["empty", "magic", "dtype", "ndim0", "ndim5", "short-dims", "zero-dim", "truncated",
        "truncated-int32", "trailing"])
@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_idx_errors_name_the_file(tmp_path, content, message, gz):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(gzip.compress(content) if gz else content)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("damage", ["garbage", "cut"])
def test_idx_corrupt_gzip(tmp_path, damage):
    good = gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8)))
    data = good[:10] + b"\xff" * 30 if damage == "garbage" else good[: len(good) // 2]
    path = tmp_path / "labels.gz"
    path.write_bytes(data)
    with pytest.raises(DataError, match=r"labels\.gz: corrupt gzip stream"):
        read_idx(path)


def test_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.gz: cannot open"):
        read_idx(tmp_path / "nothere.gz")


# -------------------------------------------------------------------------------- value types


def test_array_dataset_validates():
    images = np.zeros((3, 2, 2, 1), np.uint8)
    with pytest.raises(DataError, match="3 images but 2 labels"):
        ArrayDataset(images, np.zeros(2, np.int64), 10)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 10\)"):
        ArrayDataset(images, np.array([0, 10, 1]), 10)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 10\)"):
        ArrayDataset(images, np.array([0, -1, 1]), 10)
    with pytest.raises(DataError, match=r"uint8 \(0-255\) or float32/float64 \(in \[0, 1\]\) "
                                        r"of shape \(N, H, W, C\)"):
        ArrayDataset(np.zeros((3, 4), np.uint8), np.zeros(3, np.int64), 10)
    for dtype in ("int16", "float16", "bool"):
        with pytest.raises(DataError, match=f"got {dtype} of shape"):
            ArrayDataset(images.astype(dtype), np.zeros(3, np.int64), 10)
    ds = ArrayDataset(images, np.array([0, 9, 1], np.uint8), 10)
    assert ds.labels.dtype == np.int64 and len(ds) == 3 and ds.image_shape == (2, 2, 1)


def test_grayscale_images_without_a_channel_axis_get_one():
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    ds = ArrayDataset(images, np.zeros(3, np.int64), 10)
    assert ds.images.shape == (3, 28, 28, 1) and ds.image_shape == (28, 28, 1)
    assert np.shares_memory(ds.images, images)  # a view, not a copy
    np.testing.assert_array_equal(ds.images[..., 0], images)


@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 3, 32, 32), (2, 4, 16, 24), (2, 1, 5, 5)])
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_channels_first_images_are_refused_with_the_fix(shape, dtype):
    images = np.zeros(shape, dtype)
    labels = np.zeros(shape[0], np.int64)
    c, h, w = shape[1:]
    fix = r"Fix: images = np\.transpose\(images, \(0, 2, 3, 1\)\)"
    with pytest.raises(DataError, match=rf"look channels first \(NCHW, {c} channel\(s\) of "
                                        rf"{h}x{w}\); anycnn wants channels last \(NHWC\)\. {fix}"):
        ArrayDataset(images, labels, 10)
    fixed = ArrayDataset(np.transpose(images, (0, 2, 3, 1)), labels, 10)  # the fix works
    assert fixed.image_shape == (h, w, c)


@pytest.mark.parametrize("shape", [(2, 28, 28, 1), (2, 32, 32, 3), (2, 3, 3, 2), (2, 1, 4, 8),
                                   (2, 3, 32, 4), (2, 8, 8, 16)])
def test_channels_last_images_are_not_mistaken_for_channels_first(shape):
    ds = ArrayDataset(np.zeros(shape, np.uint8), np.zeros(2, np.int64), 10)
    assert ds.image_shape == shape[1:]


@pytest.mark.parametrize("dtype", ["float32", "float64", ">f8"])
def test_float_images_in_the_unit_interval_are_kept(dtype):
    images = np.linspace(0, 1, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3).astype(dtype)
    ds = ArrayDataset(images, np.array([1, 2]), 10)
    assert ds.images.dtype == np.dtype(dtype).newbyteorder("=") and ds.images.dtype.isnative
    np.testing.assert_array_equal(ds.images, images)
    sub = ds.subset(np.array([1]))
    assert sub.images.dtype == ds.images.dtype
    np.testing.assert_array_equal(sub.images, images[1:])


@pytest.mark.parametrize(("fill", "specials", "found"), [
    (0.0, [255.0], "values from 0.0 to 255.0"),
    (0.5, [-0.5], "values from -0.5 to 0.5"),
    (0.5, [1.0000001], "values from 0.5 to 1.0000001"),
    (0.25, [np.nan], "values from 0.25 to 0.25 and 1 NaN/infinite value"),
    (0.5, [np.inf, -np.inf], "values from 0.5 to 0.5 and 2 NaN/infinite value"),
    (np.nan, [], "no finite values and 32 NaN/infinite value"),
], ids=["0-255", "negative", "just-above-1", "nan", "inf", "nothing-finite"])
def test_float_images_outside_the_unit_interval_are_refused(fill, specials, found):
    images = np.full((2, 4, 4, 1), fill)
    images.reshape(-1)[:len(specials)] = specials
    with pytest.raises(DataError, match=r"float images must lie in \[0, 1\]; found "
                                        + found.replace(".", r"\.")):
        ArrayDataset(images, np.array([1, 2]), 10)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ConfigError, match="mnist-sample, mnist, fashion-mnist"):
        load_dataset("cifar-11")


# -------------------------------------------------------------------------------- bundled sample


def test_bundled_files_md5():
    expected = {"t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}
    root = importlib.resources.files("anycnn") / "data"
    for name, md5 in expected.items():
        assert hashlib.md5((root / name).read_bytes()).hexdigest() == md5


def test_bundled_files_match_pinned_sha256():
    root = importlib.resources.files("anycnn") / "data"
    for name in datasets.SAMPLE_FILES:
        digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
        assert digest == datasets.SHA256["mnist"][name]


@pytest.fixture(scope="module")
def sample():
    return load_dataset("mnist-sample")


def test_sample_sizes_and_layout(sample):
    assert (len(sample.train), len(sample.val)) == (8000, 2000)
    assert sample.test is sample.val
    assert sample.train.images.shape == (8000, 28, 28, 1)
    assert sample.train.images.dtype == np.uint8 and sample.train.labels.dtype == np.int64
    assert sample.num_classes == 10 and sample.image_shape == (28, 28, 1)
    assert "bundled" in sample.source
    for part in (sample.train, sample.val):
        assert part.labels.min() == 0 and part.labels.max() == 9


def test_sample_split_is_deterministic_and_disjoint(sample):
    again = load_dataset("mnist-sample")
    np.testing.assert_array_equal(again.train.images, sample.train.images)
    np.testing.assert_array_equal(again.val.labels, sample.val.labels)
    # Pinned: the split must not change between releases or NumPy versions.
    assert hashlib.sha256(sample.val.labels.tobytes()).hexdigest()[:16] == "866e26ec6d74e52f"
    assert hashlib.sha256(sample.val.images.tobytes()).hexdigest()[:16] == "f89bb94bd7d256fe"
    # train + val is exactly the 10,000-image test set.
    with importlib.resources.as_file(
            importlib.resources.files("anycnn") / "data" / "t10k-labels-idx1-ubyte.gz") as p:
        full = read_idx(p)
    counts = np.bincount(sample.train.labels, minlength=10) + np.bincount(sample.val.labels,
                                                                           minlength=10)
    np.testing.assert_array_equal(counts, np.bincount(full, minlength=10))


# ------------------------------------------------------------------------------------- lookup


def make_fake_dataset(directory: Path, n_train: int, n_test: int = 3, gz: bool = True,
                      seed: int = 0) -> dict[str, bytes]:
    """Write a tiny 4x4 dataset with the standard file names; return {filename: file bytes}."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 4, 4), dtype=np.uint8)),
                            ("labels-idx1", rng.integers(0, 10, n, dtype=np.uint8))):
            name = f"{split}-{kind}-ubyte" + (".gz" if gz else "")
            write_idx(directory / name, array, gz=gz)
            out[name] = (directory / name).read_bytes()
    return out


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Empty cache, system dir and ANYCNN_DATA under tmp_path; no download URL from the env."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ANYCNN_DATA", raising=False)
    monkeypatch.delenv("ANYCNN_DATA_URL", raising=False)
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIR", tmp_path / "system")
    monkeypatch.setattr(sources, "DOWNLOAD_TIMEOUT", 5.0)
    return tmp_path


def test_lookup_order(isolated, monkeypatch):
    tmp = isolated
    make_fake_dataset(tmp / "system" / "mnist", n_train=4)
    assert len(load_dataset("mnist", download=False).train) == 4
    make_fake_dataset(tmp / "cache" / "anycnn" / "mnist", n_train=5)
    assert len(load_dataset("mnist", download=False).train) == 5
    make_fake_dataset(tmp / "env" / "mnist", n_train=6)
    monkeypatch.setenv("ANYCNN_DATA", str(tmp / "env"))
    assert len(load_dataset("mnist", download=False).train) == 6
    make_fake_dataset(tmp / "explicit", n_train=7, gz=False)
    splits = load_dataset("mnist", data_dir=tmp / "explicit", download=False)
    assert len(splits.train) == 7 and splits.source == str(tmp / "explicit")
    # the explicit directory may also hold a <name>/ subfolder
    make_fake_dataset(tmp / "explicit2" / "mnist", n_train=8)
    assert len(load_dataset("mnist", data_dir=tmp / "explicit2", download=False).train) == 8


def test_full_dataset_splits(isolated):
    make_fake_dataset(isolated / "d", n_train=5, n_test=3)
    splits = load_dataset("fashion-mnist", data_dir=isolated / "d", download=False)
    assert (len(splits.train), len(splits.val)) == (5, 3)
    assert splits.test is splits.val
    assert splits.train.images.shape == (5, 4, 4, 1) and splits.image_shape == (4, 4, 1)
    assert splits.num_classes == 10 and splits.class_names[0] == "T-shirt/top"


def test_incomplete_directory_is_skipped(isolated, monkeypatch):
    make_fake_dataset(isolated / "system" / "mnist", n_train=4)
    make_fake_dataset(isolated / "env" / "mnist", n_train=9)
    (isolated / "env" / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("ANYCNN_DATA", str(isolated / "env"))
    assert len(load_dataset("mnist", download=False).train) == 4


@pytest.mark.parametrize("download", [False, True])
def test_explicit_data_dir_never_falls_back(isolated, download):
    """A data dir the user names is the only place looked at: an incomplete one is an error
    naming the missing files, even when a complete copy sits in the cache."""
    make_fake_dataset(isolated / "cache" / "anycnn" / "mnist", n_train=4)
    make_fake_dataset(isolated / "partial" / "mnist", n_train=9)
    (isolated / "partial" / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"partial/mnist lacks 1 of the 4 mnist files: "
                       r"t10k-labels-idx1-ubyte\[\.gz\]"):
        load_dataset("mnist", data_dir=isolated / "partial", download=download)
    with pytest.raises(DataError, match="nowhere: no such directory"):
        load_dataset("mnist", data_dir=isolated / "nowhere", download=download)


def test_count_mismatch_in_files(isolated):
    make_fake_dataset(isolated / "d", n_train=5)
    write_idx(isolated / "d" / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(DataError, match="5 images but 4 labels") as info:
        load_dataset("mnist", data_dir=isolated / "d", download=False)
    assert str(isolated / "d") in str(info.value)


def test_not_found_says_where_to_put_files(isolated):
    with pytest.raises(DataError) as info:
        load_dataset("mnist", download=False)
    message = str(info.value)
    assert "--data-dir" in message
    for where in (isolated / "cache" / "anycnn" / "mnist",
                  isolated / "system" / "mnist"):
        assert str(where) in message
    for stem in datasets.FILES.values():
        assert stem in message
    assert "ANYCNN_DATA" in message


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_debian_fashion_mnist(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("ANYCNN_DATA", raising=False)
    splits = load_dataset("fashion-mnist", download=False)
    assert splits.source == "/usr/share/datasets/fashion-mnist"
    assert (len(splits.train), len(splits.val)) == (60000, 10000)
    assert splits.train.images.shape == (60000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(splits.train.labels), [6000] * 10)


# ----------------------------------------------------------------------------------- download


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def file_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/"served"; yields (root dir, base URL)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _pin(monkeypatch, files: dict[str, bytes]) -> None:
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    monkeypatch.setitem(datasets.SHA256, "mnist", digests)


def test_download_success(isolated, file_server, monkeypatch):
    root, url = file_server
    files = make_fake_dataset(root / "mnist", n_train=5)
    _pin(monkeypatch, files)
    splits = load_dataset("mnist", base_url=url, progress=False)
    cache = isolated / "cache" / "anycnn" / "mnist"
    assert splits.source == str(cache) and len(splits.train) == 5
    assert sorted(p.name for p in cache.iterdir()) == sorted(files)
    for name, data in files.items():
        assert (cache / name).read_bytes() == data
    # the cache is used from now on, even with the server gone
    for path in (root / "mnist").iterdir():
        path.unlink()
    assert len(load_dataset("mnist", base_url=url, progress=False).train) == 5


def test_download_url_from_environment(isolated, file_server, monkeypatch):
    root, url = file_server
    _pin(monkeypatch, make_fake_dataset(root / "mnist", n_train=6))
    monkeypatch.setenv("ANYCNN_DATA_URL", url)
    assert len(load_dataset("mnist", progress=False).train) == 6


def test_download_fetches_only_missing_files(isolated, file_server, monkeypatch):
    root, url = file_server
    files = make_fake_dataset(root / "mnist", n_train=5)
    _pin(monkeypatch, files)
    cache = isolated / "cache" / "anycnn" / "mnist"
    cache.mkdir(parents=True)
    (cache / "train-images-idx3-ubyte.gz").write_bytes(files["train-images-idx3-ubyte.gz"])
    (root / "mnist" / "train-images-idx3-ubyte.gz").unlink()  # would be a 404
    assert len(load_dataset("mnist", base_url=url, progress=False).train) == 5


def test_download_sha_mismatch_deletes_file(isolated, file_server, monkeypatch):
    root, url = file_server
    files = make_fake_dataset(root / "mnist", n_train=5)
    _pin(monkeypatch, files)
    bad = "0" * 64
    monkeypatch.setitem(datasets.SHA256["mnist"], "train-labels-idx1-ubyte.gz", bad)
    actual = hashlib.sha256(files["train-labels-idx1-ubyte.gz"]).hexdigest()
    with pytest.raises(DataError, match="SHA-256 mismatch") as info:
        load_dataset("mnist", base_url=url, progress=False)
    message = str(info.value)
    assert "train-labels-idx1-ubyte.gz" in message and bad in message and actual in message
    cache = isolated / "cache" / "anycnn" / "mnist"
    assert not (cache / "train-labels-idx1-ubyte.gz").exists()
    assert not [p for p in cache.iterdir() if "labels" in p.name]  # no partial file left


def test_download_missing_file_on_server(isolated, file_server, monkeypatch):
    root, url = file_server
    _pin(monkeypatch, make_fake_dataset(root / "mnist", n_train=5))
    (root / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="downloading mnist failed") as info:
        load_dataset("mnist", base_url=url, progress=False)
    assert "t10k-images-idx3-ubyte.gz" in str(info.value) and "404" in str(info.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_unreachable_server_says_where_to_put_files(isolated, monkeypatch):
    base = f"http://127.0.0.1:{_closed_port()}/"
    monkeypatch.setitem(datasets.MIRRORS, "mnist", (base, base + "second/"))
    with pytest.raises(DataError, match="downloading mnist failed") as info:
        load_dataset("mnist", progress=False)
    message = str(info.value)
    assert message.count("127.0.0.1") == 2  # both mirrors tried
    assert str(isolated / "cache" / "anycnn" / "mnist") in message
    assert str(isolated / "system" / "mnist") in message
    for stem in datasets.FILES.values():
        assert f"{stem}.gz" in message
    cache = isolated / "cache" / "anycnn" / "mnist"
    assert not cache.exists() or not list(cache.iterdir())
