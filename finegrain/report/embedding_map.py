"""A 2-D map of embeddings (t-SNE or PCA of L2-normalised features) and its scatter plot as a PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from finegrain.report.plots import save_png

__all__ = ["embedding_map", "plot_embedding_map"]


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
    return save_png(fig, path)
