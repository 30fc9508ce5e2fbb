"""The decode-once cache: one pass that keeps the images and says why the others fail, cache files."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import epoch, small_settings
from image_files import BAD_IMAGES, ramp
from PIL import Image

from xray_tf import decode, image_cache, pipeline


def grey_files(folder, count: int = 5) -> list[str]:
    paths = []
    for i in range(count):
        paths.append(str(folder / f"good{i}.png"))
        Image.fromarray(np.full((40, 50), 40 * i, np.uint8), "L").save(paths[-1])
    return paths


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_find_unreadable_says_why(kind, tmp_path):
    write, words = BAD_IMAGES[kind]
    bad, good = str(tmp_path / "bad.jpeg"), str(tmp_path / "good.png")
    write(bad)
    Image.fromarray(ramp(), "L").save(good)
    assert set(image_cache.find_unreadable([good, bad, good], 32)) == {bad}
    assert words in image_cache.find_unreadable([bad], 32)[bad]


def test_decoding_once_checks_and_keeps_the_images(tmp_path):
    """The pre-training pass keeps every readable image, says why the others fail, and the
    datasets use its images rather than decoding the files again."""
    paths = grey_files(tmp_path)
    bad = str(tmp_path / "bad.jpeg")
    open(bad, "w").write("<html>404</html>")
    decoded = image_cache.decode_images(paths + [bad], 32)
    assert decoded.image_size == 32
    assert decoded.unreadable == image_cache.find_unreadable(paths + [bad], 32)
    assert list(decoded.unreadable) == [bad] and "not an image but text" in decoded.unreadable[bad]
    for row, path in enumerate(paths):
        assert np.array_equal(decoded.images[row], decode.decode_image(tf.constant(path), 32).numpy())
    assert image_cache.find_unreadable(paths, 32) == {}

    frame = pd.DataFrame({"path": paths, "label_index": [0, 1, 0, 1, 0], "split": ["train"] * 5})
    datasets = pipeline.build_datasets(frame, 2, small_settings(flip_prob=0.0, rotation_prob=0.0))
    marked = dataclasses.replace(decoded, images=decoded.images + 1)  # not what the files decode to
    assert pipeline.fill_caches(datasets, marked) == decoded.seconds
    served = np.concatenate([images.numpy() for images, _ in datasets.evaluation["train"]])
    assert np.array_equal(served, decoded.images[:5] + 1)
    with pytest.raises(ValueError, match="cannot be decoded"):
        with_bad = frame.assign(path=paths[:4] + [bad])
        pipeline.fill_caches(pipeline.build_datasets(with_bad, 2, small_settings()), decoded)


def test_images_decoded_at_another_size_are_refused(tmp_path):
    """A DecodedImages records its size: a pipeline of another size must not serve its images."""
    paths = grey_files(tmp_path)
    decoded = image_cache.decode_images(paths, 40)
    assert decoded.image_size == 40 and decoded.images.shape == (5, 40, 40, 1)
    frame = pd.DataFrame({"path": paths, "label_index": [0, 1, 0, 1, 0], "split": ["train"] * 5})
    datasets = pipeline.build_datasets(frame, 2, small_settings())
    with pytest.raises(ValueError, match="decoded at 40 px; this pipeline needs 32 px"):
        pipeline.fill_caches(datasets, decoded)
    assert datasets.images.decoded is None  # nothing attached


def test_file_cache_is_written_and_reused(index, tmp_path):
    cache = str(tmp_path / "cache")
    datasets = pipeline.build_datasets(index.frame, 4, small_settings(cache=cache))
    pipeline.fill_caches(datasets)
    written = {name: os.path.getmtime(os.path.join(cache, name)) for name in os.listdir(cache)}
    assert sorted(name.split("px_")[0] + name[-4:] for name in written) == ["images_32.npy", "images_32.npy"]
    again = pipeline.build_datasets(index.frame, 4, small_settings(cache=cache))
    pipeline.fill_caches(again)
    assert isinstance(again.images.decoded.images, np.memmap)  # read from the file, not decoded again
    first, second = epoch(datasets), epoch(again)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first, second))
    assert {name: os.path.getmtime(os.path.join(cache, name)) for name in os.listdir(cache)} == written
