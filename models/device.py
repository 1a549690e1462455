"""The exact curation kernels on a torch device (a GPU when one is present), float64 throughout.

The heavy products have a device path, each plugged into the numpy kernel's own hook, so every
check, mask and formula around them stays the numpy code's:

* the exact Information Gain (docs/science.md §1): `info_gain` runs `kernels.scores.info_gain`
  with `kernel=` the same tiled online log-sum-exp loop written in torch float64 (one float64
  GEMM per tile on the device, the running max / rescaled sums there too). float64 like the
  numpy path, so within the 1e-9 relative bound of §1 (only the GEMM's summation order differs:
  ~1e-16 relative on a logit).
* SemDeDup's within-cluster Gram blocks (docs/science.md §10): `semdedup_gram` gives
  `kernels.semdedup.cluster_max_sim` a candidate generator (`semdedup.Gram`) that forms each
  (row block × column block) Gram block in float64 on the device and returns the pairs within
  8·γ_d of each row's block maximum. The stored value is then the numpy path's float64 `einsum`
  of the candidates, and the candidates always include the pair that maximizes it (both float64
  dot products are within γ_d of exact), so max_sim is the numpy path's, bit for bit.
* SemDeDup's assignment and k-means steps (`semdedup_nearest`, `semdedup_fit_label`): float64
  cosines to all K centroids on the device, near-ties decided by the numpy path's float64
  expression: the flat kernel's labels (on a GPU the flat product beats the two-level one).

`device`: "numpy" (the numpy kernels), "auto" (CUDA when torch is installed and sees a GPU, else
numpy), "cpu", "cuda" or "cuda:N" (torch on that device; "cpu" runs the device code path on the
CPU: it is what the tests run where there is no GPU). None: $CLIPSQL_DEVICE, else "numpy".
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
from typing import Callable

import numpy as np

from clipsql.errors import SettingError
from clipsql.kernels import scores
from clipsql.kernels import semdedup as K
from clipsql.kernels import semdedup_assign as A
from clipsql.lazy import torch

DEVICE_ENV = "CLIPSQL_DEVICE"
CHOICES = "numpy, auto, cpu, cuda or cuda:N"
UPLOAD_ROWS = 65536          # rows copied to the device at a time


class DeviceError(SettingError):
    """A device that does not exist here, or a name that is not one."""


def resolve(device: str | None = None) -> str | None:
    """The torch device to run on, or None for the numpy kernels."""
    name = os.environ.get(DEVICE_ENV, "numpy") if device is None else device
    name = str(name).strip().lower()
    if name in ("", "numpy"):
        return None
    if name == "auto":
        if importlib.util.find_spec("torch") is None:
            return None
        return "cuda" if torch.cuda.is_available() else None
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise DeviceError(f"device must be one of {CHOICES}; got {device!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r}: torch sees no CUDA GPU here (use auto, cpu or numpy)")
        idx = int(name.split(":")[1]) if ":" in name else 0
        if idx >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    return name


# --------------------------------------------------------------------------- Information Gain
_RESIDENT: dict[tuple[int, str], tuple[np.ndarray, object]] = {}
RESIDENT_MAX = 4


def _resident(R: np.ndarray, dev: object) -> object:
    """R (a fit's reference rows: read-only) as a float64 tensor on `dev`, uploaded once for the
    last few fits (a SQL query scores its rows in many small batches against the same fit)."""
    key = (id(R), str(dev))
    hit = _RESIDENT.get(key)
    if hit is not None and hit[0] is R:
        return hit[1]
    T = torch.tensor(np.asarray(R, dtype=np.float64), device=dev)   # a copy: torch refuses to alias read-only memory
    if R.flags.writeable:               # a caller's array may change: no cache
        return T
    while len(_RESIDENT) >= RESIDENT_MAX:
        _RESIDENT.pop(next(iter(_RESIDENT)))
    _RESIDENT[key] = (R, T)
    return T


def info_gain_kernel(device: str, chunk: int = 4096, block: int = 8192) -> Callable:
    """The tiled loop of `scores.info_gain` in torch float64 on `device` (its `kernel=` hook)."""
    dev = torch.device(device)
    f64 = torch.float64

    def kernel(Qh: np.ndarray, R: np.ndarray, lprior: np.ndarray, own: np.ndarray, a: float, b: float,
               kind: str, reverse: bool) -> np.ndarray:
        M = len(R)
        Rt = _resident(R, dev)
        logm = math.log(M)
        pprior_np = np.exp(lprior)
        lcent_np = lprior + logm
        pprior = torch.as_tensor(pprior_np, dtype=f64, device=dev)
        lcent = torch.as_tensor(lcent_np, dtype=f64, device=dev)
        h_cent = float(pprior_np @ lcent_np)
        p_sum = float(pprior_np.sum())
        w = max(1, min(int(block), M))
        out = np.empty(len(Qh))
        for lo in range(0, len(Qh), max(1, int(chunk))):
            hi = min(len(Qh), lo + max(1, int(chunk)))
            k = hi - lo
            q = torch.as_tensor(np.ascontiguousarray(Qh[lo:hi], dtype=np.float64), device=dev)
            own_k = own[lo:hi]
            has_own_np = own_k >= 0
            own_t = torch.as_tensor(own_k, device=dev)
            m = torch.full((k,), -math.inf, dtype=f64, device=dev)
            S, T, B, D = (torch.zeros(k, dtype=f64, device=dev) for _ in range(4))
            for c0 in range(0, M, w):
                c1 = min(M, c0 + w)
                z = q @ Rt[c0:c1].T
                z *= a
                if kind == "siglip":
                    z += b
                    z = torch.nn.functional.logsigmoid(z)
                hr = torch.nonzero((own_t >= c0) & (own_t < c1)).flatten()
                hc = own_t[hr] - c0
                if reverse:
                    D += z @ pprior[c0:c1]
                    D[hr] -= z[hr, hc] * pprior[c0:c1][hc]
                z[hr, hc] = -math.inf
                m_new = torch.maximum(m, z.max(dim=1).values)
                shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
                rescale = torch.exp(m - shift)
                z -= shift[:, None]
                e = torch.exp(z)
                if not reverse:
                    z[hr, hc] = 0.0
                    moved = torch.where(torch.isfinite(m), m - shift, torch.zeros_like(m))
                    T = rescale * (T + S * moved) + (e * z).sum(dim=1)
                    B = rescale * B + e @ lcent[c0:c1]
                S = S * rescale + e.sum(dim=1)
                m = m_new
            S_, T_, B_, D_, m_ = (t.cpu().numpy() for t in (S, T, B, D, m))
            p_own = np.where(has_own_np, pprior_np[np.maximum(own_k, 0)], 0.0)
            W = np.where(has_own_np, p_sum - p_own, 1.0)
            with np.errstate(divide="ignore", invalid="ignore"):
                log_w = np.where(has_own_np, np.log(W), 0.0)
                log_s = np.log(S_ / M)
                if reverse:
                    h = h_cent - p_own * np.where(has_own_np, lcent_np[np.maximum(own_k, 0)], 0.0)
                    kl = (h - (D_ - m_ * W)) / W - log_w + log_s
                else:
                    kl = T_ / S_ - log_s - B_ / S_ + log_w
            kl[S_ <= 0] = np.nan
            out[lo:hi] = np.maximum(kl, 0.0)
        return out

    return kernel


def info_gain(Q, fit, modality, reverse=False, ref_index=None, *, device: str | None = None,
              chunk: int = 512, block: int = 2048) -> np.ndarray:
    """`scores.info_gain` (exact, float64) on `device` (see the module docstring)."""
    dev = resolve(device)
    kernel = info_gain_kernel(dev) if dev is not None else None
    return scores.info_gain(Q, fit, modality, reverse=reverse, ref_index=ref_index, chunk=chunk, block=block,
                            kernel=kernel)


# --------------------------------------------------------------------------- SemDeDup
ASSIGN_ROWS = 8192           # rows scored against all centroids at once on a device


def semdedup_nearest(C32: np.ndarray, device: str | None = None) -> Callable[[np.ndarray], np.ndarray] | None:
    """The assignment's labels on the device (`semdedup.assign(nearest=)`, the k-means steps'
    `label`): float64 cosines to all centroids there, the argmax, and for a row with another
    centroid within 8·γ_d of it the numpy path's float64 `einsum` decides among those (largest,
    then lowest index): the flat kernel's labels. None: the numpy kernel."""
    dev_name = resolve(device)
    if dev_name is None:
        return None
    dev = torch.device(dev_name)
    C64 = K.unit_centroids(C32)
    Ct = torch.as_tensor(np.ascontiguousarray(C64.T), device=dev)
    tol = 8.0 * gamma(C64.shape[1] + 2)

    def nearest(Z: np.ndarray) -> np.ndarray:
        lab = np.empty(len(Z), dtype=np.int64)
        for lo in range(0, len(Z), ASSIGN_ROWS):
            Zc = np.ascontiguousarray(Z[lo:lo + ASSIGN_ROWS], dtype=np.float64)
            G = torch.as_tensor(Zc, device=dev) @ Ct
            bm, am = G.max(dim=1)
            near = G >= (bm - tol)[:, None]
            multi_t = torch.nonzero(near.sum(dim=1) > 1).flatten()
            part = am.cpu().numpy()
            if multi_t.numel():
                r_t, c_t = torch.nonzero(near[multi_t], as_tuple=True)
                multi, r, c = multi_t.cpu().numpy(), r_t.cpu().numpy(), c_t.cpu().numpy()
                v = np.einsum("ij,ij->i", Zc[multi][r], C64[c])
                o = np.lexsort((c, -v, r))          # per row: largest float64 cosine, then lowest cluster
                first = np.r_[True, r[o][1:] != r[o][:-1]]
                part[multi[r[o][first]]] = c[o][first]
            lab[lo:lo + len(Zc)] = part
        return lab

    return nearest


