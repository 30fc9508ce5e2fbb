"""Dataset layouts: detection, each reader's rules, several datasets in one index, copies, class names."""

from __future__ import annotations

import io
import json
import os

import pandas as pd
import pytest
from conftest import run_module, shared_data

from xray_tf import data, layouts, rundir, synthetic
from xray_tf.config import DATA_FORMATS, ConfigError


def touch(path, content: bytes | None = None) -> str:
    """A file at ``path`` (folders made) whose bytes are ``content``, by default its own path (unique)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(str(path).encode() if content is None else content)
    return str(path)


def kermany(root, train: dict[str, list[str]], test: dict[str, list[str]] | None = None,
            val: dict[str, list[str]] | None = None) -> str:
    for split, classes in (("train", train), ("test", test or {}), ("val", val or {})):
        for folder, names in classes.items():
            for name in names:
                touch(os.path.join(root, split, folder, name))
    return str(root)


KERMANY_TRAIN = {
    "NORMAL": ["IM-0001-0001.jpeg", "IM-0001-0002.jpeg", "IM-0002-0001.jpeg", "NORMAL2-IM-0003-0001.jpeg"],
    "PNEUMONIA": ["person1_bacteria_1.jpeg", "person1_virus_2.jpeg", "person2_bacteria_3.jpeg",
                  "person3_virus_4.jpeg", "person4_bacteria_5.jpeg", "person5_virus_6.jpeg"],
}


def test_kermany_names_give_classes_and_patients(tmp_path):
    kermany(tmp_path / "chest_xray", KERMANY_TRAIN, test={"NORMAL": ["IM-0001-0001.jpeg"]},
                   val={"PNEUMONIA": ["person9_virus_9.jpeg"]})
    source, why = layouts.read(str(tmp_path))  # Kaggle's zip unpacks to chest_xray/
    assert source.layout == "kermany" and "NORMAL/ and PNEUMONIA/" in why
    frame = source.frame.set_index("file")
    assert frame.loc["person1_bacteria_1.jpeg", "label"] == "Bacteria"
    assert frame.loc["person1_virus_2.jpeg", "label"] == "Virus"
    assert (frame.loc[frame.index.str.startswith(("IM-", "NORMAL2")), "label"] == "Normal").all()
    assert frame.loc["person9_virus_9.jpeg", "split"] == "train"  # Kermany's val joins train
    assert any("val split (1 images) joins train" in note for note in source.notes)

    index = data.load_index(str(tmp_path), val_fraction=0.3)
    assert index.class_names == ("Normal", "Bacteria", "Virus") and index.absent_classes == ("COVID-19",)
    assert "absent: COVID-19" in index.summary()
    rows = index.frame.set_index("file")
    assert rows.loc["person1_bacteria_1.jpeg", "patient"] == rows.loc["person1_virus_2.jpeg", "patient"]
    assert rows.loc[["IM-0001-0001.jpeg", "IM-0001-0002.jpeg"], "patient"].nunique() == 2  # train and test
    train_val = index.frame[index.frame["split"] != "test"]
    assert train_val.groupby("patient")["split"].nunique().max() == 1  # no patient on both sides


def test_kermany_pneumonia_without_kind_and_stray_class_folders_are_listed(tmp_path):
    kermany(tmp_path, {**KERMANY_TRAIN, "PNEUMONIA": ["person1_bacteria_1.jpeg", "mystery.jpeg"]})
    touch(tmp_path / "train" / "NORMAL" / "notes.txt")
    source = layouts.read_kermany(str(tmp_path))
    (problem,) = source.problems
    assert "1 image(s) in PNEUMONIA/ whose name says neither bacteria nor virus" in problem and "mystery" in problem
    assert source.excluded == {"not an image file (by extension), in kermany layout": 1}
    touch(tmp_path / "test" / "COVID" / "a.png")
    with pytest.raises(data.DataError, match="COVID; Kermany's layout has only NORMAL and PNEUMONIA"):
        data.load_index(str(tmp_path), data_format="kermany")


def test_folders_take_classes_from_folder_names_and_class_names_map_them(tmp_path):
    for label, count in (("NORMAL", 6), ("bacteria", 5), ("virus", 4)):
        for i in range(count):
            touch(tmp_path / label / "sub" / f"{label}{i}.png")
    touch(tmp_path / "bacteria" / ".DS_Store")  # hidden: not counted
    touch(tmp_path / "README.md")
    index = data.load_index(str(tmp_path), val_fraction=0.25)
    assert index.sources["folders"]["layout"] == "folders"
    assert index.class_names == ("NORMAL", "bacteria", "virus")  # alphabetical, as ImageFolder
    assert index.excluded == {"not an image file (by extension), in folders layout": 1}
    assert sum(index.class_counts("train").values()) + sum(index.class_counts("val").values()) == 15

    mapped = data.load_index(str(tmp_path), class_names="NORMAL=Normal,bacteria=Pneumonia,virus=Pneumonia")
    assert mapped.class_names == ("Normal", "Pneumonia")
    assert mapped.frame["label"].value_counts().to_dict() == {"Pneumonia": 9, "Normal": 6}
    ordered = data.load_index(str(tmp_path), class_names="virus,NORMAL")
    assert ordered.class_names == ("virus", "NORMAL") and ordered.excluded[
        "bacteria, not in --class_names"] == 5
    with pytest.raises(ConfigError, match="label 'virus' is named twice"):
        data.load_index(str(tmp_path), class_names="virus,virus=Pneumonia")


def test_folders_with_splits_keep_their_val_split(tmp_path):
    for split, count in (("train", 4), ("val", 2), ("test", 3)):
        for label in ("cat_a", "cat_b"):
            for i in range(count):
                touch(tmp_path / split / label / f"{split}{label}{i}.jpg")
    index = data.load_index(str(tmp_path))
    assert {split: sum(index.class_counts(split).values()) for split in data.SPLITS} == {
        "train": 8, "val": 4, "test": 6}
    touch(tmp_path / "extra_split" / "cat_a" / "x.jpg")
    with pytest.raises(data.DataError, match="extra_split beside the split folders"):
        data.load_index(str(tmp_path), data_format="folders")


def write_csv(folder, rows: list[dict], name: str = "labels.csv") -> str:
    for row in rows:
        touch(os.path.join(folder, row["path"]))
    pd.DataFrame(rows).to_csv(os.path.join(folder, name), index=False)
    return os.path.join(folder, name)


def test_csv_rows_give_labels_splits_and_patients(tmp_path):
    rows = [{"path": f"img/{label}{i}.png", "label": label, "split": split, "patient_id": f"{label}{i // 2}"}
            for label in ("Normal", "Pneumonia") for i, split in enumerate(["train"] * 8 + [""] * 2 + ["test"] * 2)]
    csv_path = write_csv(tmp_path, rows)
    by_folder = data.load_index(str(tmp_path), val_fraction=0.2)
    by_file = data.load_index([], data_csv=csv_path, val_fraction=0.2)
    assert by_folder.frame.equals(by_file.frame)
    assert by_file.class_names == ("Normal", "Pneumonia")  # the task's Normal first, then the others
    assert sum(by_file.class_counts("test").values()) == 4
    patient_sides = by_file.frame[by_file.frame["split"] != "test"].groupby("patient")["split"].nunique()
    assert patient_sides.max() == 1 and by_file.frame["patient"].str.contains("patient:Normal0").any()

    rows[0]["split"], rows[1]["path"], rows[2]["label"] = "holdout", "../escape.png", None
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    with pytest.raises(data.DataError) as error:
        data.load_index([], data_csv=csv_path)
    message = str(error.value)
    assert "split is none of train, val, test" in message and "holdout" in message
    assert "outside the image folder" in message and "match no class rule" in message


def test_the_config_offers_every_layout():
    assert sorted(DATA_FORMATS) == sorted(("auto", *layouts.LAYOUTS))  # config imports no pandas: spelt out


def test_detection_names_the_candidates_or_the_ambiguity(tmp_path):
    with pytest.raises(data.DataError) as error:
        layouts.detect(str(tmp_path))
    assert all(f"  {name}: " in str(error.value) for name in layouts.LAYOUTS)
    write_csv(tmp_path, [{"path": "a.png", "label": "x"}])
    touch(tmp_path / layouts.METADATA_CSV)
    os.makedirs(tmp_path / layouts.IMAGE_FOLDER / "train")
    with pytest.raises(data.DataError, match="ambiguous.*coronahack.*csv.*--data_format"):
        layouts.detect(str(tmp_path))
    assert layouts.read(str(tmp_path), "csv")[0].layout == "csv"


def test_copies_across_datasets_count_once_and_sources_are_counted(tmp_path):
    train = {"NORMAL": [f"IM-{i:04d}-0001.jpeg" for i in range(6)],
             "PNEUMONIA": [f"person{i}_{'bacteria' if i % 2 else 'virus'}_{i}.jpeg" for i in range(12)]}
    first = kermany(tmp_path / "a", train)
    copy = kermany(tmp_path / "b", {"NORMAL": train["NORMAL"][:2]})
    for name in train["NORMAL"][:2]:  # the same bytes under the same names
        touch(os.path.join(copy, "train", "NORMAL", name), open(os.path.join(first, "train", "NORMAL", name),
                                                                   "rb").read())
    index = data.load_index([first, copy], val_fraction=0.2)
    assert list(index.sources) == ["kermany", "kermany-2"]
    assert index.excluded == {"byte-identical copy of an image of kermany, counted once": 2}
    assert any("2 image(s) of kermany-2 are byte-identical copies" in note for note in index.notes)
    assert index.source_counts()["kermany-2"] == {"Normal": 0, "Bacteria": 0, "Virus": 0}
    assert "source kermany: Normal=6, Bacteria=6, Virus=6" in index.summary()
    assert len(data.load_index([first, first], val_fraction=0.2).frame) == len(index.frame)  # one folder twice


def test_every_folder_with_a_layout_problem_is_named_at_once(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(data.DataError) as error:
        data.load_index([str(tmp_path / "empty"), str(tmp_path / "missing")])
    assert "empty: holds no dataset layout" in str(error.value) and "missing: not a directory" in str(error.value)


def test_eval_index_fixes_the_runs_classes(tmp_path):
    for label in ("Normal", "COVID-19", "Other"):
        touch(tmp_path / label / f"{label}.png")
    index = data.load_folder_index(str(tmp_path), class_names=["Normal", "Bacteria", "Virus", "COVID-19"])
    assert index.class_counts("eval") == {"Normal": 1, "Bacteria": 0, "Virus": 0, "COVID-19": 1}
    assert index.excluded == {"Other, not a class of the run": 1}


def test_fine_and_own_labels_meet_in_one_set_of_classes(tmp_path):
    corona = layouts.read_coronahack  # the CoronaHack half: a tiny Kaggle-layout CSV
    rows = [(f"{kind}{i}.jpeg", label, "TRAIN", None, category) for kind, label, category in
            (("n", "Normal", None), ("b", "Pnemonia", "bacteria"), ("v", "Pnemonia", "Virus")) for i in range(4)]
    frame = pd.DataFrame(rows, columns=["X_ray_image_name", "Label", "Dataset_type", "Label_2_Virus_category",
                                        "Label_1_Virus_category"])
    for name in frame["X_ray_image_name"]:
        touch(tmp_path / "corona" / layouts.IMAGE_FOLDER / "train" / name)
    frame.to_csv(tmp_path / "corona" / layouts.METADATA_CSV)
    assert corona(str(tmp_path / "corona")).fine_labels
    for label in ("NORMAL", "PNEUMONIA"):
        for i in range(3):
            touch(tmp_path / "hospital" / label / f"{label}{i}.png")
    index = data.load_index([str(tmp_path / "corona"), str(tmp_path / "hospital")], task="normal_vs_pneumonia",
                            class_names="Normal,Pneumonia,NORMAL=Normal,PNEUMONIA=Pneumonia", val_fraction=0.3)
    assert index.class_names == ("Normal", "Pneumonia")
    assert index.source_counts() == {"coronahack": {"Normal": 4, "Pneumonia": 8},
                                     "folders": {"Normal": 3, "Pneumonia": 3}}


def kermany_view(root, per_class: int = 40) -> str:
    """Kermany's layout over the real TRAIN images (symlinks): its Normal, Bacteria and Virus images by name."""
    source = shared_data("coronahack")
    metadata = pd.read_csv(os.path.join(source, layouts.METADATA_CSV), index_col=0)
    metadata = metadata.assign(fine=layouts.coronahack_fine_classes(metadata))
    kermany_named = metadata["X_ray_image_name"].str.match(r"(person\d+_(bacteria|virus)|(NORMAL2-)?IM-)")
    images = os.path.join(source, layouts.IMAGE_FOLDER, layouts.IMAGE_FOLDER, "train")
    for fine, rows in metadata[kermany_named].groupby("fine"):
        folder = os.path.join(root, "train", "NORMAL" if fine == "Normal" else "PNEUMONIA")
        os.makedirs(folder, exist_ok=True)
        for name in rows["X_ray_image_name"].head(per_class):
            os.symlink(os.path.join(images, name), os.path.join(folder, name))
    return str(root)


