"""``python -m xray_tf.pretrain``: the documented way to run ``xray-pretrain`` (``xray_tf.cli.pretrain``)."""

from xray_tf.cli.pretrain import main

if __name__ == "__main__":
    main()
