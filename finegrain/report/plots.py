"""Plots of a classification as PNG files: confusion matrix, per-class accuracy, open-set ROC curves.

matplotlib's object-oriented API (`matplotlib.figure.Figure`, rendered by Agg when saved): pyplot and
the global backend are never touched, so importing this module is safe in any process. Every file is
written atomically (see `finegrain.fsutil`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from finegrain.fsutil import atomic_path
from finegrain.report.tables import confusion_counts

__all__ = ["plot_confusion_matrix", "plot_open_set_roc", "plot_per_class_accuracy", "save_png"]

_DPI = 100


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Render `fig` with Agg to a PNG at `path`, atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        # the temporary name ends in .tmp, so the format must be given explicitly
        fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches="tight")
    return path


def _tick_fontsize(inches_per_class: float) -> float:
    """A label font size (points) that fits one class per `inches_per_class`, between 4 and 10."""
    return float(np.clip(inches_per_class * 72 * 0.7, 4.0, 10.0))


def _worst_classes(y_true, y_pred, num_classes: int, max_classes: int | None) -> np.ndarray:
    """Sorted indices of the classes to show: all, or the `max_classes` with the lowest accuracy.

    Classes without test images rank after every class with images; ties go to the lower index.
    """
    if max_classes is None or num_classes <= max_classes:
        return np.arange(num_classes)
    cm = confusion_counts(y_true, y_pred, num_classes)
    images = cm.sum(axis=1)
    acc = np.where(images > 0, np.diag(cm) / np.maximum(images, 1), np.inf)
    order = np.lexsort((np.arange(num_classes), acc))
    return np.sort(order[:max_classes])


def plot_confusion_matrix(
    y_true,
    y_pred,
    class_names: Sequence[str],
    path: str | os.PathLike,
    normalize: bool = True,
    max_classes: int | None = 60,
) -> Path:
    """Save a confusion-matrix heat map as a PNG.

    Args:
        y_true, y_pred: (N,) int class indices in [0, C).
        class_names: C names.
        path: the PNG to write.
        normalize: colour by the fraction of the true class's images (rows sum to 1 over all C
            classes); otherwise by raw counts.
        max_classes: with more than this many classes, show only the `max_classes` classes with
            the lowest accuracy (rows and columns, kept in class-index order; the title says so).
            None shows all.

    Returns:
        `path`. The figure is about 0.2 inch (20 px) per class shown, at least 6 inches.
    """
    names = [str(n) for n in class_names]
    c = len(names)
    cm = confusion_counts(y_true, y_pred, c).astype(np.float64)
    if normalize:
        rows = cm.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            cm = np.where(rows > 0, cm / np.maximum(rows, 1), np.nan)
    shown = _worst_classes(y_true, y_pred, c, max_classes)
    sub = cm[np.ix_(shown, shown)]
    n = len(shown)

    side = float(np.clip(2.0 + 0.2 * n, 6.0, 45.0))
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    image = ax.imshow(
        np.ma.masked_invalid(sub), cmap="Blues", interpolation="nearest", aspect="equal",
        vmin=0.0, vmax=1.0 if normalize else max(1.0, float(np.nanmax(sub)) if sub.size else 1.0),
    )
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="fraction of true class" if normalize else "images")
    fontsize = _tick_fontsize(side * 0.8 / max(n, 1))
    ax.set_xticks(np.arange(n))
    ax.set_yticks(np.arange(n))
    labels = [names[i] for i in shown]
    ax.set_xticklabels(labels, rotation=90, fontsize=fontsize, parse_math=False)
    ax.set_yticklabels(labels, fontsize=fontsize, parse_math=False)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 20:  # small enough to print each cell's value
        for i in range(n):
            for j in range(n):
                v = sub[i, j]
                if np.isfinite(v) and v > 0:
                    text = f"{v:.2f}" if normalize else f"{int(v)}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=fontsize * 0.9,
                            color="white" if v > 0.5 * (1.0 if normalize else np.nanmax(sub)) else "black")
    what = "row-normalised" if normalize else "counts"
    if n < c:
        title = f"Confusion matrix ({what}): the {n} lowest-accuracy of {c} classes"
    else:
        title = f"Confusion matrix ({what}), {c} classes"
    ax.set_title(title)
    return save_png(fig, path)


def plot_per_class_accuracy(per_class_df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Save a horizontal bar chart of per-class accuracy (worst class at the top) as a PNG.

    Args:
        per_class_df: a `per_class_accuracy` table (columns class, accuracy as a fraction in
            [0, 1]; images used when present). Classes with NaN accuracy (no images) are left out.
        path: the PNG to write.

    Returns:
        `path`. Bars are about 0.16 inch each, so 200 classes give a tall (~34 inch) figure;
        a dashed line marks the mean over the classes shown (macro accuracy).
    """
    df = per_class_df[per_class_df["accuracy"].notna()]
    df = df.sort_values(["accuracy", "class"], kind="mergesort")
    n = len(df)
    acc = df["accuracy"].to_numpy(dtype=np.float64) * 100.0
    names = [str(c) for c in df["class"]]

    height = float(np.clip(1.5 + 0.16 * n, 3.0, 60.0))
    fig = Figure(figsize=(8.0, height))
    ax = fig.add_subplot()
    from matplotlib import colormaps

    ax.barh(np.arange(n), acc, height=0.8, color=colormaps["RdYlGn"](acc / 100.0))
    ax.set_yticks(np.arange(n))
    ax.set_yticklabels(names, fontsize=_tick_fontsize((height - 1.5) / max(n, 1)), parse_math=False)
    ax.set_ylim(n - 0.5, -0.5)  # worst at the top
    ax.set_xlim(0, 100)
    ax.set_xlabel("top-1 accuracy (%)")
    ax.xaxis.set_ticks_position("both")
    ax.tick_params(axis="x", labeltop=True)
    ax.grid(axis="x", alpha=0.3)
    if n:
        mean = float(acc.mean())
        ax.axvline(mean, color="black", linestyle="--", linewidth=1)
        title = f"Per-class accuracy, {n} classes (mean {mean:.1f}%)"
    else:
        title = "Per-class accuracy (no classes with test images)"
    skipped = len(per_class_df) - n
    if skipped:
        title += f"; {skipped} without test images not shown"
    ax.set_title(title, pad=24)
    return save_png(fig, path)


def plot_open_set_roc(scores: Mapping[str, tuple], path: str | os.PathLike) -> Path:
    """Save the ROC curve of each open-set score (unknown species as the positives) as a PNG.

    Args:
        scores: score name -> (known, unknown), 1-D arrays of "known-ness" (higher = more likely
            a known species), as eval/open_set.py's scores are.
        path: the PNG to write.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = Figure(figsize=(5.0, 5.0))
    ax = fig.add_subplot()
    for name, (known, unknown) in scores.items():
        y = np.r_[np.zeros(len(known)), np.ones(len(unknown))]
        s = -np.r_[np.asarray(known, dtype=np.float64), np.asarray(unknown, dtype=np.float64)]
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("known-species photos called unknown (FPR)")
    ax.set_ylabel("unknown-species photos called unknown (TPR)")
    ax.set_title("Unknown species: ROC of each score")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return save_png(fig, path)
