"""Weighted k-nearest-neighbour classification on cosine similarity (InstDisc / DINO protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores of each query from its k most similar training features.

    Each neighbour votes for its class with weight exp(cos / temperature). Queries are processed
    `chunk_size` at a time, so memory is O(chunk_size x N_train), not O(N_query x N_train).

    Args:
        train_features: (N, D); train_labels: (N,) int in [0, num_classes).
        query_features: (Q, D). Features are L2-normalised here.

    Returns:
        (Q, num_classes) float32 scores (higher = more likely).
    """
    train = F.normalize(train_features.float(), dim=1)
    k = min(k, train.shape[0])
    out = torch.empty(query_features.shape[0], num_classes)
    for start in range(0, query_features.shape[0], chunk_size):
        q = F.normalize(query_features[start:start + chunk_size].float(), dim=1)
        sim, idx = (q @ train.T).topk(k, dim=1)
        out[start:start + q.shape[0]] = neighbour_votes(sim, train_labels[idx], num_classes, temperature)
    return out


def neighbour_votes(sims: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """(Q, k) cosine similarities of each query's neighbours and their (Q, k) labels -> (Q, C) float32 votes,
    each neighbour voting exp(cos / temperature) for its class."""
    scores = torch.zeros(sims.shape[0], num_classes)
    scores.scatter_add_(1, labels.long(), (sims.float() / temperature).exp())
    return scores


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Fraction in [0, 1] of rows whose label is among the k highest scores, for each k."""
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {k: float(hits[:, :k].any(dim=1).float().mean()) for k in ks}
