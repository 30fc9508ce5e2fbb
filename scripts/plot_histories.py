"""``python scripts/plot_histories.py RUN_DIR... --out=FIG.png``: training curves, the paper's Figures 4-6.

Accuracy and loss against epoch for each run, train solid and validation dashed, one colour per run,
named by its directory. It reads nothing but ``history.csv`` (epoch, loss, accuracy, val_loss,
val_accuracy). A RUN_DIR may also be a folder of runs.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from xray_tf import plots, rundir

_OUT = flags.DEFINE_string("out", None, "PNG file to write.", required=True)
_TITLE = flags.DEFINE_string("title", None, "Figure title (default: none).")


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise app.UsageError("Give one or more run directories (or folders of runs).")
    try:
        run_dirs = rundir.find_runs(argv[1:])
        histories = {os.path.basename(os.path.normpath(d)): rundir.read_history(d) for d in run_dirs}
        if len(histories) < len(run_dirs):
            raise ValueError("Two runs share a directory name; the legend could not tell them apart.")
        plots.save(plots.history_figure(histories, _TITLE.value), _OUT.value)
    except (ValueError, OSError) as error:  # RunError is a ValueError
        sys.exit(f"plot_histories: error: {error}")
    print(f"Wrote {_OUT.value} ({len(histories)} runs)")


if __name__ == "__main__":
    app.run(main)
