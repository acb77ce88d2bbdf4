"""`finegrain suggest`: the choosing on synthetic embeddings, the contact sheet, and the command end to end."""

from __future__ import annotations

import base64
import html.parser
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import make_blobs
from typer.testing import CliRunner

from finegrain.cli import app
from finegrain.config import SuggestConfig, SupconConfig
from finegrain.curation.suggest import STRATEGIES, auto_strategy, suggest
from finegrain.data.manifest import Manifest
from finegrain.data.split import keep_label_fraction
from finegrain.data.synthetic import make_demo_dataset
from finegrain.errors import FinegrainError
from finegrain.eval.linear import fit_linear_probe
from finegrain.features.store import FeatureStore
from finegrain.report.contact_sheet import Tile, write_contact_sheet
from finegrain.stages.suggest import run_suggest
from finegrain.stages.supcon import run_supcon


def _blobs(n: int, centers: int, seed: int, std: float = 1.0, dim: int = 32):
    """(n, dim) float32 unit vectors in `centers` clusters, and each one's cluster."""
    x, c = make_blobs(n, n_features=dim, centers=centers, cluster_std=std, random_state=seed)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), c


NAMES = [f"species{i}" for i in range(12)]


# --- the choosing, on numpy blobs --------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["typiclust", "probcover"])
def test_cold_start_covers_more_clusters_than_random_picks(strategy):
    budget, rng = 10, np.random.default_rng(0)
    for seed in range(3):
        pool, cluster = _blobs(300, 10, seed)
        picks = suggest(strategy, pool, pool[:0], np.zeros(0, int), budget, class_names=[], species=10, seed=seed)
        covered = len(set(cluster[picks.index]))
        random = [len(set(cluster[rng.choice(len(pool), budget, replace=False)])) for _ in range(500)]
        assert covered > np.quantile(random, 0.95), (seed, covered, np.mean(random))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_picks_are_distinct_pool_rows_exactly_the_budget_and_described(strategy):
    pool, cluster = _blobs(200, 4, seed=1, std=4.0)
    labelled, labels = pool[:16], cluster[:16]
    pool = pool[16:]
    picks = suggest(strategy, pool, labelled, labels, 7, class_names=NAMES[:4], seed=0)
    assert picks.strategy == strategy and len(picks.index) == 7 == len(set(picks.index.tolist()))
    assert picks.index.min() >= 0 and picks.index.max() < len(pool)
    assert len(picks.score) == len(picks.represents) == len(picks.reason) == 7 and np.isfinite(picks.score).all()
    # every pool photo stands with at most one pick; each pick stands at least for itself
    assert (picks.represents >= 1).all() and picks.represents.sum() <= len(pool)


def test_typiclust_leaves_labelled_clusters_alone():
    pool, cluster = _blobs(320, 8, seed=2)
    # one label in each of clusters 0-3: TypiClust's 4 labelled + 4 budget k-means clusters are then the 8 blobs
    labelled_idx = np.array([np.flatnonzero(cluster == c)[0] for c in range(4)])
    rest = np.setdiff1d(np.arange(len(pool)), labelled_idx)
    picks = suggest("typiclust", pool[rest], pool[labelled_idx], cluster[labelled_idx], 4, class_names=NAMES[:8])
    assert sorted(cluster[rest][picks.index]) == [4, 5, 6, 7]


