"""Evaluation report: tables on cases worked by hand, PNG plots, t-SNE maps and the HTML page."""

from __future__ import annotations

import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finegrain.report.embedding_map import embedding_map, plot_embedding_map
from finegrain.report.evaluation_page import write_html_report
from finegrain.report.plots import _worst_classes, plot_confusion_matrix, plot_per_class_accuracy
from finegrain.report.tables import confused_pairs, per_class_accuracy

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Hand case: crow 4 images (2 right, 1 -> wren, 1 -> jay), wren 3 (1 right, 2 -> crow),
# jay 2 (1 right, 1 -> owl), owl none.
NAMES = ["crow", "wren", "jay", "owl"]
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
Y_PRED = np.array([0, 0, 1, 2, 1, 0, 0, 2, 3])


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def test_per_class_accuracy_hand_case():
    df = per_class_accuracy(Y_TRUE, Y_PRED, NAMES)
    assert list(df.columns) == ["class", "images", "correct", "accuracy", "most_confused_with"]
    # wren 1/3 first; crow and jay tie at 1/2 and go by name; owl (no images) last
    assert df["class"].tolist() == ["wren", "crow", "jay", "owl"]
    assert df["images"].tolist() == [3, 4, 2, 0]
    assert df["correct"].tolist() == [1, 2, 1, 0]
    assert df["accuracy"].iloc[:3].tolist() == pytest.approx([1 / 3, 0.5, 0.5])
    assert math.isnan(df["accuracy"].iloc[3])
    # crow's errors tie between wren and jay -> the lower class index (wren)
    assert df["most_confused_with"].tolist() == ["crow", "wren", "owl", ""]


def test_per_class_accuracy_perfect_and_empty():
    df = per_class_accuracy(np.array([1, 0, 1]), np.array([1, 0, 1]), ["a", "b"])
    assert df["class"].tolist() == ["a", "b"]
    assert df["accuracy"].tolist() == [1.0, 1.0]
    assert df["most_confused_with"].tolist() == ["", ""]
    empty = per_class_accuracy(np.array([], dtype=int), np.array([], dtype=int), ["a", "b"])
    assert empty["images"].tolist() == [0, 0] and empty["accuracy"].isna().all()


def test_per_class_accuracy_matches_plain_loops():
    rng = np.random.default_rng(0)
    c = 12
    names = [f"species {i:02d}" for i in range(c)]
    y_true = rng.integers(0, c - 1, 500)  # the last class gets no images
    y_pred = np.where(rng.random(500) < 0.6, y_true, rng.integers(0, c, 500))
    df = per_class_accuracy(y_true, y_pred, names).set_index("class")
    for k in range(c):
        rows = [i for i in range(500) if y_true[i] == k]
        row = df.loc[names[k]]
        assert row["images"] == len(rows)
        assert row["correct"] == sum(y_pred[i] == k for i in rows)
        if rows:
            assert row["accuracy"] == pytest.approx(row["correct"] / len(rows))
            wrong = [int(y_pred[i]) for i in rows if y_pred[i] != k]
            counts = {j: wrong.count(j) for j in wrong}
            best = min(counts, key=lambda j: (-counts[j], j)) if counts else None
            assert row["most_confused_with"] == ("" if best is None else names[best])
        else:
            assert math.isnan(row["accuracy"])
    acc = per_class_accuracy(y_true, y_pred, names)["accuracy"].to_numpy()
    assert np.all(np.diff(acc[:-1]) >= 0) and math.isnan(acc[-1])


