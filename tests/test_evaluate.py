"""`finegrain evaluate` end to end: real images, features, probes, report files, cache, W&B, CLI."""

from __future__ import annotations

import html.parser
import json
import shutil

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from finegrain.artifacts import load_artifact
from finegrain.cli import app
from finegrain.config import EvaluateConfig, SupconConfig
from finegrain.data.manifest import Manifest
from finegrain.errors import FinegrainError
from finegrain.features.feature_file import read_rows
from finegrain.eval.knn import knn_scores, topk_accuracy
from finegrain.stages import evaluate as evaluate_stage
from finegrain.stages.evaluate import METRIC_KEYS, run_evaluate
from finegrain.stages.supcon import run_supcon


def _cfg(manifest_path, tmp_path, name="eval", **kw):
    base = dict(manifest=str(manifest_path), out=str(tmp_path / name), backbone="test_efficientnet", weights="none",
                image_size=32, workers=0, wandb="disabled", cache_dir=str(tmp_path / "cache"))
    base.update(kw)
    return EvaluateConfig(**base)


def test_bare_backbone_report_and_metrics(birds, tmp_path):
    art = run_evaluate(_cfg(birds.root / "manifest.csv", tmp_path))
    report = art.path / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["knn_top1"] <= metrics["knn_top5"] and metrics["linear_top1"] <= metrics["linear_top5"]
    assert metrics["recall_at_1"] <= metrics["recall_at_2"] <= metrics["recall_at_4"] <= metrics["recall_at_8"]
    for name in ("index.html", "per_class.csv", "confused_pairs.csv", "confusion_matrix.png", "per_class_accuracy.png",
                 "embedding_map.png"):
        assert (report / name).stat().st_size > 0, name
    per_class = pd.read_csv(report / "per_class.csv")
    assert sorted(per_class["class"]) == birds.class_names
    assert per_class["images"].sum() == len(birds.select("test"))
    page = (report / "index.html").read_text()
    html.parser.HTMLParser().feed(page)
    assert "confusion_matrix.png" in page and f"{100 * metrics['knn_top1']:.1f}%" in page
    assert art.info["stage"] == "evaluate" and load_artifact(art.path).info["metrics"]["knn_top1"] == metrics["knn_top1"]


def test_knn_metric_matches_the_cached_features(birds, tmp_path):
    art = run_evaluate(_cfg(birds.root / "manifest.csv", tmp_path, linear=False, knn_k=5,
                            features_dir=str(tmp_path / "eval" / "features")))
    feats = {p.name.split("-")[0]: read_rows(p) for p in (art.path / "features").glob("*.npy")}
    classes = birds.class_names
    codes = lambda split: torch.tensor([classes.index(v) for v in birds.select(split).table["label"]])  # noqa: E731
    scores = knn_scores(feats["train"], codes("train"), feats["test"], num_classes=len(classes), k=5)
    assert art.info["metrics"]["knn_top1"] == pytest.approx(topk_accuracy(scores, codes("test"))[1])
    assert art.info["metrics"]["linear_top1"] is None


def test_the_ivfpq_index_runs_knn_and_retrieval_and_agrees_with_flat_when_it_sees_every_photo(birds, tmp_path):
    # a few hundred photos: every inverted list is probed and every candidate re-ranked, so the search is exact
    flat = run_evaluate(_cfg(birds.root / "manifest.csv", tmp_path, linear=False, embedding_map=False, index="flat",
                             features_dir=str(tmp_path / "eval" / "features")))
    ivfpq = run_evaluate(_cfg(birds.root / "manifest.csv", tmp_path, name="eval_ivfpq", linear=False,
                              embedding_map=False, index="ivfpq", features_dir=str(flat.path / "features")))
    context = json.loads((ivfpq.path / "report" / "metrics.json").read_text())["context"]
    assert context["index"] == "ivfpq"
    for key in ("knn_top1", "knn_top5", "recall_at_1", "map_at_r"):
        assert ivfpq.info["metrics"][key] == pytest.approx(flat.info["metrics"][key], abs=1e-6), key


