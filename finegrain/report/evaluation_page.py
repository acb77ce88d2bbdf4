"""The evaluation report page, index.html: headline, comparison, context, photos, figures and tables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from markupsafe import Markup

from finegrain.report.formats import METRIC_NAMES, image_href
from finegrain.report.pages import write_page


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
        photos: section title -> HTML of inline thumbnails (report/photo_sections.py renders it, escaped),
            shown before the figures.

    Every caller string (titles, keys, values, class names in tables) is HTML-escaped. The file
    is written atomically.

    Returns:
        The path of index.html.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    figures = [(caption, image_href(report_dir, file)) for caption, file in (images or {}).items()]
    if comparison is not None and len(comparison):
        comparison = comparison.rename(columns={k: METRIC_NAMES.get(k, k) for k in comparison.columns})
    else:
        comparison = None
    return write_page(report_dir / "index.html", "evaluation.html", title=title, metrics=metrics or {},
                      notes=notes or {}, comparison=comparison, links=links or {}, context=context or {},
                      photos={heading: Markup(block) for heading, block in (photos or {}).items()},
                      figures=figures, tables=tables or {})
