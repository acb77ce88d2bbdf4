"""Few labels, many photos: does pretraining on your own unlabelled birds help, and when?

On ../shared/data/cub50 (1452 train / 1500 test images, 50 species) at --image-size, from the offline
ImageNet tf_efficientnet_lite0, for each label fraction F (labels kept on a stratified F of each
class's train images with `finegrain manifest split --label-fraction F`, the rest unlabelled):

    (a) frozen      evaluate the ImageNet backbone (kNN and linear probe fit on the labelled images)
    (b) supcon      supcon on the labelled images only                      -> evaluate
    (c) pretrain    pretrain on every train image (labels unused) with each of --methods (one run per
                    method, shared by all F); the method whose pretrained backbone gives the best
                    test kNN top-1 at the first fraction is the one carried on, then supcon on the
                    labelled images                                         -> evaluate

Every supcon run gets the same number of optimizer steps (--supcon-steps, batches of 64), whatever F:
the budget is compute, not epochs. Test kNN / linear top-1 and R@1 go to
benchmarks/results/label_fraction.json and a table is printed.

The screen picks on test accuracy, which flatters arm (c): if (c) still does not beat (a) and (b),
pretraining does not pay here. Pretraining keeps the ImageNet BatchNorm statistics (the default
--freeze-bn).

Usage: python benchmarks/bench_label_fraction.py [--fractions 0.1 0.3 1.0] [--methods simclr moco byol simsiam]
       [--pretrain-epochs 2] [--pretrain-lr LR] [--supcon-steps 40] [--image-size 128] [--reuse-pretrain]
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

import yaml

from _runner import finegrain  # benchmarks/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data_manifests" / "cub50.csv"
KEYS = ("knn_top1", "linear_top1", "recall_at_1", "map_at_r")
BATCH = 64


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    parser.add_argument("--methods", nargs="+", default=["simclr", "moco", "byol", "simsiam"])
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--pretrain-lr", default=None, help="default: each method's own base rate x batch / 256")
    parser.add_argument("--supcon-steps", type=int, default=40, help="optimizer steps of every supcon run")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "bench_label_fraction"))
    parser.add_argument("--reuse-pretrain", action="store_true", help="keep finished pretrain artifacts in --runs-dir")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "label_fraction.json"))
    return parser.parse_args()


def size_flags(args: argparse.Namespace) -> list[str]:
    return ["--image-size", str(args.image_size)]


def cache_flags(runs: Path) -> list[str]:
    return ["--cache-dir", str(runs / "cache")]


def prepare_runs_dir(runs: Path, reuse_pretrain: bool) -> None:
    """Empty `runs` (keeping finished pretrain artifacts and the image cache with --reuse-pretrain) and create it."""
    for old in runs.glob("*") if runs.is_dir() else []:  # finished pretrain artifacts are reused on request
        if reuse_pretrain and (old.name == "cache" or (old / "artifact.json").is_file() and old.name.startswith("pretrain_")):
            continue
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    runs.mkdir(parents=True, exist_ok=True)


def evaluate(runs: Path, name: str, manifest: Path, *model: str) -> dict:
    """`finegrain evaluate` of `model` on `manifest` into runs/eval_<name>: the KEYS metrics and its wall time."""
    out = runs / f"eval_{name}"
    seconds = finegrain("evaluate", "--manifest", str(manifest), *cache_flags(runs), "--out", str(out), *model)
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    return {**{k: metrics[k] for k in KEYS}, "evaluate_s": round(seconds, 1)}


def run_pretrains(args: argparse.Namespace, runs: Path) -> dict:
    """Pretrain with each of --methods on every train image (unless a finished artifact is there already)."""
    pretrains = {}
    for method in args.methods:
        path = runs / f"pretrain_{method}"
        lr = ["--lr", args.pretrain_lr] if args.pretrain_lr else []
        seconds = 0.0 if (path / "artifact.json").is_file() else finegrain(
            "pretrain", "--manifest", str(MANIFEST), *cache_flags(runs), "--out", str(path), "--method", method,
            "--epochs", str(args.pretrain_epochs), *lr, *size_flags(args), "--batch-size", str(BATCH), "--no-knn-monitor")
        pretrains[method] = {"train_s": round(seconds, 1),
                             "lr": yaml.safe_load((path / "config.yaml").read_text())["resolved_lr"]}
    return pretrains


def split_fractions(args: argparse.Namespace, runs: Path) -> dict[str, Path]:
    """One manifest per label fraction, keyed by its tag ("10pct")."""
    manifests = {}
    for fraction in args.fractions:
        tag = f"{round(fraction * 100)}pct"
        manifests[tag] = runs / f"cub50_{tag}.csv"
        finegrain("manifest", "split", str(MANIFEST), "--label-fraction", str(fraction), "--seed", str(args.seed),
                  "-o", str(manifests[tag]))
    return manifests


def screen_pretrains(args: argparse.Namespace, runs: Path, manifests: dict[str, Path], pretrains: dict) -> tuple[str, str]:
    """kNN of each pretrained backbone as it is with the first fraction's labels (recorded in `pretrains`).

    Returns the screen's fraction tag and the method carried on (best test kNN top-1).
    """
    screen_tag = next(iter(manifests))
    for method in args.methods:  # the screen: each pretrained backbone as it is, kNN with the first fraction's labels
        out = runs / f"eval_pretrain_{method}"
        finegrain("evaluate", "--manifest", str(manifests[screen_tag]), *cache_flags(runs), "--out", str(out),
                  "--from", str(runs / f"pretrain_{method}"), "--no-linear", "--no-embedding-map")
        metrics = json.loads((out / "report" / "metrics.json").read_text())
        pretrains[method].update({f"screen_{k}": metrics[k] for k in ("knn_top1", "recall_at_1", "map_at_r")})
    best = max(args.methods, key=lambda m: pretrains[m]["screen_knn_top1"])
    print(f"pretrain screen at {screen_tag}: " + ", ".join(f"{m} {pretrains[m]['screen_knn_top1']:.3f}" for m in args.methods)
          + f"; carrying {best} on", flush=True)
    return screen_tag, best


def run_fraction(args: argparse.Namespace, runs: Path, tag: str, manifest: Path, labelled: int, best: str) -> dict:
    """The three arms at one label fraction: frozen, supcon, and `best` pretrain then supcon."""
    size, cache = size_flags(args), cache_flags(runs)
    epochs = str(math.ceil(args.supcon_steps / max(1, labelled // BATCH)))
    supcon = ["--manifest", str(manifest), *cache, *size, "--batch-size", str(BATCH), "--epochs", epochs,
              "--max-steps", str(args.supcon_steps), "--no-knn-monitor"]
    result = {"labelled_images": labelled}
    result["frozen"] = evaluate(runs, f"frozen_{tag}", manifest, "--backbone", "tf_efficientnet_lite0", *size)
    for arm, start in (("supcon", []), (f"{best}_then_supcon", ["--from", str(runs / f"pretrain_{best}")])):
        out = runs / f"{arm}_{tag}"
        train_s = finegrain("supcon", *supcon, "--out", str(out), *start)
        result[arm] = {**evaluate(runs, f"{arm}_{tag}", manifest, "--from", str(out)), "train_s": round(train_s, 1)}
    return result


def write_and_print(args: argparse.Namespace, pretrains: dict, screen_tag: str, best: str, rows: dict) -> None:
    """Write the JSON record to --out, then print the table of every arm at every fraction."""
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, Python {platform.python_version()}",
           "manifest": str(MANIFEST.relative_to(REPO)), "image_size": args.image_size, "supcon_steps": args.supcon_steps,
           "pretrain": {"epochs": args.pretrain_epochs, "batch_size": BATCH, "freeze_bn": True, "methods": pretrains,
                        "screen": f"test kNN top-1 of each pretrained backbone with the {screen_tag} labels",
                        "carried_on": best},
           "command": "python benchmarks/bench_label_fraction.py " + " ".join(sys.argv[1:]), "results": rows}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'labels':>7s} {'arm':>20s} " + " ".join(f"{k:>12s}" for k in KEYS))
    for tag, result in rows.items():
        for arm, r in result.items():
            if isinstance(r, dict):
                print(f"{tag:>7s} {arm:>20s} " + " ".join(f"{r[k]:12.3f}" for k in KEYS))
    print(f"wrote {args.out}")


def main() -> None:
    args = parse_args()
    if not (REPO.parent / "shared" / "data" / "cub50" / "images.txt").is_file():
        sys.exit("needs ../shared/data/cub50 (the real CUB subset)")
    from finegrain.data.manifest import Manifest

    runs = Path(args.runs_dir)
    prepare_runs_dir(runs, args.reuse_pretrain)
    pretrains = run_pretrains(args, runs)
    manifests = split_fractions(args, runs)
    screen_tag, best = screen_pretrains(args, runs, manifests, pretrains)
    rows: dict[str, dict] = {}
    for tag, manifest in manifests.items():
        labelled = len(Manifest.load(manifest).select("train"))
        rows[tag] = run_fraction(args, runs, tag, manifest, labelled, best)
        print(json.dumps({tag: rows[tag]}, indent=1), flush=True)
    write_and_print(args, pretrains, screen_tag, best, rows)


if __name__ == "__main__":
    main()
