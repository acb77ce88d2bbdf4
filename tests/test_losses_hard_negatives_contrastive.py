"""Hard-negative re-weighting for NT-Xent / InfoNCE, and the pairwise contrastive loss.

References used here, none of them the implementation under test:

* Hard negatives (Robinson et al. 2021, beta re-weighting only): float64 loops over anchors and
  negatives that write the weighted denominator out directly,
  ``exp(s_pos/T) + sum_j w_ij exp(s_ij/T)`` with ``w_ij = M exp(beta s_ij) / sum_k exp(beta s_ik)``
  (weights taken as plain Python floats, i.e. without gradient), and small cases worked by hand.
* Contrastive: pytorch-metric-learning 2.9's ``ContrastiveLoss(pos_margin, neg_margin)`` with its
  defaults (``LpDistance``: Euclidean distance of L2-normalised rows, not squared;
  ``AvgNonZeroReducer`` applied separately to the positive-pair and the negative-pair terms over the
  *ordered* pairs, the two results summed, 0 for a side without non-zero terms), float64 loops,
  and a 3-point case by hand.
* A 2-process gloo run against one process on the global batch, for the gathering.
"""

from __future__ import annotations

import math

import pytest
import torch

from finegrain.losses import contrastive, info_nce, nt_xent
from finegrain.losses.nt_xent import hard_negative_log_weights

from conftest import spawn_ranks

BETAS = [0.5, 1.0, 3.0]
TEMPERATURES = [0.1, 0.5]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def _weighted_nce_term(anchor, positive, negatives, t: float, beta: float) -> torch.Tensor:
    """-log( e^{s_p/T} / (e^{s_p/T} + sum_j w_j e^{s_j/T}) ) for one anchor, written out with loops.

    The weights are Python floats computed from the similarities, so they carry no gradient.
    """
    s_pos = torch.dot(anchor, positive)
    sims = [torch.dot(anchor, n) for n in negatives]
    m = len(sims)
    expo = [math.exp(beta * float(s.detach())) for s in sims]
    weights = [m * e / sum(expo) for e in expo]
    denom = torch.exp(s_pos / t)
    for w, s in zip(weights, sims):
        denom = denom + w * torch.exp(s / t)
    return -(s_pos / t - torch.log(denom))


def _hn_nt_xent_loops(z1: torch.Tensor, z2: torch.Tensor, t: float, beta: float) -> torch.Tensor:
    """NT-Xent with hard-negative weights, float64, one anchor and one negative at a time."""
    views = [_unit(v) for v in torch.cat([z1, z2]).double()]
    b = z1.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i, anchor in enumerate(views):
        pos = (i + b) % (2 * b)
        negatives = [v for j, v in enumerate(views) if j not in (i, pos)]
        total = total + _weighted_nce_term(anchor, views[pos], negatives, t, beta)
    return total / (2 * b)


def _hn_info_nce_loops(q, k, queue, t: float, beta: float) -> torch.Tensor:
    """InfoNCE with hard-negative weights, float64; with no queue the other keys are the negatives."""
    qs = [_unit(v) for v in q.double()]
    ks = [_unit(v) for v in k.detach().double()]
    qu = [] if queue is None else [_unit(v) for v in queue.detach().double()]
    total = torch.zeros((), dtype=torch.float64)
    for i, qi in enumerate(qs):
        negatives = qu if qu else [kj for j, kj in enumerate(ks) if j != i]
        total = total + _weighted_nce_term(qi, ks[i], negatives, t, beta)
    return total / len(qs)


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [x.clone().requires_grad_() for x in tensors]


# ---------------------------------------------------------------------------------------------
# beta = 0 is the plain loss, bit for bit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_nt_xent_beta_zero_is_bit_identical(batch):
    torch.manual_seed(batch)
    z1, z2 = torch.randn(batch, 16), torch.randn(batch, 16)
    plain_in, zero_in = _leaves(z1, z2), _leaves(z1, z2)
    plain = nt_xent(*plain_in, temperature=0.2)
    zero = nt_xent(*zero_in, temperature=0.2, hard_negative_beta=0.0)
    plain.backward()
    zero.backward()
    assert torch.equal(plain, zero)
    for a, b in zip(plain_in, zero_in):
        assert torch.equal(a.grad, b.grad)
    assert not torch.equal(nt_xent(z1, z2, 0.2, hard_negative_beta=1.0), plain) or batch == 1


