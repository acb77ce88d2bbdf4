"""Which cleanlab rule flags planted label errors best, on the features bench_own_data.py cached.

For each noisy manifest of bench_own_data.py (5% of cub50 train labels flipped, or --flip-fraction),
the out-of-sample ensemble probabilities of the train photos are computed once and each rule's
flagged set is scored (F1 against the flips):
- prune_by_noise_rate: cleanlab's default filter (confident learning, per class pair)
- self_confidence / normalized_margin: cleanlab's label quality scores, the lowest flagged,
  as many as `num_label_issues` estimates (off_diagonal or off_diagonal_calibrated)

Run bench_own_data.py first (it makes the features). Writes results/label_rules.json.

Usage: python benchmarks/bench_label_rules.py [--models frozen supcon] [--flip-fraction 0.05]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import bench_own_data as own  # benchmarks/ is on sys.path when a script here runs
from _results import write_results  # benchmarks/ is on sys.path when a script here runs

RULES = ("prune_by_noise_rate", "self_confidence/off_diagonal", "self_confidence/off_diagonal_calibrated",
         "normalized_margin/off_diagonal", "normalized_margin/off_diagonal_calibrated")


def flagged_by(rule: str, codes: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(N,) bool: the photos `rule` flags."""
    from cleanlab.count import num_label_issues
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    if rule == "prune_by_noise_rate":
        return np.asarray(find_label_issues(codes, probs, filter_by=rule, n_jobs=1), bool)
    score, count = rule.split("/")
    quality = get_label_quality_scores(codes, probs, method=score)
    out = np.zeros(len(codes), bool)
    out[np.argsort(quality, kind="stable")[:num_label_issues(codes, probs, estimation_method=count)]] = True
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["frozen", "supcon"])
    parser.add_argument("--flip-fraction", type=float, default=own.FLIP_FRACTION)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--runs-dir", default=str(own.REPO / "runs" / "bench_own_data"))
    parser.add_argument("--out", default=str(own.REPO / "benchmarks" / "results" / "label_rules.json"))
    args = parser.parse_args()
    from finegrain.curation.audit import out_of_sample_probabilities

    own.FLIP_FRACTION = args.flip_fraction
    runs, out = Path(args.runs_dir), Path(args.out)
    record = json.loads(out.read_text()) if out.is_file() else {"results": {}}
    clean = own._clean_table()
    clean_features = own.train_features(runs / "features", clean)
    for model in args.models:
        for kind in ("uniform", "confusable"):
            for seed in range(args.seeds):
                features = runs / ("features" if model == "frozen" else f"features_{model}_{kind}_s{seed}")
                if not features.is_dir():
                    print(f"{model} {kind} s{seed}: no features in {features} (run bench_own_data.py)", file=sys.stderr)
                    continue
                noisy, truth = own.flip_labels(clean.reset_index(drop=True), kind, seed, clean_features)
                train = noisy[noisy["split"] == "train"]
                names = sorted(set(train["label"]))
                codes = np.searchsorted(names, train["label"].to_numpy())
                probs = out_of_sample_probabilities("ensemble", own.train_features(features, noisy), codes, len(names))
                paths = train["path"].to_numpy()
                cell = {rule: own.scores(set(paths[flagged_by(rule, codes, probs)]), truth) for rule in RULES}
                tag = f"{model}/{args.flip_fraction:g}/{kind}/s{seed}"
                record["results"][tag] = cell
                print(tag, "  ".join(f"{r} {c['f1']:.3f}" for r, c in cell.items()), flush=True)
    record.update(date=time.strftime("%Y-%m-%d"), command="python benchmarks/bench_label_rules.py " + " ".join(sys.argv[1:]))
    write_results(out, record, resumed=True)


if __name__ == "__main__":
    main()
