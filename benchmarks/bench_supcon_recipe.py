"""Which `supcon` recipe is best at full labels on real birds: each candidate trained and evaluated the same way.

Runs, through the `finegrain` command line, on ../shared/data/cub50 (50 CUB species, 1452 train /
1500 test images) from the offline ImageNet tf_efficientnet_lite0 at 128 px:

    supcon --loss L [recipe options] --epochs E   (labelled train images)   -> evaluate (test)

for every recipe named with --recipes (see RECIPES); with --eval-variants also evaluates each
trained recipe at a larger test size (FixRes: train 128, test 144) and with flip test-time
augmentation, alone and together; with --wise A,B also evaluates each trained backbone mixed with
its ImageNet start (WiSE-FT, what `supcon --wise-ft A` writes, made here from the same run); and writes benchmarks/results/supcon_recipe.json
with kNN / linear top-1, Recall@1/2/4/8, MAP@R, the train wall time and the command of each.
Resumable: a recipe already in the JSON (same options) is skipped, and a killed supcon resumes from
its checkpoint; each result is written as soon as it is measured. About 12 minutes a recipe here.

Usage: python benchmarks/bench_supcon_recipe.py [--recipes supcon,ce,supcon_ce] [--epochs 10]
       [--runs-dir runs/bench_supcon_recipe]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from _runner import finegrain  # benchmarks/ is on sys.path when a script here runs
from _results import write_results  # benchmarks/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data_manifests" / "cub50.csv"
CUB50 = REPO.parent / "shared" / "data" / "cub50"
KEYS = ("knn_top1", "linear_top1", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r")
RECIPES: dict[str, list[str]] = {
    "supcon": ["--loss", "supcon"],
    "ce": ["--loss", "ce"],
    "supcon_ce": ["--loss", "supcon_ce"],
    "supcon_ce_lpft3": ["--loss", "supcon_ce", "--head-warmup-epochs", "3"],  # LP-FT: a longer head-only phase
    "supcon_ce_15ep": ["--loss", "supcon_ce", "--epochs", "15"],  # schedule length
    "supcon_ce_ema": ["--loss", "supcon_ce", "--ema-decay", "0.99"],  # an EMA of the weights
    "supcon_ce_t005": ["--loss", "supcon_ce", "--temperature", "0.05"],  # SupCon temperature
    "supcon_ce_t02": ["--loss", "supcon_ce", "--temperature", "0.2"],
    "supcon_ce_seed1": ["--loss", "supcon_ce", "--seed", "1"],  # the same recipe, another seed: the noise level
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="supcon,ce,supcon_ce",
                    help=f"comma-separated, from frozen (the ImageNet start, evaluated only), {', '.join(RECIPES)}")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--eval-variants", action="store_true", help="also evaluate at 144 px and with flip TTA")
    ap.add_argument("--best-variant-only", action="store_true",
                    help="of the --eval-variants, only the larger test size + flip TTA (the evaluate default)")
    ap.add_argument("--wise", default="", help="comma-separated WiSE-FT weights of the fine-tuned backbone, e.g. 0.5,0.7")
    ap.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "bench_supcon_recipe")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "supcon_recipe.json")
    return ap.parse_args()


def eval_options(train_size: int) -> tuple[list[str], dict[str, list[str]]]:
    """The plain evaluation (at the training size, no flip) and EVAL_VARIANTS (FixRes size, flip TTA, both)."""
    from finegrain.features.extract import test_size

    size, test = str(train_size), str(test_size(train_size))
    return ["--image-size", size, "--no-flip-tta"], {
        f"test {test} px": ["--image-size", test, "--no-flip-tta"], "flip TTA": ["--image-size", size, "--flip-tta"],
        f"test {test} px + flip TTA": ["--image-size", test, "--flip-tta"]}


def evaluate(trained: Path | None, out: Path, *options: str) -> dict:
    """Evaluate an artifact (None: the frozen ImageNet lite0) on cub50 test (options: eval_options's); its
    headline metrics."""
    subject = ["--from", str(trained)] if trained is not None else ["--backbone", "tf_efficientnet_lite0"]
    if not (out / "report" / "metrics.json").is_file():
        finegrain("evaluate", "--compare", "none", "--manifest", str(MANIFEST), *subject, "--out", str(out), "--no-embedding-map",
                  "--wandb", "disabled", *options)
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    return {k: metrics.get(k) for k in KEYS}


def eval_variants(name: str, args: argparse.Namespace) -> dict:
    """The recipe's artifact (name "frozen": the ImageNet backbone) evaluated under each EVAL_VARIANTS entry."""
    variants = eval_options(args.image_size)[1]
    if args.best_variant_only:
        variants = dict(list(variants.items())[-1:])
    trained = None if name == "frozen" else args.runs_dir / name
    return {variant: evaluate(trained, args.runs_dir / f"{name}-eval-{i}", *options)
            for i, (variant, options) in enumerate(variants.items())}


def frozen(args: argparse.Namespace) -> dict:
    """The starting point: the frozen ImageNet backbone, evaluated as the recipes are."""
    return {"options": [], **evaluate(None, args.runs_dir / "frozen-eval", *eval_options(args.image_size)[0]),
            "train_seconds": None, "command": "finegrain evaluate --backbone tf_efficientnet_lite0"}


def wise_artifact(trained: Path, alpha: float, out: Path) -> Path:
    """A copy of the trained artifact whose backbone is alpha x fine-tuned + (1 - alpha) x its ImageNet start."""
    from finegrain.artifacts import load_artifact, write_artifact
    from finegrain.methods import interpolate_weights
    from finegrain.models.backbone import build_backbone, create_backbone

    art = load_artifact(trained)
    tuned = create_backbone(art.info["backbone"], weights=art.path)
    start, _ = build_backbone(art.info["backbone"])
    interpolate_weights(tuned, start.state_dict(), alpha)
    state = {**art.state_dict(), **{f"backbone.{k}": v for k, v in tuned.state_dict().items()}}
    info = {k: v for k, v in art.info.items() if k not in ("stage", "weights_sha256", "artifact_hash", "versions",
                                                            "created", "complete")}
    write_artifact(out, stage=art.info["stage"], config={**art.config(), "wise_ft": alpha}, state_dict=state, info=info)
    return out


def wise_variants(name: str, args: argparse.Namespace) -> dict:
    """The recipe's backbone mixed with its start at each --wise weight, evaluated."""
    found = {}
    for alpha in [float(a) for a in args.wise.split(",") if a]:
        mixed = wise_artifact(args.runs_dir / name, alpha, args.runs_dir / f"{name}-wise{alpha:g}")
        found[f"WiSE-FT {alpha:g}"] = evaluate(mixed, args.runs_dir / f"{name}-wise{alpha:g}-eval",
                                               *eval_options(args.image_size)[0])
    return found


def run_recipe(name: str, args: argparse.Namespace) -> dict:
    """Train (or resume) and evaluate one recipe; its metrics, wall time and command."""
    train = ["supcon", "--manifest", str(MANIFEST), "--image-size", str(args.image_size), "--epochs",
             str(args.epochs), "--no-knn-monitor", "--wandb", "disabled", *RECIPES[name]]
    out = args.runs_dir / name
    resume = ["--resume"] if (out / "checkpoint.pt").is_file() and not (out / "artifact.json").is_file() else []
    seconds = None
    if not (out / "artifact.json").is_file():
        seconds = finegrain(*train, "--out", str(out), *resume)
    metrics = evaluate(out, args.runs_dir / f"{name}-eval", *eval_options(args.image_size)[0])
    return {"options": RECIPES[name], **metrics,
            "train_seconds": round(seconds, 1) if seconds is not None else None,
            "command": "finegrain " + " ".join(train)}


def _save(results: dict, path: Path) -> None:
    write_results(path, results, resumed=True)


def main() -> None:
    args = parse_args()
    if not (CUB50 / "images.txt").is_file():
        sys.exit(f"needs the cub50 birds at {CUB50}")
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("runs", {})
    results.update(date=time.strftime("%Y-%m-%d"), machine=f"{platform.machine()}, 2-core CPU", epochs=args.epochs,
                   image_size=args.image_size, data="cub50 train -> test, lite0 offline ImageNet")
    for name in args.recipes.split(","):
        done = results["runs"].get(name)
        if done and done.get("options") == RECIPES.get(name, []):
            print(f"{name}: already measured", flush=True)
        else:
            results["runs"][name] = frozen(args) if name == "frozen" else run_recipe(name, args)
            _save(results, args.out)
        if args.eval_variants and "eval_variants" not in results["runs"][name]:
            results["runs"][name]["eval_variants"] = eval_variants(name, args)
            _save(results, args.out)
        if args.wise and not set(f"WiSE-FT {float(a):g}" for a in args.wise.split(",")) <= set(
                results["runs"][name].get("eval_variants", {})):
            results["runs"][name].setdefault("eval_variants", {}).update(wise_variants(name, args))
            _save(results, args.out)
    print(f"\n{'recipe':36s} " + " ".join(f"{k:>11s}" for k in KEYS) + "   train s")
    for name, r in results["runs"].items():
        rows = [(name, r, r["train_seconds"])] + [(f"  {v}", m, "") for v, m in r.get("eval_variants", {}).items()]
        for label, m, seconds in rows:
            print(f"{label:36s} " + " ".join(f"{m[k]:11.3f}" if m[k] is not None else f"{'-':>11s}" for k in KEYS)
                  + f"   {seconds}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
