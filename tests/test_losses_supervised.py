"""Supervised losses (SupCon, batch-hard triplet) against independent references.

References: pytorch-metric-learning (PML), plain-Python loops, small cases worked by hand, and a
2-process gloo run against one process on the global batch.

PML semantics, checked in its source (v2.x) and matched here:

* ``losses.SupConLoss(temperature)`` L2-normalises (``CosineSimilarity``), excludes self from both
  numerator and denominator, gives anchors without a positive a per-anchor loss of exactly 0 (its
  ``pos_mask.sum() + tiny`` denominator) and reduces with ``AvgNonZeroReducer``: the mean over
  anchors with a loss > 0, i.e. over the anchors that have a positive, as long as each of them also
  has a negative (otherwise its loss can be 0 and is dropped there but kept here; and with no
  negative in the whole batch PML returns 0). The default reducer is therefore the right one; the
  test also checks ``MeanReducer`` (mean over all N anchors) times N / (anchors with a positive).
* ``miners.BatchHardMiner()`` returns, for every anchor with both a positive and a negative, the
  farthest positive and the closest negative under ``LpDistance(p=2, normalize_embeddings=True)``;
  ``losses.TripletMarginLoss(margin)`` then averages ``relu(d_ap - d_an + m)`` with
  ``AvgNonZeroReducer`` by default, i.e. over the *violating* triplets only. Ours averages over all
  mined anchors, zeros included (Hermans et al.), which is ``reducer=MeanReducer()``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from finegrain.losses import batch_hard_triplet, supcon, supcon_anchors_without_positive

from conftest import spawn_ranks

TEMPERATURES = [0.07, 0.1, 0.5, 1.0]
MARGINS = [0.0, 0.2, 1.0]
SIZES = [(3, 2), (8, 16), (17, 7), (64, 128)]
PATTERNS = ["two_views", "one_singleton", "mostly_singletons", "few_classes"]


def _labels(pattern: str, n: int, seed: int) -> torch.Tensor:
    """(n,) int64 labels; every pattern has at least two classes (so PML sees a negative)."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "two_views":  # views stacked: rows i and i + n/2 are one image (n rounded down)
        b = n // 2
        classes = torch.randint(0, max(2, b // 2), (b,), generator=g)
        classes[0], classes[-1] = 0, 1
        labels = torch.cat([classes, classes, torch.tensor([99] * (n - 2 * b))])  # odd n: 1 singleton
    elif pattern == "one_singleton":  # row 0's class appears once, the others at least twice
        labels = torch.arange(n) % max(1, (n - 1) // 2) + 1
        labels[0] = 0
        if n == 3:
            labels = torch.tensor([0, 1, 1])
    elif pattern == "mostly_singletons":  # one pair, everything else alone
        labels = torch.arange(n)
        labels[1] = labels[0]
    elif pattern == "few_classes":
        labels = torch.randint(0, 3, (n,), generator=g)
        labels[0], labels[1] = 0, 1
    else:
        raise AssertionError(pattern)
    perm = torch.randperm(n, generator=g)
    return labels[perm].long()


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# SupCon
# ---------------------------------------------------------------------------------------------


def _supcon_loops(z: list[list[float]], labels: list[int], t: float) -> float:
    """Plain-Python SupCon L_out: mean over anchors with a positive; 0.0 when there are none."""
    z = [_unit(v) for v in z]
    terms = []
    for i, a in enumerate(z):
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denom = sum(math.exp(_dot(a, z[j]) / t) for j in range(len(z)) if j != i)
        terms.append(-sum(math.log(math.exp(_dot(a, z[p]) / t) / denom) for p in positives) / len(positives))
    return sum(terms) / len(terms) if terms else 0.0


def _n_with_positive(labels: torch.Tensor) -> int:
    return sum(int((labels == y).sum()) > 1 for y in labels)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("n,dim", SIZES)
def test_supcon_equals_pml_values_and_gradients(n, dim, temperature, pattern):
    from pytorch_metric_learning.losses import SupConLoss
    from pytorch_metric_learning.reducers import MeanReducer

    torch.manual_seed(1000 * n + dim)
    z = torch.randn(n, dim, dtype=torch.float64) * 3
    labels = _labels(pattern, n, seed=n + dim)
    assert 0 < _n_with_positive(labels)
    ours_in, ref_in = z.clone().requires_grad_(), z.clone().requires_grad_()

    ours = supcon(ours_in, labels, temperature)
    ref = SupConLoss(temperature=temperature)(ref_in, labels)  # default AvgNonZeroReducer
    ours.backward()
    ref.backward()
    # ours computes in float32, PML keeps float64
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-5), (ours.item(), ref.item())
    assert torch.allclose(ours_in.grad, ref_in.grad, rtol=1e-4, atol=1e-6)

    # PML's plain mean counts the anchors without a positive as zeros
    mean_all = SupConLoss(temperature=temperature, reducer=MeanReducer())(z, labels)
    rescaled = mean_all * n / _n_with_positive(labels)
    assert torch.allclose(ours.double(), rescaled, rtol=1e-5, atol=1e-5)


def test_supcon_small_case_by_hand():
    # a, b, c of class 0, d alone in class 1 (no positive: left out as an anchor, still a candidate)
    a, b, c, d = [1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]
    t = 0.5
    e = lambda s: math.exp(s / t)  # noqa: E731
    # cosines: a.b=0.6, a.c=0, a.d=-1, b.c=0.8, b.d=-0.6, c.d=0
    den_a = e(0.6) + e(0.0) + e(-1.0)  # every candidate but a itself
    den_b = e(0.6) + e(0.8) + e(-0.6)
    den_c = e(0.0) + e(0.8) + e(0.0)
    l_a = -(math.log(e(0.6) / den_a) + math.log(e(0.0) / den_a)) / 2  # positives b, c
    l_b = -(math.log(e(0.6) / den_b) + math.log(e(0.8) / den_b)) / 2  # positives a, c
    l_c = -(math.log(e(0.0) / den_c) + math.log(e(0.8) / den_c)) / 2  # positives a, b
    expected = (l_a + l_b + l_c) / 3  # ~1.2096

    labels = [0, 0, 0, 1]
    z = torch.tensor([a, b, c, d]) * torch.tensor([[2.0], [5.0], [0.5], [3.0]])  # scale is ignored
    assert supcon(z, torch.tensor(labels), temperature=t).item() == pytest.approx(expected, rel=1e-6)
    assert _supcon_loops([a, b, c, d], labels, t) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("pattern", PATTERNS + ["all_one_class"])
def test_supcon_equals_plain_loops(pattern, temperature):
    torch.manual_seed(3)
    z = torch.randn(9, 6, dtype=torch.float64)
    labels = torch.zeros(9, dtype=torch.long) if pattern == "all_one_class" else _labels(pattern, 9, 4)
    expected = _supcon_loops(z.tolist(), labels.tolist(), temperature)
    assert supcon(z, labels, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_supcon_anchors_without_positive_are_left_out_without_nan():
    torch.manual_seed(5)
    z = torch.randn(6, 8, requires_grad=True)
    labels = torch.tensor([3, 3, 1, 2, 3, 4])  # rows 2, 3, 5 have no positive
    assert supcon_anchors_without_positive(labels) == 3
    loss = supcon(z, labels, 0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert loss.item() == pytest.approx(_supcon_loops(z.tolist(), labels.tolist(), 0.1), rel=1e-5)
    # the lone rows are still negatives of the anchors that have positives: they get gradient
    assert (z.grad[[2, 3, 5]].abs().sum(dim=1) > 0).all()

    for lone in (torch.arange(6), torch.tensor([0])):
        assert supcon_anchors_without_positive(lone) == len(lone)


def test_supcon_scale_and_permutation_invariant():
    torch.manual_seed(6)
    z, labels = torch.randn(10, 12), _labels("few_classes", 10, 6)
    base = supcon(z, labels, 0.1)
    scales = torch.rand(10, 1) * 100 + 0.01  # a different positive scale per row
    assert torch.allclose(supcon(z * scales, labels, 0.1), base, atol=1e-5)
    perm = torch.randperm(10)
    assert torch.allclose(supcon(z[perm], labels[perm], 0.1), base, atol=1e-6)
    # renaming the classes changes nothing; changing which rows share a class does
    assert torch.allclose(supcon(z, labels * 7 + 100, 0.1), base, atol=1e-6)
    assert not torch.allclose(supcon(z, labels.roll(1), 0.1), base, atol=1e-3)


def test_supcon_one_positive_per_anchor_is_nt_xent():
    # with labels = image ids and two views, SupCon's single positive is NT-Xent's positive
    from finegrain.losses import nt_xent

    torch.manual_seed(7)
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    labels = torch.arange(5).repeat(2)
    assert torch.allclose(supcon(torch.cat([z1, z2]), labels, 0.2), nt_xent(z1, z2, 0.2), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_supcon_autocast_and_low_precision_inputs_are_finite(dtype):
    same = torch.ones(8, 32, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])
    with torch.autocast("cpu", dtype=dtype):
        loss = supcon(same, labels, 0.07)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(math.log(7), rel=1e-6)  # all 7 candidates equally likely
    loss.backward()
    assert torch.isfinite(same.grad).all()

    torch.manual_seed(8)
    z = torch.randn(8, 32).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = supcon(z, labels, 0.07)
    assert torch.allclose(low, supcon(z.float(), labels, 0.07), atol=1e-5)
    zero = torch.zeros(8, 32, requires_grad=True)
    loss = supcon(zero, labels, 0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zero.grad).all()


def test_supcon_rejects_bad_input():
    z, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="temperature"):
        supcon(z, labels, 0.0)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        supcon(torch.randn(4), labels, 0.1)
    with pytest.raises(ValueError, match=r"\(N,\)"):
        supcon(z, labels[:3], 0.1)
    with pytest.raises(ValueError, match=r"\(N,\)"):
        supcon(z, labels[None], 0.1)
    with pytest.raises(ValueError, match="integer"):
        supcon(z, labels.float(), 0.1)


# ---------------------------------------------------------------------------------------------
# Batch-hard triplet
# ---------------------------------------------------------------------------------------------


def _triplet_loops(z: list[list[float]], labels: list[int], m: float) -> float:
    """Plain-Python batch-hard triplet loss on unit vectors, Euclidean distance."""
    z = [_unit(v) for v in z]

    def d(a, b):
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))

    terms = []
    for i, a in enumerate(z):
        pos = [d(a, z[p]) for p in range(len(z)) if p != i and labels[p] == labels[i]]
        neg = [d(a, z[j]) for j in range(len(z)) if labels[j] != labels[i]]
        if pos and neg:
            terms.append(max(0.0, max(pos) - min(neg) + m))
    return sum(terms) / len(terms) if terms else 0.0


def _circle(degrees: list[float]) -> list[list[float]]:
    return [[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degrees]


def test_triplet_mines_the_hardest_pairs_by_hand():
    # points on the unit circle; the chord between angles differing by x degrees is 2 sin(x / 2)
    angles, labels = [0.0, 20.0, 70.0, 100.0, 180.0], torch.tensor([0, 0, 0, 1, 1])
    m = 0.2
    chord = lambda x: 2 * math.sin(math.radians(x) / 2)  # noqa: E731
    # anchor  hardest positive (farthest)  hardest negative (closest)  relu(d_ap - d_an + m)
    # 0:      70 (70 deg)                  100 (100 deg)               2 sin 35 - 2 sin 50 + m < 0
    # 20:     70 (50 deg)                  100 (80 deg)                2 sin 25 - 2 sin 40 + m < 0
    # 70:     0 (70 deg)                   100 (30 deg)                2 sin 35 - 2 sin 15 + m = 0.830
    # 100:    180 (80 deg)                 70 (30 deg)                 2 sin 40 - 2 sin 15 + m = 0.968
    # 180:    100 (80 deg)                 70 (110 deg)                2 sin 40 - 2 sin 55 + m < 0
    active = [chord(70) - chord(30) + m, chord(80) - chord(30) + m]
    assert chord(70) - chord(100) + m < 0 and chord(50) - chord(80) + m < 0 and chord(80) - chord(110) + m < 0
    expected = sum(active) / 5  # zeros count: mean over all 5 anchors
    z = torch.tensor(_circle(angles), requires_grad=True)
    loss = batch_hard_triplet(z, labels, m)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert _triplet_loops(_circle(angles), labels.tolist(), m) == pytest.approx(expected, rel=1e-12)

    # the active triplets are (70; 0, 100) and (100; 180, 70): the point at 20 is in none of them
    loss.backward()
    assert torch.equal(z.grad[1], torch.zeros(2))
    assert (z.grad[[0, 2, 3, 4]].abs().sum(dim=1) > 1e-3).all()

    # moving the point at 20 (never the hardest, and inactive as an anchor) changes nothing ...
    for moved in (15.0, 30.0):
        other = torch.tensor(_circle([0.0, moved, 70.0, 100.0, 180.0]))
        assert batch_hard_triplet(other, labels, m).item() == pytest.approx(expected, rel=1e-5)
    # ... but moving a hardest negative (100 -> 110) does: anchor 70's d_an and anchor 100's d_an
    other = torch.tensor(_circle([0.0, 20.0, 70.0, 110.0, 180.0]))
    assert batch_hard_triplet(other, labels, m).item() != pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("pattern", PATTERNS + ["all_one_class"])
def test_triplet_equals_plain_loops(pattern, margin):
    torch.manual_seed(9)
    z = torch.randn(11, 5, dtype=torch.float64) * 4
    labels = torch.zeros(11, dtype=torch.long) if pattern == "all_one_class" else _labels(pattern, 11, 10)
    expected = _triplet_loops(z.tolist(), labels.tolist(), margin)
    assert batch_hard_triplet(z, labels, margin).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("n,dim", SIZES)
def test_triplet_equals_pml_batch_hard_miner_values_and_gradients(n, dim, margin, pattern):
    from pytorch_metric_learning.losses import TripletMarginLoss
    from pytorch_metric_learning.miners import BatchHardMiner
    from pytorch_metric_learning.reducers import MeanReducer

    torch.manual_seed(2000 * n + dim)
    z = torch.randn(n, dim, dtype=torch.float64) * 3
    labels = _labels(pattern, n, seed=n * dim)
    ours_in, ref_in = z.clone().requires_grad_(), z.clone().requires_grad_()

    ours = batch_hard_triplet(ours_in, labels, margin)
    triplets = BatchHardMiner()(ref_in, labels)  # one (a, p, n) per anchor with a positive and negative
    ref = TripletMarginLoss(margin=margin, reducer=MeanReducer())(ref_in, labels, triplets)
    ours.backward()
    ref.backward()
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-5), (ours.item(), ref.item())
    assert torch.allclose(ours_in.grad, ref_in.grad, rtol=1e-4, atol=1e-5)


def test_triplet_identical_and_zero_vectors_have_finite_gradients():
    # duplicates: zero distance to the hardest positive; all identical: d_ap = d_an = 0, loss = m
    torch.manual_seed(11)
    base = torch.randn(3, 8)
    cases = [
        (torch.cat([base, base]), torch.tensor([0, 1, 2, 0, 1, 2])),
        (torch.ones(6, 8), torch.tensor([0, 0, 0, 1, 1, 1])),
        (torch.zeros(6, 8), torch.tensor([0, 0, 0, 1, 1, 1])),
    ]
    for z, labels in cases:
        z = z.clone().requires_grad_()
        loss = batch_hard_triplet(z, labels, 0.2)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    same = torch.ones(6, 8)
    assert batch_hard_triplet(same, torch.tensor([0, 0, 0, 1, 1, 1]), 0.2).item() == pytest.approx(0.2, abs=1e-5)


@pytest.mark.parametrize("loss_fn,labels", [
    (lambda z, y: supcon(z, y, 0.1), torch.arange(6)),  # no anchor has a positive
    (lambda z, y: supcon(z, y, 0.1), torch.tensor([0])),
    (lambda z, y: batch_hard_triplet(z, y, 0.2), torch.zeros(4, dtype=torch.long)),  # no negative
    (lambda z, y: batch_hard_triplet(z, y, 0.2), torch.arange(4)),  # no positive
    (lambda z, y: batch_hard_triplet(z, y, 0.2), torch.tensor([0])),
])
def test_no_valid_anchor_gives_a_zero_that_backpropagates_zeros(loss_fn, labels):
    z = torch.randn(len(labels), 8, requires_grad=True)
    loss = loss_fn(z, labels)
    assert loss.requires_grad and loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_triplet_scale_invariant_and_low_precision():
    torch.manual_seed(12)
    z, labels = torch.randn(10, 12), _labels("few_classes", 10, 12)
    base = batch_hard_triplet(z, labels, 0.5)
    assert base.item() > 0
    assert torch.allclose(batch_hard_triplet(z * (torch.rand(10, 1) * 50 + 0.1), labels, 0.5), base, atol=1e-5)
    for dtype in (torch.bfloat16, torch.float16):
        low = z.to(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = batch_hard_triplet(low, labels, 0.5)
        assert out.dtype == torch.float32
        assert torch.allclose(out, batch_hard_triplet(low.float(), labels, 0.5), atol=1e-6)


def test_triplet_rejects_bad_input():
    z, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="margin"):
        batch_hard_triplet(z, labels, -0.1)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        batch_hard_triplet(z[None], labels, 0.2)
    with pytest.raises(ValueError, match=r"\(N,\)"):
        batch_hard_triplet(z, labels[:2], 0.2)
    with pytest.raises(ValueError, match="integer"):
        batch_hard_triplet(z, labels.bool(), 0.2)


# ---------------------------------------------------------------------------------------------
# two gloo processes against one (see tests/test_dist.py for why grad / W is compared)
# ---------------------------------------------------------------------------------------------

WORLD = 2
N_LOCAL = 6
DIM_IN, DIM = 10, 16
TEMPERATURE, MARGIN = 0.1, 0.3
DEADLINE_S = 120
# rank 0: [0, 0, 1, 2, 5, 3], rank 1: [1, 4, 4, 2, 6, 3]. Classes 1, 2, 3 have their only positive on
# the other rank; 5 and 6 have none anywhere; so each rank has 5 anchors with a positive (and a
# negative), the condition under which the mean of the rank losses is the global loss.
GLOBAL_LABELS = [0, 0, 1, 2, 5, 3, 1, 4, 4, 2, 6, 3]


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * N_LOCAL, DIM, generator=g), torch.tensor(GLOBAL_LABELS)


