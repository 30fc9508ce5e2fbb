"""``python scripts/results_table.py RUN_DIR... --out=PREFIX``: the paper's Table 1 from run directories.

Each RUN_DIR is a run, or a folder of runs such as run_paper's results directory. Runs are grouped
into experiments by name (``prce_seed0``, ``prce_seed1`` -> ``prce``; ``prce_extra_seed0`` ->
``prce_extra``, the paper's Table 2) and the runs of a group must differ in nothing but their seed.
Writes

* ``PREFIX.md``: Tr / Val / Tst accuracy, balanced accuracy and macro F1, the paper's "average accuracy
  over epochs", as percent mean ± sample std over seeds -- or, for an experiment of a single run,
  its value and 95 % bootstrap interval ``[low, high]`` (the ``ci95`` of its metrics file) -- with the
  paper's published Table 1 numbers beside them (Bolhassani, JILSA 16(2):80-90, 2024,
  doi:10.4236/jilsa.2024.162006; see ``xray_tf.reports.PUBLISHED_ACCURACY``);
* ``PREFIX.csv``: the same per experiment as fractions: ``<metric>_mean``, ``_std``, ``_n`` and, for
  a single run, ``_ci95_low`` and ``_ci95_high``;
* ``PREFIX_runs.csv``: every run's own numbers and intervals and the file each split's numbers came from.

Accuracies come from ``metrics_<split>.json`` (xray-evaluate) where present, else from
the run's ``metrics.json``; the paper's metric from ``history.csv``.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from xray_tf import reports, rundir

_OUT = flags.DEFINE_string("out", None, "Output prefix: writes PREFIX.md, PREFIX.csv and PREFIX_runs.csv.",
                           required=True)


def write_tables(run_dirs: list[str], out_prefix: str) -> str:
    """Write the three files for ``run_dirs`` and return the Markdown table."""
    runs, table = reports.summarise(run_dirs)
    markdown = reports.markdown_table(table)
    directory = os.path.dirname(os.path.abspath(out_prefix))
    os.makedirs(directory, exist_ok=True)
    rundir.write_text(out_prefix + ".md", markdown)
    rundir.write_text(out_prefix + ".csv", table.to_csv(index=False))
    rundir.write_text(out_prefix + "_runs.csv", runs.to_csv(index=False))
    return markdown


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise app.UsageError("Give one or more run directories (or folders of runs).")
    try:
        markdown = write_tables(rundir.find_runs(argv[1:]), _OUT.value)
    except (ValueError, OSError) as error:  # RunError is a ValueError
        sys.exit(f"results_table: error: {error}")
    print(markdown)
    print(f"Wrote {_OUT.value}.md, {_OUT.value}.csv and {_OUT.value}_runs.csv")


if __name__ == "__main__":
    app.run(main)
