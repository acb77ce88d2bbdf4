"""Nearest neighbours of embeddings on cosine similarity: the one place that searches them.

Two kinds of faiss index over L2-normalised features:
- flat: exact inner product (`IndexFlatIP`); memory N x D x 4 bytes.
- ivfpq: an inverted file over product-quantised codes (`IVF{nlist},PQ{m}`), trained on a sample,
  whose candidates are re-ranked by exact cosine on the reference features (a float16 memory map on
  disk when the index is saved or built from one): memory is the codes (m bytes a row) and the lists.
`auto` is flat up to FLAT_MAX_ROWS reference rows and ivfpq above. With a GPU build of faiss (faiss-gpu) and a
visible GPU, flat searches run on the GPUs; ivfpq stays on the CPU.
"""

from __future__ import annotations

import json
import math
import mmap
from pathlib import Path

import numpy as np
import torch

from finegrain.config import INDEX_KINDS

FLAT_MAX_ROWS = 200_000   # auto: exact below (200k x 1280 float32 is 1 GB)
NPROBE = 128              # inverted lists visited per query (of about sqrt(N))
RERANK = 50               # ivfpq: k x RERANK candidates re-ranked on exact cosine (PQ misranks the deeper ones)
RERANK_BYTES = 1 << 27    # ivfpq: candidate rows gathered per query chunk (128 MB of float32)
TRAIN_PER_LIST = 40       # fewest training rows per inverted list (faiss warns below 39)
SAMPLE_PER_LIST = 64      # training rows drawn per inverted list
ADD_CHUNK = 16_384        # reference rows normalised and added at a time (1280-d: 84 MB as float32)
GPU_MAX_K = 2048          # faiss's GPU search returns at most this many neighbours


