"""Features of manifest photos as a Subject reads them, extracted once per photo and model, and cached.

Shared by `evaluate`, `audit`, `suggest` and `predict`: the artifact's own normalisation, by default 1.125 x its
training size with flip averaging. The cache folder is shared between commands (features/cache.py):
a set of photos asked for again is read back as it was written; photos another set already holds are
copied from it, and only the others are extracted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from finegrain.config import FeatureConfig
from finegrain.data.dataset import eval_dataset
from finegrain.data.manifest import BBOX_COLUMNS, Manifest
from finegrain.features import feature_file
from finegrain.features.cache import CachedPhotos, default_folder, photo_ids, write_ids
from finegrain.features.extract import feature_batches, flip_averaged, ready_for_extraction
from finegrain.features.subject import Subject

log = logging.getLogger("finegrain")


class FeatureStore:
    """Extracts features of manifest rows once and keeps them in FOLDER/<what>-<key>.npy."""

    def __init__(self, cfg: FeatureConfig, subject: Subject, device: torch.device, folder: Path | None = None,
                 amp_dtype: torch.dtype | None = None, file_stamps: bool = False):
        """folder: where to cache when cfg.features_dir is not set (default: the shared cache folder, see
        features/cache.py); amp_dtype: autocast dtype or None; file_stamps: a photo is also known by its file's
        size and modification time (predict: a camera folder may reuse a file name for a new photo)."""
        self.cfg, self.subject, self.device, self.amp_dtype = cfg, subject, device, amp_dtype
        self.file_stamps = file_stamps
        ready_for_extraction(subject.model, device)
        self.folder = Path(cfg.features_dir) if cfg.features_dir else Path(folder) if folder else default_folder()
        self.seconds = 0.0  # wall time spent extracting (and copying cached rows) in this run
        self.extracted = 0  # photos extracted in this run (not read or copied from the cache)
        parts = [subject.identity, subject.image_size, cfg.bbox_crop, subject.mean, subject.std]
        self.reading = _digest(parts + (["flip"] if cfg.flip_tta else []))  # the model and its preprocessing

    def _photos(self, rows: Manifest):
        """The columns the features depend on: the path and, when cropping, the box (not labels or splits); with
        file_stamps, each file's size and modification time (ns)."""
        photos = rows.table[["path"] + (list(BBOX_COLUMNS) if self.cfg.bbox_crop and rows.has_bboxes else [])]
        if not self.file_stamps:
            return photos
        stats = [os.stat(rows.root / p) for p in photos["path"]]
        return photos.assign(size=[st.st_size for st in stats], mtime_ns=[st.st_mtime_ns for st in stats])

    def key(self, rows: Manifest) -> str:
        """What the features depend on: model, preprocessing and the photos."""
        return _digest([self.reading, str(rows.root), self._photos(rows).to_csv(index=False, float_format="%.4f")])[:24]

    def held(self, rows: Manifest) -> np.ndarray:
        """(N,) bool: which rows' photos the folder already holds features of (for this model and preprocessing)."""
        if not self.folder.is_dir():
            return np.zeros(len(rows), dtype=bool)
        files, _ = CachedPhotos(self.folder).locate(photo_ids(self._photos(rows), str(rows.root), self.reading))
        return files >= 0

    def features(self, rows: Manifest, what: str) -> torch.Tensor:
        """(N, D) float32 features of `rows`, in row order: a memory map of FOLDER/<what>-<key>.npy, written a
        batch at a time (an interrupted extraction resumes where it stopped)."""
        path = self.folder / f"{what}-{self.key(rows)}.npy"
        if path.is_file():
            log.info("features: %s from cache (%s)", what, path)
            return feature_file.read_rows(path)
        ids = photo_ids(self._photos(rows), str(rows.root), self.reading)
        done = feature_file.rows_done(path, len(ids))
        write_ids(path, ids)
        cached = CachedPhotos(self.folder, skip=path)
        files, at = cached.locate(ids)
        missing = np.nonzero(files[done:] < 0)[0] + done
        if done:
            log.info("features: %s resumes at photo %d of %d", what, done + 1, len(ids))
        if len(ids) - done - len(missing):
            log.info("features: %s, %d of %d photos from the cache", what, len(ids) - done - len(missing), len(ids))
        start = time.perf_counter()
        fresh = self._extract(rows, missing, what)
        batches = fresh if len(missing) == len(ids) - done else _in_row_order(cached, files, at, done, fresh,
                                                                             self.cfg.batch_size)
        feature_file.write_rows(path, batches, len(ids), done)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.extracted += len(missing)
        if len(missing):
            log.info("features: %s, %d images in %.1f s (%.0f img/s)", what, len(missing), seconds,
                     len(missing) / max(seconds, 1e-9))
        return feature_file.read_rows(path)

    def _extract(self, rows: Manifest, index: np.ndarray, what: str) -> Iterator[torch.Tensor]:
        """(b, D) feature batches of rows[index], in that order, each computed when it is asked for."""
        if not len(index):
            return iter(())
        ds = eval_dataset(self.cfg, rows, image_size=self.subject.image_size, mean=self.subject.mean,
                          std=self.subject.std, class_names=rows.class_names, crop_to_bbox=self.cfg.bbox_crop,
                          collective=False)
        embed = flip_averaged(self.subject.model) if self.cfg.flip_tta else self.subject.model
        part = ds if len(index) == len(ds) else Subset(ds, index.tolist())
        batches = feature_batches(embed, part, device=self.device, batch_size=self.cfg.batch_size,
                                  workers=self.cfg.workers, amp_dtype=self.amp_dtype, progress=f"features: {what}")
        return (f for f, _ in batches)


def _in_row_order(cached: CachedPhotos, files: np.ndarray, at: np.ndarray, start: int,
                  fresh: Iterator[torch.Tensor], block: int) -> Iterator[torch.Tensor]:
    """(b, D) batches of rows start.. in order: a row another file holds (files >= 0) is copied from row `at` of
    it, the others come in turn from `fresh`, the extracted batches of exactly those rows."""
    extracted = _RowStream(fresh)
    for lo in range(start, len(files), block):
        held = files[lo:lo + block] >= 0
        copied = cached.gather(files[lo:lo + block][held], at[lo:lo + block][held]) if held.any() else None
        new = extracted.take(int((~held).sum()))
        out = torch.empty(len(held), (copied if copied is not None else new).shape[1])
        if copied is not None:
            out[torch.from_numpy(held)] = copied
        if new is not None:
            out[torch.from_numpy(~held)] = new
        yield out


class _RowStream:
    """The rows of a stream of (b, D) batches, handed out n at a time."""

    def __init__(self, batches: Iterator[torch.Tensor]):
        self.batches, self.left = batches, torch.empty(0, 0)

    def take(self, n: int) -> torch.Tensor | None:
        """The next (n, D) rows; None for n = 0."""
        parts = []
        while n > 0:
            if not len(self.left):
                self.left = next(self.batches)
            parts.append(self.left[:n])
            self.left, n = self.left[len(parts[-1]):], n - len(parts[-1])
        return torch.cat(parts) if parts else None


def _digest(parts: list) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()
