"""JPEG thumbnails of the review's photos, made on first request and cached on disk in REVIEW_DIR/thumbs."""

from __future__ import annotations

import threading
from pathlib import Path

from finegrain.fsutil import atomic_path
from finegrain.report.thumbnails import thumbnail_jpeg

SIZES = {"small": 200, "large": 720}  # name -> longer side in px
JPEG_QUALITY = 85
_locks: dict[str, threading.Lock] = {}
_guard = threading.Lock()


def thumbnail(photos, i: int, size: str, folder: Path) -> Path | None:
    """The cached JPEG of photo i (a Photos entry) at `size` (a SIZES key); None when the photo cannot be read."""
    out = folder / f"{photos.key(i)}-{SIZES[size]}.jpg"
    if out.is_file():
        return out
    with _guard:
        lock = _locks.setdefault(str(out), threading.Lock())
    with lock:  # two requests for one thumbnail make it once
        if out.is_file():
            return out
        data = thumbnail_jpeg(photos.sources[i], SIZES[size], quality=JPEG_QUALITY)
        if data is None:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            Path(tmp).write_bytes(data)
    return out
