"""Stratified val/test hold-out."""

from __future__ import annotations

import pandas as pd
import pytest

from finegrain.data.manifest import Manifest
from finegrain.data.split import split_manifest
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
