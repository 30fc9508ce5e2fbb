"""Decoding one file as training sees it: every mode, depth and size, and the resize (headers: test_image_headers)."""

from __future__ import annotations

import glob
import os

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import shared_data
from image_files import SUPPORTED_IMAGES, ramp
from PIL import Image

from xray_tf import decode, image_cache


def test_decode_any_mode_depth_and_size(tmp_path):
    grey = np.tile(np.linspace(0, 255, 97).astype(np.uint8), (61, 1))
    files = {
        "grey.jpeg": Image.fromarray(grey, "L"),
        "rgb.png": Image.fromarray(np.stack([grey] * 3, -1), "RGB"),
        "rgba.png": Image.fromarray(np.dstack([grey] * 3 + [np.full_like(grey, 255)]), "RGBA"),
        "deep.png": Image.fromarray(grey.astype(np.uint16) * 257),
        "tiny.png": Image.fromarray(grey[:1, :1], "L"),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
        decoded = decode.decode_image(tf.constant(str(tmp_path / name)), 48).numpy()
        assert decoded.shape == (48, 48, 1) and decoded.dtype == np.uint8, name
        if name != "tiny.png":  # a left-to-right ramp survives decoding and resizing
            row = decoded[24, :, 0].astype(int)
            assert row[0] < 20 and row[-1] > 235 and np.all(np.diff(row) >= -2), name


@pytest.mark.parametrize("kind", sorted(SUPPORTED_IMAGES))
def test_odd_but_valid_files_decode_like_their_grey_original(kind, tmp_path):
    reference = str(tmp_path / "reference.png")
    Image.fromarray(ramp(), "L").save(reference)
    write, tolerance = SUPPORTED_IMAGES[kind]
    path = str(tmp_path / f"image.{kind}")
    write(path)
    decoded = decode.decode_image(tf.constant(path), 32).numpy().astype(int)
    expected = decode.decode_image(tf.constant(reference), 32).numpy().astype(int)
    assert np.abs(decoded - expected).max() <= tolerance
    assert decode.why_unreadable(path, 32) is None
    assert image_cache.find_unreadable([path], 32) == {}


def test_tiny_and_huge_images_decode(tmp_path):
    one = str(tmp_path / "one.png")
    Image.fromarray(np.full((1, 1), 200, np.uint8), "L").save(one)
    huge = str(tmp_path / "huge.png")  # 10000 x 10000: 100 MB decoded, ~100 kB on disk
    Image.fromarray(np.zeros((10_000, 10_000), np.uint8), "L").save(huge)
    assert np.all(decode.decode_image(tf.constant(one), 32).numpy() == 200)
    assert np.all(decode.decode_image(tf.constant(huge), 32).numpy() == 0)
    assert image_cache.find_unreadable([one, huge], 32) == {}


@pytest.mark.parametrize("shape", [(301, 227, 1), (90, 250, 1), (260, 333, 3), (64, 64, 1)])
def test_resize_one_axis_at_a_time_gives_tf_image_resize_pixels(shape):
    """The row-then-column resize is the same antialiased bilinear filter as tf.image.resize,
    downscaling and upscaling, grey and colour; a square of the target size is kept as it is."""
    image = tf.constant(np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8))
    ours = decode._resize(image, 64).numpy()
    reference = tf.image.resize(image, (64, 64), method="bilinear", antialias=True).numpy()
    assert ours.shape == (64, 64, shape[2])
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)


def test_large_jpegs_are_decoded_downscaled_much_as_in_full(tmp_path):
    """Grey and colour JPEGs several times larger than the target are DCT-downscaled while decoding;
    the result stays close to decoding in full and resizing (the generic path)."""
    rows = np.linspace(0, 255, 700)
    picture = np.clip(np.add.outer(rows, rows) / 2 + 30 * np.sin(np.arange(700) / 40)[:, None], 0, 255)
    for mode in ("L", "RGB"):
        path = str(tmp_path / f"big_{mode}.jpeg")
        pixels = picture.astype(np.uint8)
        Image.fromarray(pixels if mode == "L" else np.dstack([pixels] * 3), mode).save(path, quality=95)
        fast = decode.decode_image(tf.constant(path), 64).numpy().astype(int)
        full = decode._decode_any(tf.io.read_file(path), 64).numpy()
        assert np.abs(fast - np.round(full)).mean() < 2 and np.abs(fast - np.round(full)).max() < 12, mode


def test_decode_real_full_resolution_files():
    paths = sorted(glob.glob(os.path.join(shared_data("fullres"), "images", "*")))
    assert len(paths) == 40
    for path in paths:
        decoded = decode.decode_image(tf.constant(path), 64).numpy()
        assert decoded.shape == (64, 64, 1) and 0 < decoded.mean() < 255, path


def test_decoded_dataset_streams_every_row_in_order(tmp_path):
    """What the dataset statistics read: each row's image, decoded as training does, and its label."""
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"grey{i}.png"))
        Image.fromarray(np.full((40, 50), 60 * i, np.uint8), "L").save(paths[-1])
    frame = pd.DataFrame({"path": paths, "label_index": [2, 0, 1]})
    streamed = list(decode.decoded_dataset(frame, 32).as_numpy_iterator())
    assert [label for _, label in streamed] == [2, 0, 1]
    for (image, _), path in zip(streamed, paths):
        assert np.array_equal(image, decode.decode_image(tf.constant(path), 32).numpy())
