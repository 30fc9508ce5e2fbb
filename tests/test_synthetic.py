"""The synthetic dataset: the same images in every layout, each layout's folders, names and CSV."""

import collections
import glob
import hashlib
import os
import re

import pandas as pd
import pytest
from conftest import run_module

from xray_tf import layouts, synthetic

CLASSES = ("Normal", "Bacteria", "Virus")  # the classes every layout has (Kermany has no COVID-19)
KERMANY_PNEUMONIA = re.compile(r"^person(?P<patient>\d+)_(?P<kind>bacteria|virus)_(?P<number>\d+)\.(jpeg|png)$")
KERMANY_NORMAL = re.compile(r"^IM-(?P<patient>\d{4})-(?P<number>\d{4})\.(jpeg|png)$")
SMALL = dict(num_train=40, num_test=10, seed=3, min_size=32, max_size=32)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, str]:
    """One small dataset per layout, all from the same seed."""
    root = tmp_path_factory.mktemp("synthetic")
    return {layout: synthetic.write_dataset(str(root / layout), **SMALL, layout=layout) for layout in synthetic.LAYOUTS}


def _files(folder: str) -> list[str]:
    """Every file below ``folder``, relative to it, sorted."""
    found = glob.glob(os.path.join(folder, "**", "*"), recursive=True)
    return sorted(os.path.relpath(path, folder) for path in found if os.path.isfile(path))


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _coronahack_rows(folder: str) -> pd.DataFrame:
    """The CoronaHack CSV with the class of each row and the path of its image."""
    rows = pd.read_csv(os.path.join(folder, layouts.METADATA_CSV), index_col=0)
    kinds = {"bacteria": "Bacteria", "Virus": "Virus", "Stress-Smoking": "Stress-Smoking"}
    rows["class"] = rows["Label_1_Virus_category"].map(kinds).fillna("Normal")
    rows.loc[rows["Label_2_Virus_category"] == "COVID-19", "class"] = "COVID-19"
    image_root = os.path.join(folder, layouts.IMAGE_FOLDER, layouts.IMAGE_FOLDER)
    rows["path"] = [os.path.join(image_root, split.lower(), name)
                    for split, name in zip(rows["Dataset_type"], rows["X_ray_image_name"])]
    return rows


def _kermany_class(path: str) -> str:
    name = os.path.basename(path)
    return "Normal" if KERMANY_NORMAL.match(name) else KERMANY_PNEUMONIA.match(name)["kind"].capitalize()


def _counts(layout: str, folder: str) -> collections.Counter:
    """(split, class) -> images of the layout, read from its CSV or its folders."""
    if layout == "coronahack":
        rows = _coronahack_rows(folder)
        return collections.Counter(zip(rows["Dataset_type"].str.lower(), rows["class"]))
    if layout == "csv":
        rows = pd.read_csv(os.path.join(folder, "labels.csv"))
        return collections.Counter(zip(rows["split"], rows["label"]))
    counts = collections.Counter()
    for relative in _files(folder):
        split, label, _ = relative.split(os.sep)
        if layout == "kermany":
            split, label = ("train" if split == "val" else split), _kermany_class(relative)
        counts[split, label] += 1
    return counts


def test_coronahack_layout_is_the_kaggle_download(written):
    folder = written["coronahack"]
    rows = _coronahack_rows(folder)
    assert set(os.listdir(folder)) == {layouts.METADATA_CSV, layouts.IMAGE_FOLDER}
    assert sorted(rows["path"]) == sorted(os.path.join(folder, f) for f in _files(folder) if f != layouts.METADATA_CSV)
    assert (rows["Label_1_Virus_category"] == "Stress-Smoking").sum() == 2
    assert set(rows["class"]) == {*CLASSES, "COVID-19", "Stress-Smoking"}


