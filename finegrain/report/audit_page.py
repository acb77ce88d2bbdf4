"""audit.html: each photo `finegrain audit` flagged, beside typical photos of its given and suggested species."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from finegrain.data.manifest import Manifest
from finegrain.report.pages import write_page
from finegrain.report.thumbnails import Thumbnail, thumbnail


def write_audit_page(path: str | os.PathLike, findings: pd.DataFrame, manifest: Manifest,
                     typical: dict[str, list[int]], *, source: str, manifest_name: str, max_shown: int) -> Path:
    """Write `path`, a self-contained page (inline JPEGs) of the first `max_shown` findings, in rank order.

    Args:
        findings: audit.csv's table plus `row`, each finding's index into the manifest's rows (0..N-1).
        manifest: the audited manifest, its rows in the order `row` and `typical` count them.
        typical: species -> row indices of its most typical photos.
        source: what the features came from (an artifact); manifest_name: the manifest as the user named it.
    """
    rows = manifest.table.reset_index(drop=True)
    shown = [{"rank": f.rank, "issue": f.issue, "path": f.path, "reason": f.reason,
              "thumbs": _finding_thumbs(f, manifest, rows, typical)}
             for f in findings.head(max_shown).itertuples(index=False)]
    return write_page(path, "audit.html", title="finegrain audit", source=source, manifest=manifest_name,
                      photo_count=len(rows), finding_count=len(findings), max_shown=max_shown, findings=shown)


def _finding_thumbs(f, manifest: Manifest, rows: pd.DataFrame, typical: dict[str, list[int]]) -> list[Thumbnail]:
    """The flagged photo, its twin (a duplicate), then typical photos of the species it is given and suggested."""
    thumbs = [thumbnail(manifest.abspath(f.path), f"#{f.rank} {f.given_label or f.split}")]
    if f.other_path:
        thumbs.append(thumbnail(manifest.abspath(f.other_path), "its twin"))
    compared = {"label": [("given", f.given_label), ("suggested", f.suggested_label)],
                "outlier": [("given", f.given_label)] if f.given_label else []}.get(f.issue, [])
    for what, label in compared:
        thumbs += [thumbnail(manifest.abspath(rows.at[i, "path"]), f"{what}: {label}")
                   for i in typical.get(label, []) if i != f.row]
    return thumbs
