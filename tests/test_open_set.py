"""Unknown species: the open-set scores and metrics, their calibration in supcon artifacts, predict and evaluate."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from finegrain.artifacts import ARTIFACT_FILE
from finegrain.cli import app
from finegrain.config import ConfigError, EvaluateConfig, SupconConfig
from finegrain.data.manifest import Manifest
from finegrain.data.synthetic import ALL_SPECIES, render_bird, sample_nuisance
from finegrain.errors import FinegrainError
from finegrain.features.feature_file import read_rows
from finegrain.eval.linear import stratified_holdout
from finegrain.eval.open_set import (LABELS_KEY, REFERENCE_KEY, RIDGE, OpenSetReference, RelativeMahalanobis,
                                     calibrate_threshold, choose_k, fit_open_set, knn_distance_scores,
                                     max_logit_scores, max_softmax_scores, open_set_metrics)
from finegrain.stages.evaluate import run_evaluate
from finegrain.stages.predict import UNKNOWN, run_predict
from finegrain.stages.supcon import run_supcon

# --- the scores and metrics -------------------------------------------------------------------


def _kth_distance_by_loop(train: torch.Tensor, query: torch.Tensor, k: int) -> torch.Tensor:
    train = [t / t.norm() for t in train.double()]
    out = []
    for q in query.double():
        q = q / q.norm()
        out.append(sorted(float((q - t).norm()) for t in train)[min(k, len(train)) - 1])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 3, 37, 100])
def test_knn_distance_is_the_kth_nearest_normalised_distance(k):
    g = torch.Generator().manual_seed(k)
    train, query = torch.randn(37, 8, generator=g) * 3, torch.randn(11, 8, generator=g)
    got = knn_distance_scores(train, query, k)
    assert got.shape == (11,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _kth_distance_by_loop(train, query, k), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        knn_distance_scores(train, query, 0)


def _relative_mahalanobis_by_hand(train: np.ndarray, labels: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Ren et al.'s relative Mahalanobis distance with explicit inverses, one photo and class at a time."""
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    x, q = unit(train.astype(np.float64)), unit(query.astype(np.float64))
    means = {c: x[labels == c].mean(0) for c in np.unique(labels)}
    within = np.cov(np.stack([x[i] - means[c] for i, c in enumerate(labels)]).T)
    ridge = RIDGE * np.trace(within) / len(within) * np.eye(len(within))
    p_class, p_all = np.linalg.inv(within + ridge), np.linalg.inv(np.cov(x.T) + ridge)
    centre = x.mean(0)
    return np.array([min((v - m) @ p_class @ (v - m) for m in means.values()) - (v - centre) @ p_all @ (v - centre)
                     for v in q])


@pytest.mark.parametrize("dim", [5, 40])  # fewer photos than dimensions too: the ridge keeps it defined
def test_relative_mahalanobis_matches_the_definition(dim):
    g = torch.Generator().manual_seed(dim)
    centres = torch.randn(3, dim, generator=g) * 2
    labels = torch.arange(30) % 3
    train, query = centres[labels] + torch.randn(30, dim, generator=g), torch.randn(7, dim, generator=g)
    got = RelativeMahalanobis.fit(train, labels).scores(query)
    assert got.shape == (7,) and got.dtype == torch.float32
    want = _relative_mahalanobis_by_hand(train.numpy(), labels.numpy(), query.numpy())
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_relative_mahalanobis_scores_a_new_cluster_above_the_known_ones():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g) * 3
    labels = torch.arange(200) % 4  # the fifth centre is an unknown species
    model = RelativeMahalanobis.fit(centres[labels] + torch.randn(200, 16, generator=g), labels)
    known = model.scores(centres[torch.arange(40) % 4] + torch.randn(40, 16, generator=g))
    unknown = model.scores(centres[4] + torch.randn(40, 16, generator=g))
    assert open_set_metrics(known, unknown)["auroc"] > 0.95


