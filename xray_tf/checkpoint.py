"""The training state of an unfinished run: its backup format, restoring it, and the kept model.

A backup holds the model's weights (BatchNorm statistics included) and the optimizer's variables
as one ``epoch-NNNN.npz`` file: the epoch is in its name, and the file appears by rename, so every
backup on disk is complete and labelled with its own epoch. Keras' ``BackupAndRestore`` instead
writes its weights in place and the epoch into a second file, so a kill during a save can leave
a corrupt file or the weights of one epoch labelled with another.

The arrays are joined into one byte string (``pack_state``): a writer thread that needed the GIL
once per array would crawl while the training loop holds it (``callbacks.EpochBackup``).
"""

from __future__ import annotations

import glob
import math
import os
import re

import keras
import numpy as np

from xray_tf import models, optimizers, rundir


def backup_path(backup_dir: str, epoch: int) -> str:
    """Where the state after 1-based ``epoch`` is kept."""
    return os.path.join(backup_dir, f"epoch-{epoch:04d}.npz")


def backup_epoch(path: str) -> int:
    return int(re.fullmatch(r"epoch-(\d+)\.npz", os.path.basename(path)).group(1))


def backups(backup_dir: str) -> list[str]:
    """The complete backups in ``backup_dir``, oldest first (temporaries of a killed save are hidden)."""
    return sorted(glob.glob(os.path.join(backup_dir, "epoch-*.npz")), key=backup_epoch)


def training_state(model: keras.Model) -> list[keras.Variable]:
    """What a backup holds: the model's weights and the optimizer's variables, in a fixed order."""
    return model.weights + model.optimizer.variables


def pack_state(arrays: list[np.ndarray], buffer: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``arrays`` as one byte string plus their dtypes and shapes: what a backup file stores.

    ``buffer`` (the previous call's ``"bytes"``) is refilled when its size fits, since fresh pages
    for a few hundred megabytes per epoch cost time.
    """
    parts = [array.reshape(-1).view(np.uint8) for array in arrays]
    size = sum(part.size for part in parts)
    if buffer is None or buffer.size != size:
        buffer = np.empty(size, np.uint8)
    return {"bytes": np.concatenate(parts, out=buffer),
            "dtypes": np.array([array.dtype.str for array in arrays]),
            "ranks": np.array([array.ndim for array in arrays], np.int64),
            "dims": np.array([dim for array in arrays for dim in array.shape], np.int64)}


def unpack_state(state: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The arrays ``pack_state`` joined, in their order."""
    arrays, offset, dim = [], 0, 0
    for dtype, rank in zip(state["dtypes"], state["ranks"]):
        shape = tuple(int(size) for size in state["dims"][dim:dim + rank])
        dim += rank
        size = math.prod(shape) * np.dtype(dtype).itemsize
        arrays.append(state["bytes"][offset:offset + size].view(dtype).reshape(shape))
        offset += size
    return arrays


def write_backup(path: str, state: dict[str, np.ndarray]) -> None:
    """``pack_state``'s output as ``path``, atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rundir.write_atomic(path, lambda temporary: np.savez(temporary, **state))


def load_backup(model: keras.Model, path: str) -> None:
    """Assign the training state backed up in ``path`` to compiled ``model``."""
    if not model.optimizer.built:  # its variables must exist to be loaded; built twice, some duplicate
        model.optimizer.build(model.trainable_variables)
    variables = training_state(model)
    with np.load(path) as saved:
        arrays = unpack_state({key: saved[key] for key in ("bytes", "dtypes", "ranks", "dims")})
    if [array.shape for array in arrays] != [tuple(variable.shape) for variable in variables]:
        raise rundir.RunError(f"{path} holds the training state of another model or optimizer; "
                              f"delete {os.path.dirname(path)} to start the run afresh.")
    for variable, array in zip(variables, arrays):
        variable.assign(array)


def restore_backup(model: keras.Model, backup_dir: str) -> int:
    """Load the newest backup into compiled ``model``; return its epoch (0: no backup)."""
    found = backups(backup_dir)
    if not found:
        return 0
    load_backup(model, found[-1])
    return backup_epoch(found[-1])


def write_best_model(model_config: dict, dtype_policy: str, backup_dir: str, best_epoch: int,
                     path: str) -> keras.Model:
    """Rebuild the model ``model_config`` describes, load epoch ``best_epoch``'s backup, save it for inference.

    ``path`` gets the architecture and the weights only: no optimizer state (twice the weights, for
    Adam) and no compile settings, which the backup and ``flags.txt`` keep for resuming; the model
    returned is that uncompiled one. ``dtype_policy`` is the global policy the model was built and
    compiled under: a model's config records its layers' policies, not that compiling under
    ``mixed_float16`` wrapped the optimizer in a ``LossScaleOptimizer``, whose variables the backup
    holds too. The rebuilt model lives on one device, whatever distribution trained the original.
    With ``--ema_decay`` the kept weights are the averages the backup holds.
    """
    backup = backup_path(backup_dir, best_epoch)
    if not os.path.isfile(backup):
        raise rundir.RunError(f"{backup}: no backup of the best epoch {best_epoch}, so there is no model to keep.")
    with models.global_dtype_policy(dtype_policy):
        trained = models.model_from_config(model_config)
        kept = models.model_from_config({key: value for key, value in model_config.items() if key != "compile_config"})
    load_backup(trained, backup)
    optimizers.use_weight_averages(trained)
    kept.set_weights(trained.get_weights())
    rundir.write_atomic(path, kept.save)
    return kept

