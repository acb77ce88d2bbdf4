"""Per-class accuracy and the most confused species pairs of a classification, as tables (pandas DataFrames)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["confused_pairs", "confusion_counts", "per_class_accuracy"]


def _labels(y_true, y_pred, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Check and return y_true, y_pred as int64 (N,) arrays with values in [0, num_classes)."""
    t = np.asarray(y_true).reshape(-1)
    p = np.asarray(y_pred).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and not np.issubdtype(a.dtype, np.integer):
            if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
                raise ValueError(f"{name} must hold integer class indices")
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} has values outside [0, {num_classes}): min {a.min()}, max {a.max()}")
    return t.astype(np.int64), p.astype(np.int64)


def confusion_counts(y_true, y_pred, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: row = true class, column = predicted class."""
    from sklearn.metrics import confusion_matrix

    t, p = _labels(y_true, y_pred, num_classes)
    if t.size == 0:
        return np.zeros((num_classes, num_classes), dtype=np.int64)
    return confusion_matrix(t, p, labels=np.arange(num_classes)).astype(np.int64)


def per_class_accuracy(y_true, y_pred, class_names: Sequence[str]) -> pd.DataFrame:
    """Top-1 accuracy of each class and the class it is most often mistaken for.

    Args:
        y_true: (N,) int true class indices in [0, C).
        y_pred: (N,) int predicted class indices in [0, C).
        class_names: C names; class i is `class_names[i]`.

    Returns:
        C rows with columns class (str), images (int, test images of the class), correct (int),
        accuracy (float fraction in [0, 1]; NaN when the class has no images) and
        most_confused_with (name of the class most often predicted for it instead, ties to the
        lower index; "" when it has no errors). Sorted by accuracy ascending, then class name;
        classes without images come last.
    """
    names = [str(n) for n in class_names]
    cm = confusion_counts(y_true, y_pred, len(names))
    images = cm.sum(axis=1)
    correct = np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(images > 0, correct / np.maximum(images, 1), np.nan)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    worst = off.argmax(axis=1) if len(names) else np.zeros(0, dtype=np.int64)
    confused = [names[j] if off[i, j] > 0 else "" for i, j in enumerate(worst)]
    df = pd.DataFrame({
        "class": pd.Series(names, dtype=object),
        "images": images.astype(np.int64),
        "correct": correct.astype(np.int64),
        "accuracy": accuracy.astype(np.float64),
        "most_confused_with": pd.Series(confused, dtype=object),
    })
    return df.sort_values(["accuracy", "class"], kind="mergesort", na_position="last").reset_index(drop=True)


def confused_pairs(y_true, y_pred, class_names: Sequence[str], top: int = 20) -> pd.DataFrame:
    """The most frequent mistakes, as (true class, predicted class) pairs.

    Args:
        y_true, y_pred: (N,) int class indices in [0, C).
        class_names: C names.
        top: at most this many rows.

    Returns:
        Columns true (str), predicted (str), count (int, test images of `true` predicted as
        `predicted`) and fraction_of_true (count / images of the true class, in [0, 1]). Only
        off-diagonal pairs with count > 0, sorted by count descending, then true and predicted
        class name.
    """
    names = [str(n) for n in class_names]
    cm = confusion_counts(y_true, y_pred, len(names))
    images = cm.sum(axis=1)
    rows, cols = np.nonzero(cm * (1 - np.eye(len(names), dtype=np.int64)))
    counts = cm[rows, cols]
    df = pd.DataFrame({
        "true": pd.Series([names[i] for i in rows], dtype=object),
        "predicted": pd.Series([names[j] for j in cols], dtype=object),
        "count": counts.astype(np.int64),
        "fraction_of_true": (counts / np.maximum(images[rows], 1)).astype(np.float64),
    })
    df = df.sort_values(["count", "true", "predicted"], ascending=[False, True, True], kind="mergesort")
    return df.head(max(int(top), 0)).reset_index(drop=True)
