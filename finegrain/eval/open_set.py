"""Open-set scores: how unlike every known species a photo is. Larger = more likely an unknown species.

- Relative Mahalanobis distance (Ren et al. 2021, "A simple fix to Mahalanobis distance for improving
  near-OOD detection"): the smallest class-conditional Mahalanobis distance (shared covariance, as in
  Lee et al. 2018) minus the distance under one Gaussian of all training photos. Made for unknown
  classes that look like the known ones, as unseen bird species do; the default.
- kNN distance (Sun et al., ICML 2022, "Out-of-distribution detection with deep nearest neighbors"):
  Euclidean distance, between L2-normalised features, from a photo to its k-th nearest training photo
  (in [0, 2]; sqrt(2 - 2 cos)).
- Baselines on a classifier's logits (Hendrycks & Gimpel 2017; Vaze et al., ICLR 2022, "Open-set
  recognition: a good closed-set classifier is all you need"): minus the top softmax probability,
  minus the top logit.

A photo is accepted as a known species when its score is at most the threshold, unknown when above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from finegrain.eval.index import nearest

from finegrain.eval.linear import stratified_holdout

DEFAULT_K = 5  # Sun et al. took k = 0.1% of CIFAR-10's 50,000 photos; 0.1% of a few thousand is a handful
DEFAULT_KEEP = 0.95  # fraction of known-species photos the threshold accepts
REFERENCE_KEY = "open_set.train_features"  # the reference's key in an artifact's model.safetensors
LABELS_KEY = "open_set.train_labels"  # (N,) int64 class ids of the reference (relative Mahalanobis needs them)
SCORES = ("relative_mahalanobis", "knn_distance")  # scores of features alone, that an artifact can store
RIDGE = 2.0  # added to every covariance eigenvalue, in units of the mean within-class variance


@torch.no_grad()
def knn_distance_scores(train_feats: torch.Tensor, query_feats: torch.Tensor, k: int) -> torch.Tensor:
    """(Q,) float32 distance from each query to its k-th nearest training feature (both L2-normalised).

    Written here rather than taken from pytorch-ood: its KNN detector scores with 1 neighbour on
    raw features, not the paper's k-th neighbour on normalised ones. The search is eval/index.py's.

    Args:
        train_feats: (N, D) reference features; query_feats: (Q, D).
        k: the neighbour whose distance is the score; at most N is used.
    """
    if k < 1 or len(train_feats) == 0:
        raise ValueError(f"need k >= 1 and at least one training feature, got k={k}, N={len(train_feats)}")
    sims, _ = nearest(train_feats, query_feats, k)
    kth = torch.from_numpy(sims[:, -1]).float()  # cosine of the k-th nearest
    return (2 - 2 * kth).clamp_min(0).sqrt()


@dataclass
class RelativeMahalanobis:
    """Class means and whitening maps of L2-normalised training features; `scores` gives the distances.

    Attributes: means (C, D); centre (D,) the mean of all photos; whiten, whiten_all (D, D) with
    ||(x - m) @ whiten||^2 the Mahalanobis distance under the shared within-class covariance and under
    the covariance of all photos.
    """

    means: torch.Tensor
    centre: torch.Tensor
    whiten: torch.Tensor
    whiten_all: torch.Tensor

    @classmethod
    def fit(cls, train_feats: torch.Tensor, labels: torch.Tensor, ridge: float = RIDGE) -> "RelativeMahalanobis":
        """Fit on (N, D) features and their (N,) class ids.

        Both covariances get the same ridge, `ridge` x the mean within-class variance: with about as
        many photos as dimensions neither is invertible without one, and sklearn's shrinkage (scaled by
        each matrix's own trace) shrinks the two unequally, which broke the difference on cub50.
        """
        x = F.normalize(train_feats.double(), dim=1)
        classes, y = torch.unique(labels.long(), return_inverse=True)
        means = torch.zeros(len(classes), x.shape[1], dtype=x.dtype).index_add_(0, y, x)
        means /= torch.bincount(y, minlength=len(classes)).unsqueeze(1)
        centre = x.mean(0)
        within, spread = _covariance(x - means[y]), _covariance(x - centre)
        shift = ridge * float(torch.diagonal(within).mean()) + 1e-12
        return cls(means.float(), centre.float(), _whitening(within, shift).float(), _whitening(spread, shift).float())

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """(Q, D) features -> (Q,) float32 min over classes of the class distance minus the all-photo distance.

        Computed in float64: the terms are about 1e5 and their difference about 1e2, so float32 rounding
        moved scores by 0.05 and made two float32 implementations (torch, an exported ONNX graph) disagree."""
        if getattr(self, "_float64", None) is None:  # the whitened class means, once per reference
            whiten = self.whiten.double()
            means = self.means.double() @ whiten
            self._float64 = (whiten, means, (means * means).sum(1), self.centre.double(), self.whiten_all.double())
        whiten, means, means_sq, centre, whiten_all = self._float64
        x = F.normalize(feats.double(), dim=1)
        z = x @ whiten
        per_class = (z * z).sum(1, keepdim=True) - 2 * z @ means.T + means_sq
        background = ((x - centre) @ whiten_all).pow(2).sum(1, keepdim=True)
        return (per_class - background).min(dim=1).values.float()


def _covariance(z: torch.Tensor) -> torch.Tensor:
    """(N, D) centred rows -> (D, D) covariance."""
    return z.T @ z / max(1, len(z) - 1)


def _whitening(cov: torch.Tensor, shift: float) -> torch.Tensor:
    """W (D, D) with W @ W.T = (cov + shift I)^-1, from the eigendecomposition (stable when cov is singular)."""
    values, vectors = torch.linalg.eigh(cov)
    return vectors * (values.clamp_min(0) + shift).rsqrt()


def max_softmax_scores(logits: torch.Tensor) -> torch.Tensor:
    """(Q, C) logits -> (Q,) minus the top softmax probability (in [-1, -1/C])."""
    return -logits.float().softmax(dim=1).max(dim=1).values


def max_logit_scores(logits: torch.Tensor) -> torch.Tensor:
    """(Q, C) logits -> (Q,) minus the top logit."""
    return -logits.float().max(dim=1).values


def calibrate_threshold(known_scores, keep: float = DEFAULT_KEEP) -> float:
    """The smallest threshold t with at least `keep` of `known_scores` (Q,) at or below it.

    t is the ceil(keep x Q)-th smallest known score: photos scoring <= t are accepted as known.
    """
    s = np.sort(np.asarray(known_scores, dtype=np.float64).ravel())
    if not 0 < keep <= 1 or len(s) == 0:
        raise ValueError(f"need 0 < keep <= 1 and at least one score, got keep={keep}, {len(s)} scores")
    return float(s[max(1, math.ceil(keep * len(s) - 1e-9)) - 1])


def open_set_metrics(known_scores, unknown_scores, keep: float = DEFAULT_KEEP) -> dict[str, float]:
    """{"auroc", "fpr95"} in [0, 1] of scores (larger = more unknown) of known (K,) and unknown (U,) photos.

    auroc: sklearn's ROC AUC with unknown photos as the positive class (1.0: every unknown photo
        scores above every known one; 0.5: chance).
    fpr95: the standard FPR at 95% TPR (Sun et al.), known photos being the positives: at the
        threshold of `calibrate_threshold(known_scores, keep)` (at least 95% of known photos
        accepted), the fraction of unknown photos also accepted (score <= threshold).
    """
    from sklearn.metrics import roc_auc_score

    known = np.asarray(known_scores, dtype=np.float64).ravel()
    unknown = np.asarray(unknown_scores, dtype=np.float64).ravel()
    if len(known) == 0 or len(unknown) == 0:
        raise ValueError(f"need known and unknown scores, got {len(known)} and {len(unknown)}")
    labels = np.r_[np.zeros(len(known)), np.ones(len(unknown))]
    auroc = float(roc_auc_score(labels, np.r_[known, unknown]))
    return {"auroc": auroc, "fpr95": float((unknown <= calibrate_threshold(known, keep)).mean())}


def choose_k(k: int, labels: torch.Tensor) -> int:
    """min(k, median images per class of the reference labels (N,)), at least 1.

    Beyond a typical class's size the k-th neighbour of a known photo is another species, and known
    and unknown photos look alike.
    """
    counts = torch.bincount(labels.long())
    counts = counts[counts > 0].float()
    return max(1, min(int(k), int(counts.median().item()) if len(counts) else 1))


@dataclass
class OpenSetReference:
    """What open-set scoring of new photos needs: the reference features and labels, the score and threshold.

    Attributes:
        features: (N, D) float16 L2-normalised training features; labels: (N,) int64 class ids.
        k: neighbour rank of the kNN-distance score; threshold: scores above it are unknown species.
        calibrated_on: "val" or "train hold-out"; keep: fraction of those known photos accepted.
        score: one of SCORES.
    """

    features: torch.Tensor
    k: int
    threshold: float
    calibrated_on: str
    keep: float = DEFAULT_KEEP
    labels: torch.Tensor | None = None
    score: str = "knn_distance"

    def __post_init__(self):
        if self.score not in SCORES or (self.score == "relative_mahalanobis" and self.labels is None):
            raise ValueError(f"score must be one of {SCORES} (relative_mahalanobis with labels), got {self.score!r}")
        self._mahalanobis = None

    def info(self) -> dict:
        """The artifact.json record (features and labels go to the weights file under REFERENCE_KEY, LABELS_KEY)."""
        return {"score": self.score, "k": self.k, "threshold": self.threshold,
                "calibrated_on": self.calibrated_on, "keep": self.keep}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The reference's tensors for the artifact's weights file."""
        out = {REFERENCE_KEY: self.features}
        if self.labels is not None:
            out[LABELS_KEY] = self.labels.long()
        return out

    @classmethod
    def from_artifact(cls, info: dict, state: dict[str, torch.Tensor]) -> "OpenSetReference":
        """The reference back from its `info()` record and the artifact's weights (artifacts before
        LABELS_KEY score with the kNN distance, as they were calibrated)."""
        return cls(state[REFERENCE_KEY], int(info["k"]), float(info["threshold"]), info["calibrated_on"],
                   float(info.get("keep", DEFAULT_KEEP)), state.get(LABELS_KEY), info.get("score", "knn_distance"))

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """(Q, D) features -> (Q,) scores of `self.score` against the reference."""
        if self.score == "knn_distance":
            return knn_distance_scores(self.features, feats, self.k)
        if self._mahalanobis is None:
            self._mahalanobis = RelativeMahalanobis.fit(self.features, self.labels)
        return self._mahalanobis.scores(feats)


