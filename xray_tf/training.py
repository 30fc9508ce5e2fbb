"""One training run, top to bottom: config -> data index -> tf.data -> Keras model -> fit -> run dir.

Everything that can be checked is checked before the run directory is created and before the
first epoch: the config, the dataset index (missing files, unknown labels, empty classes), every
image (decoded once, see ``prepare_data``) and the model (weights files, ImageNet download).

A run survives being killed: after every epoch the weights and optimizer state are backed up
atomically, and ``resume=True`` continues from the last finished epoch with the same batches the
uninterrupted run would have seen (the input pipeline replays epoch e from the seed and e), so a
resumed run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import dataclasses
import glob
import io
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import keras
import numpy as np
from keras import ops

from xray_tf import artifacts, compile_cache, data, distribution, losses, metrics, models, pipeline, synthetic
from xray_tf.config import TrainConfig
from xray_tf.reports import read_flags

logger = logging.getLogger(__name__)

SYNTHETIC_WARNING = (
    "NO --data_dir GIVEN: TRAINING ON SYNTHETIC DATA ({path}). "
    "Results say nothing about real X-rays; pass --data_dir=PATH/TO/CORONAHACK for real training."
)
BACKUP_DIR = "backup"  # inside the run directory; removed when the run has finished
SKIPPED_IMAGES_CSV = "skipped_images.csv"
_SKIPPED = "unreadable, skipped (--on_bad_image=skip)"
# May differ when a run is resumed: where it is, how many devices share its (unchanged) batches,
# and where its compiled programs are cached.
_RUN_LOCATION_FLAGS = ("output_dir", "run_name", "resume", "distribution", "compilation_cache")


def step_decay(epoch: int, initial_rate: float, factor: float, every: int) -> float:
    """Learning rate for 0-based ``epoch``: ``initial_rate * factor ** (epoch // every)``."""
    return initial_rate * factor ** (epoch // every)


class HistoryCSV(keras.callbacks.Callback):
    """Writes ``history.csv`` (one row per finished epoch, 1-based) atomically after every epoch.

    Besides Keras' logs (loss, accuracy, per-class recall, their ``val_`` twins) each row records
    the learning rate used, the epoch's wall time and the training throughput in images/s.
    """

    def __init__(self, path: str, images_per_epoch: int, rows: list[dict[str, float]] | None = None):
        """``rows``: the epochs a resumed run keeps (``read_history``), continued after them."""
        super().__init__()
        self.path = path
        self.images_per_epoch = images_per_epoch
        self.rows: list[dict[str, float]] = list(rows or [])
        self._epoch_start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._epoch_start
        row = {"epoch": epoch + 1}
        row.update({key: float(value) for key, value in (logs or {}).items() if key != "learning_rate"})
        row["learning_rate"] = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row["epoch_seconds"] = round(seconds, 3)
        row["train_images_per_second"] = round(self.images_per_epoch / seconds, 2)
        self.rows.append(row)
        columns = list(dict.fromkeys(key for r in self.rows for key in r))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        artifacts.write_text_atomic(self.path, buffer.getvalue())


def read_history(path: str, last_epoch: int) -> list[dict[str, float]]:
    """The rows of ``history.csv`` for epochs 1 to ``last_epoch``: what a resumed run keeps.

    Rows after ``last_epoch`` belong to an epoch whose backup was never written; it runs again, so
    dropping them leaves every epoch in the file exactly once.
    """
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as handle:
        rows = [{key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(handle)]
    return [{**row, "epoch": int(row["epoch"])} for row in rows if row["epoch"] <= last_epoch]


def _save_atomic(save: Callable[[str], None], path: str) -> None:
    """``save(temporary)`` beside ``path``, then rename: a kill mid-save leaves the previous file.

    The temporary name keeps ``path``'s ending, from which Keras picks the file format.
    """
    directory, name = os.path.split(path)
    ending = ".weights.h5" if name.endswith(".weights.h5") else os.path.splitext(name)[1]
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=ending, dir=directory)
    os.close(descriptor)
    try:
        save(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


class FitClock(keras.callbacks.Callback):
    """When ``fit`` began its first epoch and ended its last, to split a run's time (metrics.json)."""

    def __init__(self):
        super().__init__()
        self.train_begin = self.train_end = math.nan

    def on_train_begin(self, logs=None):
        self.train_begin = time.perf_counter()

    def on_train_end(self, logs=None):
        self.train_end = time.perf_counter()

    def split(self, fit_start: float, fit_end: float) -> dict[str, float]:
        """The seconds of ``fit`` before the first and after the last epoch (none if it never trained)."""
        if math.isnan(self.train_end):
            return {}
        return {"fit_before_first_epoch": self.train_begin - fit_start, "fit_after_last_epoch": fit_end - self.train_end}


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops training after an epoch whose mean training loss is NaN or infinite.

    Keras' ``TerminateOnNaN`` reads the loss after every batch, which forces the host to wait for
    each step and turns off asynchronous dispatch on the JAX backend; on a GPU that cost more time
    per step than the step itself. A NaN loss makes the epoch's mean NaN, so checking once per
    epoch catches the same runs, at the price of finishing the (already lost) epoch.
    """

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.model.stop_training = True


def _backups(backup_dir: str) -> list[str]:
    """Oldest first; ``.weights.h5`` ones come from runs started before backups became ``.npz``."""
    paths = [path for pattern in ("epoch-*.npz", "epoch-*.weights.h5")
             for path in glob.glob(os.path.join(backup_dir, pattern))]
    return sorted(paths, key=_backup_epoch)


def _backup_epoch(path: str) -> int:
    return int(re.search(r"epoch-(\d+)\.", os.path.basename(path)).group(1))


def _backup_path(backup_dir: str, epoch: int) -> str:
    return os.path.join(backup_dir, f"epoch-{epoch:04d}.npz")


def _training_state(model: keras.Model) -> list[keras.Variable]:
    """What a backup holds: the model's weights (BatchNorm statistics included) and the optimizer's."""
    return model.weights + model.optimizer.variables


class EpochBackup(keras.callbacks.Callback):
    """After each epoch, weights and optimizer state as ``backup_dir/epoch-NNNN.npz``, written in the background.

    Two backups are kept: the newest, to resume from, and the one of the epoch with the lowest
    ``val_loss`` so far (``best_epoch``), from which ``write_best_model`` writes ``model.keras``
    when training ends. Saving a ``.keras`` file inside each improving epoch cost a ResNet50 run
    on a GPU 1.4-2.0 s per improvement (BENCHMARKS.md section 3); keeping a backup costs nothing more.

    Keras' ``BackupAndRestore`` writes its weights file in place and the epoch number into a
    second file, so a kill during the backup can leave a corrupt file or weights of one epoch
    labelled with another. Here one file holds both (the epoch is in its name) and appears by
    rename, so every backup on disk is complete. An epoch stopped by ``StopOnNonFiniteLoss`` is
    not backed up: resuming starts from the last finite weights.

    Writing a ResNet50 backup (270 MB with Adam's moments) took ~0.9 s, more than half of a 1.5 s
    GPU epoch. So the epoch's state is copied to host memory here, which is quick, and a thread
    writes it while the next epoch trains. One backup is in flight at a time: the next one, and
    the end of training, wait for it and raise its error if it failed.

    ``best`` and ``best_epoch`` (1-based) carry a resumed run's best epoch so far.
    """

    def __init__(self, backup_dir: str, best: float = math.inf, best_epoch: int | None = None):
        super().__init__()
        self.backup_dir = backup_dir
        self.best = best
        self.best_epoch = best_epoch  # None until an epoch has a finite val_loss
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future | None = None
        self._joined: np.ndarray | None = None  # free to refill once the previous backup is written

    def on_train_begin(self, logs=None):
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="epoch_backup")

    def on_epoch_end(self, epoch, logs=None):
        if self.model.stop_training:
            return
        self._wait()
        val_loss = (logs or {}).get("val_loss")
        if val_loss is not None and float(val_loss) < self.best:  # NaN is never less
            self.best, self.best_epoch = float(val_loss), epoch + 1
        arrays = [ops.convert_to_numpy(variable) for variable in _training_state(self.model)]
        # One byte string, not hundreds of arrays: a writer thread that needs the GIL once per array
        # would crawl while the training loop holds it. Its buffer is reused (fresh pages cost time).
        parts = [array.reshape(-1).view(np.uint8) for array in arrays]
        size = sum(part.size for part in parts)
        if self._joined is None or self._joined.size != size:
            self._joined = np.empty(size, np.uint8)
        state = {"bytes": np.concatenate(parts, out=self._joined),
                 "dtypes": np.array([array.dtype.str for array in arrays]),
                 "ranks": np.array([array.ndim for array in arrays], np.int64),
                 "dims": np.array([dim for array in arrays for dim in array.shape], np.int64)}
        path = _backup_path(self.backup_dir, epoch + 1)
        keep = {path} if self.best_epoch is None else {path, _backup_path(self.backup_dir, self.best_epoch)}
        self._pending = self._writer.submit(self._write, path, state, keep)

    def on_train_end(self, logs=None):
        self._wait()
        self._writer.shutdown()

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises the writer's exception here, in the training thread

    def _write(self, path: str, state: dict[str, np.ndarray], keep: set[str]) -> None:
        os.makedirs(self.backup_dir, exist_ok=True)
        _save_atomic(lambda temporary: np.savez(temporary, **state), path)
        for older in _backups(self.backup_dir):
            if older not in keep:
                os.remove(older)


def _split_state(joined: np.ndarray, dtypes: np.ndarray, ranks: np.ndarray, dims: np.ndarray) -> list[np.ndarray]:
    """The arrays ``EpochBackup`` joined into one byte string, in their order."""
    arrays, offset, dim = [], 0, 0
    for dtype, rank in zip(dtypes, ranks):
        shape = tuple(int(size) for size in dims[dim:dim + rank])
        dim += rank
        size = math.prod(shape) * np.dtype(dtype).itemsize
        arrays.append(joined[offset:offset + size].view(dtype).reshape(shape))
        offset += size
    return arrays


def _load_backup(model: keras.Model, path: str) -> None:
    """Assign the training state backed up in ``path`` to compiled ``model``."""
    if not model.optimizer.built:  # its variables must exist to be loaded; built twice, some duplicate
        model.optimizer.build(model.trainable_variables)
    if path.endswith(".weights.h5"):
        model.load_weights(path)
        return
    variables = _training_state(model)
    with np.load(path) as saved:
        arrays = _split_state(saved["bytes"], saved["dtypes"], saved["ranks"], saved["dims"])
    if [array.shape for array in arrays] != [tuple(variable.shape) for variable in variables]:
        raise ValueError(f"{path} holds the training state of another model or optimizer; "
                         f"delete {os.path.dirname(path)} to start the run afresh.")
    for variable, array in zip(variables, arrays):
        variable.assign(array)


def restore_backup(model: keras.Model, backup_dir: str) -> int:
    """Load the newest ``EpochBackup`` into compiled ``model``; return its epoch (0: no backup)."""
    backups = _backups(backup_dir)
    if not backups:
        return 0
    _load_backup(model, backups[-1])
    return _backup_epoch(backups[-1])


@contextlib.contextmanager
def global_dtype_policy(name: str) -> Iterator[None]:
    """Keras' global dtype policy set to ``name`` within the block, the previous one restored after."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def write_best_model(model_config: dict, dtype_policy: str, backup_dir: str, best_epoch: int,
                     path: str) -> keras.Model:
    """Rebuild the model ``model_config`` describes, load epoch ``best_epoch``'s backup, save it as ``path``.

    ``dtype_policy`` is the global policy the model was built and compiled under: a model's config
    records its layers' policies, not that compiling under ``mixed_float16`` wrapped the optimizer
    in a ``LossScaleOptimizer``, whose variables the backup holds too.

    The rebuilt model lives on one device, whatever distribution trained the original. Runs
    started before best epochs were kept as backups saved ``path`` themselves: without a backup
    of ``best_epoch``, ``path`` is loaded as it is.
    """
    backup = next((found for found in _backups(backup_dir) if _backup_epoch(found) == best_epoch), None)
    if backup is None:
        return models.load_model(path)
    with global_dtype_policy(dtype_policy):
        model = models.model_from_config(model_config)
    _load_backup(model, backup)
    _save_atomic(model.save, path)
    return model


def fit_epochs(model: keras.Model, datasets: pipeline.Datasets, first: int, stop: int,
               setup: distribution.Setup = distribution.ONE_DEVICE, **fit_args) -> keras.callbacks.History | None:
    """``model.fit`` on epochs ``first`` to ``stop - 1`` (0-based) of ``datasets``.

    Each epoch gets the batches it would get in a run started at epoch 0, so a run resumed at
    ``first`` continues exactly as the uninterrupted run. Under a distribution ``setup`` each
    worker feeds its share of those same batches. ``fit_args`` go to ``model.fit``.
    """
    if first >= stop:
        return None
    if keras.backend.backend() == "jax":
        # Build the compiled loss and metrics on a batch of their own: Keras' JAX trainer otherwise
        # builds them from a batch it draws out of the training stream, shifting every epoch by one.
        # take(1), not steps=1: the iterator ends rather than being dropped with batches in flight.
        model.evaluate(setup.evaluation_data(datasets, "train").take(1), verbose=0)
    return model.fit(setup.training_data(datasets, first, stop), steps_per_epoch=datasets.steps_per_epoch,
                     initial_epoch=first, epochs=stop, shuffle=False, **fit_args)  # the pipeline samples


def _dtype_policy(mixed_precision: str) -> str:
    if mixed_precision == "off":
        return "float32"
    if mixed_precision == "auto":
        has_gpu = any(device.startswith("gpu") for device in keras.distribution.list_devices())
        return "mixed_bfloat16" if has_gpu else "float32"
    return mixed_precision


def _jit_compile(value: str) -> str | bool:
    return {"auto": "auto", "true": True, "false": False}[value]


def _default_run_name(config: TrainConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{config.model}_{config.loss}_{config.task}_{stamp}"


def _run_to_resume(config: TrainConfig) -> str:
    """The run directory ``--resume`` continues, once it is known that it can and should be continued."""
    run_dir = os.path.join(config.output_dir, config.run_name)
    flags_path = os.path.join(run_dir, "flags.txt")
    if not os.path.isfile(flags_path):
        raise ValueError(f"--resume: {run_dir} is not a run directory (no flags.txt there); nothing to resume.")
    if os.path.exists(os.path.join(run_dir, "metrics.json")):
        raise ValueError(f"--resume: {run_dir} has finished (it has metrics.json); start a new run instead.")
    started, now = read_flags(run_dir), config.to_flags()
    changed = sorted(name for name in started.keys() | now.keys()
                     if name not in _RUN_LOCATION_FLAGS and started.get(name) != now.get(name))
    if changed:
        listing = "; ".join(f"--{name} was {started.get(name, 'unset')}, now {now.get(name, 'unset')}"
                            for name in changed)
        raise ValueError(f"--resume: {run_dir} was started with other settings ({listing}). A run continues "
                         f"only with its own settings: --flagfile={flags_path} --resume")
    return run_dir


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """The dataset as training will use it, and what was left out of it."""

    data_dir: str
    synthetic: bool  # no --data_dir: the generated stand-in
    index: data.DataIndex  # without the skipped images
    skipped: dict[str, str]  # path -> why it cannot be decoded (--on_bad_image=skip)
    decoded: pipeline.DecodedImages  # every indexed image, decoded once; the cache training reads


def prepare_data(config: TrainConfig, keep_images: bool = True) -> PreparedData:
    """Validate ``config``, index the dataset and decode every image once, as ``--on_bad_image`` says.

    This is all of ``--check_data`` and the start of every run: every problem with the metadata or
    the image files is raised as one DataError before anything is trained or written. The decoded
    images are kept where ``--cache`` says (unless ``keep_images`` is False or ``--cache=none``),
    so that training reads them instead of decoding every file a second time.
    """
    config.validate()
    synthetic_data = config.data_dir is None
    data_dir = config.data_dir or synthetic.ensure_default_dataset()
    if synthetic_data:
        logger.warning(SYNTHETIC_WARNING.format(path=data_dir))
    index = data.load_index(data_dir, config.task, config.val_fraction, config.seed, config.extra_data)
    logger.info("Data index of %s, task %s:\n%s", data_dir, config.task, index.summary())

    decoded = pipeline.decode_images(index.frame["path"], config.image_size, config.cache if keep_images else "none")
    unreadable = decoded.unreadable
    if unreadable:
        listing = pipeline.list_unreadable(unreadable)
        if config.on_bad_image == "error":
            raise data.DataError(f"{len(unreadable)} image file(s) cannot be decoded (--on_bad_image=skip "
                                 f"trains without them):\n{listing}")
        logger.warning("Skipping %d image file(s) that cannot be decoded (--on_bad_image=skip):\n%s",
                       len(unreadable), listing)
        index = index.without(unreadable, _SKIPPED)
    return PreparedData(data_dir, synthetic_data, index, unreadable, decoded)


def check_report(prepared: PreparedData, task: str) -> str:
    """What ``--check_data`` prints: the images training would use, and any it would skip."""
    lines = [f"{prepared.data_dir}, task {task}:", prepared.index.summary()]
    if prepared.skipped:
        lines += [f"{len(prepared.skipped)} image file(s) cannot be decoded; --on_bad_image=skip leaves them out:",
                  pipeline.list_unreadable(prepared.skipped)]
    else:
        lines.append("No problems found.")
    return "\n".join(lines)


def _skipped_csv(skipped: dict[str, str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "reason"])
    writer.writerows(sorted(skipped.items()))
    return buffer.getvalue()


def evaluate_splits(model: keras.Model, datasets: dict, class_names: tuple[str, ...], batch_size: int) -> dict:
    """``classification_report`` (ROC AUC included) of ``model`` on each split's unaugmented batches."""
    reports = {}
    for split, dataset in datasets.items():
        true = []

        def images_keeping_labels():
            for images, one_hot in dataset.as_numpy_iterator():  # NumPy batches feed every backend
                true.append(np.argmax(one_hot, axis=-1))
                yield images

        probabilities = models.predict_batches(model, images_keeping_labels(), batch_size)
        true = np.concatenate(true)
        matrix = metrics.confusion_matrix(true, np.argmax(probabilities, axis=-1), len(class_names))
        reports[split] = metrics.classification_report(matrix, class_names, true, probabilities)
    return reports


def run(config: TrainConfig, verbose: int | str = "auto") -> str | None:
    """Train as ``config`` says and return the run directory holding every artifact.

    With ``config.resume`` the run directory ``output_dir/run_name`` of an unfinished run is
    continued after its last backed-up epoch; otherwise a new directory is created. With
    ``--distribution=multi_worker`` only the chief worker writes that directory; the other workers
    train their share and return None.
    """
    config.validate()
    with distribution.activate(config.distribution) as setup:  # before TensorFlow or JAX does anything
        trained = _train(config, setup, verbose)
    # The best model is rebuilt outside the distribution: one device evaluates every image.
    return _finish(config, trained) if trained else None


@dataclasses.dataclass(frozen=True)
class _Trained:
    """What ``_train`` leaves the chief for ``_finish``."""

    run_dir: str
    resumed: bool
    initial_epoch: int
    prepared: PreparedData
    datasets: pipeline.Datasets
    model_config: dict  # the trained model, serialized: rebuilt on one device for the best epoch
    best_epoch: int
    epochs_run: int
    seconds: dict[str, float]
    details: dict  # recorded in metrics.json as they are


def _train(config: TrainConfig, setup: distribution.Setup, verbose: int | str) -> _Trained | None:
    """Check the data, build and fit the model on every worker; None on workers other than the chief."""
    setup.check_batch_size(config.batch_size)
    compilation_cache = compile_cache.enable(config.compilation_cache)  # before the first XLA compilation
    resumed_dir = _run_to_resume(config) if config.resume else None  # before the long image check
    prepared = prepare_data(config)
    logger.info("%s", setup.describe(config.batch_size))
    index = prepared.index
    class_names = index.class_names
    train_counts = list(index.class_counts("train").values())

    loss = losses.build_loss(config.loss, train_counts, config.focal_gamma, config.focal_alpha)
    class_weight = None
    if config.class_weight == "balanced":
        class_weight = dict(enumerate(losses.balanced_weights(train_counts)))
    learning_rate = config.learning_rate * (setup.replicas if config.scale_lr_with_batch else 1)
    if config.scale_lr_with_batch:
        logger.info("--scale_lr_with_batch: learning rate %g x %d replicas = %g", config.learning_rate,
                    setup.replicas, learning_rate)

    settings = pipeline.PipelineSettings(
        image_size=config.image_size,
        batch_size=config.batch_size,
        cache=config.cache,
        sampler=config.sampler,
        rotation_prob=config.rotation_prob,
        rotation_degrees=config.rotation_degrees,
        seed=config.seed,
    )
    datasets = pipeline.build_datasets(index.frame, len(class_names), settings)
    if "val" not in datasets.evaluation:
        raise data.DataError(f"{prepared.data_dir}: no validation images, so no epoch can be chosen; every "
                             "class needs at least 2 training images (see --val_fraction).")

    policy = _dtype_policy(config.mixed_precision)
    # Model, optimizer and metric variables belong to the distribution.
    with global_dtype_policy(policy), setup.scope():
        keras.utils.set_random_seed(config.seed)
        model = models.build_model(config.model, len(class_names), config.image_size, config.weights,
                                   config.dropout, config.chexnet_weights)
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=loss,
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")]
            + [metrics.ClassRecall(i, name=f"recall_{metrics.metric_suffix(c)}") for i, c in enumerate(class_names)],
            jit_compile=_jit_compile(config.jit_compile),
        )
        setup.prepare_model(model)

    if resumed_dir:
        run_dir = resumed_dir
    elif setup.is_chief:
        run_dir = artifacts.create_run_dir(config.output_dir, config.run_name or _default_run_name(config))
        # flags.txt names the directory actually created, so --flagfile=RUN/flags.txt --resume finds it.
        own_flags = dataclasses.replace(config, run_name=os.path.basename(run_dir))
        artifacts.write_text_atomic(os.path.join(run_dir, "flags.txt"), own_flags.to_flagfile())
        artifacts.write_json_atomic(os.path.join(run_dir, "classes.json"), list(class_names))
    else:
        run_dir = None  # a new run: only the chief knows its directory, and nothing is restored
    if setup.is_chief:
        logger.info("Run directory: %s", run_dir)
        if prepared.skipped:
            artifacts.write_text_atomic(os.path.join(run_dir, SKIPPED_IMAGES_CSV), _skipped_csv(prepared.skipped))

    decode_seconds = pipeline.fill_caches(datasets, prepared.decoded)  # the images prepare_data decoded

    backup_dir = os.path.join(run_dir, BACKUP_DIR) if run_dir else None
    with setup.scope():
        initial_epoch = restore_backup(model, backup_dir) if backup_dir else 0
    if resumed_dir:
        logger.info("Resuming %s after epoch %d of %d", run_dir, initial_epoch, config.epochs)
    clock = FitClock()
    callbacks = [
        clock,
        keras.callbacks.LearningRateScheduler(
            lambda epoch: step_decay(epoch, learning_rate, config.lr_decay, config.lr_decay_epochs)
        ),
        StopOnNonFiniteLoss(),  # before the callbacks that keep an epoch
    ]
    backup = None
    if setup.is_chief:  # the others write nothing
        history_path = os.path.join(run_dir, "history.csv")
        restored_rows = read_history(history_path, initial_epoch)
        finite = [(row["val_loss"], row["epoch"]) for row in restored_rows
                  if math.isfinite(row.get("val_loss", math.nan))]
        backup = EpochBackup(backup_dir, *min(finite, default=(math.inf, None)))
        callbacks += [
            HistoryCSV(history_path, datasets.images_per_epoch, restored_rows),
            backup,  # last: an epoch is backed up only once its history row exists
        ]
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    fit_start = time.perf_counter()
    history = fit_epochs(model, datasets, initial_epoch, config.epochs, setup,
                         validation_data=setup.evaluation_data(datasets, "val"), class_weight=class_weight,
                         callbacks=callbacks, verbose=verbose if setup.is_chief else 0)
    fit_end = time.perf_counter()
    epochs_run = history.epoch[-1] + 1 if history and history.epoch else initial_epoch
    if model.stop_training:  # only StopOnNonFiniteLoss stops a fit early
        raise FloatingPointError(
            f"Training stopped in epoch {epochs_run}: the loss became NaN or infinite. Lower --learning_rate "
            f"(it is {learning_rate:g}) or check the data."
            + (f" {run_dir} is left unfinished; its history.csv shows the epochs before." if run_dir else "")
        )
    if not setup.is_chief:
        return None
    if backup.best_epoch is None:
        raise FloatingPointError(f"No epoch had a finite validation loss, so there is no model to keep. Lower "
                                 f"--learning_rate (it is {learning_rate:g}) or check the data.")
    details = {
        "dtype_policy": policy,
        "distribution": {"name": setup.name, "replicas": setup.replicas, "workers": setup.workers,
                         "learning_rate": learning_rate},
        "compilation_cache": compilation_cache,
    }
    with models.portable_batch_norm(model):  # rebuilt on one device
        model_config = keras.saving.serialize_keras_object(model)
    return _Trained(run_dir, bool(resumed_dir), initial_epoch, prepared, datasets, model_config,
                    backup.best_epoch, epochs_run,
                    {"decode_and_cache": decode_seconds, "fit": fit_end - fit_start, **clock.split(fit_start, fit_end)},
                    details)


def _finish(config: TrainConfig, trained: _Trained) -> str:
    """Export the best epoch's model, evaluate it on every split, write ``metrics.json``."""
    run_dir, index, class_names = trained.run_dir, trained.prepared.index, trained.prepared.index.class_names
    final_start = time.perf_counter()
    best = write_best_model(trained.model_config, trained.details["dtype_policy"], os.path.join(run_dir, BACKUP_DIR),
                            trained.best_epoch, os.path.join(run_dir, "model.keras"))
    saved_model_path = os.path.join(run_dir, "saved_model")
    if trained.resumed and os.path.isdir(saved_model_path):  # exported before the kill, from the same best epoch
        shutil.rmtree(saved_model_path)
    artifacts.export_saved_model(best, saved_model_path)
    split_reports = evaluate_splits(best, trained.datasets.evaluation, class_names, config.batch_size)
    seconds = {**trained.seconds, "export_and_evaluate": time.perf_counter() - final_start}
    report = {
        "synthetic_data": trained.prepared.synthetic,
        "data_dir": os.path.abspath(trained.prepared.data_dir),
        "task": config.task,
        "classes": list(class_names),
        "images": {split: index.class_counts(split) for split in data.SPLITS},
        "excluded_rows": index.excluded,
        "model_selection": {"monitor": "val_loss", "best_epoch": trained.best_epoch,
                            "epochs_run": trained.epochs_run},
        "resumed_after_epoch": trained.initial_epoch if trained.resumed else None,
        **trained.details,
        "seconds": {stage: round(value, 2) for stage, value in seconds.items()},
        "splits": split_reports,
    }
    artifacts.write_json_atomic(os.path.join(run_dir, "metrics.json"), report)
    shutil.rmtree(os.path.join(run_dir, BACKUP_DIR), ignore_errors=True)  # complete: nothing left to resume
    summary = ", ".join(f"{split} accuracy {r['accuracy']:.3f}" for split, r in report["splits"].items())
    logger.info("Best epoch %d of %d (by val_loss): %s", trained.best_epoch, trained.epochs_run, summary)
    if trained.prepared.synthetic:
        logger.warning(SYNTHETIC_WARNING.format(path=trained.prepared.data_dir))
    return run_dir