@pytest.mark.slow
def test_a_kermany_view_of_the_real_data_trains_evaluates_and_predicts_from_the_cli(tmp_path):
    view = kermany_view(tmp_path / "chest_xray")
    result = run_module("xray_tf.train", f"--data_dir={tmp_path}", "--model=mobilenetv3small", "--weights=none",
                        "--image_size=32", "--batch_size=16", "--epochs=1", f"--output_dir={tmp_path / 'runs'}",
                        "--run_name=kermany")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "read as kermany" in result.stderr and "COVID-19" in result.stderr
    run_dir = tmp_path / "runs" / "kermany"
    metrics = json.load(open(run_dir / rundir.METRICS))
    assert metrics["classes"] == ["Normal", "Bacteria", "Virus"] and metrics["absent_classes"] == ["COVID-19"]
    assert metrics["sources"]["kermany"]["layout"] == "kermany"
    assert metrics["sources"]["kermany"]["images"] == {"Normal": 40, "Bacteria": 40, "Virus": 40}
    splits = pd.read_csv(run_dir / rundir.SPLITS_CSV)
    assert splits.groupby("patient")["split"].nunique().max() == 1

    evaluated = run_module("xray_tf.cli.evaluate", f"--run_dir={run_dir}", "--split=val")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.load(open(run_dir / rundir.metrics_of_split("val")))["classes"] == metrics["classes"]
    some = sorted(os.listdir(os.path.join(view, "train", "PNEUMONIA")))[:2]
    predicted = run_module("xray_tf.cli.predict", f"--model={run_dir}",
                           *(os.path.join(view, "train", "PNEUMONIA", name) for name in some))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    table = pd.read_csv(io.StringIO(predicted.stdout))
    assert [c for c in table.columns if c.startswith("p_")] == ["p_normal", "p_bacteria", "p_virus"]
    assert set(table["predicted_class"]) <= set(metrics["classes"])


