"""What a file is, from its first bytes: for the errors of a file given where a checkpoint or
weight file was expected ("x.png is not a safetensors checkpoint (it looks like a PNG image)").

A safetensors file starts with an 8-byte little-endian header length and then its JSON header,
``{``; the other kinds are recognised by their magic numbers.
"""

from __future__ import annotations

#: first bytes of files people give by mistake -> what they are (checked in this order)
FILE_KINDS: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"BM", "a BMP image"),
    (b"PK\x03\x04", "a zip archive (PyTorch's .pth/.pt format, or .npz/.keras)"),
    (b"\x93NUMPY", "a NumPy .npy array file"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras .h5?)"),
    (b"\x1f\x8b", "a gzip file"),
    (b"\x08", "an ONNX model or other protobuf"),
)


def file_kind(head: bytes) -> str | None:
    """What a file starting with ``head`` (its first 16 bytes or more) is, in words ("a PNG
    image", "a Python pickle (...)"), or None when no known magic number matches."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (PyTorch's older .pth format)"
    for magic, what in FILE_KINDS:
        if head.startswith(magic):
            return what
    return None
