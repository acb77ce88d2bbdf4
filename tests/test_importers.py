"""Importers: the real CUB layout, CUB-style variants, image folders and user tables."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
from PIL import Image

from finegrain.data.importers import import_cub, import_folder, import_table
from finegrain.errors import ManifestError


def test_real_cub50(cub50, caplog):
    with caplog.at_level(logging.INFO, logger="finegrain"):
        m = import_cub(cub50)
    assert len(m) == 2952
    assert len(m.class_names) == 50
    assert m.split_counts() == {"train": 1452, "test": 1500}
    assert not m.has_bboxes
    assert all((cub50 / p).is_file() for p in m.table["path"].head(50))
    assert "space-separated" in caplog.text and "1-based image ids" in caplog.text
    # Class names lose CUB's numeric prefix; every image's folder matches its label.
    folders = m.table["path"].str.split("/").str[1].str.replace(r"^\d+\.", "", regex=True)
    assert (folders == m.table["label"]).all()


def _write_cub_variant(root, *, sep, base, header, boxes):
    """A small CUB-style dataset written the way other tools write them."""
    classes = ["001.Alpha_Warbler", "002.Beta_Wren"]
    images = []
    for c, cls in enumerate(classes):
        (root / "images" / cls).mkdir(parents=True)
        for k in range(3):
            rel = f"{cls}/{cls[4:]}_{k} copy.jpg"  # a space in the file name
            Image.new("RGB", (50, 40), (40 * k, 100, 50 * c)).save(root / "images" / rel)
            images.append((rel, c))
    j = " " if sep == "space" else ","

    def write(name, rows, head):
        lines = ([j.join(head)] if header else []) + [j.join(map(str, r)) for r in rows]
        (root / name).write_text("\n".join(lines) + "\n")

    write("images.txt", [(i + base, rel) for i, (rel, _) in enumerate(images)], ["image_id", "path"])
    write("classes.txt", [(c + base, n) for c, n in enumerate(classes)], ["class_id", "name"])
    write("image_class_labels.txt", [(i + base, c + base) for i, (_, c) in enumerate(images)], ["image_id", "class_id"])
    write("train_test_split.txt", [(i + base, int(i % 3 != 2)) for i in range(len(images))], ["image_id", "is_train"])
    if boxes:
        write("bounding_boxes.txt", [(i + base, 5.0, 4.0, 30.0, 20.0) for i in range(len(images))], ["image_id", "x", "y", "w", "h"])


@pytest.mark.parametrize("sep", ["space", "comma"])
@pytest.mark.parametrize("base", [0, 1])
@pytest.mark.parametrize("header", [False, True])
def test_cub_style_variants(tmp_path, caplog, sep, base, header):
    _write_cub_variant(tmp_path, sep=sep, base=base, header=header, boxes=base == 1)
    with caplog.at_level(logging.INFO, logger="finegrain"):
        m = import_cub(tmp_path)
    assert len(m) == 6 and m.class_names == ["Alpha_Warbler", "Beta_Wren"]
    assert m.split_counts() == {"train": 4, "test": 2}
    assert all((m.root / p).is_file() for p in m.table["path"])
    assert f"{'space' if sep == 'space' else 'comma'}-separated" in caplog.text
    assert f"{base}-based image ids" in caplog.text
    assert m.has_bboxes == (base == 1)
    if m.has_bboxes:
        assert m.table[["bbox_x", "bbox_y", "bbox_w", "bbox_h"]].iloc[0].tolist() == [5.0, 4.0, 30.0, 20.0]


def test_cub_errors(tmp_path):
    with pytest.raises(ManifestError, match="not a folder"):
        import_cub(tmp_path / "missing")
    _write_cub_variant(tmp_path, sep="space", base=1, header=False, boxes=False)
    (tmp_path / "image_class_labels.txt").write_text("1 1\n2 1\n3 9\n4 2\n5 2\n6 2\n")
    with pytest.raises(ManifestError, match="class id"):
        import_cub(tmp_path)
    (tmp_path / "train_test_split.txt").unlink()
    with pytest.raises(ManifestError, match="train_test_split.txt not found"):
        import_cub(tmp_path)


def _img(path, colour=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)


def test_folder_class_layout(tmp_path):
    for cls in ("finch", "tit"):
        for k in range(3):
            _img(tmp_path / cls / f"{k}.jpg")
    _img(tmp_path / "finch" / "nested" / "deep.png")
    (tmp_path / "finch" / "notes.txt").write_text("not an image")
    _img(tmp_path / ".hidden" / "x.jpg")
    m = import_folder(tmp_path)
    assert len(m) == 7 and m.class_names == ["finch", "tit"]
    assert set(m.table["split"]) == {"train"}
    assert "finch/nested/deep.png" in set(m.table["path"])


def test_folder_split_layout(tmp_path):
    for split in ("train", "Validation", "test"):
        for cls in ("finch", "tit"):
            _img(tmp_path / split / cls / "a.jpg")
    _img(tmp_path / "unlabelled" / "x.jpg")
    m = import_folder(tmp_path)
    assert m.split_counts() == {"train": 2, "val": 2, "test": 2, "unlabeled": 1}
    assert m.table.loc[m.table["split"] == "unlabeled", "label"].tolist() == [""]


def test_folder_errors(tmp_path):
    with pytest.raises(ManifestError, match="no sub-folders"):
        import_folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ManifestError, match="no images"):
        import_folder(tmp_path)


def test_table_csv_and_parquet(tmp_path):
    root = tmp_path / "photos"
    for k in range(4):
        _img(root / f"p{k}.jpg")
    src = pd.DataFrame({
        "file": [f"p{k}.jpg" for k in range(4)],
        "species": ["robin", "robin", "jay", ""],
        "fold": ["training", "test", "train", "unlabelled"],
        "x": [1, 2, 3, 4], "y": [1, 1, 1, 1], "w": [10, 10, 10, 10], "h": [9, 9, 9, 9],
    })
    src.to_csv(root / "list.csv", index=False)
    src.to_parquet(root / "list.parquet")
    for name in ("list.csv", "list.parquet"):
        m = import_table(root / name, path_col="file", label_col="species", split_col="fold", bbox_cols=("x", "y", "w", "h"))
        assert m.root == root.resolve()
        assert m.table["split"].tolist() == ["train", "test", "train", "unlabeled"]
        assert m.class_names == ["jay", "robin"] and m.has_bboxes


def test_table_absolute_paths_and_defaults(tmp_path):
    for k in range(3):
        _img(tmp_path / "a" / f"{k}.jpg")
    pd.DataFrame({"p": [str(tmp_path / "a" / f"{k}.jpg") for k in range(3)], "lab": ["x", "", "y"]}).to_csv(tmp_path / "l.csv", index=False)
    m = import_table(tmp_path / "l.csv", path_col="p", label_col="lab")
    assert m.root == (tmp_path / "a").resolve()
    assert m.table["path"].tolist() == ["0.jpg", "1.jpg", "2.jpg"]
    assert m.table["split"].tolist() == ["train", "unlabeled", "train"]


def test_table_errors(tmp_path):
    pd.DataFrame({"p": ["a.jpg"], "s": ["later"]}).to_csv(tmp_path / "l.csv", index=False)
    with pytest.raises(ManifestError, match="no column"):
        import_table(tmp_path / "l.csv", path_col="path")
    with pytest.raises(ManifestError, match="unknown split"):
        import_table(tmp_path / "l.csv", path_col="p", split_col="s")


def _real_image(path, colour, fmt):
    """A small real JPEG or PNG (with a gradient, so it is not a flat colour)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.linear_gradient("L").resize((40, 30)).convert("RGB")
    Image.blend(img, Image.new("RGB", img.size, colour), 0.5).save(path, format=fmt)


