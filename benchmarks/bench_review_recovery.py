"""Does a review of the audit's findings recover flipped labels, and does the fixed manifest train better?

cub50 with 5% of the train labels flipped uniformly (seed 0, as bench_own_data.py) -> a frozen-feature artifact
(supcon --backbone-lr-scale 0, trained on the noisy labels) -> audit -> `finegrain review` of the first --findings
findings, driven over HTTP (the same POSTs the page's keys send, with its token) by a scripted person who knows
the true species -> manifest relabel -> evaluate on the clean, the noisy and the fixed manifests (the kNN
classifier and the linear probe refit on each manifest's train labels; the features are the same, cached).
Reports the fraction of flips recovered and the fraction of the clean-vs-noisy accuracy gap the review closed.

    python benchmarks/bench_review_recovery.py --work /tmp/review_recovery --out benchmarks/results/review_recovery.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
from _runner import finegrain
from _results import write_results

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "data_manifests" / "cub50.csv"
COMMON = ["--workers", "0", "--device", "cpu", "--wandb", "disabled"]


def _noisy(work: Path, fraction: float, seed: int) -> tuple[Path, dict, set]:
    from finegrain.data.manifest import Manifest

    clean = Manifest.load(MANIFEST)
    table = clean.table.copy()
    rng = np.random.default_rng(seed)
    train = np.nonzero((table["split"] == "train").to_numpy())[0]
    chosen = rng.choice(train, int(round(fraction * len(train))), replace=False)
    names = clean.class_names
    for i in chosen:
        table.at[i, "label"] = rng.choice([n for n in names if n != table.at[i, "label"]])
    Manifest.from_table(table, clean.root).save(work / "noisy.csv")
    return work / "noisy.csv", dict(zip(clean.table["path"], clean.table["label"])), set(table["path"].iloc[chosen])


def _answer(item: dict, truth: dict) -> dict:
    """What a person who knows the true species decides on one queue item."""
    true = truth[item["path"]]
    if item["queue"] == "label_error":
        if true == item["suggested"]:
            return {"action": "suggested"}
        return {"action": "given"} if true == item["given"] else {"action": "other", "label": true}
    if item["queue"] == "twin":
        return {"action": "keep_both"}  # cub50 holds no copies: two photos of one species look alike
    return {"action": "keep"}


def _review(work: Path, noisy: Path, truth: dict, findings: int) -> dict:
    from finegrain.review.queues import load_review

    audit = work / "audit"
    review = load_review(noisy, audit)
    items = [it for q in review.queues.values() for it in q]
    ranks = {p: r for r, p in zip(*_audit_ranks(audit))}
    items = sorted(items, key=lambda it: ranks[it.path])[:findings]
    proc = subprocess.Popen([sys.executable, "-m", "finegrain", "review", str(noisy), "-o", str(work / "review"),
                             "--audit", str(audit), "--port", "0"], stdout=subprocess.PIPE, text=True)
    url = next(m.group(1) for line in proc.stdout if (m := re.search(r"(http://\S+)", line)))
    try:
        page = urllib.request.urlopen(url).read().decode()
        token = re.search(r'name="review-token" content="([^"]+)"', page).group(1)
        answers: dict[str, int] = {}
        for it in items:
            body = {"item": it.id, **_answer({"path": it.path, "queue": it.queue, "given": it.given,
                                              "suggested": it.suggested}, truth)}
            req = urllib.request.Request(url + "api/decide", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json", "X-Review-Token": token})
            assert json.loads(urllib.request.urlopen(req).read())["saved"]
            key = f"{it.queue}:{body['action']}"
            answers[key] = answers.get(key, 0) + 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return answers


def _audit_ranks(audit: Path):
    import pandas as pd

    t = pd.read_csv(audit / "audit.csv", keep_default_na=False)
    return list(t["rank"]), list(t["path"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/finegrain_review_recovery"))
    ap.add_argument("--findings", type=int, default=100)
    ap.add_argument("--flip-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", default="128")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "review_recovery.json")
    args = ap.parse_args()
    from finegrain.data.manifest import Manifest

    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FINEGRAIN_CACHE", str(w / "cache"))
    noisy, truth, flipped = _noisy(w, args.flip_fraction, args.seed)
    if not (w / "frozen" / "artifact.json").is_file():
        finegrain("supcon", "--manifest", str(noisy), "--out", str(w / "frozen"), "--image-size", args.image_size,
                  "--backbone-lr-scale", "0", "--max-steps", "20", "--epochs", "1", "--no-knn-monitor", *COMMON)
    if not (w / "audit" / "audit.csv").is_file():
        finegrain("audit", str(w / "frozen"), "--manifest", str(noisy), "-o", str(w / "audit"), *COMMON)
    if not (w / "fixed.csv").is_file():
        answers = _review(w, noisy, truth, args.findings)
        with open(w / "answers.json", "w") as f:  # a work file, not a result
            json.dump(answers, f)
        finegrain("manifest", "relabel", str(noisy), "--from", str(w / "review"), "-o", str(w / "fixed.csv"))
    answers = json.loads((w / "answers.json").read_text())
    fixed = Manifest.load(w / "fixed.csv").table.set_index("path")
    recovered = sum(p in fixed.index and fixed.loc[p, "label"] == truth[p] for p in flipped)
    broken = sum(p in fixed.index and fixed.loc[p, "label"] != truth[p] for p in set(truth) - flipped)
    metrics = {}
    for name, manifest in (("clean", MANIFEST), ("noisy", noisy), ("fixed", w / "fixed.csv")):
        out = w / f"eval_{name}"
        if not (out / "report" / "metrics.json").is_file():
            finegrain("evaluate", "--manifest", str(manifest), "--from", str(w / "frozen"), "--out", str(out),
                      "--image-size", args.image_size, "--no-embedding-map", "--compare", "none", *COMMON)
        m = json.loads((out / "report" / "metrics.json").read_text())
        metrics[name] = {k: m.get(k) for k in ("knn_top1", "linear_top1")}
    closed = {k: (metrics["fixed"][k] - metrics["noisy"][k]) / (metrics["clean"][k] - metrics["noisy"][k])
              if metrics["clean"][k] != metrics["noisy"][k] else None for k in ("knn_top1", "linear_top1")}
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "flipped": len(flipped),
              "findings_reviewed": sum(answers.values()), "answers": answers,
              "flips_recovered": recovered, "flips_recovered_fraction": round(recovered / len(flipped), 4),
              "correct_labels_changed": broken, "metrics": metrics,
              "gap_closed": {k: None if v is None else round(v, 3) for k, v in closed.items()}}
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, result)


if __name__ == "__main__":
    main()