def test_second_run_reuses_features_and_a_new_model_does_not(birds, tmp_path, monkeypatch):
    cfg = _cfg(birds.root / "manifest.csv", tmp_path)
    run_evaluate(cfg)
    calls = []
    real = evaluate_stage.FeatureStore.features

    def spy(self, rows, what):
        before = self.extracted
        out = real(self, rows, what)
        calls.append(self.extracted - before)
        return out

    monkeypatch.setattr(evaluate_stage.FeatureStore, "features", spy)
    again = run_evaluate(_cfg(birds.root / "manifest.csv", tmp_path, knn_k=3))
    assert calls and sum(calls) == 0 and again.info["metrics"]["knn_top1"] is not None
    calls.clear()
    run_evaluate(_cfg(birds.root / "manifest.csv", tmp_path, image_size=48))
    assert sum(calls) > 0  # another image size is another feature set


def test_evaluates_a_supcon_artifact_at_its_test_size_and_records_the_parent(birds, tmp_path):
    sup = run_supcon(SupconConfig(
        manifest=str(birds.root / "manifest.csv"), out=str(tmp_path / "sup"), backbone="test_efficientnet",
        weights="none", image_size=40, batch_size=8, classes_per_batch=4, epochs=1, workers=0, wandb="disabled",
        cache_dir=str(tmp_path / "cache"), knn_monitor=False, proj_dim=16))
    art = run_evaluate(_cfg(birds.root / "manifest.csv", tmp_path, from_artifact=str(sup.path), image_size=None,
                            embedding_map=False))
    assert art.info["image_size"] == 45 and art.info["parent"]["hash"] == sup.hash  # FixRes: 1.125 x 40
    assert not (art.path / "report" / "embedding_map.png").exists()
    # An evaluate folder stands for the model it evaluated, read at the evaluation's image size.
    again = run_evaluate(_cfg(birds.root / "manifest.csv", tmp_path, "again", from_artifact=str(art.path),
                              image_size=None, embedding_map=False))
    assert again.info["parent"]["hash"] == sup.hash and again.info["image_size"] == 45
    with pytest.raises(FinegrainError, match=r"holds a finished artifact \(supcon\)"):
        run_evaluate(_cfg(birds.root / "manifest.csv", tmp_path, "sup"))


def test_unseen_test_classes_leave_knn_but_count_in_retrieval(birds, tmp_path):
    table = birds.table.copy()
    unseen = birds.class_names[0]
    table = table[~((table["label"] == unseen) & (table["split"] == "train"))]
    path = birds.root / "zero_shot.csv"
    Manifest(table.reset_index(drop=True), birds.root).save(path)
    art = run_evaluate(_cfg(path, tmp_path))
    ctx = json.loads((art.path / "report" / "metrics.json").read_text())["context"]
    n_test = int((table["split"] == "test").sum())
    n_unseen = int(((table["split"] == "test") & (table["label"] == unseen)).sum())
    assert ctx["query_images"] == n_test - n_unseen and ctx["classes"] == len(birds.class_names) - 1
    # A count, not a metric: in the context as a whole number, not among the headline metrics.
    assert ctx["retrieval_queries"] == n_test and isinstance(ctx["retrieval_queries"], int)
    assert "retrieval_queries" not in art.info["metrics"]
    html = (art.path / "report" / "index.html").read_text()
    headline = html[html.index('id="headline"'):html.index('id="context"')]
    assert "retrieval_queries" not in headline


