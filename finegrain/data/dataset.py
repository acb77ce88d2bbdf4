"""A torch Dataset over a manifest: decoded RGB images, N augmented views, label and index."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from finegrain.data.cache import DecodedImageCache
from finegrain.data.images import DecodedImage, decode_image
from finegrain.data.manifest import BBOX_COLUMNS, Manifest
from finegrain.errors import BadImageError, FinegrainError

log = logging.getLogger("finegrain")

View = Callable[..., torch.Tensor]


class ManifestDataset(Dataset):
    """Images of a manifest as `(views, label, index)` samples.

    Item i is `(views, label, index)`:
        views: list of `n_views` tensors, each (3, S, S) float32 from the view callables.
        label: int class index into `class_names`, or -1 for unlabeled rows.
        index: the row of `manifest.table` served (i, or the replacement row when skipping).
    A DataLoader's default collate turns a batch into ([B x (3, S, S)] * n_views, (B,), (B,)).

    Args:
        manifest: the rows to serve (select splits first, e.g. `manifest.select("train")`).
        views: one view callable `(pixels, bbox) -> tensor`, applied `n_views` times, or a list
            with one callable per view (asymmetric views).
        n_views: number of views when `views` is a single callable (2 for contrastive stages).
        class_names: label order; default `manifest.class_names`. Labels not in it raise.
        on_bad_image: "error" raises BadImageError naming the file; "skip" logs it once and
            serves the next good row instead, so an epoch never dies on one file.
        cache: a DecodedImageCache built from this same manifest (pixels read from it).
        decode_min_side: without a cache, JPEGs may be decoded at reduced scale down to this
            shorter side (pixels); None decodes at full size.
        seed: when given, the views of row i in epoch e are a function of (seed, e, i) alone
            (each view is re-seeded before use), so augmentations do not depend on DataLoader
            workers, batch order or where a resumed run starts. Call `set_epoch` every epoch.
    """

    def __init__(
        self,
        manifest: Manifest,
        views: View | Sequence[View],
        *,
        n_views: int = 1,
        class_names: Sequence[str] | None = None,
        on_bad_image: str = "error",
        cache: DecodedImageCache | None = None,
        decode_min_side: int | None = None,
        seed: int | None = None,
    ):
        if on_bad_image not in ("error", "skip"):
            raise FinegrainError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.manifest = manifest
        self.views = list(views) if isinstance(views, (list, tuple)) else [views] * n_views
        if not self.views:
            raise FinegrainError("a dataset needs at least one view")
        self.class_names = list(class_names) if class_names is not None else manifest.class_names
        index = {name: i for i, name in enumerate(self.class_names)}
        raw = manifest.table["label"].tolist()
        unknown = sorted(set(raw) - set(index) - {""})
        if unknown:
            raise FinegrainError(f"labels not among the model's classes: {unknown[:5]} ({len(unknown)} in all)")
        self.labels = np.array([index.get(x, -1) for x in raw], dtype=np.int64)
        self.paths = manifest.table["path"].tolist()
        self.bboxes = (
            manifest.table[list(BBOX_COLUMNS)].to_numpy(dtype=np.float64) if manifest.has_bboxes else None
        )
        self.on_bad_image = on_bad_image
        if cache is not None and len(cache) != len(manifest):
            raise FinegrainError(f"image cache has {len(cache)} rows but the manifest has {len(manifest)}")
        self.cache = cache
        self.decode_min_side = decode_min_side
        self._reported: set[str] = set()
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations `__getitem__` draws (when seeded)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> DecodedImage:
        """Decoded pixels of row i (from the cache when there is one). Raises BadImageError."""
        if self.cache is not None:
            return self.cache.get(i)
        return decode_image(self.manifest.root / self.paths[i], min_side=self.decode_min_side, name=self.paths[i])

    def __getitem__(self, index: int):
        i = index
        for _ in range(len(self)):
            try:
                image = self.load(i)
                break
            except BadImageError as e:
                if self.on_bad_image == "error":
                    raise
                if e.path not in self._reported:
                    self._reported.add(e.path)
                    log.warning("skipping bad image %s: %s", e.path, e.reason)
                i = (i + 1) % len(self)
        else:
            raise FinegrainError("every image in the dataset failed to decode")
        bbox = None
        if self.bboxes is not None and not np.isnan(self.bboxes[i, 2]):
            bbox = self.bboxes[i] * image.scale
        pixels = image.pixels
        views = []
        for v, view in enumerate(self.views):
            if self.seed is not None and hasattr(view, "reseed"):
                view.reseed(int(np.random.SeedSequence([self.seed, self.epoch, i, v]).generate_state(1)[0]))
            views.append(view(pixels, bbox))
        return views, int(self.labels[i]), i