def _uneven_labels() -> torch.Tensor:
    """Rank 0: six classes of one row each (no anchor with a positive); rank 1: classes 7 and 8."""
    return torch.tensor([100, 101, 102, 103, 104, 105, 7, 7, 7, 8, 8, 8])


def _global_images() -> torch.Tensor:
    return torch.randn(WORLD * N_LOCAL, DIM_IN, generator=torch.Generator().manual_seed(1))


def _model() -> nn.Module:
    torch.manual_seed(2)
    return nn.Linear(DIM_IN, DIM)


def _local(r: int) -> slice:
    return slice(r * N_LOCAL, (r + 1) * N_LOCAL)


LOSS_FNS = {"supcon": lambda z, y, **kw: supcon(z, y, TEMPERATURE, **kw),
            "triplet": lambda z, y, **kw: batch_hard_triplet(z, y, MARGIN, **kw)}


def _compute(rank: int) -> dict[str, object]:
    """One rank's losses and gradients on its half of the global batch (run by spawn_ranks)."""
    z, labels = _global_batch()
    z, labels = z[_local(rank)], labels[_local(rank)]
    res: dict[str, object] = {
        "without_positive": supcon_anchors_without_positive(labels),
        "without_positive_local": supcon_anchors_without_positive(labels, gather=False),
    }
    images = _global_images()[_local(rank)]
    for name, fn in LOSS_FNS.items():
        x = z.clone().requires_grad_()
        loss = fn(x, labels)
        loss.backward()
        res[f"{name}_loss"], res[f"{name}_grad"] = loss.detach(), x.grad
        res[f"{name}_local_only"] = fn(z, labels, gather=False)

        model = nn.parallel.DistributedDataParallel(_model())
        fn(model(images), labels).backward()
        res[f"{name}_ddp_weight_grad"] = model.module.weight.grad

    # rank 0's anchors have no positive, rank 1's all have one: rank 0 takes the early return
    # and must still join the gather's backward, or rank 1 would wait for it forever
    for name, fn in LOSS_FNS.items():
        x = z.clone().requires_grad_()
        loss = fn(x, _uneven_labels()[_local(rank)])
        loss.backward()
        res[f"{name}_uneven_loss"], res[f"{name}_uneven_grad"] = loss.detach(), x.grad
    return res


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(_compute, WORLD, tmp_path_factory.mktemp("dist_supervised"), DEADLINE_S)


