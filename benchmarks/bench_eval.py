"""Evaluation cost as the reference set grows: kNN, retrieval and linear-probe wall time and peak memory.

Synthetic features (D=512 by default, 100 classes: a random centre per class plus Gaussian noise)
stand in for real ones. kNN and retrieval cost does not depend on the values; the linear probe's
does (lbfgs iterations), which is why the classes are separable like real embeddings rather than
pure noise. The probe is timed for one value of C (`--linear-cs`; `evaluate` tries 4 and refits). Each measurement runs in a fresh subprocess so its peak resident memory
(ru_maxrss) is its own; the table reports the peak above the process's baseline after the features
were created, next to the bound the chunked code promises:

    kNN:        chunk x N x 4 bytes (similarities) x ~3 (matmul, topk, weights) + a normalised copy of the train set
    retrieval:  O(chunk x N) too, but each chunk is fully sorted (values, int64 indices, masks): no bound is
                stated, the measured peak is reported

Usage: python benchmarks/bench_eval.py [--sizes 1000 10000 100000] [--dim 512] [--queries 5000] [--linear-cs 1.0]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[5]))
what, n, dim, queries = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
classes = 100
centres = torch.randn(classes, dim, generator=g)
ytr, yq = torch.randint(0, classes, (n,), generator=g), torch.randint(0, classes, (queries,), generator=g)
train = centres[ytr] + 2.0 * torch.randn(n, dim, generator=g)
query = centres[yq] + 2.0 * torch.randn(queries, dim, generator=g)
cs = [float(c) for c in sys.argv[6].split(",")]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if what == "knn":
    from finegrain.eval.knn import knn_scores, topk_accuracy
    topk_accuracy(knn_scores(train, ytr, query, num_classes=classes), yq)
elif what == "retrieval":
    from finegrain.eval.retrieval import retrieval_metrics
    retrieval_metrics(train, ytr)
else:
    from finegrain.eval.linear import fit_linear_probe
    fit_linear_probe(train.numpy(), ytr.numpy(), num_classes=classes, val_x=query.numpy(), val_y=yq.numpy(), Cs=cs)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_above_baseline_mb": (peak - base) / 1024, "baseline_mb": base / 1024}))
"""


def measure(what: str, n: int, dim: int, queries: int, threads: int, cs: str) -> dict:
    """Run one measurement in a fresh interpreter; returns seconds and peak memory in MB."""
    out = subprocess.run([sys.executable, "-c", CHILD, what, str(n), str(dim), str(queries), str(threads), cs],
                         capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--linear-max", type=int, default=100000, help="largest train set for the linear probe")
    parser.add_argument("--linear-cs", default="1.0", help="comma-separated C values the probe tries (timed together)")
    parser.add_argument("--retrieval-max", type=int, default=10000, help="largest set for leave-one-out retrieval")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval_scaling.json"))
    args = parser.parse_args()

    chunk = 1024
    rows = []
    for n in args.sizes:
        plan = [("knn", args.queries)]
        if n <= args.retrieval_max:
            plan.append(("retrieval", args.queries))
        if n <= args.linear_max:
            plan.append(("linear", min(args.queries, 2000)))
        for what, q in plan:
            r = measure(what, n, args.dim, q, args.threads, args.linear_cs)
            bound = None
            if what == "knn":
                bound = (3 * chunk * n * 4 + n * args.dim * 4) / 2**20
            rows.append({"what": what, "n": n, "dim": args.dim, "queries": n if what == "retrieval" else q,
                         "seconds": round(r["seconds"], 3), "peak_above_baseline_mb": round(r["peak_above_baseline_mb"], 1),
                         "bound_mb": round(bound, 1) if bound else None})
            print(f"{what:10s} n={n:>7d} queries={rows[-1]['queries']:>7d}  {r['seconds']:8.2f} s  "
                  f"peak +{r['peak_above_baseline_mb']:7.1f} MB" + (f"  (bound {bound:.0f} MB)" if bound else ""), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{args.threads} threads", "python": platform.python_version(), "chunk_size": chunk, "linear_cs": args.linear_cs,
              "command": "python benchmarks/bench_eval.py " + " ".join(sys.argv[1:]), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
