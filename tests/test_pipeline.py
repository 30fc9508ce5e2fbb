"""The tf.data pipeline: decoding, shapes, balanced sampling, augmentation and determinism."""

from __future__ import annotations

import dataclasses
import glob
import math
import os

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from conftest import shared_data
from xray_tf import data, pipeline


def small_settings(**overrides) -> pipeline.PipelineSettings:
    return pipeline.PipelineSettings(**{"image_size": 32, "batch_size": 8, **overrides})


def epoch(datasets: pipeline.Datasets, number: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(images.numpy(), labels.numpy()) for images, labels in datasets.epochs(number, number + 1)]


@pytest.fixture(scope="module")
def index(tiny_dataset) -> data.DataIndex:
    return data.load_index(tiny_dataset, val_fraction=0.2)


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
        decoded = pipeline.decode_image(tf.constant(str(tmp_path / name)), 48).numpy()
        assert decoded.shape == (48, 48, 1) and decoded.dtype == np.uint8, name
        if name != "tiny.png":  # a left-to-right ramp survives decoding and resizing
            row = decoded[24, :, 0].astype(int)
            assert row[0] < 20 and row[-1] > 235 and np.all(np.diff(row) >= -2), name


@pytest.mark.parametrize("shape", [(301, 227, 1), (90, 250, 1), (260, 333, 3), (64, 64, 1)])
def test_resize_one_axis_at_a_time_gives_tf_image_resize_pixels(shape):
    """The row-then-column resize is the same antialiased bilinear filter as tf.image.resize,
    downscaling and upscaling, grey and colour; a square of the target size is kept as it is."""
    image = tf.constant(np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8))
    ours = pipeline._resize(image, 64).numpy()
    reference = tf.image.resize(image, (64, 64), method="bilinear", antialias=True).numpy()
    assert ours.shape == (64, 64, shape[2])
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)


def test_decode_real_full_resolution_files():
    paths = sorted(glob.glob(os.path.join(shared_data("fullres"), "images", "*")))
    assert len(paths) == 40
    for path in paths:
        decoded = pipeline.decode_image(tf.constant(path), 64).numpy()
        assert decoded.shape == (64, 64, 1) and 0 < decoded.mean() < 255, path


def test_shapes_dtypes_and_step_count(index):
    datasets = pipeline.build_datasets(index.frame, 4, small_settings())
    images, labels = next(iter(datasets.epochs(0, 1)))
    assert images.dtype == tf.uint8 and images.shape[1:] == (32, 32, 1)
    assert labels.dtype == tf.float32 and labels.shape[1:] == (4,)
    assert np.allclose(labels.numpy().sum(axis=1), 1)
    n_train = len(index.split("train"))
    assert datasets.steps_per_epoch == math.ceil(n_train / 8)
    assert n_train % 8, "the fixture should leave a partial last batch to round up"
    # Every batch full, the last one too: one train-step shape to compile, divisible across replicas.
    assert [len(batch[1]) for batch in epoch(datasets)] == [8] * datasets.steps_per_epoch
    assert datasets.images_per_epoch == 8 * datasets.steps_per_epoch
    assert set(datasets.evaluation) == {"train", "val", "test"}


def test_no_dataset_starts_the_autotune_thread(index):
    """Freeing an autotuned iterator waits out its tuning thread's sleep: ~30 s when fit ends (BENCHMARKS.md)."""
    datasets = pipeline.build_datasets(index.frame, 4, small_settings())
    streams = [datasets.epochs(0, 2), datasets.epochs(0, 1, worker=1, workers=2, pieces=2),
               datasets.evaluation_share("val", workers=2, multiple=2), *datasets.evaluation.values(),
               pipeline.decoded_dataset(index.frame, 32)]
    assert [stream.options().autotune.enabled for stream in streams] == [False] * len(streams)


def test_balanced_sampler_draws_classes_uniformly(index):
    counts = np.array(list(index.class_counts("train").values()))
    assert counts.max() / counts.min() >= 5  # imbalanced to begin with
    datasets = pipeline.build_datasets(index.frame, 4, small_settings(batch_size=64))
    draws = np.concatenate([labels.numpy().argmax(1) for _, labels in datasets.epochs(0, 12)])
    frequencies = np.bincount(draws, minlength=4) / len(draws)
    # ~830 draws: the standard error of a frequency of 0.25 is 0.015, so 0.05 is > 3 sigma.
    assert np.all(np.abs(frequencies - 0.25) < 0.05), frequencies


