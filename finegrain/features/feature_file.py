"""(N, D) float32 features in a .npy file: written a batch at a time, resumed after a crash, read as a memory map.

PATH.partial holds the rows written so far and PATH.rows how many of them are flushed; the finished
file is renamed onto PATH, so PATH is always complete.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from finegrain.fsutil import atomic_write_text

FLUSH_SECONDS = 30.0  # how much extraction a crash may lose


def _partial(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.name + ".partial"), path.with_name(path.name + ".rows")


def rows_done(path: Path, total: int) -> int:
    """Leading rows of PATH's unfinished file already on disk (0 when there is none or it is for another row count)."""
    partial, progress = _partial(Path(path))
    try:
        done = int(progress.read_text())
        shape = np.load(partial, mmap_mode="r").shape
    except (OSError, ValueError):
        return 0
    return done if shape[0] == total and 0 <= done <= total else 0


def write_rows(path: Path, batches: Iterable[torch.Tensor], total: int, start: int = 0) -> None:
    """Write (b, D) feature batches as rows start.. of a (total, D) float32 PATH; start > 0 continues a partial file."""
    path = Path(path)
    partial, progress = _partial(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out, row, flushed = None, start, time.monotonic()
    for feats in batches:
        if out is None:
            out = np.lib.format.open_memmap(partial, mode="r+" if start else "w+", dtype=np.float32,
                                            shape=None if start else (total, feats.shape[1]))
        out[row:row + len(feats)] = feats.float().numpy()
        row += len(feats)
        if time.monotonic() - flushed > FLUSH_SECONDS:
            out.flush()
            atomic_write_text(progress, str(row))
            flushed = time.monotonic()
    if row != total or total == 0:
        raise ValueError(f"{path}: {row} of {total} rows written")
    if out is not None:  # None: the partial file was complete already (a crash between its last flush and the rename)
        out.flush()
        del out
    os.replace(partial, path)
    progress.unlink(missing_ok=True)


def read_rows(path: Path) -> torch.Tensor:
    """(N, D) float32 tensor over PATH's memory map (copy-on-write: pages are read when touched, edits stay private)."""
    return torch.from_numpy(np.load(Path(path), mmap_mode="c"))
