"""k-means for DataComp's image-based baseline (docs/science.md §11): pure numpy, no store imports,
so a DuckDB UDF or a Ray task can import it.

DataComp (baselines/image_based_clustering.py) trains faiss k-means — Lloyd iterations under L2,
20 iterations, seeded, initialised from a random sample of the points — on the pool's
(normalized) image embeddings, and assigns samples and target images to a centroid by the
largest inner product ⟨x, c⟩ (baselines/apply_filter.py, `get_centroid_ids_gpu`). This module
does the same: `lloyd` trains, `assign` assigns.

Numerics: the x·cᵀ products are float32 GEMMs (ties and near-ties between centroids are decided
on values carrying ~1e-7 error, as in faiss); the centroid sums accumulate in float64.
"""
from __future__ import annotations

import numpy as np

DEFAULT_ITERATIONS = 20        # DataComp's `cluster.niter`


def _spans(n: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def assign(X: np.ndarray, C: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """int64 index of the centroid with the largest ⟨x, c⟩ for each row (ties → the lowest index)."""
    X = np.asarray(X, dtype=np.float32)
    Ct = np.ascontiguousarray(np.asarray(C, dtype=np.float32).T)
    out = np.empty(len(X), dtype=np.int64)
    for sl in _spans(len(X), chunk):
        out[sl] = np.argmax(X[sl] @ Ct, axis=1)
    return out


def _nearest_l2(X: np.ndarray, C: np.ndarray, chunk: int) -> np.ndarray:
    """argmin ‖x − c‖² = argmax (⟨x, c⟩ − ½‖c‖²): the Lloyd step's assignment (ties → lowest index)."""
    half = 0.5 * np.einsum("ij,ij->i", C, C).astype(np.float32)
    Ct = np.ascontiguousarray(C.astype(np.float32).T)
    out = np.empty(len(X), dtype=np.int64)
    for sl in _spans(len(X), chunk):
        out[sl] = np.argmax(X[sl] @ Ct - half, axis=1)
    return out


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
        counts = np.bincount(labels, minlength=k)
        sums = np.zeros((X.shape[1], k))
        for sl in _spans(n, chunk):          # per-cluster sums in float64: one weighted bincount per feature
            cols = np.ascontiguousarray(X[sl].T)
            for f in range(len(cols)):
                sums[f] += np.bincount(labels[sl], weights=cols[f], minlength=k)
        moved = np.flatnonzero(counts)
        C[moved] = sums.T[moved] / counts[moved, None]
    return C.astype(np.float32)
