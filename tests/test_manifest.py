"""Manifest schema, save/load round trips and the content hash."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finegrain.data.manifest import Manifest, sidecar_path
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


# --- CSV files: a plain table plus a JSON sidecar; old comment-line files still load -----------
REPO = Path(__file__).resolve().parents[1]
BOXES = dict(bbox_x=[1.0, 2.5, np.nan, np.nan], bbox_y=[1, 2, np.nan, np.nan], bbox_w=[5, 6, np.nan, np.nan],
             bbox_h=[7, 8, np.nan, np.nan], note=["n1", "n2", "n3", "n4"])


def test_saved_csv_is_a_plain_table_for_bare_pandas(tmp_path):
    m = Manifest.from_table(_table(**BOXES), tmp_path / "data")
    path = m.save(tmp_path / "m.csv")
    plain = pd.read_csv(path)  # no flags: what DuckDB, spreadsheets and pandas users do
    assert list(plain.columns) == ["image_id", "path", "label", "split", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "note"]
    assert len(plain) == 4
    assert plain["image_id"].tolist() == ["a", "b", "c", "d"]
    assert plain["path"].tolist() == ["x/a.jpg", "x/b.jpg", "y/c.jpg", "u/d.jpg"]
    assert plain["label"].fillna("").tolist() == ["sparrow", "sparrow", "wren", ""]
    assert plain["split"].tolist() == ["train", "test", "train", "unlabeled"]
    np.testing.assert_array_equal(plain["bbox_x"].to_numpy(), [1.0, 2.5, np.nan, np.nan])
    assert path.read_text().splitlines()[0] == "image_id,path,label,split,bbox_x,bbox_y,bbox_w,bbox_h,note"
    meta = json.loads(sidecar_path(path).read_text())
    assert sidecar_path(path).name == "m.csv.json"
    assert meta["content_hash"] == m.content_hash and meta["root"] == "data" and meta["rows"] == 4
    assert not list(tmp_path.glob(".*.tmp"))


def _write_old_format(path: Path, m: Manifest, root_rel: str) -> None:
    """A CSV manifest as format-1 code wrote it: a `# finegrain-manifest {json}` line, then the table."""
    meta = {"format_version": 1, "root": root_rel, "root_absolute": str(m.root), "content_hash": m.content_hash,
            "rows": len(m)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("# finegrain-manifest " + json.dumps(meta) + "\n")
        m.table.to_csv(f, index=False, lineterminator="\n")


def test_old_comment_line_csv_loads_as_before_and_resaves_with_the_same_hash(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    m = Manifest.from_table(_table(**BOXES), root)
    old = tmp_path / "manifests" / "old.csv"
    _write_old_format(old, m, "../data")
    back = Manifest.load(old)
    assert back.root == root.resolve()
    pd.testing.assert_frame_equal(back.table, m.table, check_dtype=False)
    assert back.content_hash == m.content_hash
    # A stale sidecar does not override the comment line, which travels with its rows.
    sidecar_path(old).write_text(json.dumps({"root": "../elsewhere"}))
    assert Manifest.load(old).root == root.resolve()
    # Saved again in the new format: a plain CSV, same root, same hash (stage cache keys survive).
    new = back.save(tmp_path / "manifests" / "new.csv")
    assert not new.read_text().startswith("#")
    again = Manifest.load(new)
    assert again.root == root.resolve() and again.content_hash == m.content_hash


def test_tracked_cub50_manifest_keeps_its_hash():
    m = Manifest.load(REPO / "data_manifests" / "cub50.csv")
    assert len(m) == 2952 and m.split_counts() == {"train": 1452, "test": 1500}
    # The hash format-1 code stored for this file: cached stage keys depend on it.
    assert m.content_hash == "fbf17a9136a604b7b57232bfecdc1f8d908b1a0b9f39a10846c312e8181a78b1"
    assert m.root.name == "cub50"


def test_csv_without_sidecar_is_a_users_table_rooted_at_its_folder(tmp_path):
    (tmp_path / "data").mkdir()
    m = Manifest.from_table(_table(), tmp_path / "data")
    path = m.save(tmp_path / "m.csv")
    assert Manifest.load(path).root == (tmp_path / "data").resolve()
    sidecar_path(path).unlink()
    alone = Manifest.load(path)
    assert alone.root == tmp_path.resolve() and alone.content_hash == m.content_hash


def test_csv_edited_after_saving_loads_with_its_new_hash_and_the_stored_root(tmp_path):
    (tmp_path / "data").mkdir()
    m = Manifest.from_table(_table(), tmp_path / "data")
    path = m.save(tmp_path / "m.csv")
    edited = pd.read_csv(path, dtype=str, keep_default_na=False)
    edited.loc[0, "label"] = "wren"  # someone fixed a label in a spreadsheet
    edited.to_csv(path, index=False)
    back = Manifest.load(path)
    assert back.root == (tmp_path / "data").resolve()
    assert back.content_hash == Manifest.from_table(edited, tmp_path).content_hash != m.content_hash


def test_unreadable_sidecar_is_an_error_naming_it(tmp_path):
    path = Manifest.from_table(_table(), tmp_path).save(tmp_path / "m.csv")
    sidecar_path(path).write_text("{not json")
    with pytest.raises(ManifestError, match=r"m\.csv\.json: cannot read manifest metadata"):
        Manifest.load(path)
    sidecar_path(path).write_text("[1, 2]")
    with pytest.raises(ManifestError, match=r"m\.csv\.json: .*JSON object"):
        Manifest.load(path)


def test_parquet_keeps_its_metadata_inside_and_writes_no_sidecar(tmp_path):
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    m = Manifest.from_table(_table(), tmp_path / "data")
    path = m.save(tmp_path / "m.parquet")
    meta = json.loads(pq.read_schema(path).metadata[b"finegrain"])
    assert meta["content_hash"] == m.content_hash and meta["root"] == "data"
    assert not sidecar_path(path).exists()


# --- row selection ---------------------------------------------------------------------------
def test_rows_selects_splits_then_classes(tmp_path):
    m = Manifest.from_table(_table(), tmp_path)
    assert m.rows("train").table["image_id"].tolist() == ["a", "c"]
    assert m.rows(["train", "test"], classes=["sparrow"]).table["image_id"].tolist() == ["a", "b"]
    picked = m.rows("train", classes=("wren", "kiwi"))
    assert picked.table["image_id"].tolist() == ["c"] and picked.table.index.tolist() == [0]
    assert picked.root == m.root
    assert len(m.rows("val")) == 0 and len(m.rows("train", classes=[])) == 0
    with pytest.raises(ManifestError, match="unknown split"):
        m.rows("holdout")


def test_class_codes_index_labels_into_classes(tmp_path):
    import torch

    rows = Manifest.from_table(_table(), tmp_path).rows(["train", "test"])
    codes = rows.class_codes(["wren", "sparrow"])
    assert codes.dtype == torch.int64 and codes.shape == (3,)
    assert codes.tolist() == [1, 1, 0]
    assert rows.rows("val").class_codes(["wren"]).shape == (0,)
    with pytest.raises(ManifestError, match=r"label 'wren' of y/c\.jpg .*not one of the 1 classes"):
        rows.class_codes(["sparrow"])