def test_logit_baselines_are_larger_for_less_confident_rows():
    logits = torch.tensor([[4.0, 0.0, -1.0], [0.3, 0.2, 0.1], [1.0, 1.0, 1.0]])
    probs = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    np.testing.assert_allclose(max_softmax_scores(logits).numpy(), -probs.max(1), rtol=1e-6)
    np.testing.assert_allclose(max_logit_scores(logits).numpy(), -logits.numpy().max(1))
    assert max_softmax_scores(logits)[0] < max_softmax_scores(logits)[1] < max_softmax_scores(logits)[2]


@pytest.mark.parametrize("n", [1, 20, 101, 1000])
def test_calibrated_threshold_keeps_95_percent_of_known_scores(n):
    scores = np.random.default_rng(n).normal(size=n)
    t = calibrate_threshold(torch.from_numpy(scores))
    assert t in scores
    assert (scores <= t).mean() >= 0.95 and (scores < t).mean() < 0.95  # the smallest such threshold
    assert (scores <= t).sum() == math.ceil(0.95 * n)
    assert calibrate_threshold(scores, keep=1.0) == scores.max()
    with pytest.raises(ValueError):
        calibrate_threshold(scores, keep=0)


def test_open_set_metrics_by_hand():
    known, unknown = [0.1, 0.2, 0.3, 0.4], [0.25, 0.5, 0.3]
    pairs = [(u > k) + 0.5 * (u == k) for u in unknown for k in known]  # P(unknown scores above known)
    threshold = sorted(known)[math.ceil(0.95 * len(known)) - 1]  # accepts >= 95% of known photos
    got = open_set_metrics(torch.tensor(known), torch.tensor(unknown))
    assert got["auroc"] == pytest.approx(sum(pairs) / len(pairs))
    assert got["fpr95"] == pytest.approx(np.mean([u <= threshold for u in unknown]))  # unknown wrongly accepted


def test_open_set_metrics_at_the_extremes():
    rng = np.random.default_rng(0)
    known = rng.normal(size=2000)
    apart = open_set_metrics(known, known.max() + 0.1 + rng.random(300))
    assert apart == {"auroc": 1.0, "fpr95": 0.0}
    same = open_set_metrics(known, rng.normal(size=2000))
    assert abs(same["auroc"] - 0.5) < 0.05 and abs(same["fpr95"] - 0.95) < 0.05
    with pytest.raises(ValueError):
        open_set_metrics(known, [])


def test_choose_k_stays_below_a_typical_class_size():
    assert choose_k(5, torch.tensor([0] * 3 + [1] * 10 + [2] * 10)) == 5
    assert choose_k(5, torch.tensor([0, 0, 1, 1, 2, 2, 2])) == 2
    assert choose_k(5, torch.tensor([0, 1, 2])) == 1


def test_fit_open_set_on_val_uses_all_train_as_reference():
    g = torch.Generator().manual_seed(1)
    x, y, val = torch.randn(40, 6, generator=g), torch.arange(40) % 4, torch.randn(9, 6, generator=g)
    ref = fit_open_set(x, y, val, k=3, score="knn_distance")
    assert ref.calibrated_on == "val" and ref.k == 3 and ref.features.dtype == torch.float16
    torch.testing.assert_close(ref.features.float(), F.normalize(x, dim=1), atol=1e-3, rtol=0)
    assert ref.threshold == calibrate_threshold(knn_distance_scores(ref.features, val, 3))
    assert ref.info() == {"score": "knn_distance", "k": 3, "threshold": ref.threshold, "calibrated_on": "val",
                          "keep": 0.95}
    rmd = fit_open_set(x, y, val, k=3)  # the default score
    assert rmd.score == "relative_mahalanobis" and torch.equal(rmd.labels, y)
    assert rmd.threshold == calibrate_threshold(RelativeMahalanobis.fit(rmd.features, y).scores(val))
    back = OpenSetReference.from_artifact(rmd.info(), rmd.tensors())  # as predict reads it from the artifact
    torch.testing.assert_close(back.scores(val), rmd.scores(val))
    old = OpenSetReference.from_artifact(ref.info(), {REFERENCE_KEY: ref.features})  # an artifact without labels
    assert old.score == "knn_distance" and LABELS_KEY not in old.tensors()


