"""The neighbour index: exact and IVF-PQ search agree, leave-one-out, save / memory-mapped load, auto."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import finegrain.eval.index as index_module
from finegrain.eval.index import NeighbourIndex, nearest, pq_subquantizers, resolve_kind
from finegrain.eval.knn import knn_scores
from finegrain.eval.retrieval import retrieval_metrics


def clustered(n: int, dim: int = 64, classes: int = 40, seed: int = 0):
    """(n, dim) float32 features around one centre per class (like embeddings), and their (n,) labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    return centres[labels] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32), labels


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of each row of `a` found in the same row of `b` (recall@k of b against a)."""
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


@pytest.fixture(scope="module")
def data():
    feats, labels = clustered(12000)
    queries, query_labels = clustered(300, seed=1)
    return feats, labels, queries, query_labels


def test_ivfpq_finds_the_exact_neighbours_and_their_exact_cosines(data):
    feats, _, queries, _ = data
    exact_sims, exact_idx = nearest(feats, queries, 10, kind="flat")
    index = NeighbourIndex.build(feats, "ivfpq")
    sims, idx = index.search(queries, 10)
    assert index.kind == "ivfpq" and len(index) == len(feats)
    assert overlap(exact_idx, idx) >= 0.9
    assert np.all(np.diff(sims, axis=1) <= 1e-6)  # descending
    # re-ranked on the stored features: the similarity of a found row is its exact cosine
    unit = torch.nn.functional.normalize(torch.from_numpy(feats), dim=1).numpy()
    qunit = torch.nn.functional.normalize(torch.from_numpy(queries), dim=1).numpy()
    np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", qunit, unit[idx]), atol=1e-5)


def test_a_saved_ivfpq_index_reopens_memory_mapped_with_the_same_answers(data, tmp_path):
    feats, _, queries, _ = data
    index = NeighbourIndex.build(feats, "ivfpq")
    index.save(tmp_path / "index")
    reopened = NeighbourIndex.load(tmp_path / "index")
    assert isinstance(reopened.reference, np.memmap) and reopened.reference.dtype == np.float16
    a, b = index.search(queries, 5)[1], reopened.search(queries, 5)[1]
    assert overlap(a, b) >= 0.98  # float16 reference rows may swap near-ties


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_leave_one_out_never_returns_the_query_itself(data, kind):
    feats = data[0][:3000]
    _, idx = nearest(feats, None, 5, kind=kind)
    assert idx.shape == (3000, 5)
    assert not (idx == np.arange(3000)[:, None]).any()


def test_auto_is_exact_up_to_the_threshold_and_ivfpq_above(monkeypatch):
    assert resolve_kind("auto", index_module.FLAT_MAX_ROWS) == "flat"
    assert resolve_kind("auto", index_module.FLAT_MAX_ROWS + 1) == "ivfpq"
    monkeypatch.setattr(index_module, "FLAT_MAX_ROWS", 100)
    assert NeighbourIndex.build(clustered(5000)[0], "auto").kind == "ivfpq"
    with pytest.raises(ValueError, match="index kind"):
        resolve_kind("hnsw", 10)


def test_pq_sub_vectors_divide_the_dimension_with_at_least_8_each():
    for dim in (64, 384, 512, 1280, 2048, 100):
        m = pq_subquantizers(dim)
        assert dim % m == 0 and dim // m >= 8


def test_knn_and_retrieval_through_ivfpq_match_the_exact_scan(data):
    feats, labels, queries, query_labels = data
    ytr = torch.from_numpy(labels)
    exact = knn_scores(torch.from_numpy(feats), ytr, torch.from_numpy(queries), num_classes=40, index="flat")
    approx = knn_scores(torch.from_numpy(feats), ytr, torch.from_numpy(queries), num_classes=40, index="ivfpq")
    agree = (exact.argmax(1) == approx.argmax(1)).float().mean()
    assert agree >= 0.97
    sub, sub_labels = torch.from_numpy(feats[:4000]), torch.from_numpy(labels[:4000])
    flat = retrieval_metrics(sub, sub_labels, index="flat")
    ivfpq = retrieval_metrics(sub, sub_labels, index="ivfpq")
    assert ivfpq["retrieval_queries"] == flat["retrieval_queries"]
    assert abs(ivfpq["recall_at_1"] - flat["recall_at_1"]) <= 0.02
    assert abs(ivfpq["map_at_r"] - flat["map_at_r"]) <= 0.05


def test_flat_searches_go_to_the_gpus_when_faiss_has_them(data, monkeypatch):
    import faiss

    reference, _, queries, _ = data
    moved = []

    class OnGpu:  # stands in for faiss's GPU index: records that it was asked
        def __init__(self, index):
            self.index = index
            moved.append(index)

        def search(self, q, k):
            moved.append(k)
            return self.index.search(q, k)

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", OnGpu)
    monkeypatch.setattr(index_module, "GPU_MAX_K", 5)
    index = NeighbourIndex.build(reference, "flat")
    expected = NeighbourIndex.build(reference, "flat")
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    s_cpu, i_cpu = expected.search(queries, 5)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    s, i = index.search(queries, 5)
    assert moved[0] is index.index and moved[1:] and set(moved[1:]) == {5}  # copied once, searched on the "GPU"
    assert np.array_equal(i, i_cpu) and np.allclose(s, s_cpu)
    calls = len(moved)
    index.search(queries, 6)  # past the GPU's k limit: the CPU index answers
    assert len(moved) == calls
