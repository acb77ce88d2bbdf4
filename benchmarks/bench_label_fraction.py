"""Few labels, many photos: which path turns the unlabelled photos into accuracy?

On ../shared/data/cub50 (1452 train / 1500 test images, 50 species) at --image-size, from the offline
ImageNet tf_efficientnet_lite0. For each label fraction F (labels kept on a stratified F of each
class's train images with `finegrain manifest split --label-fraction F --seed S`, the rest unlabelled),
each arm is trained, then evaluated with `finegrain evaluate` at its defaults (1.125 x the training
size, flip TTA; kNN and the linear probe fit on the labelled train images):

    frozen              the ImageNet backbone as it is (evaluated at the same size)
    supcon              supcon on the labelled photos only
    pseudo              supcon --unlabeled pseudo (EMA teacher, confident pseudo-labels in the SupCon term)
    pseudo_ce           the same with --pseudo-ce (pseudo-labels in the cross-entropy term too)
    teacher             supcon --teacher <the supcon arm's artifact>: a student from ImageNet weights
                        distils it on labelled + unlabelled photos (Su et al. 2021)
    probe               supcon --backbone-lr-scale 0 for --probe-steps: the frozen backbone (BatchNorm
                        statistics adapted) with the artifact's logistic-regression classifier
    teacher_probe       supcon --teacher <the probe arm's artifact>
    teacher_round2      supcon --teacher <the teacher arm's artifact>: a second round of self-training
    pretrain_then_X     pretrain at its defaults on every train photo (labels unused; one run shared
                        by all cells), then X = the better of pseudo / teacher in that cell (picked on
                        test accuracy, which flatters this arm)

Every fine-tuning arm gets the same number of optimizer steps (--steps) and the same warm-ups in
steps (--warmup-steps for the learning rate and for the head-only phase), whatever the label
fraction: the budget is optimizer steps, not epochs. Batches hold 64 labelled photos, plus 64
unlabelled ones in the pseudo and teacher arms.

Cells: each fraction with seed 0, the first fraction also with seeds 1.. (--seeds-first), and the
"label-less species" variant: at the first fraction, --label-less species have no labelled photo at
all (every train photo of theirs is unlabelled) and their test photos are left out of the metrics.

Resumable: each finished arm is written to --out as soon as it is done and skipped on the next run;
finished artifacts in --runs-dir are reused, and an interrupted training resumes from its checkpoint.

Usage: python benchmarks/bench_label_fraction.py [--fractions 0.1 0.3 1.0] [--steps 100] [--image-size 128]
       [--seeds-first 2] [--label-less 10]
       [--arms frozen supcon probe teacher_probe teacher pseudo pretrain]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import yaml

from _runner import finegrain  # benchmarks/ is on sys.path when a script here runs
from _results import write_results  # benchmarks/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data_manifests" / "cub50.csv"
KEYS = ("knn_top1", "linear_top1", "recall_at_1", "map_at_r")
BATCH = 64
SEMI_ARMS = ("pseudo", "pseudo_ce", "teacher", "teacher_probe", "teacher_round2")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    parser.add_argument("--seeds-first", type=int, default=2, help="seeds at the first fraction")
    parser.add_argument("--label-less", type=int, default=10, help="species without labels in the variant (0: none)")
    parser.add_argument("--arms", nargs="+", default=["frozen", "supcon", "probe", "teacher_probe", "teacher", "pseudo", "pretrain"])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of every fine-tuning arm")
    parser.add_argument("--probe-steps", type=int, default=20, help="steps of the probe arm (its backbone is frozen)")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "bench_label_fraction"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "label_fraction.json"))
    return parser.parse_args()


class Study:
    """The runs folder, the results file (read back on start, rewritten after every arm) and the shared flags."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.runs, self.out = args, Path(args.runs_dir), Path(args.out)
        self.runs.mkdir(parents=True, exist_ok=True)
        old = json.loads(self.out.read_text()) if self.out.is_file() else {}
        same = old.get("steps") == args.steps and old.get("image_size") == args.image_size
        self.results: dict[str, dict] = old.get("results", {}) if same else {}
        self.pretrain: dict = old.get("pretrain", {}) if same else {}

    def cache(self) -> list[str]:
        return ["--cache-dir", str(self.runs / "cache")]

    def save(self) -> None:
        record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, Python {platform.python_version()}",
                  "manifest": str(MANIFEST.relative_to(REPO)), "image_size": self.args.image_size,
                  "steps": self.args.steps, "warmup_steps": self.args.warmup_steps, "batch": BATCH,
                  "evaluated_at": "finegrain evaluate defaults (1.125 x image size, flip TTA)",
                  "command": "python benchmarks/bench_label_fraction.py " + " ".join(sys.argv[1:]),
                  "pretrain": self.pretrain, "results": self.results}
        write_results(self.out, record, resumed=True)

    def evaluate(self, name: str, manifest: Path, *model: str) -> dict:
        """`finegrain evaluate` of `model` into runs/eval_<name>: the KEYS metrics and its wall time."""
        out = self.runs / f"eval_{name}"
        seconds = 0.0
        if not (out / "report" / "metrics.json").is_file():
            seconds = finegrain("evaluate", "--compare", "none", "--manifest", str(manifest), *self.cache(), "--out", str(out),
                                "--no-embedding-map", *model)
        metrics = json.loads((out / "report" / "metrics.json").read_text())
        return {**{k: metrics[k] for k in KEYS}, "evaluate_s": round(seconds, 1)}

    def train(self, stage: str, out: Path, *options: str) -> float:
        """Run a training stage into `out` unless it finished there; resume an interrupted one. Wall seconds."""
        if (out / "artifact.json").is_file():
            return 0.0
        resume = ["--resume"] if (out / "checkpoint.pt").is_file() else []
        return finegrain(stage, *self.cache(), "--out", str(out), "--image-size", str(self.args.image_size), *options,
                         *resume)