def test_fit_open_set_without_val_holds_out_train_photos_from_the_reference():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 6, generator=g), torch.arange(40) % 4
    ref = fit_open_set(x, y, None, k=50, seed=7, score="knn_distance")
    fit_idx, held_idx = stratified_holdout(y.numpy(), 7)
    assert ref.calibrated_on == "train hold-out" and len(ref.features) == len(fit_idx) < 40
    assert ref.k == choose_k(50, y[fit_idx])
    # no held-out photo is in the reference, so none is its own neighbour
    nearest = knn_distance_scores(ref.features, x[held_idx], 1)
    assert (nearest > 1e-2).all()
    assert ref.threshold == calibrate_threshold(knn_distance_scores(ref.features, x[held_idx], ref.k))
    assert fit_open_set(x[:4], torch.arange(4), None) is None  # one photo a class: nothing to hold out


def test_open_set_k_is_checked():
    with pytest.raises(ConfigError, match="open_set_k"):
        SupconConfig(open_set_k=0)


# --- supcon, predict, evaluate on synthetic birds ----------------------------------------------

KNOWN = [s for s in ALL_SPECIES if s.crown == "red" and s.breast == "plain" and s.bill == "short"]  # 4 species
HELD_OUT = next(s for s in ALL_SPECIES if (s.crown, s.breast, s.bill, s.wing_bar, s.eye_ring) ==
                ("blue", "streaked", "long", True, True))


@pytest.fixture(scope="module")
def open_birds(tmp_path_factory):
    """10 photos each of 4 species (6 train, 2 val, 2 test) and of a 5th, unseen one (all test).

    Nuisance is small (one background and pose, a few pixels of shift, sensor noise), so the
    species are what tells photos apart even for a randomly initialised backbone.
    """
    root = tmp_path_factory.mktemp("open_birds")
    rng = np.random.default_rng(0)
    base = dataclasses.replace(sample_nuisance(rng), angle=0.0, scale=1.0, cx=0.5, cy=0.5)
    rows = []
    for species in KNOWN + [HELD_OUT]:
        (root / "images" / species.name).mkdir(parents=True)
        for i in range(10):
            shift = rng.uniform(-0.02, 0.02, 2)
            nuisance = dataclasses.replace(base, noise_seed=int(rng.integers(2**31)), cx=0.5 + shift[0],
                                           cy=0.5 + shift[1])
            rel = f"images/{species.name}/{i}.jpg"
            render_bird(species, nuisance, 64).save(root / rel)
            split = "test" if species == HELD_OUT or i >= 8 else "val" if i >= 6 else "train"
            rows.append({"image_id": rel, "path": rel, "label": species.name, "split": split})
    table = pd.DataFrame(rows)
    Manifest.from_table(table, root).save(root / "all.csv")
    Manifest.from_table(table[table["label"] != HELD_OUT.name], root).save(root / "known.csv")
    return Manifest.from_table(table, root)


def _supcon_cfg(manifest_path, out, **kw):
    base = dict(manifest=str(manifest_path), out=str(out), backbone="test_efficientnet", weights="none", image_size=32,
                batch_size=8, classes_per_batch=4, max_steps=2, workers=0, wandb="disabled",
                cache_dir=str(out.parent / "cache"), knn_monitor=False, proj_dim=32, proj_hidden=64)
    base.update(kw)
    return SupconConfig(**base)


@pytest.fixture(scope="module")
def open_artifact(open_birds, tmp_path_factory):
    """A supcon artifact trained for 2 steps on the 4 known species.

    Without the decoded-image cache, supcon reads photos exactly as predict does (the cache's resize
    to 1/0.875 x the image size first moves these tiny distances by more than their spread).
    """
    return run_supcon(_supcon_cfg(open_birds.root / "known.csv", tmp_path_factory.mktemp("open_art") / "s",
                                  cache_images=False))


