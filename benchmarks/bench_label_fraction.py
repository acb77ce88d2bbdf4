"""Few labels, many photos: which path turns the unlabelled photos into accuracy, measured against the frozen
features and the seconds-cheap scikit-learn baselines?

On ../shared/data/cub50 (1452 train / 1500 test photos, 50 species), from offline ImageNet tf_efficientnet_lite0.
Labels kept on a stratified F of each species' train photos (`finegrain manifest split --label-fraction F --seed
S`), the rest unlabelled. Cells: 10% with seeds 0, 1, 2, then 5% and 30% (seed 0), then the label-less variant
(10% seed 0 with 10 species that have no labelled photo at all: their train photos unlabelled, their test photos
left out; `named_labelless` is the fraction of their photos that got a, necessarily wrong, name).

Feature arms, in this process on the very same features (read as `evaluate` reads a 128 px model: 144 px,
flip-averaged, through the shared features cache), scored on the test photos:

    frozen          kNN (k 20, T 0.07) and the linear probe on the labelled photos: evaluate's knn_top1 and
                    linear_top1 of the bare backbone; the probe is what a probe artifact's predict answers
    sklearn_st      the probe names every unlabelled photo, is refit on all of them (C chosen again as
                    evaluate's probe chooses it), and they join the kNN gallery
    sklearn_spread  sklearn.semi_supervised.LabelSpreading (knn kernel, k 10, alpha 0.8) names them instead
    pseudo_label    `finegrain pseudo-label` at its defaults (curation/pseudo_labels.py): classifier = the
                    artifact's classifier (what predict answers), knn_pseudo = kNN with the named photos in the
                    gallery, as `evaluate --from` reports them

Trained arms, `finegrain` commands at --image-size 128, each then `finegrain evaluate --from` it at its defaults
(classifier_top1: what predict answers; knn_top1 / linear_top1: refits on the labelled photos; knn_pseudo_top1
where the artifact names photos). Every fine-tuning run gets --steps optimizer steps, --warmup-steps of warm-up
(learning rate and head-only), 64 labelled photos a batch (+ 64 unlabelled for a teacher):

    teacher_probe    the path pipelines/few_labels.yaml shipped before issue 35: a probe artifact (supcon
                     --backbone-lr-scale 0 for 20 steps) teaches a student on labelled + unlabelled photos
                     (supcon --teacher)
    noisy_student    supcon --teacher <the cell's pseudo-label artifact>: the student, from ImageNet weights and
                     with its strong augmentation, distils the pseudo-label classifier on labelled + unlabelled
                     photos (Noisy Student, Xie et al. 2020)
    named_supcon_ce  supcon --loss supcon_ce on the pseudo-label artifact's pseudo_manifest.csv: fine-tuning on
                     labelled + named photos as if all were labelled
    relabel          pseudo-label --from <the noisy_student artifact>: the photos named again on the student's
                     features, the next round of the loop

Resumable: each finished arm is written to --out (with the commit measured) as soon as it is done and skipped on
the next run; finished artifacts in --runs-dir are reused and an interrupted training resumes from its checkpoint.

Usage: python benchmarks/bench_label_fraction.py [--cells 10pct_s0 ...] [--arms frozen pseudo_label noisy_student ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np

from _runner import finegrain  # benchmarks/ is on sys.path when a script here runs
from _results import code_version, write_results

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data_manifests" / "cub50.csv"
CELLS = ("10pct_s0", "10pct_s1", "10pct_s2", "5pct_s0", "30pct_s0", "10pct_s0_10_labelless")
FEATURE_ARMS = ("frozen", "sklearn_st", "sklearn_spread", "pseudo_label")
TRAINED_ARMS = ("teacher_probe", "noisy_student", "named_supcon_ce", "relabel")
EVALUATED = ("classifier_top1", "knn_top1", "linear_top1", "knn_pseudo_top1")
BATCH = 64


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=CELLS)
    parser.add_argument("--arms", nargs="+", default=list(FEATURE_ARMS + TRAINED_ARMS),
                        choices=FEATURE_ARMS + TRAINED_ARMS)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of every fine-tuning run")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "bench_label_fraction"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "label_fraction.json"))
    return parser.parse_args()


def manifest_of(cell: str, runs: Path) -> Path:
    """The cell's manifest in `runs` (written once: `finegrain manifest split`, or the label-less variant)."""
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


