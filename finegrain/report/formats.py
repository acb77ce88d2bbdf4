"""How values read on a page: metric names, fractions as percentages, tables as escaped HTML, image links."""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
from markupsafe import Markup

METRIC_NAMES = {  # metric key -> what a person reads
    "knn_top1": "kNN top-1", "knn_top5": "kNN top-5", "linear_top1": "linear probe top-1",
    "linear_top5": "linear probe top-5", "recall_at_1": "Recall@1 (retrieval)", "recall_at_2": "Recall@2 (retrieval)",
    "recall_at_4": "Recall@4 (retrieval)", "recall_at_8": "Recall@8 (retrieval)", "map_at_r": "MAP@R (retrieval)",
    "classifier_top1": "classifier top-1 (what predict names)", "classifier_top5": "classifier top-5 (what predict ranks)",
    "knn_pseudo_top1": "kNN top-1, gallery + pseudo-labelled photos",
    "knn_pseudo_top5": "kNN top-5, gallery + pseudo-labelled photos",
    "open_set_auroc": "unknown species: AUROC", "open_set_fpr95": "unknown species: accepted at 95% known (FPR95)",
}


def is_fraction(v) -> bool:
    """True for a non-integer-typed real number in [0, 1] (shown as a percentage)."""
    if isinstance(v, (bool, np.bool_)) or isinstance(v, (numbers.Integral, np.integer)):
        return False
    return isinstance(v, (numbers.Real, np.floating)) and 0.0 <= float(v) <= 1.0


def format_value(v) -> str:
    """A metric value as text: fractions (floats in [0, 1]) as percentages with 1 decimal, None as "–"."""
    if v is None:
        return "–"
    if is_fraction(v):
        return f"{100.0 * float(v):.1f}%"
    if isinstance(v, (float, np.floating)):
        return "n/a" if math.isnan(float(v)) else format(float(v), ".6g")
    return str(v)


def frame_html(df: pd.DataFrame) -> Markup:
    """`df` as an escaped HTML table; float columns whose values all lie in [0, 1] as percentages."""
    formatters = {}
    for col in df.columns:
        s = df[col]
        if pd.api.types.is_float_dtype(s) and s.notna().any() and s.dropna().between(0.0, 1.0).all():
            formatters[col] = lambda x: f"{100.0 * x:.1f}%"
    return Markup(df.to_html(
        index=False, escape=True, border=0, classes="data", na_rep="–",
        float_format=lambda x: format(x, ".4g"), formatters=formatters or None,
    ))


def image_href(report_dir: Path, file: str | os.PathLike) -> str:
    """The URL-quoted path of `file` relative to `report_dir` (which must contain it)."""
    p = Path(file)
    full = (p if p.is_absolute() else report_dir / p).resolve()
    try:
        rel = full.relative_to(report_dir.resolve())
    except ValueError:
        raise ValueError(f"report image {file} is not inside the report folder {report_dir}") from None
    return quote(rel.as_posix())