def supcon_options(study: Study, manifest: Path, labelled: int, unlabelled: int, semi: bool,
                   steps: int | None = None) -> list[str]:
    """The same step budget (unless `steps`) and warm-ups (in steps) for every fine-tuning arm."""
    per_epoch = max(labelled // BATCH, unlabelled // BATCH if semi else 0, 1)
    args = study.args
    steps = steps or args.steps
    warm = f"{args.warmup_steps / per_epoch:.4f}"
    return ["--manifest", str(manifest), "--batch-size", str(BATCH), "--max-steps", str(steps),
            "--epochs", str(-(-steps // per_epoch)), "--warmup-epochs", warm, "--head-warmup-epochs", warm,
            "--no-knn-monitor"]


def run_cell(study: Study, tag: str, manifest: Path) -> None:
    """Every arm of one cell (a manifest), each skipped when its result is already in the results file."""
    from finegrain.data.manifest import Manifest

    table = Manifest.load(manifest).split_counts()
    labelled, unlabelled = table.get("train", 0), table.get("unlabeled", 0)
    row = study.results.setdefault(tag, {"labelled_images": labelled, "unlabelled_images": unlabelled})
    size = str(study.args.image_size * 9 // 8)
    arms = study.args.arms
    if "frozen" in arms and "frozen" not in row:
        row["frozen"] = study.evaluate(f"{tag}_frozen", manifest, "--backbone", "tf_efficientnet_lite0", "--image-size", size)
        study.save()
    starts = {"supcon": [], "probe": ["--backbone-lr-scale", "0"],
              "teacher_probe": ["--teacher", str(study.runs / f"{tag}_probe")],
              "teacher_round2": ["--teacher", str(study.runs / f"{tag}_teacher")],  # the supcon teacher's student
              "teacher": ["--teacher", str(study.runs / f"{tag}_supcon")],
              "pseudo": ["--unlabeled", "pseudo"], "pseudo_ce": ["--unlabeled", "pseudo", "--pseudo-ce"]}
    for arm, extra in starts.items():
        if arm not in arms or arm in row or (arm.startswith("pseudo") and not unlabelled):
            continue
        out = study.runs / f"{tag}_{arm}"
        steps = study.args.probe_steps if arm == "probe" else None
        train_s = study.train("supcon", out, *supcon_options(study, manifest, labelled, unlabelled, arm in SEMI_ARMS,
                                                             steps), *extra)
        row[arm] = {**study.evaluate(f"{tag}_{arm}", manifest, "--from", str(out)), "train_s": round(train_s, 1)}
        study.save()
        print(json.dumps({tag: {arm: row[arm]}}), flush=True)
    semi = [a for a in SEMI_ARMS if a in row]
    if "pretrain" in arms and semi and not any(k.startswith("pretrain_then_") for k in row):
        best = max(semi, key=lambda a: row[a]["knn_top1"] + row[a]["linear_top1"])
        out = study.runs / f"{tag}_pretrain_then_{best}"
        train_s = study.train("supcon", out, *supcon_options(study, manifest, labelled, unlabelled, True),
                              *starts[best], "--from", str(pretrain(study)))
        row[f"pretrain_then_{best}"] = {**study.evaluate(f"{tag}_pretrain_then_{best}", manifest, "--from", str(out)),
                                        "train_s": round(train_s, 1)}
        study.save()


def pretrain(study: Study) -> Path:
    """The pretrain artifact at its defaults on every cub50 train photo (labels unused), with its kNN monitor."""
    out = study.runs / "pretrain"
    seconds = study.train("pretrain", out, "--manifest", str(MANIFEST), "--batch-size", str(BATCH),
                          "--epochs", str(study.args.pretrain_epochs))
    if not study.pretrain:
        monitor = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "monitor/knn_top1_test" in line]
        config = yaml.safe_load((out / "config.yaml").read_text())
        study.pretrain = {"train_s": round(seconds, 1), "method": config["method"], "lr": config["resolved_lr"],
                          "train_layers": config["resolved_train_layers"], "views": config["resolved_views"],
                          "knn_monitor_start": monitor[0]["monitor/knn_top1_test"],
                          "knn_monitor_end": monitor[-1]["monitor/knn_top1_test"]}
        study.save()
    return out


def cells(study: Study) -> dict[str, Path]:
    """Tag -> manifest of every cell, written into the runs folder (deterministic for the seeds)."""
    args, out = study.args, {}
    for i, fraction in enumerate(args.fractions):
        for seed in range(args.seeds_first if i == 0 else 1):
            tag = f"{round(fraction * 100)}pct_s{seed}"
            out[tag] = study.runs / f"cub50_{tag}.csv"
            if not out[tag].is_file():
                finegrain("manifest", "split", str(MANIFEST), "--label-fraction", str(fraction), "--seed", str(seed),
                          "-o", str(out[tag]))
    if args.label_less:
        first = next(iter(out.values()))
        tag = f"{round(args.fractions[0] * 100)}pct_s0_{args.label_less}_labelless"
        out[tag] = study.runs / f"cub50_{tag}.csv"
        if not out[tag].is_file():
            label_less_species(first, args.label_less, out[tag])
    return out


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


def print_table(study: Study) -> None:
    print(f"{'cell':>24s} {'arm':>24s} " + " ".join(f"{k:>12s}" for k in KEYS))
    for tag, row in study.results.items():
        for arm, r in row.items():
            if isinstance(r, dict):
                print(f"{tag:>24s} {arm:>24s} " + " ".join(f"{r[k]:12.3f}" for k in KEYS))
    print(f"wrote {study.out}")


def main() -> None:
    args = parse_args()
    if not (REPO.parent / "shared" / "data" / "cub50" / "images.txt").is_file():
        sys.exit("needs ../shared/data/cub50 (the real CUB subset)")
    study = Study(args)
    for tag, manifest in cells(study).items():
        run_cell(study, tag, manifest)
    print_table(study)


if __name__ == "__main__":
    main()
