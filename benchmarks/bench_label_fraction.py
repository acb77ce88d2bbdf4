"""Few labels, many photos: does pretraining on your own unlabelled birds help, and when?

On ../shared/data/cub50 (1452 train / 1500 test images, 50 species) at --image-size, from the offline
ImageNet tf_efficientnet_lite0, for each label fraction F (labels kept on a stratified F of each
class's train images with `finegrain manifest split --label-fraction F`, the rest unlabelled):

    (a) frozen      evaluate the ImageNet backbone (kNN and linear probe fit on the labelled images)
    (b) supcon      supcon on the labelled images only                      -> evaluate
    (c) pretrain    pretrain on every train image (labels unused; one run, shared by all F),
                    then supcon on the labelled images                      -> evaluate

Every supcon run gets the same number of optimizer steps (--supcon-steps, batches of 64), whatever F:
the budget is compute, not epochs. Test kNN / linear top-1 and R@1 go to
benchmarks/results/label_fraction.json and a table is printed.

Usage: python benchmarks/bench_label_fraction.py [--fractions 0.1 0.3 1.0] [--method moco] [--pretrain-epochs 2]
       [--pretrain-lr 0.005] [--supcon-steps 68] [--image-size 128] [--runs-dir runs/bench_label_fraction]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

from _runner import finegrain  # benchmarks/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data_manifests" / "cub50.csv"
KEYS = ("knn_top1", "linear_top1", "recall_at_1", "map_at_r")
BATCH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    parser.add_argument("--method", default="moco")
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--pretrain-lr", default="0.005")
    parser.add_argument("--supcon-steps", type=int, default=68, help="optimizer steps of every supcon run")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "bench_label_fraction"))
    parser.add_argument("--reuse-pretrain", action="store_true", help="keep a finished pretrain artifact in --runs-dir")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "label_fraction.json"))
    args = parser.parse_args()
    if not (REPO.parent / "shared" / "data" / "cub50" / "images.txt").is_file():
        sys.exit("needs ../shared/data/cub50 (the real CUB subset)")
    from finegrain.data.manifest import Manifest

    runs = Path(args.runs_dir)
    pretrain = runs / "pretrain"
    for old in runs.glob("*") if runs.is_dir() else []:  # a finished pretrain of the same settings is reused
        if args.reuse_pretrain and old.name in ("pretrain", "cache") and (pretrain / "artifact.json").is_file():
            continue
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    runs.mkdir(parents=True, exist_ok=True)
    size = ["--image-size", str(args.image_size)]
    cache = ["--cache-dir", str(runs / "cache")]
    rows: dict[str, dict] = {}

    def evaluate(name: str, manifest: Path, *model: str) -> dict:
        out = runs / f"eval_{name}"
        seconds = finegrain("evaluate", "--manifest", str(manifest), *cache, "--out", str(out), *model)
        metrics = json.loads((out / "report" / "metrics.json").read_text())
        return {**{k: metrics[k] for k in KEYS}, "evaluate_s": round(seconds, 1)}

    pretrain_s = 0.0 if (pretrain / "artifact.json").is_file() else finegrain("pretrain", "--manifest", str(MANIFEST), *cache, "--out", str(pretrain), "--method", args.method,
                           "--epochs", str(args.pretrain_epochs), "--lr", args.pretrain_lr, *size, "--no-knn-monitor")
    for fraction in args.fractions:
        tag = f"{round(fraction * 100)}pct"
        manifest = runs / f"cub50_{tag}.csv"
        finegrain("manifest", "split", str(MANIFEST), "--label-fraction", str(fraction), "--seed", str(args.seed),
                  "-o", str(manifest))
        labelled = len(Manifest.load(manifest).select("train"))
        epochs = str(math.ceil(args.supcon_steps / max(1, labelled // BATCH)))
        supcon = ["--manifest", str(manifest), *cache, *size, "--batch-size", str(BATCH), "--epochs", epochs,
                  "--max-steps", str(args.supcon_steps), "--no-knn-monitor"]
        result = {"labelled_images": labelled}
        result["frozen"] = evaluate(f"frozen_{tag}", manifest, "--backbone", "tf_efficientnet_lite0", *size)
        for arm, start in (("supcon", []), (f"{args.method}_then_supcon", ["--from", str(pretrain)])):
            out = runs / f"{arm}_{tag}"
            train_s = finegrain("supcon", *supcon, "--out", str(out), *start)
            result[arm] = {**evaluate(f"{arm}_{tag}", manifest, "--from", str(out)), "train_s": round(train_s, 1)}
        rows[tag] = result
        print(json.dumps({tag: result}, indent=1), flush=True)

    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, Python {platform.python_version()}",
           "manifest": str(MANIFEST.relative_to(REPO)), "image_size": args.image_size, "supcon_steps": args.supcon_steps,
           "pretrain": {"method": args.method, "epochs": args.pretrain_epochs, "lr": args.pretrain_lr,
                        "train_s": round(pretrain_s, 1)},
           "command": "python benchmarks/bench_label_fraction.py " + " ".join(sys.argv[1:]), "results": rows}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'labels':>7s} {'arm':>20s} " + " ".join(f"{k:>12s}" for k in KEYS))
    for tag, result in rows.items():
        for arm, r in result.items():
            if isinstance(r, dict):
                print(f"{tag:>7s} {arm:>20s} " + " ".join(f"{r[k]:12.3f}" for k in KEYS))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
