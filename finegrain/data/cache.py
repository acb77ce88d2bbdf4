"""Decoded-image cache: decode and resize every image once, keep the pixels in a uint8 memory map.

On a 2-core machine JPEG decoding takes most of a data loader's time; with the cache, epochs after
the first read pixels straight from the page cache. Images keep their aspect ratio: each is resized
so its shorter side is `shorter_side` px (never enlarged) and stored back to back in one flat file,
with an index of offsets and shapes. Written by hand because no maintained library offers a
variable-size uint8 image store that works with any torch Dataset (FFCV has its own loader).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from finegrain.data.images import DecodedImage, resize_shorter
from finegrain.data.manifest import Manifest
from finegrain.errors import BadImageError
from finegrain.fsutil import atomic_path
from finegrain.progress import track

log = logging.getLogger("finegrain")


def cache_key(manifest: Manifest, shorter_side: int) -> str:
    """A key that changes when the files, their order, their contents (size, mtime) or the size change."""
    h = hashlib.sha256(f"v1|{manifest.root}|{shorter_side}".encode())
    if manifest.shards is not None:  # records do not change in place: the shard set's hash and each row's record
        h.update(manifest.content_hash.encode())
        return h.hexdigest()[:20]
    for rel in manifest.table["path"]:
        try:
            st = os.stat(manifest.root / rel)
            h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{rel}|missing\n".encode())
    return h.hexdigest()[:20]


class DecodedImageCache:
    """Read side of the cache. `get(i)` returns row i of the manifest it was built from.

    Files: `<key>.u8` (all pixels, flat) and `<key>.json` (index; written last, so its presence
    means the cache is complete).
    """

    def __init__(self, data_path: Path, index_path: Path):
        self.data_path = Path(data_path)
        self.index_path = Path(index_path)
        index = json.loads(self.index_path.read_text())
        self.shorter_side = int(index["shorter_side"])
        self._offsets = np.asarray(index["offsets"], dtype=np.int64)
        self._shapes = np.asarray(index["shapes"], dtype=np.int64)  # (N, 2): h, w; (0, 0) = bad file
        self._original = np.asarray(index["original_sizes"], dtype=np.int64)  # (N, 2): w, h
        self._errors = index["errors"]  # {str(i): reason}
        self._paths = index["paths"]
        self._data: np.memmap | None = None

    def __len__(self) -> int:
        return len(self._offsets)

    def __getstate__(self):  # DataLoader workers re-open the map instead of pickling its pages
        state = self.__dict__.copy()
        state["_data"] = None
        return state

    @property
    def nbytes(self) -> int:
        """Size of the pixel file in bytes."""
        return self.data_path.stat().st_size

    def get(self, i: int) -> DecodedImage:
        """Row i as a DecodedImage with (h, w, 3) uint8 pixels (a read-only view into the map)."""
        if str(i) in self._errors:
            raise BadImageError(self._paths[i], self._errors[str(i)])
        if self._data is None:
            self._data = np.memmap(self.data_path, dtype=np.uint8, mode="r")
        h, w = self._shapes[i]
        start = self._offsets[i]
        pixels = self._data[start:start + h * w * 3].reshape(h, w, 3)
        return DecodedImage(pixels, (int(self._original[i, 0]), int(self._original[i, 1])))

    @classmethod
    def open_or_build(
        cls,
        manifest: Manifest,
        cache_dir: str | os.PathLike,
        *,
        shorter_side: int,
        on_bad_image: str = "error",
        workers: int | None = None,
        progress: bool = True,
    ) -> "DecodedImageCache":
        """Open the cache for this manifest and size, building it first if it does not exist.

        Args:
            manifest: rows to cache, in order.
            cache_dir: folder for cache files (shared between runs; keyed by content).
            shorter_side: images are downscaled so their shorter side is this many pixels.
            on_bad_image: "error" raises BadImageError on the first bad file; "skip" records it
                and `get` raises for that row (the dataset then skips it).
            workers: decoding threads (default: CPU count).
        """
        cache_dir = Path(cache_dir)
        key = cache_key(manifest, shorter_side)
        data_path, index_path = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"
        if index_path.is_file() and data_path.is_file():
            return cls(data_path, index_path)
        cache_dir.mkdir(parents=True, exist_ok=True)
        paths = manifest.table["path"].tolist()

        def load(i: int):
            try:
                decoded = manifest.decode(i, min_side=shorter_side)
            except BadImageError as e:
                if on_bad_image != "skip":
                    raise
                return None, None, e.reason
            return resize_shorter(decoded.pixels, shorter_side), decoded.original_size, None

        offsets, shapes, original, errors = [], [], [], {}
        offset = 0
        with atomic_path(data_path) as tmp, open(tmp, "wb") as out, \
                ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            results = pool.map(load, range(len(paths)))
            if progress:
                results = track(results, total=len(paths), description=f"caching images at {shorter_side}px")
            for i, (pixels, size, reason) in enumerate(results):
                offsets.append(offset)
                if reason is not None:
                    errors[str(i)] = reason
                    shapes.append((0, 0))
                    original.append((0, 0))
                    continue
                out.write(np.ascontiguousarray(pixels).tobytes())
                offset += pixels.size
                shapes.append(pixels.shape[:2])
                original.append(size)
        index = {
            "version": 1, "shorter_side": shorter_side, "root": str(manifest.root), "paths": paths,
            "offsets": offsets, "shapes": [list(map(int, s)) for s in shapes],
            "original_sizes": [list(map(int, s)) for s in original], "errors": errors,
        }
        with atomic_path(index_path) as tmp:
            tmp.write_text(json.dumps(index))
        log.info("cached %d images (%.1f MB) in %s", len(paths), offset / 1e6, data_path)
        return cls(data_path, index_path)
