"""Data-parallel training on the engines Keras and TensorFlow ship; nothing home-made.

``--distribution`` picks one of:

- ``none``: one device (the default).
- ``mirrored``: every accelerator of this host (every CPU device when there is none). TensorFlow
  backend: ``tf.distribute.MirroredStrategy``; JAX backend: ``keras.distribution.DataParallel``.
- ``multi_worker``: several hosts, each running the same command, on the JAX backend:
  ``keras.distribution.initialize`` and ``DataParallel`` over the devices of every process. The
  cluster comes from ``KERAS_DISTRIBUTION_JOB_ADDRESSES`` / ``_NUM_PROCESSES`` / ``_PROCESS_ID`` or,
  when those are unset, from ``TF_CONFIG``. On the TensorFlow backend it stops with an error:
  Keras 3's ``fit`` fails under ``tf.distribute.MultiWorkerMirroredStrategy`` (keras-team/keras#20585;
  with Keras 3.15 it first fails to reduce an input batch across workers, then to reduce the
  scalar logs of every step).

``--batch_size`` stays the global batch: each of the ``replicas`` model copies trains on its
``batch_size / replicas`` share of every batch, and gradients are averaged over all of them. The
training code itself does not change: it builds and compiles the model inside ``scope()``, calls
``prepare_model`` and gives ``fit`` the data of ``training_data`` and ``evaluation_data``. Only the
chief worker writes anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator

import keras
import tensorflow as tf

from xray_tf import models, pipeline
from xray_tf.config import DISTRIBUTIONS, ConfigError


@dataclasses.dataclass(frozen=True)
class Setup:
    """How this process takes part in training, and the hooks training needs from the engine."""

    name: str  # one of DISTRIBUTIONS
    replicas: int  # model copies over all workers; each takes batch_size / replicas of every batch
    workers: int  # processes (hosts) training together
    worker: int  # this process's index among them
    is_chief: bool  # the one worker that writes the run directory
    _strategy: tf.distribute.MirroredStrategy | None = None  # TensorFlow backend, mirrored

    def scope(self) -> contextlib.AbstractContextManager:
        """Where the model, optimizer and metrics must be created and compiled."""
        return self._strategy.scope() if self._strategy else contextlib.nullcontext()

    def prepare_model(self, model: keras.Model) -> None:
        """Adjust a model built and compiled in ``scope()`` to the engine, before it trains."""
        if self._strategy is None:  # JAX's DataParallel needs nothing: BatchNorm sees the global batch
            return
        if self.replicas > 1:
            models.synchronize_batch_norm(model)  # --batch_size is the batch BatchNorm sees

    def describe(self, batch_size: int) -> str:
        return (f"distribution {self.name} ({keras.backend.backend()} backend): {self.replicas} replica(s) on "
                f"{self.workers} worker(s), this is worker {self.worker}{' (chief)' if self.is_chief else ''}; "
                f"global batch {batch_size} = {self.replicas} x {batch_size // self.replicas} per replica")

    def check_batch_size(self, batch_size: int) -> None:
        """Raise ConfigError unless every replica gets an equal share of every batch."""
        if batch_size % self.replicas:
            raise ConfigError("batch_size", batch_size, f"must be a multiple of the {self.replicas} replicas of "
                              f"distribution {self.name}, so that each replica gets an equal share.")

    def training_data(self, datasets: pipeline.Datasets, first: int, stop: int):
        """What ``fit`` takes for epochs ``first`` to ``stop - 1``: this worker's share of every batch."""
        if self._strategy is None:  # one device, or JAX, whose DataParallel splits each process's share
            return share_of_batches(datasets.epochs(first, stop), datasets.settings.batch_size, self.worker,
                                    self.workers)
        # One element per replica and step, in replica order: the strategy hands them out so.
        return self._strategy.distribute_datasets_from_function(
            lambda context: share_of_batches(datasets.epochs(first, stop), datasets.settings.batch_size,
                                             pieces=self.replicas))

    def evaluation_data(self, datasets: pipeline.Datasets, split: str) -> tf.data.Dataset:
        """The split's batches for ``fit(validation_data=...)``.

        Every replica needs at least one image of every batch (TensorFlow's BatchNorm fails on an
        empty share) and JAX's DataParallel an equal share, so with several replicas the last batch
        is cut to a multiple of their number: validation loses at most ``replicas - 1`` images. The
        final evaluation of the kept model runs on one device and sees every image. On JAX each
        process feeds its own share.
        """
        if self.replicas == 1:
            return datasets.evaluation[split]
        if self._strategy is not None:
            return evaluation_share(datasets.evaluation[split], multiple=self.replicas)
        return evaluation_share(datasets.evaluation[split], self.worker, self.workers, self.replicas)


