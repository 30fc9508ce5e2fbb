"""The data index: class rules, tasks, splits, extra data and errors on bad metadata."""

from __future__ import annotations

import os

import pandas as pd
import pytest
from conftest import shared_data

from xray_tf import data, layouts
from xray_tf.config import FINE_CLASSES, ConfigError

# (name, Label, Label_2_Virus_category, Label_1_Virus_category, expected fine class)
LABEL_CASES = [
    ("n.jpeg", "Normal", None, None, "Normal"),
    ("b.jpeg", "Pnemonia", None, "bacteria", "Bacteria"),
    ("strep.jpeg", "Pnemonia", "Streptococcus", "bacteria", "Bacteria"),
    ("v.jpeg", "Pnemonia", None, "Virus", "Virus"),
    ("sars.jpeg", "Pnemonia", "SARS", "Virus", "Virus"),
    ("covid.jpeg", "Pnemonia", "COVID-19", "Virus", "COVID-19"),
    ("ards.jpeg", "Pnemonia", "ARDS", "Stress-Smoking", "Stress-Smoking"),
]


def write_coronahack(root, rows, nested: bool = True) -> str:
    """Write a metadata CSV and (empty) image files in the Kaggle layout; return the data dir."""
    folders = [layouts.IMAGE_FOLDER] * (2 if nested else 1)
    image_root = os.path.join(root, *folders)
    frame = pd.DataFrame(rows, columns=["X_ray_image_name", "Label", "Dataset_type",
                                        "Label_2_Virus_category", "Label_1_Virus_category"])
    for name, split in zip(frame["X_ray_image_name"], frame["Dataset_type"]):
        os.makedirs(os.path.join(image_root, split.lower()), exist_ok=True)
        open(os.path.join(image_root, split.lower(), name), "wb").close()
    frame.to_csv(os.path.join(root, layouts.METADATA_CSV))
    return str(root)


def class_rows(counts: dict[str, int], split: str = "TRAIN") -> list[tuple]:
    labels = {case[4]: case[1:4] for case in LABEL_CASES}
    return [(f"{cls}-{split}-{i}.jpeg", labels[cls][0], split, labels[cls][1], labels[cls][2])
            for cls, n in counts.items() for i in range(n)]


def test_fine_classes_cover_every_label_combination():
    frame = pd.DataFrame([case[:4] for case in LABEL_CASES],
                         columns=["X_ray_image_name", "Label", "Label_2_Virus_category", "Label_1_Virus_category"])
    assert list(layouts.coronahack_fine_classes(frame)) == [case[4] for case in LABEL_CASES]


def test_fine_classes_reject_nonsense_labels():
    frame = pd.DataFrame(
        [("x", "Normal", None, "bacteria"), ("y", "Pnemonia", None, None), ("z", "Cat", None, None)],
        columns=["X_ray_image_name", "Label", "Label_2_Virus_category", "Label_1_Virus_category"],
    )
    assert layouts.coronahack_fine_classes(frame).isna().all()


@pytest.mark.parametrize("nested", [True, False])
def test_index_reads_both_layouts_and_counts_exclusions(tmp_path, nested):
    rows = [(c[0], c[1], "TRAIN", c[2], c[3]) for c in LABEL_CASES] + class_rows({"COVID-19": 2, "Normal": 1}, "TEST")
    index = data.load_index(write_coronahack(tmp_path, rows, nested=nested), val_fraction=0.3)
    frame = index.frame
    assert index.class_names == FINE_CLASSES
    assert index.excluded == {"Stress-Smoking, in no class": 1}
    assert len(frame) == len(rows) - 1
    assert set(frame.loc[frame["file"] == "strep.jpeg", "label"]) == {"Bacteria"}
    assert set(frame.loc[frame["split"] == "test", "label"]) == {"COVID-19", "Normal"}
    assert all(os.path.isfile(p) for p in frame["path"])
    assert (frame["label_index"] == frame["label"].map(FINE_CLASSES.index)).all()


def test_tasks_map_and_exclude_classes(tmp_path):
    root = write_coronahack(tmp_path, class_rows({"Normal": 4, "Bacteria": 4, "Virus": 4, "COVID-19": 4}))
    binary = data.load_index(root, task="bacteria_vs_virus")
    assert binary.class_names == ("Bacteria", "Virus")
    assert binary.excluded == {"Normal, not in task bacteria_vs_virus": 4, "COVID-19, not in task bacteria_vs_virus": 4}
    pneumonia = data.load_index(root, task="normal_vs_pneumonia")
    assert pneumonia.class_names == ("Normal", "Pneumonia")
    assert pneumonia.frame["label"].value_counts().to_dict() == {"Pneumonia": 12, "Normal": 4}
    with pytest.raises(ConfigError, match="^task='three_class': not one of"):
        data.load_index(root, task="three_class")