def label_less_species(manifest: Path, n: int, dest: Path) -> None:
    """`manifest` with n species (every 5th, sorted by name) unlabelled in train and left out of test and val."""
    from finegrain.data.manifest import Manifest

    m = Manifest.load(manifest)
    truth = Manifest.load(MANIFEST).table.set_index("path")["label"]
    species = sorted(truth.unique())[::max(1, len(truth.unique()) // n)][:n]
    table = m.table.copy()
    hidden = table["path"].map(truth).isin(species)
    table.loc[hidden & (table["split"] == "train"), ["split", "label"]] = ["unlabeled", ""]
    table = table[~(hidden & table["split"].isin(["val", "test"]))]
    Manifest.from_table(table, m.root).save(dest)


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
               "named": int(named.sum()),
               "pseudo_label_accuracy": float((names[named] == self.true_u[named]).mean()) if named.any() else None}
        labelless = ~np.isin(self.true_u, self.classes)
        if labelless.any():
            out["named_labelless"] = float(named[labelless].mean())
        return out


def feature_arm(arm: str, f: Features) -> dict:
    """One feature arm's test metrics on the cell's features."""
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


class Trained:
    """The trained arms of one cell: artifacts in the runs folder (reused when finished, resumed when interrupted)."""

    def __init__(self, args: argparse.Namespace, cell: str, manifest: Path):
        self.args, self.cell, self.manifest, self.runs = args, cell, manifest, Path(args.runs_dir)

    def out(self, name: str) -> Path:
        return self.runs / f"{self.cell}_{name}"

    def run(self, stage: str, name: str, *options: str) -> float:
        """`finegrain STAGE ... --out runs/<cell>_<name>` unless it finished; wall seconds (0 when reused)."""
        out = self.out(name)
        if (out / "artifact.json").is_file():
            return 0.0
        resume = ["--resume"] if (out / "checkpoint.pt").is_file() else []
        return finegrain(stage, "--out", str(out), *options, *resume)

    def supcon(self, name: str, manifest: Path, *options: str, steps: int | None = None) -> float:
        """A supcon run at the study's step budget: 64 labelled photos a batch (+ 64 unlabelled with a teacher, whose
        epoch is a pass over the unlabelled photos), warm-ups in steps."""
        from finegrain.data.manifest import Manifest

        counts = Manifest.load(manifest).split_counts()
        taught = "--teacher" in options
        per_epoch = max(counts.get("train", 0) // BATCH, counts.get("unlabeled", 0) // BATCH if taught else 0, 1)
        steps = steps or self.args.steps
        warm = f"{self.args.warmup_steps / per_epoch:.4f}"
        return self.run("supcon", name, "--manifest", str(manifest), "--image-size", "128", "--batch-size",
                        str(BATCH), "--max-steps", str(steps), "--epochs", str(-(-steps // per_epoch)),
                        "--warmup-epochs", warm, "--head-warmup-epochs", warm, "--no-knn-monitor", *options)

    def pseudo_label(self, name: str = "pseudo_label", *options: str) -> tuple[Path, float]:
        seconds = self.run("pseudo-label", name, "--manifest", str(self.manifest), *options)
        return self.out(name), seconds

    def arm(self, arm: str) -> dict:
        """Train the arm (and what it starts from), evaluate it; its metrics and training seconds."""
        seconds = 0.0
        if arm == "teacher_probe":
            seconds += self.supcon("probe", self.manifest, "--backbone-lr-scale", "0", steps=20)
            seconds += self.supcon(arm, self.manifest, "--teacher", str(self.out("probe")))
        elif arm == "noisy_student":
            teacher, seconds = self.pseudo_label()
            seconds += self.supcon(arm, self.manifest, "--teacher", str(teacher))
        elif arm == "named_supcon_ce":
            named, seconds = self.pseudo_label()
            seconds += self.supcon(arm, named / "pseudo_manifest.csv", "--loss", "supcon_ce")
        else:  # relabel
            seconds = self.arm("noisy_student")["train_s"]
            seconds += self.pseudo_label(arm, "--from", str(self.out("noisy_student")))[1]
        evaluation = self.runs / f"eval_{self.cell}_{arm}"
        if not (evaluation / "report" / "metrics.json").is_file():
            finegrain("evaluate", "--compare", "none", "--manifest", str(self.manifest), "--out", str(evaluation),
                      "--no-embedding-map", "--from", str(self.out(arm)))
        metrics = json.loads((evaluation / "report" / "metrics.json").read_text())
        return {**{k: metrics[k] for k in EVALUATED if metrics.get(k) is not None}, "train_s": round(seconds, 1)}


def main() -> None:
    args = parse_args()
    if not (REPO.parent / "shared" / "data" / "cub50" / "images.txt").is_file():
        sys.exit("needs ../shared/data/cub50 (the real CUB subset)")
    logging.basicConfig(level=logging.WARNING)
    runs, out = Path(args.runs_dir), Path(args.out)
    runs.mkdir(parents=True, exist_ok=True)
    record = json.loads(out.read_text()) if out.is_file() else {"results": {}}
    version = code_version()
    commit = (version["commit"] or "unknown")[:7] + ("+uncommitted changes" if version["dirty"] else "")
    record.update(machine=f"{platform.machine()}, Python {platform.python_version()}", manifest="data_manifests/cub50.csv",
                  reading="tf_efficientnet_lite0 offline ImageNet, 144 px flip-averaged (evaluate's reading of 128 px)",
                  steps=args.steps, warmup_steps=args.warmup_steps, batch=BATCH,
                  command="python benchmarks/bench_label_fraction.py " + " ".join(sys.argv[1:]))
    for cell in args.cells:
        manifest, features = manifest_of(cell, runs), None
        row = record["results"].setdefault(cell, {})
        for arm in args.arms:
            if arm in row:
                continue
            start = time.perf_counter()
            if arm in FEATURE_ARMS:
                features = features or Features(manifest)
                row.setdefault("labelled_images", len(features.xl))
                row.setdefault("unlabelled_images", len(features.xu))
                result = feature_arm(arm, features)
            else:
                result = Trained(args, cell, manifest).arm(arm)
            row[arm] = {**result, "seconds": round(time.perf_counter() - start, 1), "commit": commit,
                        "date": time.strftime("%Y-%m-%d")}
            write_results(out, record, resumed=True)
            print(json.dumps({cell: {arm: row[arm]}}), flush=True)
    summary(record)


def summary(record: dict) -> None:
    """Each cell and arm as classifier / kNN top-1 (kNN with the named photos in the gallery where there are any)."""
    arms = FEATURE_ARMS + TRAINED_ARMS
    print(f"{'cell':>24s} " + " ".join(f"{a:>16s}" for a in arms))
    for cell, row in record["results"].items():
        cols = []
        for arm in arms:
            r = row.get(arm) or {}
            knn = r.get("knn_pseudo_top1", r.get("knn_top1"))
            cols.append(f"{r['classifier_top1']:.3f} / {knn:.3f}" if r else "-")
        print(f"{cell:>24s} " + " ".join(f"{c:>16s}" for c in cols))


if __name__ == "__main__":
    main()
