"""The raw-embedding geometry of docs/science.md §8 (double-ellipsoid paper), numpy only.

Per modality, on the RAW vectors (invalid — zero or non-finite — rows left out and counted),
with m the mean, C the covariance (ddof=0) and σ = sqrt(diag C): the offset ratio ‖m‖/‖σ‖, the
thin shell (E‖x − m‖, var ‖x − m‖, sqrt(tr C)), off-diagonal dominance, exact conformity within
the modality, per-feature separability and a logistic separator on the two most separable
features (`compute_geometry`, streamed over batches twice). `ellipsoid` / `gaussian_loglik`
give the modality whose Gaussian makes a vector more likely (vslerp's centre choice).
The report around it (HTML, plots) is queries.present.geometry.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

from clipsql.errors import StatsError
from clipsql.kernels import scores
from clipsql.kernels.moments import RunningMoments

MODS = ("image", "text")
Batches = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def _valid(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(valid raw rows as float64, their normalized rows)."""
    X = np.asarray(X, dtype=np.float64)
    Xh, ok = scores.normalize(X)
    return X[ok], Xh[ok]


def logistic_separator(A: np.ndarray, B: np.ndarray, l2: float = 1e-6, iters: int = 100) -> dict:
    """Logistic regression of label 1 (rows of A) vs 0 (rows of B) on standardized features
    plus an intercept, by Newton steps; returns weights, the decision line in raw feature
    units (w·f + c = 0) and the train accuracy (``A·w + c > 0`` predicts 1)."""
    F = np.vstack([A, B]).astype(np.float64)
    y = np.concatenate([np.ones(len(A)), np.zeros(len(B))])
    mu, sd = F.mean(axis=0), F.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    Z = np.hstack([np.ones((len(F), 1)), (F - mu) / sd])
    w = np.zeros(Z.shape[1])
    reg = l2 * np.eye(len(w))
    reg[0, 0] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(Z @ w, -500, 500)))
        g = Z.T @ (p - y) + reg @ w
        H = (Z * (p * (1 - p))[:, None]).T @ Z + reg + 1e-12 * np.eye(len(w))
        step = np.linalg.solve(H, g)
        w -= step
        if np.abs(step).max() < 1e-9 * max(1.0, np.abs(w).max()):
            break
    pred = Z @ w > 0
    acc = float((pred == (y > 0.5)).mean())
    coef = w[1:] / sd
    return {"method": "logistic regression (Newton/IRLS, standardized features + intercept, L2 1e-6), "
                      "train accuracy",
            "weights_standardized": w.tolist(), "coef": coef.tolist(),
            "intercept": float(w[0] - coef @ mu), "accuracy": acc, "separates": acc == 1.0,
            "accuracy_image": float(pred[: len(A)].mean()) if len(A) else None,
            "accuracy_text": float(1 - pred[len(A):].mean()) if len(B) else None}