@pytest.mark.parametrize("name", list(LOSS_FNS))
def test_gathered_losses_average_to_global_loss_and_gradients(two_ranks, name):
    fn = LOSS_FNS[name]
    z, labels = _global_batch()
    z.requires_grad_()
    expected = fn(z, labels)
    expected.backward()
    per_rank = torch.stack([res[f"{name}_loss"] for res in two_ranks])
    assert torch.allclose(per_rank.mean(), expected, atol=1e-6), (per_rank, expected)
    for r, res in enumerate(two_ranks):
        assert torch.allclose(res[f"{name}_grad"] / WORLD, z.grad[_local(r)], atol=1e-6)
        # without gathering, classes 1-3 lose their positive and the other rank's negatives are gone
        local_only = fn(z.detach()[_local(r)], labels[_local(r)])
        assert torch.allclose(res[f"{name}_local_only"], local_only, atol=1e-6)
        assert not torch.allclose(res[f"{name}_loss"], local_only, atol=1e-4)


@pytest.mark.parametrize("name", list(LOSS_FNS))
def test_ddp_parameter_gradients_equal_single_process(two_ranks, name):
    model = _model()
    LOSS_FNS[name](model(_global_images()), _global_batch()[1]).backward()
    for res in two_ranks:
        assert torch.allclose(res[f"{name}_ddp_weight_grad"], model.weight.grad, atol=1e-6)


