"""Headers read without decoding: each format's declared size, the pixel budget, the memory estimate,
format sniffing, and a module that needs no TensorFlow.

What each kind of path that is no regular file is called (``file_problem``) is checked through
training's and predict's checks in test_hostile_inputs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from image_files import SUPPORTED_IMAGES, ramp, write_png_claiming
from PIL import Image

from xray_tf import image_headers


def test_the_module_imports_no_tensorflow():
    """So that code without TensorFlow (the data index) may refuse files by name too."""
    probe = "import sys, xray_tf.image_headers; print(sorted(m for m in ('tensorflow', 'numpy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_unsupported_formats_are_named():
    dicom = bytes(128) + b"DICM" + bytes(16)
    assert image_headers.sniff_format(dicom) == "DICOM"
    assert image_headers.sniff_format(b"II*\x00" + bytes(8)) == "TIFF"
    assert image_headers.sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WebP"
    assert image_headers.sniff_format(b"hello") is None
    assert set(image_headers.UNSUPPORTED_FORMATS) == {"TIFF", "DICOM", "JPEG 2000"}


def _gif_with_small_screen(path: str) -> None:
    """Two frames under a screen descriptor that claims 10 x 10: TensorFlow sizes its output by the frames."""
    frames = [Image.fromarray(ramp(), "L"), Image.fromarray(255 - ramp(), "L")]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:])
    content = bytearray(open(path, "rb").read())
    content[6:10] = (10).to_bytes(2, "little") * 2
    open(path, "wb").write(bytes(content))


def _jpeg_after_big_segments(path: str) -> None:
    """A JPEG whose frame header comes after a 60 kB EXIF segment and stray fill bytes."""
    Image.fromarray(ramp(), "L").save(path, format="JPEG")
    content = open(path, "rb").read()
    exif = b"\xff\xe1" + (60_002).to_bytes(2, "big") + bytes(60_000)
    open(path, "wb").write(content[:2] + exif + b"\xff\xff" + content[2:])


@pytest.mark.parametrize("kind", sorted(SUPPORTED_IMAGES) + ["gif_with_small_screen", "jpeg_after_big_segments",
                                                              "rgba_webp", "bmp_rgba"])
def test_headers_declare_each_formats_size_without_decoding(kind, tmp_path):
    path = str(tmp_path / f"image.{kind}")
    write = {
        "gif_with_small_screen": _gif_with_small_screen,
        "jpeg_after_big_segments": _jpeg_after_big_segments,
        "rgba_webp": lambda p: Image.fromarray(np.dstack([ramp()] * 4), "RGBA").save(p, format="WEBP"),
        "bmp_rgba": lambda p: Image.fromarray(np.dstack([ramp()] * 4), "RGBA").save(p, format="BMP"),
    }.get(kind) or SUPPORTED_IMAGES[kind][0]
    write(path)
    header = image_headers.read_header(path)
    assert (header.width, header.height) == (64, 48)
    decoded = tf.io.decode_image(open(path, "rb").read(), channels=0, expand_animations=False)
    assert decoded.shape[:2] == (48, 64) and decoded.shape[-1] <= header.channels  # never an undercount
    check = image_headers.precheck(path, max_pixels=64 * 48)
    assert check.problem is None and check.memory >= os.path.getsize(path) + 2 * decoded.numpy().nbytes
    assert image_headers.precheck(path, max_pixels=64 * 48 - 1).problem == (
        "header declares 64 x 48 = 0.00307 megapixels, above --max_pixels=3071; raise --max_pixels to decode it")


def test_the_budget_is_judged_from_the_header_alone(tmp_path):
    """A PNG of a few hundred bytes that declares 23000 x 23000 16-bit RGBA pixels (4 GB decoded)."""
    huge, text = str(tmp_path / "huge.png"), tmp_path / "text.png"
    write_png_claiming(huge, 23000, 23000, bit_depth=16, colour_type=6)
    text.write_text("not an image")
    assert os.path.getsize(huge) < 1000
    assert image_headers.precheck(huge, 10**8).problem.startswith("header declares 23000 x 23000 = 529 megapixels")
    assert image_headers.precheck(huge, 23000 * 23000).problem is None
    assert image_headers.precheck(str(text), 1).problem is None  # no header to judge: decoding will say what it is
    assert image_headers.precheck(huge, 23000 * 23000).memory >= 2 * 23000 * 23000 * 4 * 2


def test_files_without_a_readable_header_are_decoded_alone(tmp_path):
    """A JPEG whose frame header cannot be found has no memory estimate, so it waits for no other decode;
    text or an empty file fails before allocating anything and costs its size."""
    cut = tmp_path / "cut.jpeg"
    cut.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    text = tmp_path / "text.jpeg"
    text.write_text("<html>404</html>")
    assert image_headers.read_header(str(cut)) is None and image_headers.precheck(str(cut), 100).decodes_alone(1)
    assert image_headers.precheck(str(text), 100) == image_headers.Precheck(None, 16)
    assert not image_headers.precheck(str(text), 100).decodes_alone(64)
