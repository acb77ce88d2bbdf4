"""Evaluation report: per-class tables, confusion matrix, embedding map and a self-contained HTML page.

Plots use matplotlib's object-oriented API (`matplotlib.figure.Figure`, rendered by Agg when
saved as PNG): pyplot and the global backend are never touched, so importing this module is safe
in any process. Every file is written atomically (see `finegrain.fsutil`).
"""

from __future__ import annotations

import html
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from finegrain.fsutil import atomic_path, atomic_write_text

__all__ = [
    "confused_pairs",
    "embedding_map",
    "per_class_accuracy",
    "plot_confusion_matrix",
    "plot_embedding_map",
    "plot_open_set_roc",
    "plot_per_class_accuracy",
    "write_html_report",
]

_DPI = 100

METRIC_NAMES = {  # metric key -> what a person reads
    "knn_top1": "kNN top-1", "knn_top5": "kNN top-5", "linear_top1": "linear probe top-1",
    "linear_top5": "linear probe top-5", "recall_at_1": "Recall@1 (retrieval)", "recall_at_2": "Recall@2 (retrieval)",
    "recall_at_4": "Recall@4 (retrieval)", "recall_at_8": "Recall@8 (retrieval)", "map_at_r": "MAP@R (retrieval)",
    "open_set_auroc": "unknown species: AUROC", "open_set_fpr95": "unknown species: accepted at 95% known (FPR95)",
}


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


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


def _confusion(y_true, y_pred, num_classes: int) -> np.ndarray:
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
    cm = _confusion(y_true, y_pred, len(names))
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
    cm = _confusion(y_true, y_pred, len(names))
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


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _save_png(fig: Figure, path: str | os.PathLike) -> Path:
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
    cm = _confusion(y_true, y_pred, num_classes)
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
    cm = _confusion(y_true, y_pred, c).astype(np.float64)
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
    return _save_png(fig, path)


def _class_colours(num_classes: int) -> np.ndarray:
    """(C, 4) RGBA colours: tab20 for up to 20 classes, else hsv hues spread so neighbours differ."""
    from matplotlib import colormaps

    if num_classes <= 20:
        # the 10 strong tab20 colours first, then their light partners
        order = np.r_[np.arange(0, 20, 2), np.arange(1, 20, 2)]
        return colormaps["tab20"](order[:num_classes])
    # step through the hue circle by a golden-ratio stride so consecutive classes get distant hues
    hues = (np.arange(num_classes) * 0.6180339887) % 1.0
    return colormaps["hsv"](hues)


