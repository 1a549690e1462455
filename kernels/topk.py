"""Exact cosine top-k by chunked BLAS, pure numpy (a Ray task can import this alone).

    top = RunningTopK(Q, k)                 # Q: (b, d) query vectors, any scale
    for X, ids in chunks:                   # X: (c, d) float32 stored rows (NaN rows: NULL)
        top.update(X, ids)
    for ids, scores in top.result(): ...    # best first, ties by id ascending

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

from typing import Iterable

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


def exact_topk(Q: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact top-k over an iterable of (X float32 (c, d), ids (c,)) chunks."""
    top = RunningTopK(Q, k)
    for X, ids in chunks:
        top.update(X, ids)
    return top.result()


def gemm_topk(Q: np.ndarray, X: np.ndarray, k: int, chunk: int = 32768) -> np.ndarray:
    """The bare baseline (bench/search.py): normalized float32 GEMM + argpartition per chunk,
    indices only, no exactness margin, no NULL handling. (b, k) row indices, best first."""
    Qh = (Q / np.linalg.norm(Q, axis=1, keepdims=True)).astype(np.float32)
    best_s = np.full((len(Q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(Q), 0), dtype=np.int64)
    for start in range(0, len(X), chunk):
        Xc = X[start:start + chunk]
        S = Qh @ Xc.T
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
