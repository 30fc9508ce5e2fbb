"""xray_tf: chest X-ray classifiers on CoronaHack with Keras 3 and tf.data.

``xray_tf.train(xray_tf.TrainConfig(...))`` trains a model (``xray_tf.api``). Those names are
imported on first use, so that ``import xray_tf`` and the modules that need no Keras (the config,
``--help``, the reporting scripts) load without Keras or TensorFlow.
"""

import importlib
import os

__version__ = "0.2.0"

_LAZY = {"train": "xray_tf.api", "TrainResult": "xray_tf.api", "TrainConfig": "xray_tf.config"}
__all__ = ["cache_dir", *_LAZY]


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'xray_tf' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def cache_dir() -> str:
    """Where xray_tf keeps files between runs (the synthetic dataset, compiled programs).

    ``$XRAY_TF_CACHE`` when set, else ``~/.cache/xray_tf``.
    """
    return os.environ.get("XRAY_TF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "xray_tf")
