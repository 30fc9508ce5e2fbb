"""Finding and decoding the images of a pretraining run: folders, dataset layouts, CSV files, bad files."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from image_files import ramp
from PIL import Image

from xray_tf import image_cache, pretrain_data, synthetic
from xray_tf.tables import DataError


def _write(path, pixels: np.ndarray | None = None) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(ramp() if pixels is None else pixels, "L").save(path)
    return str(path)


def test_a_plain_folder_gives_every_image_file_under_it(tmp_path):
    expected = [_write(tmp_path / "a.png"), _write(tmp_path / "deep" / "b.jpg")]
    _write(tmp_path / ".hidden.png")
    (tmp_path / "notes.txt").write_text("not an image")
    paths, notes = pretrain_data.find_images([str(tmp_path)])
    assert paths == sorted(expected)
    assert "2 image files found" in notes[0]


def test_a_dataset_layout_gives_its_images_outside_the_test_split(tmp_path):
    folder = synthetic.write_dataset(str(tmp_path / "kermany"), num_train=30, num_test=10, layout="kermany",
                                     min_size=32, max_size=40)
    paths, notes = pretrain_data.find_images([folder])
    assert paths and not any(f"{os.sep}test{os.sep}" in path for path in paths)
    assert "kermany layout" in notes[0] and "test images left out" in notes[0]
    assert pretrain_data.find_images([folder], "images")[0] != paths  # as a plain folder: the test images too


def test_a_csv_gives_its_path_column_without_test_rows_or_paths_outside_it(tmp_path):
    kept = _write(tmp_path / "images" / "a.png")
    _write(tmp_path / "images" / "b.png")
    csv = tmp_path / "list.csv"
    pd.DataFrame({"path": ["images/a.png", "images/b.png"], "split": ["train", "test"]}).to_csv(csv, index=False)
    assert pretrain_data.find_images([str(csv)])[0] == [kept]
    pd.DataFrame({"path": ["images/a.png", "../elsewhere.png"]}).to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"1 path\(s\) outside its folder, never read, e.g. '../elsewhere.png'"):
        pretrain_data.find_images([str(csv)])


def test_images_named_twice_are_used_once_and_every_problem_is_listed(tmp_path):
    image = _write(tmp_path / "one" / "a.png")
    paths, notes = pretrain_data.find_images([str(tmp_path / "one"), image])
    assert paths == [image] and "named twice" in notes[-1]
    (tmp_path / "empty").mkdir()
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file\nx.png\n")
    with pytest.raises(DataError) as problems:
        pretrain_data.find_images([str(tmp_path / "empty"), str(bad_csv)])
    assert "2 problem(s) with --images" in str(problems.value)
    assert "No image files" in str(problems.value) and "missing column(s) path" in str(problems.value)


def test_bad_files_are_one_error_listing_each_or_skipped(tmp_path):
    good = _write(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError) as refusal:
        pretrain_data.load_images([str(tmp_path)], 32)
    message = str(refusal.value)
    assert message.startswith("2 image file(s) cannot be used (--on_bad_image=skip")
    assert "broken.png" in message and "empty.jpg" in message
    loaded = pretrain_data.load_images([str(tmp_path)], 32, on_bad_image="skip")
    assert loaded.paths == (good,) and set(loaded.skipped) == {str(tmp_path / "broken.png"),
                                                               str(tmp_path / "empty.jpg")}
    kept = loaded.images[loaded.rows]
    assert kept.shape == (1, 32, 32, 1) and kept.dtype == np.uint8 and kept.max() > 0
    cached = pretrain_data.load_images([str(tmp_path)], 32, on_bad_image="skip", cache=str(tmp_path / "cache"))
    np.testing.assert_array_equal(image_cache.read_rows(cached.images, cached.rows), kept)  # a cache file: the same
