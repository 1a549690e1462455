"""Streaming float64 sufficient statistics with a fixed shift.

For vectors x_1..x_n and a fixed shift c (the mean of the first batch ever seen):
    S1 = Σ (x − c),   S2 = Σ (x − c)(x − c)ᵀ
    mean = c + S1/n,  cov = S2/n − (S1/n)(S1/n)ᵀ   (population covariance, 1/n)
Unshifted sums lose ~8 significant digits when ‖mean‖ ≫ spread (raw CLIP vectors
sit far from the origin); with c ≈ mean the subtraction is benign. Updates are
additive, so a batch folds in with two BLAS calls and the totals do not depend on
how rows were batched (up to float64 rounding).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RunningMoments:
    dim: int
    n: int = 0
    shift: np.ndarray | None = None
    s1: np.ndarray = field(default=None)  # type: ignore[assignment]
    s2: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.s1 is None:
            self.s1 = np.zeros(self.dim, dtype=np.float64)
        if self.s2 is None:
            self.s2 = np.zeros((self.dim, self.dim), dtype=np.float64)

    def update(self, X: np.ndarray) -> None:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) vectors, got shape {X.shape}")
        if len(X) == 0:
            return
        if self.shift is None:
            self.shift = X.mean(axis=0)
        Xc = X - self.shift
        self.n += len(X)
        self.s1 += Xc.sum(axis=0)
        self.s2 += Xc.T @ Xc

    def merge(self, other: "RunningMoments") -> None:
        """Add another set of moments (e.g. a commit's partial) exactly: with δ = c_o − c,
        Σ(x − c) = S1_o + n_o·δ and Σ(x − c)(x − c)ᵀ = S2_o + S1_o δᵀ + δ S1_oᵀ + n_o δδᵀ."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {other.dim}-d moments into {self.dim}-d ones")
        if other.n == 0:
            return
        if self.shift is None:
            self.shift = other.shift.copy()
        delta = other.shift - self.shift
        self.n += other.n
        if not delta.any():
            self.s1 += other.s1
            self.s2 += other.s2
            return
        self.s1 += other.s1 + other.n * delta
        cross = np.outer(other.s1, delta)
        self.s2 += other.s2 + cross + cross.T + other.n * np.outer(delta, delta)

    def empty_like(self) -> "RunningMoments":
        """Zero moments with the same shift (so a later merge adds without rounding)."""
        out = RunningMoments(self.dim)
        out.shift = None if self.shift is None else self.shift.copy()
        return out

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
        if self.n == 0:
            return np.full((self.dim, self.dim), np.nan)
        d = self.s1 / self.n
        c = self.s2 / self.n - np.outer(d, d)
        return (c + c.T) / 2


def normalize_rows(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    return X / np.linalg.norm(X, axis=1, keepdims=True)
