"""Weighted k-nearest-neighbour classification on cosine similarity (InstDisc / DINO protocol)."""

from __future__ import annotations

import torch

from finegrain.eval.index import nearest


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    index: str = "auto",
) -> torch.Tensor:
    """Class scores of each query from its k most similar training features.

    Each neighbour votes for its class with weight exp(cos / temperature). The neighbours come from
    eval/index.py (`index`: auto, flat or ivfpq), queries in chunks.

    Args:
        train_features: (N, D); train_labels: (N,) int in [0, num_classes).
        query_features: (Q, D). Features are L2-normalised by the index.

    Returns:
        (Q, num_classes) float32 scores (higher = more likely).
    """
    sims, idx = nearest(train_features, query_features, min(k, len(train_features)), kind=index)
    return neighbour_votes(torch.from_numpy(sims), torch.as_tensor(train_labels)[torch.from_numpy(idx)],
                           num_classes, temperature)


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
