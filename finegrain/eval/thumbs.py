"""Small inline photos for offline HTML pages: a JPEG thumbnail as a data: URI."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

THUMB_SIDE = 96  # px, the longer side


def thumbnail_uri(path: str | Path, side: int = THUMB_SIDE, quality: int = 80) -> str | None:
    """`data:image/jpeg;base64,...` of the photo scaled so its longer side is `side` px; None if unreadable."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure(path: str | Path, caption: str, side: int = THUMB_SIDE) -> str:
    """An HTML <figure> with the inline thumbnail (or a grey box saying it is unreadable) and an escaped caption."""
    uri = thumbnail_uri(path, side)
    img = (f'<img src="{uri}" alt="{html.escape(Path(path).name)}" title="{html.escape(str(path))}">' if uri
           else f'<div class="missing" style="width:{side}px;height:{side}px">unreadable</div>')
    return f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>"
