"""The samplers the engine trains with: P x K class-balanced batches and plain shuffled batches."""

from __future__ import annotations

from collections import Counter

import pytest

from finegrain.engine.sampler import ClassBalancedSampler, EpochSampler


def _labels(counts):
    return [c for c, n in enumerate(counts) for _ in range(n)]


def _batches(sampler, size):
    idx = list(sampler)
    assert len(idx) == len(sampler)
    return [idx[i:i + size] for i in range(0, len(idx), size)]


@pytest.mark.parametrize("p,k", [(4, 2), (2, 4), (8, 1)])
def test_every_batch_holds_p_classes_with_k_images_each(p, k):
    labels = _labels([7, 3, 12, 5, 9, 4, 6, 8, 1, 10])  # one class has fewer images than K
    sampler = ClassBalancedSampler(labels, p * k, p, seed=1)
    sampler.set_epoch(0)
    batches = _batches(sampler, p * k)
    assert len(batches) == len(labels) // (p * k) == sampler.batches_per_epoch
    for batch in batches:
        per_class = Counter(labels[i % len(labels)] for i in batch)  # a repeat comes as index + j x n
        assert len(per_class) == p and set(per_class.values()) == {k}, per_class


def test_an_image_served_again_in_an_epoch_comes_as_another_item():
    labels = _labels([2, 9, 3, 6])  # classes of 2 and 3 images, K = 4: repeats inside a batch
    sampler = ClassBalancedSampler(labels, 8, 2, seed=4)
    sampler.set_epoch(1)
    served = list(sampler)
    assert len(set(served)) == len(served)  # the dataset draws other augmentations for each repeat
    n = len(labels)
    rows = Counter(i % n for i in served)
    for row, times in rows.items():  # the j-th serving of a row is row + j x n
        assert {i for i in served if i % n == row} == {row + j * n for j in range(times)}
    assert max(rows.values()) > 1
    sampler.stride = 100  # the dataset is larger than the labelled rows (unlabelled ones follow)
    assert all(i % 100 < n for i in sampler) and max(sampler) >= 100


def test_images_are_served_evenly_within_a_class():
    labels = _labels([8] * 6)
    sampler = ClassBalancedSampler(labels, 12, 3, seed=0)
    seen = Counter()
    for epoch in range(4):
        sampler.set_epoch(epoch)
        seen.update(i % len(labels) for i in sampler)
    counts = [seen[i] for i in range(len(labels))]
    assert max(counts) - min(counts) <= 2, counts  # each class cycles through all its images


def test_ranks_get_whole_disjoint_batches_of_the_global_order():
    labels = _labels([6, 6, 6, 6, 6, 6, 6, 6])
    single = ClassBalancedSampler(labels, 8, 4, seed=3, world=1)
    single.set_epoch(2)
    global_batches = single._global_batches()
    for rank in range(2):
        s = ClassBalancedSampler(labels, 8, 4, seed=3, rank=rank, world=2)
        s.set_epoch(2)
        mine = _batches(s, 8)
        assert len(mine) == s.batches_per_epoch == len(labels) // 16
        assert mine == global_batches[rank::2][: len(mine)]


def test_same_seed_and_epoch_same_batches_and_resume_mid_epoch():
    labels = _labels([5, 9, 4, 7, 6, 3])
    a = ClassBalancedSampler(labels, 6, 3, seed=5)
    b = ClassBalancedSampler(labels, 6, 3, seed=5)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    b.set_epoch(2)
    assert list(a) != list(b)
    b.set_epoch(1, start_batch=2)
    assert list(b) == list(a)[2 * 6:]


def test_rejects_impossible_settings():
    with pytest.raises(ValueError, match="multiple"):
        ClassBalancedSampler(_labels([4, 4, 4]), 10, 3)
    with pytest.raises(ValueError, match="only 3 classes"):
        ClassBalancedSampler(_labels([4, 4, 4]), 8, 4)


def test_epoch_sampler_splits_whole_batches_across_ranks():
    parts = []
    for rank in range(2):
        s = EpochSampler(21, 4, seed=0, rank=rank, world=2)
        s.set_epoch(0)
        parts.append(list(s))
    assert len(parts[0]) == len(parts[1]) == 8 and not set(parts[0]) & set(parts[1])
