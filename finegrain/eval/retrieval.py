"""Leave-one-out retrieval metrics: Recall@K and MAP@R (deep metric learning / zero-shot protocol).

The protocol of Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020), as used for CUB
zero-shot retrieval: every item queries all the OTHER items of the same set by cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from finegrain.eval.index import NeighbourIndex, resolve_kind


def _rank_pessimistically(sim: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """Order of each row's columns by decreasing similarity; among equal similarities, irrelevant first.

    Two stable sorts: by relevance (irrelevant first), then by similarity (descending). Ties left
    after both (equal similarity and equal relevance) keep increasing index order, which changes
    no metric.

    Args:
        sim: (Q, N) similarities; relevant: (Q, N) bool.

    Returns:
        (Q, N) int64 column indices, best first.
    """
    by_relevance = relevant.to(torch.uint8).argsort(dim=1, stable=True)
    by_sim = sim.gather(1, by_relevance).argsort(dim=1, descending=True, stable=True)
    return by_relevance.gather(1, by_sim)


@torch.no_grad()
def retrieval_metrics(
    features: torch.Tensor,
    labels: torch.Tensor,
    ks: Sequence[int] = (1, 2, 4, 8),
    chunk_size: int = 1024,
    index: str = "flat",
) -> dict[str, float]:
    """Leave-one-out Recall@K and MAP@R of a labelled set of features.

    Each item is a query against all other N - 1 items (itself excluded), ranked by cosine
    similarity of L2-normalised features. For a query with label y, R = number of OTHER items
    labelled y.

    - Recall@K: fraction of queries with at least one same-class item among their K nearest
      neighbours (K > N - 1 means all of them). Recall@1 equals precision@1.
    - MAP@R: mean over queries of AP@R = (1/R) * sum_{i=1..R} P(i) * rel(i), where rel(i) = 1 if the
      i-th neighbour has the query's label and P(i) = (same-class items among the first i) / i.

    Queries whose class has a single item (R = 0) can retrieve nothing: they are excluded from
    every metric (they are still in the reference set of the other queries). Their number is
    N - retrieval_queries.

    Ties (exactly equal similarities) are broken pessimistically: items of another class rank
    ahead of same-class items of equal similarity. The result is deterministic, does not depend on
    the order of the items, and a collapsed embedding (all features equal) scores its worst rather
    than by luck. (pytorch-metric-learning and faiss break ties by index instead; they agree
    whenever no similarities tie.)

    Queries are processed `chunk_size` at a time, so memory is O(chunk_size x N), not O(N^2).
    With `index` ivfpq (or auto above its size threshold) each query's neighbours come from the
    approximate index of eval/index.py instead, and ties keep the index's order.

    Args:
        features: (N, D) features (any float dtype, any device); L2-normalised here.
        labels: (N,) integer class labels (any values).
        ks: the K of Recall@K, each >= 1.
        chunk_size: queries per chunk.
        index: flat (exact), ivfpq or auto (see eval/index.py).

    Returns:
        {"recall_at_{k}": fraction in [0, 1] for each k in ks, "map_at_r": fraction in [0, 1],
        "retrieval_queries": number of queries used (int)}. The fractions are NaN when no query
        has a same-class item.
    """
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"expected features (N, D) and labels (N,), got {tuple(features.shape)} and {tuple(labels.shape)}")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be integers >= 1, got {ks}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    n = features.shape[0]
    labels = labels.to(features.device)
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    others = counts[inverse] - 1  # (N,) R of each query
    used = others >= 1
    num_queries = int(used.sum())
    # neighbours needed: the largest K and the largest R, at most the N - 1 others
    depth = min(n - 1, max(max(ks), int(others.max()) if n else 0))

    recall_hits = {k: 0 for k in ks}
    ap_sum = 0.0
    ranked = _ranked_exact if resolve_kind(index, n) == "flat" else _ranked_by_index
    for rows, rel in ranked(features, labels, used, depth, chunk_size, index) if num_queries else ():
        for k in ks:
            recall_hits[k] += int(rel[:, :k].any(dim=1).sum())
        ap_sum += _ap_at_r_sum(rel, others[rows].to(torch.float64))

    nan = float("nan")
    out: dict[str, float] = {f"recall_at_{k}": recall_hits[k] / num_queries if num_queries else nan for k in ks}
    out["map_at_r"] = ap_sum / num_queries if num_queries else nan
    out["retrieval_queries"] = num_queries
    return out


def _ranked_exact(feats, labels, used, depth, chunk_size, index):
    """Yield (query rows (c,), relevance (c, depth) bool nearest first) by an exact scan, ties pessimistic."""
    n = feats.shape[0]
    feats = F.normalize(feats.float(), dim=1)
    for start in range(0, n, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, n), device=feats.device)
        rows = rows[used[rows]]
        if rows.numel() == 0:
            continue
        sim = feats[rows] @ feats.T  # (c, N)
        relevant = labels[rows, None] == labels[None, :]
        is_self = rows[:, None] == torch.arange(n, device=feats.device)[None, :]
        # the query itself goes last, below every real cosine (>= -1), and is cut off by `depth`
        sim = sim.masked_fill(is_self, float("-inf"))
        relevant &= ~is_self
        order = _rank_pessimistically(sim, relevant)[:, :depth]
        yield rows, relevant.gather(1, order)


def _ranked_by_index(feats, labels, used, depth, chunk_size, index):
    """The same from eval/index.py's neighbours (leave-one-out), in the index's order."""
    rows = torch.nonzero(used).flatten()
    feats_cpu = feats.float().cpu()
    searcher = NeighbourIndex.build(feats_cpu, index)
    for start in range(0, len(rows), chunk_size):
        chunk = rows[start:start + chunk_size]
        _, idx = searcher.search(feats_cpu[chunk.cpu()], depth, leave_out=chunk.cpu().numpy())
        yield chunk, labels[torch.from_numpy(idx).to(labels.device)] == labels[chunk, None]


def _ap_at_r_sum(rel: torch.Tensor, r: torch.Tensor) -> float:
    """Sum over queries of AP@R: rel (c, depth) bool nearest first, r (c,) float64 same-class others."""
    ranks = torch.arange(1, rel.shape[1] + 1, device=rel.device, dtype=torch.float64)
    within_r = ranks[None, :] <= r[:, None]
    rel_r = (rel & within_r).to(torch.float64)
    precision = rel_r.cumsum(dim=1) / ranks[None, :]
    return float(((precision * rel_r).sum(dim=1) / r).sum())
