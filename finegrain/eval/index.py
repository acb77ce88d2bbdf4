"""Nearest neighbours of embeddings on cosine similarity: the one place that searches them.

Exact inner product on L2-normalised features with faiss (`IndexFlatIP`); queries go in chunks, so
memory is the reference set plus O(chunk x k).
"""

from __future__ import annotations

import numpy as np
import torch


def _unit(x) -> np.ndarray:
    """(N, D) float32, rows L2-normalised, C-contiguous (what faiss takes)."""
    x = torch.as_tensor(x).float()
    return np.ascontiguousarray(torch.nn.functional.normalize(x, dim=1).numpy())


def nearest(reference, queries=None, k: int = 10, *, chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar reference rows of each query.

    Args:
        reference: (N, D) features; queries: (Q, D) features, or None to query the reference with
            itself leaving each row out of its own neighbours (leave-one-out).
        k: neighbours per query (clipped to the rows available).

    Returns:
        similarities (Q, k) float32 cosine in [-1, 1], descending; indices (Q, k) int64 into reference.
    """
    import faiss

    ref = _unit(reference)
    self_query = queries is None
    q = ref if self_query else _unit(queries)
    k = min(k, len(ref) - (1 if self_query else 0))
    if k < 1:
        raise ValueError("nearest needs at least one reference row besides the query")
    index = faiss.IndexFlatIP(ref.shape[1])
    index.add(ref)
    sims, idx = [], []
    for start in range(0, len(q), chunk_size):
        s, i = index.search(q[start:start + chunk_size], k + (1 if self_query else 0))
        if self_query:  # drop the row itself (ties with an identical twin: drop whichever is the row)
            own = i == np.arange(start, start + len(i))[:, None]
            keep = ~own
            keep[own.sum(1) == 0, -1] = False  # the row was not among its k + 1: drop the farthest instead
            s, i = s[keep].reshape(len(i), k), i[keep].reshape(len(i), k)
        sims.append(s)
        idx.append(i)
    return np.concatenate(sims).astype(np.float32), np.concatenate(idx).astype(np.int64)
