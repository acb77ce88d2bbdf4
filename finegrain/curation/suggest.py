"""Which unlabelled photos to label next: low-budget active learning on L2-normalised embeddings.

scikit-activeml selects: TypiClust (Hacohen et al. ICML 2022) and ProbCover (Yehuda et al. NeurIPS
2022) for a cold start; once labels exist, CLUE (Prabhu et al. ICCV 2021: k-means weighted by a
classifier's margin uncertainty, the photo nearest each centre) over the 10 x budget least certain
photos (Zhdanov 2019's diverse mini-batch rule), with finegrain's own linear probe (eval/linear.py)
as the classifier. Written here is only what the library leaves open: the choice between them, the
uncertain pre-selection, ProbCover's memory cap and radius grid, a guard against repeated picks,
and a description of each pick (score, the photos it stands for, a reason) for the user.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from finegrain.errors import FinegrainError
from finegrain.eval.index import nearest
from finegrain.eval.linear import fit_linear_probe

log = logging.getLogger("finegrain")

STRATEGIES = ("typiclust", "probcover", "uncertainty")
TYPICALITY_K = 5  # neighbours in the typicality score, TypiClust's k
KMEANS_MAX_CLUSTERS = 50  # above this TypiClust clusters with MiniBatchKMeans, as its authors' code does
UNCERTAIN_POOL = 10  # uncertainty: cluster the 10 x budget least certain photos (Zhdanov 2019's beta)
PROBCOVER_DELTAS = np.arange(0.05, 2.0, 0.05)  # radii on the unit sphere (0-2); the library's 0.2 steps are coarse


@dataclass
class Picks:
    """Photos to label next, in the order to label them.

    Attributes:
        index: (B,) int64 rows of the unlabelled pool.
        score: (B,) float64: typicality, 1 / mean distance to the photo's 5 nearest pool photos
            (typiclust, probcover), or margin uncertainty 1 - (p1 - p2) in [0, 1] (uncertainty).
        represents: (B,) int64: pool photos (itself included) nearer to this pick than to any other
            pick or labelled photo.
        reason: B short texts for the user.
        strategy: the strategy that chose them.
    """

    index: np.ndarray
    score: np.ndarray
    represents: np.ndarray
    reason: list[str]
    strategy: str


def auto_strategy(n_labelled: int, labelled_classes: int, known_classes: int, per_class: float) -> tuple[str, str]:
    """(strategy, why): typiclust while labels are too few for a classifier to say much, else uncertainty."""
    classes = max(known_classes, labelled_classes)
    if labelled_classes < 2:
        return "typiclust", f"{n_labelled} labelled train photo(s) of {labelled_classes} species: a cold start"
    if n_labelled < per_class * classes:
        return "typiclust", (f"{n_labelled} labelled train photos, fewer than {per_class:g} per species for "
                             f"{classes} species: a cold start")
    return "uncertainty", f"{n_labelled} labelled train photos of {labelled_classes} species"


def suggest(strategy: str, pool: np.ndarray, labelled: np.ndarray, labels: np.ndarray, budget: int, *,
            class_names: list[str], species: int = 0, seed: int = 0, probcover_limit: int = 8000) -> Picks:
    """Choose `budget` distinct pool photos to label next.

    Args:
        strategy: one of STRATEGIES.
        pool: (N, D) float32 L2-normalised features of the unlabelled photos.
        labelled: (L, D) float32 L2-normalised features of the labelled photos (L may be 0).
        labels: (L,) int codes into `class_names` (the labelled species).
        budget: 1 <= budget <= N.
        species: how many species there are in all, labelled or not (0: unknown). ProbCover's radius
            depends on it: the largest that keeps 95% of neighbourhoods within one of `species`
            k-means clusters; unknown, the budget stands in for it.
        probcover_limit: probcover refuses more than this many photos (N + L): it holds N x N distances.
    """
    if not 1 <= budget <= len(pool):
        raise ValueError(f"budget must be in [1, {len(pool)}], got {budget}")
    X = np.concatenate([labelled, pool]).astype(np.float32, copy=False)
    y = np.concatenate([np.asarray(labels, dtype=np.float64), np.full(len(pool), np.nan)])
    offset = len(labelled)
    probs = None
    if strategy == "typiclust":
        chosen = _typiclust(X, y, budget, seed)
    elif strategy == "probcover":
        clusters = species or max(len(class_names), budget)
        chosen = _probcover(X, y, budget, seed, n_classes=clusters, limit=probcover_limit)
    elif strategy == "uncertainty":
        chosen, probs = _clue(X, y, budget, seed, n_classes=len(class_names))
    else:
        raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    index = _distinct(np.asarray(chosen, dtype=np.int64) - offset, len(pool), budget, seed)
    return _describe(strategy, pool, labelled, index, probs, class_names)


def _typiclust(X: np.ndarray, y: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """TypiClust's picks (rows of X): the most typical photo of each of the `budget` largest uncovered clusters."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from skactiveml.pool import TypiClust

    n_clusters = int(np.isfinite(y).sum()) + budget  # what TypiClust will ask for
    algo, params = (KMeans, {}) if n_clusters <= KMEANS_MAX_CLUSTERS else (MiniBatchKMeans, {"batch_size": 4096})
    qs = TypiClust(random_state=seed, cluster_algo=algo, cluster_algo_dict=params, k=TYPICALITY_K)
    with warnings.catch_warnings():  # duplicate photos: fewer distinct clusters; _distinct copes
        warnings.simplefilter("ignore")
        return qs.query(X, y, batch_size=budget)


