"""The one row normaliser: ``unit(x) = x/‖x‖`` row-wise in float64 (docs/science.md, Conventions).

A row that is zero or has a non-finite entry has no direction: it is flagged invalid and its
unit row is NaN (a score of it is NaN, which SQL shows as NULL). Callers that feed the unit rows
to a matrix product where an invalid row must contribute nothing pass ``invalid=0.0``.
"""
from __future__ import annotations

import numpy as np


def normalize(X, invalid: float = np.nan) -> tuple[np.ndarray, np.ndarray]:
    """``(Xhat, valid)`` of a 2-D array: ``x̂ = x/‖x‖`` per row in float64, and whether the row has a
    direction (finite and not zero). Invalid rows are ``invalid`` (NaN by default) in ``Xhat``.
    Rows whose ``‖x‖²`` is not a safe normal double (inf, NaN, or < 1e-200) are first divided by
    their largest |entry|, so huge or subnormal vectors normalize without overflow or underflow."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D array (rows, dim); got shape {X.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        n2 = np.einsum("ij,ij->i", X, X)
    valid = np.isfinite(n2) & (n2 > 1e-200)
    Xh = X / np.sqrt(np.where(valid, n2, 1.0))[:, None]
    bad = np.flatnonzero(~valid)
    if len(bad):
        B = X[bad]
        finite = np.isfinite(B).all(axis=1)
        B[~finite] = 0.0
        s = np.abs(B).max(axis=1) if X.shape[1] else np.zeros(len(bad))
        ok = finite & (s > 0)
        B /= np.where(ok, s, 1.0)[:, None]
        B /= np.sqrt(np.where(ok, np.einsum("ij,ij->i", B, B), 1.0))[:, None]
        B[~ok] = invalid
        Xh[bad], valid[bad] = B, ok
    return Xh, valid
