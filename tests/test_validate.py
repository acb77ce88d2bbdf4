"""Validation finds every kind of problem and names each file, on synthetic and real birds."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from PIL import Image

from finegrain.data.importers import import_cub
from finegrain.data.manifest import Manifest
from finegrain.data.validate import check_manifest_or_raise, validate_manifest, warning_lines
from finegrain.errors import ManifestError


def _kinds(report):
    return {(p.kind, p.path) for p in report.problems}


def test_clean_dataset_passes(birds):
    report = validate_manifest(birds)
    assert report.ok, [str(p) for p in report.problems]
    assert report.n_images == len(birds)
    assert report.class_counts.shape == (4, 2)
    assert int(report.class_counts.to_numpy().sum()) == len(birds)


def test_every_problem_is_reported_by_path(birds):
    t = birds.table.copy()
    root = birds.root
    train = t[t["split"] == "train"]["path"].tolist()
    test = t[t["split"] == "test"]["path"].tolist()
    missing, corrupt, text, dup_test = train[0], train[1], train[2], test[0]
    (root / missing).unlink()
    data = (root / corrupt).read_bytes()
    (root / corrupt).write_bytes(data[: len(data) // 2])
    (root / text).write_text("not a bird")
    shutil.copy(root / train[3], root / dup_test)  # the same image in train and test
    shutil.copy(root / train[4], root / train[5])  # a duplicate inside train: a warning
    Image.new("RGB", (50, 50)).save(root.parent / "outside.jpg")
    extra = pd.DataFrame([
        {"image_id": "esc", "path": "../outside.jpg", "label": t["label"][0], "split": "train"},
        {"image_id": "new", "path": test[1], "label": "ghost_species", "split": "test"},
    ])
    t = t[t["path"] != test[1]]
    t = pd.concat([t, extra], ignore_index=True)
    t["bbox_x"], t["bbox_y"], t["bbox_w"], t["bbox_h"] = 2.0, 2.0, 20.0, 20.0
    outside, clipped, zero = train[6], train[7], test[2]
    t.loc[t["path"] == outside, ["bbox_x", "bbox_y"]] = 500.0
    t.loc[t["path"] == clipped, "bbox_w"] = 80.0
    t.loc[t["path"] == zero, "bbox_w"] = 0.0
    report = validate_manifest(Manifest.from_table(t, root))
    found = _kinds(report)
    for expected in [
        ("missing_file", missing), ("bad_image", corrupt), ("bad_image", text),
        ("path_escapes_root", "../outside.jpg"), ("bad_bbox", outside), ("bad_bbox", zero),
        ("bbox_clipped", clipped), ("duplicate_image", train[4]),
    ]:
        assert expected in found, (expected, sorted(found))
    overlap = [p for p in report.errors if p.kind == "train_test_overlap"]
    assert len(overlap) == 1 and dup_test in str(overlap[0]) and train[3] in str(overlap[0])
    unseen = [p for p in report.errors if p.kind == "class_without_train"]
    assert len(unseen) == 1 and "ghost_species" in unseen[0].message
    assert not report.ok
    assert report.bad_files == {missing, corrupt, text, "../outside.jpg"}
    # Classes without training images are only a warning for the zero-shot protocol.
    relaxed = validate_manifest(Manifest.from_table(t, root), allow_unseen_classes=True)
    assert all(p.severity == "warning" for p in relaxed.problems if p.kind == "class_without_train")


def test_check_before_training_skips_or_stops(birds):
    bad = birds.table["path"][0]
    (birds.root / bad).write_bytes(b"")
    with pytest.raises(ManifestError, match="empty file"):
        check_manifest_or_raise(birds, on_bad_image="error", progress=False)
    kept, report = check_manifest_or_raise(birds, on_bad_image="skip", progress=False)
    assert len(kept) == len(birds) - 1 and bad not in set(kept.table["path"])
    # Skipping bad files does not hide table-level errors.
    t = birds.table.copy()
    t.loc[t["split"] == "test", "label"] = "only_in_test"
    with pytest.raises(ManifestError, match="no training images"):
        check_manifest_or_raise(Manifest.from_table(t, birds.root), on_bad_image="skip", progress=False)
    # Stages allow them (left out of training, unknown to evaluate and predict): check_manifest_or_raise as they call it.
    kept, report = check_manifest_or_raise(Manifest.from_table(t, birds.root), on_bad_image="skip", progress=False,
                                           allow_unseen_classes=True)
    assert len(kept) == len(t) - 1 and {p.kind for p in report.warnings} == {"class_without_train"}


def test_warnings_of_one_kind_are_one_line(birds):
    t = birds.table.copy()
    firsts = t[t["split"] == "train"].groupby("label").head(1).index  # each species keeps one train photo
    t = t[(t["split"] != "train") | t.index.isin(firsts)].reset_index(drop=True)
    report = validate_manifest(Manifest.from_table(t, birds.root), decode=False)
    few = [p for p in report.warnings if p.kind == "few_images"]
    assert len(few) == 4
    lines = warning_lines(report.warnings)
    assert len(lines) == 1 and lines[0].startswith("4 x few images:")


def test_real_cub50_passes(cub50):
    report = validate_manifest(import_cub(cub50))
    assert report.ok, [str(p) for p in report.errors[:5]]
    assert report.n_images == 2952 and len(report.class_counts) == 50


def test_broken_copy_of_real_cub_reports_each_file(cub50, tmp_path):
    full = import_cub(cub50)
    keep = full.class_names[:3]
    t = full.table[full.table["label"].isin(keep)].reset_index(drop=True)
    for rel in t["path"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(cub50 / rel, tmp_path / rel)
    m = Manifest.from_table(t, tmp_path)
    train = t[t["split"] == "train"]["path"].tolist()
    test = t[t["split"] == "test"]["path"].tolist()
    data = (tmp_path / train[0]).read_bytes()
    (tmp_path / train[0]).write_bytes(data[: len(data) // 3])
    (tmp_path / train[1]).unlink()
    shutil.copy(tmp_path / train[2], tmp_path / test[0])
    report = validate_manifest(m)
    found = _kinds(report)
    assert ("bad_image", train[0]) in found and ("missing_file", train[1]) in found
    assert ("train_test_overlap", train[2]) in found
    assert len(report.errors) == 3, [str(p) for p in report.errors]
