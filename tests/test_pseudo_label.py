"""`finegrain pseudo-label`: naming unlabelled photos from a few labelled ones on fixed features, its artifact
(what predict answers, what evaluate reports) and its refusals."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from finegrain.cli import app
from finegrain.config import EvaluateConfig, PseudoLabelConfig
from finegrain.curation.pseudo_labels import choose_rounds, label_rounds
from finegrain.data.manifest import Manifest
from finegrain.data.split import keep_label_fraction
from finegrain.eval.linear import fit_linear_probe
from finegrain.stages.evaluate import run_evaluate
from finegrain.stages.predict import run_predict
from finegrain.stages.pseudo_label import PSEUDO_LABELS_FILE, PSEUDO_MANIFEST_FILE, run_pseudo_label


def _blobs(seed: int, classes: int = 4, dim: int = 16, labelled: int = 2, unlabelled: int = 60):
    """Separable Gaussian species in `dim` dimensions: (xl, yl) a few labelled, (xu, yu) held back, (xt, yt) new."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)) * 1.2

    def draw(k):
        y = np.repeat(np.arange(classes), k)
        return means[y] + rng.normal(size=(len(y), dim)), y

    return draw(labelled), draw(unlabelled), draw(unlabelled)


@pytest.mark.parametrize("seed", [1, 2])
def test_pseudo_labels_name_held_back_photos_better_than_the_probe_on_the_labels_alone(seed):
    (xl, yl), (xu, yu), (xt, yt) = _blobs(seed)
    alone = fit_linear_probe(xl, yl, num_classes=4)
    prior = np.bincount(yl).astype(float)
    rounds, table = choose_rounds(xl, yl, xu, num_classes=4, of=5, C=alone.C_reg, prior=prior)
    assert [row["rounds"] for row in table] == list(range(6))  # chosen among 0..5 on the held-out labelled photos
    out = label_rounds(xl, yl, xu, num_classes=4, rounds=max(rounds, 1), of=5, C=alone.C_reg, prior=prior)
    named = out.labels >= 0
    assert (out.labels[named] == yu[named]).mean() > (alone.predict(xu) == yu).mean()
    assert (out.probe.predict(xt) == yt).mean() > (alone.predict(xt) == yt).mean()


def test_a_round_that_names_no_photo_says_so_and_keeps_the_previous_classifier(caplog):
    (xl, yl), (xu, _), _ = _blobs(0)
    alone = fit_linear_probe(xl, yl, num_classes=4, Cs=(1.0,))
    with caplog.at_level(logging.INFO, logger="finegrain"):
        out = label_rounds(xl, yl, xu, num_classes=4, rounds=3, of=3, C=1.0, allowed=np.zeros(len(xu), bool),
                           verbose=True)
    assert out.rounds == 0 and (out.labels == -1).all()
    assert "round 1: no unlabelled photo could be named; keeping the labelled-only classifier" in caplog.text
    np.testing.assert_array_equal(out.probe.weight, alone.weight)


@pytest.fixture
def few_labels(birds) -> Manifest:
    keep_label_fraction(birds, 0.5, seed=0).save(birds.root / "few.csv")
    return Manifest.load(birds.root / "few.csv")


def _cfg(manifest, tmp_path, name="pl", **kw):
    base = dict(manifest=str(manifest), out=str(tmp_path / name), backbone="test_efficientnet", weights="none",
                image_size=36, workers=0, wandb="disabled", cache_dir=str(tmp_path / "cache"), seed=0)
    return PseudoLabelConfig(**{**base, **kw})


