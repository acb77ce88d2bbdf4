"""Few labels, many photos, against the right baselines: does `finegrain pseudo-label` beat the frozen features
and the seconds-cheap scikit-learn self-training?

On ../shared/data/cub50 (1452 train / 1500 test photos, 50 species), offline ImageNet tf_efficientnet_lite0
read as `finegrain evaluate` reads a 128 px model by default (144 px, flip-averaged, through the shared
features cache: every arm sees the very same features). Labels kept on a stratified F of each species'
train photos (`finegrain manifest split --label-fraction F --seed S`, the manifests of
bench_label_fraction.py), the rest unlabelled. Arms, each reporting on the test photos:

    frozen          kNN (k 20, T 0.07) and the linear probe on the labelled photos: evaluate's knn_top1 and
                    linear_top1 of the bare backbone; the probe is also what a probe artifact's predict answers
    sklearn_st      the issue's baseline: the probe names every unlabelled photo, is refit on all of them (C
                    chosen again as evaluate's probe chooses it), and they join the kNN gallery
    sklearn_spread  sklearn.semi_supervised.LabelSpreading (knn kernel, k 10, alpha 0.8) names them instead
    pseudo_label    `finegrain pseudo-label` (curation/pseudo_labels.py at its defaults): classifier = the
                    artifact's classifier (what predict answers), knn_pseudo = kNN with the named photos in
                    the gallery, as `evaluate --from` reports them

Cells: 10% with seeds 0, 1, 2 first, then 5% and 30% (seed 0), then the label-less variant (10% seed 0,
10 species with no labelled photo at all: their train photos unlabelled, their test photos left out;
`named_labelless` is the fraction of their photos that got a (necessarily wrong) name).

Resumable: each finished arm is written to --out (with the commit measured) as soon as it is done and
skipped on the next run. Usage: python benchmarks/bench_few_labels.py [--cells 10pct_s0 10pct_s1 ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from _runner import finegrain  # benchmarks/ is on sys.path when a script here runs
from _results import code_version, write_results

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data_manifests" / "cub50.csv"
CELLS = ("10pct_s0", "10pct_s1", "10pct_s2", "5pct_s0", "30pct_s0", "10pct_s0_10_labelless")
ARMS = ("frozen", "sklearn_st", "sklearn_spread", "pseudo_label")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=CELLS)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "bench_few_labels"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "few_labels.json"))
    return parser.parse_args()


def manifest_of(cell: str, runs: Path) -> Path:
    """The cell's manifest in `runs` (written once: `finegrain manifest split`, or the label-less variant)."""
    from bench_label_fraction import label_less_species

    path = runs / f"cub50_{cell}.csv"
    if path.is_file():
        return path
    fraction, seed = cell.split("_")[0], cell.split("_")[1]
    if cell.endswith("labelless"):
        label_less_species(manifest_of(f"{fraction}_{seed}", runs), int(cell.split("_")[2]), path)
    else:
        finegrain("manifest", "split", str(MANIFEST), "--label-fraction", str(int(fraction[:-3]) / 100), "--seed",
                  seed[1:], "-o", str(path))
    return path


class Features:
    """The cell's photos read as evaluate reads a 128 px lite0 (144 px, flip), from the shared features cache."""

    def __init__(self, manifest: Path):
        import torch

        from finegrain.config import EvaluateConfig
        from finegrain.data.manifest import Manifest
        from finegrain.features.store import FeatureStore
        from finegrain.features.subject import Subject

        cfg = EvaluateConfig(manifest=str(manifest), out="unused", backbone="tf_efficientnet_lite0", image_size=144,
                             workers=1)
        self.manifest = Manifest.load(manifest)
        store = FeatureStore(cfg, Subject(cfg), torch.device("cpu"))
        train, unlabelled = self.manifest.rows("train"), self.manifest.rows("unlabeled")
        self.classes = sorted(set(train.table["label"].astype(str)))
        test = self.manifest.rows("test", self.classes)
        self.xl, self.yl = store.features(train, "train").numpy(), train.class_codes(self.classes).numpy()
        self.xu = store.features(unlabelled, "unlabeled").numpy()
        self.xt, self.yt = store.features(test, "test").numpy(), test.class_codes(self.classes).numpy()
        truth = Manifest.load(MANIFEST).table.set_index("path")["label"]
        self.true_u = unlabelled.table["path"].map(truth).to_numpy()  # for scoring the pseudo-labels only

    def knn_top1(self, xg, yg) -> float:
        import torch

        from finegrain.eval.knn import knn_scores, topk_accuracy

        scores = knn_scores(torch.from_numpy(xg), torch.from_numpy(yg), torch.from_numpy(self.xt),
                            num_classes=len(self.classes), k=20, temperature=0.07)
        return topk_accuracy(scores, torch.from_numpy(self.yt))[1]

    def scored(self, labels: np.ndarray, classifier) -> dict:
        """Metrics of a labelling of the unlabelled photos ((U,) ids, -1 unnamed) and its classifier (a LinearProbe)."""
        named = labels >= 0
        names = np.asarray(self.classes, dtype=object)[np.maximum(labels, 0)]
        out = {"classifier_top1": float((classifier.predict(self.xt) == self.yt).mean()),
               "knn_pseudo_top1": self.knn_top1(np.concatenate([self.xl, self.xu[named]]),
                                                np.concatenate([self.yl, labels[named]])),
               "named": int(named.sum()), "pseudo_label_accuracy": float((names[named] == self.true_u[named]).mean())}
        labelless = ~np.isin(self.true_u, self.classes)
        if labelless.any():
            out["named_labelless"] = float(named[labelless].mean())
        return out