@pytest.mark.parametrize("queue_size", [None, 0, 7])
def test_info_nce_beta_zero_is_bit_identical(queue_size):
    torch.manual_seed(11)
    q, k = torch.randn(5, 8), torch.randn(5, 8)
    queue = None if queue_size is None else torch.randn(queue_size, 8)
    plain_in, zero_in = _leaves(q)[0], _leaves(q)[0]
    plain = info_nce(plain_in, k, queue, 0.2)
    zero = info_nce(zero_in, k, queue, 0.2, hard_negative_beta=0.0)
    plain.backward()
    zero.backward()
    assert torch.equal(plain, zero) and torch.equal(plain_in.grad, zero_in.grad)
    assert not torch.equal(info_nce(q, k, queue, 0.2, hard_negative_beta=1.0), plain)


# ---------------------------------------------------------------------------------------------
# beta > 0 against the weighted formula written out
# ---------------------------------------------------------------------------------------------


def test_nt_xent_hard_negatives_small_case_by_hand():
    # the 2-image case of tests/test_losses.py: a1, a2 first views, b1, b2 second views (unit vectors)
    a1, a2, b1, b2 = [1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]
    t, beta = 0.5, 2.0
    e = lambda s: math.exp(s / t)  # noqa: E731

    def term(s_pos: float, s_negs: list[float]) -> float:
        w = [2 * math.exp(beta * s) / sum(math.exp(beta * x) for x in s_negs) for s in s_negs]  # M = 2
        return -math.log(e(s_pos) / (e(s_pos) + sum(wj * e(s) for wj, s in zip(w, s_negs))))

    # cosines: a1.a2=0, a1.b1=0.6, a1.b2=-1, a2.b1=0.8, a2.b2=0, b1.b2=-0.6
    expected = (term(0.6, [0.0, -1.0]) + term(0.0, [0.0, 0.8]) + term(0.6, [0.8, -0.6]) + term(0.0, [-1.0, -0.6])) / 4
    # a1's negatives a2 (s=0) and b2 (s=-1): weights 2/(1+e^-2) and 2e^-2/(1+e^-2), written out once more
    w_a2, w_b2 = 2 / (1 + math.exp(-2.0)), 2 * math.exp(-2.0) / (1 + math.exp(-2.0))
    assert term(0.6, [0.0, -1.0]) == pytest.approx(-math.log(e(0.6) / (e(0.6) + w_a2 * e(0.0) + w_b2 * e(-1.0))))

    got = nt_xent(torch.tensor([a1, a2]), torch.tensor([b1, b2]), temperature=t, hard_negative_beta=beta)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    f64 = dict(dtype=torch.float64)
    loops = _hn_nt_xent_loops(torch.tensor([a1, a2], **f64), torch.tensor([b1, b2], **f64), t, beta)
    assert loops.item() == pytest.approx(expected, rel=1e-12)
    assert expected > nt_xent(torch.tensor([a1, a2]), torch.tensor([b1, b2]), temperature=t).item()


def test_info_nce_hard_negatives_small_case_by_hand():
    q, k = [[1.0, 0.0]], [[0.8, 0.6]]
    queue = [[0.0, 2.0], [-3.0, 0.0], [0.6, -0.8]]  # normalised inside to (0, 1), (-1, 0), (0.6, -0.8)
    t, beta = 0.2, 1.5
    s_pos, s_negs = 0.8, [0.0, -1.0, 0.6]
    w = [3 * math.exp(beta * s) / sum(math.exp(beta * x) for x in s_negs) for s in s_negs]
    weighted = sum(wj * math.exp(s / t) for wj, s in zip(w, s_negs))
    expected = -math.log(math.exp(s_pos / t) / (math.exp(s_pos / t) + weighted))
    got = info_nce(torch.tensor(q), torch.tensor(k), torch.tensor(queue), t, hard_negative_beta=beta)
    assert got.item() == pytest.approx(expected, rel=1e-6)

    # empty queue, B = 2: query 0's only negative is key 1, so its weight is 1 whatever beta is
    q2, k2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    plain = info_nce(q2, k2, None, t)
    assert info_nce(q2, k2, None, t, hard_negative_beta=5.0).item() == pytest.approx(plain.item(), rel=1e-6)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("batch,dim", [(2, 3), (5, 8), (9, 4)])
