"""Exact cosine top-k by chunked BLAS, pure numpy (a Ray task can import this alone).

    top = RunningTopK(Q, k)                 # Q: (b, d) query vectors, any scale
    for X, ids in chunks:                   # X: (c, d) float32 stored rows (NaN rows: NULL)
        top.update(X, ids)
    for ids, scores in top.result(): ...    # best first, ties by id ascending

Over vectors already in memory (a memory-mapped cache, store.vector_cache) `cached_topk` does the
same in blocks with no per-chunk Python merge:

    cached_topk(Q, X, scale, k, take_ids)   # X: (n, d) float32 valid rows, scale: (n,) float32 1/‖x‖

one float32 GEMM and one argpartition per block of rows keep the best k + slack float32
candidates of each block, one numpy argpartition merges the blocks, and only the candidates
within `2·eps` of the k-th float32 score are re-scored in float64 from X itself (a second pass
for a query whose candidates do not reach that far: many near-ties).

Each chunk costs one float32 GEMM (b × d × c) and one argpartition per query. Exactness:
every row whose float32 score is within `2·eps` of the running k-th best is re-scored in
float64 (its stored float32 vector upcast, divided by its float64 norm, against the float64
unit query) and the final order uses those float64 scores, so the result is the float64
top-k whenever |float32 score − float64 score| ≤ eps. `cosine_error_bound(d)` is that eps:
the forward error of a d-term float32 dot product of unit vectors (γ_d ≤ d·u, u = 2⁻²⁴, plus
the rounding of the query and of the 1/‖x‖ scale), doubled for margin. Rows that are NULL,
zero or non-finite never score.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from clipsql.kernels.unit import normalize

U32 = 2.0 ** -24


def cosine_error_bound(d: int) -> float:
    """Upper bound on |float32 GEMM cosine − float64 cosine| for unit queries at width d."""
    return 2.0 * (d + 8) * U32


def unit_queries(Q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(b, d) → (float64 unit rows, valid mask); invalid (zero, NaN, inf) rows stay zero."""
    Q = np.asarray(Q, dtype=np.float64)
    return normalize(Q[None, :] if Q.ndim == 1 else Q, invalid=0.0)


def row_norms_sq(X: np.ndarray) -> np.ndarray:
    """float64 squared norms of float32 rows (NaN rows → NaN), without a float64 copy of X."""
    return np.einsum("ij,ij->i", X, X, dtype=np.float64)


