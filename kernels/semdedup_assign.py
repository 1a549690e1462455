"""SemDeDup's assignment (docs/science.md §10) by two levels, with the flat assignment's result.

Flat assignment (`semdedup.assign`) scores every row against all K centroids: K dot products a
row, so with K = √N the pass costs Θ(N^1.5). Here the K centroids are grouped into K1 ≈ √K
cells by a seeded spherical k-means over the centroids themselves (`Cells`); a row is scored
against the K1 cell centres, then against the centroids of its cells in the order of an upper
bound on what a cell can hold, until the best centroid found provably beats every cell not
opened. On clustered data a row opens a few cells: ≈ K1 + (a few)·K/K1 ≈ c·√K dot products
instead of K (the bench measures it: bench/dedup.py `--assign`).

Exactness. Cell g has a unit centre m_g and an angular radius θ_g = max over its centroids c of
∠(c, m_g). For a unit row x and any c in g, ∠(x, c) ≥ ∠(x, m_g) − θ_g (triangle inequality on
the sphere), so cos(x, c) ≤ UB_g(x) = cos(max(0, ∠(x, m_g) − θ_g)). The cosines to the centres
are float32 GEMMs, within δ (`semdedup.f32_tolerance`) of exact, so UB_g is taken at
cos(x, m_g) + δ. A row stops opening cells when b − δ > max UB over the unopened cells + η,
b its best float32 cosine so far (η = 1e-12 covers the float64 arccos/cos): every centroid not
looked at is then strictly below the one found. A row is settled by the float32 maximum only
when no other opened centroid is within 2δ(+η) of it (then the exact and float64 orders agree
with it); otherwise (near-ties, rare) the row is re-decided by the flat kernel over all K,
which is how the flat pass decides them too. So the labels and cosines are those of
`semdedup.assign`, whatever the data.

When it pays. The bound is the triangle inequality: it prunes when the clusters of centroids are
tight next to the angles between them (hierarchical data). In high dimension with a wide
isotropic spread inside the clusters (cos ≈ 0.5 between members, e.g. bench/dedup.py's synthetic
rows) it prunes almost nothing; a row that, after its first cell, would still have to open more
than MAX_OPEN of the cells is sent to the flat GEMM at once, so the cost there is K1 + one cell
+ K a row (a few % above flat), never wrong.

`Work` counts the dot products (coarse, fine, and the flat re-decisions) for tests and benches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from clipsql.kernels import semdedup as K

TWO_LEVEL_MIN_CLUSTERS = 2048   # below this the flat GEMM is as cheap (K1 + a few cells ≈ K)
CHUNK_ROWS = 16384              # rows scored together (their coarse scores: CHUNK_ROWS × K1 float32)
CELL_ITERATIONS = 10            # Lloyd steps of the k-means over the centroids (cost only, never results)
ETA = 1e-12                     # margin for the float64 arccos/cos of the bound
MAX_OPEN = 0.25                 # a row that must open more than this share of the cells goes flat
GIVE_UP_SHARE = 0.5             # after GIVE_UP_ROWS rows, if more than this share went flat: flat from then on
GIVE_UP_ROWS = 4096


@dataclass
class Work:
    """Dot products spent (per row: divide by `rows`)."""
    rows: int = 0
    coarse: int = 0
    fine: int = 0
    flat: int = 0
    flat_rows: int = 0
    cells_opened: int = 0

    @property
    def total(self) -> int:
        return self.coarse + self.fine + self.flat

    def per_row(self) -> float:
        return self.total / max(1, self.rows)


@dataclass
class Cells:
    """The centroids grouped into cells: `order` (fine centroid indices, cell by cell, ascending
    inside a cell), `starts` (K1 + 1 offsets into it), the unit cell centres (float64 and float32),
    the angular radii θ and the fine centroids (float64 unit, float32 copy in `order`)."""
    C64: np.ndarray
    centres64: np.ndarray
    centres32: np.ndarray
    order: np.ndarray
    starts: np.ndarray
    theta: np.ndarray
    fine32: np.ndarray = field(repr=False)
    fine32_t: list = field(repr=False, default_factory=list)   # per cell: (d, n_g) contiguous, for the GEMMs

    def __post_init__(self) -> None:
        # a small GEMM against a transposed view runs several times slower in OpenBLAS than
        # against a contiguous (d, n) block: one per cell, built once
        self.fine32_t = [np.ascontiguousarray(self.fine32[a:b].T)
                         for a, b in zip(self.starts[:-1].tolist(), self.starts[1:].tolist())]


def build_cells(C32: np.ndarray, k1: int | None = None, *, seed: int = 0) -> Cells:
    """Group the K centroids into k1 (default ⌈√K⌉) cells: seeded spherical k-means over the
    centroids (`semdedup.fit_units`), each centroid in the cell of its nearest centre (float64)."""
    C64 = K.unit_centroids(C32)
    k = len(C64)
    k1 = max(1, min(k, int(np.ceil(np.sqrt(k))) if k1 is None else int(k1)))
    live = np.flatnonzero(np.einsum("ij,ij->i", C64, C64) > 0)
    U = C64[live].astype(np.float32)
    k1 = max(1, min(k1, len(live)))
    M32, _ = K.fit_units(U, k1, np.random.default_rng(seed), CELL_ITERATIONS)
    M64 = K.unit_centroids(M32)
    cell = np.zeros(k, dtype=np.int64)
    cell[live] = np.argmax(C64[live] @ M64.T, axis=1)
    order = np.argsort(cell, kind="stable")
    starts = np.searchsorted(cell[order], np.arange(k1 + 1), side="left")
    cosc = np.einsum("ij,ij->i", C64, M64[cell])
    theta = np.zeros(k1)
    np.maximum.at(theta, cell, np.arccos(np.clip(cosc, -1.0, 1.0)))
    theta = np.minimum(theta + ETA, np.pi)
    return Cells(C64, M64, M64.astype(np.float32), order, starts, theta, C64[order].astype(np.float32))


def _bounds(S1: np.ndarray, theta: np.ndarray, delta: float) -> np.ndarray:
    """UB_g(x) for the float32 centre cosines S1 (rows × K1), float64."""
    phi = np.arccos(np.clip(S1.astype(np.float64) + delta, -1.0, 1.0))
    ub = np.cos(np.maximum(phi - theta[None, :], 0.0))
    return ub


def _two_level(Z: np.ndarray, cells: Cells, work: Work) -> np.ndarray:
    """Labels of the float64 unit rows Z (as `semdedup.assign` gives them)."""
    n = len(Z)
    d = Z.shape[1]
    delta = K.f32_tolerance(d)
    tol = 2.0 * delta + ETA
    U = Z.astype(np.float32)
    k1 = len(cells.centres32)
    S1 = U @ cells.centres32.T
    work.coarse += n * k1
    ub = _bounds(S1, cells.theta, delta)
    del S1
    sizes = np.diff(cells.starts)
    ub[:, sizes == 0] = -np.inf
    rank = np.argsort(-ub, axis=1, kind="stable")          # cells by bound, highest first
    ub_sorted = np.take_along_axis(ub, rank, axis=1)
    del ub
    best = np.full(n, -np.inf)
    lab = np.full(n, -1, dtype=np.int64)
    amb = np.zeros(n, dtype=bool)
    opened = 0
    pending = np.arange(n)
    step = 1
    while pending.size and opened < k1:
        hi = min(k1, opened + step)
        rr = np.repeat(pending, hi - opened)
        gg = rank[pending, opened:hi].ravel()
        o = np.argsort(gg, kind="stable")
        rr, gg = rr[o], gg[o]
        bounds = np.flatnonzero(np.r_[True, gg[1:] != gg[:-1], True])
        for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            g = int(gg[s])
            a, b = int(cells.starts[g]), int(cells.starts[g + 1])
            if a == b:
                continue
            r = rr[s:e]
            G = U[r] @ cells.fine32_t[g]
            work.fine += G.size
            work.cells_opened += len(r)
            am = G.argmax(axis=1)
            v = G[np.arange(len(r)), am].astype(np.float64)
            cnt = np.count_nonzero(G >= (v - tol - 1e-6)[:, None].astype(np.float32), axis=1) if b - a > 1 \
                else np.ones(len(r), dtype=np.int64)
            old = best[r]
            up = v > old
            # a new maximum: ambiguous if a second centroid of this cell or the old best is near it
            amb[r[up]] = (cnt[up] > 1) | (old[up] >= v[up] - tol)
            best[r[up]] = v[up]
            lab[r[up]] = cells.order[a + am[up]]
            near = ~up & (v >= old - tol)
            amb[r[near]] = True
        opened = hi
        nxt = ub_sorted[pending, opened] if opened < k1 else np.full(len(pending), -np.inf)
        pending = pending[~(best[pending] - delta > nxt + ETA)]
        if opened == 1 and pending.size:
            # cells that must still be opened whatever the rest holds (bound above the best so far):
            # where the bound prunes too little, the flat GEMM is cheaper than opening them one by one
            must = np.count_nonzero(ub_sorted[pending, 1:] > (best[pending] - delta - ETA)[:, None], axis=1)
            give_up = must > max(1, int(MAX_OPEN * k1))
            amb[pending[give_up]] = True
            pending = pending[~give_up]
        step *= 2
    fall = np.flatnonzero(amb)
    if fall.size:                                          # near-ties, and rows the bound fails: flat
        tol_flat = 2.0 * delta
        C64 = cells.C64
        Sf = Z[fall].astype(np.float32) @ C64.astype(np.float32).T
        work.flat += Sf.size
        work.flat_rows += len(fall)
        lab[fall] = K.labels_from_scores(Sf, lambda m: Z[fall[m]], C64, tol_flat)
    return lab


class Assigner:
    """Assignment to fixed centroids: flat below `threshold` clusters, two-level above (same
    labels and cosines either way). Build once per set of centroids, call `assign` per batch."""

    def __init__(self, C32: np.ndarray, *, threshold: int = TWO_LEVEL_MIN_CLUSTERS, k1: int | None = None,
                 work: Work | None = None, threads: int | None = 1):
        self.threads = threads          # the flat kernel's (`semdedup.assign`); None: one per CPU
        self.C32 = np.asarray(C32, dtype=np.float32)
        self.two_level = len(self.C32) >= threshold
        self.cells = build_cells(self.C32, k1) if self.two_level else None
        self.work = work if work is not None else Work()

    def assign(self, X: np.ndarray, inv: np.ndarray, valid: np.ndarray, rows: np.ndarray | None = None, *,
               progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(labels, cos) exactly as `semdedup.assign(X, inv, valid, C32, rows)`."""
        rows = np.arange(len(X)) if rows is None else np.asarray(rows, dtype=np.int64)
        if not self.two_level:
            self.work.rows += int(np.count_nonzero(valid[rows]))
            self.work.flat += int(np.count_nonzero(valid[rows])) * len(self.C32)
            return K.assign(X, inv, valid, self.C32, rows, progress=progress, threads=self.threads)
        labels = np.full(len(rows), -1, dtype=np.int64)
        cos = np.full(len(rows), np.nan)
        for a in range(0, len(rows), CHUNK_ROWS):
            part = rows[a:a + CHUNK_ROWS]
            ok = np.flatnonzero(valid[part])
            if ok.size:
                Z = K.unit64(X, inv, part[ok])
                lab = _two_level(Z, self.cells, self.work)
                self.work.rows += len(ok)
                labels[a + ok], cos[a + ok] = lab, K.centroid_cos(Z, self.cells.C64, lab)
            if progress:
                progress(len(part))
            if _not_paying(self.work):             # the same labels either way: stop paying the overhead
                self.two_level = False
                rest = rows[a + CHUNK_ROWS:]
                if rest.size:
                    labels[a + CHUNK_ROWS:], cos[a + CHUNK_ROWS:] = self.assign(X, inv, valid, rest,
                                                                                progress=progress)
                break
        return labels, cos


