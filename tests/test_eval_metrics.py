"""Retrieval metrics and the linear probe against independent references and hand-worked cases.

References: pytorch-metric-learning's AccuracyCalculator (precision@1, MAP@R), a plain numpy
brute force (Recall@K), and scikit-learn's StandardScaler + LogisticRegression pipeline.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest
import torch

from finegrain.eval.linear import ABSENT_CLASS_BIAS, LinearProbe, fit_linear_probe, stratified_holdout
from finegrain.eval.retrieval import retrieval_metrics


def _clustered(n: int, classes: int, dim: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    centers = torch.randn(classes, dim, generator=g)
    return centers[labels] + noise * torch.randn(n, dim, generator=g), labels


# ---------------------------------------------------------------------------------------------
# Retrieval: Recall@K, MAP@R
# ---------------------------------------------------------------------------------------------


def _pml(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """pytorch-metric-learning 2.x, leave-one-out on one set, exact cosine kNN (no faiss)."""
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=CustomKNN(CosineSimilarity()),
    )
    return calc.get_accuracy(features, labels, features, labels, ref_includes_query=True)


def _recall_brute_force(features: np.ndarray, labels: np.ndarray, ks) -> tuple[dict[int, float], int]:
    """Plain numpy: for each query with a same-class other item, rank the others by cosine."""
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    hits = {k: 0 for k in ks}
    queries = 0
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i]
        if not any(labels[j] == labels[i] for j in others):
            continue
        queries += 1
        ranked = sorted(others, key=lambda j: -float(x[i] @ x[j]))
        for k in ks:
            hits[k] += any(labels[j] == labels[i] for j in ranked[:k])
    return {k: hits[k] / queries for k in ks}, queries


@pytest.mark.parametrize(
    "n,classes,dim,noise",
    [(6, 2, 3, 1.0), (40, 7, 8, 0.7), (150, 30, 16, 1.0), (300, 17, 16, 0.8), (1000, 100, 32, 1.2)],
)
def test_retrieval_equals_pytorch_metric_learning(n, classes, dim, noise):
    features, labels = _clustered(n, classes, dim, noise, seed=n)
    ours = retrieval_metrics(features, labels, chunk_size=64)
    ref = _pml(features, labels)
    assert ours["recall_at_1"] == pytest.approx(ref["precision_at_1"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)


@pytest.mark.parametrize("n,classes", [(12, 3), (80, 20), (200, 60)])
def test_recall_at_k_equals_brute_force(n, classes):
    features, labels = _clustered(n, classes, 8, 1.0, seed=7 * n)
    ks = (1, 2, 4, 8, 16)
    ours = retrieval_metrics(features, labels, ks=ks)
    expected, queries = _recall_brute_force(features.double().numpy(), labels.numpy(), ks)
    assert ours["retrieval_queries"] == queries
    for k in ks:
        assert ours[f"recall_at_{k}"] == pytest.approx(expected[k], abs=1e-12), k


def test_retrieval_small_case_by_hand():
    # unit vectors at these angles (degrees); labels A, A, B, A, B, C (C is a singleton: excluded).
    # Cosine order = angular distance order. Neighbours of each query, nearest first (distance):
    #   p0 A   0: p1 A 15, p2 B 25, p3 A 45, p4 B 100, p5 C 150   R=2 rel 1,0 -> AP = (1/1)/2      = 1/2
    #   p1 A  15: p2 B 10, p0 A 15, p3 A 30, p4 B 85,  p5 C 165   R=2 rel 0,1 -> AP = (1/2)/2      = 1/4
    #   p2 B  25: p1 A 10, p3 A 20, p0 A 25, p4 B 75,  p5 C 175   R=1 rel 0   -> AP = 0
    #   p3 A  45: p2 B 20, p1 A 30, p0 A 45, p4 B 55,  p5 C 165   R=2 rel 0,1 -> AP = 1/4
    #   p4 B 100: p3 A 55, p2 B 75, p1 A 85, p0 A 100, p5 C 110   R=1 rel 0   -> AP = 0
    # Recall@1: only p0 -> 1/5. Recall@2: all but p2 -> 4/5. Recall@4: all -> 1.
    # MAP@R = (1/2 + 1/4 + 0 + 1/4 + 0) / 5 = 1/5.
    angles = [0, 15, 25, 45, 100, 210]
    x = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles])
    x = x * torch.tensor([1.0, 2.0, 3.0, 0.5, 1.0, 7.0])[:, None]  # norms do not matter
    labels = torch.tensor([0, 0, 1, 0, 1, 2])
    out = retrieval_metrics(x, labels, ks=(1, 2, 4))
    assert out["retrieval_queries"] == 5
    assert out["recall_at_1"] == pytest.approx(1 / 5)
    assert out["recall_at_2"] == pytest.approx(4 / 5)
    assert out["recall_at_4"] == pytest.approx(1.0)
    assert out["map_at_r"] == pytest.approx(1 / 5)
    assert set(out) == {"recall_at_1", "recall_at_2", "recall_at_4", "map_at_r", "retrieval_queries"}


def test_retrieval_chunked_equals_unchunked():
    features, labels = _clustered(97, 11, 12, 1.0, seed=3)
    a = retrieval_metrics(features, labels, chunk_size=3)
    b = retrieval_metrics(features, labels, chunk_size=1024)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-12), key


def test_retrieval_excludes_singleton_classes():
    features, labels = _clustered(60, 6, 8, 1.0, seed=5)
    # three extra items, each the only one of its class, placed on top of existing items
    extra_x = features[:3] + 1e-3
    extra_y = torch.tensor([100, 101, 102])
    with_singletons = retrieval_metrics(torch.cat([features, extra_x]), torch.cat([labels, extra_y]))
    assert with_singletons["retrieval_queries"] == 60
    ref = _pml(torch.cat([features, extra_x]), torch.cat([labels, extra_y]))
    assert with_singletons["recall_at_1"] == pytest.approx(ref["precision_at_1"], abs=1e-6)
    assert with_singletons["map_at_r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)

    none_left = retrieval_metrics(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))
    assert none_left["retrieval_queries"] == 0
    assert math.isnan(none_left["recall_at_1"]) and math.isnan(none_left["map_at_r"])


def test_separated_clusters_score_one():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(8).repeat_interleave(torch.tensor([2, 3, 5, 9, 4, 2, 7, 3]))
    features = torch.eye(8)[labels] * 5 + 0.01 * torch.randn(len(labels), 8, generator=g)
    out = retrieval_metrics(features, labels, ks=(1, 2, 4, 8))
    assert out["retrieval_queries"] == len(labels)
    for key in ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r"):
        assert out[key] == pytest.approx(1.0), key


def test_ties_are_pessimistic_and_order_independent():
    # all features equal: every neighbour ties, so other-class items rank first
    labels = torch.tensor([0, 0, 1, 1, 1])
    out = retrieval_metrics(torch.ones(5, 4), labels, ks=(1, 2, 3, 4))
    # class 0 queries: 3 others of class 1 first, then the 1 same-class item (rank 4); R = 1
    # class 1 queries: 2 others of class 0 first, then 2 same-class items (ranks 3, 4); R = 2
    assert out["recall_at_1"] == 0.0 and out["recall_at_2"] == 0.0
    assert out["recall_at_3"] == pytest.approx(3 / 5)
    assert out["recall_at_4"] == 1.0
    assert out["map_at_r"] == 0.0

    # duplicated points: the metrics do not depend on the order of the items
    features, labels = _clustered(30, 4, 5, 1.0, seed=9)
    features = torch.cat([features, features[:10]])
    labels = torch.cat([labels, (labels[:10] + 1) % 4])
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    a = retrieval_metrics(features, labels, chunk_size=7)
    b = retrieval_metrics(features[perm], labels[perm], chunk_size=5)
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-12), key


def test_retrieval_rejects_bad_arguments():
    with pytest.raises(ValueError):
        retrieval_metrics(torch.randn(4, 3), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError):
        retrieval_metrics(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), ks=(0,))


# ---------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------


def _sklearn_pipeline(x: np.ndarray, y: np.ndarray, C: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = x.astype(np.float64)  # the probe normalises in float64: the same input, so lbfgs takes the same path
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000)).fit(xn, y), xn


def _blobs(n: int, classes: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centers = rng.normal(size=(classes, dim))
    return (centers[y] + noise * rng.normal(size=(n, dim))).astype(np.float32), y


@pytest.mark.parametrize("classes", [2, 5])
@pytest.mark.parametrize("C", [0.1, 1.0])
def test_folded_probe_equals_sklearn_pipeline(classes, C):
    x, y = _blobs(120, classes, 10, 1.5, seed=classes)
    test_x, _ = _blobs(50, classes, 10, 1.5, seed=100 + classes)
    probe = fit_linear_probe(x, y, num_classes=classes, Cs=(C,))
    pipe, _ = _sklearn_pipeline(x, y, C)
    test_xn = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    assert probe.weight.shape == (classes, 10) and probe.weight.dtype == np.float32
    assert probe.bias.shape == (classes,) and probe.bias.dtype == np.float32
    assert probe.C_reg == C and probe.classes == classes and probe.val_top1 is None
    np.testing.assert_allclose(probe.predict_proba(test_x), pipe.predict_proba(test_xn), atol=1e-5)
    np.testing.assert_array_equal(probe.predict(test_x), pipe.predict(test_xn))
    # one nn.Linear on L2-normalised features computes the same scores
    layer = torch.nn.Linear(10, classes)
    layer.weight.data, layer.bias.data = torch.from_numpy(probe.weight), torch.from_numpy(probe.bias)
    t = torch.nn.functional.normalize(torch.from_numpy(test_x), dim=1)
    np.testing.assert_allclose(layer(t).detach().numpy(), probe.scores(test_x), atol=1e-5)


def test_C_is_chosen_on_val():
    # few noisy samples in many dimensions: regularisation matters on the val set
    x, y = _blobs(60, 4, 50, 3.0, seed=1)
    vx, vy = _blobs(200, 4, 50, 3.0, seed=1)  # same centers (same seed), fresh noise below
    rng = np.random.default_rng(2)
    vx = vx + 3.0 * rng.normal(size=vx.shape).astype(np.float32)
    Cs = (0.001, 0.01, 0.1, 1.0, 10.0)
    probe = fit_linear_probe(x, y, num_classes=4, val_x=vx, val_y=vy, Cs=Cs)
    vxn = vx / np.linalg.norm(vx, axis=1, keepdims=True)
    accs = {C: float((_sklearn_pipeline(x, y, C)[0].predict(vxn) == vy).mean()) for C in Cs}
    assert len(set(accs.values())) > 1, accs  # the choice means something
    best = max(accs.values())
    assert probe.C_reg == min(C for C in Cs if accs[C] == best), accs
    assert probe.val_top1 == pytest.approx(best)


def test_separable_clusters_reach_top1_one():
    rng = np.random.default_rng(0)
    classes, dim = 6, 12
    centers = 10 * np.eye(classes, dim)

    def sample(n):
        y = np.arange(n) % classes
        return centers[y] + 0.3 * rng.normal(size=(n, dim)), y

    (x, y), (tx, ty) = sample(60), sample(120)
    probe = fit_linear_probe(x, y, num_classes=classes)
    assert (probe.predict(tx) == ty).mean() == 1.0
    assert probe.val_top1 == 1.0 and probe.C_reg in (0.01, 0.1, 1.0, 10.0)


def test_class_missing_from_train_is_never_predicted():
    x, y = _blobs(100, 5, 8, 1.0, seed=3)
    keep = y != 2
    x, y = x[keep], y[keep]
    vx, vy = _blobs(50, 5, 8, 1.0, seed=3)  # the val set still has class 2
    for kwargs in ({}, {"val_x": vx, "val_y": vy}, {"Cs": (1.0,)}):
        probe = fit_linear_probe(x, y, num_classes=5, **kwargs)
        scores = probe.scores(vx)
        assert scores.shape == (50, 5)
        assert np.isfinite(scores).all()
        assert (probe.predict(vx) != 2).all()
        assert probe.bias[2] == ABSENT_CLASS_BIAS and (probe.weight[2] == 0).all()
        assert probe.predict_proba(vx)[:, 2].max() < 1e-30
        np.testing.assert_allclose(probe.predict_proba(vx).sum(axis=1), 1.0, atol=1e-6)


def test_torch_input_equals_numpy_input():
    x, y = _blobs(80, 4, 6, 1.0, seed=4)
    vx, vy = _blobs(40, 4, 6, 1.0, seed=5)
    a = fit_linear_probe(x, y, num_classes=4, val_x=vx, val_y=vy)
    b = fit_linear_probe(torch.from_numpy(x), torch.from_numpy(y), num_classes=4, val_x=torch.from_numpy(vx), val_y=torch.from_numpy(vy))
    np.testing.assert_allclose(a.weight, b.weight, atol=1e-6)
    np.testing.assert_allclose(a.bias, b.bias, atol=1e-6)
    assert a.C_reg == b.C_reg and a.val_top1 == b.val_top1
    np.testing.assert_allclose(b.scores(torch.from_numpy(vx)), a.scores(vx), atol=1e-6)


def test_holdout_path_without_val():
    x, y = _blobs(150, 5, 20, 2.5, seed=6)
    Cs = (0.01, 0.1, 1.0, 10.0)
    probe = fit_linear_probe(x, y, num_classes=5, Cs=Cs, seed=3)
    assert probe.C_reg in Cs and 0.0 <= probe.val_top1 <= 1.0

    # the hold-out is stratified and comes from train; C maximises its accuracy (ties: smallest)
    fit_idx, held_idx = stratified_holdout(y, 3)
    assert len(np.intersect1d(fit_idx, held_idx)) == 0 and len(fit_idx) + len(held_idx) == 150
    assert np.bincount(y[held_idx]).tolist() == [6] * 5  # round(20% of 30) per class
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    accs = {C: float((_sklearn_pipeline(x[fit_idx], y[fit_idx], C)[0].predict(xn[held_idx]) == y[held_idx]).mean()) for C in Cs}
    best = max(accs.values())
    assert probe.C_reg == min(C for C in Cs if accs[C] == best), accs
    assert probe.val_top1 == pytest.approx(best)

    # then refit on ALL train features with the chosen C
    refit = fit_linear_probe(x, y, num_classes=5, Cs=(probe.C_reg,))
    np.testing.assert_allclose(probe.weight, refit.weight)
    np.testing.assert_allclose(probe.bias, refit.bias)


def test_stratified_holdout_small_classes():
    y = np.array([0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])  # class 0: 1 image, 1: 2 images, 2: 10 images
    fit_idx, held_idx = stratified_holdout(y, 0)
    assert np.bincount(y[held_idx], minlength=3).tolist() == [0, 1, 2]
    assert set(y[fit_idx]) == {0, 1, 2}  # every class keeps an image to fit on
    again = stratified_holdout(y, 0)
    np.testing.assert_array_equal(held_idx, again[1])


def test_too_small_to_hold_out_uses_C_one(caplog):
    x, y = _blobs(4, 4, 5, 1.0, seed=7)  # one image per class
    with caplog.at_level(logging.WARNING, logger="finegrain"):
        probe = fit_linear_probe(x, y, num_classes=4)
    assert probe.C_reg == 1.0 and probe.val_top1 is None
    assert (probe.predict(x) == y).all()
    assert "C=1.0" in caplog.text

    single = fit_linear_probe(x[:1], y[:1], num_classes=4)  # one class: always predicts it
    assert (single.predict(x) == y[0]).all()


def test_no_warnings_and_nonconvergence_is_logged(caplog):
    x, y = _blobs(200, 10, 32, 1.0, seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_linear_probe(x, y, num_classes=10)
        with caplog.at_level(logging.WARNING, logger="finegrain"):
            fit_linear_probe(x, y, num_classes=10, Cs=(100.0,), max_iter=2)
    assert "did not converge" in caplog.text


def test_probe_rejects_bad_labels():
    x, y = _blobs(20, 4, 5, 1.0, seed=9)
    with pytest.raises(ValueError):
        fit_linear_probe(x, y, num_classes=3)
    with pytest.raises(ValueError):
        fit_linear_probe(x, y, num_classes=4, val_x=x)
    assert isinstance(fit_linear_probe(x, y, num_classes=4), LinearProbe)


def test_flip_averaged_features_are_the_mean_over_the_mirror_image():
    from finegrain.features.extract import flip_averaged

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    x = torch.randn(2, 3, 6, 6)
    expected = 0.5 * (net(x) + net(torch.flip(x, dims=[3])))
    torch.testing.assert_close(flip_averaged(net)(x), expected)
    assert not torch.allclose(flip_averaged(net)(x), net(x))