@pytest.mark.parametrize("layout", ["class", "split"])
def test_folder_under_a_dot_folder_imports_and_still_skips_hidden_below_root(tmp_path, layout):
    # ~/.cache/birds-like location: ROOT's ancestors start with ".", which must not hide anything.
    root = tmp_path / ".hidden" / "birds"
    base = root / "train" if layout == "split" else root
    for c, cls in enumerate(("sparrow", "wren", "finch")):
        _real_image(base / cls / "a.jpg", (60 * c, 90, 30), "JPEG")
        _real_image(base / cls / "b.png", (20, 60 * c, 90), "PNG")
    # Hidden things below ROOT are still skipped: a dot file, a dot folder inside a class, a dot class.
    _real_image(base / "sparrow" / ".thumb.jpg", (0, 0, 0), "JPEG")
    _real_image(base / "wren" / ".previews" / "p.png", (0, 0, 0), "PNG")
    _real_image(root / ".cache" / "sparrow" / "c.jpg", (0, 0, 0), "JPEG")
    m = import_folder(root)
    assert m.root == root.resolve()
    assert len(m) == 6 and m.class_names == ["finch", "sparrow", "wren"]
    assert not any("/." in "/" + p for p in m.table["path"]), m.table["path"].tolist()
    assert all(Image.open(m.abspath(p)).size == (40, 30) for p in m.table["path"])


def test_cub_and_table_under_a_dot_folder(tmp_path):
    root = tmp_path / ".data" / "cub"
    root.mkdir(parents=True)
    _write_cub_variant(root, sep="space", base=1, header=False, boxes=False)
    m = import_cub(root)
    assert len(m) == 6 and m.root == root.resolve()
    pd.DataFrame({"file": m.table["path"], "species": m.table["label"]}).to_csv(root / "list.csv", index=False)
    assert len(import_table(root / "list.csv", path_col="file", label_col="species")) == 6