def resolve_kind(kind: str, rows: int) -> str:
    """'auto' -> 'flat' or 'ivfpq' by the number of reference rows; other kinds as given."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    if kind == "auto":
        return "flat" if rows <= FLAT_MAX_ROWS else "ivfpq"
    return kind


def unit_rows(x) -> np.ndarray:
    """(N, D) any float array or tensor -> a new (N, D) float32 array, rows L2-normalised, C-contiguous (what faiss
    takes). One copy: a float16 memory map is read once."""
    x = np.array(x.detach().cpu().numpy() if torch.is_tensor(x) else x, dtype=np.float32, order="C", copy=True)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def read_unit_rows(reference, which) -> np.ndarray:
    """unit_rows(reference[which]) for a slice or sorted row numbers. From a memory map, rows are read ADD_CHUNK
    at a time and the pages handed back after each block (the kernel's read-ahead would otherwise bring most
    of the file in for a scattered sample), so resident memory stays at one block."""
    mapping = getattr(reference, "_mmap", None)  # numpy.memmap's mmap object (set on it and on its slices)
    if mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
        return unit_rows(reference[which])
    if isinstance(which, slice):
        rows = unit_rows(reference[which])
        mapping.madvise(mmap.MADV_DONTNEED)
        return rows
    which = np.asarray(which)
    out = np.empty((len(which), reference.shape[1]), np.float32)
    bounds = np.searchsorted(which, np.arange(0, len(reference) + ADD_CHUNK, ADD_CHUNK))  # which is sorted
    for block, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi > lo:
            start = block * ADD_CHUNK
            out[lo:hi] = unit_rows(reference[start:start + ADD_CHUNK][which[lo:hi] - start])
            mapping.madvise(mmap.MADV_DONTNEED)
    return out


def pq_subquantizers(dim: int) -> int:
    """PQ sub-vectors for `dim`: the most that divide it with at least 8 dimensions each (1280 -> 160, 512 -> 64)."""
    return max(m for m in range(1, dim // 8 + 1) if dim % m == 0) if dim >= 8 else 1


class NeighbourIndex:
    """A searchable set of reference features; build with `build`, reopen a saved one with `load`."""

    def __init__(self, index, kind: str, reference):
        """index: a faiss index of the unit reference rows; reference: (N, D) unit rows to re-rank on
        (an array or a memory map; unused by flat)."""
        self.index, self.kind, self.reference = index, kind, reference
        self._gpu_index = None  # a GPU copy of a flat index, made on the first search that can use it

    def __len__(self) -> int:
        return self.index.ntotal

    @classmethod
    def build(cls, reference, kind: str = "auto", *, seed: int = 0) -> NeighbourIndex:
        """Index (N, D) reference features (tensor, array or memory map, read ADD_CHUNK rows at a time)."""
        import faiss

        n, dim = reference.shape
        kind = resolve_kind(kind, n)
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        else:
            nlist = max(1, min(int(math.sqrt(n)), n // TRAIN_PER_LIST))
            sample = np.sort(np.random.default_rng(seed).choice(n, min(n, nlist * SAMPLE_PER_LIST), replace=False))
            bits = int(np.clip(np.log2(len(sample) / TRAIN_PER_LIST), 1, 8))  # 256 codes need 10k training rows
            index = faiss.index_factory(dim, f"IVF{nlist},PQ{pq_subquantizers(dim)}x{bits}", faiss.METRIC_INNER_PRODUCT)
            ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
            ivf.do_polysemous_training = False  # on by default from index_factory; 5x the training time, unused here
            ivf.nprobe = min(NPROBE, nlist)
            index.train(read_unit_rows(reference, sample))
        for start in range(0, n, ADD_CHUNK):
            index.add(read_unit_rows(reference, slice(start, start + ADD_CHUNK)))
        return cls(index, kind, reference if kind == "ivfpq" else None)

    def search(self, queries, k: int, *, chunk_size: int = 1024, leave_out=None) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar reference rows of each query.

        Args:
            queries: (Q, D) features. k: neighbours per query (at most len(self)).
            leave_out: (Q,) int64 reference row of each query to leave out of its own neighbours
                (leave-one-out), or None.

        Returns:
            similarities (Q, k) float32 cosine, descending; indices (Q, k) int64 into the reference.
        """
        extra = 0 if leave_out is None else 1
        if self.kind == "ivfpq":
            chunk_size = max(1, min(chunk_size, RERANK_BYTES // (4 * (k + extra) * RERANK * self.index.d)))
        sims, idx = [], []
        for start in range(0, len(queries), chunk_size):
            q = unit_rows(queries[start:start + chunk_size])
            s, i = self._search(q, k + extra)
            if leave_out is not None:
                s, i = _drop_rows(s, i, np.asarray(leave_out[start:start + len(q)]), k)
            sims.append(s)
            idx.append(i)
        if not sims:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate(sims).astype(np.float32), np.concatenate(idx).astype(np.int64)

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "flat":
            return self._flat_searcher(k).search(q, k)
        _, cand = self.index.search(q, k * RERANK)
        # faiss's IndexRefineFlat would hold every reference row in memory; here they stay on disk and only
        # each query's candidates are read, so this re-rank is written by hand.
        safe = np.where(cand < 0, 0, cand)  # -1: fewer candidates than asked
        wanted = np.unique(safe)
        rows = read_unit_rows(self.reference, wanted)
        position = np.searchsorted(wanted, safe)
        exact = np.einsum("qd,qcd->qc", q, rows[position])
        exact[cand < 0] = -np.inf
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact, order, 1), np.take_along_axis(cand, order, 1)

    def _flat_searcher(self, k: int):
        """The flat index on every visible GPU when faiss was built with GPU support and k fits, else on the CPU."""
        import faiss

        if k > GPU_MAX_K or not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() < 1:
            return self.index
        if self._gpu_index is None:
            self._gpu_index = faiss.index_cpu_to_all_gpus(self.index)
        return self._gpu_index

    def save(self, folder: Path) -> None:
        """folder/index.faiss and folder/index.json; for ivfpq the reference rows too: the .npy file a memory-mapped
        reference was read from, or folder/reference.npy (float16) written here."""
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / "index.faiss"))
        meta = {"kind": self.kind, "rows": len(self)}
        if self.kind == "ivfpq":
            source = getattr(self.reference, "filename", None)
            if source and len(self.reference) == len(np.load(source, mmap_mode="r")):
                meta["reference"] = str(Path(source).resolve())
            else:
                out = np.lib.format.open_memmap(folder / "reference.npy", mode="w+", dtype=np.float16,
                                                shape=self.reference.shape)
                for start in range(0, len(out), ADD_CHUNK):
                    out[start:start + ADD_CHUNK] = read_unit_rows(self.reference, slice(start, start + ADD_CHUNK))
                    out.flush()
                meta["reference"] = "reference.npy"
        (folder / "index.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: Path) -> NeighbourIndex:
        """Reopen a saved index; the inverted lists and reference rows are memory-mapped, not read."""
        import faiss

        folder = Path(folder)
        meta = json.loads((folder / "index.json").read_text())
        if meta["kind"] != "ivfpq":
            return cls(faiss.read_index(str(folder / "index.faiss")), meta["kind"], None)
        reference = np.load(folder / meta["reference"], mmap_mode="r")  # an absolute path stays absolute
        return cls(faiss.read_index(str(folder / "index.faiss"), faiss.IO_FLAG_MMAP), "ivfpq", reference)


def _drop_rows(s: np.ndarray, i: np.ndarray, own_rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(c, k + 1) neighbours -> (c, k) without each query's own row (or its farthest when the row is absent)."""
    own = i == own_rows[:, None]
    keep = ~own
    keep[own.sum(1) == 0, -1] = False
    return s[keep].reshape(len(i), k), i[keep].reshape(len(i), k)


def nearest(reference, queries=None, k: int = 10, *, kind: str = "auto",
            chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar reference rows of each query.

    Args:
        reference: (N, D) features; queries: (Q, D) features, or None to query the reference with
            itself leaving each row out of its own neighbours (leave-one-out).
        k: neighbours per query (clipped to the rows available). kind: one of INDEX_KINDS.

    Returns:
        similarities (Q, k) float32 cosine in [-1, 1], descending; indices (Q, k) int64 into reference.
    """
    self_query = queries is None
    k = min(k, len(reference) - (1 if self_query else 0))
    if k < 1:
        raise ValueError("nearest needs at least one reference row besides the query")
    index = NeighbourIndex.build(reference, kind)
    if self_query:
        return index.search(reference, k, chunk_size=chunk_size, leave_out=np.arange(len(reference)))
    return index.search(queries, k, chunk_size=chunk_size)