def semdedup_assigner(C32: np.ndarray, device: str | None = None, threads: int | None = 1
                      ) -> Callable[[np.ndarray, np.ndarray, np.ndarray, Callable[[int], None] | None],
                                    tuple[np.ndarray, np.ndarray]]:
    """(X, inv, valid, progress) → (labels, cos) to the centroids C32: on the device when one is
    chosen (flat there), else flat or two-level by K (`semdedup_assign.Assigner`, the flat kernel on
    `threads` threads; None: one per CPU); the same labels and cosines (`semdedup.assign`'s)
    whatever the batch a row comes in."""
    nearest = semdedup_nearest(C32, device)
    if nearest is not None:
        return lambda X, inv, valid, progress: K.assign(X, inv, valid, C32, chunk=ASSIGN_ROWS, progress=progress,
                                                        nearest=nearest)
    assigner = A.Assigner(C32, threads=threads)
    return lambda X, inv, valid, progress: assigner.assign(X, inv, valid, progress=progress)


def semdedup_fit_label(device: str | None = None) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    """The k-means assignment step on the device (`semdedup.fit_units(label=)`): same labels."""
    if resolve(device) is None:
        return None
    return lambda U, C32: semdedup_nearest(C32, device)(U.astype(np.float64))


def gamma(m: int) -> float:
    u = 2.0 ** -53
    return m * u / (1.0 - m * u)