@pytest.fixture(scope="module")
def synthetic_layouts(tmp_path_factory) -> dict[str, str]:
    """The same synthetic images written in every layout (``synthetic.LAYOUTS``)."""
    root = tmp_path_factory.mktemp("layouts")
    return {layout: synthetic.write_dataset(str(root / layout), num_train=40, num_test=10, min_size=32, max_size=32,
                                            layout=layout) for layout in synthetic.LAYOUTS}


def test_every_layout_round_trips_to_the_same_classes_and_counts(synthetic_layouts):
    indexes = {layout: data.load_index(folder, val_fraction=0.2) for layout, folder in synthetic_layouts.items()}
    assert {layout: index.sources[layout]["layout"] for layout, index in indexes.items()} == {
        layout: layout for layout in synthetic_layouts}  # auto detected each one

    def per_class(index: data.DataIndex) -> dict[str, dict[str, int]]:
        train, val = index.class_counts("train"), index.class_counts("val")
        return {"train+val": {name: train[name] + val[name] for name in train}, "test": index.class_counts("test")}

    reference = per_class(indexes["coronahack"])
    assert per_class(indexes["folders"]) == per_class(indexes["csv"]) == reference
    without_covid = {part: {k: v for k, v in counts.items() if k != "COVID-19"} for part, counts in reference.items()}
    assert per_class(indexes["kermany"]) == without_covid and indexes["kermany"].absent_classes == ("COVID-19",)
    assert not indexes["kermany"].frame["patient"].str.contains(":file:").any()  # every name gives its patient
    for index in indexes.values():
        sides = index.frame[index.frame["split"] != "test"].groupby("patient")["split"].nunique()
        assert sides.max() == 1


