"""Evaluation cost as the reference set grows, in two studies.

`cost` (default): kNN, retrieval and linear-probe wall time and peak memory. Synthetic features (D=512 by default, 100 classes: a random centre per class plus Gaussian noise)
stand in for real ones. kNN and retrieval cost does not depend on the values; the linear probe's
does (lbfgs iterations), which is why the classes are separable like real embeddings rather than
pure noise. The probe is timed for one value of C (`--linear-cs`; `evaluate` tries 4 and refits). Each measurement runs in a fresh subprocess so its peak resident memory
(ru_maxrss) is its own; the table reports the peak above the process's baseline after the features
were created, next to the bound the chunked code promises:

    kNN:        the exact faiss index's normalised copy of the train set (N x D x 4 bytes), plus faiss's own
                working memory (measured, no bound stated)
    retrieval:  O(chunk x N) too, but each chunk is fully sorted (values, int64 indices, masks): no bound is
                stated, the measured peak is reported

`index`: neighbour search at scale. The cub50 test embeddings (frozen offline lite0, 144 px) query the
cub50 train embeddings plus --distractors embeddings drawn from a Gaussian mixture fitted to the train
ones (labelled "no species"), written once to a float16 file. At each size an exact chunked scan
(the ground truth) and eval/index.py's IVF-PQ (built from the memory-mapped file, saved, reopened
memory-mapped, queried) each run in a fresh process: kNN top-1 (k 20), recall@10 of IVF-PQ against
exact, build and search seconds, peak RSS of the whole process.

`extraction`: evaluate's feature extraction end to end (image cache, eval views, 2 DataLoader
workers, channels_last) against the same model's forward pass on an in-memory batch, 128 and 224 px.

Usage: python benchmarks/bench_eval.py [cost] [--sizes 1000 10000 100000] [--dim 512] [--queries 5000] [--linear-cs 1.0]
       python benchmarks/bench_eval.py index [--distractors 10000 100000 1000000]
       python benchmarks/bench_eval.py extraction [--extraction-sizes 128 224]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _results import write_results  # benchmarks/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
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
def status_kb(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
def peak_kb():  # VmHWM since the reset below (ru_maxrss would also carry the parent's RSS at fork)
    return status_kb("VmHWM")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak: making the features must not count
base = status_kb("VmRSS")
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
peak = peak_kb()
print(json.dumps({"seconds": seconds, "peak_above_baseline_mb": (peak - base) / 1024, "baseline_mb": base / 1024}))
"""