def run_arm(arm: str, f: Features) -> dict:
    from finegrain.eval.linear import fit_linear_probe

    C = len(f.classes)
    if arm == "frozen":
        probe = fit_linear_probe(f.xl, f.yl, num_classes=C)
        top1 = float((probe.predict(f.xt) == f.yt).mean())
        return {"classifier_top1": top1, "linear_top1": top1, "knn_top1": f.knn_top1(f.xl, f.yl)}
    if arm == "sklearn_st":
        labels = fit_linear_probe(f.xl, f.yl, num_classes=C).predict(f.xu)
    elif arm == "sklearn_spread":
        from sklearn.semi_supervised import LabelSpreading

        x = np.concatenate([f.xl, f.xu]) / np.linalg.norm(np.concatenate([f.xl, f.xu]), axis=1, keepdims=True)
        spread = LabelSpreading(kernel="knn", n_neighbors=10, alpha=0.8, max_iter=100)
        spread.fit(x, np.concatenate([f.yl, np.full(len(f.xu), -1)]))
        labels = spread.transduction_[len(f.xl):].astype(np.int64)
    else:
        from finegrain.curation.pseudo_labels import pseudo_label

        found = pseudo_label(f.xl, f.yl, f.xu, num_classes=C)
        return {**f.scored(found.labelling.labels, found.probe), "rounds": found.labelling.rounds,
                "held_top1": found.held_top1, "held_top1_labels_only": found.held_top1_labels_only}
    probe = fit_linear_probe(np.concatenate([f.xl, f.xu]), np.concatenate([f.yl, labels]), num_classes=C)
    return f.scored(labels, probe)


def main() -> None:
    args = parse_args()
    if not (REPO.parent / "shared" / "data" / "cub50" / "images.txt").is_file():
        sys.exit("needs ../shared/data/cub50 (the real CUB subset)")
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
    runs, out = Path(args.runs_dir), Path(args.out)
    runs.mkdir(parents=True, exist_ok=True)
    record = json.loads(out.read_text()) if out.is_file() else {"results": {}}
    version = code_version()
    commit = (version["commit"] or "unknown")[:7] + ("+uncommitted changes" if version["dirty"] else "")
    record.update(machine=f"{platform.machine()}, Python {platform.python_version()}", manifest="data_manifests/cub50.csv",
                  reading="tf_efficientnet_lite0 offline ImageNet, 144 px flip-averaged (evaluate's reading of 128 px)",
                  command="python benchmarks/bench_few_labels.py " + " ".join(sys.argv[1:]))
    for cell in args.cells:
        features = None
        row = record["results"].setdefault(cell, {})
        for arm in args.arms:
            if arm in row:
                continue
            features = features or Features(manifest_of(cell, runs))
            row.setdefault("labelled_images", len(features.xl))
            row.setdefault("unlabelled_images", len(features.xu))
            start = time.perf_counter()
            row[arm] = {**run_arm(arm, features), "seconds": round(time.perf_counter() - start, 1), "commit": commit,
                        "date": time.strftime("%Y-%m-%d")}
            write_results(out, record, resumed=True)
            print(json.dumps({cell: {arm: row[arm]}}), flush=True)
    summary(record)


def summary(record: dict) -> None:
    """Mean of the 10% draws, and each cell, as classifier / kNN (pseudo gallery) top-1."""
    print(f"{'cell':>24s} " + " ".join(f"{a:>22s}" for a in ARMS))
    for cell, row in record["results"].items():
        cols = []
        for arm in ARMS:
            r = row.get(arm) or {}
            knn = r.get("knn_pseudo_top1", r.get("knn_top1"))
            cols.append(f"{r['classifier_top1']:.3f} / {knn:.3f}" if r else "-")
        print(f"{cell:>24s} " + " ".join(f"{c:>22s}" for c in cols))


if __name__ == "__main__":
    main()
