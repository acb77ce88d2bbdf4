"""evaluate's "Compared with": the frozen start and the lineage, measured on the same photos as the artifact."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from finegrain.config import EvaluateConfig, PretrainConfig, SupconConfig
from finegrain.stages.evaluate import run_evaluate
from finegrain.stages.pretrain import run_pretrain
from finegrain.stages.supcon import run_supcon

SMALL = dict(backbone="test_efficientnet", weights="none", image_size=32, batch_size=8, workers=0, wandb="disabled",
             knn_monitor=False, proj_dim=16, proj_hidden=32)


@pytest.fixture
def chain(birds, tmp_path):
    """pretrain -> supcon on the synthetic birds (random starting weights, seed 0)."""
    manifest = str(birds.root / "manifest.csv")
    pre = run_pretrain(PretrainConfig(manifest=manifest, out=str(tmp_path / "pre"), epochs=1, method="simclr",
                                      cache_dir=str(tmp_path / "cache"), **SMALL))
    sup = run_supcon(SupconConfig(manifest=manifest, out=str(tmp_path / "sup"), from_artifact=str(pre.path),
                                  classes_per_batch=4, epochs=2, cache_dir=str(tmp_path / "cache"),
                                  **{k: v for k, v in SMALL.items() if k not in ("backbone", "weights")}))
    return manifest, pre, sup


def _evaluate(tmp_path, name, **kw) -> dict:
    cfg = dict(workers=0, wandb="disabled", embedding_map=False, image_size=36, cache_dir=str(tmp_path / "cache"))
    art = run_evaluate(EvaluateConfig(out=str(tmp_path / name), **{**cfg, **kw}))
    return json.loads((art.path / "report" / "metrics.json").read_text())


def test_the_report_compares_with_the_frozen_start_and_each_earlier_artifact(chain, tmp_path):
    manifest, pre, sup = chain
    report = _evaluate(tmp_path, "e", manifest=manifest, from_artifact=str(sup.path))
    assert report["chance"] == pytest.approx(1 / 4)
    assert set(report["baselines"]) == {"frozen", "pretrain"}
    # each baseline is what evaluating it alone on the same photos at the same size gives
    alone = _evaluate(tmp_path, "p", manifest=manifest, from_artifact=str(pre.path), compare="none")
    frozen = _evaluate(tmp_path, "f", manifest=manifest, backbone="test_efficientnet", weights="none")
    for key in ("knn_top1", "linear_top1", "recall_at_1", "map_at_r"):
        assert report["baselines"]["pretrain"][key] == pytest.approx(alone[key])
        assert report["baselines"]["frozen"][key] == pytest.approx(frozen[key])
    assert alone["baselines"] == {} and frozen["baselines"] == {}  # nothing to compare a bare backbone with
    page = (tmp_path / "e" / "report" / "index.html").read_text()
    assert "Compared with" in page and "chance (1 of 4 species)" in page and "kNN top-1" in page

    only = _evaluate(tmp_path, "o", manifest=manifest, from_artifact=str(sup.path), compare="frozen")
    assert set(only["baselines"]) == {"frozen"}


def test_a_lineage_whose_earlier_artifact_is_gone_compares_with_what_is_left(chain, tmp_path):
    manifest, pre, sup = chain
    shutil.rmtree(pre.path)
    report = _evaluate(tmp_path, "e", manifest=manifest, from_artifact=str(sup.path))
    assert report["baselines"] == {}  # the start is only known through the pretrain artifact
    assert report["knn_top1"] is not None


def _photos(birds):
    from finegrain.report.photo_sections import Photos

    train, test = birds.rows("train"), birds.rows("test")
    classes = birds.class_names
    y = test.class_codes(classes).numpy()
    pred = y.copy()
    pred[:3] = (y[:3] + 1) % len(classes)  # three mistakes, the second the surest
    confidence = np.linspace(0.5, 0.9, len(y))
    confidence[1] = 0.99
    return Photos(classes, [str(test.abspath(p)) for p in test.table["path"]], y, pred, confidence,
                  [str(train.abspath(p)) for p in train.table["path"]], train.class_codes(classes).numpy())


def test_the_photo_sections_show_the_surest_mistakes_and_the_confused_species(birds):
    from finegrain.report.tables import confused_pairs
    from finegrain.report.photo_sections import confident_mistakes, correct_examples, sections_html

    photos = _photos(birds)
    mistakes = confident_mistakes(photos)
    assert len(mistakes) == 3 and mistakes["photo"][0] == photos.query_paths[1]
    assert list(mistakes["confidence"]) == sorted(mistakes["confidence"], reverse=True)
    assert (mistakes["true"] != mistakes["predicted"]).all()
    examples = correct_examples(photos, 2)
    assert examples.groupby("species").size().max() <= 2
    assert set(examples["photo"]).isdisjoint(mistakes["photo"])
    pairs = confused_pairs(photos.y_true, photos.y_pred, photos.classes)
    page = "".join(sections_html(photos, pairs, examples_per_class=1).values())
    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    # per pair 3 + 3 train photos, the 3 mistakes, one correct photo per species that has one
    assert len(uris) == 6 * len(pairs) + 3 + len(correct_examples(photos, 1))
    assert all(Image.open(io.BytesIO(base64.b64decode(u))).size[0] <= 96 for u in uris)