def _photos(manifest: Manifest, split: str, species=None) -> list:
    t = manifest.table
    keep = (t["split"] == split) & (t["label"].isin([s.name for s in species]) if species else True)
    return [manifest.root / p for p in t.loc[keep, "path"]]


def test_supcon_stores_the_calibration_and_predict_accepts_the_val_photos(open_birds, open_artifact):
    stored = open_artifact.info["open_set"]
    assert stored["score"] == "relative_mahalanobis" and stored["calibrated_on"] == "val" and stored["keep"] == 0.95
    assert 1 <= stored["k"] <= 5
    weights = load_file(open_artifact.path / "model.safetensors")
    reference, labels = weights[REFERENCE_KEY], weights[LABELS_KEY]
    train = open_birds.rows("train")
    assert reference.shape == (len(train), open_artifact.info["embedding_dim"]) and reference.dtype == torch.float16
    assert torch.equal(labels, train.class_codes(open_artifact.info["class_names"]).long())
    torch.testing.assert_close(reference.float().norm(dim=1), torch.ones(len(train)), atol=2e-3, rtol=0)
    # the threshold accepts >= 95% of the val photos it was calibrated on (8 photos: all of them)
    val = run_predict(open_artifact.path, _photos(open_birds, "val"), workers=0)
    assert (val["unknown_score"] <= stored["threshold"] + 1e-4).all()


def test_predict_marks_photos_of_an_unseen_species_unknown(open_birds, open_artifact, tmp_path):
    held = _photos(open_birds, "test", [HELD_OUT])
    known = _photos(open_birds, "test", KNOWN)
    df = run_predict(open_artifact.path, held + known, top_k=3, out_csv=tmp_path / "p.csv", workers=0)
    written = pd.read_csv(tmp_path / "p.csv")
    assert list(written.columns) == ["path", "pred_1", "pred_2", "pred_3", "score_1", "score_2", "score_3",
                                     "nearest_species", "unknown_score", "known", "error"]
    is_held = df["path"].isin([str(p) for p in held])
    unknown_rate = {group: float((~df.loc[is_held == group, "known"].astype(bool)).mean()) for group in (True, False)}
    assert unknown_rate[True] > unknown_rate[False], unknown_rate
    threshold = open_artifact.info["open_set"]["threshold"]
    assert (df["known"] == (df["unknown_score"] <= threshold)).all()
    assert ((df["pred_1"] == UNKNOWN) == ~df["known"].astype(bool)).all()
    assert set(df["nearest_species"]) <= {s.name for s in KNOWN}
    assert (df.loc[df["known"].astype(bool), "pred_1"] == df.loc[df["known"].astype(bool), "nearest_species"]).all()


def test_open_set_off_restores_the_plain_columns(open_birds, open_artifact):
    photos = _photos(open_birds, "test")
    on = run_predict(open_artifact.path, photos, top_k=2, workers=0)
    off = run_predict(open_artifact.path, photos, top_k=2, workers=0, open_set=False)
    assert list(off.columns) == ["path", "pred_1", "pred_2", "score_1", "score_2", "error"]
    assert off["pred_1"].tolist() == on["nearest_species"].tolist()
    assert off[["path", "pred_2", "score_1", "score_2", "error"]].equals(on[["path", "pred_2", "score_1", "score_2",
                                                                             "error"]])


