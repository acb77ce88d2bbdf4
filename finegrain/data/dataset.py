"""A torch Dataset over a manifest: decoded RGB images, N augmented views, label and index."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from finegrain import dist
from finegrain.data.cache import DecodedImageCache
from finegrain.data.images import DecodedImage
from finegrain.data.manifest import BBOX_COLUMNS, Manifest
from finegrain.data.views import build_view, make_recipe
from finegrain.errors import BadImageError, FinegrainError

log = logging.getLogger("finegrain")

# --on-bad-image is applied when the manifest is checked, before training starts ("error" stops there).
# A file that breaks after that check (changed on disk mid-run) is skipped with a warning, so hours of
# training never die in the middle of an epoch because of one file.
TRAINING_BAD_IMAGE_POLICY = "skip"

View = Callable[..., torch.Tensor]


class ManifestDataset(Dataset):
    """Images of a manifest as `(views, label, index)` samples.

    Item i is `(views, label, index)` (i + k x len(dataset) serves row i again, with the k-th other draw
    of augmentations: for samplers that show an image several times in one epoch):
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
        seed: when given, the views of item i in epoch e are a function of (seed, e, i) alone
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
        return self.manifest.decode(i, min_side=self.decode_min_side)

    def __getitem__(self, index: int):
        repeat, i = divmod(index, len(self))  # index + k x len: row `i` again, with other augmentations
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
                key = [self.seed, self.epoch, i, v] + ([repeat] if repeat else [])
                view.reseed(int(np.random.SeedSequence(key).generate_state(1)[0]))
            views.append(view(pixels, bbox))
        return views, int(self.labels[i]), i


def image_cache(cfg, manifest: Manifest, image_size: int, *, collective: bool = True) -> DecodedImageCache | None:
    """The decoded-image cache for these rows (shorter side image_size / 0.875 px), or None when disabled.

    cfg: any stage config with cache_images, cache_dir and on_bad_image.
    collective: every rank calls this; the first rank on each machine (LOCAL_RANK 0) builds the cache
    while the others wait, so it works on node-local disks as on a shared one. Pass False when only
    one rank calls it (the kNN monitor).
    """
    if not cfg.cache_images:
        return None
    cache_dir = Path(cfg.cache_dir or os.environ.get("FINEGRAIN_CACHE", Path.home() / ".cache" / "finegrain" / "images"))
    side = int(round(image_size / 0.875))
    builds = dist.local_rank() == 0
    if collective and not builds:
        dist.barrier()  # wait while this machine's first rank builds it, then open it
    cache = DecodedImageCache.open_or_build(manifest, cache_dir, shorter_side=side, on_bad_image=cfg.on_bad_image,
                                            progress=dist.is_main())
    if collective and builds:
        dist.barrier()
    return cache


def eval_dataset(cfg, manifest: Manifest, *, image_size: int, mean, std, class_names, crop_to_bbox: bool = False,
                 collective: bool = True) -> ManifestDataset:
    """Single eval views of these rows: [crop to box,] resize, center crop, normalise with mean/std.

    cfg: any stage config with cache_images, cache_dir and on_bad_image.
    """
    recipe = make_recipe("eval", image_size=image_size, mean=mean, std=std, crop_to_bbox=crop_to_bbox)
    return ManifestDataset(manifest, build_view(recipe), class_names=class_names, on_bad_image=cfg.on_bad_image,
                           cache=image_cache(cfg, manifest, image_size, collective=collective))
