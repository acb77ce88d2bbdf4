"""Where features are cached, and which photos a cache folder already holds for a model.

The default folder, $FINEGRAIN_CACHE/features (else ~/.cache/finegrain/features), is shared by every
command that reads features (evaluate, audit, suggest), as the decoded-image cache is. Beside each
feature file <what>-<key>.npy, (N, D) float32, its sidecar <what>-<key>.ids holds the (N,) uint64 ids
of its photos: a hash of the reading (weights, image side, normalisation, crop, flip) and of the photo
(root, path, and the box when cropping). A photo extracted once for a model is then copied, not
extracted again, into any other set of photos that holds it, whichever command asks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from finegrain.features import feature_file
from finegrain.fsutil import atomic_path

IDS_SUFFIX = ".ids"


def default_folder() -> Path:
    """$FINEGRAIN_CACHE/features, else ~/.cache/finegrain/features."""
    root = os.environ.get("FINEGRAIN_CACHE")
    return Path(root) / "features" if root else Path.home() / ".cache" / "finegrain" / "features"


def photo_ids(photos: pd.DataFrame, root: str, reading: str) -> np.ndarray:
    """(N,) uint64 id of each photo (a row of path and, when cropping, box columns) under `root`, as `reading`
    (a hex digest of the model and its preprocessing) sees it: equal ids, equal features."""
    table = photos.reset_index(drop=True).assign(root=str(root))
    return pd.util.hash_pandas_object(table, index=False, hash_key=reading[:16]).to_numpy(np.uint64)


def write_ids(features_path: Path, ids: np.ndarray) -> None:
    """The sidecar of `features_path`: its photos' ids, in row order (written atomically)."""
    with atomic_path(_ids_path(features_path)) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(ids, dtype=np.uint64))


def _ids_path(features_path: Path) -> Path:
    return features_path.with_suffix(IDS_SUFFIX)


class CachedPhotos:
    """The finished feature files of a folder and the photos each holds, to copy rows from."""

    def __init__(self, folder: Path, skip: Path | None = None):
        """Index every <what>-<key>.npy of `folder` that has its sidecar, except `skip`."""
        self.files: list[Path] = []
        ids, owner, row = [], [], []
        for sidecar in sorted(Path(folder).glob(f"*{IDS_SUFFIX}")):
            path = sidecar.with_suffix(".npy")
            if path == skip or not path.is_file():
                continue
            try:
                held = np.load(sidecar)
            except (OSError, ValueError):
                continue
            ids.append(held)
            owner.append(np.full(len(held), len(self.files)))
            row.append(np.arange(len(held)))
            self.files.append(path)
        self._ids = np.concatenate(ids) if ids else np.zeros(0, np.uint64)
        self._owner = np.concatenate(owner) if owner else np.zeros(0, np.int64)
        self._row = np.concatenate(row) if row else np.zeros(0, np.int64)
        self._order = np.argsort(self._ids, kind="stable")
        self._maps: dict[int, torch.Tensor] = {}  # file index -> its memory map, opened once

    def _rows(self, f: int) -> torch.Tensor:
        if f not in self._maps:
            self._maps[f] = feature_file.read_rows(self.files[f])
        return self._maps[f]

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each id, (file index into self.files or -1 when no file holds it, its row there); both (N,) int64."""
        if not len(self._ids):
            return np.full(len(ids), -1), np.zeros(len(ids), np.int64)
        sorted_ids = self._ids[self._order]
        pos = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
        found = sorted_ids[pos] == ids
        at = self._order[pos]
        return np.where(found, self._owner[at], -1), np.where(found, self._row[at], 0)

    def gather(self, files: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        """(len(rows), D) float32 rows, row i from files[i] (all >= 0)."""
        parts = {int(f): self._rows(int(f)) for f in np.unique(files)}
        dim = next(iter(parts.values())).shape[1]
        out = torch.empty(len(rows), dim)
        for f, features in parts.items():
            mine = np.nonzero(files == f)[0]
            out[torch.from_numpy(mine)] = features[torch.from_numpy(rows[mine])]
        return out
