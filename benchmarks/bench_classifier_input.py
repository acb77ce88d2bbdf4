"""Where `predict`'s classifier should read its features: one supcon artifact, every candidate, cub50 test top-1.

Candidates (each on the same trained backbone; "144+flip" = features at 1.125x the training size,
averaged with the mirror image's):
  - stored LR: the logistic regression the supcon stage stored (fit on train features at the training size);
  - LR refit: the same probe fit on train features at the evaluation size (what the stage now stores);
  - cosine head: the classifier trained with the loss (supcon_ce, ce), read as argmax of its cosines;
  - LR on projection: the probe on the projection head's output instead of the backbone features.

Usage: python benchmarks/bench_classifier_input.py [--artifact runs/bench_supcon_recipe/supcon_ce]
Writes benchmarks/results/classifier_input.json. About 4 minutes here (four feature passes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _results import write_results  # benchmarks/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data_manifests" / "cub50.csv"
CUB50 = REPO.parent / "shared" / "data" / "cub50"


def features(backbone, rows, classes, info, size: int, flip: bool):
    """(N, D) backbone features and (N,) label codes of manifest rows at `size` px, flip-averaged or not."""
    from finegrain.data.dataset import ManifestDataset
    from finegrain.data.views import build_view, make_recipe
    from finegrain.features.extract import extract_features, flip_averaged

    recipe = make_recipe("eval", image_size=size, mean=info["mean"], std=info["std"])
    ds = ManifestDataset(rows, build_view(recipe), class_names=classes)
    return extract_features(flip_averaged(backbone) if flip else backbone, ds, device=torch.device("cpu"),
                            batch_size=64, workers=2, amp_dtype=None, progress=f"{size}px flip={flip}")


def top1(logits: torch.Tensor, y: torch.Tensor) -> float:
    return round(float((logits.argmax(1) == y).float().mean()), 4)


def probe_logits(probe, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1) @ torch.as_tensor(probe.weight).T.float() + torch.as_tensor(probe.bias).float()


def main() -> None:
    from finegrain.artifacts import load_artifact
    from finegrain.data.manifest import Manifest
    from finegrain.features.extract import test_size
    from finegrain.eval.linear import fit_linear_probe
    from finegrain.methods.supervised import projection
    from finegrain.models.backbone import create_backbone

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=REPO / "runs" / "bench_supcon_recipe" / "supcon_ce")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "classifier_input.json")
    args = ap.parse_args()
    if not (CUB50 / "images.txt").is_file():
        sys.exit(f"needs the cub50 birds at {CUB50}")
    art = load_artifact(args.artifact)
    info, classes = art.info, art.info["class_names"]
    manifest = Manifest.load(MANIFEST)
    train, test = manifest.rows("train"), manifest.rows("test", classes)
    backbone = create_backbone(info["backbone"], weights=art.path).eval()
    small, large = info["image_size"], test_size(info["image_size"])
    x_small, y_small = features(backbone, test, classes, info, small, False)
    x_test, y_test = features(backbone, test, classes, info, large, True)
    x_train, y_train = features(backbone, train, classes, info, large, True)
    stored = art.state_dict("classifier.")
    stored_logits = lambda x: F.normalize(x, dim=1) @ stored["weight"].T.float() + stored["bias"].float()  # noqa: E731
    found = {f"stored LR @{small}": top1(stored_logits(x_small), y_small),
             f"stored LR @{large}+flip": top1(stored_logits(x_test), y_test)}
    refit = fit_linear_probe(x_train.numpy(), y_train.numpy(), num_classes=len(classes), seed=0)
    found[f"LR refit @{large}+flip"] = top1(probe_logits(refit, x_test), y_test)
    head = art.state_dict("head.")
    if "classifier.weight" in head:
        w = F.normalize(head["classifier.weight"].float(), dim=1)
        found[f"cosine head @{small}"] = top1(F.normalize(x_small, dim=1) @ w.T, y_small)
        found[f"cosine head @{large}+flip"] = top1(F.normalize(x_test, dim=1) @ w.T, y_test)
    proj_keys = {k[len("projection."):]: v for k, v in head.items() if k.startswith("projection.")}
    if proj_keys:
        proj = projection(backbone, info["projection_dim"], art.config().get("proj_hidden", 0))
        proj.load_state_dict(proj_keys)
        proj.eval()
        with torch.no_grad():
            z_train, z_test = proj(x_train), proj(x_test)
        probe = fit_linear_probe(z_train.numpy(), y_train.numpy(), num_classes=len(classes), seed=0)
        found[f"LR on projection @{large}+flip"] = top1(probe_logits(probe, z_test), y_test)
    result = {"date": time.strftime("%Y-%m-%d"), "artifact": str(args.artifact.relative_to(REPO)),
              "data": "cub50 train -> test", "test_top1": found}
    write_results(args.out, result)
    for k, v in found.items():
        print(f"{k:32s} {v:.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
