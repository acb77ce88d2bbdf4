"""The photos of an evaluation report: confused species side by side, confident mistakes, examples.

People would rather look than read: each section is a list of rows of small inline thumbnails
(report/thumbnails.py, about 96 px JPEGs inside the page), so a 200-species report stays a few MB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from markupsafe import Markup

from finegrain.report.pages import environment
from finegrain.report.thumbnails import thumbnail

TYPICAL = 3  # train photos shown per species


@dataclass
class Photos:
    """What the sections are drawn from: query photos with their truth and prediction, and train photos.

    query_paths: (Q,) files; y_true, y_pred: (Q,) class ids; confidence: (Q,) the predicting
    classifier's probability of its prediction, in [0, 1]; train_paths, train_labels: (N,).
    """

    classes: Sequence[str]
    query_paths: Sequence[str]
    y_true: np.ndarray
    y_pred: np.ndarray
    confidence: np.ndarray
    train_paths: Sequence[str]
    train_labels: np.ndarray

    def typical(self, c: int, n: int = TYPICAL) -> list[str]:
        """Up to n train photos of class c (the first in manifest order: stable across runs)."""
        return [self.train_paths[i] for i in np.nonzero(self.train_labels == c)[0][:n]]


def confused_species(photos: Photos, pairs: pd.DataFrame, top: int = 6) -> pd.DataFrame:
    """One row per most-confused pair (of `report.tables.confused_pairs`): the two species, the count, and
    `left` / `right`, lists of train photos of each."""
    index = {name: i for i, name in enumerate(photos.classes)}
    rows = [{"true": r.true, "predicted": r.predicted, "count": int(r.count),
             "left": photos.typical(index[r.true]), "right": photos.typical(index[r.predicted])}
            for r in pairs.head(top).itertuples(index=False)]
    return pd.DataFrame(rows, columns=["true", "predicted", "count", "left", "right"])


def confident_mistakes(photos: Photos, top: int = 12) -> pd.DataFrame:
    """The `top` wrong predictions the classifier was surest of: photo, true, predicted, confidence."""
    wrong = np.nonzero(photos.y_pred != photos.y_true)[0]
    order = wrong[np.argsort(-photos.confidence[wrong], kind="stable")][:top]
    # dtype object keeps each photo as given (a shard record's ShardPhoto; pandas would make it plain text)
    return pd.DataFrame({"photo": pd.Series([photos.query_paths[i] for i in order], dtype=object),
                         "true": [photos.classes[photos.y_true[i]] for i in order],
                         "predicted": [photos.classes[photos.y_pred[i]] for i in order],
                         "confidence": photos.confidence[order].astype(float)})


def correct_examples(photos: Photos, per_class: int) -> pd.DataFrame:
    """Up to `per_class` correctly predicted query photos of each class, most confident first."""
    picked, species = [], []
    for c, name in enumerate(photos.classes):
        right = np.nonzero((photos.y_true == c) & (photos.y_pred == c))[0]
        chosen = right[np.argsort(-photos.confidence[right], kind="stable")][:per_class]
        picked += list(chosen)
        species += [name] * len(chosen)
    return pd.DataFrame({"photo": pd.Series([photos.query_paths[i] for i in picked], dtype=object),
                         "species": species, "confidence": photos.confidence[picked].astype(float)})


def sections_html(photos: Photos, pairs: pd.DataFrame, examples_per_class: int = 0) -> dict[str, Markup]:
    """Section title -> HTML of the photo sections (empty sections left out), from templates/photos.html."""
    macros = environment().get_template("photos.html").module
    out = {}
    confused = confused_species(photos, pairs)
    if len(confused):
        shown = [{"count": r.count, "true": r.true, "predicted": r.predicted,
                  "left": [thumbnail(p, r.true) for p in r.left], "right": [thumbnail(p, r.predicted) for p in r.right]}
                 for r in confused.itertuples(index=False)]
        out["Most confused species (train photos of each, side by side)"] = macros.confused_pairs(shown)
    mistakes = confident_mistakes(photos)
    if len(mistakes):
        out["Confident mistakes (the wrong predictions the classifier was surest of)"] = macros.row(
            [thumbnail(r.photo, f"true: {r.true}; predicted: {r.predicted} ({r.confidence:.0%})")
             for r in mistakes.itertuples(index=False)])
    examples = correct_examples(photos, examples_per_class) if examples_per_class else pd.DataFrame()
    if len(examples):
        out["Correct predictions, by species"] = macros.row(
            [thumbnail(r.photo, f"{r.species} ({r.confidence:.0%})") for r in examples.itertuples(index=False)])
    return {title: Markup(block) for title, block in out.items()}
