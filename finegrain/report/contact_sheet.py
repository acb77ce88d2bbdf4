"""A contact sheet: a self-contained HTML page of photos with captions (suggest's photos to label next)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from finegrain.report.pages import write_page
from finegrain.report.thumbnails import THUMB_SIDE, thumbnail_data_uri


@dataclass
class Tile:
    """One photo of a contact sheet: the image file, a bold title and caption lines (plain text)."""

    image: str | os.PathLike
    title: str
    lines: Sequence[str] = field(default_factory=tuple)


def write_contact_sheet(path: str | os.PathLike, *, title: str, tiles: Sequence[Tile],
                        notes: Mapping[str, object] | None = None, side: int = THUMB_SIDE) -> Path:
    """Write `path`: a page with `notes` (name -> value) and a grid of thumbnails (`side` px) in tile order.

    The page has no scripts and no links to other files; every caller string is HTML-escaped; an
    unreadable image shows as "unreadable". Written atomically. Returns `path`.
    """
    shown = [{"uri": thumbnail_data_uri(t.image, side), "title": t.title, "lines": list(t.lines)} for t in tiles]
    return write_page(path, "contact_sheet.html", title=title, notes=notes or {}, tiles=shown, side=side)