def test_wandb_offline_run_and_report_logged(birds, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    art = run_evaluate(_cfg(birds.root / "manifest.csv", tmp_path, wandb="offline", embedding_map=False))
    assert list((art.path / "wandb").glob("offline-run-*")) and art.info["wandb_run_id"]


def test_cli_evaluate(birds, tmp_path):
    args = ["evaluate", "--manifest", str(birds.root / "manifest.csv"), "-o", str(tmp_path / "e"), "--backbone",
            "test_efficientnet", "--weights", "none", "--image-size", "32", "--workers", "0", "--wandb", "disabled",
            "--cache-dir", str(tmp_path / "c"), "--no-embedding-map", "--knn-k", "3", "--knn-t", "0.1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "index.html" in r.output and "knn_top1" in r.output
    r = CliRunner().invoke(app, args[:-4] + ["--knn-k", "0"])
    assert r.exit_code == 2 and "--knn-k" in r.output


@pytest.mark.slow
def test_frozen_imagenet_features_recognise_real_birds(cub50, tmp_path):
    """Offline ImageNet lite0 on 10 real CUB species: kNN and the linear probe far above chance (0.1)."""
    from finegrain.data.importers import import_cub

    full = import_cub(cub50)
    keep = full.class_names[:10]
    subset = Manifest(full.table[full.table["label"].isin(keep)].reset_index(drop=True), full.root)
    path = tmp_path / "cub10.csv"
    subset.save(path)
    art = run_evaluate(_cfg(path, tmp_path, backbone="tf_efficientnet_lite0", weights="builtin", image_size=96,
                            workers=2, embedding_map=False))
    m = art.info["metrics"]
    assert m["knn_top1"] > 0.5 and m["linear_top1"] > 0.5 and m["recall_at_1"] > 0.5, m
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


def test_flip_tta_reaches_the_features(birds, tmp_path):
    """--flip-tta averages each image's features with its mirror image's: other features, other cache files."""
    plain = run_evaluate(_cfg(birds.root / "manifest.csv", tmp_path, "plain", embedding_map=False, linear=False,
                              flip_tta=False, features_dir=str(tmp_path / "plain" / "features")))
    flipped = run_evaluate(_cfg(birds.root / "manifest.csv", tmp_path, "flip", embedding_map=False, linear=False,
                                flip_tta=True, features_dir=str(tmp_path / "flip" / "features")))
    a = sorted((plain.path / "features").glob("test-*.npy"))
    b = sorted((flipped.path / "features").glob("test-*.npy"))
    assert a and b and a[0].name != b[0].name
    assert not torch.allclose(read_rows(a[0]), read_rows(b[0]))
    assert json.loads((flipped.path / "report" / "metrics.json").read_text())["context"]["flip_tta"] is True


def test_the_artifact_classifier_metric_is_what_predict_answers(birds, tmp_path):
    """classifier_top1/5 in metrics.json equal the accuracy of `predict`'s pred_1 (open set off) and its top 5 on the
    same test photos; the comparison shows the frozen start for it too (its linear probe)."""
    from finegrain.stages.predict import run_predict

    sup = run_supcon(SupconConfig(
        manifest=str(birds.root / "manifest.csv"), out=str(tmp_path / "sup"), backbone="test_efficientnet",
        weights="none", image_size=40, batch_size=8, classes_per_batch=4, epochs=1, workers=0, wandb="disabled",
        cache_dir=str(tmp_path / "cache"), knn_monitor=False, proj_dim=16))
    art = run_evaluate(_cfg(birds.root / "manifest.csv", tmp_path, from_artifact=str(sup.path), image_size=None,
                            embedding_map=False, compare="frozen"))
    metrics = json.loads((art.path / "report" / "metrics.json").read_text())
    test = birds.rows("test")
    preds = run_predict(sup.path, [birds.root / p for p in test.table["path"]], top_k=5, device="cpu", workers=0,
                        open_set=False)
    truth = dict(zip((str(birds.root / p) for p in test.table["path"]), test.table["label"]))
    named = preds["path"].map(truth)
    assert metrics["classifier_top1"] == pytest.approx((preds["pred_1"] == named).mean())
    ranked = [c for c in preds.columns if c.startswith("pred_")]  # top 5 of 4 species: all 4
    assert metrics["classifier_top5"] == pytest.approx(pd.concat([preds[c] == named for c in ranked], axis=1).any(axis=1).mean())
    frozen = metrics["baselines"]["frozen"]
    assert frozen["classifier_top1"] == frozen["linear_top1"] and frozen["knn_pseudo_top1"] == frozen["knn_top1"]
    assert metrics["knn_pseudo_top1"] is None  # a supcon artifact carries no pseudo-labelled photos