def _summary(v: np.ndarray) -> dict:
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"n": 0}
    q = np.quantile(v, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    return {"n": int(len(v)), "mean": float(v.mean()), "std": float(v.std()),
            **{k: float(x) for k, x in zip(("min", "p05", "p25", "median", "p75", "p95", "max"), q)}}


def _hist(v: np.ndarray, bins: int = 50) -> dict:
    v = v[np.isfinite(v)]
    counts, edges = np.histogram(v, bins=bins) if len(v) else (np.zeros(0), np.zeros(0))
    return {"counts": counts.astype(int).tolist(), "edges": edges.tolist()}


def compute_geometry(batches: Batches, top: int = 10) -> dict:
    """All §8 figures from ``batches()`` — an iterable of (image rows, text rows) raw arrays,
    called twice. Returns a dict with JSON-able scalars/lists and, under ``"_arrays"``,
    the per-row arrays the plots need."""
    mom: dict[str, RunningMoments] = {}
    nsum: dict[str, np.ndarray] = {}
    invalid = {m: 0 for m in MODS}
    for pair in batches():
        for mod, X in zip(MODS, pair):
            X = np.asarray(X)
            if mod not in mom:
                mom[mod], nsum[mod] = RunningMoments(X.shape[1]), np.zeros(X.shape[1])
            V, Vh = _valid(X)
            invalid[mod] += len(X) - len(V)
            mom[mod].update(V)
            nsum[mod] += Vh.sum(axis=0)
    if not mom or any(mom[m].n == 0 for m in MODS):
        raise StatsError("no valid image and text vectors to describe: ingest data first")
    out: dict[str, Any] = {"dim": int(mom["image"].dim)}
    mean = {m: mom[m].mean for m in MODS}
    cov = {m: mom[m].cov for m in MODS}
    var = {m: np.clip(np.diag(cov[m]), 0.0, None) for m in MODS}
    with np.errstate(invalid="ignore", divide="ignore"):
        sep = np.abs(mean["image"] - mean["text"]) / np.sqrt(var["image"] + var["text"])
    order = np.argsort(-np.where(np.isfinite(sep), sep, -np.inf), kind="stable")
    top_idx = order[: max(2, int(top))]
    f1, f2 = int(order[0]), int(order[1])
    out["separability"] = {
        "values": [None if not np.isfinite(s) else float(s) for s in sep], "summary": _summary(sep),
        "top": [{"feature": int(l), "sep": float(sep[l]), "mean_image": float(mean["image"][l]),
                 "mean_text": float(mean["text"][l]), "std_image": float(np.sqrt(var["image"][l])),
                 "std_text": float(np.sqrt(var["text"][l]))} for l in top_idx]}
    # pass 2: per-row distances to the mean, conformity, the two separator features
    r = {m: [] for m in MODS}
    conf = {m: [] for m in MODS}
    feat = {m: [] for m in MODS}
    for pair in batches():
        for mod, X in zip(MODS, pair):
            V, Vh = _valid(X)
            D = V - mean[mod]
            r[mod].append(np.sqrt(np.einsum("ij,ij->i", D, D)))
            n = mom[mod].n
            conf[mod].append((n * (Vh @ (nsum[mod] / n)) - 1.0) / (n - 1.0) if n >= 2 else np.full(len(V), np.nan))
            feat[mod].append(V[:, [f1, f2]])
    arrays: dict[str, Any] = {"separability": sep, "features": (f1, f2)}
    for mod in MODS:
        rr, cc = np.concatenate(r[mod]), np.concatenate(conf[mod])
        C = np.abs(cov[mod])
        diag = np.diag(C)
        with np.errstate(invalid="ignore", divide="ignore"):
            odd = (C.sum(axis=1) - diag) / diag
        sigma = np.sqrt(var[mod])
        out[mod] = {
            "n": int(mom[mod].n), "invalid": int(invalid[mod]),
            "mean_norm": float(np.linalg.norm(mean[mod])), "sigma_norm": float(np.linalg.norm(sigma)),
            "offset_ratio": float(np.linalg.norm(mean[mod]) / np.linalg.norm(sigma)) if sigma.any() else None,
            "thin_shell": {"mu": float(rr.mean()), "var": float(rr.var()),
                           "sqrt_trace": float(np.sqrt(max(np.trace(cov[mod]), 0.0))),
                           "relative_std": float(rr.std() / rr.mean()) if rr.mean() > 0 else None,
                           "histogram": _hist(rr)},
            "off_diagonal_dominance": {"values": [None if not np.isfinite(v) else float(v) for v in odd],
                                       "summary": _summary(odd), "histogram": _hist(odd)},
            "conformity": {"summary": _summary(cc), "histogram": _hist(cc)},
        }
        arrays[mod] = {"r": rr, "conformity": cc, "odd": odd, "features": np.concatenate(feat[mod])}
    sep_fit = logistic_separator(arrays["image"]["features"], arrays["text"]["features"])
    out["separator"] = {"features": [f1, f2], **sep_fit}
    out["_arrays"] = arrays
    return out


def ellipsoid(cache: dict, rec: Any, state: Any, modality: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, W = L⁻¹ with L Lᵀ = C + ridge, log det L) of one modality's running raw moments."""
    key = (rec.model_id, modality, state.covered_seq, state.n)
    if key not in cache:
        mom = state.moments[(modality, "raw")]
        C = mom.cov
        C = C + (1e-6 * max(float(np.trace(C)), 1e-300) / len(C)) * np.eye(len(C))
        L = np.linalg.cholesky(C)
        cache[key] = (mom.mean, np.linalg.inv(L), float(np.log(np.diag(L)).sum()))
    return cache[key]


def gaussian_loglik(X: np.ndarray, mean: np.ndarray, W: np.ndarray, logdet_l: float) -> np.ndarray:
    """log N(x; mean, C) up to the constant shared by both modalities: −½‖W(x − m)‖² − log det L."""
    Z = (X - mean) @ W.T
    return -0.5 * np.einsum("ij,ij->i", Z, Z) - logdet_l