def test_nt_xent_hard_negatives_equal_loops_values_and_gradients(batch, dim, temperature, beta):
    torch.manual_seed(100 * batch + dim)
    z1, z2 = torch.randn(batch, dim, dtype=torch.float64) * 2, torch.randn(batch, dim, dtype=torch.float64)
    ours_in, ref_in = _leaves(z1, z2), _leaves(z1, z2)
    ours = nt_xent(*ours_in, temperature=temperature, hard_negative_beta=beta)
    ref = _hn_nt_xent_loops(*ref_in, temperature, beta)
    ours.backward()
    ref.backward()  # the weights are constants in the loops, so this also checks they are detached
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-6), (ours.item(), ref.item())
    for a, b in zip(ours_in, ref_in):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("batch,size", [(1, 4), (4, 0), (4, 6), (6, None), (7, 13)])
def test_info_nce_hard_negatives_equal_loops_values_and_gradients(batch, size, temperature, beta):
    torch.manual_seed(100 * batch + (size or 0))
    q, k = torch.randn(batch, 5, dtype=torch.float64), torch.randn(batch, 5, dtype=torch.float64)
    queue = None if size is None else torch.randn(size, 5, dtype=torch.float64) * 3
    ours_in, ref_in = _leaves(q)[0], _leaves(q)[0]
    ours = info_nce(ours_in, k, queue, temperature, hard_negative_beta=beta)
    ref = _hn_info_nce_loops(ref_in, k, queue if size else None, temperature, beta)
    ours.backward()
    ref.backward()
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-6), (ours.item(), ref.item())
    assert torch.allclose(ours_in.grad, ref_in.grad, rtol=1e-4, atol=1e-6)


def test_hard_negative_weights_detached_changes_the_gradient():
    """Backpropagating through the weights (as Robinson et al.'s reference code does) gives another
    gradient: so the loops comparison above does tell detached weights from attached ones."""
    torch.manual_seed(21)
    z1, z2 = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    ours_in = _leaves(z1, z2)
    nt_xent(*ours_in, temperature=0.5, hard_negative_beta=2.0).backward()

    attached_in = _leaves(z1, z2)
    views = torch.nn.functional.normalize(torch.cat(attached_in), dim=1)
    sim = views @ views.T
    b = 4
    pos = (torch.arange(2 * b) + b) % (2 * b)
    neg = ~torch.eye(2 * b, dtype=torch.bool)
    neg[torch.arange(2 * b), pos] = False
    w = torch.exp(2.0 * sim) * neg
    w = w / w.sum(dim=1, keepdim=True) * neg.sum(dim=1, keepdim=True)
    e_pos = torch.exp(sim[torch.arange(2 * b), pos] / 0.5)
    (-torch.log(e_pos / (e_pos + (w * torch.exp(sim / 0.5)).sum(dim=1)))).mean().backward()
    assert not torch.allclose(ours_in[0].grad, attached_in[0].grad, atol=1e-4)


def test_hard_negative_log_weights_properties():
    sim = torch.tensor([[0.9, 0.5, -0.2, 0.1], [0.3, 0.3, 0.3, 0.3], [0.2, -0.1, 0.0, 0.4]])
    negatives = torch.tensor([[False, True, True, True], [True, False, True, True], [False, False, False, False]])
    log_w = hard_negative_log_weights(sim, negatives, 2.0)
    w = log_w.exp()
    assert not log_w.requires_grad
    assert torch.equal(log_w[~negatives], torch.zeros(int((~negatives).sum())))  # weight 1 off the negatives
    assert torch.allclose(w[0, 1:].mean(), torch.tensor(1.0)) and torch.allclose(w[1, [0, 2, 3]], torch.ones(3))
    assert w[0, 1] > w[0, 3] > w[0, 2]  # the more similar, the heavier
    # by hand: row 0's negatives have s = 0.5, -0.2, 0.1 and M = 3
    z = sum(math.exp(2.0 * s) for s in (0.5, -0.2, 0.1))
    assert w[0, 1].item() == pytest.approx(3 * math.exp(1.0) / z, rel=1e-6)
    assert torch.isfinite(log_w).all()  # row 2 has no negative at all