def plot_embedding_map(
    xy,
    labels,
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "Embedding map (t-SNE)",
) -> Path:
    """Save a 2-D scatter of an embedding map, one colour per class, as a PNG.

    Args:
        xy: (M, 2) float coordinates (e.g. from `embedding_map`; units arbitrary).
        labels: (M,) int class indices in [0, C); -1 (unlabeled) is drawn in grey.
        class_names: C names.
        path: the PNG to write.
        title: figure title.

    Returns:
        `path`. A legend is drawn only when at most 20 classes are present.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if len(labels) != len(xy):
        raise ValueError(f"{len(xy)} points but {len(labels)} labels")
    names = [str(n) for n in class_names]
    if labels.size and labels.max() >= len(names):
        raise ValueError(f"labels go up to {labels.max()} but there are {len(names)} class names")
    colours = _class_colours(len(names))
    present = [int(k) for k in np.unique(labels) if k >= 0]

    fig = Figure(figsize=(9.0, 8.0))
    ax = fig.add_subplot()
    size = float(np.clip(20000.0 / max(len(xy), 1), 4.0, 60.0))
    if np.any(labels < 0):
        m = labels < 0
        ax.scatter(xy[m, 0], xy[m, 1], s=size, c="lightgrey", linewidths=0, label="(unlabeled)")
    for k in present:
        m = labels == k
        ax.scatter(xy[m, 0], xy[m, 1], s=size, color=colours[k], linewidths=0, alpha=0.85, label=names[k])
    if 0 < len(present) <= 20:
        legend = ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, markerscale=2, frameon=False)
        for t in legend.get_texts():
            t.set_parse_math(False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title} ({len(xy)} points, {len(present)} classes)", parse_math=False)
    return _save_png(fig, path)


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
    return _save_png(fig, path)


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
    return _save_png(fig, path)


# ---------------------------------------------------------------------------------------------
# Embedding map
# ---------------------------------------------------------------------------------------------


def embedding_map(
    features,
    seed: int = 0,
    max_points: int = 3000,
    method: str = "tsne",
) -> tuple[np.ndarray, np.ndarray]:
    """2-D map of feature vectors for plotting.

    Rows are L2-normalised (so distances follow cosine similarity, as in kNN evaluation), reduced
    to 50 dimensions with PCA when D > 50, then mapped to 2-D with t-SNE (perplexity
    min(30, (M - 1) / 3), PCA initialisation) or, with method="pca", with PCA alone.

    Args:
        features: (N, D) float array-like (numpy array or CPU tensor).
        seed: seeds the subsample, PCA and t-SNE.
        max_points: when N > max_points, a random subset of max_points rows (chosen with `seed`,
            same seed -> same rows) is mapped.
        method: "tsne" or "pca".

    Returns:
        xy (M, 2) float64 coordinates (arbitrary units) and indices (M,) int64, the sorted rows of
        `features` they belong to (M = min(N, max_points)).
    """
    if method not in ("tsne", "pca"):
        raise ValueError(f"method must be 'tsne' or 'pca', not {method!r}")
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    n = x.shape[0]
    if n > max_points:
        indices = np.sort(np.random.default_rng(seed).choice(n, size=int(max_points), replace=False))
    else:
        indices = np.arange(n)
    indices = indices.astype(np.int64)
    x = x[indices]
    m = x.shape[0]
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or infinite values")
    if m <= 1:
        return np.zeros((m, 2), dtype=np.float64), indices
    if x.shape[1] < 2:  # PCA/t-SNE initialisation need two input dimensions
        x = np.pad(x, ((0, 0), (0, 2 - x.shape[1])))
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    from sklearn.decomposition import PCA

    if method == "pca":
        xy = PCA(n_components=2, random_state=seed).fit_transform(x)
        return xy.astype(np.float64), indices
    if x.shape[1] > 50:
        x = PCA(n_components=min(50, m), random_state=seed).fit_transform(x)

    from sklearn.manifold import TSNE

    tsne = TSNE(
        n_components=2,
        perplexity=min(30.0, (m - 1) / 3.0),
        init="pca",
        learning_rate="auto",
        random_state=seed,
    )
    return tsne.fit_transform(x).astype(np.float64), indices


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #1f2328; line-height: 1.4; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3rem; }
h2 { margin-top: 2rem; border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
tbody tr:nth-child(even) { background: #fafbfc; }
table.headline td.value { font-size: 1.2rem; font-weight: 600; text-align: right; }
figure { margin: 1rem 0 2rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: .9rem; margin-top: .3rem; }
.scroll { max-height: 40rem; overflow: auto; }
footer { margin-top: 3rem; color: #57606a; font-size: .8rem; }
.row { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }
.row figure { margin: 0; text-align: center; font-size: 12px; max-width: 112px; }
.row figcaption { overflow-wrap: anywhere; }
.row .vs { align-self: center; font-weight: 600; padding: 0 .5rem; }
.missing { background: #eee; color: #777; display: flex; align-items: center; justify-content: center; }
small.key { color: #57606a; font-weight: normal; font-size: .75rem; }
td.note { color: #57606a; font-size: .85rem; }
"""


def _is_fraction(v) -> bool:
    """True for a non-integer-typed real number in [0, 1] (shown as a percentage)."""
    if isinstance(v, (bool, np.bool_)) or isinstance(v, (numbers.Integral, np.integer)):
        return False
    return isinstance(v, (numbers.Real, np.floating)) and 0.0 <= float(v) <= 1.0


def _format_value(v) -> str:
    """A metric value as text: fractions (floats in [0, 1]) as percentages with 1 decimal."""
    if v is None:
        return "–"
    if _is_fraction(v):
        return f"{100.0 * float(v):.1f}%"
    if isinstance(v, (float, np.floating)):
        return "n/a" if math.isnan(float(v)) else format(float(v), ".6g")
    return str(v)


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _kv_table(items: Mapping, css_class: str, header: tuple[str, str], fmt) -> str:
    rows = "\n".join(
        f'<tr><th scope="row">{_esc(k)}</th><td class="value">{_esc(fmt(v))}</td></tr>' for k, v in items.items()
    )
    return (
        f'<table class="{css_class}">\n<thead><tr><th>{_esc(header[0])}</th><th>{_esc(header[1])}</th></tr></thead>\n'
        f"<tbody>\n{rows}\n</tbody>\n</table>"
    )


def _section(anchor: str | None, heading: str, body: str) -> str:
    """A report section: an escaped heading over `body` (HTML the caller built and escaped)."""
    where = f' id="{anchor}"' if anchor else ' class="photos"'
    return f"<section{where}>\n<h2>{_esc(heading)}</h2>\n{body}\n</section>"


def _figure(report_dir: Path, caption: str, file) -> str:
    """A full-width plot (a file inside the report folder) that links to itself."""
    href = _esc(_image_href(report_dir, file))
    return f'<figure><a href="{href}"><img src="{href}" alt="{_esc(caption)}"></a><figcaption>{_esc(caption)}</figcaption></figure>'


