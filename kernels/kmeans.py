"""k-means for DataComp's image-based baseline (docs/science.md §11): pure numpy, no store imports,
so a DuckDB UDF or a Ray task can import it.

DataComp (baselines/image_based_clustering.py) trains faiss k-means — Lloyd iterations under L2,
20 iterations, seeded, initialised from a random sample of the points — on the pool's
(normalized) image embeddings, and assigns samples and target images to a centroid by the
largest inner product ⟨x, c⟩ (baselines/apply_filter.py, `get_centroid_ids_gpu`). This module
does the same: `lloyd` trains, `assign` assigns.

Numerics: the x·cᵀ products are float32 GEMMs (ties and near-ties between centroids are decided
on values carrying ~1e-7 error, as in faiss); the centroid sums accumulate in float64.

Cost: per iteration one float32 GEMM (rows × d × k) in row chunks whose score block stays in
cache, an argmax, and the centroid update `cluster_sums`: the rows gathered in label order and
each cluster's run summed by one float64 `np.add.reduce` (a pass over n × d; ≈ 20× faster than
`np.add.reduceat` along axis 0 and than d weighted `bincount` passes, which numpy does not
vectorize across columns).
"""
from __future__ import annotations

import numpy as np

DEFAULT_ITERATIONS = 20        # DataComp's `cluster.niter`
SCORE_BLOCK = 1 << 21          # float32 scores per assignment block (8 MiB: in cache for the argmax)
SUM_ROWS = 65536               # rows gathered at once by `cluster_sums` (fixed: the sums never depend on a caller's chunk)


def _spans(n: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def assign(X: np.ndarray, C: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """int64 index of the centroid with the largest ⟨x, c⟩ for each row (ties → the lowest index)."""
    X = np.asarray(X, dtype=np.float32)
    Ct = np.ascontiguousarray(np.asarray(C, dtype=np.float32).T)
    out = np.empty(len(X), dtype=np.int64)
    for sl in _spans(len(X), max(1, min(chunk, SCORE_BLOCK // max(1, Ct.shape[1])))):
        out[sl] = np.argmax(X[sl] @ Ct, axis=1)
    return out


def _nearest_l2(X: np.ndarray, C: np.ndarray, chunk: int) -> np.ndarray:
    """argmin ‖x − c‖² = argmax (⟨x, c⟩ − ½‖c‖²): the Lloyd step's assignment (ties → lowest index)."""
    half = (0.5 * np.einsum("ij,ij->i", C, C)).astype(np.float32)
    Ct = np.ascontiguousarray(C.astype(np.float32).T)
    out = np.empty(len(X), dtype=np.int64)
    step = max(1, min(chunk, SCORE_BLOCK // max(1, len(C))))
    for sl in _spans(len(X), step):
        S = X[sl] @ Ct
        S -= half
        out[sl] = S.argmax(axis=1)
    return out


def cluster_sums(X: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(float64 (k, d) sums of the rows of X per label, int64 counts). Rows are summed in row order
    within a label (a stable sort), SUM_ROWS rows gathered at a time, so the result depends only on
    X and the labels."""
    counts = np.bincount(labels, minlength=k)
    sums = np.zeros((k, X.shape[1]))
    order = np.argsort(labels, kind="stable")
    for sl in _spans(len(order), SUM_ROWS):
        idx = order[sl]
        lb = labels[idx]
        G = X[idx]
        starts = np.flatnonzero(np.r_[True, lb[1:] != lb[:-1]])
        for a, b in zip(starts.tolist(), np.r_[starts[1:], len(idx)].tolist()):
            sums[lb[a]] += np.add.reduce(G[a:b], axis=0, dtype=np.float64)
    return sums, counts


def lloyd(X: np.ndarray, k: int, *, iterations: int = DEFAULT_ITERATIONS, seed: int = 0,
          chunk: int = 65536) -> np.ndarray:
    """(k, d) float32 centroids of L2 k-means on the rows of X.

    Initialisation: k distinct rows drawn by `default_rng(seed)`. Each iteration assigns every row
    to its nearest centroid (L2) and moves each centroid to the mean of its rows (float64 sums);
    a centroid left without rows keeps its position. Stops early when no assignment changes."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    n = len(X)
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the {n} rows; got {k}")
    rng = np.random.default_rng(seed)
    C = X[np.sort(rng.choice(n, size=k, replace=False))].astype(np.float64)
    labels = None
    for _ in range(max(1, int(iterations))):
        new = _nearest_l2(X, C, chunk)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        sums, counts = cluster_sums(X, labels, k)
        moved = np.flatnonzero(counts)
        C[moved] = sums[moved] / counts[moved, None]
    return C.astype(np.float32)
