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

from xray_tf import decode, image_cache, image_headers, pipeline


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


def test_file_cache_holds_what_memory_holds_and_is_read_by_rows(tmp_path):
    paths = grey_files(tmp_path, count=6)
    in_memory = image_cache.decode_images(paths, 24, keep="memory")
    on_disk = image_cache.decode_images(paths, 24, keep=str(tmp_path / "cache"))
    assert isinstance(on_disk.images, np.memmap) and np.array_equal(on_disk.images, in_memory.images)
    rows = np.array([5, 0, 3, 3, 1])  # out of order and repeated, as a balanced epoch draws them
    assert np.array_equal(image_cache.read_rows(on_disk.images, rows), in_memory.images[rows])
    assert np.array_equal(image_cache.read_rows(in_memory.images, rows), in_memory.images[rows])
    with open(on_disk.images.filename, "r+b") as handle:  # a cache file cut short after it was opened
        handle.truncate(on_disk.images.offset + 2 * 24 * 24)
    with pytest.raises(OSError, match="shorter than its header says"):
        image_cache.read_rows(on_disk.images, np.array([4]))


def test_files_that_may_take_much_memory_are_decoded_one_at_a_time(tmp_path, monkeypatch):
    """The parallel pass takes the files within their share of image_headers.DECODE_MEMORY; the others are decoded
    after it, one at a time, to the same pixels; a file over max_pixels is in neither pass."""
    small, big, over = grey_files(tmp_path, 3), str(tmp_path / "big.png"), str(tmp_path / "over.png")
    Image.fromarray(ramp(300, 200), "L").save(big)  # 2 x 60 kB decoded, above a 20 kB share
    Image.fromarray(ramp(400, 500), "L").save(over)
    monkeypatch.setattr(image_headers, "DECODE_MEMORY", image_cache._PARALLEL * 20_000)
    passes, decode_pass = [], image_cache._decode_pass

    def recorded(paths, rows, image_size, parallel, *rest):
        passes.append((sorted(paths[row] for row in rows), parallel))
        decode_pass(paths, rows, image_size, parallel, *rest)

    monkeypatch.setattr(image_cache, "_decode_pass", recorded)
    decoded = image_cache.decode_images(small + [big, over], 32, max_pixels=100_000)
    assert passes == [(sorted(small), image_cache._PARALLEL), ([big], 1)]
    assert decoded.unreadable == {over: "header declares 500 x 400 = 0.2 megapixels, above --max_pixels=100000; "
                                        "raise --max_pixels to decode it"}
    for row, path in enumerate(small + [big]):
        assert np.array_equal(decoded.images[row], decode.decode_image(tf.constant(path), 32).numpy())
