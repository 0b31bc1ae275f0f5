"""Image files to arrays: decode (Pillow), convert to grayscale or RGB, resize.

One function, :func:`load_image`, turns one file into the pixels a model sees; the image-folder
dataset (:mod:`anycnn.data.imagefolder`) and ``anycnn predict`` both call it, so training and
prediction prepare images identically. :func:`load_images` stacks several.

Layout: ``np.uint8`` pixels, channels last: one image is ``(H, W, C)``, a batch ``(N, H, W, C)``,
``C`` = 1 (grayscale) or 3 (RGB). The steps, in order:

1. decode with Pillow (``Image.open``, fully loaded; any format Pillow reads: PNG, JPEG, BMP,
   GIF (first frame), WebP, TIFF, ...); a plain 8-bit PNG without EXIF data goes through
   :func:`anycnn.data.png.decode` instead (Pillow's PNG decoder without ``Image.open``'s
   overhead: the same pixels, in about half the time for a small image);
2. turn it upright by its EXIF orientation tag (``ImageOps.exif_transpose``; photos from phones);
3. convert the mode: ``channels=1`` is Pillow's ``convert("L")`` (ITU-R 601-2 luma),
   ``channels=3`` is ``convert("RGB")`` (palette images expanded; an alpha channel is dropped,
   not composited);
4. resize to ``size = (H, W)`` when the image differs, with Pillow's resampling filter
   ``resample`` (default ``"bilinear"``: Pillow's bilinear filter, which widens its support
   when shrinking, i.e. antialiased); the aspect ratio is not kept (the image is stretched, as
   Keras's ``image_dataset_from_directory`` does by default);

   or, with ``resize_shorter=R`` (the ImageNet-style evaluation geometry of torchvision's
   ``Resize(R)`` then ``CenterCrop(S)``): resize keeping the aspect ratio so that the shorter
   side is ``R`` (the longer one becomes ``int(R * long / short)``), then keep the centred
   ``size = (H, W)`` window (default ``(R, R)``; at most ``R`` on each side), whose top-left
   corner is at ``(round((h' - H) / 2), round((w' - W) / 2))`` of the resized ``h' x w'``
   image (Python's ``round``, as torchvision's ``center_crop``).

Pillow is an optional dependency (``pip install 'anycnn[images]'``) imported at first use,
never when anycnn is imported.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from . import png

#: names accepted for ``resample`` → Pillow's ``Image.Resampling`` member
RESAMPLE_FILTERS = ("bilinear", "bicubic", "lanczos", "box", "hamming", "nearest")

#: Pillow modes that hold no colour: the default channel count of such images is 1
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "La"})

INSTALL_HINT = "pip install 'anycnn[images]' (or pip install pillow)"


def pillow() -> Any:
    """The ``PIL.Image`` module, or a :class:`~anycnn.errors.ConfigError` saying how to install
    it."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ConfigError(f"reading image files needs Pillow: {INSTALL_HINT}") from exc
    return Image


def check_options(size: Sequence[int] | int | None, channels: int | None,
                  resample: str) -> tuple[tuple[int, int] | None, int | None, str]:
    """``(size as (H, W) or None, channels, resample)``, validated.

    ``size`` may be one integer (square) or ``(H, W)``; ``channels`` 1, 3 or ``None``.

    Raises:
        ConfigError: a size that is not one or two positive integers, another channel count,
            an unknown filter (the valid ones are listed).
    """
    if size is not None:
        pair = (size, size) if isinstance(size, int | np.integer) else tuple(size)
        if len(pair) != 2 or not all(isinstance(v, int | np.integer) and not isinstance(v, bool)
                                     and v >= 1 for v in pair):
            raise ConfigError(f"image size must be a positive integer or (H, W), got {size!r}")
        size = (int(pair[0]), int(pair[1]))
    if channels not in (None, 1, 3):
        raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if resample not in RESAMPLE_FILTERS:
        raise ConfigError(f"unknown resize filter {resample!r}; valid names: "
                          f"{', '.join(RESAMPLE_FILTERS)}")
    return size, channels, resample


def check_resize_shorter(resize_shorter: int | None, size: tuple[int, int] | None
                         ) -> tuple[int, int] | None:
    """The crop size of the ``resize_shorter`` geometry (module docstring, step 4): ``size``
    (already checked by :func:`check_options`), or ``(R, R)`` when it is ``None``; ``size``
    unchanged without ``resize_shorter``.

    Raises:
        ConfigError: ``resize_shorter`` is not a positive integer, or the crop is larger than
            ``R`` on one side.
    """
    if resize_shorter is None:
        return size
    if isinstance(resize_shorter, bool) or not isinstance(resize_shorter, int | np.integer) \
            or resize_shorter < 1:
        raise ConfigError(f"resize_shorter must be a positive integer, got {resize_shorter!r}")
    r = int(resize_shorter)
    if size is None:
        return r, r
    if max(size) > r:
        raise ConfigError(f"the centre crop {size[0]}x{size[1]} is larger than the resized "
                          f"shorter side {r}: the crop must be at most {r} on each side")
    return size


def shorter_side_size(height: int, width: int, resize_shorter: int) -> tuple[int, int]:
    """``(h', w')`` of an ``height x width`` image resized so that its shorter side is
    ``resize_shorter`` (the longer side ``int(resize_shorter * long / short)``)."""
    if height <= width:
        return resize_shorter, int(resize_shorter * width / height)
    return int(resize_shorter * height / width), resize_shorter


def centre_offsets(height: int, width: int, crop: tuple[int, int]) -> tuple[int, int]:
    """``(top, left)`` of the centred ``crop`` ``(H, W)`` window of an ``height x width``
    image: ``round((height - H) / 2)``, ``round((width - W) / 2)`` (Python's round)."""
    return round((height - crop[0]) / 2.0), round((width - crop[1]) / 2.0)


def probe_image(path: str | os.PathLike) -> tuple[tuple[int, int], int]:
    """``((H, W), channels)`` of an image file from its header, without decoding the pixels
    (``channels`` is 1 for grayscale modes, 3 otherwise; EXIF rotation not applied).

    Raises:
        DataError: naming the file, when it is missing, unreadable or not an image.
    """
    Image = pillow()
    try:
        with Image.open(path) as img:
            width, height = img.size
            mode = img.mode
    except Exception as exc:  # Pillow raises many types for bad files; all mean "not usable"
        raise DataError(_reason(path, exc)) from exc
    return (height, width), 1 if mode in GRAY_MODES else 3


def load_image(path: str | os.PathLike, size: Sequence[int] | int | None = None,
               channels: int | None = 3, resample: str = "bilinear", *,
               resize_shorter: int | None = None) -> np.ndarray:
    """One image file as ``uint8`` ``(H, W, C)`` pixels (see the module docstring for the steps).

    Args:
        path: the file.
        size: ``(H, W)`` or one integer for a square; ``None`` keeps the file's size. With
            ``resize_shorter``: the centre crop (default ``(R, R)``).
        channels: 1 (grayscale) or 3 (RGB); ``None`` keeps grayscale images grayscale and makes
            every other mode RGB.
        resample: one of :data:`RESAMPLE_FILTERS`.
        resize_shorter: ``R``: resize to shorter side ``R`` keeping the aspect ratio, then
            centre-crop to ``size`` (module docstring, step 4); ``None``: stretch to ``size``.

    Raises:
        DataError: naming the file, when it is missing, unreadable, truncated or not an image.
        ConfigError: bad options, or Pillow is not installed.
    """
    size, channels, resample = check_options(size, channels, resample)
    size = check_resize_shorter(resize_shorter, size)
    Image = pillow()
    try:
        data = _read(path)
        img = png.decode(data)  # a plain PNG (no EXIF to apply), or None: Pillow reads it
        if img is None:
            from PIL import ImageOps

            img = Image.open(io.BytesIO(data))
            img.load()
            img = ImageOps.exif_transpose(img)
        if channels is None:
            channels = 1 if img.mode in GRAY_MODES else 3
        if img.mode != ("L" if channels == 1 else "RGB"):
            img = img.convert("L" if channels == 1 else "RGB")
        target = size if resize_shorter is None else shorter_side_size(
            img.height, img.width, int(resize_shorter))
        if target is not None and (img.height, img.width) != target:
            filt = getattr(Image.Resampling, resample.upper())
            img = img.resize((target[1], target[0]), filt)
        pixels = np.frombuffer(img.tobytes(), np.uint8).reshape(  # np.asarray(img), quicker
            img.height, img.width, len(img.getbands()))
    except Exception as exc:  # truncated data, bad chunks, unsupported codecs, bombs, ...
        raise DataError(_reason(path, exc)) from exc
    if resize_shorter is not None:
        top, left = centre_offsets(pixels.shape[0], pixels.shape[1], size)
        pixels = np.ascontiguousarray(pixels[top:top + size[0], left:left + size[1]])
    return pixels


