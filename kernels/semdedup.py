"""SemDeDup (docs/science.md §10) in numpy: spherical k-means, then within each cluster the
largest cosine of every member to the members ranked before it.

Pure numpy, no store and no DuckDB, so the store workflow (`queries.curation.dedup`), a DuckDB
UDF or a Ray task import the very same functions; `semdedup_blocks` runs the within-cluster pass
with them over rows fetched group by group (bounded memory). Rows are given as the raw float32
matrix `X` (as stored; in the store workflow a batch, a sample or a group of clusters) with `inv`
= 1 / ‖x‖ in float64 (0 for rows without a vector: NULL, all-zero or non-finite, `valid` False);
unit vectors are formed chunk by chunk, never as a second copy of X. Every per-row value is the
same whichever rows are processed together, so streaming or grouping never changes a result.

Definitions (the tests check them against a brute force written from docs/science.md):
* fit: seeded sample of the valid rows (the store draws it while streaming: `hash_keys`), seeded
  k-means++ over a seeded 16·K rows of the sample (first centre uniform; then D² sampling with
  weight 1 − max cos to the chosen centres, i.e. ‖x̂ − c‖²/2; a chosen row gets weight 0; if every
  weight is 0 — fewer distinct rows than K — a seeded uniform pick among the rows not chosen;
  blocked: one GEMM per 32 centres, see `kmeans_pp`), then Lloyd steps: assign, centroid = the
  float64 sum of the members' unit vectors re-normalized (an empty or zero-sum cluster keeps its
  centroid), until no label changes or `iterations` assignments ran.
* centroids are stored as float32 and used as C64 = float64(C32) / ‖·‖ everywhere after.
* assignment: the cluster of largest cos(x̂, c); ties → the lowest cluster index.
* order inside a cluster: cos to the centroid ascending (the farthest member first, "keep hard"),
  ties → id ascending (`id_rank`: the rank of the id in byte order).
* max_sim(j) = max over members k ranked before j of cos(x̂_j, x̂_k); 0 for the first member.

float32 handling. The heavy products are float32 GEMMs (unit vectors rounded to float32). For
unit vectors |fl32(x̂·ŷ) − x̂·ŷ| ≤ δ = γ_{d+4}, γ_m = m·u/(1 − m·u), u = 2⁻²⁴ (the GEMM's
worst-case bound plus the rounding of the inputs); d = 512: δ ≈ 3.1e-5, i.e. a cosine within
3e-5 of the threshold 1 − ε could be on the wrong side. So no float32 value is ever kept: every
(row, column) pair whose float32 cosine is within 2δ of its row's float32 maximum (a superset
of the pairs that can hold the true maximum) is recomputed in float64 from the stored vectors,
and the float64 maximum is what is stored — for the assignment (near-tied centroids) and for
max_sim alike. The stored values therefore equal a float64 computation up to float64 rounding
(~1e-16), and do not depend on how BLAS blocks the products (a row scored alone or in a chunk,
an incremental re-run or a full one, give the same values). Cost of the check: ~1/block of the
GEMM's work.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from clipsql.kernels.kmeans import cluster_sums
from clipsql.kernels.parallel import blas_one_thread, cpu_threads, in_order
from clipsql.kernels.unit import normalize

INIT = "k-means++"
KERNEL_VERSION = 2
ROW_CHUNK = 8192        # rows per assignment GEMM (fewer when K is large: ≤ SCORE_BLOCK scores per chunk)
SCORE_BLOCK = 1 << 21   # float32 scores per assignment block (8 MiB: the argmax and near-tie passes run in cache)
ROW_BLOCK = 512         # within a cluster: rows per block …
COL_BLOCK = 8192        # … against at most this many earlier members at once: ≤ 4M float32 scores
CACHE_ROWS = 65536      # clusters up to this size keep their float64 unit vectors for the refinement
PP_ROWS_PER_CLUSTER = 16   # k-means++ draws its seeds from a seeded 16·K rows of the sample
PP_BLOCK = 32              # k-means++: centres chosen between two refreshes of the weights (one GEMM each)
PP_MAX_MISSES = 64         # … or after this many rejected draws in a row
PP_FOLD_ROWS = 65536       # rows per refresh GEMM (bounded scores)


def f32_tolerance(d: int) -> float:
    """δ: a bound on |float32 cosine − exact cosine| for unit vectors of dimension d."""
    m = (d + 4) * 2.0 ** -24
    return m / (1.0 - m)


def inverse_norms(X: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(inv, valid): 1/‖x‖ in float64 (0 where invalid); valid = finite and non-zero. Rows are
    widened `chunk` at a time into one float64 work array small enough to stay in cache (each
    row's sum is the same whatever the chunk)."""
    n = len(X)
    inv = np.zeros(n)
    valid = np.zeros(n, dtype=bool)
    work = np.empty((min(chunk, n), X.shape[1]))
    for a in range(0, n, chunk):
        Z = work[:min(chunk, n - a)]
        np.copyto(Z, X[a:a + chunk])
        fin = np.isfinite(Z).all(axis=1)
        Z[~fin] = 0.0
        sq = np.einsum("ij,ij->i", Z, Z)
        ok = fin & (sq > 0)
        valid[a:a + chunk] = ok
        inv[a:a + chunk][ok] = 1.0 / np.sqrt(sq[ok])
    return inv, valid