def test_kermany_layout_has_its_splits_and_no_covid(written):
    folder = written["kermany"]
    files = _files(folder)
    assert {os.path.dirname(f) for f in files} == {os.path.join(split, label) for split in ("train", "val", "test")
                                                 for label in ("NORMAL", "PNEUMONIA")}
    val = [f for f in files if f.startswith("val" + os.sep)]
    assert collections.Counter(map(_kermany_class, val)) == {label: 2 for label in CLASSES}
    rows = _coronahack_rows(written["coronahack"])
    first_two = rows[(rows["Dataset_type"] == "TRAIN") & rows["class"].isin(CLASSES)
                     & rows["X_ray_image_name"].str.contains(r"-000[01]\.")]
    assert sorted(_digest(os.path.join(folder, f)) for f in val) == sorted(map(_digest, first_two["path"]))
    for relative in files:
        folder_label, name = relative.split(os.sep)[1:]
        pattern = KERMANY_NORMAL if folder_label == "NORMAL" else KERMANY_PNEUMONIA
        assert pattern.match(name), relative


def test_kermany_names_pair_images_into_patients_numbered_per_cohort(written):
    """Two consecutive images of a class and split share a person or series; test restarts from 1."""
    images = collections.defaultdict(list)  # (cohort, NORMAL or PNEUMONIA) -> (patient, number, class)
    for relative in _files(written["kermany"]):
        split, folder_label, name = relative.split(os.sep)
        match = (KERMANY_NORMAL if folder_label == "NORMAL" else KERMANY_PNEUMONIA).match(name)
        cohort = "test" if split == "test" else "train"  # val patients come from train's numbering
        images[cohort, folder_label].append((int(match["patient"]), int(match["number"]), _kermany_class(relative)))
    pneumonia_numbers = [number for (_, folder_label), found in images.items() if folder_label == "PNEUMONIA"
                         for _, number, _ in found]
    assert len(pneumonia_numbers) == len(set(pneumonia_numbers))  # N is unique per file
    for (cohort, folder_label), found in images.items():
        # In writing order (N for a person, K within a series), patients run 1, 1, 2, 2, ...: a
        # class with an odd count leaves its last patient alone, and the next class starts a new one.
        in_order = sorted(found, key=lambda image: image[1] if folder_label == "PNEUMONIA" else image[:2])
        patients = [patient for patient, _, _ in in_order]
        steps = {later - earlier for earlier, later in zip(patients, patients[1:])}
        assert patients[0] == 1 and steps == {0, 1}, (cohort, folder_label)
        per_patient = collections.Counter(patients)
        assert max(per_patient.values()) == 2, (cohort, folder_label)
        assert all(len({label for p, _, label in found if p == patient}) == 1 for patient in per_patient)
        assert len(per_patient) == sum((count + 1) // 2 for count in collections.Counter(
            label for _, _, label in found).values())
        if folder_label == "NORMAL":  # K tells a series' images apart
            assert [number for _, number, _ in in_order] == [1 + i % 2 for i in range(len(in_order))]


def test_folders_and_csv_layouts_keep_the_coronahack_names(written):
    coronahack = _coronahack_rows(written["coronahack"])
    kept = coronahack[coronahack["class"] != "Stress-Smoking"]
    expected = sorted(os.path.join(split.lower(), label, name)
                      for split, label, name in zip(kept["Dataset_type"], kept["class"], kept["X_ray_image_name"]))
    assert _files(written["folders"]) == expected

    rows = pd.read_csv(os.path.join(written["csv"], "labels.csv"))
    assert list(rows.columns) == ["path", "label", "split", "patient_id"]
    assert sorted(rows["path"].map(os.path.basename)) == sorted(kept["X_ray_image_name"])
    assert all(os.path.isfile(os.path.join(written["csv"], path)) for path in rows["path"])
    assert set(os.listdir(written["csv"])) == {"labels.csv", "images"}