def fit_open_set(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor | None = None, *,
                 k: int = DEFAULT_K, keep: float = DEFAULT_KEEP, seed: int = 0,
                 score: str = "relative_mahalanobis") -> OpenSetReference | None:
    """The reference and a threshold accepting `keep` of known photos it did not contain.

    With val features (M, D) the reference is all of train (N, D); otherwise a stratified hold-out
    of train (as the linear probe's) is scored against the rest, which alone becomes the reference,
    so no photo is its own neighbour. k is `choose_k(k, reference labels)`. None when there is
    neither val nor a class with 2 train photos to hold out.
    """
    ref, labels = F.normalize(train_feats.float(), dim=1).half(), train_labels.long()
    if val_feats is not None and len(val_feats):
        calib, where = val_feats, "val"
    else:
        fit_idx, held_idx = stratified_holdout(train_labels.numpy(), seed)
        if len(held_idx) == 0:
            return None
        fit_idx, held_idx = torch.from_numpy(fit_idx), torch.from_numpy(held_idx)
        calib, labels, ref, where = train_feats[held_idx], labels[fit_idx], ref[fit_idx], "train hold-out"
    reference = OpenSetReference(ref.contiguous(), choose_k(k, labels), 0.0, where, keep, labels, score)
    reference.threshold = calibrate_threshold(reference.scores(calib), keep)
    return reference