def semdedup_gram(device: str | None = None) -> K.Gram | None:
    """A `semdedup.Gram` on the resolved device (None: the numpy kernel's float32 GEMM)."""
    dev_name = resolve(device)
    if dev_name is None:
        return None
    dev = torch.device(dev_name)
    masks: dict[int, object] = {}

    def gram(rows64: Callable[[int, int], np.ndarray], n: int) -> K.Pairs:
        first = rows64(0, min(n, UPLOAD_ROWS))
        d = first.shape[1]
        tol = 8.0 * gamma(d + 2)
        T = torch.empty((n, d), dtype=torch.float64, device=dev)
        T[:len(first)] = torch.as_tensor(first, device=dev)
        for lo in range(len(first), n, UPLOAD_ROWS):
            hi = min(n, lo + UPLOAD_ROWS)
            T[lo:hi] = torch.as_tensor(rows64(lo, hi), device=dev)

        def pairs(a: int, b: int, p: int, q: int) -> tuple[np.ndarray, np.ndarray]:
            G = T[a:b] @ T[p:q].T
            if p == a:                          # the diagonal block: strictly earlier columns only
                m = b - a
                if m not in masks:
                    masks[m] = torch.triu(torch.ones((m, m), dtype=torch.bool, device=dev))
                G.masked_fill_(masks[m], -math.inf)
            bm = G.max(dim=1).values
            near = (G >= (bm - tol)[:, None]) & torch.isfinite(bm)[:, None]
            r, c = torch.nonzero(near, as_tuple=True)
            return r.cpu().numpy(), c.cpu().numpy()

        return pairs

    return gram
