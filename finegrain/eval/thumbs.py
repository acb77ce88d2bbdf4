"""Small inline thumbnails and a contact sheet: a self-contained HTML page of photos with captions.

For pages that show photos to a person (suggest's photos to label next, audit's suspect labels):
each thumbnail is a base64 JPEG inside the page, so the file works offline, alone, anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from finegrain.errors import BadImageError
from finegrain.fsutil import atomic_write_text

THUMB_SIDE = 96  # px, the longer side
JPEG_QUALITY = 80


def thumbnail_data_uri(source: str | os.PathLike, side: int = THUMB_SIDE) -> str | None:
    """A JPEG of the image file, its longer side `side` px, as a data: URI; None when it cannot be read."""
    from PIL import Image

    from finegrain.data.images import decode_image

    try:
        read = getattr(source, "read", None)  # a shard record (data/shards.ShardPhoto) rather than a file
        pixels = (read(min_side=side) if read else decode_image(source, min_side=side)).pixels
    except BadImageError:
        return None
    img = Image.fromarray(pixels)
    img.thumbnail((side, side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class Tile:
    """One photo of a contact sheet: the image file, a bold title and caption lines (plain text)."""

    image: str | os.PathLike
    title: str
    lines: Sequence[str] = field(default_factory=tuple)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem; color: #1f2328; }
h1 { font-size: 1.4rem; } table.notes th { text-align: left; padding-right: 1rem; color: #57606a; }
.sheet { display: grid; grid-template-columns: repeat(auto-fill, minmax(13rem, 1fr)); gap: .8rem; margin-top: 1rem; }
.tile { border: 1px solid #d0d7de; border-radius: 6px; padding: .5rem; font-size: .8rem; display: flex; gap: .5rem; }
.tile img, .tile .missing { width: %(side)dpx; height: %(side)dpx; object-fit: contain; flex: none;
  background: #f6f8fa; }
.tile .missing { display: flex; align-items: center; justify-content: center; color: #cf222e; }
.tile b { display: block; font-size: .9rem; } .tile p { margin: .15rem 0; overflow-wrap: anywhere; }
"""


def write_contact_sheet(path: str | os.PathLike, *, title: str, tiles: Sequence[Tile],
                        notes: Mapping[str, object] | None = None, side: int = THUMB_SIDE) -> Path:
    """Write `path`: a page with `notes` (name -> value) and a grid of thumbnails (`side` px) in tile order.

    The page has no scripts and no links to other files; every caller string is HTML-escaped; an
    unreadable image shows as "unreadable". Written atomically. Returns `path`.
    """
    esc = lambda v: html.escape(str(v), quote=True)  # noqa: E731
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{esc(title)}</title>", f"<style>{_CSS % {'side': side}}</style>", "</head>", "<body>",
             f"<h1>{esc(title)}</h1>"]
    if notes:
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in notes.items())
        parts.append(f'<table class="notes">{rows}</table>')
    parts.append('<div class="sheet">')
    for tile in tiles:
        uri = thumbnail_data_uri(tile.image, side)
        picture = (f'<img src="{uri}" alt="{esc(tile.title)}">' if uri else '<span class="missing">unreadable</span>')
        caption = "".join(f"<p>{esc(line)}</p>" for line in tile.lines)
        parts.append(f'<div class="tile">{picture}<div><b>{esc(tile.title)}</b>{caption}</div></div>')
    parts += ["</div>", "</body>", "</html>", ""]
    path = Path(path)
    atomic_write_text(path, "\n".join(parts))
    return path


def figure(source: str | os.PathLike, caption: str, side: int = THUMB_SIDE) -> str:
    """An HTML <figure>: the inline thumbnail (or a grey "unreadable" box) over an escaped caption."""
    uri = thumbnail_data_uri(source, side)
    img = (f'<img src="{uri}" alt="{html.escape(Path(source).name)}" title="{html.escape(str(source))}">' if uri
           else f'<div class="missing" style="width:{side}px;height:{side}px">unreadable</div>')
    return f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>"
