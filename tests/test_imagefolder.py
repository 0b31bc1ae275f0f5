"""Image folders (anycnn.data.imagefolder) and image decoding (anycnn.data.images), on small
PNG/JPEG files
generated with Pillow into tmp_path: classes, conversions, the seeded split, the train/val layout,
the decode cache (reused, invalidated, written atomically), bad images (skip / stop)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from anycnn import images as image_files
from anycnn.data.imagefolder import ImageFolder, ImageFolderWarning, load_image_folder
from anycnn.errors import ConfigError, DataError

Image = pytest.importorskip("PIL.Image")
ROOT = Path(__file__).resolve().parent.parent


def write_image(path: Path, seed: int, size=(12, 10), mode="RGB", fmt=None) -> Path:
    """A random image of ``size`` (H, W) in Pillow ``mode``, saved to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (*size, bands), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if bands == 1 else pixels, mode).save(path, format=fmt)
    return path


def make_folder(root: Path, classes=("cat", "dog"), per_class=5, **kwargs) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{i}.png", seed=100 * c + i, **kwargs)
    return root


def truncated_png(path: Path, seed: int = 7) -> Path:
    """A PNG whose header is intact but whose pixel data stops half way."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 10, 3), np.uint8)).save(
        buffer, format="PNG")
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[:len(data) // 2])
    return path


@pytest.fixture
def decodes(monkeypatch):
    """Counts calls of anycnn.data.images.load_image (one per decoded file)."""
    calls = []
    real = image_files.load_image

    def counting(path, *args, **kwargs):
        calls.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(image_files, "load_image", counting)
    return calls


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if ".tmp" in p.name) if cache.exists() else []


# ------------------------------------------------------------------------------ classes, layout


def test_classes_are_the_sorted_subfolders_and_other_files_are_ignored(tmp_path):
    root = make_folder(tmp_path / "pets", classes=("zebra", "ant", "cat"), per_class=2)
    write_image(root / "cat" / "nested" / "deep.jpg", seed=9, fmt="JPEG")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "ant" / ".hidden.png").write_bytes(b"ignored: hidden")
    (root / "README.md").write_text("top-level file")
    folder = ImageFolder(root, cache_dir=tmp_path / "cache")
    assert folder.classes == ["ant", "cat", "zebra"]
    assert [label for _, label in folder.samples] == [0, 0, 1, 1, 1, 2, 2]
    assert folder.samples[4][0] == root / "cat" / "nested" / "deep.jpg"
    assert sorted(p.name for p in folder.ignored) == ["README.md", "notes.txt"]
    data = folder.load()
    assert data.images.dtype == np.uint8 and data.images.shape == (7, 12, 10, 3)
    assert data.labels.tolist() == [0, 0, 1, 1, 1, 2, 2] and data.num_classes == 3
    splits = load_image_folder(root, cache_dir=tmp_path / "cache")
    assert splits.class_names == ("ant", "cat", "zebra")
    assert "2 non-image file(s) ignored" in splits.source


def test_reexported_from_datasets():
    import anycnn.data.datasets

    assert anycnn.data.datasets.ImageFolder is ImageFolder
    assert anycnn.data.datasets.load_image_folder is load_image_folder


def test_pixels_are_converted_and_resized_as_pillow_does(tmp_path):
    root = tmp_path / "f"
    a = write_image(root / "a" / "big.png", 1, size=(20, 16))
    write_image(root / "a" / "rgba.png", 2, size=(8, 8), mode="RGBA")
    write_image(root / "b" / "gray.jpg", 3, size=(10, 10), mode="L", fmt="JPEG")
    with pytest.raises(DataError, match="different sizes"):
        load_image_folder(root, cache_dir=tmp_path / "c")
    folder = ImageFolder(root, size=(6, 9), channels=1, cache_dir=tmp_path / "c")
    data = folder.load()
    assert data.images.shape == (3, 6, 9, 1)
    with Image.open(a) as img:
        expected = np.asarray(img.convert("L").resize((9, 6), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(data.images[0, ..., 0], expected)
    rgb = ImageFolder(root, size=5, cache_dir=tmp_path / "c").load()
    assert rgb.images.shape == (3, 5, 5, 3)  # any colour image: RGB by default
    assert np.array_equal(rgb.images[2, ..., 0], rgb.images[2, ..., 2])  # gray as RGB


def test_grayscale_folders_default_to_one_channel_and_keep_a_common_size(tmp_path):
    root = make_folder(tmp_path / "digits", classes=("0", "1"), per_class=3, mode="L",
                       size=(7, 9))
    splits = load_image_folder(root, cache_dir=tmp_path / "c")
    assert splits.image_shape == (7, 9, 1)


def test_the_split_is_seeded_reproducible_and_disjoint(tmp_path):
    root = make_folder(tmp_path / "f", per_class=10)
    first = load_image_folder(root, val_split=0.25, cache_dir=tmp_path / "c1")
    again = load_image_folder(root, val_split=0.25, cache_dir=tmp_path / "c2")
    assert (len(first.train), len(first.val)) == (15, 5) and first.test is first.val
    np.testing.assert_array_equal(first.val.images, again.val.images)
    np.testing.assert_array_equal(first.train.labels, again.train.labels)
    train_rows = {bytes(x) for x in np.asarray(first.train.images)}
    assert not train_rows & {bytes(x) for x in np.asarray(first.val.images)}
    other = load_image_folder(root, val_split=0.25, split_seed=1, cache_dir=tmp_path / "c1")
    assert not np.array_equal(other.val.images, first.val.images)
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(ConfigError, match="val_split"):
            load_image_folder(root, val_split=bad, cache_dir=tmp_path / "c1")


def test_train_val_layout_takes_the_classes_of_train(tmp_path):
    make_folder(tmp_path / "f" / "train", classes=("a", "b", "c"), per_class=3)
    make_folder(tmp_path / "f" / "val", classes=("a", "c"), per_class=2)  # b has no val images
    splits = load_image_folder(tmp_path / "f", cache_dir=tmp_path / "c")
    assert splits.class_names == ("a", "b", "c")
    assert (len(splits.train), len(splits.val)) == (9, 4) and splits.test is splits.val
    assert splits.val.labels.tolist() == [0, 0, 2, 2]
    make_folder(tmp_path / "f" / "test", classes=("b",), per_class=1)
    with_test = load_image_folder(tmp_path / "f", cache_dir=tmp_path / "c")
    assert with_test.test.labels.tolist() == [1] and with_test.test is not with_test.val
    make_folder(tmp_path / "f" / "val", classes=("dragon",), per_class=1)
    with pytest.raises(DataError, match=r"dragon.* not among the training classes"):
        load_image_folder(tmp_path / "f", cache_dir=tmp_path / "c")


@pytest.mark.parametrize("setup, message", [
    (lambda r: None, "no such directory"),
    (lambda r: r.mkdir(), "no class subfolders"),
    (lambda r: make_folder(r, classes=("only",)), "found 1 class folder"),
    (lambda r: (make_folder(r), (r / "empty").mkdir(), (r / "empty" / "x.txt").write_text("")),
     "empty: class folder holds no image files"),
    (lambda r: (make_folder(r, per_class=1, classes=("a",)), (r / "b").mkdir()),
     "b: class folder holds no image files"),
])
def test_folders_without_usable_classes_are_explained(tmp_path, setup, message):
    root = tmp_path / "f"
    setup(root)
    with pytest.raises(DataError, match=message):
        load_image_folder(root, cache_dir=tmp_path / "c")


def test_options_are_checked(tmp_path):
    root = make_folder(tmp_path / "f")
    for kwargs, message in (({"size": 0}, "image size"), ({"size": (3, 4, 5)}, "image size"),
                            ({"channels": 2}, "channels must be 1"),
                            ({"resample": "cubic"}, "valid names: bilinear"),
                            ({"bad_images": "ignore"}, "bad_images must be")):
        with pytest.raises(ConfigError, match=message):
            load_image_folder(root, cache_dir=tmp_path / "c", **kwargs)


# ------------------------------------------------------------------------------------------ cache


def test_the_cache_is_reused_memory_mapped_and_renewed_when_a_file_changes(tmp_path, decodes):
    root = make_folder(tmp_path / "f", per_class=4)
    cache = tmp_path / "cache"
    first = load_image_folder(root, size=6, cache_dir=cache)
    assert len(decodes) == 8
    again = load_image_folder(root, size=6, cache_dir=cache)
    assert len(decodes) == 8, "the second load decoded again"
    np.testing.assert_array_equal(first.train.images, again.train.images)
    assert isinstance(again.train.images.base, np.memmap) or isinstance(
        getattr(again.train.images.base, "base", None), np.memmap)
    assert not again.train.images.flags.writeable
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".npy"]

    changed = write_image(root / "dog" / "2.png", seed=999)  # new pixels, new size and mtime
    os.utime(changed, ns=(1, 1))
    renewed = load_image_folder(root, size=6, cache_dir=cache)
    assert len(decodes) == 16, "a changed file must be decoded again"
    assert len(list(cache.iterdir())) == 2, "the entry is replaced, not added to"
    with Image.open(changed) as img:
        expected = np.asarray(img.resize((6, 6), Image.Resampling.BILINEAR))
    everything = np.concatenate([renewed.train.images, renewed.val.images])
    assert any(np.array_equal(x, expected) for x in everything)

    load_image_folder(root, size=7, cache_dir=cache)  # other options: another entry
    assert len(decodes) == 24 and len(list(cache.iterdir())) == 4


def test_a_damaged_cache_entry_is_decoded_again(tmp_path, decodes):
    root = make_folder(tmp_path / "f", per_class=2)
    cache = tmp_path / "cache"
    load_image_folder(root, cache_dir=cache)
    (npy,) = cache.glob("*.npy")
    npy.write_bytes(npy.read_bytes()[:100])
    splits = load_image_folder(root, cache_dir=cache)
    assert len(decodes) == 8 and splits.train.images.shape[1:] == (12, 10, 3)


def test_a_failed_decode_leaves_no_temporary_file_and_the_old_entry_intact(tmp_path, decodes):
    root = make_folder(tmp_path / "f", per_class=3)
    cache = tmp_path / "cache"
    good = load_image_folder(root, size=8, channels=3, cache_dir=cache)
    bad = truncated_png(root / "cat" / "9-truncated.png")
    with pytest.raises(DataError, match=r"9-truncated\.png: cannot decode image") as info:
        load_image_folder(root, size=8, channels=3, cache_dir=cache)
    assert "\n" not in str(info.value)
    assert leftovers(cache) == []
    assert len(list(cache.iterdir())) == 2
    bad.unlink()
    count = len(decodes)
    back = load_image_folder(root, size=8, channels=3, cache_dir=cache)
    assert len(decodes) == count, "the previous entry should still be valid"
    np.testing.assert_array_equal(back.val.images, good.val.images)


def test_an_interrupted_decode_leaves_no_temporary_file(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "f", per_class=3)
    cache = tmp_path / "cache"
    real, seen = image_files.load_image, []

    def interrupted(path, *args, **kwargs):
        seen.append(path)
        if len(seen) == 4:
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(image_files, "load_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_image_folder(root, cache_dir=cache)
    assert list(cache.iterdir()) == []


# ------------------------------------------------------------------------------------- bad images


def bad_folder(root: Path) -> list[Path]:
    make_folder(root, per_class=4)
    bad = [truncated_png(root / "cat" / "truncated.png"),
           root / "dog" / "fake.jpg"]
    bad[1].write_bytes(b"this is not a jpeg at all")
    (root / "dog" / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 20)
    bad.append(root / "dog" / "cut.jpg")
    return bad


def test_bad_images_stop_with_one_line_naming_the_file(tmp_path):
    bad = bad_folder(tmp_path / "f")
    with pytest.raises(DataError) as info:
        load_image_folder(tmp_path / "f", cache_dir=tmp_path / "c")
    text = str(info.value)
    assert "\n" not in text and "--bad-images skip" in text
    assert any(str(path) in text for path in bad), text
    assert leftovers(tmp_path / "c") == []


@pytest.mark.parametrize("size", [None, 8])
def test_bad_images_skip_warns_with_count_and_paths(tmp_path, decodes, size):
    bad = bad_folder(tmp_path / "f")
    with pytest.warns(ImageFolderWarning) as record:
        splits = load_image_folder(tmp_path / "f", size=size, bad_images="skip", val_split=0.5,
                                   cache_dir=tmp_path / "c")
    message = str(record[0].message)
    assert "skipped 3 of 11 image files" in message
    for path in bad:
        assert str(path) in message
    assert len(splits.train) + len(splits.val) == 8
    assert leftovers(tmp_path / "c") == []
    count = len(decodes)
    with pytest.warns(ImageFolderWarning, match="skipped 3"):  # from the cache: warned again
        again = load_image_folder(tmp_path / "f", size=size, bad_images="skip", val_split=0.5,
                                  cache_dir=tmp_path / "c")
    assert len(decodes) == count
    np.testing.assert_array_equal(again.train.labels, splits.train.labels)
    with pytest.raises(DataError, match=r"truncated\.png|fake\.jpg|cut\.jpg"):  # not hidden
        load_image_folder(tmp_path / "f", size=size, val_split=0.5, cache_dir=tmp_path / "c")


def test_a_folder_of_only_bad_images(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "f" / name).mkdir(parents=True)
        (tmp_path / "f" / name / "x.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="none of the 2 image files could be read"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_image_folder(tmp_path / "f", bad_images="skip", cache_dir=tmp_path / "c")


# ----------------------------------------------------------------------------------- decoding


def test_load_image_errors_name_the_file(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("hello")
    for path, message in ((text, "notes.png: not an image file Pillow can read"),
                          (tmp_path / "missing.png", "missing.png: no such file"),
                          (tmp_path, "is a directory")):
        with pytest.raises(DataError, match=message):
            image_files.load_image(path, 8, 3)


def test_load_images_stacks_and_requires_one_shape(tmp_path):
    a = write_image(tmp_path / "a.png", 1, size=(5, 6))
    b = write_image(tmp_path / "b.jpg", 2, size=(9, 9), mode="L", fmt="JPEG")
    batch = image_files.load_images([a, b], size=(4, 4), channels=1)
    assert batch.shape == (2, 4, 4, 1) and batch.dtype == np.uint8
    with pytest.raises(DataError, match="different shapes"):
        image_files.load_images([a, b], channels=None)
    with pytest.raises(DataError, match="no image files"):
        image_files.load_images([])


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[0, :, 0] = 255  # a red top row
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    img.save(tmp_path / "r.png", exif=exif)
    loaded = image_files.load_image(tmp_path / "r.png", channels=3)
    assert loaded.shape == (6, 4, 3)


def test_missing_pillow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ConfigError, match=r"pip install 'anycnn\[images\]'"):
        image_files.load_image(tmp_path / "x.png")


def test_importing_anycnn_does_not_import_pillow():
    code = textwrap.dedent("""
        import sys
        import anycnn, anycnn.cli.commands, anycnn.data.datasets, anycnn.data.imagefolder
        import anycnn.data.images
        anycnn.cli.commands.build_parser()
        print([m for m in sys.modules if m.split(".")[0] == "PIL"])
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_parallel_decoding_gives_the_one_thread_pixels_and_first_bad_file(tmp_path, monkeypatch):
    """The first pass decodes on several threads: the same pixels and skipped files as one
    thread, and "stop" names the first bad file in sample order."""
    make_folder(tmp_path / "f", per_class=12, size=(30, 26))
    truncated_png(tmp_path / "f" / "cat" / "10.png")  # overwrite two images: bad files
    truncated_png(tmp_path / "f" / "dog" / "03.png")
    results = {}
    for threads in ("1", "3"):
        monkeypatch.setenv("ANYCNN_NUM_THREADS", threads)
        with pytest.warns(ImageFolderWarning, match="skipped 2"):
            splits = load_image_folder(tmp_path / "f", size=16, bad_images="skip",
                                       val_split=0.25, cache_dir=tmp_path / f"c{threads}")
        results[threads] = splits
        with pytest.raises(DataError, match=r"cat.10\.png"):
            load_image_folder(tmp_path / "f", size=16, cache_dir=tmp_path / f"s{threads}")
    for part in ("train", "val"):
        a, b = getattr(results["1"], part), getattr(results["3"], part)
        np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
        np.testing.assert_array_equal(np.asarray(a.labels), np.asarray(b.labels))


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_the_decode_bar_shows_only_on_a_terminal(tmp_path, monkeypatch, capsys):
    # issue 26 (new-user trial): "decoding images 0%" appeared in pipes and log files
    make_folder(tmp_path / "pics")
    load_image_folder(tmp_path / "pics", cache_dir=tmp_path / "c1", progress=True)
    assert "decoding images" not in capsys.readouterr().err  # stderr is not a terminal here
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    load_image_folder(tmp_path / "pics", cache_dir=tmp_path / "c2", progress=False)
    assert "decoding images" not in terminal.getvalue()  # --quiet: never
    load_image_folder(tmp_path / "pics", cache_dir=tmp_path / "c3", progress=True)
    assert "decoding images" in terminal.getvalue()  # the bar works where it belongs
