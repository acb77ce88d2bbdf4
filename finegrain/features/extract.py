"""Batched feature extraction, shared by evaluate, audit, suggest, predict and the training-time kNN monitor."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Subset

from finegrain.progress import track

TEST_SIZE_SCALE = 1.125  # FixRes (Touvron et al. 2019): random-resized-crop training makes objects look larger


def test_size(train_size: int) -> int:
    """The evaluation image side for a model trained at `train_size` px (128 -> 144, 224 -> 252)."""
    return int(round(train_size * TEST_SIZE_SCALE))


def ready_for_extraction(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` in eval mode on `device` in channels_last (NHWC) memory format, as training runs it: 1.5-2x the
    img/s of the default format on CPU for convolutional backbones."""
    return model.eval().to(device, memory_format=torch.channels_last)


def flip_averaged(embed: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Test-time augmentation: (B, 3, S, S) -> (B, D) mean of the features of each image and its mirror image."""

    def embed_both(images: torch.Tensor) -> torch.Tensor:
        return 0.5 * (embed(images) + embed(images.flip(-1)))

    return embed_both


def extract_features(embed: Callable[[torch.Tensor], torch.Tensor], dataset, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `embed` over a dataset of single views, in memory (`options`: feature_batches's keywords).

    Returns:
        features (N, D) float32 on CPU in dataset order, labels (N,) int64 (-1 = unlabeled).
    """
    feats, labels = [], []
    for f, y in feature_batches(embed, dataset, **options):
        feats.append(f)
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def feature_batches(
    embed: Callable[[torch.Tensor], torch.Tensor],
    dataset,
    *,
    device: torch.device,
    batch_size: int = 128,
    workers: int = 2,
    amp_dtype: torch.dtype | None = None,
    progress: str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Run `embed` over a dataset of single views, a batch at a time.

    Args:
        embed: (B, 3, S, S) -> (B, D) features (the caller puts the model in eval mode).
        dataset: items (views, label, index) with one view (a ManifestDataset with an eval view).
        workers: DataLoader processes; 0 on CPU when the dataset reads the decoded-image cache.
        progress: a description to show a progress bar with, or None.

    Yields:
        features (B, D) float32 on CPU in dataset order, labels (B,) int64 (-1 = unlabeled).
    """
    if device.type == "cpu" and getattr(_base(dataset), "cache", None) is not None:
        # decoded pixels need only a resize and crop: worker processes would take CPU from the forward pass
        workers = 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda")
    iterator = track(loader, description=progress) if progress else loader
    for views, y, _ in iterator:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            images = views[0].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            f = embed(images)
        yield f.float().cpu(), y


def _base(dataset):
    """The dataset under any torch Subset wrappers."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset
