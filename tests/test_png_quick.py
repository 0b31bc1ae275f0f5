"""The quick PNG path (:mod:`anycnn.data.png`) behind ``load_image``: the files it takes give
exactly the pixels of Pillow's own reader (``Image.open``, EXIF transpose, ``convert``,
``resize``) for every channel choice, and every file it must not take (palette, 16-bit,
interlaced, transparency key, EXIF, bad CRC, truncated, too many pixels, not a PNG) is left to
Pillow, with the same pixels or the same failure as before."""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from anycnn.data import png
from anycnn.data.images import GRAY_MODES, load_image, load_images
from anycnn.errors import DataError

Image = pytest.importorskip("PIL.Image")
ImageOps = pytest.importorskip("PIL.ImageOps")


def pillow_reference(path: Path, size=None, channels=3) -> np.ndarray:
    """What ``load_image`` returned before the quick path: Pillow's steps, one by one."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if channels is None:
            channels = 1 if img.mode in GRAY_MODES else 3
        img = img.convert("L" if channels == 1 else "RGB")
        if size is not None and (img.height, img.width) != size:
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        pixels = np.asarray(img)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def pixels(mode: str, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Random pixels with a smooth upper half (so the encoder picks several row filters)."""
    bands = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "I;16": 1, "P": 1}[mode]
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (*shape, bands), dtype=np.uint8)
    a[:shape[0] // 2] = np.cumsum(a[:shape[0] // 2] // 64, axis=1, dtype=np.uint8)
    return a[..., 0] if bands == 1 else a


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        out.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out


def assemble(parts: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG file from ``(kind, body)`` chunks, with correct CRCs."""
    out = [png.SIGNATURE]
    for kind, body in parts:
        out.append(struct.pack(">I", len(body)) + kind + body
                   + struct.pack(">I", zlib.crc32(kind + body)))
    return b"".join(out)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
@pytest.mark.parametrize("options", [{}, {"optimize": True}, {"compress_level": 0},
                                     {"compress_level": 9}], ids=["default", "optimize",
                                                                  "level0", "level9"])
def test_quick_path_gives_pillows_pixels(tmp_path, mode, options):
    path = tmp_path / "x.png"
    Image.fromarray(pixels(mode, (19, 26), 3)).save(path, **options)
    data = path.read_bytes()
    image = png.decode(data)
    assert image is not None and image.mode == mode and image.size == (26, 19)
    with Image.open(path) as reference:
        assert image.tobytes() == reference.tobytes()
    for channels in (None, 1, 3):
        for size in (None, (19, 26), (10, 13)):
            got = load_image(path, size, channels)
            want = pillow_reference(path, size, channels)
            assert got.dtype == np.uint8 and got.shape == want.shape
            assert np.array_equal(got, want), (channels, size)


def test_several_idat_chunks_and_harmless_chunks(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(pixels("RGB", (30, 7), 4)).save(path)
    parts = chunks(path.read_bytes())
    idat = b"".join(body for kind, body in parts if kind == b"IDAT")
    head = [p for p in parts if p[0] == b"IHDR"]
    split = [(b"IDAT", idat[:5]), (b"IDAT", idat[5:40]), (b"IDAT", idat[40:])]
    extra = [(b"gAMA", struct.pack(">I", 45455)), (b"tEXt", b"Comment\0hello")]
    path.write_bytes(assemble(head + extra + split + [(b"IEND", b"")]))
    assert png.decode(path.read_bytes()) is not None
    assert np.array_equal(load_image(path), pillow_reference(path))


def test_files_left_to_pillow(tmp_path):
    """Each file here is one the quick path must refuse (None); load_image still gives
    Pillow's pixels."""
    cases = {}
    Image.fromarray(pixels("L", (8, 9), 5)).convert("P").save(tmp_path / "p.png")
    cases["palette"] = tmp_path / "p.png"
    Image.fromarray(pixels("L", (8, 9), 6).astype(np.uint16) * 257).save(tmp_path / "16.png")
    cases["16-bit"] = tmp_path / "16.png"
    Image.fromarray(pixels("L", (8, 9), 7)).save(tmp_path / "t.png", transparency=3)
    cases["tRNS"] = tmp_path / "t.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.fromarray(pixels("RGB", (8, 12), 8)).save(tmp_path / "e.png", exif=exif)
    cases["eXIf"] = tmp_path / "e.png"
    base = tmp_path / "base.png"
    Image.fromarray(pixels("L", (8, 9), 9)).save(base)
    parts = chunks(base.read_bytes())
    text = [(b"tEXt", b"Raw profile type exif\0\nexif\n0\n")]
    (tmp_path / "rx.png").write_bytes(assemble([*parts[:1], *text, *parts[1:]]))
    cases["raw exif text"] = tmp_path / "rx.png"
    kind, body = parts[0]
    interlaced = body[:12] + b"\x01"
    (tmp_path / "i.png").write_bytes(assemble([(kind, interlaced), *parts[1:]]))
    cases["interlaced header"] = tmp_path / "i.png"
    (tmp_path / "u.png").write_bytes(assemble([*parts[:1], (b"abCD", b"x"), *parts[1:]]))
    cases["unknown ancillary chunk"] = tmp_path / "u.png"
    Image.fromarray(pixels("RGB", (8, 9), 10)).save(tmp_path / "j.jpg")
    cases["jpeg"] = tmp_path / "j.jpg"
    for name, path in cases.items():
        assert png.decode(path.read_bytes()) is None, name
        if name == "interlaced header":  # not a real interlaced stream: Pillow fails too
            continue
        assert np.array_equal(load_image(path, channels=None),
                              pillow_reference(path, channels=None)), name
    assert load_image(cases["eXIf"]).shape == (12, 8, 3)  # turned upright, as before


def test_broken_files_fail_as_pillow_does(tmp_path):
    base = tmp_path / "base.png"
    Image.fromarray(pixels("L", (16, 16), 11)).save(base)
    data = base.read_bytes()
    bad_crc = bytearray(data)
    bad_crc[-20] ^= 0xFF  # inside the IDAT chunk's data
    broken = {"truncated": data[:len(data) // 2], "bad crc": bytes(bad_crc),
              "no IEND": data[:-12], "empty": b"", "signature only": png.SIGNATURE}
    for name, content in broken.items():
        assert png.decode(content) is None, name
        path = tmp_path / f"{name}.png"
        path.write_bytes(content)
        try:
            want = pillow_reference(path)
        except Exception:
            with pytest.raises(DataError, match=re.escape(str(path))):
                load_image(path)
        else:
            assert np.array_equal(load_image(path), want), name


def test_too_many_pixels_is_left_to_pillows_check(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(pixels("L", (20, 20), 12)).save(path)
    assert png.decode(path.read_bytes()) is not None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 400 > 2 x 100: Pillow refuses
    assert png.decode(path.read_bytes()) is None
    with pytest.raises(DataError, match=r"big\.png"):
        load_image(path)


def test_quick_path_reads_from_bytes_only():
    buffer = io.BytesIO()
    Image.fromarray(pixels("RGBA", (5, 6), 13)).save(buffer, format="PNG")
    image = png.decode(buffer.getvalue())
    assert image is not None and image.mode == "RGBA"
    assert np.array_equal(np.asarray(image), pixels("RGBA", (5, 6), 13))


def test_files_larger_than_one_read_and_unreadable_paths(tmp_path):
    """A PNG of several MB (more than one read of 1 MB) loads whole; a directory and a missing
    file are named in a DataError."""
    path = tmp_path / "big.png"
    rng = np.random.default_rng(14)
    Image.fromarray(rng.integers(0, 256, (1200, 1100, 3), dtype=np.uint8)).save(
        path, compress_level=0)
    assert path.stat().st_size > 3 << 20
    assert np.array_equal(load_image(path), pillow_reference(path))
    with pytest.raises(DataError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        load_image(tmp_path / "missing.png")


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
def test_decode_many_gives_each_files_pixels(tmp_path, mode):
    """Files decoded together equal each decoded alone (the zero rows between images keep
    'up'-based row filters from reading the previous image), and load_images equals
    load_image file by file for every channel choice, together or not."""
    paths = []
    for i in range(7):
        path = tmp_path / f"{i}.png"
        Image.fromarray(pixels(mode, (13, 11), 20 + i)).save(path, optimize=i % 2 == 0)
        paths.append(path)
    together = png.decode_many([p.read_bytes() for p in paths])
    assert together is not None and together.shape == (7, 13, 11, len(mode))
    for got, path in zip(together, paths):
        with Image.open(path) as alone:
            assert got.tobytes() == alone.tobytes()
    for channels in (None, 1, 3):
        for size in (None, (13, 11), (6, 5)):
            want = np.stack([load_image(p, size, channels) for p in paths])
            got = load_images(paths, size, channels)
            assert got.dtype == np.uint8 and got.flags.writeable
            np.testing.assert_array_equal(got, want, strict=True)


def test_decode_many_declines_mixed_or_broken_batches(tmp_path):
    def save(name, mode, shape, seed, fmt=None):
        path = tmp_path / name
        Image.fromarray(pixels(mode, shape, seed)).save(path, fmt)
        return path

    a, b = save("a.png", "L", (9, 8), 1), save("b.png", "L", (9, 8), 2)
    other_size, other_mode = save("c.png", "L", (8, 9), 3), save("d.png", "RGB", (9, 8), 4)
    jpeg = save("e.jpg", "L", (9, 8), 5)
    assert png.decode_many([a.read_bytes(), b.read_bytes()]) is not None
    assert png.decode_many([]) is None
    for odd in (other_size, other_mode, jpeg):
        assert png.decode_many([a.read_bytes(), odd.read_bytes()]) is None, odd.name
        paths = [a, odd, b]
        try:
            want = np.stack([load_image(p, channels=1) for p in paths])
        except Exception:
            with pytest.raises(DataError, match="different shapes"):
                load_images(paths, channels=1)
        else:
            np.testing.assert_array_equal(load_images(paths, channels=1), want)
    data = bytearray(b.read_bytes())
    data[-20] ^= 0xFF  # inside the image data: a bad CRC
    broken = tmp_path / "broken.png"
    broken.write_bytes(bytes(data))
    assert png.decode_many([a.read_bytes(), bytes(data)]) is None
    with pytest.raises(DataError, match=re.escape(str(broken))):
        load_images([a, broken], channels=1)
    with pytest.raises(DataError, match="no such file"):
        load_images([a, tmp_path / "missing.png"], channels=1)