def test_uncertainty_prefers_photos_the_classifier_is_unsure_about():
    x, c = _blobs(600, 3, seed=4, std=6.0)  # overlapping species
    lab = np.concatenate([np.flatnonzero(c == k)[:8] for k in range(3)])
    rest = np.setdiff1d(np.arange(len(x)), lab)
    picks = suggest("uncertainty", x[rest], x[lab], c[lab], 10, class_names=NAMES[:3], seed=0)
    probs = fit_linear_probe(x[lab], c[lab], num_classes=3).predict_proba(x[rest])  # the same rule, fitted apart
    top2 = -np.sort(-probs, axis=1)[:, :2]
    margin = 1 - (top2[:, 0] - top2[:, 1])
    assert np.allclose(picks.score, margin[picks.index], atol=1e-4)
    rng = np.random.default_rng(0)
    random = [margin[rng.choice(len(rest), 10, replace=False)].mean() for _ in range(500)]
    assert margin[picks.index].mean() > np.quantile(random, 0.95)
    first = picks.index[0]
    a, b = np.argsort(-probs[first])[:2]
    assert picks.reason[0].startswith(f"uncertain: top-2 species {NAMES[a]} / {NAMES[b]}")


def test_duplicate_photos_still_give_distinct_picks():
    base, _ = _blobs(4, 4, seed=5)
    pool = np.repeat(base, 5, axis=0)  # 4 distinct photos, 5 copies each: fewer clusters than the budget
    picks = suggest("typiclust", pool, pool[:0], np.zeros(0, int), 8, class_names=NAMES)
    assert len(set(picks.index.tolist())) == 8
    assert len({tuple(pool[i]) for i in picks.index[:4]}) == 4  # the distinct photos come first


def test_probcover_refuses_more_photos_than_its_limit():
    pool, _ = _blobs(40, 2, seed=0)
    with pytest.raises(FinegrainError, match="--probcover-limit 30"):
        suggest("probcover", pool, pool[:0], np.zeros(0, int), 3, class_names=NAMES, probcover_limit=30)


def test_auto_uses_typiclust_until_each_species_has_enough_labels():
    assert auto_strategy(0, 0, 0, 2.0)[0] == "typiclust"
    assert auto_strategy(50, 1, 10, 2.0)[0] == "typiclust"  # one species labelled: no classifier
    assert auto_strategy(19, 10, 10, 2.0)[0] == "typiclust"
    assert auto_strategy(20, 10, 10, 2.0)[0] == "uncertainty"
    assert auto_strategy(20, 10, 12, 2.0)[0] == "typiclust"  # species known from val/test count too


def test_every_option_has_help_and_the_command_an_example():
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(SuggestConfig))
    r = CliRunner().invoke(app, ["suggest", "--help"], terminal_width=400)
    assert r.exit_code == 0 and "Example: finegrain suggest" in r.output and "--probcover-limit" in r.output


# --- the contact sheet ------------------------------------------------------------------------

class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def _thumbnails(page_html: str) -> tuple[list[Image.Image], str]:
    page = _Page()
    page.feed(page_html)
    images = []
    for src in page.images:
        head, data = src.split(",", 1)
        assert head == "data:image/jpeg;base64"
        images.append(Image.open(io.BytesIO(base64.b64decode(data))))
    return images, " ".join(page.text)


