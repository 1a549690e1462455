"""Curation-score math for clipsql (docs/science.md): pure numpy, float64 wherever it sums.

Inputs are raw ``(n, d)`` embeddings of any float dtype, normalized here (``x̂ = x/‖x‖``);
a non-finite or zero row has no score and gives NaN (the SQL layer's NULL).  Reference,
target and statistics arrays must be valid, else ``ValueError``.  Log-sum-exp is shifted
by the row maximum, or (where noted) by the logits' known upper bound when their range
is ≤ ``_MAX_LOG_SPAN`` (e^-600 is still a normal double).  Rows are chunked: memory is
O(chunk·M) for an M-row reference.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from clipsql.kernels.unit import normalize  # noqa: F401 - the one row normaliser, used by every score

KINDS = ("clip", "siglip")
PRIORS = ("posterior-mean", "uniform")
MODALITIES = ("image", "text")
# A reference row's own pair in its Information Gain (docs/science.md §1): left out (default), or
# kept in as the authors' DataComp code does (an explicit option, for reproducing them).
OWN_PAIR = ("exclude", "include")
_MAX_LOG_SPAN = 600.0


# --------------------------------------------------------------------------- helpers
def _rows(X, name="X", d=None) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows, dim); got shape {X.shape}")
    if d is not None and X.shape[1] != d:
        raise ValueError(f"{name} has dimension {X.shape[1]}, expected {d}")
    return X


def _vector(v, d, name) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    if v.shape != (d,):
        raise ValueError(f"{name} must have shape ({d},); got {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or inf")
    return v


def _all_valid(X, name) -> np.ndarray:
    Xh, valid = normalize(X)
    if len(Xh) == 0:
        raise ValueError(f"{name} is empty")
    if not valid.all():
        bad = int(np.flatnonzero(~valid)[0])
        raise ValueError(f"{name} row {bad} is zero, NaN or infinite; drop invalid rows first")
    return Xh


def _check_params(a, b, kind):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    if not (np.isfinite(a) and np.isfinite(b)):
        raise ValueError(f"a and b must be finite; got a={a!r}, b={b!r}")


def _lse(z, axis=-1) -> np.ndarray:
    """log Σ exp(z) along ``axis``, shifted by the maximum (stable; NaN rows stay NaN)."""
    m = np.max(z, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(z - m), axis=axis, keepdims=True)) + m
    return np.squeeze(out, axis=axis)


def _spans(n, chunk) -> list[slice]:
    c = max(1, int(chunk))
    return [slice(i, min(i + c, n)) for i in range(0, n, c)]


def _log_sigmoid(z, out=None) -> np.ndarray:
    """log σ(z) = min(z, 0) − log1p(exp(−|z|)), identical to ``-np.logaddexp(0, -z)``
    (stable for every z) but ~5x faster; ``out`` may be ``z`` itself."""
    z = np.asarray(z, dtype=np.float64)
    t = np.abs(z)
    np.negative(t, out=t)
    np.exp(t, out=t)
    np.log1p(t, out=t)
    out = np.minimum(z, 0.0, out=out)
    out -= t
    return out


def _logit_bounds(a, b, kind) -> tuple[float, float]:
    """Range of the logits a·cos (clip) or log σ(a·cos + b) (siglip) over cos ∈ [−1, 1]."""
    if kind == "clip":
        return -abs(a), abs(a)
    lo, hi = _log_sigmoid(np.array([b - abs(a), b + abs(a)]))
    return float(lo), float(hi)


def _logits(Qhat, Rhat, a, b, kind, out=None) -> np.ndarray:
    z = np.matmul(Qhat, Rhat.T, out=out)
    z *= a
    if kind == "siglip":
        z += b
        _log_sigmoid(z, out=z)
    return z


# --------------------------------------------------------------------------- basics
def raw_norm(Q) -> np.ndarray:
    """``raw_norm(x) = ‖x‖²`` on the RAW vector (NaN for invalid rows)."""
    Q = _rows(Q, "Q")
    with np.errstate(over="ignore"):  # ⟨q, q̂⟩ = ‖q‖ without overflowing q·q
        return np.einsum("ij,ij->i", np.where(np.isfinite(Q), Q, 0.0), normalize(Q)[0]) ** 2


def clip_score(X, Y) -> np.ndarray:
    """``clip_score(x, y) = cos(x, y)`` row-wise (NaN if either row is invalid)."""
    X, Y = _rows(X, "X"), _rows(Y, "Y")
    if X.shape != Y.shape:
        raise ValueError(f"X and Y must have the same shape; got {X.shape} and {Y.shape}")
    return np.einsum("ij,ij->i", normalize(X)[0], normalize(Y)[0])


def log_posterior(Qhat, Rhat, a=1.0, b=0.0, kind="clip") -> np.ndarray:
    """``(n, M)`` matrix of ``log π_j(q)`` for normalized queries over normalized reference rows.

    CLIP:   ``π_j(x) = exp(a·⟨x̂,ŷ_j⟩) / Σ_k exp(a·⟨x̂,ŷ_k⟩)``  (``b`` cancels and is ignored).
    SigLIP: ``π_j(x) = σ(a·⟨x̂,ŷ_j⟩ + b) / Σ_k σ(a·⟨x̂,ŷ_k⟩ + b)``, computed in log space.
    """
    Rhat = _rows(Rhat, "Rhat")
    Qhat = _rows(Qhat, "Qhat", Rhat.shape[1])
    _check_params(a, b, kind)
    z = _logits(Qhat, Rhat, a, b, kind)
    z -= _lse(z, axis=1)[:, None]
    return z


# --------------------------------------------------------------------------- §1-2 fit
@dataclass(frozen=True, eq=False)
class Fit:
    """Versioned statistics of a reference sample (see :func:`fit`)."""

    a: float
    b: float
    kind: str
    prior: str
    X_ref: np.ndarray
    Y_ref: np.ndarray
    log_prior_text: np.ndarray
    log_prior_image: np.ndarray
    mean_image: np.ndarray
    mean_text: np.ndarray
    cov_image: np.ndarray
    cov_text: np.ndarray
    factor_image: np.ndarray
    factor_text: np.ndarray

    @property
    def size(self) -> int:
        return int(self.X_ref.shape[0])

    @property
    def dim(self) -> int:
        return int(self.X_ref.shape[1])


def _posterior_mean_priors(Xh, Yh, a, b, kind, chunk):
    """``p̄^T_j = (1/M) Σ_i π_j(x_i)`` (row softmax of the logit matrix L_ij = logit(⟨x̂_i,ŷ_j⟩))
    and ``p̄^I_i = (1/M) Σ_j π_i(y_j)`` (column softmax of the same L), in log space.

    Two passes over row chunks of L (one matmul each, L never materialized).  If the
    logits' range is ≤ _MAX_LOG_SPAN they are shifted by their upper bound ``hi``:
    pass 1 gathers row sums, column sums and p̄^T; pass 2 gives p̄^I = E·(1/colsum)/M.
    Otherwise everything stays in log space (row LSE, running column LSE).
    """
    M = len(Xh)
    buf = np.empty((min(max(1, int(chunk)), M), M))
    logm = np.log(M)
    lo, hi = _logit_bounds(a, b, kind)
    fast = hi - lo <= _MAX_LOG_SPAN

    def block(sl):  # logits of reference images sl vs all texts; exp(L − hi) if fast
        L = _logits(Xh[sl], Yh, a, b, kind, out=buf[: sl.stop - sl.start])
        return np.exp(np.subtract(L, hi, out=L), out=L) if fast else L

    if fast:
        acc_t, colsum, lpi = np.zeros(M), np.zeros(M), np.empty(M)
        for sl in _spans(M, chunk):
            E = block(sl)
            colsum += E.sum(axis=0)
            acc_t += (1.0 / E.sum(axis=1)) @ E
        for sl in _spans(M, chunk):
            lpi[sl] = np.log(block(sl) @ (1.0 / colsum))
        return np.log(acc_t) - logm, lpi - logm
    row, col = np.empty(M), np.full(M, -np.inf)
    for sl in _spans(M, chunk):
        L = block(sl)
        row[sl] = _lse(L, axis=1)
        col = np.logaddexp(col, _lse(L, axis=0))
    acc_t, lpi = np.full(M, -np.inf), np.empty(M)
    for sl in _spans(M, chunk):
        L = block(sl)
        lpi[sl] = _lse(L - col[None, :], axis=1)
        L -= row[sl, None]
        acc_t = np.logaddexp(acc_t, _lse(L, axis=0))
    return acc_t - logm, lpi - logm


def _weighted_cov(V, w, u, chunk):
    """``G = Σ_i w_i (v_i − u)(v_i − u)ᵀ`` (chunked, symmetrized)."""
    G = np.zeros((V.shape[1], V.shape[1]))
    for sl in _spans(len(V), chunk):
        D = V[sl] - u
        G += (D * w[sl, None]).T @ D
    return (G + G.T) / 2


def _fisher_vectors(R, u, a, b, kind) -> np.ndarray:
    """The vectors whose prior-weighted covariance is the Fisher metric at the mean ``u``:
    ``R`` itself for CLIP (softmax of ``a⟨u, r_j⟩``); for SigLIP (normalized sigmoid, log-partition
    ``log Σ_j σ(a⟨u, r_j⟩ + b)``) the rows scaled by ``1 − σ(a⟨u, r_j⟩ + b)`` (docs/science.md §2)."""
    if kind != "siglip":
        return R
    z = a * (R @ u) + b
    one_minus_sigma = np.exp(_log_sigmoid(-z))       # 1 − σ(z) = σ(−z), stable for large |z|
    return R * one_minus_sigma[:, None]


def _psd_factor(G) -> np.ndarray:
    """``L`` with ``G = L Lᵀ``: eigh, negative eigenvalues clipped to 0, ``L = V·diag(√λ)``."""
    lam, V = np.linalg.eigh(G)
    return V * np.sqrt(np.clip(lam, 0.0, None))[None, :]


def fit(X_ref, Y_ref, a=1.0, b=0.0, kind="clip", prior="posterior-mean", chunk=2048) -> Fit:
    """Statistics of the reference sample (raw paired image/text rows, normalized here).

    * ``log_prior_text_j = log p̄^T_j``, ``p̄^T_j = (1/M) Σ_i π_j(x_i)`` (posterior over
      reference texts, averaged over reference images); ``log_prior_image`` mirrors it.
      ``prior="uniform"``: ``p̄_j = 1/M``.
    * ``ū_I = Σ_i p̄^I_i x̂_i``, ``ū_T = Σ_j p̄^T_j ŷ_j``,
      ``G_I = Σ_i p̄^I_i (x̂_i − ū_I)(x̂_i − ū_I)ᵀ``, ``G_T`` likewise, ``G = L Lᵀ``.
    * SigLIP: ``G_T = Σ_j p̄^T_j (g_j − ḡ)(g_j − ḡ)ᵀ`` with ``g_j = (1 − σ(a⟨ū_I, ŷ_j⟩ + b))·ŷ_j``,
      ``ḡ = Σ_j p̄^T_j g_j`` (the Fisher metric at ū_I); ``G_I`` mirrors it with ū_T and the x̂_i.

    Cost O(M²·d) flops for the posterior-mean prior, memory O(chunk·M + M·d + d²).
    """
    X_ref, Y_ref = _rows(X_ref, "X_ref"), _rows(Y_ref, "Y_ref")
    if X_ref.shape != Y_ref.shape:
        raise ValueError(f"X_ref and Y_ref must be paired rows of the same shape; got "
                         f"{X_ref.shape} and {Y_ref.shape}")
    _check_params(a, b, kind)
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}; got {prior!r}")
    Xh, Yh = _all_valid(X_ref, "X_ref"), _all_valid(Y_ref, "Y_ref")
    M = len(Xh)
    if prior == "uniform":
        lpt = np.full(M, -np.log(M))
        lpi = lpt.copy()
    else:
        lpt, lpi = _posterior_mean_priors(Xh, Yh, float(a), float(b), kind, chunk)
    pt, pi = np.exp(lpt), np.exp(lpi)
    u_i, u_t = pi @ Xh, pt @ Yh
    # the metric of the image approximation lives on the texts (and vice versa): for SigLIP the
    # gradient of log σ(z) is 1 − σ(z), so the Fisher metric at ū uses g_j = (1 − σ(a⟨ū, ŷ_j⟩ + b))·ŷ_j
    Gt = _fisher_vectors(Yh, u_i, a, b, kind)
    Gi = _fisher_vectors(Xh, u_t, a, b, kind)
    g_i, g_t = _weighted_cov(Gi, pi, pi @ Gi, chunk), _weighted_cov(Gt, pt, pt @ Gt, chunk)
    arrays = {"X_ref": Xh, "Y_ref": Yh, "log_prior_text": lpt, "log_prior_image": lpi,
                  "mean_image": u_i, "mean_text": u_t, "cov_image": g_i, "cov_text": g_t,
                  "factor_image": _psd_factor(g_i), "factor_text": _psd_factor(g_t)}
    for v in arrays.values():
        v.setflags(write=False)
    return Fit(a=float(a), b=float(b), kind=kind, prior=prior, **arrays)


def _side(fit_, modality):
    """(reference rows of the OTHER modality, their log prior, own-modality mean, other factor)."""
    if modality == "image":
        return fit_.Y_ref, fit_.log_prior_text, fit_.mean_image, fit_.factor_text
    if modality == "text":
        return fit_.X_ref, fit_.log_prior_image, fit_.mean_text, fit_.factor_image
    raise ValueError(f"modality must be one of {MODALITIES}; got {modality!r}")


def _einsum_rowdot(A, B) -> np.ndarray:
    return np.einsum("ij,ij->i", A, B)


_rowdot = getattr(np, "vecdot", None) or _einsum_rowdot    # Σ_j a_ij b_ij per row (np.vecdot: numpy ≥ 2)


# The logits of the exact scores come from a float64 GEMM (docs/science.md §1: within 1e-9 relative
# of a float64 brute force). `logits="float32"` is an explicitly requested fast path: the float32
# GEMM's accumulation error in a cosine (≤ ~6e-7 at d = 512) becomes |a|·6e-7 in a logit, so it is
# allowed only up to |a| = LOGITS_FLOAT32_MAX_SCALE, where tests/test_scores.py bounds its KL at
# LOGITS_FLOAT32_RTOL relative of the float64 path.
LOGITS = ("float64", "float32")
LOGITS_FLOAT32_MAX_SCALE = 10.0
LOGITS_FLOAT32_RTOL = 2e-6


def info_gain(Q, fit, modality, reverse=False, ref_index=None, logits="float64", chunk=512,
              block=1024, sub_rows=64, kernel=None) -> np.ndarray:
    """Information Gain ``KL(π(q) ‖ p̄) = Σ_j π_j(q)·(log π_j(q) − log p̄_j)`` (docs/science.md §1).

    ``modality="image"``: posterior over the reference texts, prior ``p̄^T``;
    ``"text"``: posterior over the reference images, prior ``p̄^I``.
    ``reverse=True``: ``KL(p̄ ‖ π(q)) = Σ_j p̄_j (log p̄_j − log π_j(q))`` (D_KLR).

    ``ref_index[i] = j ≥ 0`` says row i IS reference row j (−1 or ``None``: it is not). Its own
    pair is then left out: the posterior runs over the other M − 1 reference rows and the prior is
    restricted to them and renormalized, ``p̃_k = p̄_k / Σ_{l≠j} p̄_l``. Without ``ref_index`` every
    row is scored against the whole reference (the authors' behaviour for their reference rows).
    A row with no reference row left (M = 1, own pair out) is NaN.

    ``logits``: ``"float64"`` (default, within 1e-9 relative of a float64 brute force) or
    ``"float32"`` (a float32 GEMM, ~2× faster; only for ``|a| ≤ LOGITS_FLOAT32_MAX_SCALE``, where
    the error is within ``LOGITS_FLOAT32_RTOL`` relative). Rounding below 0 is clipped to 0.
    Cost O(M·d) per row, memory O(chunk·block).

    ``kernel``: another implementation of the tiled loop below, called as
    ``kernel(Qh, R, log_prior, own, a, b, kind, reverse)`` on the valid unit rows (float64) and
    returning their KL (``models.device``: the same loop in torch float64, e.g. on a GPU).

    Tiled like an online softmax: ``chunk`` rows × ``block`` reference columns at a time, one GEMM
    per tile (``a`` folded into the reference rows), everything after in float64 with one exp per
    logit. When every logit is known to lie in [−_MAX_LOG_SPAN, _MAX_LOG_SPAN] (CLIP: |a| ≤ 300;
    SigLIP: log σ(a·cos + b) ≥ −600) the shift m is 0: e = exp(z) is a normal double, and the tile
    is reduced in blocks of ``sub_rows`` rows that stay in cache (exp, then T and S, B in one
    product each: the work after the GEMM costs ~15% of it at d = 512). Otherwise per row it keeps
    the running maximum m over the included columns and, with e = exp(z − m) (rescaled when m grows),
    S = Σ e, T = Σ e·(z − m) and B = Σ e·(log p̄ + log M) for the forward KL, or D = Σ p̄·z for
    the reverse one; the own column is masked to −inf (so it adds nothing). Then, with
    W = Σ_{included} p̄ (1, or 1 − p̄_j for a reference row):
    ``KL = T/S − log(S/M) − B/S + log W`` and
    ``KL_R = (Σ_{incl} p̄(log p̄ + log M) − (D − m·W))/W − log W + log(S/M)``:
    every term is centred (log M taken out of the prior, m out of the logits), so a KL near 0
    is not the difference of two numbers near log M.
    """
    R, lprior, _, _ = _side(fit, modality)
    if logits not in LOGITS:
        raise ValueError(f"logits must be one of {LOGITS}; got {logits!r}")
    Qh, valid = normalize(_rows(Q, "Q", R.shape[1]))
    M = len(R)
    own_all = _ref_index(ref_index, len(Qh), M)
    out = np.full(len(Qh), np.nan)
    ids_all = np.flatnonzero(valid)
    if not len(ids_all):
        return out
    _check_params(fit.a, fit.b, fit.kind)
    if kernel is not None and logits == "float64":
        out[ids_all] = kernel(Qh[ids_all], R, lprior, own_all[ids_all], fit.a, fit.b, fit.kind, reverse)
        return out
    f32 = logits == "float32"
    if f32 and abs(fit.a) > LOGITS_FLOAT32_MAX_SCALE:
        raise ValueError(f"logits='float32' is bounded only for |a| <= {LOGITS_FLOAT32_MAX_SCALE:g}; "
                         f"this fit has a = {fit.a:g}: use the float64 default")
    # a folded into the reference rows once: the GEMM gives the logits a·⟨q̂, r⟩ directly
    Ra = R if fit.a == 1.0 else R * fit.a
    Rg = np.ascontiguousarray(Ra, dtype=np.float32 if f32 else np.float64)
    logm = np.log(M)
    pprior = np.exp(lprior)
    lcent = lprior + logm                      # log p̄ + log M: 0 for the uniform prior
    with_b = bool(np.any(lcent))               # B stays exactly 0 for the uniform prior
    h_cent = pprior @ lcent                    # Σ p̄ (log p̄ + log M)
    p_sum = pprior.sum()
    # Logits known to lie in [−_MAX_LOG_SPAN, _MAX_LOG_SPAN] (CLIP: |a| ≤ 300) need no shift: e^z is a
    # normal double, m stays 0 and there is no max or subtract pass over the tile.
    lo, hi = _logit_bounds(fit.a, fit.b, fit.kind)
    bounded = -_MAX_LOG_SPAN <= lo and hi <= _MAX_LOG_SPAN
    c, w = max(1, int(chunk)), max(1, min(int(block), M))
    sub = max(1, int(sub_rows))
    g = np.empty((min(c, len(ids_all)), w), dtype=np.float32) if f32 else None
    z = np.empty((min(c, len(ids_all)), w))
    e = np.empty((min(sub, z.shape[0]), w) if bounded else z.shape)
    sums = np.stack([np.ones(M), lcent])
    for sl in _spans(len(ids_all), c):
        ids = ids_all[sl]
        k = len(ids)
        q = Qh[ids].astype(Rg.dtype)
        own = own_all[ids]
        has_own = own >= 0
        m = np.zeros(k) if bounded else np.full(k, -np.inf)
        S, T, B, D = np.zeros(k), np.zeros(k), np.zeros(k), np.zeros(k)
        for cols in _spans(M, w):
            nb = cols.stop - cols.start
            zk = z[:k, :nb]
            if f32:
                np.matmul(q, Rg[cols].T, out=g[:k, :nb])
                np.copyto(zk, g[:k, :nb])
            else:
                np.matmul(q, Rg[cols].T, out=zk)
            if fit.kind == "siglip":
                zk += fit.b
                _log_sigmoid(zk, out=zk)
            hr = np.flatnonzero(has_own & (own >= cols.start) & (own < cols.stop))
            hc = own[hr] - cols.start
            if reverse:
                D += zk @ pprior[cols]
                D[hr] -= zk[hr, hc] * pprior[cols][hc]
            if bounded:
                # row blocks of `sub_rows` so that z and e stay in cache for their passes; the own
                # column's e is zeroed after the exp (its finite z then adds 0 to T)
                ones_lcent = sums[:, cols].T                   # (nb, 2): S and B in one product
                for rs in _spans(k, sub):
                    zs, es = zk[rs], e[: rs.stop - rs.start, :nb]
                    np.exp(zs, out=es)
                    if len(hr):
                        inside = (hr >= rs.start) & (hr < rs.stop)
                        es[hr[inside] - rs.start, hc[inside]] = 0.0
                    if reverse:
                        S[rs] += es @ ones_lcent[:, 0]
                        continue
                    T[rs] += _rowdot(es, zs)
                    sb = es @ ones_lcent
                    S[rs] += sb[:, 0]
                    B[rs] += sb[:, 1]
                continue
            ek = e[:k, :nb]
            zk[hr, hc] = -np.inf
            m_new = np.maximum(m, zk.max(axis=1))
            shift = np.where(np.isfinite(m_new), m_new, 0.0)
            rescale = np.exp(m - shift)                        # 0 while nothing was included yet
            np.subtract(zk, shift[:, None], out=zk)            # z − m (the own column stays −inf)
            np.exp(zk, out=ek)
            if not reverse:
                zk[hr, hc] = 0.0                               # e = 0 there: adds nothing to T
                moved = np.where(np.isfinite(m), m - shift, 0.0)
                T = rescale * (T + S * moved) + np.einsum("ij,ij->i", ek, zk)
                if with_b:
                    B = rescale * B + ek @ lcent[cols]
            S = S * rescale + ek.sum(axis=1)
            m = m_new
        p_own = np.where(has_own, pprior[np.maximum(own, 0)], 0.0)
        W = np.where(has_own, p_sum - p_own, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_w = np.where(has_own, np.log(W), 0.0)
            log_s = np.log(S / M)
            if reverse:
                h = h_cent - p_own * np.where(has_own, lcent[np.maximum(own, 0)], 0.0)
                kl = (h - (D - m * W)) / W - log_w + log_s
            else:
                kl = T / S - log_s - B / S + log_w
        kl[S <= 0] = np.nan                                    # no reference row left
        out[ids] = np.maximum(kl, 0.0)
    return out


# The quadratic forms of docs/science.md §2 are approximations: they run in float32 (the rate of a
# float32 GEMM) with the error bound derived in §2, tested against a float64 brute force
# (tests/test_scores.py); `precision="float64"` keeps the float64 evaluation.
PRECISIONS = ("float32", "float64")
_F32_SAFE_NORM2 = 2.0 ** -100     # a float32 ‖x‖² at or above this is a normal number, lost terms negligible


@dataclass(frozen=True, eq=False)
class QuadraticForm:
    """``scale · ‖Lᵀ(x̂ − ū)‖²`` prepared once per fit and modality (docs/science.md §2): ``mean`` ū
    and ``factor`` L (``None``: L = I, the centred norm) as C-contiguous float32, ``scale`` ½a² (or a²)."""

    mean: np.ndarray
    factor: np.ndarray | None
    scale: float

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


def quadratic_form(fit, modality, centered=False) -> QuadraticForm:
    """The float32 operands of ``info_gain_approx`` (``centered=False``) or ``centered_norm``."""
    _, _, u, L = _side(fit, modality)
    mean = np.ascontiguousarray(u, dtype=np.float32)
    factor = None if centered else np.ascontiguousarray(L, dtype=np.float32)
    for v in (mean, factor):
        if v is not None:
            v.setflags(write=False)
    return QuadraticForm(mean, factor, float(fit.a) ** 2 * (1.0 if centered else 0.5))


def _unit32(Q) -> tuple[np.ndarray, np.ndarray]:
    """``(x̂, valid)`` in float32: ‖x‖² summed in float32, then one division per entry. Rows whose
    float32 ‖x‖² is not finite or below ``_F32_SAFE_NORM2`` (huge, tiny, zero, NaN) go through the
    float64 ``normalize`` instead, so they are scaled before squaring, or NaN when invalid."""
    Q = np.asarray(Q)
    Q32 = Q if Q.dtype == np.float32 else Q.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        n2 = np.einsum("ij,ij->i", Q32, Q32)
    ok = np.isfinite(n2) & (n2 >= _F32_SAFE_NORM2)
    Xh = Q32 / np.sqrt(np.where(ok, n2, np.float32(1)))[:, None]
    valid = ok.copy()
    bad = np.flatnonzero(~ok)
    if len(bad):
        Bh, bvalid = normalize(Q[bad])
        Xh[bad], valid[bad] = Bh, bvalid
    return Xh, valid


def quadratic_scores(Q, form: QuadraticForm) -> np.ndarray:
    """``form.scale · ‖Lᵀ(x̂ − ū)‖²`` per row (NaN for invalid rows), in float32 up to the final sum:
    x̂ − ū in float32, one float32 GEMM by L per call, the squares summed in float64. Error bound:
    docs/science.md §2."""
    Q = np.asarray(Q)
    if Q.ndim != 2 or Q.shape[1] != form.dim:
        raise ValueError(f"Q must be a 2-D array (rows, {form.dim}); got shape {Q.shape}")
    Xh, _ = _unit32(Q)
    Xh -= form.mean
    Z = Xh if form.factor is None else Xh @ form.factor
    np.square(Z, out=Z)
    return form.scale * Z.sum(axis=1, dtype=np.float64)


def _check_precision(precision):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")


def info_gain_approx(Q, fit, modality, precision="float32") -> np.ndarray:
    """``½ a² (x̂ − ū_I)ᵀ G_T (x̂ − ū_I) = ½ a² ‖L_Tᵀ (x̂ − ū_I)‖²`` for images;
    text mirrors it: ``½ a² ‖L_Iᵀ (ŷ − ū_T)‖²``.  O(d²) per row. ``precision="float32"`` (default):
    ``quadratic_scores``, within the bound of docs/science.md §2; ``"float64"``: float64 throughout."""
    _check_precision(precision)
    if precision == "float32":
        return quadratic_scores(Q, quadratic_form(fit, modality))
    _, _, u, L = _side(fit, modality)
    Qh, _ = normalize(_rows(Q, "Q", len(u)))
    Z = (Qh - u) @ L
    return 0.5 * fit.a**2 * np.einsum("ij,ij->i", Z, Z)


def centered_norm(Q, fit, modality, precision="float32") -> np.ndarray:
    """``centered_norm(x) = a²‖x̂ − ū‖²`` with ``ū = ū_I`` (image) or ``ū_T`` (text); float32 as
    ``info_gain_approx`` (L = I) unless ``precision="float64"``."""
    _check_precision(precision)
    if precision == "float32":
        return quadratic_scores(Q, quadratic_form(fit, modality, centered=True))
    _, _, u, _ = _side(fit, modality)
    Qh, _ = normalize(_rows(Q, "Q", len(u)))
    D = Qh - u
    return fit.a**2 * np.einsum("ij,ij->i", D, D)


# --------------------------------------------------------------------------- §3 conformity
def conformity(Q, normalized_sum, count, member=True) -> np.ndarray:
    """Exact conformity ``C(v) = mean_{k≠j} cos(v_j, v_k)`` from ``m = (1/N) Σ_k v̂_k``.

    ``member=True`` (q ∈ S): ``(N·⟨q̂, m⟩ − 1)/(N − 1)``, NaN when N < 2.
    ``member=False``: ``⟨q̂, m⟩``, NaN when N < 1.
    """
    Qh, _ = normalize(_rows(Q, "Q"))
    s = _vector(normalized_sum, Qh.shape[1], "normalized_sum")
    N = float(count)
    if member and not N >= 2 or not N >= 1:
        return np.full(len(Qh), np.nan)
    dot = Qh @ (s / N)
    return (N * dot - 1.0) / (N - 1.0) if member else dot


def conformity_estimate(Q, normalized_mean) -> np.ndarray:
    """The paper's estimate ``Ĉ(v) = cos(v, m)`` with ``m = (1/N) Σ_k v̂_k`` the mean of the
    **normalized** vectors, as in the authors' code: an exact affine function of the conformity
    of a member, ``C = (N·‖m‖·Ĉ − 1)/(N − 1)``. NaN everywhere if ``m`` is zero."""
    Qh, _ = normalize(_rows(Q, "Q"))
    m = _vector(normalized_mean, Qh.shape[1], "normalized_mean")
    return Qh @ normalize(m[None, :])[0][0]


def conformity_estimate_raw(Q, raw_mean) -> np.ndarray:
    """``cos(v, m_raw)``, the cosine to the mean of the *raw* vectors: a different quantity from
    conformity (Pearson only ≈ 0.88 with it when raw norms vary widely); kept under its own name."""
    Qh, _ = normalize(_rows(Q, "Q"))
    m = _vector(raw_mean, Qh.shape[1], "raw_mean")
    return Qh @ normalize(m[None, :])[0][0]


# --------------------------------------------------------------------------- §5 CLIP losses
def _ref_index(ref_index, n, M) -> np.ndarray:
    if ref_index is None:
        return np.full(n, -1, dtype=np.int64)
    r = np.asarray(ref_index)
    if r.shape != (n,) or not np.issubdtype(r.dtype, np.integer):
        raise ValueError(f"ref_index must be an integer array of shape ({n},)")
    if ((r < -1) | (r >= M)).any():
        raise ValueError(f"ref_index values must be -1 or a reference row in [0, {M})")
    return r.astype(np.int64)


def _reference_subsets(M, batch_size, k, seed):
    """``R_1..R_K``: ``|B| = min(batch_size, M+1)``; with ``rng = np.random.default_rng(seed)``,
    ``R_k = rng.choice(M, size=|B|−1, replace=False)`` for k = 1..K in order.  When
    ``|B|−1 = M`` every R_k is the whole reference: one subset is returned (K identical)."""
    if int(batch_size) < 1 or int(k) < 1:
        raise ValueError("batch_size and k must be >= 1")
    size = min(int(batch_size), M + 1) - 1
    if size >= M:
        return [np.arange(M)]
    rng = np.random.default_rng(seed)
    return [rng.choice(M, size=size, replace=False) for _ in range(int(k))]


def _pair_chunks(F, G, fit_, ref_index, chunk):
    """Yield ``(ids, own=cos(f_i,g_i), C1=[⟨f_i,g_j⟩]_j, C2=[⟨f_j,g_i⟩]_j, r)`` per row chunk
    (j over the reference); also returns the output size first."""
    F, G = _rows(F, "F"), _rows(G, "G")
    if F.shape != G.shape:
        raise ValueError(f"F and G must have the same shape; got {F.shape} and {G.shape}")
    _rows(F, "F", fit_.dim)
    ref = _ref_index(ref_index, len(F), fit_.size)
    (Fh, vf), (Gh, vg) = normalize(F), normalize(G)
    ids_all = np.flatnonzero(vf & vg)
    yield len(F)
    for sl in _spans(len(ids_all), chunk):
        ids = ids_all[sl]
        f, g = Fh[ids], Gh[ids]
        yield ids, np.einsum("ij,ij->i", f, g), f @ fit_.Y_ref.T, g @ fit_.X_ref.T, ref[ids]


def _exclude_own(T, r):
    """B_k = {i} ∪ R_k holds i once: a reference row's own reference column adds 0."""
    rows = np.flatnonzero(r >= 0)
    T[rows, r[rows]] = 0.0


def _indicator(subsets, M):
    """(M, K) 0/1 matrix: column k marks R_k, so Σ_{j∈R_k} t_j = (t @ ind)_k."""
    ind = np.zeros((M, len(subsets)))
    for k, idx in enumerate(subsets):
        ind[idx, k] = 1.0
    return ind


def neg_clip_loss(F, G, fit, ref_index, tau=0.01, batch_size=32768, k=10, seed=0,
                  chunk=2048) -> np.ndarray:
    """negCLIPLoss, per-row stable form (Wang et al.; docs/science.md §5):

    ``cos(f_i,g_i) − (1/K) Σ_k (τ/2)·[LSE_{j∈B_k}(⟨f_i,g_j⟩/τ) + LSE_{j∈B_k}(⟨f_j,g_i⟩/τ)]``
    with ``B_k = {i} ∪ R_k`` (see ``_reference_subsets``), the pair i itself taken from
    (F, G) and counted once: a reference row (``ref_index[i] = r ≥ 0``) drops column r.
    LSEs are shifted by the bound 1/τ when 2/τ ≤ _MAX_LOG_SPAN (then Σ over R_k is a
    matmul with the 0/1 indicator of the R_k), else computed per subset by max-shift.
    """
    if not (np.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive number; got {tau!r}")
    it = _pair_chunks(F, G, fit, ref_index, chunk)
    out = np.full(next(it), np.nan)
    subsets = _reference_subsets(fit.size, batch_size, k, seed)
    inv = 1.0 / tau
    fast = 2.0 * inv <= _MAX_LOG_SPAN
    ind = _indicator(subsets, fit.size) if fast else None
    for ids, own, C1, C2, r in it:
        total = np.zeros((len(ids), len(subsets)))
        for C in (C1, C2):
            if fast:
                C -= 1.0
                C *= inv
                np.exp(C, out=C)
                _exclude_own(C, r)
                total += np.log(C @ ind + np.exp((own - 1.0) * inv)[:, None]) + inv
                continue
            for kk, idx in enumerate(subsets):
                pos = np.full(fit.size, -1)
                pos[idx] = np.arange(len(idx))
                T = np.concatenate([C[:, idx] * inv, (own * inv)[:, None]], axis=1)
                rows = np.flatnonzero((r >= 0) & (pos[np.maximum(r, 0)] >= 0))
                T[rows, pos[r[rows]]] = -np.inf
                total[:, kk] += _lse(T, axis=1)
        out[ids] = own - 0.5 * tau * total.mean(axis=1)
    return out


def neg_siglip_loss(F, G, fit, ref_index, a, b, batch_size=32768, k=10, seed=0,
                    chunk=2048) -> np.ndarray:
    """Negated per-sample SigLIP loss against the same K reference batches as negCLIPLoss.

    The SigLIP batch loss ``−(1/|B|) Σ_{i,j∈B} log σ(z_ij (a⟨f_i,g_j⟩ + b))`` (z = +1 on the
    diagonal, −1 off it) is split over samples: i owns its diagonal pair and half of
    each off-diagonal pair of its row and column.  Implemented, averaged over k:

    ``log σ(a·cos(f_i,g_i) + b) + ½ Σ_{j∈B_k\\{i}} [log σ(−a⟨f_i,g_j⟩ − b) + log σ(−a⟨f_j,g_i⟩ − b)]``

    (= −|B|·(sample i's share of the batch loss); higher is better; no 1/|B| factor).
    """
    if not (np.isfinite(a) and np.isfinite(b)):
        raise ValueError("a and b must be finite")
    it = _pair_chunks(F, G, fit, ref_index, chunk)
    out = np.full(next(it), np.nan)
    ind = _indicator(_reference_subsets(fit.size, batch_size, k, seed), fit.size)
    for ids, own, C1, C2, r in it:
        total = np.zeros((len(ids), ind.shape[1]))
        for C in (C1, C2):
            C *= -a
            C -= b
            _log_sigmoid(C, out=C)
            _exclude_own(C, r)
            total += C @ ind
        out[ids] = _log_sigmoid(a * own + b) + 0.5 * total.mean(axis=1)
    return out


def neg_clip_loss_pool(F, G, tau=0.01, batch_size=32768, k=10, seed=0,
                       chunk=2048, workers=1, progress=None) -> np.ndarray:
    """negCLIPLoss, pool form (reproduces the paper).

    Valid rows form the pool (invalid rows get NaN).  ``rng = default_rng(seed)``; for each
    of the K partitions ``perm = pool[rng.permutation(n_pool)]`` is cut into
    ``n_pool // batch_size`` batches of exactly ``batch_size``; the rows past the last full
    batch sit that partition out.  Per batch B the score of i is
    ``cos(f_i,g_i) − (τ/2)[LSE_{j∈B}(⟨f_i,g_j⟩/τ) + LSE_{j∈B}(⟨f_j,g_i⟩/τ)]``; a row's
    score is the mean over the partitions it took part in (NaN if none).
    Raises ``ValueError`` if the pool is smaller than ``batch_size``.

    Cost O(K·n·|B|·d) for the products plus 2·K·n·|B| exponentials: each batch's |B|×|B| logit
    matrix is computed once, in row chunks; a chunk gives its rows' LSE (image → text) and a
    running column maximum and sum of exponentials, merged over the chunks in order into each
    column's LSE (text → image), so the product is not repeated transposed. The chunks run on
    ``workers`` threads (numpy releases the GIL in products and ufuncs; the caller should give
    BLAS one thread each, else they oversubscribe the cores); each chunk's arithmetic is the same
    on any thread and the merge runs in chunk order, so the values do not depend on ``workers``
    (the chunk size moves only the last bits of the column LSE). ``progress(rows)`` is called
    after each chunk with the rows it scored (K · (n_pool // |B|) · |B| in all).
    """
    F, G = _rows(F, "F"), _rows(G, "G")
    if F.shape != G.shape:
        raise ValueError(f"F and G must have the same shape; got {F.shape} and {G.shape}")
    if not (np.isfinite(tau) and tau > 0) or int(k) < 1 or int(batch_size) < 1:
        raise ValueError("tau must be > 0, k and batch_size >= 1")
    (Fh, vf), (Gh, vg) = normalize(F), normalize(G)
    pool = np.flatnonzero(vf & vg)
    B = int(batch_size)
    if len(pool) < B:
        raise ValueError(f"the pool has {len(pool)} valid rows, fewer than batch_size={B}; "
                         "use a smaller batch_size or the per-row form")
    rng = np.random.default_rng(seed)
    total, count = np.zeros(len(F)), np.zeros(len(F))
    workers = max(1, int(workers or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="clipsql-pool") if workers > 1 else _Inline() as ex:
        for _ in range(int(k)):
            perm = pool[rng.permutation(len(pool))]
            for b0 in range(0, (len(pool) // B) * B, B):
                batch = perm[b0 : b0 + B]
                fb, gb = Fh[batch], Gh[batch]

                def part(sl, fb=fb, gb=gb):  # noqa: ANN001, ANN202 - one row chunk of the batch
                    z = fb[sl] @ gb.T
                    z /= tau
                    row = _lse(z, axis=1)                   # LSE_j ⟨f_i, g_j⟩/τ for the chunk's rows i
                    m = z.max(axis=0)
                    np.subtract(z, m, out=z)
                    np.exp(z, out=z)
                    return row, m, z.sum(axis=0)            # the columns' partial max and Σ exp
                spans = _spans(B, chunk)
                row_lse = np.empty(B)
                col_m, col_s = np.full(B, -np.inf), np.zeros(B)
                for sl, (row, m, s_) in zip(spans, ex.map(part, spans)):
                    row_lse[sl] = row
                    new_m = np.maximum(col_m, m)
                    col_s = col_s * np.exp(col_m - new_m) + s_ * np.exp(m - new_m)
                    col_m = new_m
                    if progress is not None:
                        progress(sl.stop - sl.start)
                col_lse = np.log(col_s) + col_m             # LSE_j ⟨f_j, g_i⟩/τ for each column i
                value = np.einsum("ij,ij->i", fb, gb) - 0.5 * tau * (row_lse + col_lse)
                total[batch] += value
                count[batch] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


class _Inline:
    """The ThreadPoolExecutor interface used above, run in the calling thread (one worker)."""

    def __enter__(self):  # noqa: ANN204
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        pass

    @staticmethod
    def map(fn, items):  # noqa: ANN001, ANN205
        return map(fn, items)


# --------------------------------------------------------------------------- §6 NormSim
def second_moment(T) -> np.ndarray:
    """``F_tᵀ F_t`` (d×d, uncentred) of the normalized target rows (all must be valid)."""
    Th = _all_valid(_rows(T, "T"), "T")
    return Th.T @ Th


def _quad(Qh, S) -> np.ndarray:
    return np.maximum(np.einsum("ij,ij->i", Qh @ S, Qh), 0.0)


def norm_sim_2(Q, second_moment) -> np.ndarray:
    """``norm_sim_2(x) = ‖F_t x̂‖₂ = sqrt(x̂ᵀ (F_tᵀF_t) x̂)``; O(d²) per row."""
    Qh, _ = normalize(_rows(Q, "Q"))
    S = np.asarray(second_moment, dtype=np.float64)
    if S.shape != (Qh.shape[1], Qh.shape[1]):
        raise ValueError(f"second_moment must be ({Qh.shape[1]}, {Qh.shape[1]}); got {S.shape}")
    return np.sqrt(_quad(Qh, S))


def norm_sim_inf(Q, T_hat, chunk=2048) -> np.ndarray:
    """``norm_sim_inf(x) = max_t |⟨f_t, x̂⟩|``, chunked over queries and targets
    (targets are (re)normalized; all must be valid)."""
    Th = _all_valid(_rows(T_hat, "T_hat"), "T_hat")
    Qh, valid = normalize(_rows(Q, "Q", Th.shape[1]))
    out = np.full(len(Qh), np.nan)
    ids_all = np.flatnonzero(valid)
    for sl in _spans(len(ids_all), chunk):
        ids = ids_all[sl]
        best = np.zeros(len(ids))
        for tl in _spans(len(Th), chunk):
            best = np.maximum(best, np.abs(Qh[ids] @ Th[tl].T).max(axis=1))
        out[ids] = best
    return out


def norm_sim_d(X, keep_fraction=0.2, steps=5, return_mask=False):
    """NormSim-D (no target data; docs/science.md §6), iteration implemented:

    ``K_0`` = all valid rows (n of them), ``S_0 = Σ_{x∈K_0} x̂ x̂ᵀ``.  For s = 1..steps:
    ``K_s`` = the top ``max(1, floor(keep_fraction**(s/steps)·n + ½))`` rows of ``K_{s-1}``
    by ``x̂ᵀ S_{s-1} x̂`` (exact count; ties: smaller row index), ``S_s = Σ_{x∈K_s} x̂ x̂ᵀ``
    (nested subsets, geometric schedule ending at ``keep_fraction`` of the valid rows).
    Score of every valid row: ``sqrt(x̂ᵀ S_steps x̂)`` = NormSim_2 against the final kept
    set.  ``return_mask=True`` also returns the boolean mask of ``K_steps``.
    """
    if not 0 < keep_fraction <= 1 or int(steps) < 1:
        raise ValueError("keep_fraction must be in (0, 1] and steps >= 1")
    Xh, valid = normalize(_rows(X, "X"))
    kept = np.flatnonzero(valid)
    if len(kept) == 0:
        raise ValueError("X has no valid row")
    n = len(kept)
    S = Xh[kept].T @ Xh[kept]
    for s in range(1, int(steps) + 1):
        count = max(1, int(np.floor(keep_fraction ** (s / steps) * n + 0.5)))
        kept = np.sort(kept[np.lexsort((kept, -_quad(Xh[kept], S)))[:count]])
        S = Xh[kept].T @ Xh[kept]
    out = np.sqrt(_quad(Xh, S))
    out[~valid] = np.nan
    if return_mask:
        mask = np.zeros(len(Xh), dtype=bool)
        mask[kept] = True
        return out, mask
    return out


# --------------------------------------------------------------------------- §7 importance weight
def importance_weight(Q, prompt_embedding, X_ref, a=10.0) -> np.ndarray:
    """``w(x) = exp(a·⟨x̂, ŷ_q⟩) / ((1/M) Σ_i exp(a·⟨x̂_i, ŷ_q⟩))`` over the reference images,
    computed as ``exp(a⟨x̂,ŷ_q⟩ − LSE_i(a⟨x̂_i,ŷ_q⟩) + log M)``.  ``X_ref`` may be a :class:`Fit`."""
    if isinstance(X_ref, Fit):
        X_ref = X_ref.X_ref
    Xr = _all_valid(_rows(X_ref, "X_ref"), "X_ref")
    Qh, _ = normalize(_rows(Q, "Q", Xr.shape[1]))
    yq = _all_valid(_vector(prompt_embedding, Xr.shape[1], "prompt_embedding")[None], "prompt")[0]
    if not np.isfinite(a):
        raise ValueError("a must be finite")
    log_z = _lse(a * (Xr @ yq)) - np.log(len(Xr))
    with np.errstate(over="ignore"):
        return np.exp(a * (Qh @ yq) - log_z)


# --------------------------------------------------------------------------- §8 geometry
def _raw_valid(V, name="V") -> np.ndarray:
    V = _rows(V, name)
    V = V[normalize(V)[1]]
    if len(V) == 0:
        raise ValueError(f"{name} has no valid row")
    return V


def offset_ratio(V) -> float:
    """``‖m‖/‖σ‖``: norm of the raw mean over norm of the per-feature std (ddof=0)."""
    V = _raw_valid(V)
    return float(np.linalg.norm(V.mean(axis=0)) / np.linalg.norm(V.std(axis=0)))


def thin_shell(V) -> dict:
    """``μ = E‖x − m‖``, ``var(‖x − m‖)``, ``sqrt(tr C)`` (C with ddof=0, so μ² + var = tr C)."""
    V = _raw_valid(V)
    D = V - V.mean(axis=0)
    r2 = np.einsum("ij,ij->i", D, D)
    r = np.sqrt(r2)
    return {"mu": float(r.mean()), "var": float(r.var()), "sqrt_trace": float(np.sqrt(r2.mean()))}


def separability(V_image, V_text) -> np.ndarray:
    """``Sep(l) = |m_I(l) − m_T(l)| / sqrt(var_I(l) + var_T(l))`` (ddof=0; 0/0 gives NaN)."""
    I, T = _raw_valid(V_image, "V_image"), _raw_valid(V_text, "V_text")
    if I.shape[1] != T.shape[1]:
        raise ValueError("V_image and V_text must have the same dimension")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(I.mean(axis=0) - T.mean(axis=0)) / np.sqrt(I.var(axis=0) + T.var(axis=0))


def off_diagonal_dominance(V) -> np.ndarray:
    """``ODD(l) = Σ_{k≠l} |C_lk| / C_ll`` of the raw covariance C (ddof=0)."""
    V = _raw_valid(V)
    D = V - V.mean(axis=0)
    C = np.abs(D.T @ D / len(V))
    diag = np.diag(C)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (C.sum(axis=1) - diag) / diag


def set_conformity(V) -> np.ndarray:
    """Exact conformity of every valid row of V within the set of V's valid rows."""
    Vh, valid = normalize(_rows(V, "V"))
    return conformity(V, Vh[valid].sum(axis=0), int(valid.sum()), member=True)


def geometry(V_image, V_text) -> dict:
    """All §8 statistics for one model: per modality offset ratio, thin shell, ODD and
    conformity distribution; plus per-feature separability."""
    out = {"separability": separability(V_image, V_text)}
    for name, V in (("image", V_image), ("text", V_text)):
        out[name] = {"offset_ratio": offset_ratio(V), "thin_shell": thin_shell(V),
                     "off_diagonal_dominance": off_diagonal_dominance(V),
                     "conformity": set_conformity(V)}
    return out


def vslerp(a, b, theta, alpha, m, eps=1e-6) -> np.ndarray:
    """``vSLERP(v_j, v_k, θ, α) = SLERP(v_j − αm, v_k − αm, θ) + αm`` with
    ``SLERP(p, q, θ) = sin((1−θ)Ω)/sin Ω · p + sin(θΩ)/sin Ω · q``, Ω the angle between p
    and q (computed as 2·atan2(‖p̂−q̂‖, ‖p̂+q̂‖)).  Falls back to ``(1−θ)p + θq`` when
    sin Ω < eps (Ω ≈ 0, or ≈ π where SLERP is undefined) or p or q is zero.
    ``a``, ``b``: (d,) or (n, d) raw vectors; ``theta`` ∈ [0, 1]."""
    va, vb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mm = np.asarray(m, dtype=np.float64)
    shift = float(alpha) * mm
    p, q = va - shift, vb - shift
    npn, nqn = np.linalg.norm(p, axis=-1, keepdims=True), np.linalg.norm(q, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        ph, qh = p / npn, q / nqn
        omega = 2.0 * np.arctan2(np.linalg.norm(ph - qh, axis=-1, keepdims=True),
                                 np.linalg.norm(ph + qh, axis=-1, keepdims=True))
        so = np.sin(omega)
        linear = ~(so >= eps) | (npn == 0) | (nqn == 0)
        so = np.where(linear, 1.0, so)
        w1 = np.where(linear, 1.0 - theta, np.sin((1.0 - theta) * omega) / so)
        w2 = np.where(linear, theta, np.sin(theta * omega) / so)
    return w1 * p + w2 * q + shift
