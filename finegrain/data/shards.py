"""Photo sets in shards: a manifest's photos decoded once, resized, re-encoded and written with litdata.

A photo whose shorter side is already at most --max-side keeps its own bytes (no second JPEG loss).

A shard folder holds litdata's chunks and index.json, `manifest.parquet` (the manifest's rows, each
with its record number in `shard_index`) and `finegrain_shards.json` (format, counts, sizes). Each
record carries the photo (JPEG bytes), its original width and height (the frame its box is given
in), label, split, box and source row. finegrain reads records by number (litdata random access),
so its own samplers keep deciding the order: exact epochs, ranks and resume are those of the folder
path. A shard folder may also be remote, at any location litdata's downloaders read (s3://, gs://,
azure://, hf://, r2://; `local:/path` reads a local folder through the same download path): its own
three files are fetched into a folder of META_CACHE and the records streamed into chunks/ there (or
into LITDATA_CACHE_DIR when set). Write shards locally, then copy them up.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

from finegrain.data.images import DecodedImage, decode_image, resize_shorter
from finegrain.errors import BadImageError, FinegrainError
from finegrain.progress import track

log = logging.getLogger("finegrain")

SHARD_FORMAT = 1          # finegrain_shards.json "format": what this code reads and writes
INFO_FILE = "finegrain_shards.json"
MANIFEST_FILE = "manifest.parquet"
JPEG_QUALITY = 90
REMOTE_PREFIXES = ("s3://", "gs://", "azure://", "hf://", "r2://", "local:")  # litdata's downloaders
META_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "finegrain" / "shard_folders"


class ShardError(FinegrainError):
    """A shard folder that is incomplete, of another format, or not a shard folder."""


def is_remote(location: str | os.PathLike) -> bool:
    """Whether `location` is a URL for litdata's downloaders rather than a local folder."""
    return isinstance(location, str) and location.startswith(REMOTE_PREFIXES)


@lru_cache(maxsize=None)
def local_folder(location: str) -> Path:
    """A remote shard folder's own files (finegrain_shards.json, index.json, manifest.parquet) fetched into
    META_CACHE once a process, with litdata's downloader for the URL; a local folder as it is."""
    if not is_remote(location):
        return Path(location)
    from litdata.streaming.downloader import get_downloader

    folder = _cache_folder(location)
    folder.mkdir(parents=True, exist_ok=True)
    downloader = get_downloader(location, str(folder), [])
    for name in (INFO_FILE, "index.json", MANIFEST_FILE):
        (folder / name).unlink(missing_ok=True)  # fetched again: the remote folder may have been rewritten
        try:
            downloader.download_file(f"{location.rstrip('/')}/{name}", str(folder / name))
        except Exception as e:  # noqa: BLE001 - each cloud client raises its own kind; all mean "cannot read it"
            if name == INFO_FILE:
                raise ShardError(f"{location}: not a readable shard folder (no {INFO_FILE}: {e})") from None
            raise ShardError(f"{location}: incomplete shard folder, cannot read {name} ({e})") from None
    return folder


def _cache_folder(location: str) -> Path:
    """Where a remote shard folder's own files go; its records go to chunks/ inside unless LITDATA_CACHE_DIR says."""
    return META_CACHE / hashlib.sha256(location.encode()).hexdigest()[:16]


def shard_info(location: str | os.PathLike) -> dict:
    """finegrain_shards.json of a shard folder, checked: its format and, for a local folder, every chunk index.json
    lists (a remote one's chunks are checked as litdata streams them)."""
    folder = local_folder(str(location))
    info_path, index_path = folder / INFO_FILE, folder / "index.json"
    if not info_path.is_file():
        raise ShardError(f"{folder}: not a shard folder (no {INFO_FILE}); write one with `finegrain manifest shard`")
    info = json.loads(info_path.read_text())
    if info.get("format") != SHARD_FORMAT:
        raise ShardError(f"{folder}: shard format {info.get('format')!r}, this finegrain reads format {SHARD_FORMAT}; "
                         "write the shards again with `finegrain manifest shard`")
    if not index_path.is_file():
        raise ShardError(f"{folder}: incomplete shard folder, index.json is missing")
    chunks = [c["filename"] for c in json.loads(index_path.read_text())["chunks"]]
    missing = [] if is_remote(location) else [c for c in chunks if not (folder / c).is_file()]
    if missing:
        raise ShardError(f"{folder}: incomplete shard folder, {len(missing)} of {len(chunks)} shard(s) missing, "
                         f"e.g. {missing[0]}")
    return info


