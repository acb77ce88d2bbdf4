"""Own photo collections: are wrong labels found? (`finegrain audit` on cub50 with planted label errors)

On ../shared/data/cub50 at --image-size (features at 1.125 x, flip-averaged, as evaluate reads them),
with the offline ImageNet tf_efficientnet_lite0:

    frozen   supcon --backbone-lr-scale 0: the ImageNet features as they are (its classifier unused)
    supcon   supcon at its defaults for --supcon-steps, trained on the manifest the cell audits (the
             noisy one for label errors, the 40 known species for the open set)

Label errors: 5% of the train labels are flipped, (a) uniformly to another species, (b) to the
nearest other species by class-mean embedding (confusable), for each seed. `finegrain audit` runs
on the noisy manifest; its label findings on train photos are scored against the planted flips
(precision, recall, F1), beside the simple baseline "the out-of-sample prediction differs from the
given label" (the same probabilities' argmax). The frozen features do not depend on labels; the
supcon model is trained on the noisy labels, as a user's would be.

Unknown species: 10 species (every 5th by name) are held out of train entirely; the artifact is
made on the other 40, with 10% of their train photos kept as val (its open-set threshold is
calibrated there). `finegrain evaluate` reports AUROC / FPR@95%TPR of relative Mahalanobis (the
default score), the kNN distance and max-softmax / max-logit; `finegrain predict` on the test photos
gives the share of unknown-species photos called `unknown` and of known-species photos named.
(Results keyed `open_set` are from an earlier version: kNN-distance threshold on a train hold-out.)

What to label next: every cub50 train photo unlabelled; `finegrain suggest --budget B` (cold start:
TypiClust) against B photos drawn at random (--random-draws per seed); the chosen photos get their
true labels and a linear probe (`finegrain evaluate`) is scored on the test photos; species covered.

Resumable: each finished cell is written to --out and skipped on the next run.

Usage: python benchmarks/bench_own_data.py [--seeds 3] [--label-probs ensemble linear knn] [--image-size 128]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from _runner import cached_features, finegrain  # benchmarks/ is on sys.path when a script here runs
from _results import write_results  # benchmarks/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data_manifests" / "cub50.csv"
FLIP_FRACTION = 0.05


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--label-probs", nargs="+", default=["ensemble", "linear", "knn"])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--budgets", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--random-draws", type=int, default=3, help="random selections per seed and budget")
    parser.add_argument("--sections", nargs="+", default=["label_errors", "open_set", "suggest"])
    parser.add_argument("--models", nargs="+", default=["frozen", "supcon"], help="suggest always uses frozen")
    parser.add_argument("--supcon-steps", type=int, default=100)
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "bench_own_data"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "own_data.json"))
    return parser.parse_args()


def frozen_artifact(args, runs: Path, manifest: Path = MANIFEST, name: str = "frozen") -> Path:
    """The ImageNet backbone as an artifact (only a head trains; its classifier is a probe on frozen features)."""
    out = runs / name
    if not (out / "artifact.json").is_file():
        finegrain("supcon", "--manifest", str(manifest), "--out", str(out), "--image-size", str(args.image_size),
                  "--backbone-lr-scale", "0", "--max-steps", "20", "--epochs", "1", "--no-knn-monitor",
                  "--cache-dir", str(runs / "cache"))
    return out


def model_artifact(args, runs: Path, model: str, manifest: Path, name: str) -> Path:
    """The artifact of `model` for a manifest: frozen features, or supcon trained on that manifest."""
    if model == "frozen":
        return frozen_artifact(args, runs, manifest, name)
    out = runs / name
    if not (out / "artifact.json").is_file():
        resume = ["--resume"] if (out / "checkpoint.pt").is_file() else []
        finegrain("supcon", "--manifest", str(manifest), "--out", str(out), "--image-size", str(args.image_size),
                  "--max-steps", str(args.supcon_steps), "--epochs", str(-(-args.supcon_steps // 22)),
                  "--no-knn-monitor", "--cache-dir", str(runs / "cache"), *resume)
    return out


def train_features(features_dir: Path, table: pd.DataFrame) -> np.ndarray:
    """The train rows' features from an audit's cache (every row, in manifest order; one model per folder)."""
    cached = list(cached_features(features_dir, "all-*").values())
    return cached[-1][(table["split"] == "train").to_numpy()]


def flip_labels(table: pd.DataFrame, kind: str, seed: int, features: np.ndarray | None) -> tuple[pd.DataFrame, set]:
    """A copy with FLIP_FRACTION of the train labels changed; the changed paths."""
    rng = np.random.default_rng(seed)
    train = np.nonzero((table["split"] == "train").to_numpy())[0]
    chosen = rng.choice(train, int(round(FLIP_FRACTION * len(train))), replace=False)
    names = sorted(set(table["label"]) - {""})
    nearest = None
    if kind == "confusable":
        labels = table["label"].to_numpy()[train]
        unit = features / np.linalg.norm(features, axis=1, keepdims=True)
        means = np.stack([unit[labels == n].mean(0) for n in names])
        means /= np.linalg.norm(means, axis=1, keepdims=True)
        sims = means @ means.T
        np.fill_diagonal(sims, -np.inf)
        nearest = {n: names[int(sims[i].argmax())] for i, n in enumerate(names)}
    noisy = table.copy()
    for i in chosen:
        given = noisy.at[i, "label"]
        noisy.at[i, "label"] = nearest[given] if nearest else rng.choice([n for n in names if n != given])
    return noisy, set(noisy["path"].iloc[chosen])


def scores(flagged: set, truth: set) -> dict:
    tp = len(flagged & truth)
    precision, recall = tp / max(len(flagged), 1), tp / len(truth)
    return {"flagged": len(flagged), "precision": round(precision, 4), "recall": round(recall, 4),
            "f1": round(2 * precision * recall / max(precision + recall, 1e-12), 4)}


def label_error_cell(args, runs: Path, model: str, kind: str, seed: int, probs: str, clean_features) -> dict:
    """Audit one noisy manifest; F1 of the label findings and of the argmax baseline on train photos."""
    from finegrain.data.manifest import Manifest
    from finegrain.curation.audit import out_of_sample_probabilities

    clean = Manifest.load(MANIFEST)
    noisy, truth = flip_labels(clean.table.reset_index(drop=True), kind, seed, clean_features)
    path = runs / f"noisy_{kind}_s{seed}.csv"
    Manifest.from_table(noisy, clean.root).save(path)
    if model == "frozen":
        artifact, features = frozen_artifact(args, runs), runs / "features"
    else:
        artifact = model_artifact(args, runs, model, path, f"{model}_{kind}_s{seed}")
        features = runs / f"features_{model}_{kind}_s{seed}"
    out = runs / f"audit_{kind}_s{seed}_{probs}" if model == "frozen" else runs / f"audit_{model}_{kind}_s{seed}_{probs}"
    seconds = finegrain("audit", str(artifact), "--manifest", str(path), "-o", str(out), "--label-probs", probs,
                        "--cache-dir", str(runs / "cache"), "--features-dir", str(features), "--wandb", "disabled")
    found = pd.read_csv(out / "audit.csv", keep_default_na=False)
    flagged = set(found.loc[(found["issue"] == "label") & (found["split"] == "train"), "path"])
    train = noisy[noisy["split"] == "train"]
    names = sorted(set(train["label"]))
    codes = np.searchsorted(names, train["label"].to_numpy())
    feats = train_features(features, noisy)
    predicted = out_of_sample_probabilities(probs, feats, codes, len(names)).argmax(1)
    baseline = set(train["path"].to_numpy()[predicted != codes])
    return {"audit": scores(flagged, truth), "baseline_argmax": scores(baseline, truth), "audit_s": round(seconds, 1)}


def main() -> None:
    args = parse_args()
    if not (REPO.parent / "shared" / "data" / "cub50" / "images.txt").is_file():
        sys.exit("needs ../shared/data/cub50 (the real CUB subset)")
    runs, out = Path(args.runs_dir), Path(args.out)
    runs.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text())["results"] if out.is_file() else {}
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, Python {platform.python_version()}",
              "command": "python benchmarks/bench_own_data.py " + " ".join(sys.argv[1:]), "results": results}
    save = lambda: write_results(out, record, resumed=True)  # noqa: E731
    done = lambda tag, value: (results.__setitem__(tag, value), save(),  # noqa: E731
                               print(json.dumps({tag: value}), flush=True))
    clean_features = None
    for model in args.models:
        if "open_set" in args.sections and f"{model}/open_set_val" not in results:
            done(f"{model}/open_set_val", open_set_cell(args, runs, model))
        if "suggest" in args.sections and model == "frozen":
            suggest_cells(args, runs, frozen_artifact(args, runs), results, save)
        for probs in args.label_probs if "label_errors" in args.sections else []:
            for kind in ("uniform", "confusable"):
                for seed in range(args.seeds):
                    tag = f"{model}/label_errors/{probs}/{kind}/s{seed}"
                    if tag in results:
                        continue
                    if kind == "confusable" and clean_features is None:
                        frozen_artifact(args, runs)
                        clean_features = train_features(runs / "features", _clean_table())
                    done(tag, label_error_cell(args, runs, model, kind, seed, probs, clean_features))
    for tag, r in results.items():
        if "audit" not in r:
            print(f"{tag:40s} {json.dumps(r)}")
            continue
        print(f"{tag:40s} audit F1 {r['audit']['f1']:.3f} (P {r['audit']['precision']:.3f} R {r['audit']['recall']:.3f})"
              f"  argmax baseline F1 {r['baseline_argmax']['f1']:.3f}  {r['audit_s']} s")


def open_set_cell(args, runs: Path, model: str) -> dict:
    """40 species trained (10% of their train photos kept as val, which calibrates the threshold), 10 held
    out of train: evaluate's open-set metrics and predict's calls on test."""
    from finegrain.data.manifest import Manifest

    clean = Manifest.load(MANIFEST)
    table = clean.table.copy()
    names = sorted(set(table["label"]) - {""})
    held_out = set(names[::5])
    table = table[~(table["label"].isin(held_out) & (table["split"] != "test"))].reset_index(drop=True)
    rng = np.random.default_rng(0)
    for _, rows in table[table["split"] == "train"].groupby("label"):  # a stratified 10% val, as custom_birds.yaml
        table.loc[rng.choice(rows.index, max(1, round(0.1 * len(rows))), replace=False), "split"] = "val"
    manifest, known_only = runs / "open_set_40v.csv", runs / "open_set_40v_known.csv"
    Manifest.from_table(table, clean.root).save(manifest)
    Manifest.from_table(table[~table["label"].isin(held_out)].reset_index(drop=True), clean.root).save(known_only)
    artifact = model_artifact(args, runs, model, known_only, f"{model}_40v")  # supcon refuses test-only species
    info = json.loads((artifact / "artifact.json").read_text())["open_set"]
    evaluation = runs / f"open_set_eval_{model}_40v"
    finegrain("evaluate", "--compare", "none", "--from", str(artifact), "--manifest", str(manifest), "--out", str(evaluation),
              "--cache-dir", str(runs / "cache"), "--wandb", "disabled", "--no-embedding-map")
    metrics = json.loads((evaluation / "report" / "metrics.json").read_text())
    ctx = metrics["context"]
    test = table[table["split"] == "test"]
    listing = runs / "open_set_test_photos"
    listing.mkdir(exist_ok=True)
    for rel in test["path"]:  # predict takes files or folders: link the test photos into one folder
        link = listing / rel.replace("/", "__")
        if not link.exists():
            link.symlink_to(clean.abspath(rel))
    predictions = runs / f"open_set_predict_{model}.csv"
    seconds = finegrain("predict", str(artifact), str(listing), "-o", str(predictions))
    preds = pd.read_csv(predictions, keep_default_na=False)
    truth = {str(clean.abspath(rel).resolve()): lab for rel, lab in zip(test["path"], test["label"])}
    label = preds["path"].map(lambda p: truth[str(Path(p).resolve())])  # predict resolves the links
    unknown = label.isin(held_out)
    called = preds["pred_1"] == "unknown"
    return {"score": info["score"], "threshold": info["threshold"], "k": info["k"], "calibrated_on": info["calibrated_on"],
            **{f"{m}_{score}": ctx.get(f"open_set_{m}_{score}") for m in ("auroc", "fpr95")
               for score in ("relative_mahalanobis", "knn_distance", "max_softmax", "max_logit")},
            "unknown_called_unknown": round(float(called[unknown].mean()), 4),
            "known_named": round(float((~called[~unknown]).mean()), 4),
            "known_named_correctly": round(float((preds["pred_1"][~unknown] == label[~unknown]).mean()), 4),
            "test_unknown_photos": int(unknown.sum()), "test_known_photos": int((~unknown).sum()),
            "predict_s": round(seconds, 1)}


def probe_top1(args, runs: Path, artifact: Path, chosen: set, tag: str) -> tuple[float, int]:
    """Linear-probe test top-1 with only the `chosen` train photos labelled; and the species they cover."""
    from finegrain.data.manifest import Manifest

    clean = Manifest.load(MANIFEST)
    table = clean.table.copy()
    train = table["split"] == "train"
    table.loc[train & ~table["path"].isin(chosen), ["split", "label"]] = ["unlabeled", ""]
    manifest = runs / f"{tag}.csv"
    Manifest.from_table(table, clean.root).save(manifest)
    out = runs / f"eval_{tag}"
    if not (out / "report" / "metrics.json").is_file():  # a run stopped after this evaluation resumes past it
        finegrain("evaluate", "--compare", "none", "--from", str(artifact), "--manifest", str(manifest), "--out", str(out),
                  "--cache-dir", str(runs / "cache"), "--features-dir", str(runs / "features"), "--wandb", "disabled",
                  "--no-embedding-map")
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    covered = table.loc[table["split"] == "train", "label"].nunique()
    return metrics["linear_top1"], int(covered)


def suggest_cells(args, runs: Path, artifact: Path, results: dict, save) -> None:
    """Cold-start suggestions against random picks, per budget and seed."""
    from finegrain.data.manifest import Manifest

    clean = Manifest.load(MANIFEST)
    pool_table = clean.table.copy()
    pool_table.loc[pool_table["split"] == "train", ["split", "label"]] = ["unlabeled", ""]
    pool = runs / "suggest_pool.csv"
    Manifest.from_table(pool_table, clean.root).save(pool)
    train_paths = clean.table.loc[clean.table["split"] == "train", "path"].to_numpy()
    for budget in args.budgets:
        for seed in range(args.seeds):
            tag = f"frozen/suggest/b{budget}/s{seed}"
            if tag in results:
                continue
            csv = runs / f"suggest_b{budget}_s{seed}.csv"
            seconds = finegrain("suggest", "--manifest", str(pool), "--from", str(artifact), "--budget", str(budget),
                                "-o", str(csv), "--seed", str(seed), "--cache-dir", str(runs / "cache"),
                                "--features-dir", str(runs / "features"))
            chosen = set(pd.read_csv(csv, keep_default_na=False)["path"])
            top1, covered = probe_top1(args, runs, artifact, chosen, f"suggest_b{budget}_s{seed}")
            rng = np.random.default_rng(1000 + seed)
            random_runs = [probe_top1(args, runs, artifact, set(rng.choice(train_paths, budget, replace=False)),
                                      f"random_b{budget}_s{seed}_{d}") for d in range(args.random_draws)]
            results[tag] = {"suggest_linear_top1": round(top1, 4), "suggest_species": covered,
                            "random_linear_top1": round(float(np.mean([r[0] for r in random_runs])), 4),
                            "random_species": round(float(np.mean([r[1] for r in random_runs])), 1),
                            "suggest_s": round(seconds, 1)}
            save()
            print(json.dumps({tag: results[tag]}), flush=True)


def _clean_table() -> pd.DataFrame:
    from finegrain.data.manifest import Manifest

    return Manifest.load(MANIFEST).table.reset_index(drop=True)


if __name__ == "__main__":
    main()
