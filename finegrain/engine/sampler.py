"""A resumable, rank-aware epoch sampler."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Shuffles `n` indices with a permutation that depends only on (seed, epoch).

    Every rank gets whole batches: the permutation is cut to a multiple of batch_size * world
    (the rest is dropped, as DDP needs equal batches) and global batch j is split so rank r gets
    its slice r. `start_batch` skips batches already done in this epoch (resume mid-epoch).

    Yields indices for this rank; wrap in a DataLoader with `batch_size` and drop_last=True.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.rank, self.world, self.shuffle = n, batch_size, seed, rank, world, shuffle
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank sees per epoch."""
        return self.n // (self.batch_size * self.world)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation and the first batch to serve."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        steps = self.batches_per_epoch
        mine = perm[: steps * self.batch_size * self.world].view(steps, self.world, self.batch_size)[:, self.rank]
        return iter(mine[self.start_batch:].reshape(-1).tolist())