def load_images(paths: Iterable[str | os.PathLike], size: Sequence[int] | int | None = None,
                channels: int | None = 3, resample: str = "bilinear", *,
                resize_shorter: int | None = None) -> np.ndarray:
    """Several image files as one ``uint8`` batch ``(N, H, W, C)``, each through
    :func:`load_image` with the same options (``resize_shorter`` too). ``size=None`` works
    only when every file has the same size; ``channels=None`` only when they agree on
    grayscale or colour.

    ``anycnn.predict(model, load_images(paths, (H, W), C))`` gives what ``anycnn predict``
    prints for a model trained on ``(H, W, C)`` images.

    Plain PNG files of one size and mode that need no resizing and no mode conversion (e.g.
    grayscale files with ``channels=1``) are decoded together (:func:`anycnn.data.png.decode_many`:
    one call into Pillow's PNG decoder for all of them, the same pixels, about 9 us an image
    for 28x28 against 19 us through :func:`load_image`): the way to read a batch in a map-style
    dataset's ``__getitems__``.

    Raises:
        DataError: a file cannot be read (named), or the images differ in shape.
    """
    paths = list(paths)
    checked, wanted, _ = check_options(size, channels, resample)
    if resize_shorter is None and paths:
        pixels = _decode_together(paths, checked, wanted)
        if pixels is not None:
            return pixels
    arrays = [load_image(p, size, channels, resample, resize_shorter=resize_shorter)
              for p in paths]
    if not arrays:
        raise DataError("no image files given")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"the images have different shapes {sorted(shapes)}: give a size "
                        "(and channels) to convert them to")
    return np.stack(arrays)


def _decode_together(paths: list, size: tuple[int, int] | None,
                     channels: int | None) -> np.ndarray | None:
    """:func:`load_images`' pixels through :func:`~anycnn.data.png.decode_many`, or None when
    the files are not all plain PNGs of one size and mode, or need resizing or converting (the
    file-by-file path then reads them, and names any that fails)."""
    try:
        first = _read(paths[0])
        if not first.startswith(png.SIGNATURE):
            return None
        pixels = png.decode_many([first, *(_read(p) for p in paths[1:])])
    except OSError:
        return None
    if pixels is None:
        return None
    _, height, width, bands = pixels.shape
    if size is not None and size != (height, width):
        return None
    if bands != (channels or (1 if bands <= 2 else 3)):
        return None  # dropping alpha, luma, grey to RGB: Pillow's convert, file by file
    return pixels.copy()


def _read(path: str | os.PathLike) -> bytes:
    """The file's bytes, read with the bare system calls (1-2 us less than ``open`` and
    ``read`` for a small file: no buffered reader)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _reason(path: str | os.PathLike, exc: Exception) -> str:
    """``"<path>: <why>"`` in one line for an image Pillow could not read."""
    if isinstance(exc, FileNotFoundError):
        why = "no such file"
    elif isinstance(exc, IsADirectoryError):
        why = "is a directory, not an image"
    elif isinstance(exc, PermissionError):
        why = "permission denied"
    elif type(exc).__name__ == "UnidentifiedImageError":
        why = "not an image file Pillow can read"
    else:
        why = f"cannot decode image ({type(exc).__name__}: {exc})"
    return f"{os.fspath(path)}: {why}"
