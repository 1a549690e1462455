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
each cluster's run gathered and summed by one float64 `np.add.reduce` (a pass over n × d; ≈ 20× faster than
`np.add.reduceat` along axis 0 and than d weighted `bincount` passes, which numpy does not
vectorize across columns).

Threads (`kernels.parallel`): the assignment runs on `threads` threads (default: the CPUs this
process may use), each on row units of `UNIT_ROWS` with BLAS on one thread, and `cluster_sums` on
its gathered pieces in parallel, added in piece order. Every result is the same for any thread
count, to the last bit (labels are per row; each centroid sum is added piece by piece in the
order one thread adds them), and the k-means uses every core where the caller pinned BLAS to one
thread (`select` runs under queries' BLAS pin).
"""
from __future__ import annotations

import numpy as np

from clipsql.kernels.parallel import blas_one_thread, cpu_threads, in_order

DEFAULT_ITERATIONS = 20        # DataComp's `cluster.niter`
SCORE_BLOCK = 1 << 21          # float32 scores per assignment block (8 MiB: in cache for the argmax)
SUM_ROWS = 65536               # rows gathered at once by `cluster_sums` (fixed: the sums never depend on a caller's chunk)
UNIT_ROWS = 16384              # rows per assignment task of a thread


def _spans(n: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def assign(X: np.ndarray, C: np.ndarray, chunk: int = 65536, threads: int | None = None) -> np.ndarray:
    """int64 index of the centroid with the largest ⟨x, c⟩ for each row (ties → the lowest index)."""
    X = np.asarray(X, dtype=np.float32)
    Ct = np.ascontiguousarray(np.asarray(C, dtype=np.float32).T)
    step = max(1, min(chunk, SCORE_BLOCK // max(1, Ct.shape[1])))
    return _labels(X, Ct, None, step, cpu_threads(threads))


def _labels(X: np.ndarray, Ct: np.ndarray, shift: np.ndarray | None, step: int, threads: int) -> np.ndarray:
    """argmax over centroids of X @ Ct − shift per row, on `threads` threads (UNIT_ROWS rows a task)."""
    out = np.empty(len(X), dtype=np.int64)

    def unit(sl: slice) -> None:
        for sub in _spans(sl.stop - sl.start, step):
            rows = slice(sl.start + sub.start, sl.start + sub.stop)
            S = X[rows] @ Ct
            if shift is not None:
                S -= shift
            out[rows] = S.argmax(axis=1)

    with blas_one_thread(threads):
        for _ in in_order(unit, _spans(len(X), UNIT_ROWS), threads):
            pass
    return out


def _nearest_l2(X: np.ndarray, C: np.ndarray, chunk: int, threads: int = 1) -> np.ndarray:
    """argmin ‖x − c‖² = argmax (⟨x, c⟩ − ½‖c‖²): the Lloyd step's assignment (ties → lowest index)."""
    half = (0.5 * np.einsum("ij,ij->i", C, C)).astype(np.float32)
    Ct = np.ascontiguousarray(C.astype(np.float32).T)
    step = max(1, min(chunk, SCORE_BLOCK // max(1, len(C))))
    return _labels(X, Ct, half, step, threads)


def cluster_sums(X: np.ndarray, labels: np.ndarray, k: int, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(float64 (k, d) sums of the rows of X per label, int64 counts). Rows are summed in row order
    within a label (a stable sort), SUM_ROWS rows gathered at a time, so the result depends only on
    X and the labels. The gathered pieces are summed on `threads` threads and added in piece order
    (within a piece each label is one run): the same sums as one thread."""
    counts = np.bincount(labels, minlength=k)
    sums = np.zeros((k, X.shape[1]))
    order = np.argsort(labels, kind="stable")

    def piece(sl: slice) -> tuple[np.ndarray, np.ndarray]:
        idx = order[sl]
        lb = labels[idx]
        starts = np.flatnonzero(np.r_[True, lb[1:] != lb[:-1]])
        part = np.empty((len(starts), X.shape[1]))
        for j, (a, b) in enumerate(zip(starts.tolist(), np.r_[starts[1:], len(idx)].tolist())):
            # each run gathered alone (it stays in cache for its reduce): half the time of
            # gathering the whole piece first, the same sums
            np.add.reduce(X[idx[a:b]], axis=0, dtype=np.float64, out=part[j])
        return lb[starts], part

    for runs, part in in_order(piece, _spans(len(order), SUM_ROWS), threads):
        sums[runs] += part          # distinct labels within a piece: one addition each
    return sums, counts


def lloyd(X: np.ndarray, k: int, *, iterations: int = DEFAULT_ITERATIONS, seed: int = 0,
          chunk: int = 65536, threads: int | None = None) -> np.ndarray:
    """(k, d) float32 centroids of L2 k-means on the rows of X.

    Initialisation: k distinct rows drawn by `default_rng(seed)`. Each iteration assigns every row
    to its nearest centroid (L2) and moves each centroid to the mean of its rows (float64 sums);
    a centroid left without rows keeps its position. Stops early when no assignment changes.
    `threads`: see the module doc (the centroids do not depend on it)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    n = len(X)
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the {n} rows; got {k}")
    workers = cpu_threads(threads)
    rng = np.random.default_rng(seed)
    C = X[np.sort(rng.choice(n, size=k, replace=False))].astype(np.float64)
    labels = None
    with blas_one_thread(workers):
        for _ in range(max(1, int(iterations))):
            new = _nearest_l2(X, C, chunk, workers)
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            sums, counts = cluster_sums(X, labels, k, workers)
            moved = np.flatnonzero(counts)
            C[moved] = sums[moved] / counts[moved, None]
    return C.astype(np.float32)
