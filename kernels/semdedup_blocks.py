"""SemDeDup's within-cluster pass in bounded memory (docs/science.md §10; kernels in `semdedup`).

The rows are not held in memory: `fetch(positions)` returns the raw float32 rows at the given
sorted row positions (the store reads them from one Lance version with `take`). The clusters are
processed in groups of consecutive cluster indices whose members total at most `cap` rows; one
fetch per group, then the in-memory kernels (`max_sims`, `update_max_sims`) on the group's rows. A
cluster of more than `cap` members is processed alone, out of core: its members in rank order in
super-blocks of cap/2 rows, each against itself (`cluster_max_sim`) and against every earlier
super-block, streamed again in blocks of cap/2 rows (`cross_max`). Every value is the same float64
expression the in-memory kernels compute (only the candidate pairs depend on the blocking, and
they always include the maximum), so the budget never changes a stored value.

Memory: a member held costs at most 16·d bytes (its raw float32 row, and the float32 and float64
unit rows the kernels form), so `cap = budget / (16·d)` members at once stay within the budget;
the caller's per-row arrays (labels, cos, ids, positions) are O(n) on top.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from clipsql.kernels import semdedup as K

BYTES_PER_DIM = 16          # per member held: raw float32 + float32 unit + float64 unit rows
MIN_CAP = 16

Fetch = Callable[[np.ndarray], np.ndarray]     # sorted row positions → (len, d) raw float32 rows


def cap_rows(budget_bytes: float, d: int) -> int:
    """Members held at once under a budget of `budget_bytes` (at least MIN_CAP)."""
    return max(MIN_CAP, int(budget_bytes // (BYTES_PER_DIM * d)))


def plan_groups(sizes: np.ndarray, clusters: np.ndarray, cap: int) -> list[np.ndarray]:
    """`clusters` (ascending) packed in order into groups of at most `cap` members in all; a
    cluster above `cap` forms a group of its own. A loop over clusters, not rows."""
    groups: list[np.ndarray] = []
    cur: list[int] = []
    total = 0
    for c in clusters.tolist():
        s = int(sizes[c])
        if cur and total + s > cap:
            groups.append(np.array(cur, dtype=np.int64))
            cur, total = [], 0
        cur.append(c)
        total += s
    if cur:
        groups.append(np.array(cur, dtype=np.int64))
    return groups


def fetch_in_order(fetch: Fetch, rows: np.ndarray) -> np.ndarray:
    """The raw rows `rows` in the given (unsorted) order: one sorted fetch, then a permutation."""
    o = np.argsort(rows, kind="stable")
    got = fetch(rows[o])
    out = np.empty_like(got)
    out[o] = got
    return out


def fill_cos(fetch: Fetch, inv: np.ndarray, labels: np.ndarray, cos: np.ndarray, C32: np.ndarray,
             rows: np.ndarray, cap: int, X: np.ndarray | None = None) -> None:
    """cos[r] for the `rows` (sorted) whose cos is NaN: the float64 cos to their centroid (the
    expression `assign` uses), from `X` (the rows already fetched) or fetched in chunks of `cap`."""
    chunk = max(1, min(65536, cap))
    if X is not None:
        miss = np.flatnonzero(np.isnan(cos[rows]))
        if miss.size:
            cos[rows[miss]] = K.cos_to_centroids(X, inv[rows], miss, labels[rows], C32, chunk=chunk)
        return
    rows = rows[np.isnan(cos[rows])]
    for a in range(0, len(rows), cap):
        r = rows[a:a + cap]
        cos[r] = K.cos_to_centroids(fetch(r), inv[r], np.arange(len(r)), labels[r], C32, chunk=chunk)


def cross_max(UA: np.ndarray, UA64: np.ndarray, XP: np.ndarray, invP: np.ndarray, *, rows: int = K.ROW_BLOCK,
              cols: int = K.COL_BLOCK) -> np.ndarray:
    """For each unit row of UA (float32; UA64 the float64 ones): the float64 max cosine to the rows
    of XP (raw, 1/‖·‖ = invP). Candidates: within 2δ of the float32 block maximum, as in the kernel."""
    UP64 = K.unit64(XP, invP, slice(None))
    UP = UP64.astype(np.float32)
    tol = 2.0 * K.f32_tolerance(UA.shape[1])
    best = np.full(len(UA), -np.inf)
    for a in range(0, len(UA), rows):
        b = min(a + rows, len(UA))
        for p in range(0, len(UP), cols):
            G = UA[a:b] @ UP[p:p + cols].T
            bm = G.max(axis=1)
            r, c = np.nonzero(G >= (bm - tol)[:, None])
            v = np.einsum("ij,ij->i", UA64[a + r], UP64[p + c])
            np.maximum.at(best, a + r, v)
    return best


def big_cluster(fetch: Fetch, inv: np.ndarray, members: np.ndarray, cap: int, *, rows: int = K.ROW_BLOCK
                ) -> np.ndarray:
    """max_sim of one cluster's `members` (rank order) holding at most `cap` of them at once."""
    R = max(1, cap // 2)
    out = np.empty(len(members))
    for s in range(0, len(members), R):
        A = members[s:s + R]
        XA = fetch_in_order(fetch, A)
        best = K.cluster_max_sim(XA, inv[A], np.arange(len(A)), rows=rows, empty=-np.inf)
        if s:
            UA64 = K.unit64(XA, inv[A], slice(None))
            del XA
            UA = UA64.astype(np.float32)
            for p in range(0, s, R):
                P = np.sort(members[p:min(p + R, s)])        # order does not matter for a max
                np.maximum(best, cross_max(UA, UA64, fetch(P), inv[P], rows=rows), out=best)
            del UA, UA64
        out[s:s + len(A)] = np.where(np.isfinite(best), best, 0.0)
    return out


def within_clusters(fetch: Fetch, inv: np.ndarray, labels: np.ndarray, cos: np.ndarray, id_rank: np.ndarray,
                    C32: np.ndarray, full: np.ndarray, cap: int, *, grown: np.ndarray | None = None,
                    old: np.ndarray | None = None, new: np.ndarray | None = None, rows: int = K.ROW_BLOCK,
                    progress: Callable[[int], None] | None = None, gram: K.Gram | None = None,
                    threads: int | None = 1) -> tuple[np.ndarray, dict]:
    """max_sim of the valid rows of the clusters `full` (computed) and `grown` (updated: clusters that
    only gained the rows `new`; `old`: the stored values of the others), NaN elsewhere, holding at
    most `cap` members at once. cos (float64 cos to the centroid; NaN where not known yet) is filled
    in place for the rows it needs. A cluster of `grown` above `cap` is computed in full (same values).
    `gram`: the candidate generator of the in-memory full passes (`semdedup.Gram`; a device's), same values.
    `threads`: clusters of a group computed at once (`semdedup.max_sims`; None: one per CPU), same values.
    Returns (max_sim, {pairs, largest_cluster, clusters, groups, big_clusters})."""
    grown = np.zeros(0, dtype=np.int64) if grown is None else np.asarray(grown, dtype=np.int64)
    todo = np.union1d(np.asarray(full, dtype=np.int64), grown)
    out = np.full(len(labels), np.nan)
    sel = np.flatnonzero(np.isin(labels, todo))
    sel = sel[np.argsort(labels[sel], kind="stable")]           # rows by cluster
    lab_sorted = labels[sel]
    lo = np.searchsorted(lab_sorted, todo, side="left")
    hi = np.searchsorted(lab_sorted, todo, side="right")
    sizes = np.zeros(int(todo.max()) + 1 if todo.size else 0, dtype=np.int64)
    sizes[todo] = hi - lo
    where = {int(c): (int(a), int(b)) for c, a, b in zip(todo, lo, hi)}   # per cluster, not per row
    info = {"pairs": 0, "largest_cluster": 0, "clusters": int(np.count_nonzero(sizes)), "groups": 0,
            "big_clusters": 0}
    for g in plan_groups(sizes, todo, cap):
        a, b = where[int(g[0])][0], where[int(g[-1])][1]
        if b == a:
            continue
        info["groups"] += 1
        info["largest_cluster"] = max(info["largest_cluster"], int(sizes[g].max()))
        if len(g) == 1 and sizes[g[0]] > cap:                  # out of core, recomputed in full
            info["big_clusters"] += 1
            rows_c = np.sort(sel[a:b])
            fill_cos(fetch, inv, labels, cos, C32, rows_c, cap)
            members, _ = K.cluster_order(labels, cos, id_rank, rows_c)
            out[members] = big_cluster(fetch, inv, members, cap, rows=rows)
            info["pairs"] += int(sizes[g[0]] * (sizes[g[0]] - 1) // 2)
            if progress:
                progress(len(members))
            continue
        pos = np.sort(sel[a:b])
        X = fetch(pos)
        fill_cos(fetch, inv, labels, cos, C32, pos, cap, X=X)
        lab, cs, rk, iv = labels[pos], cos[pos], id_rank[pos], inv[pos]
        f = np.setdiff1d(g, grown)
        if f.size:
            part, pinfo = K.max_sims(X, iv, lab, cs, rk, f, rows=rows, progress=progress, gram=gram,
                                     threads=threads)
            m = np.isin(lab, f)
            out[pos[m]] = part[m]
            info["pairs"] += pinfo["pairs"]
        u = np.intersect1d(g, grown)
        if u.size:
            part = K.update_max_sims(X, iv, lab, cs, rk, old[pos], new[pos], u, rows=rows, progress=progress)
            m = np.isin(lab, u)
            out[pos[m]] = part[m]
        del X
    return out, info
