"""Your own images as a dataset: one subfolder per class, decoded once into a cached array.

Layouts (class names are the subfolder names, sorted, as in torchvision and Keras)::

    photos/                      photos/
      cat/  a.png b.jpg ...        train/  cat/ ...  dog/ ...
      dog/  c.png ...              val/    cat/ ...  dog/ ...
                                   test/   (optional, same classes)

* **flat** (left): :func:`load_image_folder` splits the images by a fixed seeded permutation
  (``val_split`` of them, at least one, go to validation; ``split_seed`` fixes which);
* **train/val** (right): used when the folder holds ``train/`` and ``val/`` subfolders; the
  classes are those of ``train/``, and ``val/`` (and ``test/``) may lack some but not add any.

Image files are found recursively inside each class folder by extension
(:data:`IMAGE_EXTENSIONS`, any case); hidden files and other files are ignored (and counted in
:attr:`ImageFolder.ignored`). Each image is decoded by :func:`anycnn.data.images.load_image`:
converted to grayscale (``channels=1``) or RGB (``channels=3``; default: 1 if every image is
grayscale, else 3) and resized to ``size`` (default: the images' own size, which must then be
the same for all of them), or, with ``resize_shorter=R``, resized to shorter side ``R`` keeping
the aspect ratio and centre-cropped to ``size`` (default ``R x R``): the evaluation geometry of
ImageNet-style models. ``load_image_folder(..., train_size=T)`` decodes the training split at
``T`` instead (e.g. ``R``, the larger picture a random-resized-crop augmentation
(:class:`~anycnn.data.resized_crop.RandomResizedCrop`) samples from) and the other splits at
``size``; then the training images decide the default channel count.

**Cache.** The decoded pixels are written once, as ``uint8`` NHWC ``(N, H, W, C)``, to a ``.npy``
file in ``cache_dir`` (default ``$XDG_CACHE_HOME/anycnn/imagefolder``, i.e.
``~/.cache/anycnn/imagefolder``) beside a small JSON record, and read back memory-mapped
(``np.lib.format.open_memmap(mode="r")``, what ``np.load(mmap_mode="r")`` does): the splits
are slices of that file, so data larger than RAM work and nothing is decoded again in the next
epoch or the next run. Each folder and set of options (size, channels, filter, split) has its
own entry, valid while the fingerprint of the file list (absolute paths, labels, sizes,
modification times) is unchanged; a changed folder is decoded again and replaces its entry.
Files are written atomically (temporary file + rename; the JSON record last), so an
interrupted or failed decode leaves no half-written entry and no temporary file. The first
pass decodes on one thread per usable CPU (``ANYCNN_NUM_THREADS``): Pillow releases the GIL
while it decodes and resizes.

**Bad images.** A file that is not an image, unreadable or truncated is named by path:
``bad_images="stop"`` (default) raises a one-line :class:`~anycnn.errors.DataError`;
``"skip"`` leaves such files out and warns (:class:`ImageFolderWarning`) with the count and
the first paths, at every load. Either way this happens while decoding, never mid-epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from ..kernels.threads import num_threads
from . import images as image_files
from .arrays import ArrayDataset, Splits
from .sources import cache_dir as user_cache_dir

#: file name endings taken as images (compared lower-case)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

BAD_IMAGE_POLICIES = ("stop", "skip")

#: bumped when the cache layout changes, so old entries are decoded again
CACHE_VERSION = 1

#: default seed of the validation permutation: the same split for every run and training seed
SPLIT_SEED = 0

_SHOWN_PATHS = 3  # bad files named in a warning


class ImageFolderWarning(UserWarning):
    """Images were skipped (``bad_images="skip"``); the message has the count and first paths."""


@dataclass(frozen=True)
class Options:
    """How the pixels are prepared (part of the cache key)."""

    size: tuple[int, int] | None = None
    channels: int | None = None
    resample: str = "bilinear"
    resize_shorter: int | None = None

    @classmethod
    def checked(cls, size: Sequence[int] | int | None, channels: int | None, resample: str,
                resize_shorter: int | None) -> Options:
        """The options, validated (see :func:`anycnn.data.images.check_options` and
        :func:`~anycnn.data.images.check_resize_shorter`)."""
        size, channels, resample = image_files.check_options(size, channels, resample)
        size = image_files.check_resize_shorter(resize_shorter, size)
        return cls(size, channels, resample,
                   None if resize_shorter is None else int(resize_shorter))

    def key(self) -> list:
        """The options as JSON-able cache-key data (``resize_shorter`` only when set, so the
        entries of folders decoded before it existed stay valid)."""
        extra = [] if self.resize_shorter is None else [["resize_shorter", self.resize_shorter]]
        return [self.size, self.channels, self.resample, *extra]


class ImageFolder:
    """One folder of class subfolders (see the module docstring).

    Attributes:
        root: the folder.
        classes: the class names, sorted (``classes[label]``).
        samples: ``(path, label)`` of every image file, class by class, paths sorted.
        ignored: the other files found (neither hidden nor with an image extension).

    Args:
        root: the folder.
        classes: take these class names (in this order) instead of the subfolders'; a subfolder
            not among them is an error (the ``val/`` of a train/val layout uses ``train/``'s).
        size, channels, resample, resize_shorter: as :func:`anycnn.data.images.load_image`.
        bad_images: ``"stop"`` or ``"skip"``.
        cache_dir: where decoded arrays are kept (default: the user cache).
        progress: show a progress bar while decoding.

    Raises:
        DataError: not a folder, no class subfolders, a class folder without images, an
            unexpected class.
        ConfigError: bad options.
    """

    def __init__(self, root: str | os.PathLike, *, classes: Sequence[str] | None = None,
                 size: Sequence[int] | int | None = None, channels: int | None = None,
                 resample: str = "bilinear", resize_shorter: int | None = None,
                 bad_images: str = "stop", cache_dir: str | os.PathLike | None = None,
                 progress: bool = False) -> None:
        self.options = Options.checked(size, channels, resample, resize_shorter)
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ConfigError(f"bad_images must be one of {', '.join(BAD_IMAGE_POLICIES)}, "
                              f"got {bad_images!r}")
        self.root = Path(root)
        self.bad_images = bad_images
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.progress = progress
        self.classes, self.samples, self.ignored = _scan(self.root, classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"ImageFolder({str(self.root)!r}, classes={len(self.classes)}, "
                f"images={len(self.samples)})")

    def load(self) -> ArrayDataset:
        """Every image of the folder, decoded (or read from the cache) into an
        :class:`~anycnn.data.arrays.ArrayDataset` of memory-mapped ``uint8`` NHWC images."""
        images, labels, _ = decode_cached(self.samples, self.options, self.bad_images,
                                          self.cache_dir, key=_key(self.root, self.options),
                                          progress=self.progress)
        return ArrayDataset(images, labels, len(self.classes))


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/anycnn/imagefolder`` (default ``~/.cache/anycnn/imagefolder``)."""
    return user_cache_dir("imagefolder")


def is_train_val_layout(root: str | os.PathLike) -> bool:
    """Whether ``root`` holds ``train/`` and ``val/`` folders (the train/val layout)."""
    root = Path(root)
    return (root / "train").is_dir() and (root / "val").is_dir()


def load_image_folder(path: str | os.PathLike, size: Sequence[int] | int | None = None,
                      channels: int | None = None, *, resample: str = "bilinear",
                      resize_shorter: int | None = None,
                      train_size: Sequence[int] | int | None = None,
                      val_split: float = 0.1, split_seed: int = SPLIT_SEED,
                      bad_images: str = "stop", cache_dir: str | os.PathLike | None = None,
                      progress: bool = False) -> Splits:
    """An image folder as train / validation / test :class:`~anycnn.data.arrays.Splits`.

    Flat layout: the images are split by ``np.random.default_rng(split_seed).permutation``;
    ``round(val_split * N)`` of them (at least 1) form ``val``. Train/val layout: ``train/`` and
    ``val/`` as they are (``val_split`` unused). ``test`` is ``test/`` when there is one, else
    the same object as ``val``. Each split keeps the files' order (class by class, paths sorted).

    Images are ``uint8`` NHWC ``(N, H, W, C)``, slices of one memory-mapped cache file
    (see the module docstring); labels ``int64``; ``class_names`` the sorted subfolder names.

    ``size``, ``channels``, ``resample`` and ``resize_shorter`` are
    :func:`anycnn.data.images.load_image`'s. ``train_size`` (default ``size``) decodes the
    training split at another size (with ``resize_shorter``: another centre crop, e.g. ``R x R``
    for a random-resized-crop augmentation while ``val``/``test`` get the evaluation crop); the
    two sizes are then two cache files.

    Raises:
        DataError: the folder is missing or holds fewer than two classes, a class without
            images, images of different sizes and no ``size``, a bad image (``"stop"``), too few
            images to split.
        ConfigError: bad options (``val_split`` outside (0, 1), unknown filter, ...).
    """
    root = Path(path)
    if not (isinstance(val_split, int | float) and 0 < val_split < 1):
        raise ConfigError(f"val_split must be a fraction in (0, 1), got {val_split!r}")
    common = dict(size=size, channels=channels, resample=resample,
                  resize_shorter=resize_shorter, bad_images=bad_images, cache_dir=cache_dir,
                  progress=progress)
    train = ImageFolder(root / "train" if is_train_val_layout(root) else root, **common)
    train_options = train.options
    if train_size is not None:
        train_options = Options.checked(train_size, channels, resample, resize_shorter)
    if len(train.classes) < 2:
        raise DataError(f"{train.root}: found {len(train.classes)} class folder(s) "
                        f"({', '.join(train.classes)}); a classifier needs at least 2 "
                        "(one subfolder per class)")
    if is_train_val_layout(root):
        parts = [("train", train.samples)]
        for name in ("val", "test"):
            if (root / name).is_dir():
                part = ImageFolder(root / name, classes=train.classes, **common)
                parts.append((name, part.samples))
        layout = "train/val"
    else:
        n = len(train.samples)
        n_val = max(1, round(val_split * n))
        if n - n_val < 1:
            raise DataError(f"{root}: {n} image(s) cannot be split into train and validation "
                            f"(val_split {val_split}); add images or a val/ folder")
        order = np.random.default_rng(split_seed).permutation(n)
        parts = [(name, [train.samples[i] for i in np.sort(idx)])
                 for name, idx in (("train", order[n_val:]), ("val", order[:n_val]))]
        layout = f"val_split {val_split}, split_seed {split_seed}"
    if train_options == train.options:  # one cache file for every split
        groups = [(parts, train.options, layout)]
    else:  # the training split at its own size; its channels decide the others'
        groups = [(parts[:1], train_options, f"{layout}; train split"),
                  (parts[1:], train.options, f"{layout}; other splits")]
    splits: dict[str, ArrayDataset] = {}
    for group, options, key in groups:
        if splits and options.channels is None:
            options = dataclasses.replace(options,
                                          channels=splits["train"].image_shape[2])
        splits.update(_decode_splits(root, group, options, key, len(train.classes),
                                     bad_images, train.cache_dir, progress))
    ignored = f"; {len(train.ignored)} non-image file(s) ignored" if train.ignored else ""
    return Splits(name=root.name or str(root), train=splits["train"], val=splits["val"],
                  test=splits.get("test", splits["val"]),
                  source=f"image folder {root} ({layout}{ignored})",
                  class_names=tuple(train.classes))


def _decode_splits(root: Path, parts: list, options: Options, layout: str, num_classes: int,
                   bad_images: str, cache_dir: Path, progress: bool) -> dict[str, ArrayDataset]:
    """``{name: ArrayDataset}`` of the ``(name, samples)`` parts, decoded into one cache file."""
    samples = [s for _, part in parts for s in part]
    images, labels, kept = decode_cached(samples, options, bad_images, cache_dir,
                                         key=_key(root, options, layout), progress=progress)
    splits = split_decoded(root, [(name, len(part)) for name, part in parts], kept, images,
                           labels, num_classes)
    return splits


# ------------------------------------------------------------------------------------- scanning


def split_decoded(where: Any, parts: Sequence[tuple[str, int]], kept: np.ndarray,
                  images: Any, targets: Any, num_classes: int) -> dict[str, ArrayDataset]:
    """``{name: ArrayDataset}`` of the decoded ``images`` (and their ``targets``) of
    consecutive ``parts`` ``(name, sample count)``: ``kept`` marks which samples were usable
    (the unusable ones are not among the rows). A part left empty is a one-line
    :class:`~anycnn.errors.DataError` naming ``where``."""
    splits, start, offset = {}, 0, 0
    for name, size in parts:
        count = int(np.count_nonzero(kept[offset:offset + size]))
        offset += size
        if count == 0:
            raise DataError(f"{where}: the {name} split holds no usable images")
        splits[name] = ArrayDataset(images[start:start + count], targets[start:start + count],
                                    num_classes)
        start += count
    return splits


def _scan(root: Path, classes: Sequence[str] | None
          ) -> tuple[list[str], list[tuple[Path, int]], list[Path]]:
    """(class names, (path, label) samples, ignored files) of ``root``; see ImageFolder."""
    if not root.is_dir():
        raise DataError(f"image folder {root}: no such directory")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    ignored = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    given = classes is not None
    if not given:
        classes = found
        if not classes:
            raise DataError(f"image folder {root}: no class subfolders (expected one subfolder "
                            "per class, each holding that class's images)")
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataError(f"{root}: class folder(s) {', '.join(extra)} not among the training "
                            f"classes ({', '.join(classes)})")
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        files = []
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in filenames:
                if filename.startswith("."):
                    continue
                target = files if filename.lower().endswith(IMAGE_EXTENSIONS) else ignored
                target.append(Path(dirpath) / filename)
        if not files and not given:  # (a val/ or test/ folder may lack a class)
            raise DataError(f"{root / name}: class folder holds no image files "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        samples += [(path, label) for path in sorted(files)]
    return list(classes), samples, ignored


# -------------------------------------------------------------------------------------- caching


def _key(root: Path, options: Options, layout: str = "folder") -> str:
    """The cache entry's name: the folder's absolute path and the options, hashed."""
    text = json.dumps([CACHE_VERSION, str(root.resolve()), *options.key(), layout])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _fingerprint(samples: Sequence[tuple[Path, int]], options: Options) -> str:
    """SHA-256 of the file list (paths, labels, sizes, mtimes) in order, and the options."""
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, *options.key()]).encode())
    for path, label in samples:
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "unreadable"
        digest.update(f"{os.path.abspath(path)}\0{label}\0{stamp}\n".encode())
    return digest.hexdigest()