def test_csv_patients_are_pairs_within_a_class_and_split(written):
    rows = pd.read_csv(os.path.join(written["csv"], "labels.csv"))
    assert rows["patient_id"].str.fullmatch(r"p\d{4}").all()
    per_patient = rows.groupby("patient_id").agg(images=("path", "size"), labels=("label", "nunique"),
                                                 splits=("split", "nunique"))
    assert per_patient["images"].max() == 2 and per_patient["images"].min() >= 1
    assert (per_patient["labels"] == 1).all() and (per_patient["splits"] == 1).all()
    for _, group in rows.groupby(["split", "label"], sort=False):
        ids = group["patient_id"].tolist()
        assert ids == [ids[i - i % 2] for i in range(len(ids))]  # 0 and 1 together, 2 and 3, ...
        assert len(set(ids)) == (len(ids) + 1) // 2


def test_every_layout_counts_the_same_images_per_class_and_split(written):
    counts = {layout: _counts(layout, folder) for layout, folder in written.items()}
    shared = {(split, label) for split in ("train", "test") for label in CLASSES}
    for layout, count in counts.items():
        assert {key: count[key] for key in shared} == {key: counts["coronahack"][key] for key in shared}, layout
    assert counts["folders"] == counts["csv"]  # both keep COVID-19 too
    assert counts["folders"]["train", "COVID-19"] > 0


def test_the_same_seed_writes_the_same_bytes_in_every_layout(written):
    rows = _coronahack_rows(written["coronahack"])
    digests = {label: sorted(_digest(path) for path in rows.loc[rows["class"] == label, "path"])
               for label in rows["class"].unique()}
    first = rows[rows["class"] == "Bacteria"].iloc[3]
    counterpart = os.path.join(written["folders"], first["Dataset_type"].lower(), "Bacteria", first["X_ray_image_name"])
    assert _digest(counterpart) == _digest(first["path"])
    for layout in ("kermany", "folders", "csv"):
        found = collections.defaultdict(list)
        for relative in _files(written[layout]):
            if relative != "labels.csv":
                label = _kermany_class(relative) if layout == "kermany" else None
                found[label].append(_digest(os.path.join(written[layout], relative)))
        if layout == "kermany":
            assert {label: sorted(found[label]) for label in CLASSES} == {label: digests[label] for label in CLASSES}
        else:
            assert sorted(found[None]) == sorted(d for label, ds in digests.items() if label != "Stress-Smoking"
                                                 for d in ds)


def test_unknown_layout_and_existing_folder_are_refused(tmp_path, written):
    with pytest.raises(ValueError, match=r"layout='nope'.*coronahack, kermany, folders, csv"):
        synthetic.write_dataset(str(tmp_path / "out"), **SMALL, layout="nope")
    assert os.listdir(tmp_path) == []
    before = _files(written["kermany"])
    with pytest.raises(FileExistsError, match=re.escape(written["kermany"])):
        synthetic.write_dataset(written["kermany"], **SMALL, layout="kermany")
    assert _files(written["kermany"]) == before


@pytest.mark.parametrize("layout", synthetic.LAYOUTS)
def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch, layout):
    original = synthetic._save
    saved = []

    def save_then_fail(image, path, kind):
        if len(saved) == 5:
            raise OSError("disk full")
        saved.append(path)
        original(image, path, kind)

    monkeypatch.setattr(synthetic, "_save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        synthetic.write_dataset(str(tmp_path / "out"), **SMALL, layout=layout)
    assert len(saved) == 5 and os.listdir(tmp_path) == []


def test_cli_writes_the_kermany_layout(tmp_path, written):
    out = tmp_path / "kermany"
    result = run_module("xray_tf.cli.synthetic", f"--out={out}", "--format=kermany", *(
        f"--{flag}={SMALL[flag]}" for flag in ("num_train", "num_test", "seed")), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "kermany layout" in result.stdout and str(out) in result.stdout
    assert sorted(os.listdir(out)) == ["test", "train", "val"]
    # Other image sizes (the CLI's defaults), the same plan.
    assert _counts("kermany", str(out)) == _counts("kermany", written["kermany"])
    help_text = run_module("xray_tf.cli.synthetic", "--help", timeout=120).stdout
    assert re.search(r"--format: <(\S+)>", help_text)[1].split("|") == list(synthetic.LAYOUTS)