def _record(manifest, i: int, max_side: int) -> dict:
    """Row i of `manifest` as a shard record: {"row", "image": JPEG bytes, "meta": label, split, bbox, width,
    height, error}. Bytes go in as uint8 tensors and meta as one of them (UTF-8 JSON): litdata reads such a
    record alone, about 5x faster at random than one with string and list fields (read in 256-row windows)."""
    import torch
    from PIL import Image

    row = manifest.table.iloc[i]
    meta = {"label": str(row["label"]), "split": str(row["split"]), "width": 0, "height": 0, "error": "",
            "bbox": [None if c not in row.index or np.isnan(float(row[c])) else float(row[c])
                     for c in ("bbox_x", "bbox_y", "bbox_w", "bbox_h")]}
    image = b""
    try:
        path = manifest.root / row["path"]
        decoded = decode_image(path, min_side=max_side, name=row["path"])
        if min(decoded.original_size) <= max_side:  # small enough: the file's own bytes (no second JPEG loss)
            image = path.read_bytes()
        else:
            buf = io.BytesIO()
            Image.fromarray(resize_shorter(decoded.pixels, max_side)).save(buf, format="JPEG", quality=JPEG_QUALITY)
            image = buf.getvalue()
        meta.update(width=int(decoded.original_size[0]), height=int(decoded.original_size[1]))
    except BadImageError as e:
        meta["error"] = e.reason
    as_tensor = lambda data: torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)  # noqa: E731
    return {"row": i, "image": as_tensor(image), "meta": as_tensor(json.dumps(meta, allow_nan=False).encode())}


def write_shards(manifest, out: str | os.PathLike, *, max_side: int = 512, shard_bytes: str = "256MB",
                 workers: int | None = None) -> dict:
    """Write `manifest`'s photos as shards in `out` (a new or empty folder); returns finegrain_shards.json.

    Photos are decoded in `workers` threads and written in row order, so record i is row i. A photo
    that cannot be read is written as an empty record (read back as a bad image naming its row).
    """
    from litdata.streaming.writer import BinaryWriter

    if is_remote(str(out)):
        raise ShardError(f"{out}: shards are written to a local folder; copy them up after (aws s3 sync, gcloud storage "
                         "rsync, ...)")
    folder = Path(out)
    if folder.exists() and any(folder.iterdir()):
        raise ShardError(f"{folder}: not empty; shards go to a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    writer = BinaryWriter(cache_dir=str(folder), chunk_bytes=shard_bytes)
    bad = 0
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        records = pool.map(lambda i: _record(manifest, i, max_side), range(len(manifest)))
        for i, record in enumerate(track(records, total=len(manifest), description="writing shards")):
            if not len(record["image"]):
                bad += 1
                log.warning("row %d (%s): %s; written as an empty record", i, manifest.table["path"].iat[i],
                            json.loads(bytes(record["meta"]))["error"])
            writer[i] = record
    writer.done()
    writer.merge()
    table = manifest.table.assign(shard_index=np.arange(len(manifest), dtype=np.int64))
    manifest.from_table(table, folder).save(folder / MANIFEST_FILE)
    chunks = json.loads((folder / "index.json").read_text())["chunks"]
    info = {"format": SHARD_FORMAT, "records": len(manifest), "bad_records": bad, "max_side": max_side,
            "shards": len(chunks), "bytes": sum(int(c.get("chunk_bytes", 0)) for c in chunks),
            "source_content_hash": manifest.content_hash,
            "records_hash": hashlib.sha256((folder / "index.json").read_bytes()).hexdigest()}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


class ShardPhoto(str):
    """A shard manifest's photo: its path as text (what reports and tables show) that reads its record, since
    no file is there. `read(min_side)` -> DecodedImage; raises BadImageError."""

    def __new__(cls, text: str, manifest, rel: str):
        photo = super().__new__(cls, text)
        photo.manifest, photo.rel = manifest, rel
        return photo

    def read(self, min_side: int | None = None) -> DecodedImage:
        rows = np.flatnonzero(self.manifest.table["path"].to_numpy() == self.rel)
        if not len(rows):
            raise BadImageError(self.rel, "not a row of the shard manifest")
        return self.manifest.decode(int(rows[0]), min_side=min_side)


_OPEN: dict[str, object] = {}  # location -> litdata StreamingDataset, one per process (DataLoader workers too)
_LOCK = threading.Lock()       # decoding threads share it; only the record read is serialised, not the decode


def read_record(location: str, index: int, *, min_side: int | None = None, name: str) -> DecodedImage:
    """Decoded photo of record `index` in the shard set at `location`. Raises BadImageError naming `name`."""
    try:
        with _LOCK:
            if location not in _OPEN:
                from litdata import StreamingDataset

                cache = os.environ.get("LITDATA_CACHE_DIR") or str(_cache_folder(location) / "chunks")
                options = {"cache_dir": cache if is_remote(location) else None}
                if "batch_decode" in inspect.signature(StreamingDataset).parameters:
                    # litdata >= 0.2.74 decodes a window of up to 32 records around each one read, for sequential
                    # streaming; finegrain reads single records in its samplers' order, where that costs 13x
                    options["batch_decode"] = 0
                _OPEN[location] = StreamingDataset(location, **options)
            record = _OPEN[location][int(index)]
    except Exception as e:  # noqa: BLE001 - a record litdata cannot read is a bad image, as a bad file is
        raise BadImageError(name, f"unreadable shard record {index} ({e})") from None
    meta = json.loads(bytes(record["meta"].numpy()))
    if not len(record["image"]):
        raise BadImageError(name, meta["error"] or "empty shard record")
    decoded = decode_image(record["image"].numpy().tobytes(), min_side=min_side, name=name)
    return DecodedImage(decoded.pixels, (int(meta["width"]), int(meta["height"])))
