"""Losses against independent references: lightly, plain loops, and small cases worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from finegrain.losses import info_nce, nt_xent, update_queue

TEMPERATURES = [0.07, 0.1, 0.5, 1.0]


# ---------------------------------------------------------------------------------------------
# NT-Xent
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("batch,dim", [(1, 4), (2, 2), (3, 7), (8, 16), (32, 128)])
def test_nt_xent_equals_lightly_values_and_gradients(batch, dim, temperature):
    from lightly.loss import NTXentLoss

    torch.manual_seed(1000 * batch + dim)
    z1 = torch.randn(batch, dim, dtype=torch.float64) * 3
    z2 = torch.randn(batch, dim, dtype=torch.float64)
    ours_in = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
    ref_in = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]

    ours = nt_xent(*ours_in, temperature=temperature)
    ref = NTXentLoss(temperature=temperature)(*ref_in)
    ours.backward()
    ref.backward()

    # ours computes in float32; lightly keeps float64
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-5), (ours.item(), ref.item())
    for a, b in zip(ours_in, ref_in):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_nt_xent_equals_lightly_in_float32():
    from lightly.loss import NTXentLoss

    torch.manual_seed(7)
    z1, z2 = torch.randn(16, 32), torch.randn(16, 32)
    assert torch.allclose(nt_xent(z1, z2, 0.2), NTXentLoss(temperature=0.2)(z1, z2), atol=1e-6)


def _nt_xent_loops(z1: list[list[float]], z2: list[list[float]], t: float) -> float:
    """Plain-Python NT-Xent: views listed as z1 then z2; every view is an anchor."""

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    views = [unit(v) for v in z1] + [unit(v) for v in z2]
    b = len(z1)
    total = 0.0
    for i, a in enumerate(views):
        pos = (i + b) % (2 * b)
        sims = [sum(x * y for x, y in zip(a, v)) / t for v in views]
        denom = sum(math.exp(s) for j, s in enumerate(sims) if j != i)
        total += -math.log(math.exp(sims[pos]) / denom)
    return total / (2 * b)


def test_nt_xent_small_case_by_hand():
    # unit vectors: a1, a2 are the first views, b1, b2 the second views of images 1, 2
    a1, a2, b1, b2 = [1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]
    t = 0.5
    e = lambda s: math.exp(s / t)  # noqa: E731
    # cosines: a1.a2=0, a1.b1=0.6, a1.b2=-1, a2.b1=0.8, a2.b2=0, b1.b2=-0.6
    l_a1 = -math.log(e(0.6) / (e(0.6) + e(0.0) + e(-1.0)))  # positive b1; negatives a2, b2
    l_a2 = -math.log(e(0.0) / (e(0.0) + e(0.0) + e(0.8)))  # positive b2; negatives a1, b1
    l_b1 = -math.log(e(0.6) / (e(0.6) + e(0.8) + e(-0.6)))  # positive a1; negatives a2, b2
    l_b2 = -math.log(e(0.0) / (e(0.0) + e(-1.0) + e(-0.6)))  # positive a2; negatives a1, b1
    expected = (l_a1 + l_a2 + l_b1 + l_b2) / 4

    z1, z2 = torch.tensor([a1, a2]), torch.tensor([b1, b2])
    assert nt_xent(z1, z2, temperature=t).item() == pytest.approx(expected, rel=1e-6)
    assert _nt_xent_loops([a1, a2], [b1, b2], t) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_nt_xent_equals_plain_loops(temperature):
    torch.manual_seed(3)
    z1, z2 = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    expected = _nt_xent_loops(z1.tolist(), z2.tolist(), temperature)
    assert nt_xent(z1, z2, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_nt_xent_scale_invariant_and_symmetric():
    torch.manual_seed(4)
    z1, z2 = torch.randn(6, 10), torch.randn(6, 10)
    base = nt_xent(z1, z2, 0.1)
    scales = torch.rand(6, 1) * 100 + 0.01  # a different positive scale per row
    assert torch.allclose(nt_xent(z1 * scales, z2 * 7.5, 0.1), base, atol=1e-5)
    assert torch.allclose(nt_xent(z2, z1, 0.1), base, atol=1e-6)
    # permuting the images (both views together) changes nothing either
    perm = torch.randperm(6)
    assert torch.allclose(nt_xent(z1[perm], z2[perm], 0.1), base, atol=1e-6)


def test_nt_xent_aligned_orthogonal_beats_random():
    torch.manual_seed(5)
    b, d = 8, 16
    aligned = torch.eye(b, d)  # both views identical, every image orthogonal to the others
    perfect = nt_xent(aligned, aligned.clone(), 0.1)
    random = nt_xent(torch.randn(b, d), torch.randn(b, d), 0.1)
    assert perfect < random
    # with orthogonal negatives the loss is log(1 + (2B - 2) e^{-1/T}), close to 0 for T=0.1
    assert perfect.item() == pytest.approx(math.log(1 + (2 * b - 2) * math.exp(-10.0)), rel=1e-4)


def test_nt_xent_equal_similarities_gives_log_2n_minus_1():
    z = torch.ones(4, 3)
    assert nt_xent(z, z, 0.5).item() == pytest.approx(math.log(2 * 4 - 1), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nt_xent_autocast_and_low_precision_inputs_are_finite(dtype):
    same = torch.ones(8, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        loss = nt_xent(same, same, 0.07)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(same.grad).all()

    # inputs already in low precision: the same loss as float32 on the rounded values
    torch.manual_seed(6)
    z1, z2 = torch.randn(8, 32).to(dtype), torch.randn(8, 32).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = nt_xent(z1, z2, 0.07)
    assert torch.allclose(low, nt_xent(z1.float(), z2.float(), 0.07), atol=1e-5)


def test_nt_xent_zero_vectors_and_batch_of_one_are_finite():
    zero = torch.zeros(4, 8, requires_grad=True)
    loss = nt_xent(zero, zero, 0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zero.grad).all()
    one = torch.randn(1, 8, requires_grad=True)
    loss = nt_xent(one, torch.randn(1, 8), 0.1)  # only the positive is left: nothing to contrast
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(one.grad).all()


def test_nt_xent_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(2, 3), torch.randn(2, 3), 0.0)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        nt_xent(torch.randn(2, 3), torch.randn(3, 3), 0.5)


# ---------------------------------------------------------------------------------------------
# InfoNCE (MoCo v2)
# ---------------------------------------------------------------------------------------------


def _info_nce_loops(q, k, queue, t: float) -> float:
    """Plain-Python MoCo InfoNCE; with no queue the other keys of the batch are the negatives."""

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    q, k = [unit(v) for v in q], [unit(v) for v in k]
    total = 0.0
    for i, qi in enumerate(q):
        pos = math.exp(dot(qi, k[i]) / t)
        if queue:
            negs = [math.exp(dot(qi, unit(n)) / t) for n in queue]
        else:
            negs = [math.exp(dot(qi, kj) / t) for j, kj in enumerate(k) if j != i]
        total += -math.log(pos / (pos + sum(negs)))
    return total / len(q)


def test_info_nce_small_case_by_hand():
    t = 0.2
    q, k = [[1.0, 0.0]], [[0.6, 0.8]]
    queue = [[0.0, 2.0], [-3.0, 0.0]]  # not unit length: normalised inside to (0, 1), (-1, 0)
    expected = -math.log(math.exp(0.6 / t) / (math.exp(0.6 / t) + math.exp(0.0 / t) + math.exp(-1.0 / t)))
    got = info_nce(torch.tensor(q), torch.tensor(k), torch.tensor(queue), t)
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("batch,dim,size", [(1, 3, 4), (4, 8, 0), (4, 8, 5), (16, 32, 64)])
def test_info_nce_equals_plain_loops(batch, dim, size, temperature):
    torch.manual_seed(batch * 100 + size)
    q, k = torch.randn(batch, dim, dtype=torch.float64), torch.randn(batch, dim, dtype=torch.float64)
    queue = torch.randn(size, dim, dtype=torch.float64) * 2
    expected = _info_nce_loops(q.tolist(), k.tolist(), queue.tolist(), temperature)
    assert info_nce(q, k, queue, temperature).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    if size == 0:
        assert info_nce(q, k, None, temperature).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_info_nce_no_gradient_into_keys_or_queue():
    torch.manual_seed(8)
    q = torch.randn(4, 8, requires_grad=True)
    k = torch.randn(4, 8, requires_grad=True)
    queue = torch.randn(10, 8, requires_grad=True)
    info_nce(q, k, queue, 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None
    q.grad = None
    info_nce(q, k, None, 0.2).backward()
    assert q.grad.abs().sum() > 0 and k.grad is None


def test_info_nce_autocast_identical_vectors_finite():
    same = torch.ones(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = info_nce(same, same, same.repeat(3, 1), 0.2)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(math.log(13), rel=1e-6)  # 1 positive + 12 equal negatives
    loss.backward()
    assert torch.isfinite(same.grad).all()


def test_update_queue_wraps_around_and_stores_keys_as_given():
    size, batch, dim = 5, 2, 3
    queue = torch.zeros(size, dim)
    expected = [[0.0] * dim for _ in range(size)]
    ptr = ref_ptr = 0
    for step in range(7):
        keys = torch.arange(batch * dim, dtype=torch.float32).reshape(batch, dim) + 10 * step
        ptr = update_queue(queue, keys, ptr)
        for row in keys.tolist():  # the ring buffer, one key at a time
            expected[ref_ptr] = row
            ref_ptr = (ref_ptr + 1) % size
        assert isinstance(ptr, int) and ptr == ref_ptr
        assert queue.tolist() == expected  # as given: not normalised
    assert ptr == (7 * batch) % size


def test_update_queue_more_keys_than_slots_keeps_newest():
    queue = torch.zeros(5, 1)
    keys = torch.arange(7, dtype=torch.float32).reshape(7, 1)
    ptr = update_queue(queue, keys, 3)
    expected = [0.0] * 5
    p = 3
    for v in range(7):
        expected[p] = float(v)
        p = (p + 1) % 5
    assert ptr == p == 0 and queue.flatten().tolist() == expected


def test_update_queue_casts_and_detaches():
    queue = torch.zeros(4, 2, dtype=torch.float16)
    keys = torch.randn(2, 2, requires_grad=True)
    assert update_queue(queue, keys, 3) == 1
    assert not queue.requires_grad
    assert torch.equal(queue[[3, 0]], keys.detach().half())
    with pytest.raises(ValueError, match="ptr"):
        update_queue(queue, keys, 4)


