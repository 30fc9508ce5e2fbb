"""``python -m xray_tf.train``: the documented way to run ``xray-train`` (``xray_tf.cli.train``)."""

from xray_tf.cli.train import main

if __name__ == "__main__":
    main()
