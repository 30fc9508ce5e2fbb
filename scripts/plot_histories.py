"""``python scripts/plot_histories.py RUN_DIR... --out=FIG.png``: training curves, the paper's Figures 4-6.

Accuracy, balanced accuracy, loss and each class's recall against epoch for each run, train solid
and validation dashed, one colour per run, named by its directory; a star marks the epoch whose
model was kept, and runs trained with different losses get a loss axes each (``history_plots.history_figure``).
It reads ``history.csv``, ``flags.txt`` (the loss) and ``metrics.json`` (the kept epoch) where
present. A RUN_DIR may also be a folder of runs.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from xray_tf import history_plots, plots, rundir

_OUT = flags.DEFINE_string("out", None, "PNG file to write.", required=True)
_TITLE = flags.DEFINE_string("title", None, "Figure title (default: none).")


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise app.UsageError("Give one or more run directories (or folders of runs).")
    try:
        run_dirs = rundir.find_runs(argv[1:])
        named = {os.path.basename(os.path.normpath(d)): d for d in run_dirs}
        if len(named) < len(run_dirs):
            raise ValueError("Two runs share a directory name; the legend could not tell them apart.")
        plots.save(history_plots.run_histories_figure(named, _TITLE.value), _OUT.value)
    except (ValueError, OSError) as error:  # RunError is a ValueError
        sys.exit(f"plot_histories: error: {error}")
    print(f"Wrote {_OUT.value} ({len(named)} runs)")


if __name__ == "__main__":
    app.run(main)