def unit64(X: np.ndarray, inv: np.ndarray, rows: np.ndarray | slice, out: np.ndarray | None = None) -> np.ndarray:
    """x · (1/‖x‖) in float64 for the rows `rows` (invalid rows: zero vectors), in `out` if given."""
    Z = X[rows]
    if out is None:
        Z = Z.astype(np.float64)
    else:
        np.copyto(out, Z)
        Z = out
    w = inv[rows]
    Z *= w[:, None]
    Z[w == 0] = 0.0                 # invalid rows (inv = 0; NaN · 0 is NaN) become zero vectors
    return Z


def unit32(X: np.ndarray, inv: np.ndarray, rows: np.ndarray, chunk: int = 256) -> np.ndarray:
    """float32(unit64(…)) of the rows `rows`, through one float64 work array of `chunk` rows."""
    out = np.empty((len(rows), X.shape[1]), dtype=np.float32)
    work = np.empty((min(chunk, len(rows)), X.shape[1]))
    for a in range(0, len(rows), chunk):
        r = rows[a:a + chunk]
        out[a:a + len(r)] = unit64(X, inv, r, out=work[:len(r)])
    return out


def unit_centroids(C32: np.ndarray) -> np.ndarray:
    """The float64 centroids every step uses: the stored float32 ones re-normalized."""
    return normalize(np.asarray(C32, dtype=np.float32), invalid=0.0)[0]