def rescore(X: np.ndarray, q: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """float64 cosines of float32 rows X with unit q, given 1/‖x‖. An elementwise product summed per
    row (not BLAS, whose blocking can differ by a bit between rows): equal rows score equal, so
    ties are exact and broken by id."""
    return (X.astype(np.float64) * q).sum(axis=1) * inv


class RunningTopK:
    """The k best rows by cosine for each of b queries, over chunks seen one at a time."""

    def __init__(self, Q: np.ndarray, k: int):
        if k < 1:
            raise ValueError("k must be at least 1")
        self.k = int(k)
        self.Q64, valid = unit_queries(Q)
        if not valid.all():
            raise ValueError("every query vector must be non-zero and finite")
        self.Q32 = self.Q64.astype(np.float32)
        self.eps = cosine_error_bound(self.Q64.shape[1])
        b = len(self.Q64)
        self.floor = np.full(b, -np.inf)          # k-th best float64 score so far
        self._s: list[list[np.ndarray]] = [[] for _ in range(b)]
        self._ids: list[list[np.ndarray]] = [[] for _ in range(b)]
        self.scanned = 0                          # valid rows scored

    def update(self, X: np.ndarray, ids: np.ndarray, allowed: np.ndarray | None = None) -> None:
        """Score chunk X (c, d) float32 with `ids` (c,) (numpy str/object array); `allowed`: (c,) bool."""
        if len(X) == 0:
            return
        sq = row_norms_sq(X)
        ok = np.isfinite(sq) & (sq > 0)
        if allowed is not None:
            ok &= allowed
        idx = np.flatnonzero(ok)
        if len(idx) == 0:
            return
        Xv = X if len(idx) == len(X) else X[idx]
        inv = 1.0 / np.sqrt(sq[idx])
        S = self.Q32 @ Xv.T                        # (b, c') float32, the one GEMM
        S *= inv.astype(np.float32)[None, :]
        np.nan_to_num(S, copy=False, nan=-np.inf)  # a float32 overflow never scores
        self.scanned += len(idx)
        k, eps = self.k, self.eps
        for i in range(len(S)):
            s = S[i]
            thr = self.floor[i] - eps
            if len(s) > k:
                kth = np.partition(s, len(s) - k)[len(s) - k]
                thr = max(thr, float(kth) - 2 * eps)
            keep = np.flatnonzero(s >= thr)
            if len(keep) == 0:
                continue
            exact = rescore(Xv[keep], self.Q64[i], inv[keep])
            fin = np.isfinite(exact)
            self._merge(i, np.clip(exact[fin], -1.0, 1.0), np.asarray(ids)[idx[keep[fin]]])

    def _merge(self, i: int, s: np.ndarray, ids: np.ndarray) -> None:
        self._s[i].append(s)
        self._ids[i].append(ids)
        allv = np.concatenate(self._s[i])
        if len(allv) <= self.k:
            return
        kth = float(np.partition(allv, len(allv) - self.k)[len(allv) - self.k])
        keep = allv >= kth                         # ties at the k-th score stay (the final order needs ids)
        self._s[i] = [allv[keep]]
        self._ids[i] = [np.concatenate(self._ids[i])[keep]]
        self.floor[i] = kth

    def result(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query: (ids, float64 scores) of the k best, best first, ties by id ascending."""
        out = []
        for i in range(len(self._s)):
            if not self._s[i]:
                out.append((np.array([], dtype=object), np.array([], dtype=np.float64)))
                continue
            s = np.concatenate(self._s[i])
            ids = np.concatenate(self._ids[i])
            order = np.lexsort((ids.astype(str), -s))[: self.k]
            out.append((ids[order], s[order]))
        return out


def block_candidates(Q32: np.ndarray, X: np.ndarray, scale: np.ndarray, m: int,
                     rows: np.ndarray | None = None, block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The m best rows of X by float32 score `(Q32 @ x) * scale` for each query: (positions (b, m)
    int64 into X, float32 scores (b, m)), unordered. `rows`: score only these positions of X.
    Blocks of rows: one GEMM and one argpartition each, then one argpartition over the blocks'
    survivors (no Python merge per block). Every row left out scores at most the lowest kept."""
    b = len(Q32)
    n = len(X) if rows is None else len(rows)
    # a score block of ≤ 2M floats (8 MiB) stays in cache for its scaling and argpartition: at 100
    # queries 21k rows, ~20 % less CPU than 65k-row blocks (bench/README, 2026-12-04)
    block = int(block or max(4096, min(65536, (1 << 21) // max(b, 1))))
    keep_s, keep_i = [], []
    for start in range(0, n, block):
        stop = min(n, start + block)
        if rows is None:
            Xb, sb, pos = X[start:stop], scale[start:stop], None
        else:
            pos = rows[start:stop]
            Xb, sb = X[pos], scale[pos]
        S = Q32 @ Xb.T
        S *= sb
        c = S.shape[1]
        if c > m:
            p = np.argpartition(S, c - m, axis=1)[:, c - m:]
            S = np.take_along_axis(S, p, 1)
        else:
            p = np.broadcast_to(np.arange(c), (b, c))
        keep_s.append(S)
        keep_i.append(p + start if pos is None else pos[p])
    s = np.concatenate(keep_s, axis=1)
    i = np.concatenate(keep_i, axis=1).astype(np.int64, copy=False)
    if s.shape[1] > m:
        p = np.argpartition(s, s.shape[1] - m, axis=1)[:, s.shape[1] - m:]
        s, i = np.take_along_axis(s, p, 1), np.take_along_axis(i, p, 1)
    return i, s


def rows_above(q32: np.ndarray, X: np.ndarray, scale: np.ndarray, thr: float,
               rows: np.ndarray | None = None, block: int = 65536) -> np.ndarray:
    """Positions of the rows of X whose float32 score with one query is at least `thr`."""
    n = len(X) if rows is None else len(rows)
    out = []
    for start in range(0, n, block):
        pos = np.arange(start, min(n, start + block)) if rows is None else rows[start:start + block]
        Xb, sb = (X[start:start + block], scale[start:start + block]) if rows is None else (X[pos], scale[pos])
        s = (Xb @ q32) * sb
        out.append(pos[s >= thr])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def cached_topk(Q: np.ndarray, X: np.ndarray, scale: np.ndarray, k: int, take_ids: Callable[[np.ndarray], np.ndarray],
                rows: np.ndarray | None = None, slack: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact top-k of the valid float32 rows X (n, d) (finite, non-zero: the caller keeps only
    those) with `scale` = float32 1/‖x‖; `take_ids(positions)` → their ids; `rows`: only these
    positions (sorted int64). Per query: (ids, float64 cosines) best first, ties by id ascending,
    equal to the float64 top-k (the candidates are every row whose float32 score is within
    2·eps of the k-th best float32 score; see the module doc)."""
    if k < 1:
        raise ValueError("k must be at least 1")
    Q64, valid = unit_queries(Q)
    if not valid.all():
        raise ValueError("every query vector must be non-zero and finite")
    Q32 = Q64.astype(np.float32)
    n = len(X) if rows is None else len(rows)
    if n == 0:
        return [(np.array([], dtype=object), np.array([], dtype=np.float64)) for _ in Q64]
    eps = cosine_error_bound(Q64.shape[1])
    m = min(n, int(k) + max(int(slack), int(k) // 4))
    pos, s = block_candidates(Q32, X, scale, m, rows)
    kk = min(int(k), n)
    kth = np.partition(s, m - kk, axis=1)[:, m - kk].astype(np.float64)
    thr = kth - 2 * eps
    short = (m < n) & (s.min(axis=1) >= thr)      # a row left out may be within 2·eps: rescan
    out = []
    for i in range(len(Q64)):
        cand = rows_above(Q32[i], X, scale, thr[i], rows) if short[i] else pos[i][s[i] >= thr[i]]
        cand = np.sort(cand)
        Xc = np.asarray(X[cand], dtype=np.float32)
        exact = np.clip(rescore(Xc, Q64[i], 1.0 / np.sqrt(row_norms_sq(Xc))), -1.0, 1.0)
        ids = np.asarray(take_ids(cand))
        order = np.lexsort((ids.astype(str), -exact))[:k]
        out.append((ids[order], exact[order]))
    return out


def exact_topk(Q: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact top-k over an iterable of (X float32 (c, d), ids (c,)) chunks."""
    top = RunningTopK(Q, k)
    for X, ids in chunks:
        top.update(X, ids)
    return top.result()


def gemm_topk(Q: np.ndarray, X: np.ndarray, k: int, chunk: int = 32768, normalized: bool = False) -> np.ndarray:
    """The bare baseline (bench/search.py): normalized float32 GEMM + argpartition per chunk,
    indices only, no exactness margin, no NULL handling. (b, k) row indices, best first.
    `normalized`: X already holds unit rows (a peer that keeps them so in RAM): no norms."""
    Qh = (Q / np.linalg.norm(Q, axis=1, keepdims=True)).astype(np.float32)
    best_s = np.full((len(Q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(Q), 0), dtype=np.int64)
    for start in range(0, len(X), chunk):
        Xc = X[start:start + chunk]
        S = Qh @ Xc.T
        if not normalized:
            S /= np.linalg.norm(Xc, axis=1)[None, :]
        kk = min(k, S.shape[1])
        part = np.argpartition(-S, kk - 1, axis=1)[:, :kk]
        s = np.concatenate([best_s, np.take_along_axis(S, part, 1)], axis=1)
        ix = np.concatenate([best_i, part + start], axis=1)
        kk = min(k, s.shape[1])
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(ix, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1)