def measure(what: str, n: int, dim: int, queries: int, threads: int, cs: str) -> dict:
    """Run one measurement in a fresh interpreter; returns seconds and peak memory in MB."""
    out = subprocess.run([sys.executable, "-c", CHILD, what, str(n), str(dim), str(queries), str(threads), cs],
                         capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cost_study(args) -> None:
    """kNN, retrieval and linear-probe time and memory on synthetic features of growing size."""

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
                bound = (n * args.dim * 4 + chunk * 20 * 12) / 2**20
            rows.append({"what": what, "n": n, "dim": args.dim, "queries": n if what == "retrieval" else q,
                         "seconds": round(r["seconds"], 3), "peak_above_baseline_mb": round(r["peak_above_baseline_mb"], 1),
                         "bound_mb": round(bound, 1) if bound else None})
            print(f"{what:10s} n={n:>7d} queries={rows[-1]['queries']:>7d}  {r['seconds']:8.2f} s  "
                  f"peak +{r['peak_above_baseline_mb']:7.1f} MB" + (f"  (reference copy {bound:.0f} MB)" if bound else ""), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{args.threads} threads", "python": platform.python_version(), "chunk_size": chunk, "linear_cs": args.linear_cs,
              "command": "python benchmarks/bench_eval.py " + " ".join(sys.argv[1:]), "rows": rows}
    write_results(args.out, result)
    print(f"wrote {args.out}")


# --- neighbour search at scale: cub50 embeddings among up to a million distractors ------------------------

INDEX_CHILD = r"""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[5]))
from finegrain.eval.index import NeighbourIndex, read_unit_rows, unit_rows
from finegrain.eval.knn import neighbour_votes, topk_accuracy
what, work, n, k = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
reference = np.load(work + "/reference.npy", mmap_mode="r")[:n]
labels = torch.from_numpy(np.load(work + "/labels.npy")[:n])
queries, query_labels = np.load(work + "/queries.npy"), torch.from_numpy(np.load(work + "/query_labels.npy"))
def peak_mb():  # VmHWM: this image's own peak (ru_maxrss also carries the parent's RSS at fork, kept over exec)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
base = peak_mb()
out = {}
start = time.perf_counter()
if what == "exact":  # a chunked exact scan: the ground truth, in bounded memory
    import faiss
    q = unit_rows(queries)
    sims, idx = np.full((len(q), k), -np.inf, np.float32), np.zeros((len(q), k), np.int64)
    for first in range(0, n, 65536):
        s, i = faiss.knn(q, read_unit_rows(reference, slice(first, first + 65536)), k, metric=faiss.METRIC_INNER_PRODUCT)
        s, i = np.concatenate([sims, s], 1), np.concatenate([idx, i + first], 1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        sims, idx = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    out["search_s"] = time.perf_counter() - start
    np.save(work + f"/exact_{n}.npy", idx)
else:
    index = NeighbourIndex.build(reference, "ivfpq")
    out["build_s"] = time.perf_counter() - start
    index.save(work + f"/index_{n}")
    out["index_mb"] = __import__("os").path.getsize(work + f"/index_{n}/index.faiss") / 2**20  # codes, lists, quantizers
    del index
    index = NeighbourIndex.load(work + f"/index_{n}")
    start = time.perf_counter()
    sims, idx = index.search(queries, k)
    out["search_s"] = time.perf_counter() - start
    exact = np.load(work + f"/exact_{n}.npy")
    out["recall_at_10"] = float(np.mean([len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(exact, idx)]))
sims_t = torch.from_numpy(np.ascontiguousarray(sims))
scores = neighbour_votes(sims_t, labels[torch.from_numpy(idx)], int(labels.max()) + 1, 0.07)
out["knn_top1"] = topk_accuracy(scores, query_labels)[1]
out["peak_rss_mb"], out["baseline_rss_mb"] = peak_mb(), base
print(json.dumps(out))
"""


def cub50_features(work: Path) -> tuple:
    """(train (N, D), train labels, test (Q, D), test labels) of the frozen offline lite0 at 144 px on cub50,
    from a `finegrain evaluate` run in work/frozen (run here when missing)."""
    from _runner import cached_features, finegrain
    from finegrain.data.manifest import Manifest

    manifest_path = REPO / "data_manifests" / "cub50.csv"
    run = work / "frozen"
    if not (run / "report" / "metrics.json").is_file():
        finegrain("evaluate", "--manifest", str(manifest_path), "--backbone", "tf_efficientnet_lite0", "--image-size",
                  "144", "--no-linear", "--compare", "none", "--no-embedding-map", "--wandb", "disabled",
                  "--out", str(run))
    manifest = Manifest.load(manifest_path)
    names = manifest.rows("train").class_names
    feats = {name.split("-")[0]: f for name, f in cached_features(run / "features").items()}
    return (feats["train"], manifest.rows("train").class_codes(names).numpy(),
            feats["test"], manifest.rows("test", names).class_codes(names).numpy())


def write_reference(work: Path, most: int, seed: int) -> None:
    """work/reference.npy (float16): cub50 train rows, then `most` distractors drawn from a 50-component diagonal
    Gaussian mixture fitted to the L2-normalised train features; labels.npy: species codes, distractors = C."""
    from sklearn.mixture import GaussianMixture

    from finegrain.eval.index import unit_rows

    train, ytr, test, yq = cub50_features(work)
    np.save(work / "queries.npy", test)
    np.save(work / "query_labels.npy", yq)
    path = work / "reference.npy"
    if path.is_file() and len(np.load(path, mmap_mode="r")) >= len(train) + most:
        return
    np.save(work / "labels.npy", np.concatenate([ytr, np.full(most, int(ytr.max()) + 1)]))
    mixture = GaussianMixture(50, covariance_type="diag", reg_covar=1e-4, random_state=seed).fit(unit_rows(train))
    partial = work / "reference.partial.npy"
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(len(train) + most, train.shape[1]))
    out[:len(train)] = train
    for first in range(0, most, 50_000):
        mixture.random_state = seed + 1 + first
        rows = min(50_000, most - first)
        out[len(train) + first:len(train) + first + rows] = mixture.sample(rows)[0][np.random.default_rng(first).permutation(rows)]
        out.flush()
    del out
    partial.rename(path)  # only a finished file is ever read


