"""Linear probe on frozen features: scikit-learn logistic regression folded into one linear layer."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("finegrain")

# Bias of classes that had no training image: finite (fits float16, no NaN in a softmax or a
# loss), far below any score a trained class reaches, so they are never predicted.
ABSENT_CLASS_BIAS = -1.0e4
FEW_PER_CLASS = "The number of unique classes is greater than 50%"  # sklearn's UserWarning; a few photos a class is normal here
HOLDOUT_FRACTION = 0.2


def _as_numpy(x, dtype) -> np.ndarray:
    """A numpy copy-or-view of a numpy array or a (CPU or GPU) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (clamped at 1e-12, like torch.nn.functional.normalize)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _softmax(scores: np.ndarray) -> np.ndarray:
    z = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class LinearProbe:
    """A multinomial logistic regression on L2-normalised features, as one linear layer.

    scores(x) = normalize(x) @ weight.T + bias; the standardisation the probe was trained with is
    folded into weight and bias, so `torch.nn.Linear(D, C)` with these parameters (applied to
    L2-normalised features) computes the same scores.

    Attributes:
        weight: (C, D) float32.
        bias: (C,) float32; classes without training images get ABSENT_CLASS_BIAS.
        C_reg: the inverse L2 regularisation strength used (sklearn's C).
        val_top1: top-1 accuracy in [0, 1] on the set C_reg was chosen on (the given validation
            set, or the hold-out carved from train), or None when no such set was used.
        classes: number of classes C.
    """

    weight: np.ndarray
    bias: np.ndarray
    C_reg: float
    val_top1: float | None
    classes: int

    def scores(self, features) -> np.ndarray:
        """(N, D) features (numpy or torch) -> (N, C) float32 logits."""
        x = _l2_normalize(_as_numpy(features, np.float32))
        return (x @ self.weight.T + self.bias).astype(np.float32, copy=False)

    def predict_proba(self, features) -> np.ndarray:
        """(N, D) features -> (N, C) float32 class probabilities (softmax of the scores)."""
        return _softmax(self.scores(features))

    def predict(self, features) -> np.ndarray:
        """(N, D) features -> (N,) int64 class with the highest score."""
        return self.scores(features).argmax(axis=1)


def _fit_one(x: np.ndarray, y: np.ndarray, *, num_classes: int, C: float, max_iter: int, seed: int) -> LinearProbe:
    """StandardScaler + LogisticRegression on L2-normalised x (N, D), folded into a LinearProbe."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    dim = x.shape[1]
    weight = np.zeros((num_classes, dim), dtype=np.float64)
    bias = np.full(num_classes, ABSENT_CLASS_BIAS, dtype=np.float64)
    present = np.unique(y)
    if len(present) == 1:  # nothing to discriminate: always predict the only class seen
        bias[present[0]] = 0.0
        return LinearProbe(weight.astype(np.float32), bias.astype(np.float32), float(C), None, num_classes)

    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # record every warning; only the unexpected ones are passed on below
        clf.fit(scaler.transform(x), y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning("linear probe: lbfgs did not converge in %d iterations (C=%g)", max_iter, C)
    for w in caught:  # pass on anything else but sklearn's guess that a few photos a class look like regression targets
        if not issubclass(w.category, ConvergenceWarning) and not str(w.message).startswith(FEW_PER_CLASS):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary: sigmoid(z) == softmax([0, z])[1]
        coef = np.concatenate([np.zeros_like(coef), coef])
        intercept = np.concatenate([np.zeros(1), intercept])
    # fold the scaler: w . (x - mu) / sigma + b = (w / sigma) . x + (b - (w / sigma) . mu)
    folded = coef / scaler.scale_
    weight[clf.classes_] = folded
    bias[clf.classes_] = intercept - folded @ scaler.mean_
    return LinearProbe(weight.astype(np.float32), bias.astype(np.float32), float(C), None, num_classes)


def _top1(probe: LinearProbe, x: np.ndarray, y: np.ndarray) -> float:
    return float((probe.predict(x) == y).mean())


def stratified_holdout(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, hold-out): round(20%) (at least 1) of each class with >= 2 items is held out.

    Every class keeps at least one item on the fit side; classes with one item are not held out.
    """
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) >= 2:
            n_hold = min(max(1, round(HOLDOUT_FRACTION * len(idx))), len(idx) - 1)
            held.append(rng.permutation(idx)[:n_hold])
    held = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    fit = np.setdiff1d(np.arange(len(y)), held)
    return fit, held


