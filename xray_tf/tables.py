"""Metadata tables: a CSV read with errors that name the file and line, image paths kept inside their
folder, and a table's problems by row, for every layout of ``xray_tf.layouts`` and the run directory.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd

_ROWS_SHOWN = 5
_SNIFFED_BYTES = 8192  # enough of a file to tell a binary one from text


class DataError(ValueError):
    """The dataset on disk cannot be used as it is; the message names the file and the rows."""


def describe_rows(frame: pd.DataFrame, columns: list[str]) -> str:
    """The first rows of ``frame`` as ``row i: column=value, ...`` lines, and how many more there are."""
    shown = frame.head(_ROWS_SHOWN)
    rows = [f"  row {i}: " + ", ".join(f"{c}={row[c]!r}" for c in columns) for i, row in shown.iterrows()]
    more = len(frame) - len(shown)
    return "\n".join(rows + ([f"  ... and {more} more"] if more > 0 else []))


def read_csv_checked(
    csv_path: str, required: tuple[str, ...] | list[str], error: type[ValueError] = DataError, rows: str = "rows"
) -> pd.DataFrame:
    """Read a CSV that must exist, be UTF-8 text, have the ``required`` columns and at least one row.

    Every failure raises ``error`` with a message naming the file (and the line, where the parser
    knows it) rather than pandas' own words; ``rows`` is what a row is called in the message ("no
    epochs" for a history file).
    """
    if not os.path.isfile(csv_path):
        what = "no such file" if not os.path.lexists(csv_path) else "not a regular file"
        raise error(f"{csv_path}: {what}.")
    try:
        with open(csv_path, "rb") as handle:
            head = handle.read(_SNIFFED_BYTES)
        if b"\0" in head:
            raise error(f"{csv_path}: a binary file (it holds NUL bytes), not a CSV table.")
        frame = pd.read_csv(csv_path, encoding="utf-8")
    except OSError as problem:
        raise error(f"{csv_path}: cannot be read ({problem.strerror}).") from None
    except UnicodeDecodeError as problem:
        raise error(f"{csv_path}: not UTF-8 text (byte {problem.object[problem.start]:#04x} at byte offset "
                    f"{problem.start} of its block); save it as UTF-8.") from None
    except pd.errors.EmptyDataError:
        raise error(f"{csv_path}: the file is empty.") from None
    except pd.errors.ParserError as problem:
        where = re.search(r"line (\d+)", str(problem))
        detail = re.sub(r"^Error tokenizing data\. C error: ", "", str(problem)).strip()
        raise error(f"{csv_path}{f', line {where.group(1)}' if where else ''}: not a well-formed CSV table "
                    f"({detail}).") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise error(f"{csv_path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns))}.")
    if frame.empty:
        raise error(f"{csv_path}: no {rows}.")
    return frame


def image_paths(folder: str, names: pd.Series) -> tuple[list[str], pd.Series]:
    """``(path of each name inside folder, which names would leave it)``.

    A metadata file names images relative to its folder; an absolute name or one whose ``..``
    climbs out is never read, so a hostile CSV cannot make the tools open (or quote) other files.
    """
    root = os.path.normpath(os.path.abspath(folder))
    paths = [os.path.normpath(os.path.join(root, str(name))) for name in names]
    outside = [os.path.isabs(str(name)) or os.path.commonpath([root, path]) != root or path == root
               for name, path in zip(names, paths)]
    return paths, pd.Series(outside, index=names.index)


def table_problems(rows: pd.DataFrame, where: str, shown: list[str]) -> list[str]:
    """Every unplaced label, duplicate and path outside its folder of a table, one paragraph each.

    ``rows`` has the ``label``, ``path``, ``outside`` and ``split`` columns of a layout's table;
    ``where`` names the file in the messages and ``shown`` the columns that identify a row to its author.
    """
    problems = []
    unknown = rows[rows["label"].isna() & ~rows["outside"]]
    if len(unknown):
        problems.append(f"{where}: {len(unknown)} row(s) with labels that match no class rule:\n"
                        + describe_rows(unknown, shown))
    duplicated = rows[rows.duplicated("path", keep=False) & ~rows["outside"]]
    if len(duplicated):
        problems.append(f"{where}: {len(duplicated)} row(s) naming the same image more than once:\n"
                        + describe_rows(duplicated, [shown[0], "split"]))
    outside = rows[rows["outside"]]
    if len(outside):
        problems.append(f"{where}: {len(outside)} row(s) naming a file outside the image folder (absolute, or "
                        f"climbing out with ..); such files are never read:\n" + describe_rows(outside, shown[:1]))
    return problems


def given_patients(rows: pd.DataFrame) -> pd.Series:
    """A metadata table's patient ids: ours (``patient_id``), or the Cohen collection's ``patientid``."""
    given = pd.Series(np.nan, index=rows.index, dtype=object)
    for column in ("patient_id", "patientid"):
        if column in rows:
            given = given.fillna(rows[column].astype(object))
    return given