def test_validation_split_is_stratified_disjoint_and_seed_stable(tmp_path):
    counts = {"Normal": 40, "Bacteria": 80, "Virus": 40, "COVID-19": 3}
    root = write_coronahack(tmp_path, class_rows(counts))
    index = data.load_index(root, val_fraction=0.25, seed=7)
    val = index.split("val")
    assert index.class_counts("val") == {"Normal": 10, "Bacteria": 20, "Virus": 10, "COVID-19": 1}
    assert set(val["path"]).isdisjoint(index.split("train")["path"])
    again = data.load_index(root, val_fraction=0.25, seed=7)
    assert list(again.split("val")["path"]) == list(val["path"])
    other_seed = data.load_index(root, val_fraction=0.25, seed=8)
    assert set(other_seed.split("val")["path"]) != set(val["path"])


def test_extra_data_joins_training_only(tmp_path):
    root = write_coronahack(tmp_path / "main", class_rows({"Normal": 10, "Bacteria": 10, "Virus": 10, "COVID-19": 2}))
    extra = tmp_path / "extra"
    os.makedirs(extra / "images")
    for i in range(5):
        open(extra / "images" / f"e{i}.png", "wb").close()
    pd.DataFrame({"X_ray_image_name": [f"e{i}.png" for i in range(5)], "Label": ["COVID-19"] * 5}).to_csv(
        extra / "metadata.csv", index=False)
    index = data.load_index(root, extra_data=str(extra))
    added = index.frame[index.frame["source"] == "extra"]
    assert len(added) == 5 and set(added["split"]) == {"train"} and set(added["label"]) == {"COVID-19"}


def test_bad_rows_are_listed_in_one_error(tmp_path):
    rows = class_rows({"Normal": 3, "Bacteria": 3, "Virus": 3, "COVID-19": 3})
    rows.append(("weird.jpeg", "Pnemonia", "TRAIN", None, "Fungus"))
    root = write_coronahack(tmp_path, rows)
    os.remove(os.path.join(root, layouts.IMAGE_FOLDER, layouts.IMAGE_FOLDER, "train", "Normal-TRAIN-0.jpeg"))
    with pytest.raises(data.DataError) as error:
        data.load_index(root)
    message = str(error.value)
    assert layouts.METADATA_CSV in message
    assert "weird.jpeg" in message and "match no class rule" in message
    assert "Normal-TRAIN-0.jpeg" in message and "does not exist" in message


def test_duplicate_rows_and_empty_classes_are_refused(tmp_path):
    rows = class_rows({"Normal": 3, "Bacteria": 3, "Virus": 3})
    with pytest.raises(data.DataError, match="no training images of class.*COVID-19"):
        data.load_index(write_coronahack(tmp_path / "a", rows))
    with pytest.raises(data.DataError, match="more than once"):
        data.load_index(write_coronahack(tmp_path / "b", rows + rows[:1] + class_rows({"COVID-19": 2})))


def test_missing_csv_column_and_layout_errors_name_the_file(tmp_path):
    with pytest.raises(data.DataError, match="holds no dataset layout known here.*\n  coronahack: Chest_xray_Corona"):
        data.load_index(str(tmp_path))
    pd.DataFrame({"X_ray_image_name": ["a.jpeg"], "Label": ["Normal"]}).to_csv(tmp_path / layouts.METADATA_CSV)
    os.makedirs(tmp_path / layouts.IMAGE_FOLDER / "train")
    with pytest.raises(data.DataError, match="missing column.*Dataset_type"):
        data.load_index(str(tmp_path))


def test_real_coronahack_index():
    index = data.load_index(shared_data("coronahack"))
    total = {name: index.class_counts("train")[name] + index.class_counts("val")[name] for name in index.class_names}
    assert total == {"Normal": 1342, "Bacteria": 2535, "Virus": 1349, "COVID-19": 51}
    assert index.excluded == {"Stress-Smoking, in no class": 2}
    # Split by patient (the default): no patient on both sides, near the stratified share of each class.
    train, val = (set(index.split(split)["patient"]) for split in ("train", "val"))
    assert train.isdisjoint(val)
    assert index.patient_count("train") + index.patient_count("val") == len(train | val) > 2500
    by_image = data.load_index(shared_data("coronahack"), split_by="image")
    assert not set(by_image.split("train")["patient"]).isdisjoint(by_image.split("val")["patient"])  # the leak
    for name, count in index.class_counts("val").items():
        assert abs(count - by_image.class_counts("val")[name]) <= max(2, 0.05 * count), name


def test_split_by_patient_keeps_a_patients_images_together(tmp_path):
    rows = [(f"person{p}_{kind}_{i}.jpeg", "Pnemonia", "TRAIN", None, kind) for p in range(30)
            for kind in ("bacteria", "virus") for i in range(3)]
    rows += [(f"IM-{p:04d}-000{i}.jpeg", "Normal", "TRAIN", None, None) for p in range(20) for i in range(2)]
    rows += class_rows({"COVID-19": 4})
    index = data.load_index(write_coronahack(tmp_path, rows), val_fraction=0.2, seed=3)
    assert set(index.split("train")["patient"]).isdisjoint(index.split("val")["patient"])
    assert index.class_counts("val") == {"Normal": 8, "Bacteria": 18, "Virus": 18, "COVID-19": 1}
    assert index.patient_count("val") == 4 + 6 + 1
    with pytest.raises(ConfigError, match="^split_by='person'"):
        data.load_index(str(tmp_path), split_by="person")
