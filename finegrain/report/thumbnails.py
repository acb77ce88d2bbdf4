"""Small inline thumbnails: a photo as a JPEG data: URI, so a page that shows it works offline, alone, anywhere.

For pages that show photos to a person (the evaluation report's photo sections, audit's suspect
labels, suggest's contact sheet); the templates draw them (templates/photos.html).
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from pathlib import Path

from finegrain.errors import BadImageError

THUMB_SIDE = 96  # px, the longer side
JPEG_QUALITY = 80


def thumbnail_jpeg(source: str | os.PathLike, side: int = THUMB_SIDE, quality: int = JPEG_QUALITY) -> bytes | None:
    """The image file (or a shard record) as JPEG bytes, its longer side `side` px; None when it cannot be read."""
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
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def thumbnail_data_uri(source: str | os.PathLike, side: int = THUMB_SIDE) -> str | None:
    """A JPEG of the image file, its longer side `side` px, as a data: URI; None when it cannot be read."""
    data = thumbnail_jpeg(source, side)
    return None if data is None else "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class Thumbnail:
    """One captioned photo of a page: its data: URI (None: unreadable), file name, full source and caption."""

    uri: str | None
    name: str
    source: str
    caption: str
    side: int = THUMB_SIDE


def thumbnail(source: str | os.PathLike, caption: str, side: int = THUMB_SIDE) -> Thumbnail:
    """The photo at `source` (a file or a shard record) as a Thumbnail with `caption` (plain text)."""
    return Thumbnail(thumbnail_data_uri(source, side), Path(source).name, str(source), caption, side)