@pytest.mark.parametrize("loss", ["nt_xent", "info_nce_queue", "info_nce_batch"])
def test_loss_grows_with_beta_when_negatives_differ(loss):
    torch.manual_seed(31)
    a, b, queue = torch.randn(6, 8), torch.randn(6, 8), torch.randn(10, 8)
    fns = {
        "nt_xent": lambda beta: nt_xent(a, b, 0.3, hard_negative_beta=beta),
        "info_nce_queue": lambda beta: info_nce(a, b, queue, 0.3, hard_negative_beta=beta),
        "info_nce_batch": lambda beta: info_nce(a, b, None, 0.3, hard_negative_beta=beta),
    }
    values = [fns[loss](beta).item() for beta in [0.0, 0.25, 1.0, 3.0, 10.0, 50.0]]
    assert all(x < y for x, y in zip(values, values[1:])), values


def test_large_beta_puts_all_weight_on_the_hardest_negative():
    # as beta grows, sum_j w_j e^{s_j/T} -> M e^{max_j s_j / T}
    torch.manual_seed(41)
    q, k, queue = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4)
    t = 0.5
    qn, kn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
    s = qn @ torch.nn.functional.normalize(queue.double(), dim=1).T
    s_pos = (qn * kn).sum(dim=1)
    limit = -torch.log(torch.exp(s_pos / t) / (torch.exp(s_pos / t) + 5 * torch.exp(s.max(dim=1).values / t)))
    assert info_nce(q, k, queue, t, hard_negative_beta=2000.0).item() == pytest.approx(limit.mean().item(), rel=1e-4)


def test_equal_similarities_give_log_of_candidates_whatever_beta():
    z = torch.ones(4, 3)
    for beta in [0.0, 1.0, 10.0]:
        assert nt_xent(z, z, 0.5, hard_negative_beta=beta).item() == pytest.approx(math.log(7), rel=1e-6)
        assert info_nce(z, z, torch.ones(6, 3), 0.2, hard_negative_beta=beta).item() == pytest.approx(math.log(7))


@pytest.mark.parametrize("bad", [-0.1, -1.0, float("nan"), float("inf")])
def test_bad_beta_raises(bad):
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match="hard_negative_beta"):
        nt_xent(z, z, 0.5, hard_negative_beta=bad)
    with pytest.raises(ValueError, match="hard_negative_beta"):
        info_nce(z, z, None, 0.2, hard_negative_beta=bad)
    with pytest.raises(ValueError, match="hard_negative_beta"):
        info_nce(z, z, torch.randn(5, 4), 0.2, hard_negative_beta=bad)