def test_older_artifacts_predict_as_before_and_refuse_open_set_on(open_birds, open_artifact, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(open_artifact.path, old)
    info = json.loads((old / ARTIFACT_FILE).read_text())
    del info["open_set"]  # as written before open-set scoring
    (old / ARTIFACT_FILE).write_text(json.dumps(info))
    photos = _photos(open_birds, "test")[:3]
    assert "known" not in run_predict(old, photos, workers=0).columns
    with pytest.raises(FinegrainError, match="--open-set on"):
        run_predict(old, photos, workers=0, open_set=True)
    r = CliRunner().invoke(app, ["predict", str(old), str(photos[0]), "--open-set", "on", "--workers", "0"])
    assert r.exit_code == 2 and "--open-set on" in r.output
    r = CliRunner().invoke(app, ["predict", str(old), str(photos[0]), "--open-set", "maybe", "--workers", "0"])
    assert r.exit_code == 2 and "on or off" in r.output
    r = CliRunner().invoke(app, ["predict", str(open_artifact.path), *map(str, _photos(open_birds, "test", [HELD_OUT])),
                                 "--workers", "0"])
    assert r.exit_code == 0 and "unknown" in r.output


def test_supcon_without_val_calibrates_on_a_train_hold_out(birds, tmp_path):
    art = run_supcon(_supcon_cfg(birds.root / "manifest.csv", tmp_path / "s", max_steps=1))
    train = birds.rows("train")
    fit_idx, _ = stratified_holdout(train.class_codes(art.info["class_names"]).numpy(), 0)
    assert art.info["open_set"]["calibrated_on"] == "train hold-out"
    assert load_file(art.path / "model.safetensors")[REFERENCE_KEY].shape[0] == len(fit_idx) < len(train)


def test_evaluate_reports_open_set_metrics_for_unseen_test_classes(open_birds, tmp_path):
    cfg = dict(backbone="test_efficientnet", weights="none", image_size=32, workers=0, wandb="disabled",
               cache_dir=str(tmp_path / "cache"), embedding_map=False)
    art = run_evaluate(EvaluateConfig(manifest=str(open_birds.root / "all.csv"), out=str(tmp_path / "e"),
                                      features_dir=str(tmp_path / "e" / "features"), **cfg))
    report = json.loads((art.path / "report" / "metrics.json").read_text())
    ctx = report["context"]
    for key in ("open_set_auroc", "open_set_fpr95"):
        assert 0.0 <= report[key] <= 1.0 and art.info["metrics"][key] == report[key]
    for name in ("max_softmax", "max_logit"):
        assert 0.0 <= ctx[f"open_set_auroc_{name}"] <= 1.0 and 0.0 <= ctx[f"open_set_fpr95_{name}"] <= 1.0
    assert ctx["unseen_images"] == 10 and ctx["unseen_classes"] == 1 and ctx["open_set_from"] == "default"
    # the headline score is relative Mahalanobis (a bare backbone), the kNN distance beside it, on the cached features
    files = (art.path / "features").glob("*.npy")
    cached = [(p.name.rsplit("-", 1)[0], read_rows(p)) for p in files]
    feats = {(name, len(f)): f for name, f in cached}  # "test" twice: the known queries (8), retrieval (all 18)
    train_rows = open_birds.rows("train")
    train = feats["train", len(train_rows)]
    known_f, unseen_f = feats["test", 8], feats["test_unseen", 10]
    model = RelativeMahalanobis.fit(train, train_rows.class_codes(sorted(set(train_rows.table["label"]))))
    assert ctx["open_set_score"] == "relative_mahalanobis"
    expected = open_set_metrics(model.scores(known_f), model.scores(unseen_f))
    assert report["open_set_auroc"] == pytest.approx(expected["auroc"])
    assert report["open_set_fpr95"] == pytest.approx(expected["fpr95"])
    knn = open_set_metrics(*(knn_distance_scores(train, f, ctx["open_set_k"]) for f in (known_f, unseen_f)))
    assert ctx["open_set_auroc_knn_distance"] == pytest.approx(knn["auroc"], abs=1e-4)
    page = (art.path / "report" / "index.html").read_text()
    assert "Unknown species" in page and "max_logit" in page
    assert len(pd.read_csv(art.path / "report" / "open_set.csv")) == 4
    with Image.open(art.path / "report" / "open_set_roc.png") as roc:
        assert roc.size[0] > 100 and 'src="open_set_roc.png"' in page

    closed = run_evaluate(EvaluateConfig(manifest=str(open_birds.root / "known.csv"), out=str(tmp_path / "c"),
                                         linear=False, **cfg))
    assert closed.info["metrics"]["open_set_auroc"] is None and closed.info["metrics"]["open_set_fpr95"] is None
