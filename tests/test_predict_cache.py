"""predict reads features through the shared features cache: predicting on the same photos again neither decodes
nor extracts them, and gives the same rows; a file replaced under the same name is read again."""

from __future__ import annotations

import shutil

import pandas as pd

from finegrain.config import SupconConfig
from finegrain.features.store import FeatureStore
from finegrain.stages import predict as predict_stage
from finegrain.stages.predict import run_predict
from finegrain.stages.supcon import run_supcon


def test_second_predict_reads_the_cache_and_gives_the_same_rows(birds, tmp_path, monkeypatch):
    art = run_supcon(SupconConfig(
        manifest=str(birds.root / "manifest.csv"), out=str(tmp_path / "sup"), backbone="test_efficientnet",
        weights="none", image_size=32, batch_size=8, classes_per_batch=4, max_steps=1, workers=0, wandb="disabled",
        cache_dir=str(tmp_path / "cache"), knn_monitor=False, proj_dim=16))
    photos = tmp_path / "garden"
    shutil.copytree(birds.root / "images", photos)
    extracted, checked = [], []
    real_extract, real_check = FeatureStore._extract, predict_stage.check_manifest_or_raise

    def extract(self, rows, index, what):
        extracted.append(len(index))
        return real_extract(self, rows, index, what)

    def check(manifest, **kw):
        checked.append(len(manifest))
        return real_check(manifest, **kw)

    monkeypatch.setattr(FeatureStore, "_extract", extract)
    monkeypatch.setattr(predict_stage, "check_manifest_or_raise", check)
    options = dict(workers=0, features_dir=tmp_path / "features")
    first = run_predict(art.path, [photos], out_csv=tmp_path / "p1.csv", **options)
    assert extracted == [len(birds)] and checked == [len(birds)]
    extracted.clear(), checked.clear()
    second = run_predict(art.path, [photos], out_csv=tmp_path / "p2.csv", **options)
    assert sum(extracted) == 0 and checked == []  # read from the cache: no photo decoded
    pd.testing.assert_frame_equal(first, second)
    assert (tmp_path / "p1.csv").read_bytes() == (tmp_path / "p2.csv").read_bytes()

    # A new photo under an old name (a camera reusing file names) is read again, and only it.
    paths = sorted(photos.rglob("*.jpg"))
    target, other = paths[0], paths[-1]
    shutil.copyfile(other, target)
    extracted.clear()
    third = run_predict(art.path, [photos], **options)
    assert sum(extracted) == 1
    row = third.set_index("path").loc[str(target)]
    assert row["pred_1"] == third.set_index("path").loc[str(other)]["pred_1"]