def test_sampler_none_sees_each_training_image_once_per_epoch(index):
    datasets = pipeline.build_datasets(index.frame, 4, small_settings(sampler="none", flip_prob=0.0,
                                                                      rotation_prob=0.0))
    batches = epoch(datasets)
    images = np.concatenate([batch[0] for batch in batches])
    n_train = len(index.split("train"))
    # The permutation first, then its first images again to fill the last batch.
    assert np.array_equal(images[n_train:], images[: len(images) - n_train])
    labels = np.concatenate([batch[1].argmax(1) for batch in batches])[:n_train]
    assert np.bincount(labels, minlength=4).tolist() == list(index.class_counts("train").values())


def test_worker_shares_and_replica_pieces_put_together_are_the_global_batches(index):
    datasets = pipeline.build_datasets(index.frame, 4, small_settings())
    whole = epoch(datasets)
    shares = [[(i.numpy(), y.numpy()) for i, y in datasets.epochs(0, 1, worker, workers=2)] for worker in (0, 1)]
    pieces = [(i.numpy(), y.numpy()) for i, y in datasets.epochs(0, 1, pieces=4)]
    assert len(pieces) == 4 * len(whole) and all(len(p[0]) == 2 for p in pieces)
    for step, (images, labels) in enumerate(whole):
        assert np.array_equal(np.concatenate([shares[0][step][0], shares[1][step][0]]), images)
        assert np.array_equal(np.concatenate([shares[0][step][1], shares[1][step][1]]), labels)
        assert np.array_equal(np.concatenate([p[0] for p in pieces[4 * step:4 * step + 4]]), images)
    with pytest.raises(ValueError, match="does not split evenly over 3 replicas"):
        datasets.epochs(0, 1, pieces=3)


def test_evaluation_shares_drop_only_the_remainder_of_the_last_batch(index):
    datasets = pipeline.build_datasets(index.frame, 4, small_settings())
    pipeline.fill_caches(datasets)
    whole = np.concatenate([images for images, _ in datasets.evaluation["val"].as_numpy_iterator()])
    # 4 replicas on 2 workers: full batches of 8 stay whole, the last is cut to a multiple of 4.
    shares = [[i for i, _ in datasets.evaluation_share("val", worker, 2, 4).as_numpy_iterator()] for worker in (0, 1)]
    assert len(whole) % 4, "the fixture should leave a remainder to drop"
    kept = len(whole) // 4 * 4
    assert np.array_equal(np.concatenate([np.concatenate(pair) for pair in zip(*shares)]), whole[:kept])


def test_same_seed_same_batches_other_seed_other_batches(index):
    first, second = (epoch(pipeline.build_datasets(index.frame, 4, small_settings(seed=3))) for _ in range(2))
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first, second))
    other = epoch(pipeline.build_datasets(index.frame, 4, small_settings(seed=4)))
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def test_augmentation_applies_to_training_batches_only(index):
    frame = index.frame
    unaugmented = small_settings(sampler="none", flip_prob=0.0, rotation_prob=0.0)
    reference = pipeline.build_datasets(frame, 4, unaugmented)
    augmented = pipeline.build_datasets(frame, 4, small_settings(sampler="none", seed=unaugmented.seed))
    # Same shuffle order, so any difference comes from augmentation.
    changed = [not np.array_equal(a[0], b[0]) for a, b in zip(epoch(reference), epoch(augmented))]
    assert sum(changed) >= len(changed) // 2
    for split in ("val", "test"):
        split_frame = frame[frame["split"] == split]
        expected = np.stack([pipeline.decode_image(tf.constant(p), 32).numpy() for p in split_frame["path"]])
        served = np.concatenate([images.numpy() for images, _ in augmented.evaluation[split]])
        assert np.array_equal(served, expected), split


