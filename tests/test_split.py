"""Stratified val/test hold-out."""

from __future__ import annotations

import pandas as pd
import pytest

from finegrain.data.manifest import Manifest
from finegrain.data.split import keep_label_fraction, split_manifest
from finegrain.errors import ManifestError


def _manifest(tmp_path, sizes):
    rows = []
    for c, n in enumerate(sizes):
        rows += [{"image_id": f"{c}_{k}", "path": f"{c}/{k}.jpg", "label": f"class{c}", "split": "train"} for k in range(n)]
    rows.append({"image_id": "t", "path": "t.jpg", "label": "class0", "split": "test"})
    return Manifest.from_table(pd.DataFrame(rows), tmp_path)


def test_stratified_and_every_class_keeps_training_images(tmp_path):
    m = _manifest(tmp_path, [1, 2, 10, 40])
    out = split_manifest(m, val_fraction=0.2, seed=0)
    counts = out.table.groupby(["label", "split"]).size().unstack(fill_value=0)
    assert (counts["train"] >= 1).all()
    assert counts.loc["class0", "train"] == 1 and counts.loc["class0", "test"] == 1  # singleton untouched, test kept
    for label, n in (("class2", 10), ("class3", 40)):
        assert counts.loc[label, "val"] == round(0.2 * n)
    assert len(out) == len(m) and set(out.table["image_id"]) == set(m.table["image_id"])


def test_seed_determines_the_split(tmp_path):
    m = _manifest(tmp_path, [10, 10])
    a = split_manifest(m, val_fraction=0.3, seed=1).table["split"]
    b = split_manifest(m, val_fraction=0.3, seed=1).table["split"]
    c = split_manifest(m, val_fraction=0.3, seed=2).table["split"]
    assert a.equals(b) and not a.equals(c)


def test_test_fraction(tmp_path):
    out = split_manifest(_manifest(tmp_path, [20, 20]), val_fraction=0.1, test_fraction=0.25, seed=0)
    assert out.split_counts() == {"train": 26, "val": 4, "test": 11}


@pytest.mark.parametrize("kwargs", [dict(val_fraction=1.0), dict(val_fraction=-0.1), dict(val_fraction=0.6, test_fraction=0.5)])
def test_bad_fractions(tmp_path, kwargs):
    with pytest.raises(ManifestError):
        split_manifest(_manifest(tmp_path, [4]), **kwargs)


def test_label_fraction_keeps_a_stratified_labelled_subset(tmp_path):
    m = _manifest(tmp_path, [1, 3, 10, 40])
    out = keep_label_fraction(m, 0.1, seed=0)
    t = out.table
    labelled = t[t["split"] == "train"].groupby("label").size()
    assert labelled.to_dict() == {"class0": 1, "class1": 1, "class2": 1, "class3": 4}  # max(1, round(0.1 n))
    unlabeled = t[t["split"] == "unlabeled"]
    assert len(unlabeled) == 54 - 7 and (unlabeled["label"] == "").all()
    assert t[t["split"] == "test"].equals(m.table[m.table["split"] == "test"])  # test untouched
    assert set(t["image_id"]) == set(m.table["image_id"])
    assert keep_label_fraction(m, 1.0, seed=0).table.equals(m.table)
    assert not keep_label_fraction(m, 0.5, seed=1).table.equals(keep_label_fraction(m, 0.5, seed=2).table)
    with pytest.raises(ManifestError):
        keep_label_fraction(m, 0.0)


def test_cli_label_fraction_then_supcon_uses_only_labelled_images(birds, tmp_path):
    from typer.testing import CliRunner

    from finegrain.cli import app

    out = tmp_path / "few.csv"
    r = CliRunner().invoke(app, ["manifest", "split", str(birds.root / "manifest.csv"), "--label-fraction", "0.34",
                                 "--seed", "3", "-o", str(out)])
    assert r.exit_code == 0, r.output
    few = Manifest.load(out)
    assert few.split_counts() == {"train": 8, "unlabeled": 16, "test": 8}  # 4 species x round(0.34 x 6) = 2
    r = CliRunner().invoke(app, ["supcon", "--manifest", str(out), "-o", str(tmp_path / "s"), "--backbone",
                                 "test_efficientnet", "--weights", "none", "--image-size", "32", "--batch-size", "8",
                                 "--classes-per-batch", "4", "--epochs", "1", "--workers", "0", "--wandb", "disabled",
                                 "--no-knn-monitor", "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    from finegrain.artifacts import load_artifact

    assert load_artifact(tmp_path / "s").info["metrics"]["steps"] == 1  # 8 labelled images, batches of 8
