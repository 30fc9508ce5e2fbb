"""Image files that tests write: a grey ramp, files that cannot be decoded, odd but valid ones, and
files whose header declares another size than their data holds.

Shared by test_decode, test_image_cache, test_image_headers, test_hostile_inputs and test_training
(a bad file in a dataset stops a run).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image


def ramp(height: int = 48, width: int = 64) -> np.ndarray:
    """A grey left-to-right ramp with some texture, uint8."""
    rows = np.tile(np.linspace(0, 255, width), (height, 1))
    return np.clip(rows + 20 * np.sin(np.arange(height))[:, None], 0, 255).astype(np.uint8)


def noise(size: int = 64) -> np.ndarray:
    """Random pixels: they compress badly, so damage lands in the image data, not in padding."""
    return np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)


def _truncated_jpeg(path: str) -> None:
    Image.fromarray(noise(), "L").save(path, format="JPEG")
    content = open(path, "rb").read()
    open(path, "wb").write(content[: len(content) // 2])


def _truncated_png(path: str) -> None:
    Image.fromarray(noise(), "L").save(path, format="PNG")
    content = open(path, "rb").read()
    open(path, "wb").write(content[: len(content) // 2])


def _corrupt_png(path: str) -> None:
    Image.fromarray(noise(), "L").save(path, format="PNG")
    content = bytearray(open(path, "rb").read())
    content[16:24] = bytes(8)  # width and height in the header: 0 x 0
    open(path, "wb").write(bytes(content))


# Bad files written under an existing image's name: (writer, words the reason must contain).
BAD_IMAGES = {
    "zero_byte": (lambda path: open(path, "wb").close(), "empty file"),
    "truncated_jpeg": (_truncated_jpeg, "JPEG file that does not decode"),
    "corrupt_png": (_corrupt_png, "PNG file that does not decode"),
    "truncated_png": (_truncated_png, "PNG file that ends early (truncated?)"),
    "text_named_jpeg": (lambda path: open(path, "w").write("<html>404 Not Found</html>\n"), "not an image but text"),
    "tiff": (lambda path: Image.fromarray(ramp(), "L").save(path, format="TIFF"), "TIFF image: not supported"),
}

# Odd but valid files: (writer, largest grey-level difference from the ramp saved as grey PNG).
SUPPORTED_IMAGES = {
    "gif": (lambda path: Image.fromarray(ramp(), "L").save(path, format="GIF"), 0),
    "bmp": (lambda path: Image.fromarray(ramp(), "L").save(path, format="BMP"), 0),
    "webp": (lambda path: Image.fromarray(ramp(), "L").save(path, format="WEBP", lossless=True), 0),
    "cmyk_jpeg": (lambda path: Image.fromarray(ramp(), "L").convert("CMYK").save(path, format="JPEG", quality=95), 4),
    "png_16_bit": (lambda path: Image.fromarray(ramp().astype(np.uint16) * 257).save(path, format="PNG"), 0),
    "rgba_png": (lambda path: Image.fromarray(np.dstack([ramp()] * 3 + [np.full_like(ramp(), 128)]), "RGBA")
                 .save(path, format="PNG"), 0),
    "grey_alpha_png": (lambda path: Image.fromarray(ramp(), "L").convert("LA").save(path, format="PNG"), 0),
    "rgb_jpeg": (lambda path: Image.fromarray(np.dstack([ramp()] * 3), "RGB").save(path, format="JPEG", quality=95),
                 4),
}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_claiming(path: str, width: int, height: int, bit_depth: int = 8, colour_type: int = 0,
                       rows: int = 1) -> None:
    """A well-formed PNG whose header declares ``width`` x ``height`` but whose data holds ``rows`` rows."""
    row_bytes = width * {0: 1, 2: 3, 4: 2, 6: 4}[colour_type] * bit_depth // 8
    data = zlib.compress(b"".join(b"\x00" + bytes(row_bytes) for _ in range(rows)))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))


def write_jpeg_claiming(path: str, width: int | None = None, height: int | None = None) -> None:
    """A 64 x 64 JPEG of noise whose frame header is changed to declare ``width`` x ``height``."""
    Image.fromarray(noise(), "L").save(path, format="JPEG")
    content = bytearray(open(path, "rb").read())
    frame = content.index(b"\xff\xc0")
    content[frame + 5 : frame + 9] = struct.pack(">HH", height or 64, width or 64)
    open(path, "wb").write(bytes(content))
