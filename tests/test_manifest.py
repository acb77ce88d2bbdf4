"""Manifest schema, save/load round trips and the content hash."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from finegrain.data.manifest import Manifest
from finegrain.errors import ManifestError


def _table(**extra):
    t = pd.DataFrame({
        "image_id": ["a", "b", "c", "d"],
        "path": ["x/a.jpg", "x/b.jpg", "y/c.jpg", "u/d.jpg"],
        "label": ["sparrow", "sparrow", "wren", ""],
        "split": ["train", "test", "train", "unlabeled"],
    })
    for k, v in extra.items():
        t[k] = v
    return t


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_round_trip_keeps_rows_root_and_hash(tmp_path, suffix):
    root = tmp_path / "data"
    root.mkdir()
    m = Manifest.from_table(_table(bbox_x=[1.0, 2.0, np.nan, np.nan], bbox_y=[1, 2, np.nan, np.nan], bbox_w=[5, 6, np.nan, np.nan], bbox_h=[7, 8, np.nan, np.nan], note=["n1", "n2", "n3", "n4"]), root)
    path = m.save(tmp_path / "manifests" / f"m{suffix}")
    back = Manifest.load(path)
    assert back.root == root.resolve()
    assert back.content_hash == m.content_hash
    pd.testing.assert_frame_equal(back.table, m.table, check_dtype=False)
    assert back.has_bboxes and back.class_names == ["sparrow", "wren"]
    assert back.split_counts() == {"train": 2, "test": 1, "unlabeled": 1}


def test_csv_and_parquet_hash_alike_and_hash_tracks_content(tmp_path):
    m = Manifest.from_table(_table(), tmp_path)
    a = Manifest.load(m.save(tmp_path / "m.csv"))
    b = Manifest.load(m.save(tmp_path / "m.parquet"))
    assert a.content_hash == b.content_hash == m.content_hash
    changed = _table()
    changed.loc[0, "label"] = "wren"
    assert Manifest.from_table(changed, tmp_path).content_hash != m.content_hash


def test_root_found_when_manifest_and_data_move_together(tmp_path):
    (tmp_path / "proj" / "data").mkdir(parents=True)
    m = Manifest.from_table(_table(), tmp_path / "proj" / "data")
    m.save(tmp_path / "proj" / "manifests" / "m.csv")
    (tmp_path / "proj").rename(tmp_path / "moved")
    assert Manifest.load(tmp_path / "moved" / "manifests" / "m.csv").root == (tmp_path / "moved" / "data").resolve()


def test_root_option_overrides_and_plain_csv_defaults_to_its_folder(tmp_path):
    _table().to_csv(tmp_path / "plain.csv", index=False)
    assert Manifest.load(tmp_path / "plain.csv").root == tmp_path.resolve()
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert Manifest.load(tmp_path / "plain.csv", root=other).root == other.resolve()


@pytest.mark.parametrize("mutate,message", [
    (lambda t: t.drop(columns=["split"]), "missing column"),
    (lambda t: t.assign(split=["train", "holdout", "train", "unlabeled"]), "unknown split"),
    (lambda t: t.assign(image_id=["a", "a", "c", "d"]), "duplicated image_id"),
    (lambda t: t.assign(path=["x/a.jpg", "x/a.jpg", "y/c.jpg", "u/d.jpg"]), "duplicated row"),
    (lambda t: t.assign(label=["sparrow", "", "wren", ""]), "have no label"),
    (lambda t: t.assign(label=["sparrow", "sparrow", "wren", "wren"]), "'unlabeled' have a label"),
    (lambda t: t.assign(bbox_x=[1, 1, 1, 1], bbox_y=[1, 1, 1, 1]), "need all of"),
    (lambda t: t.assign(bbox_x=["1", "oops", "", ""], bbox_y=[1, 1, None, None], bbox_w=[1, 1, None, None], bbox_h=[1, 1, None, None]), "non-numeric"),
])
def test_schema_problems_are_clear_errors(tmp_path, mutate, message):
    with pytest.raises(ManifestError, match=message):
        Manifest.from_table(mutate(_table()), tmp_path)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        Manifest.load(tmp_path / "nope.csv")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ManifestError, match=r"bad\.csv.*missing column"):
        Manifest.load(tmp_path / "bad.csv")
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(ManifestError, match="unknown manifest format"):
        Manifest.load(tmp_path / "m.json")
