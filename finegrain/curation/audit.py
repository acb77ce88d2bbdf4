"""What to look at again in a labelled photo collection, from its embeddings.

- Label issues: confident learning (cleanlab) on out-of-sample class probabilities, from
  leave-one-out kNN on the embeddings, a cross-validated linear probe, or their mean.
- Near-duplicates: pairs much closer than a photo usually is to its nearest neighbour.
- Outliers: photos far from every other (cleanlab's kNN out-of-distribution score).
All take (N, D) features; they are L2-normalised here.
"""

from __future__ import annotations

import numpy as np
import torch

from finegrain.eval.index import nearest
from finegrain.eval.knn import neighbour_votes

SUMMARY_FILE = "audit.json"  # beside audit.csv: photos and flagged counts by issue (evaluate --audit shows them)


def knn_probabilities(features, labels: np.ndarray, num_classes: int, *, k: int = 20,
                      temperature: float = 0.07) -> np.ndarray:
    """(N, C) leave-one-out class probabilities: each photo's k nearest others vote exp(cos / T) for their labels."""
    sims, idx = nearest(features, None, k)
    # shifting by each row's best similarity leaves the normalised votes unchanged and keeps exp() finite
    votes = neighbour_votes(torch.from_numpy(sims - sims.max(1, keepdims=True)), torch.from_numpy(labels[idx]),
                            num_classes, temperature).double().numpy()
    return votes / votes.sum(1, keepdims=True)


def cross_validated_probabilities(features, labels: np.ndarray, num_classes: int, *, folds: int = 5,
                                  seed: int = 0) -> np.ndarray:
    """(N, C) out-of-fold probabilities of a logistic regression on L2-normalised features.

    Folds are stratified; with a class of fewer photos than `folds`, the folds drop to that count (>= 2).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    x = torch.nn.functional.normalize(torch.as_tensor(features).float(), dim=1).numpy()
    folds = max(2, min(folds, int(np.bincount(labels, minlength=num_classes)[np.unique(labels)].min())))
    probs = np.zeros((len(x), num_classes))
    for fit_rows, held_out in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, labels):
        model = LogisticRegression(C=10.0, max_iter=500).fit(x[fit_rows], labels[fit_rows])
        probs[np.ix_(held_out, model.classes_)] = model.predict_proba(x[held_out])
    return probs


def out_of_sample_probabilities(source: str, features, labels: np.ndarray, num_classes: int, *, k: int = 20,
                                temperature: float = 0.07, seed: int = 0) -> np.ndarray:
    """(N, C) class probabilities of each photo from models that never saw its label.

    source: "knn" (leave-one-out neighbours), "linear" (cross-validated probe) or "ensemble" (their mean).
    """
    if source not in ("knn", "linear", "ensemble"):
        raise ValueError(f"unknown source {source!r}")
    parts = []
    if source in ("knn", "ensemble"):
        parts.append(knn_probabilities(features, labels, num_classes, k=k, temperature=temperature))
    if source in ("linear", "ensemble"):
        parts.append(cross_validated_probabilities(features, labels, num_classes, seed=seed))
    return sum(parts) / len(parts)


def label_issues(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probable label errors from out-of-sample probabilities, with cleanlab's pieces.

    Args:
        labels: (N,) given class ids; probs: (N, C) out-of-sample class probabilities.

    Returns:
        flagged (N,) bool and quality (N,) in [0, 1] (cleanlab's normalized margin: the given label's
        probability against the best other one; low = suspicious). The flagged photos are the lowest-quality
        ones, as many as confident learning's calibrated estimate of the errors (not cleanlab's default
        prune-by-noise-rate filter: its per-class-pair counts go wrong when errors spread over many pairs).
    """
    from cleanlab.count import num_label_issues
    from cleanlab.rank import get_label_quality_scores

    quality = np.asarray(get_label_quality_scores(labels, probs, method="normalized_margin"), dtype=np.float64)
    count = min(int(num_label_issues(labels, probs, estimation_method="off_diagonal_calibrated")), len(labels))
    flagged = np.zeros(len(labels), dtype=bool)
    flagged[np.argsort(quality, kind="stable")[:count]] = True
    return flagged, quality


def near_duplicates(features, *, relative_threshold: float = 0.13, k: int = 5) -> list[tuple[int, int, float]]:
    """Pairs (i, j, cosine) with i < j whose cosine distance is below `relative_threshold` x the median
    distance of a photo to its nearest other photo (the rule of cleanlab's Datalab near-duplicate check)."""
    sims, idx = nearest(features, None, k)
    distance = 1.0 - sims
    radius = relative_threshold * float(np.median(distance[:, 0]))
    pairs = {}
    for i, j in zip(*np.nonzero(distance <= radius)):
        a, b = sorted((int(i), int(idx[i, j])))
        pairs[(a, b)] = float(sims[i, j])
    return sorted(((a, b, s) for (a, b), s in pairs.items()), key=lambda p: -p[2])


def outlier_scores(features, *, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Typicality (N,) in [0, 1] from cleanlab's kNN out-of-distribution score (low = atypical) and the
    flagged (N,) bool: a mean neighbour distance past Q3 + 3 x IQR of everyone's (Tukey's far-out fence)."""
    from cleanlab.outlier import OutOfDistribution

    x = torch.nn.functional.normalize(torch.as_tensor(features).float(), dim=1).numpy()
    scores = OutOfDistribution(params={"k": min(k, len(x) - 1)}).fit_score(features=x, verbose=False)
    distance = -np.log(np.clip(scores, 1e-12, None))  # cleanlab's score is exp(-t x mean kNN distance)
    q1, q3 = np.percentile(distance, [25, 75])
    return scores, distance > q3 + 3.0 * (q3 - q1)
