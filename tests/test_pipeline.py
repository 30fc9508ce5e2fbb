"""The tf.data pipeline over decoded images: shapes, balanced sampling, augmentation and determinism.

Decoding is in test_decode, the decode-once cache in test_image_cache, the augmentation functions in
test_augment, the devices' shares of the batches in test_distribution."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import epoch, small_settings

from xray_tf import decode, distribution, pipeline
from xray_tf.config import ConfigError

# The strong preset with MixUp and CutMix: every lever of augmentation pulled at once.
STRONG = {"augment": "strong", "mixup_alpha": 0.4, "cutmix_alpha": 1.0}


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
    """Freeing an autotuned iterator waits out its tuning thread's sleep: ~30 s after fit (benchmarks/NOTEBOOK.md)."""
    datasets = pipeline.build_datasets(index.frame, 4, small_settings())
    streams = [datasets.epochs(0, 2),
               distribution.share_of_batches(datasets.epochs(0, 1), 8, worker=1, workers=2, pieces=2),
               distribution.evaluation_share(datasets.evaluation["val"], workers=2, multiple=2),
               *datasets.evaluation.values(), decode.decoded_dataset(index.frame, 32)]
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


@pytest.mark.parametrize("levers", [{}, STRONG], ids=["paper", "strong"])
def test_same_seed_same_batches_other_seed_other_batches(index, levers):
    first, second = (epoch(pipeline.build_datasets(index.frame, 4, small_settings(seed=3, **levers)))
                     for _ in range(2))
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first, second))
    other = epoch(pipeline.build_datasets(index.frame, 4, small_settings(seed=4, **levers)))
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other))


@pytest.mark.parametrize("levers", [{}, STRONG], ids=["paper", "strong"])
def test_augmentation_applies_to_training_batches_only(index, levers):
    frame = index.frame
    unaugmented = small_settings(sampler="none", flip_prob=0.0, rotation_prob=0.0)
    reference = pipeline.build_datasets(frame, 4, unaugmented)
    augmented = pipeline.build_datasets(frame, 4, small_settings(sampler="none", seed=unaugmented.seed, **levers))
    # Same shuffle order, so any difference comes from augmentation.
    batches = epoch(augmented)
    changed = [not np.array_equal(a[0], b[0]) for a, b in zip(epoch(reference), batches)]
    assert sum(changed) >= len(changed) // 2
    assert all(images.dtype == np.uint8 and images.shape == (8, 32, 32, 1) for images, _ in batches)
    assert all(np.allclose(labels.sum(axis=1), 1) for _, labels in batches)
    for split in ("val", "test"):
        split_frame = frame[frame["split"] == split]
        expected = np.stack([decode.decode_image(tf.constant(p), 32).numpy() for p in split_frame["path"]])
        served = np.concatenate([images.numpy() for images, _ in augmented.evaluation[split]])
        assert np.array_equal(served, expected), split


@pytest.mark.parametrize("sampler", ["balanced", "none"])
def test_every_cache_setting_serves_the_same_batches(index, tmp_path, sampler):
    """memory, a cache directory and no cache: the batches of an epoch depend on (seed, epoch) only."""
    served = [epoch(pipeline.build_datasets(index.frame, 4, small_settings(cache=cache, sampler=sampler)), 1)
              for cache in ("memory", str(tmp_path / "cache"), "none")]
    for other in served[1:]:
        assert len(other) == len(served[0])
        assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(served[0], other))


def test_an_epoch_is_the_same_batches_whenever_it_is_built(index):
    for sampler in ("balanced", "none"):
        settings = pipeline.PipelineSettings(image_size=32, batch_size=8, sampler=sampler, seed=5)
        datasets = pipeline.build_datasets(index.frame, 4, settings)
        steps = datasets.steps_per_epoch
        whole = [images.numpy() for images, _ in datasets.epochs(0, 3)]
        assert len(whole) == 3 * steps
        rebuilt = pipeline.build_datasets(index.frame, 4, settings)
        third = [images.numpy() for images, _ in rebuilt.epochs(2, 3)]
        assert all(np.array_equal(a, b) for a, b in zip(whole[2 * steps:], third)), sampler
        assert not np.array_equal(whole[0], whole[steps])  # epochs differ from each other


def test_no_training_rows_is_an_error():
    frame = pd.DataFrame({"path": ["x"], "label_index": [0], "split": ["val"]})
    with pytest.raises(ValueError, match="No training images"):
        pipeline.build_datasets(frame, 2, small_settings())


def test_unknown_augmentation_is_an_error_when_built():
    """Not later, when tf.data traces the augmentation and the error would come out as another type."""
    frame = pd.DataFrame({"path": ["x"], "label_index": [0], "split": ["train"]})
    with pytest.raises(ConfigError, match="augment"):
        pipeline.build_datasets(frame, 2, small_settings(augment="wild"))