def test_hard_negatives_finite_for_degenerate_and_low_precision_inputs():
    same = torch.ones(8, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nt_xent(same, same, 0.07, hard_negative_beta=5.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(same.grad).all()

    zero = torch.zeros(4, 8, requires_grad=True)
    loss = nt_xent(zero, zero, 0.1, hard_negative_beta=5.0) + info_nce(zero, zero, None, 0.1, hard_negative_beta=5.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zero.grad).all()

    one = torch.randn(1, 8, requires_grad=True)  # no negative at all: nothing to weigh, loss 0
    loss = nt_xent(one, torch.randn(1, 8), 0.1, hard_negative_beta=2.0) + info_nce(one, one, None, 0.1, 2.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(one.grad).all()

    k, queue = torch.randn(4, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    q = torch.randn(4, 8, requires_grad=True)
    info_nce(q, k, queue, 0.2, hard_negative_beta=1.0).backward()
    assert k.grad is None and queue.grad is None and q.grad is not None


# ---------------------------------------------------------------------------------------------
# contrastive
# ---------------------------------------------------------------------------------------------


def _contrastive_loops(z, labels, pos_margin: float, neg_margin: float, anchors=None) -> torch.Tensor:
    """Float64 loops over ordered pairs (i, j), i among ``anchors`` (default all rows), j != i."""
    rows = [_unit(v) for v in z.double()]
    labels = [int(y) for y in labels]
    pos_terms, neg_terms = [], []
    for i in range(len(rows)) if anchors is None else anchors:
        for j in range(len(rows)):
            if j == i:
                continue
            d = (rows[i] - rows[j]).norm()
            if labels[i] == labels[j]:
                pos_terms.append(torch.relu(d - pos_margin))
            else:
                neg_terms.append(torch.relu(neg_margin - d))
    total = z.sum() * 0.0
    for terms in (pos_terms, neg_terms):
        nonzero = [x for x in terms if x.item() > 0]
        if nonzero:
            total = total + sum(nonzero) / len(nonzero)
    return total


def _contrastive_labels(pattern: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if pattern == "few_classes":
        labels = torch.randint(0, 3, (n,), generator=g)
    elif pattern == "singletons":  # one pair, everything else seen once
        labels = torch.arange(n)
        labels[1] = labels[0]
    elif pattern == "one_singleton":  # class 0 seen once, the rest in twos
        labels = torch.arange(n) // 2 + 1
        labels[0] = 0
    elif pattern == "all_same":
        labels = torch.full((n,), 4)
    elif pattern == "all_different":
        labels = torch.arange(n) * 3
    else:
        raise AssertionError(pattern)
    return labels[torch.randperm(n, generator=g)].long()


MARGINS = [(0.0, 0.5), (0.2, 1.0), (0.0, 1.5)]


@pytest.mark.parametrize("margins", MARGINS)
@pytest.mark.parametrize("pattern", ["few_classes", "singletons", "one_singleton", "all_same", "all_different"])
@pytest.mark.parametrize("n,dim,seed", [(3, 2, 0), (8, 3, 1), (12, 16, 2), (17, 7, 3), (30, 5, 4)])
def test_contrastive_equals_pml_values_and_gradients(n, dim, seed, pattern, margins):
    from pytorch_metric_learning.losses import ContrastiveLoss

    pos_margin, neg_margin = margins
    torch.manual_seed(seed)
    z = torch.randn(n, dim, dtype=torch.float64) * 3
    labels = _contrastive_labels(pattern, n, seed)
    ours_in, ref_in, loop_in = _leaves(z, z, z)

    ours = contrastive(ours_in, labels, pos_margin, neg_margin)
    ref = ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin)(ref_in, labels)
    loops = _contrastive_loops(loop_in, labels, pos_margin, neg_margin)
    ours.backward()
    ref.backward()
    loops.backward()
    assert ours.dtype == torch.float32
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-6), (ours.item(), ref.item())
    assert torch.allclose(loops, ref, rtol=1e-7, atol=1e-10)
    assert torch.allclose(ours_in.grad, ref_in.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(loop_in.grad, ref_in.grad, rtol=1e-6, atol=1e-9)


def test_contrastive_is_pml_at_margins_0_and_0_5():
    from pytorch_metric_learning.losses import ContrastiveLoss

    torch.manual_seed(5)
    z, labels = torch.randn(10, 2, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    ref = ContrastiveLoss(pos_margin=0.0, neg_margin=0.5)(z, labels)
    assert contrastive(z, labels, 0.0, 0.5).item() == pytest.approx(ref.item(), rel=1e-5)
    assert ref.item() != pytest.approx(ContrastiveLoss()(z, labels).item())  # PML's own default is 1


def test_contrastive_three_points_by_hand():
    # unit vectors a, b of class 0 and c of class 1 (given at other scales: normalised inside)
    a, b, c = [1.0, 0.0], [0.8, 0.6], [0.96, -0.28]
    # |a-b|^2 = 0.04 + 0.36 = 0.4;  |a-c|^2 = 0.0016 + 0.0784 = 0.08;  |b-c|^2 = 0.0256 + 0.7744 = 0.8
    d_ab, d_ac, d_bc = math.sqrt(0.4), math.sqrt(0.08), math.sqrt(0.8)
    z = torch.tensor([[2 * x for x in a], [3 * x for x in b], c])
    labels = torch.tensor([0, 0, 1])
    # positive ordered pairs (a,b), (b,a): terms d_ab, d_ab -> mean d_ab.
    # negative ordered pairs (a,c), (c,a), (b,c), (c,b): 0.5 - d_ac twice, relu(0.5 - d_bc) = 0 twice;
    # the average over the non-zero terms is 0.5 - d_ac (a plain mean would halve it)
    assert contrastive(z, labels, 0.0, 0.5).item() == pytest.approx(d_ab + 0.5 - d_ac, rel=1e-6)
    # pos_margin 0.7 > d_ab: the positive side has no non-zero term and contributes 0
    assert contrastive(z, labels, 0.7, 0.5).item() == pytest.approx(0.5 - d_ac, rel=1e-6)
    # neg_margin 1.0 > d_bc: now all four negative terms are non-zero
    expected = d_ab + (2 * (1.0 - d_ac) + 2 * (1.0 - d_bc)) / 4
    assert contrastive(z, labels, 0.0, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_identical_embeddings_have_finite_gradients():
    from pytorch_metric_learning.losses import ContrastiveLoss

    same = torch.ones(6, 5, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = contrastive(same, labels, 0.0, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(same.grad).all()
    # every negative pair is at distance 0 (< 0.5): 0.5; positives at distance ~0 add ~1e-6
    assert loss.item() == pytest.approx(ContrastiveLoss(pos_margin=0.0, neg_margin=0.5)(same, labels).item(), abs=1e-5)

    torch.manual_seed(6)
    z = torch.randn(4, 3)
    dup = torch.cat([z, z[:2]]).requires_grad_()  # rows 4, 5 duplicate rows 0, 1 (same and other class)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = contrastive(dup, torch.tensor([0, 1, 0, 1, 0, 0]), 0.0, 0.5)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(dup.grad).all()

    zero = torch.zeros(4, 3, requires_grad=True)
    loss = contrastive(zero, torch.tensor([0, 0, 1, 1]), 0.0, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zero.grad).all()


def test_contrastive_margins_satisfied_gives_zero_with_gradient():
    from pytorch_metric_learning.losses import ContrastiveLoss

    # classes on orthogonal axes (distance sqrt 2 > 0.5), positives within 0.3 of each other
    z = torch.tensor([[1.0, 0.05, 0.0], [1.0, -0.05, 0.0], [0.0, 1.0, 0.1], [0.0, 1.0, -0.1], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    for pos_margin, x in [(0.3, z.clone().requires_grad_()), (0.0, torch.eye(4, requires_grad=True))]:
        y = labels if pos_margin > 0 else torch.arange(4)  # eye: all classes different, no positive pair
        loss = contrastive(x, y, pos_margin, 0.5)
        assert loss.item() == 0.0 and loss.requires_grad
        assert ContrastiveLoss(pos_margin=pos_margin, neg_margin=0.5)(x.detach(), y).item() == 0.0
        loss.backward()
        assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))
    # moving one positive away breaks the margin: no longer 0
    far = z.clone()
    far[1] = torch.tensor([0.7, -0.7, 0.0])
    assert contrastive(far, labels, 0.3, 0.5).item() > 0


def test_contrastive_single_row_and_no_pairs():
    x = torch.randn(1, 4, requires_grad=True)
    loss = contrastive(x, torch.tensor([3]), 0.0, 0.5)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_contrastive_scale_and_permutation_invariant():
    torch.manual_seed(7)
    z, labels = torch.randn(12, 4), torch.randint(0, 3, (12,))
    base = contrastive(z, labels, 0.0, 0.5)
    assert torch.allclose(contrastive(z * (torch.rand(12, 1) * 50 + 0.1), labels, 0.0, 0.5), base, atol=1e-5)
    perm = torch.randperm(12)
    assert torch.allclose(contrastive(z[perm], labels[perm], 0.0, 0.5), base, atol=1e-6)


def test_contrastive_rejects_bad_input_and_is_registered():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="pos_margin"):
        contrastive(z, torch.tensor([0, 0, 1, 1]), pos_margin=-0.1, neg_margin=0.5)
    with pytest.raises(ValueError, match="neg_margin"):
        contrastive(z, torch.tensor([0, 0, 1, 1]), pos_margin=0.0, neg_margin=float("nan"))
    with pytest.raises(ValueError, match="labels"):
        contrastive(z, torch.tensor([0.0, 0.0, 1.0, 1.0]), 0.0, 0.5)
    with pytest.raises(ValueError, match="labels"):
        contrastive(z, torch.tensor([0, 1]), 0.0, 0.5)


# ---------------------------------------------------------------------------------------------
# two gloo processes against one
# ---------------------------------------------------------------------------------------------

WORLD = 2
N_LOCAL = 5
DIM = 3
T, BETA = 0.5, 2.0
DEADLINE_S = 120
# rank 0: [0, 0, 1, 2, 7], rank 1: [1, 2, 3, 3, 8]: classes 1 and 2 have their positive on the other rank
GLOBAL_LABELS = [0, 0, 1, 2, 7, 1, 2, 3, 3, 8]


def _global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(WORLD * N_LOCAL, DIM, generator=g) for _ in range(3))


def _local(r: int) -> slice:
    return slice(r * N_LOCAL, (r + 1) * N_LOCAL)


def _compute(rank: int) -> dict[str, torch.Tensor]:
    """One rank's losses and gradients on its half of the global batch (run by spawn_ranks)."""
    z1, z2, z = (x[_local(rank)].clone().requires_grad_() for x in _global_batch())
    labels = torch.tensor(GLOBAL_LABELS)[_local(rank)]
    res: dict[str, torch.Tensor] = {}
    loss = nt_xent(z1, z2, T, hard_negative_beta=BETA)
    loss.backward()
    res["nt_xent_loss"], res["nt_xent_grad1"], res["nt_xent_grad2"] = loss.detach(), z1.grad, z2.grad
    loss = contrastive(z, labels, 0.0, 1.0)
    loss.backward()
    res["contrastive_loss"], res["contrastive_grad"] = loss.detach(), z.grad
    res["contrastive_local_only"] = contrastive(z.detach(), labels, 0.0, 1.0, gather=False)
    return res


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(_compute, WORLD, tmp_path_factory.mktemp("dist_issue10"), DEADLINE_S)


def test_gathered_hard_negative_nt_xent_is_the_global_loss(two_ranks):
    z1, z2, _ = (x.double().requires_grad_() for x in _global_batch())
    expected = _hn_nt_xent_loops(z1, z2, T, BETA)
    expected.backward()
    per_rank = torch.stack([res["nt_xent_loss"] for res in two_ranks]).double()
    assert torch.allclose(per_rank.mean(), expected, atol=1e-6), (per_rank, expected)
    for r, res in enumerate(two_ranks):  # x_r.grad = W * dL_global/dx_r (see tests/test_dist.py)
        assert torch.allclose(res["nt_xent_grad1"].double() / WORLD, z1.grad[_local(r)], atol=1e-6)
        assert torch.allclose(res["nt_xent_grad2"].double() / WORLD, z2.grad[_local(r)], atol=1e-6)


def test_gathered_contrastive_uses_every_ranks_rows(two_ranks):
    _, _, z = _global_batch()
    z = z.double().requires_grad_()
    labels = torch.tensor(GLOBAL_LABELS)
    # rank r: its own rows as anchors, every row of the global batch as candidates
    per_rank = [_contrastive_loops(z, labels, 0.0, 1.0, anchors=range(r * N_LOCAL, (r + 1) * N_LOCAL))
                for r in range(WORLD)]
    sum(per_rank).backward()  # backward of the gather sums every rank's gradient for a row
    for r, res in enumerate(two_ranks):
        assert torch.allclose(res["contrastive_loss"].double(), per_rank[r], atol=1e-6)
        assert torch.allclose(res["contrastive_grad"].double(), z.grad[_local(r)], atol=1e-6)
        local_only = _contrastive_loops(z.detach()[_local(r)], labels[_local(r)], 0.0, 1.0)
        assert torch.allclose(res["contrastive_local_only"].double(), local_only, atol=1e-6)
        assert not torch.allclose(res["contrastive_loss"].double(), local_only, atol=1e-4)