def test_the_artifact_is_what_predict_answers_and_evaluate_reports_its_gallery(few_labels, tmp_path):
    art = run_pseudo_label(_cfg(few_labels.root / "few.csv", tmp_path))
    table = pd.read_csv(art.path / PSEUDO_LABELS_FILE, keep_default_na=False)
    unlabelled = few_labels.rows("unlabeled")
    assert list(table["path"]) == list(unlabelled.table["path"])
    named = table[table["label"] != ""]
    moved = Manifest.load(art.path / PSEUDO_MANIFEST_FILE).table.set_index("path")
    assert (moved.loc[named["path"], "split"] == "train").all()
    assert list(moved.loc[named["path"], "label"]) == list(named["label"])

    ev = run_evaluate(EvaluateConfig(manifest=str(few_labels.root / "few.csv"), out=str(tmp_path / "ev"), workers=0,
                                     wandb="disabled", from_artifact=str(art.path), embedding_map=False,
                                     compare="frozen", cache_dir=str(tmp_path / "cache")))
    metrics = json.loads((ev.path / "report" / "metrics.json").read_text())
    assert metrics["context"]["pseudo_gallery_images"] == len(named)
    assert metrics["knn_pseudo_top1"] is not None
    assert set(metrics["baselines"]) == {"frozen"}  # the backbone it read with, as it was
    test = few_labels.rows("test")
    preds = run_predict(art.path, [few_labels.root / p for p in test.table["path"]], device="cpu", workers=0,
                        open_set=False)
    truth = dict(zip((str(few_labels.root / p) for p in test.table["path"]), test.table["label"]))
    assert metrics["classifier_top1"] == pytest.approx((preds["pred_1"] == preds["path"].map(truth)).mean())


def test_bad_input_gets_one_line_naming_what_is_missing_and_what_to_run(birds, tmp_path):
    runner = CliRunner()
    args = ["pseudo-label", "--out", str(tmp_path / "o"), "--backbone", "test_efficientnet", "--weights", "none",
            "--workers", "0", "--wandb", "disabled", "--cache-dir", str(tmp_path / "cache")]
    def error(result) -> str:
        """The one error line (validation warnings about test-only species may come before it)."""
        lines = [line for line in result.output.splitlines() if line.startswith("error")]
        assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output
        return lines[0]

    line = error(runner.invoke(app, args + ["--manifest", str(birds.root / "manifest.csv")]))
    assert "no unlabelled photos" in line and "finegrain supcon" in line
    table = birds.table.copy()
    table.loc[table["split"] == "train", ["split", "label"]] = ["unlabeled", ""]
    Manifest.from_table(table, birds.root).save(birds.root / "none.csv")
    line = error(runner.invoke(app, args + ["--manifest", str(birds.root / "none.csv")]))
    assert "labelled train photos of 0 species" in line and "finegrain suggest" in line


@pytest.mark.slow
def test_a_pipeline_names_the_photos_then_evaluates_the_pseudo_label_artifact(few_labels, tmp_path):
    import yaml

    from finegrain.pipeline import load_pipeline, run_pipeline

    spec = {"name": "p", "runs_dir": str(tmp_path / "runs"), "data": {"manifest": str(few_labels.root / "few.csv")},
            "defaults": {"backbone": "test_efficientnet", "weights": "none", "workers": 0, "wandb": "disabled",
                         "cache_dir": str(tmp_path / "cache")},
            "stages": {"pseudo_label": {"image_size": 36, "rounds": 2}, "evaluate": {"embedding_map": False}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    printed = CliRunner().invoke(app, ["run", str(tmp_path / "p.yaml")])
    assert printed.exit_code == 0, printed.output
    assert "named " in printed.output and "held_top1 " in printed.output  # the pseudo_label stage's headline
    assert "kNN + named" in printed.output and "what predict" in printed.output  # the comparison's columns
    labelled, evaluated = run_pipeline(load_pipeline(tmp_path / "p.yaml"))  # reused from the run above
    assert labelled.stage == "pseudo_label" and labelled.info["pseudo_labels"]["of"] == 2
    assert evaluated.info["parent"]["path"] == str(labelled.path.resolve())
    assert evaluated.info["image_size"] == 36  # evaluate reads the photos as the classifier was fitted
    assert evaluated.info["metrics"]["classifier_top1"] is not None
