"""Accuracy on real birds after each stage: frozen ImageNet -> pretrain -> supcon, kNN / linear top-1 and R@1.

Runs, through the `finegrain` command line, on ../shared/data/cub50 (50 CUB species, 1452 train /
1500 test images) from the offline ImageNet tf_efficientnet_lite0 at --image-size:

    evaluate  frozen backbone
    pretrain  --method M --epochs E1 --lr LR          (train images, labels unused)    -> evaluate
    supcon    --from PRETRAIN --epochs E2            (labelled train images)           -> evaluate
  with --baselines also, on the same supcon budget from the ImageNet weights:
    supcon    --loss supcon                                                            -> evaluate
    supcon    --loss ce                                                                -> evaluate

and writes benchmarks/results/accuracy_cub50.json with kNN / linear top-1 (top-5), Recall@1/2/4/8,
MAP@R and the wall time of each command. The chain alone takes about 35 minutes on a 2-core CPU;
--baselines adds about 30.

Usage: python benchmarks/bench_accuracy.py [--method simclr] [--pretrain-epochs 3] [--pretrain-lr 0.01]
       [--supcon-epochs 5] [--image-size 128] [--baselines] [--runs-dir runs/bench_accuracy]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

from _runner import finegrain  # benchmarks/ is on sys.path when a script here runs
from _results import write_results  # benchmarks/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data_manifests" / "cub50.csv"
KEYS = ("knn_top1", "knn_top5", "linear_top1", "linear_top5", "recall_at_1", "recall_at_2", "recall_at_4",
        "recall_at_8", "map_at_r")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--pretrain-lr", default="0.01")
    parser.add_argument("--supcon-epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--baselines", action="store_true", help="also supcon and ce from the ImageNet weights")
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "bench_accuracy"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "accuracy_cub50.json"))
    args = parser.parse_args()
    if not (REPO.parent / "shared" / "data" / "cub50" / "images.txt").is_file():
        sys.exit("needs ../shared/data/cub50 (the real CUB subset)")
    runs = Path(args.runs_dir)
    shutil.rmtree(runs, ignore_errors=True)
    common = ["--manifest", str(MANIFEST), "--cache-dir", str(runs / "cache")]
    size = ["--image-size", str(args.image_size)]
    rows = {}

    def evaluate(name: str, *model: str) -> None:
        seconds = finegrain("evaluate", *common, "--compare", "none", "--out", str(runs / f"eval_{name}"), *model)
        metrics = json.loads((runs / f"eval_{name}" / "report" / "metrics.json").read_text())
        rows.setdefault(name, {}).update({k: metrics[k] for k in KEYS}, evaluate_s=round(seconds, 1))

    def train(name: str, stage: str, *options: str) -> None:
        rows[name] = {"command": f"finegrain {stage} " + " ".join(options),
                      "train_s": round(finegrain(stage, *common, "--out", str(runs / name), *options), 1)}
        evaluate(name, "--from", str(runs / name))

    evaluate("frozen", "--backbone", "tf_efficientnet_lite0", *size)
    train("pretrain", "pretrain", "--method", args.method, "--epochs", str(args.pretrain_epochs), "--lr", args.pretrain_lr,
          *size, "--no-knn-monitor")
    supcon = ["--epochs", str(args.supcon_epochs), *size, "--no-knn-monitor"]
    train("pretrain_then_supcon", "supcon", "--from", str(runs / "pretrain"), *supcon)
    if args.baselines:
        train("imagenet_then_supcon", "supcon", "--loss", "supcon", *supcon)
        train("imagenet_then_ce", "supcon", "--loss", "ce", *supcon)

    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, Python {platform.python_version()}",
              "manifest": str(MANIFEST.relative_to(REPO)), "image_size": args.image_size,
              "command": "python benchmarks/bench_accuracy.py " + " ".join(sys.argv[1:]), "results": rows}
    write_results(args.out, result)
    print(f"{'run':22s} " + " ".join(f"{k:>12s}" for k in KEYS[:6]))
    for name, r in rows.items():
        print(f"{name:22s} " + " ".join(f"{r.get(k, float('nan')):12.3f}" for k in KEYS[:6]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
