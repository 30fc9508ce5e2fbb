"""``python -m xray_tf.report RUN``: the documented way to run ``xray-report`` (``xray_tf.cli.report``).

The page itself is written by ``xray_tf.run_report``; this module is only the command's short name.
"""

from xray_tf.cli.report import main

if __name__ == "__main__":
    main()
