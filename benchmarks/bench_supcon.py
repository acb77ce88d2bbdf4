"""SupCon against the frozen starting point and against cross-entropy on the same budget, on real birds.

Runs, through the `finegrain` command line, on ../shared/data/cub50 (50 CUB species, 1452 train /
1500 test images) from the offline ImageNet tf_efficientnet_lite0:

    evaluate (frozen, --image-size 128 [and 224])
    supcon --loss supcon  (defaults: frozen BN, backbone lr x0.1, 1 head-only epoch, P x K = 16 x 4)
    supcon --loss ce      (the same recipe, cross-entropy with label smoothing)
    evaluate each

and writes benchmarks/results/supcon_cub50.json with kNN / linear top-1, Recall@1, MAP@R and the wall
time of each command. About 35 minutes on a 2-core CPU with --epochs 5.

Usage: python benchmarks/bench_supcon.py [--epochs 5] [--image-size 128] [--runs-dir runs/bench_supcon] [--no-224]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data_manifests" / "cub50.csv"
KEYS = ("knn_top1", "knn_top5", "linear_top1", "linear_top5", "recall_at_1", "map_at_r")


def finegrain(*args: str) -> float:
    """Run one finegrain command; returns its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "finegrain", *args], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "bench_supcon"))
    parser.add_argument("--no-224", action="store_true", help="skip the frozen evaluation at 224 px")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "supcon_cub50.json"))
    args = parser.parse_args()
    if not (REPO.parent / "shared" / "data" / "cub50" / "images.txt").is_file():
        sys.exit("needs ../shared/data/cub50 (the real CUB subset)")
    runs = Path(args.runs_dir)
    shutil.rmtree(runs, ignore_errors=True)
    common = ["--manifest", str(MANIFEST), "--cache-dir", str(runs / "cache")]
    size = str(args.image_size)
    rows = {}

    def evaluate(name: str, *model: str) -> None:
        seconds = finegrain("evaluate", *common, "--out", str(runs / f"eval_{name}"), *model)
        metrics = json.loads((runs / f"eval_{name}" / "report" / "metrics.json").read_text())
        rows.setdefault(name, {}).update({k: metrics[k] for k in KEYS}, evaluate_s=round(seconds, 1),
                                         timings={k: v for k, v in metrics["context"].items() if k.startswith("time_")})

    evaluate(f"frozen_{size}px", "--backbone", "tf_efficientnet_lite0", "--image-size", size)
    for loss in ("supcon", "ce"):
        seconds = finegrain("supcon", *common, "--out", str(runs / loss), "--loss", loss, "--image-size", size,
                            "--epochs", str(args.epochs), "--no-knn-monitor")
        rows[loss] = {"train_s": round(seconds, 1)}
        evaluate(loss, "--from", str(runs / loss))
    if not args.no_224:
        evaluate("frozen_224px", "--backbone", "tf_efficientnet_lite0", "--image-size", "224")

    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {platform.python_version()}",
              "manifest": str(MANIFEST.relative_to(REPO)), "image_size": args.image_size, "epochs": args.epochs,
              "results": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'run':16s} " + " ".join(f"{k:>12s}" for k in KEYS))
    for name, r in rows.items():
        print(f"{name:16s} " + " ".join(f"{r.get(k, float('nan')):12.3f}" for k in KEYS))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
