"""Streaming float64 sufficient statistics with a fixed shift.

For vectors x_1..x_n and a fixed shift c (the mean of the first batch ever seen):
    S1 = Σ (x − c),   S2 = Σ (x − c)(x − c)ᵀ
    mean = c + S1/n,  cov = S2/n − (S1/n)(S1/n)ᵀ   (population covariance, 1/n)
Unshifted sums lose ~8 significant digits when ‖mean‖ ≫ spread (raw CLIP vectors
sit far from the origin); with c ≈ mean the subtraction is benign. Updates are
additive, so a batch folds in with two BLAS calls and the totals do not depend on
how rows were batched (up to float64 rounding); partials merge exactly (`merge`).

`second=False` keeps only the first moment (n, S1): the store keeps it for normalized
vectors, whose mean conformity needs and whose covariance no score uses, which halves
the d² work of every fold.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from clipsql.kernels.unit import normalize

FOLD_CHUNK = 4096   # rows cast to float64 at a time (16 MiB at d = 512, reused: no page faults)


@dataclass
class RunningMoments:
    dim: int
    n: int = 0
    shift: np.ndarray | None = None
    s1: np.ndarray = field(default=None)  # type: ignore[assignment]
    s2: np.ndarray | None = field(default=None)
    second: bool = True

    def __post_init__(self) -> None:
        if self.s1 is None:
            self.s1 = np.zeros(self.dim, dtype=np.float64)
        if self.s2 is None and self.second:
            self.s2 = np.zeros((self.dim, self.dim), dtype=np.float64)
        if self.s2 is not None:
            self.second = True

    def update(self, X: np.ndarray) -> None:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) vectors, got shape {X.shape}")
        if len(X) == 0:
            return
        if self.shift is None:
            self.shift = X[:FOLD_CHUNK].mean(axis=0, dtype=np.float64)
        buf = np.empty((min(len(X), FOLD_CHUNK), self.dim))
        for i in range(0, len(X), FOLD_CHUNK):
            part = X[i:i + FOLD_CHUNK]
            b = buf[:len(part)]
            np.copyto(b, part, casting="unsafe")
            b -= self.shift
            self.s1 += b.sum(axis=0)
            if self.second:
                self.s2 += b.T @ b
        self.n += len(X)

    def merge(self, other: "RunningMoments") -> None:
        """Add another set of moments (e.g. a commit's partial) exactly: with δ = c_o − c,
        Σ(x − c) = S1_o + n_o·δ and Σ(x − c)(x − c)ᵀ = S2_o + S1_o δᵀ + δ S1_oᵀ + n_o δδᵀ."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {other.dim}-d moments into {self.dim}-d ones")
        if other.n == 0:
            return
        if self.shift is None:
            self.shift = other.shift.copy()
        if self.second and not other.second:
            self.s2, self.second = None, False     # the merged moments keep what both have
        delta = other.shift - self.shift
        self.n += other.n
        if not delta.any():
            self.s1 += other.s1
            if self.second:
                self.s2 += other.s2
            return
        self.s1 += other.s1 + other.n * delta
        if self.second:
            cross = np.outer(other.s1, delta)
            self.s2 += other.s2 + cross + cross.T + other.n * np.outer(delta, delta)

    def subtract(self, other: "RunningMoments") -> None:
        """Remove rows whose moments are `other` (deleted or rewritten rows): the sums subtract,
        exactly as `merge` adds them (the same δ terms with the opposite sign)."""
        if other.n > self.n:
            raise ValueError(f"cannot remove {other.n} rows from moments of {self.n}")
        if other.n == 0:
            return
        if other.n == self.n:      # nothing left: back to empty (no rounding residue)
            self.n, self.shift = 0, None
            self.s1 = np.zeros(self.dim)
            self.s2 = np.zeros((self.dim, self.dim)) if self.second else None
            return
        neg = RunningMoments(other.dim, -other.n, other.shift, -other.s1,
                             None if other.s2 is None else -other.s2, second=other.second)
        self.merge(neg)

    @property
    def mean(self) -> np.ndarray:
        if self.n == 0:
            return np.full(self.dim, np.nan)
        return self.shift + self.s1 / self.n

    @property
    def sum(self) -> np.ndarray:
        """Σ x (unshifted), e.g. the normalized sum conformity needs."""
        if self.n == 0:
            return np.zeros(self.dim)
        return self.shift * self.n + self.s1

    @property
    def cov(self) -> np.ndarray:
        if not self.second:
            raise ValueError("these moments keep the mean only (no second moment)")
        if self.n == 0:
            return np.full((self.dim, self.dim), np.nan)
        d = self.s1 / self.n
        c = self.s2 / self.n - np.outer(d, d)
        return (c + c.T) / 2


def fold_pair(raw: RunningMoments, normalized: RunningMoments, X: np.ndarray) -> None:
    """Fold rows (any float dtype) into raw moments (mean + covariance) and the moments of the
    normalized rows, through one reused float64 buffer of FOLD_CHUNK rows: per chunk one cast,
    one row-norm pass, one GEMV (Σ x/‖x‖), one in-place centring and one SYRK (Xcᵀ Xc).
    NaN rows (NULL vectors: no text embedding for an image kept without a caption) are not rows
    of the statistics and are skipped."""
    X = np.asarray(X)
    if len(X) == 0:
        return
    if X.ndim != 2 or X.shape[1] != raw.dim:
        raise ValueError(f"expected (n, {raw.dim}) vectors, got shape {X.shape}")
    if X.dtype.kind == "f" and np.isnan(X[:, 0]).any():
        X = X[~np.isnan(X[:, 0])]
    n = len(X)
    if n == 0:
        return
    head = np.asarray(X[:FOLD_CHUNK], dtype=np.float64)
    if raw.shift is None:
        raw.shift = head.mean(axis=0)
    if normalized.shift is None:
        normalized.shift = normalize(head)[0].mean(axis=0)
    buf = np.empty((min(n, FOLD_CHUNK), raw.dim))
    for i in range(0, n, FOLD_CHUNK):
        b = buf[:min(FOLD_CHUNK, n - i)]
        np.copyto(b, X[i:i + FOLD_CHUNK], casting="unsafe")
        inv = 1.0 / np.sqrt(np.einsum("ij,ij->i", b, b))
        normalized.s1 += inv @ b - len(b) * normalized.shift
        if normalized.second:
            v = b * inv[:, None] - normalized.shift
            normalized.s2 += v.T @ v
        b -= raw.shift
        raw.s1 += b.sum(axis=0)
        if raw.second:
            raw.s2 += b.T @ b
    raw.n += n
    normalized.n += n
