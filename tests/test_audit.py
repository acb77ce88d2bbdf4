"""`finegrain audit` and `manifest relabel`: the pure pieces against plain references, then end to end."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from finegrain.cli import app
from finegrain.config import AuditConfig, ConfigError, EvaluateConfig, SupconConfig
from finegrain.curation.audit import (cross_validated_probabilities, knn_probabilities, label_issues, near_duplicates,
                                      out_of_sample_probabilities, outlier_scores)
from finegrain.data.manifest import Manifest
from finegrain.eval.index import nearest
from finegrain.features import store as store_module
from finegrain.features.cache import default_folder
from finegrain.features.feature_file import read_rows
from finegrain.stages.audit import run_audit
from finegrain.stages.evaluate import run_evaluate
from finegrain.stages.supcon import run_supcon


def _blobs(classes=6, per_class=25, dim=16, spread=0.6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    y = np.repeat(np.arange(classes), per_class)
    return centres[y] + spread * rng.normal(size=(len(y), dim)), y


def test_leave_one_out_neighbours_match_brute_force():
    x, _ = _blobs(seed=1)
    sims, idx = nearest(x, None, 4)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    full = unit @ unit.T
    np.fill_diagonal(full, -np.inf)
    expected = np.argsort(-full, axis=1)[:, :4]
    assert (idx == expected).all()
    assert np.allclose(sims, np.take_along_axis(full, expected, 1), atol=1e-5)


def test_knn_probabilities_are_the_weighted_votes_of_the_other_photos():
    x, y = _blobs(classes=3, per_class=6, seed=2)
    probs = knn_probabilities(x, y, 3, k=5, temperature=0.1)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for i in range(len(x)):
        sims = unit @ unit[i]
        sims[i] = -np.inf
        top = np.argsort(-sims)[:5]
        votes = np.zeros(3)
        for j in top:
            votes[y[j]] += np.exp(sims[j] / 0.1)
        assert np.allclose(probs[i], votes / votes.sum(), atol=1e-5)


@pytest.mark.parametrize("source", ["knn", "linear", "ensemble"])
def test_confident_learning_finds_planted_label_errors(source):
    x, y = _blobs(seed=3)
    rng = np.random.default_rng(3)
    flipped = rng.choice(len(y), 8, replace=False)
    given = y.copy()
    given[flipped] = (y[flipped] + 1 + rng.integers(0, 5, len(flipped))) % 6
    probs = out_of_sample_probabilities(source, x, given, 6)
    assert np.allclose(probs.sum(1), 1.0)
    if source == "ensemble":
        assert np.allclose(probs, (knn_probabilities(x, given, 6) + cross_validated_probabilities(x, given, 6)) / 2)
    flagged, quality = label_issues(given, probs)
    truth = np.zeros(len(y), bool)
    truth[flipped] = True
    assert (flagged & truth).sum() >= 6 and (flagged & ~truth).sum() <= 3
    assert quality[truth].mean() < quality[~truth].mean()  # the flipped photos rank as the least trustworthy


def test_near_duplicates_and_outliers():
    x, _ = _blobs(seed=4)
    x[10] = x[40] * 1.0001  # a twin (another split, a re-encoded copy...)
    x[7] = -x.mean(0) * 5 + np.random.default_rng(0).normal(size=x.shape[1])  # far from every species
    pairs = near_duplicates(x)
    assert (10, 40) in [(a, b) for a, b, _ in pairs] and all(s > 0.99 for _, _, s in pairs)
    scores, flagged = outlier_scores(x)
    assert scores.argmin() == 7 and flagged[7] and flagged.sum() <= 3


def test_audit_config_needs_an_artifact():
    with pytest.raises(ConfigError, match="from_artifact"):
        AuditConfig(manifest="m.csv", out="o")


@pytest.fixture
def audited(birds, tmp_path):
    """A small supcon artifact on the synthetic birds, and the manifest with a planted twin and a wrong label."""
    art = run_supcon(SupconConfig(manifest=str(birds.root / "manifest.csv"), out=str(tmp_path / "supcon"),
                                  backbone="test_efficientnet", weights="none", image_size=32, batch_size=8,
                                  classes_per_batch=4, epochs=2, workers=0, wandb="disabled",
                                  cache_dir=str(tmp_path / "cache"), knn_monitor=False, proj_dim=16, proj_hidden=32))
    table = birds.table.copy()
    first = table.iloc[0]
    with Image.open(birds.abspath(first["path"])) as im:  # a re-encoded copy: not byte-identical
        im.convert("RGB").save(birds.root / "twin.jpg", quality=85)
    twin = first.copy()
    twin["path"], twin["image_id"], twin["split"] = "twin.jpg", "twin", "test"
    table = pd.concat([table, twin.to_frame().T], ignore_index=True)
    Manifest.from_table(table, birds.root).save(birds.root / "audit.csv")
    return art.path, birds.root / "audit.csv", table


def test_audit_writes_a_ranked_csv_and_a_page_with_photos_then_relabel_applies_choices(audited, tmp_path):
    artifact, manifest, table = audited
    runner = CliRunner()
    res = runner.invoke(app, ["audit", str(artifact), "--manifest", str(manifest), "-o", str(tmp_path / "audit"),
                              "--device", "cpu", "--workers", "0", "--wandb", "disabled",
                              "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    found = pd.read_csv(tmp_path / "audit" / "audit.csv", keep_default_na=False)
    assert list(found["rank"]) == list(range(1, len(found) + 1))
    dup = found[(found["issue"] == "duplicate") & found[["path", "other_path"]].isin(["twin.jpg"]).any(axis=1)]
    assert len(dup) == 1, found
    page = (tmp_path / "audit" / "audit.html").read_text()
    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert uris and all(Image.open(io.BytesIO(base64.b64decode(u))).size[0] <= 96 for u in uris)
    summary = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert summary["flagged"] == found["issue"].value_counts().reindex(["label", "duplicate", "outlier"],
                                                                       fill_value=0).to_dict()

    ev = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate", "--manifest", str(manifest), "--from", str(artifact), "--out", str(ev),
                              "--audit", str(tmp_path / "audit"), "--device", "cpu", "--workers", "0",
                              "--wandb", "disabled", "--cache-dir", str(tmp_path / "cache"), "--no-embedding-map"])
    assert res.exit_code == 0, res.output
    report = (ev / "report" / "index.html").read_text()
    assert 'href="../../audit/audit.html"' in report and "Audit (finegrain audit)" in report
    res = runner.invoke(app, ["evaluate", "--manifest", str(manifest), "--from", str(artifact), "--out", str(ev),
                              "--audit", str(tmp_path / "nowhere"), "--device", "cpu", "--workers", "0"])
    assert res.exit_code == 2 and "--audit: cannot read" in res.output and "Traceback" not in res.output

    fixed = tmp_path / "fixed.csv"
    res = runner.invoke(app, ["manifest", "relabel", str(manifest), "--from", str(tmp_path / "audit" / "audit.csv"),
                              "--accept", str(int(dup["rank"].iloc[0])), "-o", str(fixed)])
    assert res.exit_code == 0, res.output
    kept = Manifest.load(fixed).table
    assert len(kept) == len(table) - 1 and dup["path"].iloc[0] not in set(kept["path"])


def test_audit_after_evaluate_of_the_same_artifact_extracts_no_photo_again(audited, tmp_path, monkeypatch):
    """The features cache is shared by default: evaluate reads every photo of the manifest (train and test), so
    audit, in another output folder, copies them all; the copied rows are the features a fresh extraction gives."""
    artifact, manifest, table = audited
    monkeypatch.setenv("FINEGRAIN_CACHE", str(tmp_path / "finegrain_cache"))  # this test's own shared cache
    shared = dict(manifest=str(manifest), from_artifact=str(artifact), workers=0, wandb="disabled",
                  cache_dir=str(tmp_path / "cache"))
    run_evaluate(EvaluateConfig(out=str(tmp_path / "eval"), embedding_map=False, compare="none", **shared))
    forwarded = []  # photos that went through the model, per extraction
    real = store_module.feature_batches

    def counted(*args, **kwargs):
        for feats, labels in real(*args, **kwargs):
            forwarded.append(len(feats))
            yield feats, labels

    monkeypatch.setattr(store_module, "feature_batches", counted)
    found = run_audit(AuditConfig(out=str(tmp_path / "audit"), **shared))
    assert sum(forwarded) == 0 and not (tmp_path / "audit" / "features").exists()
    cached = sorted(default_folder().glob("all-*.npy"))
    assert default_folder() == tmp_path / "finegrain_cache" / "features"
    assert len(cached) == 1 and read_rows(cached[0]).shape[0] == len(table)

    fresh = run_audit(AuditConfig(out=str(tmp_path / "fresh"), features_dir=str(tmp_path / "fresh_features"), **shared))
    assert sum(forwarded) == len(table)  # another folder: every photo extracted
    extracted = read_rows(next((tmp_path / "fresh_features").glob("all-*.npy")))
    assert torch.allclose(read_rows(cached[0]), extracted, atol=1e-5)
    pd.testing.assert_frame_equal(found, fresh)


def test_relabel_applies_a_label_finding_and_refuses_bad_input(birds, tmp_path):
    path = birds.table["path"].iloc[3]
    other = sorted(set(birds.table["label"]) - {birds.table["label"].iloc[3]})[0]
    audit_csv = tmp_path / "audit.csv"
    pd.DataFrame([{"rank": 1, "issue": "label", "path": path, "split": "train", "given_label": "x",
                   "suggested_label": other, "score": 0.9, "reason": "", "other_path": "", "accept": "yes"}]
                 ).to_csv(audit_csv, index=False)
    runner = CliRunner()
    res = runner.invoke(app, ["manifest", "relabel", str(birds.root / "manifest.csv"), "--from", str(audit_csv),
                              "-o", str(tmp_path / "fixed.csv")])
    assert res.exit_code == 0, res.output
    fixed = Manifest.load(tmp_path / "fixed.csv").table
    assert fixed.loc[fixed["path"] == path, "label"].item() == other and len(fixed) == len(birds.table)
    for args, message in ((["--accept", "7"], "no finding of that rank"), (["--accept", "one"], "ranks")):
        res = runner.invoke(app, ["manifest", "relabel", str(birds.root / "manifest.csv"), "--from", str(audit_csv),
                                  "-o", str(tmp_path / "x.csv"), *args])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    birds.table.to_csv(tmp_path / "not_audit.csv", index=False)
    res = runner.invoke(app, ["manifest", "relabel", str(birds.root / "manifest.csv"), "--from",
                              str(tmp_path / "not_audit.csv"), "-o", str(tmp_path / "x.csv")])
    assert res.exit_code == 2 and "not an audit.csv" in res.output
