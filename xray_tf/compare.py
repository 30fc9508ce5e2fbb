"""``python -m xray_tf.compare RUN_A RUN_B``: the documented way to run ``xray-compare`` (``xray_tf.cli.compare``).

The comparison itself is ``xray_tf.comparison``; this module only starts the command, so that
``--help`` answers without importing TensorFlow.
"""

from xray_tf.cli.compare import main

if __name__ == "__main__":
    main()