def index_study(args) -> None:
    """Exact scan against IVF-PQ at each distractor count; each measurement in a fresh process (its own peak RSS)."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    write_reference(work, max(args.distractors), args.seed)
    train_rows = len(np.load(work / "labels.npy")) - max(args.distractors)
    rows = []
    for extra in args.distractors:
        n = train_rows + extra
        row = {"distractors": extra, "reference_rows": n}
        for what in ("exact", "ivfpq"):
            done = subprocess.run([sys.executable, "-c", INDEX_CHILD, what, str(work), str(n), "20", str(args.threads)],
                                  capture_output=True, text=True, check=True, cwd=REPO)
            row[what] = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        e, a = row["exact"], row["ivfpq"]
        print(f"{extra:>9,d} distractors: exact kNN top-1 {e['knn_top1']:.4f} ({e['search_s']:.1f} s, "
              f"{e['peak_rss_mb']:.0f} MB) | ivfpq {a['knn_top1']:.4f}, recall@10 {a['recall_at_10']:.3f}, build "
              f"{a['build_s']:.1f} s, search {a['search_s']:.2f} s, peak RSS {a['peak_rss_mb']:.0f} MB, "
              f"on disk {a['index_mb']:.0f} MB", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {args.threads} threads",
              "command": "python benchmarks/bench_eval.py " + " ".join(sys.argv[1:]), "queries": "cub50 test (1500)",
              "features": "frozen offline tf_efficientnet_lite0, 144 px", "k": 20, "rows": rows}
    write_results(args.out, result)
    print(f"wrote {args.out}")


# --- feature extraction against the in-memory forward pass ------------------------------------------------

def extraction_study(args) -> None:
    """evaluate's extraction (FeatureStore: the image cache, eval views, DataLoader workers, channels_last, features
    written to .npy) against the same model's forward pass on the same photos' batches already in memory, at each
    --extraction-sizes, on cub50 train photos; median ratio over --extraction-rounds alternating rounds."""
    import statistics
    import torch

    from finegrain.config import EvaluateConfig
    from finegrain.data.manifest import Manifest
    from finegrain.features.store import FeatureStore
    from finegrain.features.subject import Subject

    torch.set_num_threads(args.threads)
    rows = Manifest.load(REPO / "data_manifests" / "cub50.csv").rows("train")
    rows = Manifest(rows.table.iloc[:args.extraction_images].reset_index(drop=True), rows.root)
    out = []
    for size in args.extraction_sizes:
        cfg = EvaluateConfig(manifest="unused", out="unused", backbone="tf_efficientnet_lite0", image_size=size,
                             flip_tta=False, batch_size=128, workers=2, cache_dir=str(Path(args.work) / "image_cache"))
        subject = Subject(cfg)
        store = FeatureStore(cfg, subject, torch.device("cpu"), Path(args.work) / "features_unused")
        store.folder = Path(args.work) / f"extraction_{size}_{time.time_ns()}"  # never a cache hit
        store.features(rows, "warmup")  # builds the image cache, warms the workers' code paths
        # the in-memory reference: the same photos' batches, already loaded, through the same model. The forward pass
        # itself speeds up by up to 25% over the first minutes of a process, so each round times both, in
        # alternating order, and the ratio is the median over rounds.
        from finegrain.data.dataset import eval_dataset

        ds = eval_dataset(cfg, rows, image_size=size, mean=subject.mean, std=subject.std, class_names=rows.class_names,
                          crop_to_bbox=False, collective=False)
        loaded = [v[0].contiguous(memory_format=torch.channels_last)
                  for v, _, _ in torch.utils.data.DataLoader(ds, batch_size=128, num_workers=0)]
        rounds = []
        for r in range(args.extraction_rounds):
            timed = {}
            for what in (("e2e", "memory") if r % 2 else ("memory", "e2e")):
                if what == "e2e":
                    store.seconds = 0.0
                    store.folder = Path(args.work) / f"extraction_{size}_{time.time_ns()}"  # nothing to copy photos from
                    store.features(rows, f"timed{r}")
                    timed[what] = store.seconds
                else:
                    start = time.perf_counter()
                    with torch.no_grad():
                        for batch in loaded:
                            subject.model(batch)
                    timed[what] = time.perf_counter() - start
            rounds.append((len(rows) / timed["e2e"], len(rows) / timed["memory"]))
        ratios = [e2e / compute for e2e, compute in rounds]
        e2e, compute = rounds[ratios.index(statistics.median_low(ratios))]
        out.append({"image_size": size, "e2e_img_per_s": round(e2e, 1), "compute_img_per_s": round(compute, 1),
                    "e2e_over_compute": round(statistics.median(ratios), 3),
                    "rounds": [round(q, 3) for q in ratios]})
        print(f"{size} px: extraction {e2e:.1f} img/s end to end, {compute:.1f} in memory: median of "
              f"{len(ratios)} rounds {statistics.median(ratios):.3f} ({', '.join(f'{q:.3f}' for q in ratios)})", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {args.threads} threads",
              "images": len(rows), "backbone": "tf_efficientnet_lite0 (offline ImageNet weights)", "rows": out,
              "figures": {f"extraction_e2e_over_compute_{r['image_size']}px": r["e2e_over_compute"] for r in out},
              "command": "python benchmarks/bench_eval.py " + " ".join(sys.argv[1:])}
    write_results(args.out, result)
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", nargs="?", default="cost", choices=["cost", "index", "extraction"])
    parser.add_argument("--extraction-sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--extraction-images", type=int, default=512)
    parser.add_argument("--extraction-rounds", type=int, default=5, help="ratio = median over rounds")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--linear-max", type=int, default=100000, help="largest train set for the linear probe")
    parser.add_argument("--linear-cs", default="1.0", help="comma-separated C values the probe tries (timed together)")
    parser.add_argument("--retrieval-max", type=int, default=10000, help="largest set for leave-one-out retrieval")
    parser.add_argument("--distractors", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="index study: distractor embeddings beside the cub50 train ones")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench_eval"), help="index study: features and indexes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="results file (default results/eval_scaling.json or "
                                                    "results/index_scaling.json)")
    args = parser.parse_args()
    name = {"cost": "eval_scaling.json", "index": "index_scaling.json", "extraction": "extraction.json"}[args.study]
    args.out = args.out or str(REPO / "benchmarks" / "results" / name)
    {"cost": cost_study, "index": index_study, "extraction": extraction_study}[args.study](args)


if __name__ == "__main__":
    main()
