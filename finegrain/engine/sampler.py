"""Resumable, rank-aware batch samplers, registered by name in SAMPLERS (`--sampler`)."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Sampler

from finegrain.registry import SAMPLERS

log = logging.getLogger("finegrain")


class _ResumableBatches(Sampler[int]):
    """What the engine needs of a sampler: whole batches per rank, an epoch, and a batch to resume at."""

    n: int
    batch_size: int
    world: int
    epoch: int = 0
    start_batch: int = 0
    stride: int = 0  # a photo's k-th repeat in an epoch is served as index + k x stride (0: n)

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank sees per epoch."""
        return self.n // (self.batch_size * self.world)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation and the first batch to serve."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class EpochSampler(_ResumableBatches):
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


    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        steps = self.batches_per_epoch
        mine = perm[: steps * self.batch_size * self.world].view(steps, self.world, self.batch_size)[:, self.rank]
        return iter(mine[self.start_batch:].reshape(-1).tolist())


class ClassBalancedSampler(_ResumableBatches):
    """P x K batches: each batch holds `classes_per_batch` (P) classes with K = batch_size / P images each.

    Fine-grained sets have few images per class, so a random batch of 64 over 200 classes holds
    almost no same-class pairs and SupCon / triplet losses get no positives; P x K batches give every
    anchor K - 1 positives (Hermans et al. 2017). Written here because torch has no such sampler and
    pytorch-metric-learning's MPerClassSampler is neither rank-aware nor resumable mid-epoch.

    An epoch is `n // (batch_size * world)` global batches, the same number of images as a plain
    epoch. Classes are drawn without replacement within a batch, in a shuffled cycle over all classes;
    each class serves its images from its own shuffled cycle, so every image is seen about equally
    often. An image served again within an epoch (a class with fewer than K images, or a class cycled)
    is served as index + k x `stride` for its k-th repeat: the dataset's k-th other draw of
    augmentations of it (stride defaults to n, the dataset size).
    Everything depends only on (seed, epoch): global batch j goes to rank j % world, whole; and
    `start_batch` resumes mid-epoch.

    Args:
        labels: (n,) class id of each dataset index (ints >= 0).
        batch_size: images per batch per process; must be a multiple of classes_per_batch.
        classes_per_batch: P; at most the number of classes.
    """

    def __init__(self, labels, batch_size: int, classes_per_batch: int, *, seed: int = 0, rank: int = 0, world: int = 1):
        labels = torch.as_tensor(labels, dtype=torch.long)
        classes = torch.unique(labels)
        if batch_size % classes_per_batch:
            raise ValueError(f"batch size {batch_size} is not a multiple of {classes_per_batch} classes per batch")
        if classes_per_batch > len(classes):
            raise ValueError(f"{classes_per_batch} classes per batch but only {len(classes)} classes have training images")
        self.by_class = [torch.nonzero(labels == c).flatten() for c in classes]
        self.n, self.batch_size, self.p = len(labels), batch_size, classes_per_batch
        self.k = batch_size // classes_per_batch
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.start_batch = 0, 0


    def _global_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        streams = [members[torch.randperm(len(members), generator=g)].tolist() for members in self.by_class]
        cursor = [0] * len(streams)
        served = [0] * self.n  # times each index was served so far this epoch
        stride = self.stride or self.n
        class_order: list[int] = []
        batches = []
        for _ in range(self.batches_per_epoch * self.world):
            while len(class_order) < self.p:  # a fresh shuffled cycle of classes, none twice in a batch
                fresh = [c for c in torch.randperm(len(streams), generator=g).tolist() if c not in class_order]
                class_order += fresh
            chosen, class_order = class_order[: self.p], class_order[self.p:]
            batch = []
            for c in chosen:
                stream = streams[c]
                for _ in range(self.k):
                    if cursor[c] == len(stream):  # cycle through this class again, in a new order
                        streams[c] = stream = [stream[i] for i in torch.randperm(len(stream), generator=g).tolist()]
                        cursor[c] = 0
                    i = stream[cursor[c]]
                    batch.append(i + served[i] * stride)
                    served[i] += 1
                    cursor[c] += 1
            batches.append(batch)
        return batches

    def __iter__(self):
        batches = self._global_batches()[self.rank::self.world]
        return iter([i for batch in batches[self.start_batch:] for i in batch])


