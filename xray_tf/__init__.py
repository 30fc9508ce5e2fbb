"""xray_tf: chest X-ray classifiers on CoronaHack with Keras 3 and tf.data."""

import os

__version__ = "0.2.0"


def cache_dir() -> str:
    """Where xray_tf keeps files between runs (the synthetic dataset, compiled programs).

    ``$XRAY_TF_CACHE`` when set, else ``~/.cache/xray_tf``.
    """
    return os.environ.get("XRAY_TF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "xray_tf")