def draw_sample(pool: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` of the row indices `pool` (valid rows in id order), without replacement, kept in pool order."""
    if size >= len(pool):
        return pool.copy()
    return pool[np.sort(rng.choice(len(pool), size=size, replace=False))]


# --------------------------------------------------------------------------- k-means
def kmeans_pp(U: np.ndarray, k: int, rng: np.random.Generator, *, block: int = PP_BLOCK) -> np.ndarray:
    """Indices of k seeds among the unit rows U (float32) by k-means++ with cosine D² weights
    w = 1 − max cos to the chosen centres (clipped at 0; a chosen row has weight 0).

    Blocked, with the exact k-means++ distribution: the weights over all rows are refreshed by one
    GEMM against the last `block` chosen centres; in between, a row j drawn from the stale weights
    (an upper bound of the current ones) is accepted with probability w(j) / w_stale(j), w(j)
    computed against the centres chosen since the refresh (rejection sampling: the accepted row
    follows the current weights). So k/block GEMMs instead of k serial matrix–vector passes. When
    every weight is 0 (fewer distinct rows than k) the next seed is a seeded uniform pick among the
    rows not chosen."""
    n = len(U)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(n)
    taken = np.zeros(n, dtype=bool)
    taken[chosen[0]] = True
    best = np.full(n, -np.inf)                  # max cos to the centres folded in so far
    pending = [int(chosen[0])]                  # chosen, not yet folded into `best`
    i = 1
    while i < k:
        P = U[pending]
        for a in range(0, n, PP_FOLD_ROWS):
            np.maximum(best[a:a + PP_FOLD_ROWS], (U[a:a + PP_FOLD_ROWS] @ P.T).max(axis=1),
                       out=best[a:a + PP_FOLD_ROWS])
        pending = []
        w = np.clip(1.0 - best, 0.0, None)
        w[taken] = 0.0
        cum = np.cumsum(w)
        if cum[-1] <= 0.0:
            j = int(rng.choice(np.flatnonzero(~taken)))
            chosen[i], taken[j] = j, True
            pending.append(j)
            i += 1
            continue
        misses = 0
        while i < k and len(pending) < block and misses < PP_MAX_MISSES:
            j = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), n - 1)
            cur = w[j]
            if cur > 0.0 and pending and not taken[j]:
                cur = max(0.0, 1.0 - max(best[j], float((U[pending] @ U[j]).max())))
            if taken[j] or cur <= 0.0 or rng.random() * w[j] >= cur:
                misses += 1                     # rejected: a fresh draw (after many, refresh the weights)
                continue
            chosen[i], taken[j] = j, True
            pending.append(j)
            i += 1
            misses = 0
    return chosen


def labels_from_scores(S: np.ndarray, rows64: Callable[[np.ndarray], np.ndarray], C64: np.ndarray,
                       tol: float) -> np.ndarray:
    """Labels from the float32 cosines S (rows × K): the argmax, where another centroid is within
    `tol` re-decided in float64 (`rows64(i)`: the float64 unit rows i), ties → the lowest index.
    S is overwritten (the near-tie test reads the second largest value, not a boolean matrix)."""
    lab = S.argmax(axis=1)
    r = np.arange(len(S))
    top = S[r, lab].copy()
    S[r, lab] = -np.inf
    multi = np.flatnonzero(S.max(axis=1) >= top - tol) if S.shape[1] > 1 else np.zeros(0, dtype=np.int64)
    if multi.size:
        S[multi, lab[multi]] = top[multi]
        near = S[multi] >= (top[multi] - tol)[:, None]
        r, c = np.nonzero(near)
        v = np.einsum("ij,ij->i", rows64(multi)[r], C64[c])
        o = np.lexsort((c, -v, r))          # per row: largest float64 cosine, then lowest cluster
        first = np.r_[True, r[o][1:] != r[o][:-1]]
        lab[multi[r[o][first]]] = c[o][first]
    return lab.astype(np.int64)


def centroid_cos(Z: np.ndarray, C64: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """float64 cos of the unit rows Z to their centroids (the one expression every path uses)."""
    return np.einsum("ij,ij->i", Z, C64[lab])


def cos_to_centroids(X: np.ndarray, inv: np.ndarray, rows: np.ndarray, labels: np.ndarray, C32: np.ndarray,
                     chunk: int = 65536) -> np.ndarray:
    """float64 cos of the valid `rows` to the centroids `labels[rows]` (as `assign` computes it)."""
    C64 = unit_centroids(C32)
    out = np.empty(len(rows))
    for a in range(0, len(rows), chunk):
        r = rows[a:a + chunk]
        out[a:a + chunk] = centroid_cos(unit64(X, inv, r), C64, labels[r])
    return out


def assign(X: np.ndarray, inv: np.ndarray, valid: np.ndarray, C32: np.ndarray, rows: np.ndarray | None = None,
           *, chunk: int | None = None, progress: Callable[[int], None] | None = None,
           nearest: Callable[[np.ndarray], np.ndarray] | None = None,
           threads: int | None = 1) -> tuple[np.ndarray, np.ndarray]:
    """(labels, cos) of `rows` (default all): nearest centroid (max cosine, ties → lowest index) and
    the float64 cosine to it; -1 and NaN for invalid rows. `nearest(Z)`: another implementation of
    the labels of float64 unit rows Z that gives the same ones (a device's: `models.device`; it runs
    on one thread). `threads`: row chunks scored at once (`kernels.parallel`; None: one per CPU),
    the same labels and cosines for any count."""
    rows = np.arange(len(X)) if rows is None else np.asarray(rows, dtype=np.int64)
    C64 = unit_centroids(C32)
    Cg = C64.astype(np.float32)
    tol = 2.0 * f32_tolerance(X.shape[1])
    chunk = chunk or max(256, min(ROW_CHUNK, SCORE_BLOCK // max(1, len(C64))))
    labels = np.full(len(rows), -1, dtype=np.int64)
    cos = np.full(len(rows), np.nan)
    workers = 1 if nearest is not None else cpu_threads(threads)

    def one(a: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        ok = np.flatnonzero(valid[rows[a:a + chunk]])
        if not ok.size:
            return ok, None, None
        Z = unit64(X, inv, rows[a:a + chunk][ok])
        lab = nearest(Z) if nearest is not None else \
            labels_from_scores(Z.astype(np.float32) @ Cg.T, lambda m: Z[m], C64, tol)
        return ok, lab, centroid_cos(Z, C64, lab)

    starts = range(0, len(rows), chunk)
    with blas_one_thread(workers):
        for a, (ok, lab, c) in zip(starts, in_order(one, starts, workers)):
            if lab is not None:
                labels[a + ok], cos[a + ok] = lab, c
            if progress:
                progress(len(rows[a:a + chunk]))
    return labels, cos


def spherical_kmeans(X: np.ndarray, inv: np.ndarray, sample: np.ndarray, k: int, rng: np.random.Generator,
                     iterations: int, *, progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, dict]:
    """Fit k unit centroids (returned as float32) on the rows `sample` (valid rows)."""
    return fit_units(unit32(X, inv, sample), k, rng, iterations, progress=progress)


def fit_units(U: np.ndarray, k: int, rng: np.random.Generator, iterations: int, *,
              progress: Callable[[int], None] | None = None,
              label: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
              threads: int | None = 1) -> tuple[np.ndarray, dict]:
    """`spherical_kmeans` on the sample's float32 unit rows U (`unit32`), e.g. read in chunks.
    `label(U, C32)`: another implementation of the assignment step that gives the same labels
    (`semdedup_assign.fit_units`: two-level, for large k). `threads`: the assignment's row chunks
    and the centroid sums on that many threads (`kernels.parallel`; None: one per CPU), the same
    centroids for any count; with a `label`, one thread (its own BLAS threads)."""
    n, d = U.shape
    seeds = U if n <= PP_ROWS_PER_CLUSTER * k else U[np.sort(rng.choice(n, PP_ROWS_PER_CLUSTER * k, replace=False))]
    C = seeds[kmeans_pp(seeds, k, rng)].astype(np.float64)
    tol = 2.0 * f32_tolerance(d)
    chunk = max(256, min(ROW_CHUNK, SCORE_BLOCK // max(1, k)))
    workers = 1 if label is not None else cpu_threads(threads)
    prev = None
    ran, converged = 0, False
    with blas_one_thread(workers):
        for _ in range(max(1, iterations)):
            C32 = C.astype(np.float32)
            Cg = unit_centroids(C32)
            Cg32 = Cg.astype(np.float32)
            if label is not None:
                lab = label(U, C32)
            else:
                lab = np.concatenate(list(in_order(
                    lambda a: labels_from_scores(U[a:a + chunk] @ Cg32.T, lambda m: U[a + m].astype(np.float64),
                                                 Cg, tol), range(0, n, chunk), workers)))
            ran += 1
            if progress:
                progress(1)
            if prev is not None and np.array_equal(lab, prev):
                converged = True
                break
            prev = lab
            C = _update(U, lab, Cg, workers)
    return C.astype(np.float32), {"iterations_run": ran, "converged": converged}


def _update(U: np.ndarray, lab: np.ndarray, C: np.ndarray, threads: int = 1) -> np.ndarray:
    """Spherical update: float64 sums of the members' unit vectors (`kmeans.cluster_sums`: one
    float64 reduce per cluster over the rows in label order), re-normalized."""
    sums, _ = cluster_sums(U, lab, len(C), threads)
    unit, keep = normalize(sums)
    out = C.copy()
    out[keep] = unit[keep]
    return out


# --------------------------------------------------------------------------- within clusters
def cluster_order(labels: np.ndarray, cos: np.ndarray, id_rank: np.ndarray,
                  rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ordered rows, segment starts): the valid `rows` (default all) by cluster, then cos to the
    centroid ascending (farthest first), then id ascending."""
    rows = np.flatnonzero(labels >= 0) if rows is None else rows[labels[rows] >= 0]
    o = rows[np.lexsort((id_rank[rows], cos[rows], labels[rows]))]
    lb = labels[o]
    starts = np.flatnonzero(np.r_[True, lb[1:] != lb[:-1]]) if len(o) else np.zeros(0, dtype=np.int64)
    return o, starts


# Candidate pairs of one (row block, column block) of a cluster: `pairs(a, b, p, q)` → (r, c), offsets
# into rows a..b and columns p..q (when p == a, the diagonal block: strictly earlier columns only),
# a superset of the pairs that hold each row's largest float64 cosine over those columns. The values
# themselves are always the float64 `einsum` of `cluster_max_sim`, so any candidate generator that
# keeps that superset gives the same stored values, bit for bit. `Gram` builds one per cluster from
# (rows64(lo, hi) → float64 unit rows, n); the default is the float32 GEMM below. A device generator
# (torch, float64 on a GPU: `models.device`) plugs in here.
Pairs = Callable[[int, int, int, int], tuple[np.ndarray, np.ndarray]]
Gram = Callable[[Callable[[int, int], np.ndarray], int], Pairs]


def _f32_pairs(U: np.ndarray, tol: float, rows: int) -> Pairs:
    def pairs(a: int, b: int, p: int, q: int) -> tuple[np.ndarray, np.ndarray]:
        G = U[a:b] @ U[p:q].T
        if p == a:    # the diagonal block: only strictly earlier columns count
            np.copyto(G, -np.inf, where=_upper(rows)[:b - a, :b - a])
        am = G.argmax(axis=1)
        bm = G[np.arange(b - a), am]
        fin = np.isfinite(bm)
        near = G >= (bm - tol)[:, None]
        cnt = np.count_nonzero(near, axis=1)
        r = np.flatnonzero(fin & (cnt == 1))          # most rows: the argmax is the only candidate
        c = am[r]
        multi = np.flatnonzero(fin & (cnt > 1))
        if multi.size:
            rm, cm = np.nonzero(near[multi])
            r, c = np.concatenate([r, multi[rm]]), np.concatenate([c, cm])
        return r, c
    return pairs


def cluster_max_sim(X: np.ndarray, inv: np.ndarray, members: np.ndarray, *, rows: int = ROW_BLOCK,
                    cols: int = COL_BLOCK, empty: float = 0.0, gram: Gram | None = None) -> np.ndarray:
    """max_sim of each of `members` (row indices in rank order): the float64 max cosine to the
    members before it (`empty`, default 0, for the first). Row blocks of `rows` against the earlier
    members in column blocks of at most `cols`, then the square diagonal block (masked to strictly
    earlier columns): scores in memory O(rows · cols), work Σ n_c²/2 + n_c·rows/2 products.
    `gram`: another candidate generator (see `Gram`; e.g. a GPU's), same values."""
    n = len(members)
    out = np.full(n, empty)
    if n <= 1:
        return out
    tol = 2.0 * f32_tolerance(X.shape[1])
    U64 = unit64(X, inv, members) if n <= CACHE_ROWS else None

    def rows64(lo: int, hi: int) -> np.ndarray:
        return U64[lo:hi] if U64 is not None else unit64(X, inv, members[lo:hi])

    if gram is not None:
        pairs = gram(rows64, n)
    else:
        pairs = _f32_pairs(U64.astype(np.float32) if U64 is not None else unit32(X, inv, members), tol, rows)
    for a in range(0, n, rows):
        b = min(a + rows, n)
        R64 = rows64(a, b)
        best = np.full(b - a, -np.inf)
        for p, q in [(p, min(p + cols, a)) for p in range(0, a, cols)] + [(a, b)]:
            r, c = pairs(a, b, p, q)
            if r.size:
                v = np.einsum("ij,ij->i", R64[r], rows64(p, q)[c])
                np.maximum.at(best, r, v)
        out[a:b] = np.where(np.isfinite(best), best, empty)
    return out


_UPPER: dict[int, np.ndarray] = {}


def _upper(m: int) -> np.ndarray:
    """m × m mask of the diagonal and above (column ≥ row), cached."""
    if m not in _UPPER:
        _UPPER[m] = np.triu(np.ones((m, m), dtype=bool))
    return _UPPER[m]


def max_sims(X: np.ndarray, inv: np.ndarray, labels: np.ndarray, cos: np.ndarray, id_rank: np.ndarray,
             clusters: np.ndarray | None = None, *, rows: int = ROW_BLOCK,
             progress: Callable[[int], None] | None = None, gram: Gram | None = None,
             threads: int | None = 1) -> tuple[np.ndarray, dict]:
    """semdedup_max_sim of every valid row of the given clusters (default all; NaN elsewhere),
    with the pair count {pairs: Σ n_c(n_c−1)/2, largest: the largest cluster}. `threads`: clusters
    computed at once, each on a thread of its own with BLAS on one thread (`kernels.parallel`;
    None: one per CPU); the values are the same for any count. A `gram` runs on one thread."""
    out = np.full(len(X), np.nan)
    subset = None if clusters is None else np.flatnonzero(np.isin(labels, clusters))
    o, starts = cluster_order(labels, cos, id_rank, subset)
    ends = np.r_[starts[1:], len(o)]
    workers = 1 if gram is not None else cpu_threads(threads)
    pairs, largest = 0, 0

    def one(span: tuple[int, int]) -> np.ndarray:
        return cluster_max_sim(X, inv, o[span[0]:span[1]], rows=rows, gram=gram)

    spans = list(zip(starts.tolist(), ends.tolist()))
    with blas_one_thread(workers):
        for (s, e), values in zip(spans, in_order(one, spans, workers)):
            out[o[s:e]] = values
            m = e - s
            pairs += m * (m - 1) // 2
            largest = max(largest, m)
            if progress:
                progress(m)
    return out, {"pairs": int(pairs), "largest_cluster": int(largest), "clusters": int(len(starts))}


def _max_earlier(U: np.ndarray, U64: np.ndarray, qpos: np.ndarray, cpos: np.ndarray, tol: float,
                 rows: int, cols: int) -> np.ndarray:
    """For each rank position in `qpos`: the float64 max cosine to the positions in `cpos` before it
    (-inf if none); U / U64: the cluster's unit rows in rank order. Same refinement as the full pass."""
    best = np.full(len(qpos), -np.inf)
    for a in range(0, len(qpos), rows):
        qp = qpos[a:a + rows]
        cp_all = cpos[cpos < qp[-1]]
        for p in range(0, len(cp_all), cols):
            cp = cp_all[p:p + cols]
            G = U[qp] @ U[cp].T
            np.copyto(G, -np.inf, where=cp[None, :] >= qp[:, None])
            bm = G.max(axis=1)
            near = (G >= (bm - tol)[:, None]) & np.isfinite(bm)[:, None]
            r, c = np.nonzero(near)
            if r.size:
                v = np.einsum("ij,ij->i", U64[qp[r]], U64[cp[c]])
                np.maximum.at(best[a:a + rows], r, v)
    return best


def update_max_sims(X: np.ndarray, inv: np.ndarray, labels: np.ndarray, cos: np.ndarray, id_rank: np.ndarray,
                    old: np.ndarray, new: np.ndarray, clusters: np.ndarray, *, rows: int = ROW_BLOCK,
                    cols: int = COL_BLOCK, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """max_sim after rows were only added to `clusters` (`new`: a bool per row; `old`: the stored values
    of the other rows): a new member gets its max over every earlier member, an old member the max of
    its stored value and its cosines to the new members ranked before it. O(n_c · new_c · d), and equal
    to a full pass (every pair value is the same float64 expression; max is exact)."""
    out = np.full(len(X), np.nan)
    tol = 2.0 * f32_tolerance(X.shape[1])
    o, starts = cluster_order(labels, cos, id_rank, np.flatnonzero(np.isin(labels, clusters)))
    for s, e in zip(starts, np.r_[starts[1:], len(o)]):
        members = o[s:e]
        is_new = new[members]
        npos = np.flatnonzero(is_new)
        U64 = unit64(X, inv, members)
        U = U64.astype(np.float32)
        res = old[members].copy()
        first_old = np.flatnonzero(~is_new)[:1]
        res[first_old] = -np.inf                # its stored 0 meant "no earlier member"
        if npos.size:
            res[npos] = _max_earlier(U, U64, npos, np.arange(len(members)), tol, rows, cols)
            opos = np.flatnonzero(~is_new & (np.arange(len(members)) > npos[0]))
            if opos.size:
                res[opos] = np.maximum(res[opos], _max_earlier(U, U64, opos, npos, tol, rows, cols))
        res[~np.isfinite(res)] = 0.0           # the first member (no earlier one): 0
        out[members] = res
        if progress:
            progress(e - s)
    return out


def removable(max_sim: np.ndarray, eps: float) -> np.ndarray:
    """Rows SemDeDup removes at ε: max_sim > 1 − ε (NaN rows are never removed)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(max_sim) > 1.0 - eps