def share_of_batches(batches: tf.data.Dataset, batch_size: int, worker: int = 0, workers: int = 1,
                     pieces: int = 1) -> tf.data.Dataset:
    """``worker``'s contiguous share of every global batch of ``batches``, cut into ``pieces`` elements.

    Every worker assembles and augments the whole global batch and keeps its share, so each image
    gets the same pixels whatever the number of replicas, and the replicas together train on
    exactly the batches one device would see. ``pieces`` consecutive elements (one per replica)
    are what ``tf.distribute`` hands to a worker's replicas.
    """
    if workers == 1 and pieces == 1:
        return batches
    if batch_size % (workers * pieces):
        raise ValueError(f"batch_size={batch_size} does not split evenly over {workers * pieces} replicas.")
    share = batch_size // workers

    def keep_share(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        start = worker * share
        return (tf.reshape(images[start:start + share], [pieces, share // pieces, *images.shape[1:]]),
                tf.reshape(labels[start:start + share], [pieces, share // pieces, labels.shape[-1]]))

    # Datasets.epochs already prefetches the global batches and carries the pipeline's options.
    return batches.map(keep_share).unbatch()


def evaluation_share(batches: tf.data.Dataset, worker: int = 0, workers: int = 1, multiple: int = 1) -> tf.data.Dataset:
    """Unaugmented ``batches`` for data-parallel evaluation: each cut to a multiple of ``multiple``
    images (the replica count; only the last batch can be shorter, and it loses at most
    ``multiple - 1`` images), of which ``worker`` of ``workers`` keeps its contiguous share."""

    def keep_share(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        share = tf.shape(images)[0] // multiple * multiple // workers
        return images[worker * share:(worker + 1) * share], labels[worker * share:(worker + 1) * share]

    return batches.map(keep_share).filter(lambda images, _: tf.shape(images)[0] > 0)


ONE_DEVICE = Setup("none", replicas=1, workers=1, worker=0, is_chief=True)


@contextlib.contextmanager
def activate(name: str) -> Iterator[Setup]:
    """Set up ``--distribution=name`` for the length of the ``with`` block and yield its ``Setup``.

    Enter it before anything else touches JAX: ``keras.distribution.initialize`` must come before
    the first computation.
    """
    if name not in DISTRIBUTIONS:
        raise ConfigError("distribution", name, f"not one of {', '.join(DISTRIBUTIONS)}.")
    if name == "none":
        yield ONE_DEVICE
    elif keras.backend.backend() == "tensorflow":
        yield _tensorflow_setup(name)
    elif keras.backend.backend() == "jax":
        with _jax_setup(name) as setup:
            yield setup
    else:
        raise ConfigError("distribution", name, f"supports the tensorflow and jax Keras backends, not "
                          f"{keras.backend.backend()!r}.")


def _tensorflow_setup(name: str) -> Setup:
    if name == "multi_worker":
        raise ConfigError("distribution", name, "needs the JAX backend (KERAS_BACKEND=jax; it reads the same "
                          "TF_CONFIG): Keras 3's fit fails under tf.distribute.MultiWorkerMirroredStrategy "
                          "(keras-team/keras#20585). Distribution mirrored uses every GPU of one host.")
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    strategy = tf.distribute.MirroredStrategy([device.name for device in devices])
    return Setup(name, strategy.num_replicas_in_sync, 1, 0, True, strategy)


def cluster_from_tf_config() -> tuple[list[str], int]:
    """``(addresses of every process, this process's index)`` from ``TF_CONFIG``, chief first."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ConfigError("distribution", "multi_worker", "needs the cluster: KERAS_DISTRIBUTION_JOB_ADDRESSES, "
                          "KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID, or the TF_CONFIG "
                          'environment variable, e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                          '"task": {"type": "worker", "index": 0}} (README, "Several GPUs and hosts").')
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        tasks = [(job, index) for job in ("chief", "worker") for index in range(len(cluster.get(job, [])))]
        addresses = [cluster[job][index] for job, index in tasks]
        return addresses, tasks.index((task["type"], int(task["index"])))
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"TF_CONFIG={raw!r} does not place this task among the cluster's chief and "
                         f"worker tasks ({type(error).__name__}: {error}).") from None


@contextlib.contextmanager
def _jax_setup(name: str) -> Iterator[Setup]:
    import jax

    if name == "multi_worker":
        # Collectives between processes on CPU hosts (and in the tests); GPUs use NCCL regardless.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if "KERAS_DISTRIBUTION_JOB_ADDRESSES" in os.environ:
            keras.distribution.initialize()
        else:
            addresses, process_id = cluster_from_tf_config()
            keras.distribution.initialize(",".join(addresses), len(addresses), process_id)
    devices = keras.distribution.list_devices()
    # auto_shard_dataset=False: each process feeds its own share (Setup.training_data), because
    # Keras' automatic sharding needs a dataset ending in .batch(), and ours gathers batches itself.
    with _keras_distribution(keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)):
        yield Setup(name, len(devices), jax.process_count(), jax.process_index(), jax.process_index() == 0)


@contextlib.contextmanager
def _keras_distribution(value: keras.distribution.DataParallel | None) -> Iterator[None]:
    """Keras' global distribution set to ``value`` within the block, the previous one restored after."""
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(value)
    try:
        yield
    finally:
        keras.distribution.set_distribution(previous)
