"""A manifest whose val/test splits hold species with no train photos (an open-set evaluation, a real collection):
training stages train on the species that have train photos and say so in one line; evaluate measures the closed
set on the trained species and counts the others as unknown; predict never names them."""

from __future__ import annotations

import json

import pandas as pd
from typer.testing import CliRunner

from finegrain.artifacts import load_artifact
from finegrain.cli import app
from finegrain.config import EvaluateConfig
from finegrain.data.manifest import Manifest
from finegrain.stages.evaluate import run_evaluate
from finegrain.stages.predict import UNKNOWN, run_predict

TINY = ["--backbone", "test_efficientnet", "--weights", "none", "--image-size", "32", "--batch-size", "8",
        "--epochs", "1", "--workers", "0", "--wandb", "disabled", "--no-knn-monitor"]


def _open_set_manifest(birds: Manifest) -> tuple[str, list[str], list[str]]:
    """Every photo of two of the four species moved to test: (manifest path, trained species, unseen species)."""
    species = sorted(set(birds.table["label"]))
    seen, unseen = species[:2], species[2:]
    table = birds.table.copy()
    table.loc[table["label"].isin(unseen), "split"] = "test"
    path = birds.root / "open_set.csv"
    Manifest.from_table(table, birds.root).save(path)
    return str(path), seen, unseen


def test_training_evaluate_and_predict_with_species_only_in_test(birds, tmp_path):
    manifest, seen, unseen = _open_set_manifest(birds)
    for stage, more in (("pretrain", []), ("supcon", ["--classes-per-batch", "2", "--proj-dim", "16"])):
        r = CliRunner().invoke(app, [stage, "--manifest", manifest, "-o", str(tmp_path / stage), *TINY, *more,
                                     "--cache-dir", str(tmp_path / "cache")])
        assert r.exit_code == 0, r.output
        said = [line for line in r.output.splitlines() if "no train photos" in line]
        assert len(said) == 1 and said[0].startswith("warning:") and "2 classes" in said[0], r.output  # once, counted
        assert all(name in said[0] for name in unseen)
    art = load_artifact(tmp_path / "supcon")
    assert art.info["class_names"] == seen  # the trained species only

    ev = run_evaluate(EvaluateConfig(manifest=manifest, out=str(tmp_path / "eval"), from_artifact=str(art.path),
                                     workers=0, wandb="disabled", compare="none", embedding_map=False,
                                     cache_dir=str(tmp_path / "cache"), features_dir=str(tmp_path / "features")))
    metrics = json.loads((ev.path / "report" / "metrics.json").read_text())
    assert metrics["knn_top1"] is not None and metrics["linear_top1"] is not None  # closed set: trained species
    assert metrics["open_set_auroc"] is not None and 0 <= metrics["open_set_auroc"] <= 1  # unseen = unknown
    per_class = pd.read_csv(ev.path / "report" / "per_class.csv")
    assert set(per_class.iloc[:, 0].astype(str)) <= set(seen)

    photos = [birds.root / p for p in birds.table.loc[birds.table["label"].isin(unseen), "path"]]
    preds = run_predict(art.path, photos, workers=0)
    assert len(preds) == len(photos) and set(preds["pred_1"]) <= {*seen, UNKNOWN}
    assert set(preds["nearest_species"]) <= set(seen)