def test_contact_sheet_is_self_contained_and_escaped(tmp_path):
    Image.new("RGB", (300, 150), (200, 30, 30)).save(tmp_path / "wide.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    tiles = [Tile(tmp_path / "wide.png", "#1", ["x < y"]), Tile(tmp_path / "broken.jpg", "#2")]
    page = write_contact_sheet(tmp_path / "sheet.html", title="<b>pick</b>", notes={"strategy": "a & b"}, tiles=tiles)
    text = page.read_text()
    images, words = _thumbnails(text)
    assert len(images) == 1 and images[0].size == (96, 48) and images[0].getpixel((48, 24))[0] > 150
    assert "unreadable" in words and "x < y" in words and "<b>pick</b>" in words and "a & b" in words
    assert "http" not in text and "<script" not in text


# --- the command, on the synthetic birds with a tiny artifact -----------------------------------

@pytest.fixture(scope="module")
def birds_run(tmp_path_factory):
    """The synthetic birds with half the train labels gone (few.csv) and a 1-epoch supcon artifact on them."""
    root = tmp_path_factory.mktemp("suggest_birds")
    full = make_demo_dataset(root / "data", classes=4, per_class=8, image_size=64, seed=3)
    keep_label_fraction(full, 0.5, seed=0).save(root / "data" / "few.csv")
    art = run_supcon(SupconConfig(
        manifest=str(root / "data" / "few.csv"), out=str(root / "sup"), backbone="test_efficientnet", weights="none",
        image_size=32, batch_size=8, classes_per_batch=4, epochs=1, workers=0, wandb="disabled",
        cache_dir=str(root / "cache"), knn_monitor=False, proj_dim=16))
    return root, full, art


def _args(root, manifest, out, *more):
    return ["suggest", "--manifest", str(manifest), "--from", str(root / "sup"), "-o", str(out), "--workers", "0",
            "--cache-dir", str(root / "cache"), *map(str, more)]


def test_cli_writes_the_ranked_csv_and_its_contact_sheet(birds_run, tmp_path):
    root, full, art = birds_run
    few = Manifest.load(root / "data" / "few.csv")
    r = CliRunner().invoke(app, _args(root, root / "data" / "few.csv", tmp_path / "next.csv", "--budget", 4))
    assert r.exit_code == 0, r.output
    table = pd.read_csv(tmp_path / "next.csv", keep_default_na=False)
    unlabelled = few.rows("unlabeled").table.set_index("path")["image_id"]
    assert list(table["rank"]) == [1, 2, 3, 4] and table["path"].is_unique
    assert set(table["path"]) <= set(unlabelled.index)
    assert list(unlabelled[table["path"]]) == list(table["image_id"])
    assert set(table["best_guess"]) <= set(art.info["class_names"])
    assert ((table["best_guess_prob"] > 0) & (table["best_guess_prob"] <= 1)).all() and table["reason"].str.len().all()
    images, words = _thumbnails((tmp_path / "next.html").read_text())
    assert len(images) == 4 and all(max(im.size) == 64 for im in images)  # 64 px photos: not enlarged
    positions = [words.index(path) for path in table["path"]]
    assert positions == sorted(positions)  # the page shows the photos in rank order
    assert all(reason in words for reason in table["reason"])


def test_labelling_a_suggestion_reuses_the_features_and_moves_on(birds_run, tmp_path, monkeypatch):
    root, full, _ = birds_run
    cfg = dict(from_artifact=str(root / "sup"), workers=0, cache_dir=str(root / "cache"), budget=3,
               features_dir=str(tmp_path / "features"), strategy="typiclust")
    first = run_suggest(SuggestConfig(manifest=str(root / "data" / "few.csv"), out=str(tmp_path / "r1.csv"), **cfg))
    table = Manifest.load(root / "data" / "few.csv").table.copy()
    truth = full.table.set_index("path")["label"]
    labelled = table["path"] == first["path"][0]
    table.loc[labelled, "split"], table.loc[labelled, "label"] = "train", truth[first["path"][0]]
    Manifest(table, root / "data").save(tmp_path / "round2.csv")
    extracted = []
    real = FeatureStore.features

    def spy(self, rows, what):
        out = real(self, rows, what)
        extracted.append(self.extracted)
        return out

    monkeypatch.setattr(FeatureStore, "features", spy)
    second = run_suggest(SuggestConfig(manifest=str(tmp_path / "round2.csv"), out=str(tmp_path / "r2.csv"), **cfg))
    assert extracted == [0]  # same photos, new labels: read from the cache
    assert first["path"][0] not in set(second["path"]) and len(second) == 3


def test_cold_start_runs_on_a_bare_backbone_or_its_evaluation_quietly(birds_run, tmp_path):
    """No train labels at all (test photos labelled to measure later): --backbone alone picks typical photos; an
    evaluate folder of that backbone as --from picks the same; neither warns about species without train photos."""
    root, full, _ = birds_run
    table = full.table.copy()
    table.loc[table["split"] == "train", ["split", "label"]] = ["unlabeled", ""]
    Manifest(table, full.root).save(tmp_path / "cold.csv")
    bare = ["--backbone", "test_efficientnet", "--weights", "none", "--image-size", "32"]
    common = ["--manifest", str(tmp_path / "cold.csv"), "--budget", "4", "--workers", "0", "--cache-dir",
              str(root / "cache"), "--features-dir", str(tmp_path / "features")]
    r = CliRunner().invoke(app, ["suggest", *common, *bare, "-o", str(tmp_path / "cold.csv.out.csv")])
    assert r.exit_code == 0, r.output
    assert "warning" not in r.output and "no train photos" not in r.output, r.output
    first = pd.read_csv(tmp_path / "cold.csv.out.csv", keep_default_na=False)
    assert len(first) == 4 and first["reason"].str.contains("typical").all(), first["reason"]
    assert (first["best_guess"] == "").all()  # a bare backbone has no classifier

    r = CliRunner().invoke(app, ["evaluate", "--manifest", str(tmp_path / "cold.csv"), *bare, "-o",
                                 str(tmp_path / "eval"), "--workers", "0", "--wandb", "disabled", "--compare", "none",
                                 "--no-embedding-map", "--cache-dir", str(root / "cache")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["suggest", *common, "--from", str(tmp_path / "eval"), "-o", str(tmp_path / "e.csv")])
    assert r.exit_code == 0, r.output
    again = pd.read_csv(tmp_path / "e.csv", keep_default_na=False)
    assert list(again["path"]) == list(first["path"])  # the same model, the same picks


def test_budget_above_the_pool_is_refused_and_the_whole_pool_is_not(birds_run, tmp_path):
    root, _, _ = birds_run
    n = len(Manifest.load(root / "data" / "few.csv").rows("unlabeled"))
    r = CliRunner().invoke(app, _args(root, root / "data" / "few.csv", tmp_path / "over.csv", "--budget", n + 1))
    assert r.exit_code == 2 and f"--budget {n + 1} is more than the {n} unlabelled photos" in r.output
    assert not (tmp_path / "over.csv").exists()
    r = CliRunner().invoke(app, _args(root, root / "data" / "few.csv", tmp_path / "all.csv", "--budget", n))
    assert r.exit_code == 0, r.output
    table = pd.read_csv(tmp_path / "all.csv")
    assert len(table) == n and table["path"].is_unique


@pytest.mark.parametrize("case,message", [
    ("missing_artifact", "artifact folder not found"),
    ("no_unlabelled", "no photos in split 'unlabeled'"),
    ("zero_budget", "--budget: must be at least 1"),
    ("not_csv", "--out: must be a .csv file"),
    ("uncertainty_cold", "needs labelled train photos of at least 2 species"),
])
def test_bad_input_is_one_clear_error(birds_run, tmp_path, case, message):
    root, full, _ = birds_run
    few, out = root / "data" / "few.csv", tmp_path / "s.csv"
    args = {
        "missing_artifact": _args(root, few, out)[:4] + [str(tmp_path / "nowhere")] + _args(root, few, out)[5:],
        "no_unlabelled": _args(root, root / "data" / "manifest.csv", out),
        "zero_budget": _args(root, few, out, "--budget", 0),
        "not_csv": _args(root, few, tmp_path / "s.txt"),
        "uncertainty_cold": _args(root, tmp_path / "cold.csv", out, "--strategy", "uncertainty"),
    }[case]
    if case == "uncertainty_cold":  # every train photo unlabelled
        table = full.table.copy()
        table.loc[table["split"] == "train", ["split", "label"]] = ["unlabeled", ""]
        Manifest(table, full.root).save(tmp_path / "cold.csv")
    r = CliRunner().invoke(app, args)
    errors = [line for line in r.output.splitlines() if "error:" in line]
    assert r.exit_code == 2 and len(errors) == 1 and message in errors[0], r.output
    assert "Traceback" not in r.output and not out.exists()
