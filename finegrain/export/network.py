"""The torch module that becomes the exported graph's network part: backbone, classifier, open-set score.

It computes what `finegrain predict` computes from a batch of preprocessed photos, with the artifact's stored
classifier and open-set reference as constants: features (flip-averaged when the classifier was fitted so),
L2-normalised, the logistic regression's softmax, and the unknown-species score against the threshold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.eval.open_set import OpenSetReference, RelativeMahalanobis

OUTPUTS = ("probabilities", "embedding", "unknown_score", "known")  # the last two only with open-set scoring


class MahalanobisScore(nn.Module):
    """(B, D) features -> (B,) relative Mahalanobis score (eval/open_set.py), in a form a few hundred kB large.

    eval/open_set.py keeps two (D, D) whitening maps W, Wa (26 MB in float64 at D = 1280, more than the backbone).
    With P = W W^T, Pa = Wa Wa^T, y = x - c and d_c = m_c - c the score min_c (x - m_c)^T P (x - m_c) -
    (x - c)^T Pa (x - c) equals y^T (P - Pa) y + min_c (d_c^T P d_c - 2 (P d_c) . y), and P - Pa has rank at most
    C - 1 (the two covariances differ by the between-species scatter; both get the same ridge), so
    y^T (P - Pa) y = |L^T y|^2 with L (D, C - 1). Computed in float64 from the float32 maps the reference holds;
    stored in float32 (L, P d_c, d_c^T P d_c, c), worked in float64.
    """

    def __init__(self, reference: OpenSetReference):
        super().__init__()
        fit = RelativeMahalanobis.fit(reference.features, reference.labels)
        w, wa = fit.whiten.double(), fit.whiten_all.double()
        means, centre = fit.means.double(), fit.centre.double()
        p, pa = w @ w.T, wa @ wa.T
        values, vectors = torch.linalg.eigh(p - pa)
        rank = min(len(means) - 1, int((values > values.max() * 1e-9).sum()))
        low = vectors[:, -rank:] * values[-rank:].sqrt() if rank > 0 else torch.zeros(len(w), 1, dtype=w.dtype)
        offsets = means - centre  # measured from the centre c the terms are smaller: less float32 cancellation
        pull = offsets @ p  # (C, D)
        parts = {"low": low, "pull": pull, "class_const": (pull * offsets).sum(1), "centre": centre}
        for name, value in parts.items():
            self.register_buffer(name, value.float().contiguous())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        y = F.normalize(feats.double(), dim=1) - self.centre.double()
        quadratic = (y @ self.low.double()).pow(2).sum(1)
        return (quadratic + (self.class_const.double() - 2 * y @ self.pull.double().T).min(dim=1).values).float()


class KnnDistanceScore(nn.Module):
    """(B, D) features -> (B,) distance to the k-th nearest reference feature (both L2-normalised), in [0, 2]."""

    def __init__(self, reference: OpenSetReference):
        super().__init__()
        self.register_buffer("reference", F.normalize(reference.features.float(), dim=1).contiguous())
        self.k = min(int(reference.k), len(reference.features))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        sims = F.normalize(feats.float(), dim=1) @ self.reference.T
        kth = sims.topk(self.k, dim=1).values[:, -1]
        return (2 - 2 * kth).clamp_min(0).sqrt()


SCORERS = {"relative_mahalanobis": MahalanobisScore, "knn_distance": KnnDistanceScore}


class ExportNet(nn.Module):
    """(B, 3, S, S) normalised photos -> probabilities (B, C), embedding (B, D) L2-normalised, and with a
    reference unknown_score (B,) and known (B,) bool (score <= threshold), as `finegrain predict` computes them.

    Args:
        backbone: (B, 3, S, S) -> (B, D) pooled features, in eval mode.
        weight, bias: the stored classifier, (C, D) and (C,), on L2-normalised features.
        flip: average each photo's features with its mirror image's.
        reference: the artifact's open-set reference, or None.
    """

    def __init__(self, backbone: nn.Module, weight: torch.Tensor, bias: torch.Tensor, *, flip: bool,
                 reference: OpenSetReference | None = None):
        super().__init__()
        self.backbone = backbone.eval()
        self.register_buffer("weight", weight.float().contiguous())
        self.register_buffer("bias", bias.float().contiguous())
        self.flip = flip
        self.scorer = SCORERS[reference.score](reference) if reference is not None else None
        threshold = reference.threshold if reference is not None else 0.0
        self.register_buffer("threshold", torch.tensor(threshold, dtype=torch.float64))  # predict compares in float64

    def forward(self, x: torch.Tensor):
        if self.flip:
            both = self.backbone(torch.cat([x, x.flip(-1)]))
            feats = 0.5 * (both[: x.shape[0]] + both[x.shape[0]:])
        else:
            feats = self.backbone(x)
        feats = feats.float()
        embedding = F.normalize(feats, dim=1)
        probabilities = (embedding @ self.weight.T + self.bias).softmax(dim=1)
        if self.scorer is None:
            return probabilities, embedding
        score = self.scorer(feats)
        return probabilities, embedding, score, score.double() <= self.threshold
