"""An artifact's own classifier: the scores `predict` ranks, and their accuracy against named labels."""

from __future__ import annotations

import numpy as np
import torch


def classifier_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(N, D) backbone features -> (N, C) float32 logits: normalize(features) @ weight.T + bias, as predict scores."""
    return torch.nn.functional.normalize(features.float(), dim=1) @ weight.T.float() + bias.float()


def named_topk_accuracy(scores: torch.Tensor, class_names: list[str], true_names, ks=(1, 5)) -> dict[int, float]:
    """Fraction in [0, 1] of rows whose true class name is among the k best-scored of `class_names`, for each k.

    scores: (N, C) over `class_names`; true_names: (N,) names (a name the classifier lacks is never a hit)."""
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices.numpy()
    hits = np.asarray(class_names, dtype=object)[ranked] == np.asarray(true_names, dtype=object)[:, None]
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}