class WithUnlabelled(_ResumableBatches):
    """Each batch of a labelled sampler followed by `per_batch` unlabelled indices: (B + U)-index batches.

    An epoch is one pass over the larger pool: max(the labelled sampler's batches per epoch,
    N // (U x world)) batches, as in FixMatch, where the few labelled photos are cycled while the many
    unlabelled ones are seen once. The labelled batches of epoch e come from the labelled sampler's
    epochs e x R, e x R + 1, ... (R = the cycles an epoch needs). The unlabelled indices come from an
    endless stream of shuffled passes over `unlabelled` (pass p shuffled by (seed, p)); global batch j
    of epoch e takes the stream's U items from position (e x batches per epoch x world + j) x U, so
    every unlabelled photo is seen about equally often and ranks never share one. This rank's local
    batch b is global batch b x world + rank. Everything depends only on (seed, epoch): `start_batch`
    resumes mid-epoch.

    A photo shown again within one epoch (the labelled ones in every cycle and within a labelled
    epoch, an unlabelled one in a second pass) is served as index + k x `dataset_size` with a k of its
    own: the dataset's k-th other draw of augmentations of it, not the same views again.

    Args:
        labelled: a resumable sampler over the labelled indices (P x K or plain).
        unlabelled: (N,) dataset indices of the unlabelled photos.
        per_batch: U, unlabelled photos per batch.
        dataset_size: rows in the dataset (default: every index below it is one of the two sets).
    """

    def __init__(self, labelled: _ResumableBatches, unlabelled, per_batch: int, *, seed: int = 0, rank: int = 0,
                 world: int = 1, dataset_size: int | None = None):
        self.labelled, self.unlabelled, self.u = labelled, torch.as_tensor(unlabelled, dtype=torch.long), per_batch
        self.stride = dataset_size or labelled.n + len(self.unlabelled)
        labelled.stride = self.stride  # its own in-epoch repeats must not collide with our cycles'
        if len(self.unlabelled) == 0 or per_batch < 1:
            raise ValueError("WithUnlabelled needs unlabelled indices and per_batch >= 1")
        self.batch_size, self.seed, self.rank, self.world = labelled.batch_size + per_batch, seed, rank, world
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return max(self.labelled.batches_per_epoch, len(self.unlabelled) // (self.u * self.world))

    def _labelled_batches(self) -> list[list[int]]:
        """This rank's labelled batches start_batch.. of the epoch, cycling the labelled sampler's epochs."""
        per, b = self.labelled.batches_per_epoch, self.labelled.batch_size
        cycles = -(-self.batches_per_epoch // per)
        span = per * self.world * b  # more than the repeats of any photo within one labelled epoch
        batches: list[list[int]] = []
        for cycle in range(self.start_batch // per, cycles):
            skip = self.start_batch % per if cycle == self.start_batch // per else 0
            self.labelled.set_epoch(self.epoch * cycles + cycle, skip)
            flat = [i + cycle * span * self.stride for i in self.labelled]
            batches += [flat[i:i + b] for i in range(0, len(flat), b)]
        return batches[: self.batches_per_epoch - self.start_batch]

    def _chunk(self, global_batch: int, passes: dict[int, torch.Tensor]) -> list[int]:
        n = len(self.unlabelled)
        first = self.epoch * self.batches_per_epoch * self.world * self.u  # the epoch's first stream position
        start = first + global_batch * self.u
        out = []
        for position in range(start, start + self.u):
            p = position // n
            if p not in passes:
                g = torch.Generator().manual_seed(self.seed * 100_003 + 50_021 + p)
                passes[p] = self.unlabelled[torch.randperm(n, generator=g)]
            out.append(int(passes[p][position % n]) + (p - first // n) * self.stride)
        return out

    def __iter__(self):
        passes: dict[int, torch.Tensor] = {}
        out: list[int] = []
        for i, batch in enumerate(self._labelled_batches()):
            out += batch + self._chunk((self.start_batch + i) * self.world + self.rank, passes)
        return iter(out)


@SAMPLERS.register("pk")
def pk_batches(labels, batch_size: int, classes_per_batch: int, *, seed: int, rank: int, world: int) -> ClassBalancedSampler:
    """P classes x K images per batch: positives for every anchor.

    labels: (n,) class ids. With fewer classes than P, P drops to the largest divisor of the batch size
    that fits (logged).
    """
    num_classes = len(torch.unique(torch.as_tensor(labels)))
    p = classes_per_batch
    if p > num_classes:
        p = max(d for d in range(1, num_classes + 1) if batch_size % d == 0)
        log.warning("only %d classes: using %d classes x %d images per batch", num_classes, p, batch_size // p)
    if p == batch_size:
        log.warning("P x K batches of %d classes x 1 image have no positives; lower --classes-per-batch", p)
    return ClassBalancedSampler(labels, batch_size, p, seed=seed, rank=rank, world=world)


@SAMPLERS.register("random")
def random_batches(labels, batch_size: int, classes_per_batch: int, *, seed: int, rank: int, world: int) -> EpochSampler:
    """Plain shuffled batches."""
    return EpochSampler(len(labels), batch_size, seed=seed, rank=rank, world=world)