def _probcover(X: np.ndarray, y: np.ndarray, budget: int, seed: int, *, n_classes: int, limit: int) -> np.ndarray:
    """ProbCover's picks (rows of X), its radius the largest of PROBCOVER_DELTAS keeping 95% purity."""
    from skactiveml.pool import ProbCover

    if len(X) > limit:
        raise FinegrainError(f"--strategy probcover compares every pair of the {len(X)} photos (labelled train + "
                             f"unlabelled), above --probcover-limit {limit}; use --strategy typiclust, or raise the "
                             f"limit if memory allows (about {7 * len(X) ** 2 / 1e9:.1f} GB)")
    qs = ProbCover(n_classes=max(n_classes, 2), deltas=PROBCOVER_DELTAS, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = qs.query(X, y, batch_size=budget)
    if any("purity" in str(w.message) for w in caught):
        log.warning("probcover: no radius keeps 95%% of neighbourhoods within one k-means cluster; using the "
                    "smallest, %.2f", PROBCOVER_DELTAS[0])
    log.info("probcover: radius %.2f (cosine distance %.3f), from %d k-means clusters", qs.delta_max_,
             qs.delta_max_ ** 2 / 2, n_classes)
    return chosen


def _clue(X: np.ndarray, y: np.ndarray, budget: int, seed: int, *, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Picks (rows of X): CLUE over the UNCERTAIN_POOL x budget least certain unlabelled photos; and the probe's
    (N, C) probabilities of all unlabelled photos."""
    from skactiveml.classifier import SklearnClassifier
    from skactiveml.pool import Clue, uncertainty_scores

    labelled = np.isfinite(y)
    if len(np.unique(y[labelled])) < 2:
        raise FinegrainError("--strategy uncertainty needs labelled train photos of at least 2 species; use "
                             "--strategy typiclust (or auto) for a cold start")
    clf = SklearnClassifier(_ProbeClassifier(n_classes, seed), classes=np.arange(n_classes), random_state=seed)
    clf.fit(X, y)
    if not clf.is_fitted_:  # SklearnClassifier falls back to class frequencies when fitting fails
        raise FinegrainError("the logistic regression on the labelled train photos could not be fitted")
    pool = np.flatnonzero(~labelled)
    probs = clf.predict_proba(X[pool])
    # Clustering all photos puts CLUE's centres in dense, confident regions (margin weights range only
    # 0.5-1): cluster the most uncertain ones only, as Zhdanov's DMBAL does. Clue does not seed k-means.
    margin = uncertainty_scores(probs, method="margin_sampling")
    candidates = pool[np.argsort(-margin, kind="stable")[:UNCERTAIN_POOL * budget]]
    qs = Clue(method="margin_sampling", cluster_algo_dict={"random_state": seed}, random_state=seed)
    return qs.query(X, y, clf, fit_estimator=False, candidates=candidates, batch_size=budget), probs


class _ProbeClassifier(ClassifierMixin, BaseEstimator):
    """finegrain's linear probe (eval/linear.py) as the scikit-learn classifier skactiveml wraps.

    Written by hand so that the probe's fitting (L2 normalisation, scaling, C chosen on a hold-out)
    is not written twice. Classes are the codes 0 .. num_classes - 1.
    """

    def __init__(self, num_classes: int = 2, seed: int = 0):
        self.num_classes, self.seed = num_classes, seed

    def fit(self, X, y):
        self.probe_ = fit_linear_probe(X, np.asarray(y, dtype=np.int64), num_classes=self.num_classes, seed=self.seed)
        self.classes_ = np.arange(self.num_classes)
        return self

    def predict_proba(self, X) -> np.ndarray:
        return self.probe_.predict_proba(X).astype(np.float64)

    def predict(self, X) -> np.ndarray:
        return self.probe_.predict(X)


def _distinct(index: np.ndarray, n_pool: int, budget: int, seed: int) -> np.ndarray:
    """`index` without repeats, topped up with random pool rows to `budget`.

    TypiClust can pick a photo twice when k-means finds fewer distinct clusters than asked (duplicate photos).
    """
    _, first = np.unique(index, return_index=True)
    index = index[np.sort(first)]
    if len(index) < budget:
        rest = np.setdiff1d(np.arange(n_pool), index)
        extra = np.random.default_rng(seed).choice(rest, budget - len(index), replace=False)
        log.warning("suggest: the strategy found only %d distinct photos; %d more chosen at random", len(index),
                    len(extra))
        index = np.concatenate([index, extra])
    return index[:budget]


def _describe(strategy: str, pool: np.ndarray, labelled: np.ndarray, index: np.ndarray, probs, class_names) -> Picks:
    """Score, represents and reason of each pick; uncertainty picks ordered by the uncertainty they stand for."""
    nearest = _nearest_pick(pool, labelled, index)
    stands, mine = nearest >= 0, nearest[nearest >= 0]
    represents = np.bincount(mine, minlength=len(index))
    if probs is None:
        noun = "cluster" if strategy == "typiclust" else "dense region"
        reason = [f"typical of an unlabelled {noun} of {n} photo(s)" for n in represents]
        return Picks(index, typicality(pool, index), represents, reason, strategy)
    top2 = np.argsort(-probs, axis=1)[:, :2]
    p2 = np.take_along_axis(probs, top2, 1)
    margin = 1.0 - (p2[:, 0] - p2[:, 1])
    # CLUE's clusters come unordered: the pick standing for the most uncertainty first
    order = np.argsort(-np.bincount(mine, weights=margin[stands], minlength=len(index)), kind="stable")
    index, represents = index[order], represents[order]
    reason = [f"uncertain: top-2 species {class_names[top2[i, 0]]} / {class_names[top2[i, 1]]} "
              f"({p2[i, 0]:.2f} / {p2[i, 1]:.2f})" for i in index]
    return Picks(index, margin[index], represents, reason, strategy)


def _nearest_pick(pool: np.ndarray, labelled: np.ndarray, index: np.ndarray) -> np.ndarray:
    """(N,) for each pool photo the position in `index` of its nearest pick, or -1 when a labelled photo is nearer."""
    from sklearn.metrics import pairwise_distances_argmin

    anchors = np.concatenate([pool[index], labelled])
    nearest = pairwise_distances_argmin(pool, anchors)  # computed in chunks: memory linear in N
    nearest[index] = np.arange(len(index))  # a pick stands for itself even when a duplicate photo is labelled
    return np.where(nearest < len(index), nearest, -1)


def typicality(pool: np.ndarray, index: np.ndarray, k: int = TYPICALITY_K) -> np.ndarray:
    """(B,) 1 / mean Euclidean distance of pool[index] to their k nearest other pool photos (TypiClust's measure)."""
    k = min(k, len(pool) - 1)
    if k < 1:
        return np.ones(len(index))
    sims, _ = nearest(pool, pool[index], k + 1)  # the first is the photo itself
    dist = np.sqrt(np.clip(2.0 - 2.0 * sims[:, 1:].astype(np.float64), 0.0, None))  # Euclidean on the unit sphere
    return 1.0 / (dist.mean(axis=1) + 1e-7)