def test_flips_and_rotation_act_as_specified():
    image = np.zeros((1, 9, 9, 1), np.uint8)
    image[0, 1, 6, 0] = 200  # a bright pixel up and to the right
    batch = tf.constant(image)
    seed = tf.constant([1, 2], tf.int64)
    always_h = small_settings(image_size=9, flip_prob=1.0, rotation_prob=0.0)
    flipped = pipeline.augment_batch(batch, seed, always_h).numpy()
    assert np.array_equal(flipped, image[:, ::-1, ::-1])  # both flips fire at p=1
    quarter_turn = tf.constant([math.pi / 2])
    transform = pipeline.rotation_transforms(quarter_turn, 9, 9)
    rotated = tf.raw_ops.ImageProjectiveTransformV3(
        images=batch, transforms=transform, output_shape=[9, 9], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT").numpy()
    # A positive angle turns the picture counter-clockwise as displayed (rows down, columns right);
    # cos(pi/2) is not exactly 0 in float32, hence one grey level of tolerance.
    expected = np.rot90(image[0, :, :, 0], k=1).astype(int)
    assert np.abs(rotated[0, :, :, 0].astype(int) - expected).max() <= 1


def test_rotation_probability_and_range():
    settings = small_settings(image_size=15, flip_prob=0.0, rotation_prob=0.3, rotation_degrees=15)
    image = np.zeros((400, 15, 15, 1), np.uint8)
    image[:, 7, 2:13] = 255  # a horizontal bar through the centre
    out = pipeline.augment_batch(tf.constant(image), tf.constant([5, 0], tf.int64), settings).numpy()
    rotated = np.array([not np.array_equal(o, i) for o, i in zip(out, image)])
    assert 0.22 < rotated.mean() < 0.38  # 400 draws of p=0.3: sd 0.023
    # At most 15 degrees, the bar's ends move by at most 5 * sin(15 deg) ~ 1.3 px: rows 5..9 only.
    assert not out[rotated][:, :5].any() and not out[rotated][:, 10:].any()


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


@pytest.mark.parametrize("sampler", ["balanced", "none"])
def test_every_cache_setting_serves_the_same_batches(index, tmp_path, sampler):
    """memory, a cache directory and no cache: the batches of an epoch depend on (seed, epoch) only."""
    served = [epoch(pipeline.build_datasets(index.frame, 4, small_settings(cache=cache, sampler=sampler)), 1)
              for cache in ("memory", str(tmp_path / "cache"), "none")]
    for other in served[1:]:
        assert len(other) == len(served[0])
        assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(served[0], other))


def test_decoding_once_checks_and_keeps_the_images(tmp_path):
    """The pre-training pass keeps every readable image, says why the others fail, and the
    datasets use its images rather than decoding the files again."""
    paths = []
    for i in range(5):
        paths.append(str(tmp_path / f"good{i}.png"))
        Image.fromarray(np.full((40, 50), 40 * i, np.uint8), "L").save(paths[-1])
    bad = str(tmp_path / "bad.jpeg")
    open(bad, "w").write("<html>404</html>")
    decoded = pipeline.decode_images(paths + [bad], 32)
    assert decoded.unreadable == pipeline.find_unreadable(paths + [bad], 32)
    assert list(decoded.unreadable) == [bad] and "not an image but text" in decoded.unreadable[bad]
    for row, path in enumerate(paths):
        assert np.array_equal(decoded.images[row], pipeline.decode_image(tf.constant(path), 32).numpy())
    assert pipeline.find_unreadable(paths, 32) == {}

    frame = pd.DataFrame({"path": paths, "label_index": [0, 1, 0, 1, 0], "split": ["train"] * 5})
    datasets = pipeline.build_datasets(frame, 2, small_settings(flip_prob=0.0, rotation_prob=0.0))
    marked = dataclasses.replace(decoded, images=decoded.images + 1)  # not what the files decode to
    assert pipeline.fill_caches(datasets, marked) == decoded.seconds
    served = np.concatenate([images.numpy() for images, _ in datasets.evaluation["train"]])
    assert np.array_equal(served, decoded.images[:5] + 1)
    with pytest.raises(ValueError, match="cannot be decoded"):
        with_bad = frame.assign(path=paths[:4] + [bad])
        pipeline.fill_caches(pipeline.build_datasets(with_bad, 2, small_settings()), decoded)


def test_large_jpegs_are_decoded_downscaled_much_as_in_full(tmp_path):
    """Grey and colour JPEGs several times larger than the target are DCT-downscaled while decoding;
    the result stays close to decoding in full and resizing (the generic path)."""
    rows = np.linspace(0, 255, 700)
    picture = np.clip(np.add.outer(rows, rows) / 2 + 30 * np.sin(np.arange(700) / 40)[:, None], 0, 255)
    for mode in ("L", "RGB"):
        path = str(tmp_path / f"big_{mode}.jpeg")
        pixels = picture.astype(np.uint8)
        Image.fromarray(pixels if mode == "L" else np.dstack([pixels] * 3), mode).save(path, quality=95)
        fast = pipeline.decode_image(tf.constant(path), 64).numpy().astype(int)
        full = pipeline._decode_any(tf.io.read_file(path), 64).numpy()
        assert np.abs(fast - np.round(full)).mean() < 2 and np.abs(fast - np.round(full)).max() < 12, mode


def test_no_training_rows_is_an_error():
    frame = pd.DataFrame({"path": ["x"], "label_index": [0], "split": ["val"]})
    with pytest.raises(ValueError, match="No training images"):
        pipeline.build_datasets(frame, 2, small_settings())