def test_a_coronahack_and_kermany_copy_of_the_same_images_count_once(synthetic_layouts):
    index = data.load_index([synthetic_layouts["coronahack"], synthetic_layouts["kermany"]], val_fraction=0.2)
    alone = data.load_index(synthetic_layouts["coronahack"], val_fraction=0.2)
    copies = index.excluded["byte-identical copy of an image of coronahack, counted once"]
    assert copies == len(alone.frame) - alone.class_counts("train")["COVID-19"] - alone.class_counts("val")[
        "COVID-19"] - alone.class_counts("test")["COVID-19"]  # every Kermany image is a CoronaHack one
    assert len(index.frame) == len(alone.frame)


@pytest.mark.slow
def test_folders_train_and_csv_evaluates_from_the_cli(synthetic_layouts, tmp_path):
    result = run_module("xray_tf.train", f"--data_dir={synthetic_layouts['folders']}", "--model=mobilenetv3small",
                        "--weights=none", "--image_size=32", "--batch_size=8", "--epochs=1",
                        f"--output_dir={tmp_path}", "--run_name=folders")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "folders"
    assert json.load(open(run_dir / rundir.METRICS))["sources"]["folders"]["location"] == synthetic_layouts["folders"]
    evaluated = run_module("xray_tf.cli.evaluate", f"--run_dir={run_dir}", f"--eval_data={synthetic_layouts['csv']}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    rows = pd.read_csv(os.path.join(synthetic_layouts["csv"], "labels.csv"))
    assert json.load(open(run_dir / rundir.metrics_of_split("eval")))["num_images"] == len(rows)