def test_labels_are_checked():
    with pytest.raises(ValueError, match="outside"):
        per_class_accuracy(np.array([0, 2]), np.array([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="outside"):
        confused_pairs(np.array([0, -1]), np.array([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="labels"):
        per_class_accuracy(np.array([0, 1]), np.array([0]), ["a", "b"])


def test_confused_pairs_hand_case():
    df = confused_pairs(Y_TRUE, Y_PRED, NAMES)
    assert list(df.columns) == ["true", "predicted", "count", "fraction_of_true"]
    # wren -> crow twice; then count-1 pairs by true, then predicted name
    assert list(zip(df["true"], df["predicted"])) == [
        ("wren", "crow"), ("crow", "jay"), ("crow", "wren"), ("jay", "owl"),
    ]
    assert df["count"].tolist() == [2, 1, 1, 1]
    assert df["fraction_of_true"].tolist() == pytest.approx([2 / 3, 1 / 4, 1 / 4, 1 / 2])
    top2 = confused_pairs(Y_TRUE, Y_PRED, NAMES, top=2)
    assert top2.equals(df.head(2))
    assert confused_pairs(Y_TRUE, Y_TRUE, NAMES).empty


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _read_png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200, img.shape
    assert img[..., :3].std() > 0.01  # not a blank canvas
    return img


def _predictions(c: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, c, n)
    y_pred = np.where(rng.random(n) < 0.7, y_true, rng.integers(0, c, n))
    return y_true, y_pred, [f"Species {i} <&> $x$" for i in range(c)]


@pytest.mark.parametrize("classes", [3, 120])
def test_plots_write_png(tmp_path, classes):
    y_true, y_pred, names = _predictions(classes, 30 * classes, seed=classes)
    xy = np.random.default_rng(1).normal(size=(len(y_true), 2))
    paths = [
        plot_confusion_matrix(y_true, y_pred, names, tmp_path / "confusion_matrix.png"),
        plot_confusion_matrix(y_true, y_pred, names, tmp_path / "counts.png", normalize=False),
        plot_per_class_accuracy(per_class_accuracy(y_true, y_pred, names), tmp_path / "per_class.png"),
        plot_embedding_map(xy, y_true, names, tmp_path / "embedding.png", title="t-SNE <test>"),
    ]
    for p in paths:
        _read_png(p)
    # atomic writes leave nothing else behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_plot_size_grows_with_classes(tmp_path):
    sizes = {}
    for c in (3, 120):
        y_true, y_pred, names = _predictions(c, 20 * c, seed=c)
        df = per_class_accuracy(y_true, y_pred, names)
        sizes[c] = (
            _read_png(plot_per_class_accuracy(df, tmp_path / f"pc{c}.png")).shape[0],
            _read_png(plot_confusion_matrix(y_true, y_pred, names, tmp_path / f"cm{c}.png")).shape[0],
        )
    assert sizes[120][0] > 3 * sizes[3][0]  # bar chart height scales with class count
    assert sizes[120][1] > 1.5 * sizes[3][1]  # so does the confusion matrix (60 classes shown)


def test_worst_classes_picks_lowest_accuracy():
    # class k has 10 images of which (k % 11) are right, so accuracy = (k % 11) / 10 (capped at 1)
    c = 120
    y_true, y_pred = [], []
    for k in range(c):
        right = min(k % 11, 10)
        y_true += [k] * 10
        y_pred += [k] * right + [(k + 1) % c] * (10 - right)
    y_true, y_pred = np.array(y_true), np.array(y_pred)
    shown = _worst_classes(y_true, y_pred, c, 60)
    acc = per_class_accuracy(y_true, y_pred, [str(k) for k in range(c)])
    assert len(shown) == 60 and np.all(np.diff(shown) > 0)
    accuracy = np.array([min(k % 11, 10) / 10 for k in range(c)])
    assert accuracy[shown].max() <= np.delete(accuracy, shown).min()
    assert acc["accuracy"].iloc[59] == accuracy[shown].max()
    assert np.array_equal(_worst_classes(y_true, y_pred, c, None), np.arange(c))
    assert np.array_equal(_worst_classes(y_true, y_pred, c, 200), np.arange(c))


# ---------------------------------------------------------------------------------------------
# Embedding map
# ---------------------------------------------------------------------------------------------


def _knn_accuracy_2d(xy: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-nearest-neighbour majority-vote accuracy in the 2-D map."""
    d = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nearest = np.argsort(d, axis=1)[:, :k]
    votes = np.array([np.bincount(labels[row], minlength=labels.max() + 1).argmax() for row in nearest])
    return float((votes == labels).mean())


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_embedding_map_tiny(n):
    feats = np.random.default_rng(n).normal(size=(n, 16)).astype(np.float32)
    xy, idx = embedding_map(feats)
    assert xy.shape == (n, 2) and np.all(np.isfinite(xy))
    assert np.array_equal(idx, np.arange(n))


def test_embedding_map_keeps_clusters_apart():
    rng = np.random.default_rng(0)
    d = 128  # > 50: goes through the PCA step
    centers = rng.normal(size=(3, d))
    labels = np.repeat(np.arange(3), 100)
    feats = centers[labels] + 0.5 * rng.normal(size=(300, d))
    xy, idx = embedding_map(feats, seed=0)
    assert xy.shape == (300, 2) and np.all(np.isfinite(xy))
    assert np.array_equal(idx, np.arange(300))
    assert _knn_accuracy_2d(xy, labels[idx]) > 0.9
    # the check can fail: shuffled labels are near chance (1/3)
    assert _knn_accuracy_2d(xy, rng.permutation(labels)) < 0.6
    # rows are L2-normalised, so wildly different row norms change nothing: exactly with PCA ...
    scaled = feats * np.exp(rng.uniform(-4.0, 4.0, size=(300, 1)))
    pca, _ = embedding_map(feats, method="pca")
    assert np.allclose(embedding_map(scaled, method="pca")[0], pca, atol=1e-4 * np.abs(pca).max())
    # ... and t-SNE (chaotic, so compared by outcome) still keeps the clusters apart
    assert _knn_accuracy_2d(embedding_map(scaled, seed=0)[0], labels) > 0.9


def test_embedding_map_subsamples_deterministically():
    feats = np.random.default_rng(3).normal(size=(400, 24))
    xy, idx = embedding_map(feats, seed=5, max_points=100)
    assert xy.shape == (100, 2) and idx.shape == (100,)
    assert len(np.unique(idx)) == 100 and np.all(np.diff(idx) > 0) and idx.max() < 400
    xy2, idx2 = embedding_map(feats, seed=5, max_points=100)
    assert np.array_equal(idx, idx2) and np.allclose(xy, xy2)
    _, idx3 = embedding_map(feats, seed=6, max_points=100)
    assert not np.array_equal(idx, idx3)
    # the coordinates belong to exactly those rows
    xy_rows, _ = embedding_map(feats[idx], seed=5, max_points=1000)
    assert np.allclose(xy_rows, xy)


def test_embedding_map_pca_and_bad_input():
    feats = np.random.default_rng(4).normal(size=(50, 80))
    xy, idx = embedding_map(feats, method="pca")
    assert xy.shape == (50, 2) and np.all(np.isfinite(xy))
    with pytest.raises(ValueError, match="method"):
        embedding_map(feats, method="umap")
    with pytest.raises(ValueError, match="NaN"):
        embedding_map(np.full((4, 3), np.nan))


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _StrictParser(HTMLParser):
    """Collects tags, attributes and text; records unbalanced or mismatched tags as errors."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _StrictParser:
    parser = _StrictParser()
    parser.feed(page)
    parser.close()
    assert not parser.errors, parser.errors
    assert not parser.stack, f"unclosed: {parser.stack}"
    return parser


EVIL = "<script>alert(1)</script> & co"


def test_html_report(tmp_path):
    names = ["crow", EVIL, "jay"]
    y_true = np.array([0, 0, 1, 1, 1, 2, 2, 2])
    y_pred = np.array([0, 1, 1, 0, 1, 2, 2, 1])
    per_class = per_class_accuracy(y_true, y_pred, names)
    report = tmp_path / "report"
    plot_confusion_matrix(y_true, y_pred, names, report / "confusion_matrix.png")
    plot_per_class_accuracy(per_class, report / "per class.png")
    path = write_html_report(
        report,
        title="Evaluation & <test>",
        metrics={"knn_top1": 0.8123, "probe top-1 <%>": 0.75, "test images": 1234, "classes": 1, "seconds": 12.5},
        context={"model": "efficientnet_lite0", "image size": 224, "bbox crop": True, "artifact": "runs/a&b"},
        tables={"Per-class accuracy": per_class, "Most confused pairs": confused_pairs(y_true, y_pred, names)},
        images={"Confusion matrix <row-normalised>": "confusion_matrix.png",
                "Per-class accuracy": report / "per class.png"},
    )
    assert path == report / "index.html"
    page = path.read_text(encoding="utf-8")
    parsed = _parse(page)
    text = "".join(parsed.text)

    # every caller string is escaped: the raw tag never appears, its escaped form does
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
    assert EVIL in text  # ... and reads back as the original name
    assert "<test>" not in page and "Evaluation &amp; &lt;test&gt;" in page
    assert "runs/a&amp;b" in page and "probe top-1 &lt;%&gt;" in page

    # headline: fractions as percentages with 1 decimal, other numbers as they are, in order
    assert "81.2%" in text and "75.0%" in text
    assert "1234" in text and "12.5" in text and "0.8123" not in text
    headline = page[page.index('id="headline"'):page.index('id="context"')]
    order = [headline.index(k) for k in ("knn_top1", "probe top-1", "test images", "classes", "seconds")]
    assert order == sorted(order)
    assert '<td class="value">1</td>' in headline  # an int is not a fraction
    # per-class accuracy table: wren-like EVIL class has 2/3 right
    assert "66.7%" in text and "50.0%" in text

    # images referenced by relative name, and they exist
    srcs = [a["src"] for tag, a in parsed.tags if tag == "img"]
    assert srcs == ["confusion_matrix.png", "per%20class.png"]
    for src in srcs:
        assert (report / src.replace("%20", " ")).is_file()
    assert "Confusion matrix &lt;row-normalised&gt;" in page

    # self-contained: no remote resources, no scripts, nothing but relative links
    assert "http://" not in page and "https://" not in page
    assert not any(tag in ("script", "link", "iframe") for tag, _ in parsed.tags)
    assert "@import" not in page and "url(" not in page
    for tag, attrs in parsed.tags:
        for key in ("src", "href"):
            if key in attrs:
                assert "//" not in attrs[key] and not attrs[key].startswith("/")
    assert sorted(p.name for p in report.iterdir()) == ["confusion_matrix.png", "index.html", "per class.png"]


def test_html_report_minimal_and_rejects_outside_images(tmp_path):
    path = write_html_report(tmp_path / "r", title="t", metrics={"acc": 1.0})
    page = path.read_text(encoding="utf-8")
    _parse(page)
    assert "100.0%" in page and "<figure" not in page and "<h3" not in page
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(PNG_SIGNATURE)
    with pytest.raises(ValueError, match="inside"):
        write_html_report(tmp_path / "r", title="t", images={"x": outside})
    with pytest.raises(ValueError, match="inside"):
        write_html_report(tmp_path / "r", title="t", images={"x": "../elsewhere.png"})


def test_html_tables_format_fractions_and_escape_headers(tmp_path):
    df = pd.DataFrame({"name <b>": ["a & b"], "fraction": [0.25], "ratio": [2.5], "n": [7]})
    page = write_html_report(tmp_path, title="t", tables={"T & U": df}).read_text(encoding="utf-8")
    _parse(page)
    assert "name &lt;b&gt;" in page and "a &amp; b" in page and "T &amp; U" in page
    assert "25.0%" in page and "2.5" in page and "250.0%" not in page and ">7<" in page