def _metrics_table(metrics: Mapping, notes: Mapping[str, str]) -> str:
    """The headline: readable metric name (its key in small print), value, note."""
    rows = "\n".join(
        f'<tr><th scope="row">{_esc(METRIC_NAMES.get(k, k))} <small class="key">{_esc(k)}</small></th>'
        f'<td class="value">{_esc(_format_value(v))}</td><td class="note">{_esc(notes.get(k, ""))}</td></tr>'
        for k, v in metrics.items()
    )
    return ('<table class="headline">\n<thead><tr><th>metric</th><th>value</th><th>for comparison</th></tr></thead>\n'
            f"<tbody>\n{rows}\n</tbody>\n</table>")


def _frame_html(df: pd.DataFrame) -> str:
    """`df` as an escaped HTML table; float columns whose values all lie in [0, 1] as percentages."""
    formatters = {}
    for col in df.columns:
        s = df[col]
        if pd.api.types.is_float_dtype(s) and s.notna().any() and s.dropna().between(0.0, 1.0).all():
            formatters[col] = lambda x: f"{100.0 * x:.1f}%"
    return df.to_html(
        index=False, escape=True, border=0, classes="data", na_rep="–",
        float_format=lambda x: format(x, ".4g"), formatters=formatters or None,
    )


def _image_href(report_dir: Path, file: str | os.PathLike) -> str:
    """The URL-quoted path of `file` relative to `report_dir` (which must contain it)."""
    p = Path(file)
    full = (p if p.is_absolute() else report_dir / p).resolve()
    try:
        rel = full.relative_to(report_dir.resolve())
    except ValueError:
        raise ValueError(f"report image {file} is not inside the report folder {report_dir}") from None
    return quote(rel.as_posix())


def write_html_report(
    report_dir: str | os.PathLike,
    *,
    title: str,
    metrics: Mapping | None = None,
    context: Mapping | None = None,
    tables: Mapping[str, pd.DataFrame] | None = None,
    images: Mapping[str, str | os.PathLike] | None = None,
    links: Mapping[str, str] | None = None,
    comparison: pd.DataFrame | None = None,
    notes: Mapping[str, str] | None = None,
    photos: Mapping[str, str] | None = None,
) -> Path:
    """Write `report_dir/index.html`, a self-contained page (inline CSS, no scripts, no remote resources).

    Args:
        report_dir: the report folder (created if missing); images must live inside it.
        title: page title and header.
        metrics: headline metric name -> value, shown in the given order. Floats in [0, 1] are
            fractions and shown as percentages with 1 decimal (0.8123 -> "81.2%"); other
            values as they are (floats to 6 significant digits).
        context: name -> value describing the run (model, artifact, manifest, image size, kNN k
            and temperature, timings...), shown as plain text in the given order.
        tables: section title -> DataFrame, rendered without the index; float columns whose
            values all lie in [0, 1] are shown as percentages.
        images: caption -> image file (relative to `report_dir`, or an absolute path inside it);
            each is shown with its caption and links to the full-size file.
        links: caption -> relative address of a related page (an audit), listed under the headline.
        comparison: the "Compared with" table (one row per model, metric keys as columns), shown
            right after the headline with the metrics' readable names.
        notes: metric key -> a note shown beside its headline value (chance level, photo counts).
        photos: section title -> HTML of inline thumbnails (eval/report_photos.py builds it, escaped),
            shown before the figures.

    Every caller string (titles, keys, values, class names in tables) is HTML-escaped. The file
    is written atomically.

    Returns:
        The path of index.html.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{_esc(title)}</title>",
             f"<style>{_CSS}</style>", "</head>", "<body>", f"<header><h1>{_esc(title)}</h1></header>", "<main>"]
    if metrics:
        parts.append(_section("headline", "Headline", _metrics_table(metrics, notes or {})))
    if comparison is not None and len(comparison):
        shown = comparison.rename(columns={k: METRIC_NAMES.get(k, k) for k in comparison.columns})
        parts.append(_section("compared", "Compared with", "<p>The same photos, read the same way (image size, "
                              f'flip), for each model.</p><div class="scroll">{_frame_html(shown)}</div>'))
    if links:
        parts.append(_section("links", "See also", "<ul>" + "".join(
            f'<li><a href="{_esc(quote(href))}">{_esc(caption)}</a></li>' for caption, href in links.items()) + "</ul>"))
    if context:
        parts.append(_section("context", "Context", _kv_table(context, "context", ("setting", "value"),
                                                              lambda v: "–" if v is None else v)))
    parts += [_section(None, heading, block) for heading, block in (photos or {}).items()]
    if images:
        parts.append(_section("figures", "Figures", "".join(_figure(report_dir, c, f) for c, f in images.items())))
    if tables:
        parts.append(_section("tables", "Tables", "".join(
            f'<h3>{_esc(name)} <small>({len(df)} rows)</small></h3><div class="scroll">{_frame_html(df)}</div>'
            for name, df in tables.items())))
    parts += ["</main>", "<footer>Generated by finegrain.</footer>", "</body>", "</html>", ""]
    path = report_dir / "index.html"
    atomic_write_text(path, "\n".join(parts))
    return path