def fit_linear_probe(
    train_x,
    train_y,
    *,
    num_classes: int,
    val_x=None,
    val_y=None,
    Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
    max_iter: int = 1000,
    seed: int = 0,
) -> LinearProbe:
    """Fit a multinomial logistic-regression probe on frozen features, choosing C by top-1.

    Features are L2-normalised, then standardised (StandardScaler), then fit by
    sklearn's LogisticRegression (lbfgs, multinomial, L2 penalty); the scaler is folded into the
    returned probe's weight and bias.

    The regularisation C is the one of `Cs` with the best top-1 accuracy (ties: the smallest C,
    i.e. the strongest regularisation) on
      - (val_x, val_y) when given: the probe is fit on train only and val_top1 is its val accuracy;
      - otherwise a stratified hold-out of the TRAIN features (about 20% of each class with >= 2
        images): the returned probe is then refit on all train features with the chosen C, and
        val_top1 is the hold-out accuracy of the C chosen (fit without the hold-out).
    With a single C nothing is chosen and no hold-out is made (val_top1 is still reported when a
    val set is given). When no train class has >= 2 images there is no hold-out: C = 1.0 and
    val_top1 = None. No test set is ever used.

    Classes in [0, num_classes) without training images get a zero weight row and
    ABSENT_CLASS_BIAS, so scores always have num_classes columns and those classes are never
    predicted.

    Args:
        train_x: (N, D) features, numpy or torch; train_y: (N,) int labels in [0, num_classes).
        num_classes: C.
        val_x, val_y: optional (M, D) features and (M,) labels to choose C on.
        Cs: candidate inverse regularisation strengths (> 0).
        max_iter: lbfgs iterations; non-convergence is logged once per fit, not warned.
        seed: seed of the hold-out split (lbfgs itself is deterministic).

    Returns:
        the fitted LinearProbe.
    """
    x = _l2_normalize(_as_numpy(train_x, np.float64))
    y = _as_numpy(train_y, np.int64)
    Cs = [float(c) for c in Cs]
    if not Cs or min(Cs) <= 0:
        raise ValueError(f"Cs must be positive, got {Cs}")
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(f"expected train features (N, D) and labels (N,) with N >= 1, got {x.shape} and {y.shape}")
    _check_labels(y, num_classes, "train_y")
    if (val_x is None) != (val_y is None):
        raise ValueError("give both val_x and val_y, or neither")
    fit = dict(num_classes=num_classes, max_iter=max_iter, seed=seed)

    if val_x is not None:
        vx = _l2_normalize(_as_numpy(val_x, np.float64))
        vy = _as_numpy(val_y, np.int64)
        if vx.ndim != 2 or vx.shape[1] != x.shape[1] or vy.shape != (vx.shape[0],) or vx.shape[0] == 0:
            raise ValueError(f"expected val features (M, {x.shape[1]}) and labels (M,) with M >= 1, got {vx.shape} and {vy.shape}")
        _check_labels(vy, num_classes, "val_y")
        best, best_acc = None, -1.0
        for C in Cs:
            probe = _fit_one(x, y, C=C, **fit)
            acc = _top1(probe, vx, vy)
            if acc > best_acc or (acc == best_acc and C < best.C_reg):
                best, best_acc = probe, acc
        best.val_top1 = best_acc
        return best

    if len(Cs) == 1:
        return _fit_one(x, y, C=Cs[0], **fit)
    fit_idx, held_idx = stratified_holdout(y, seed)
    if len(held_idx) == 0:
        log.warning("linear probe: no class has 2 training images to hold out; using C=1.0 unchosen")
        return _fit_one(x, y, C=1.0, **fit)
    best_C, best_acc = None, -1.0
    for C in Cs:
        acc = _top1(_fit_one(x[fit_idx], y[fit_idx], C=C, **fit), x[held_idx], y[held_idx])
        if acc > best_acc or (acc == best_acc and C < best_C):
            best_C, best_acc = C, acc
    probe = _fit_one(x, y, C=best_C, **fit)
    probe.val_top1 = best_acc
    return probe


def _check_labels(y: np.ndarray, num_classes: int, name: str) -> None:
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name} must be in [0, {num_classes}), got [{y.min()}, {y.max()}]")