def test_anchor_counts_under_two_ranks(two_ranks):
    for res in two_ranks:
        assert res["without_positive"] == 1  # class 5 on rank 0, class 6 on rank 1
        assert res["without_positive_local"] == 4  # locally only one class has two rows


@pytest.mark.parametrize("name", list(LOSS_FNS))
def test_uneven_anchor_counts_documented_caveat(two_ranks, name):
    """Rank 0 has no anchor with a positive, rank 1 six: the run finishes (no deadlock), rank 0's
    loss is 0 and rank 1's is the global loss L. So the mean over ranks is L / 2, not L, and each
    rank's input gradient is dL/dx itself (not W times it): the caveat in the docstrings."""
    fn = LOSS_FNS[name]
    z, _ = _global_batch()
    z.requires_grad_()
    expected = fn(z, _uneven_labels())
    expected.backward()
    assert expected.item() > 0 and two_ranks[0][f"{name}_uneven_loss"].item() == 0.0
    assert torch.allclose(two_ranks[1][f"{name}_uneven_loss"], expected, atol=1e-6)
    for r, res in enumerate(two_ranks):
        assert torch.allclose(res[f"{name}_uneven_grad"], z.grad[_local(r)], atol=1e-6)
    assert two_ranks[0][f"{name}_uneven_grad"].abs().sum() > 0  # rank 0's rows are rank 1's negatives


def test_supcon_ignores_rows_labelled_minus_one():
    # unlabelled rows without a confident pseudo-label: the loss is that of the batch without them
    torch.manual_seed(6)
    z = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, -1, 1, 1, -1, -1, 2])
    kept = labels >= 0
    loss = supcon(z, labels, 0.2)
    loss.backward()
    expected = _supcon_loops(z[kept].tolist(), labels[kept].tolist(), 0.2)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.all(z.grad[~kept] == 0) and torch.any(z.grad[kept] != 0)
    assert supcon(z, torch.full((8,), -1), 0.2).item() == 0.0