def decode_cached(samples: Sequence[tuple[Path, int]], options: Options, bad_images: str,
                  cache_dir: Path, key: str, progress: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The images of ``samples`` decoded once and cached (see the module docstring).

    Returns:
        ``(images, labels, kept)``: ``images`` a read-only memory-mapped ``uint8``
        ``(M, H, W, C)`` array of the usable images in ``samples`` order, ``labels`` ``int64``
        ``(M,)``, ``kept`` a bool mask over ``samples`` (false for skipped files).
    """
    fingerprint = _fingerprint(samples, options)
    npy, record_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    cached = _read_entry(npy, record_path, fingerprint)
    if cached is None:
        _decode_into(npy, record_path, samples, options, bad_images, fingerprint, progress)
        cached = _read_entry(npy, record_path, fingerprint)
        if cached is None:  # pragma: no cover - someone removed it in between
            raise DataError(f"image cache {npy} vanished right after it was written")
    images, record = cached
    skipped = record["skipped"]
    if skipped:
        _report_bad([why for _, why in skipped], len(samples), bad_images)
    kept = np.ones(len(samples), dtype=bool)
    kept[[i for i, _ in skipped]] = False
    labels = np.array([label for _, label in samples], dtype=np.int64)[kept]
    return images, labels, kept


def _read_entry(npy: Path, record_path: Path, fingerprint: str):
    """``(memory-mapped images, record)`` when a complete entry for ``fingerprint`` exists."""
    try:
        record = json.loads(record_path.read_text())
        if record.get("fingerprint") != fingerprint:
            return None
        # what np.load(npy, mmap_mode="r") does, minus any pickle path: an object dtype is a
        # ValueError here (the package never calls np.load; tests/test_reliability.py checks)
        images = np.lib.format.open_memmap(npy, mode="r")
    except (OSError, ValueError, AttributeError):
        return None
    if images.dtype != np.uint8 or list(images.shape) != record.get("shape"):
        return None
    return images, record


def _decode_into(npy: Path, record_path: Path, samples: Sequence[tuple[Path, int]],
                 options: Options, bad_images: str, fingerprint: str, progress: bool) -> None:
    """Decode every sample into a new cache entry (atomically; no temporary file survives)."""
    from tqdm import tqdm

    from ..atomic import atomic_write_bytes

    bad: list[tuple[int, str]] = []
    size, channels = _resolve_shape(samples, options, bad_images, bad)
    shape = (len(samples), *size, channels)
    npy.parent.mkdir(parents=True, exist_ok=True)
    temps = []

    def temp() -> Path:
        temps.append(npy.parent / f".{npy.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp.npy")
        return temps[-1]

    try:
        out = np.lib.format.open_memmap(temp(), mode="w+", dtype=np.uint8, shape=shape)

        def decode(i: int, rows=out) -> str | None:
            """Decode sample ``i`` into its row; the reason it is unusable, or None."""
            try:
                rows[i] = image_files.load_image(samples[i][0], size, channels,
                                                 options.resample,
                                                 resize_shorter=options.resize_shorter)
            except DataError as exc:
                return str(exc)
            return None

        known_bad = {i for i, _ in bad}
        todo = [i for i in range(len(samples)) if i not in known_bad]
        # Pillow releases the GIL while it decodes and resizes: one thread per usable CPU,
        # the results taken in order (so "stop" names the first bad file, as one thread would)
        pool = ThreadPoolExecutor(max_workers=num_threads())
        try:
            reasons = pool.map(decode, todo)
            # disable=None: tqdm switches itself off when stderr is not a terminal (a pipe, a
            # log file), as the training bars do
            bar = tqdm(reasons, total=len(todo), desc="decoding images", unit="img",
                       disable=None if progress else True, leave=False)
            for i, reason in zip(todo, bar):
                if reason is not None:
                    _bad(bad, i, reason, bad_images)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        bad.sort()
        if bad:  # compact: the usable images only, copied in chunks
            keep = np.setdiff1d(np.arange(len(samples)), [i for i, _ in bad])
            final = np.lib.format.open_memmap(temp(), mode="w+", dtype=np.uint8,
                                              shape=(len(keep), *shape[1:]))
            for start in range(0, len(keep), 1024):
                final[start:start + 1024] = out[keep[start:start + 1024]]
            out.flush()
            del out
            out, shape = final, final.shape
        out.flush()
        del out
        with open(temps[-1], "rb+") as f:
            os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):
            record_path.unlink()  # the old record must not vouch for the new pixels
        os.replace(temps[-1], npy)
        record = {"fingerprint": fingerprint, "shape": list(shape), "skipped": bad,
                  "version": CACHE_VERSION}
        atomic_write_bytes(record_path, json.dumps(record).encode(), what="image cache record")
    finally:
        for path in temps:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _resolve_shape(samples: Sequence[tuple[Path, int]], options: Options, bad_images: str,
                   bad: list[tuple[int, str]]) -> tuple[tuple[int, int], int]:
    """``((H, W), C)`` of the cached images: the options', else from the files' headers."""
    if not samples:
        raise DataError("no image files to decode")
    if options.size is not None and options.channels is not None:
        return options.size, options.channels
    sizes: dict[tuple[int, int], Path] = {}
    gray = True
    for i, (path, _) in enumerate(samples):
        try:
            size, channels = image_files.probe_image(path)
        except DataError as exc:
            _bad(bad, i, str(exc), bad_images)
            continue
        sizes.setdefault(size, path)
        gray = gray and channels == 1
    if not sizes:
        raise DataError(f"none of the {len(samples)} image files could be read")
    size = options.size
    if size is None:
        if len(sizes) > 1:
            examples = ", ".join(f"{h}x{w} ({p})" for (h, w), p in list(sizes.items())[:3])
            raise DataError(f"the images have {len(sizes)} different sizes (H x W), e.g. "
                            f"{examples}: choose one to resize them to (size=, --image-size), "
                            "or resize the shorter side and centre-crop (resize_shorter=, "
                            "--preprocess resize=R,crop=S)")
        (size,) = sizes
    return size, options.channels or (1 if gray else 3)


def _bad(bad: list[tuple[int, str]], index: int, reason: str, bad_images: str) -> None:
    """Record a bad image, or raise at once under ``"stop"``."""
    if bad_images == "stop":
        raise DataError(f"{reason} (bad_images='skip' / --bad-images skip leaves such files "
                        "out)")
    bad.append((index, reason))


def _report_bad(reasons: list[str], total: int, bad_images: str) -> None:
    """Raise (``"stop"``) or warn about the images a cache entry was decoded without."""
    if bad_images == "stop":
        _bad([], 0, reasons[0], "stop")
    shown = "; ".join(reasons[:_SHOWN_PATHS])
    more = f"; and {len(reasons) - _SHOWN_PATHS} more" if len(reasons) > _SHOWN_PATHS else ""
    warnings.warn(f"skipped {len(reasons)} of {total} image files that could not be read: "
                  f"{shown}{more}", ImageFolderWarning, stacklevel=3)