def _not_paying(work: Work) -> bool:
    """True when the bound sent most rows to the flat kernel (data without tight clusters)."""
    return work.rows >= GIVE_UP_ROWS and work.flat_rows > GIVE_UP_SHARE * work.rows


def label_units(U: np.ndarray, C32: np.ndarray, *, work: Work | None = None) -> np.ndarray:
    """The k-means assignment step on float32 unit rows U (as `semdedup.fit_units` does it flat:
    the rows' float64 values are U's own), two-level: the same labels."""
    cells = build_cells(C32)
    work = work if work is not None else Work()
    out = np.empty(len(U), dtype=np.int64)
    for a in range(0, len(U), CHUNK_ROWS):
        out[a:a + CHUNK_ROWS] = _two_level(U[a:a + CHUNK_ROWS].astype(np.float64), cells, work)
        work.rows += len(out[a:a + CHUNK_ROWS])
    return out


def fit_units(U: np.ndarray, k: int, rng: np.random.Generator, iterations: int, *,
              threshold: int = TWO_LEVEL_MIN_CLUSTERS, progress: Callable[[int], None] | None = None,
              work: Work | None = None, threads: int | None = 1) -> tuple[np.ndarray, dict]:
    """`semdedup.fit_units` with its assignment steps two-level when k ≥ threshold (the cells are
    rebuilt from each step's centroids): the same centroids, at ~√k instead of k products a row.
    `threads`: the flat fit's (`semdedup.fit_units`)."""
    if k < threshold:
        return K.fit_units(U, k, rng, iterations, progress=progress, threads=threads)
    work = work if work is not None else Work()
    state = {"two_level": True}

    def label(V: np.ndarray, C32: np.ndarray) -> np.ndarray:
        if not state["two_level"]:
            return Assigner(C32, threshold=len(C32) + 1, work=work).assign(V.astype(np.float32), np.ones(len(V)),
                                                                           np.ones(len(V), dtype=bool))[0]
        out = label_units(V, C32, work=work)
        state["two_level"] = not _not_paying(work)
        return out

    return K.fit_units(U, k, rng, iterations, progress=progress, label=label)
