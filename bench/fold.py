"""The running-statistics fold against its GEMM bound, and what float32 block products would cost in precision.

    .venv/bin/python bench/fold.py [--rows 100000] [--dim 512] [--repeats 3] [--json fold.json]

One BLAS thread (as ingest pins it). For `rows` float32 CLIP-like rows (‖mean‖ ≫ spread), both
modalities as the writer folds them (`store.stats.update_moments`: raw mean + covariance, normalized mean):

* ``fold_cpu_s``: CPU seconds of the fold, best of `repeats`;
* ``syrk_cpu_s``: CPU seconds of the bare float64 SYRKs alone (``Xcᵀ Xc`` over the same chunks, both
  modalities): the fold's floor in float64; ``gemm_share`` = syrk ÷ fold (1.0: the fold is all GEMM);
* ``f32_cpu_s`` and ``f32_rel_err``: the covariance from float32 block products (float32 centring and
  SYRK per chunk, float64 accumulation across chunks; the raw covariance only, both modalities), its CPU and its largest error relative to the
  largest entry of the float64 brute-force covariance (the statistics must stay within 1e-9).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from _common import key_values, machine, write_json


def best_cpu(fn, repeats: int) -> float:  # noqa: ANN001
    out = []
    for _ in range(repeats):
        c0 = time.process_time()
        fn()
        out.append(time.process_time() - c0)
    return min(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from threadpoolctl import threadpool_limits
    from clipsql.kernels.moments import FOLD_CHUNK
    from clipsql.store.stats import StatsState, new_moments, update_moments
    threadpool_limits(limits=1, user_api="blas")
    rng = np.random.default_rng(0)
    centre = rng.normal(size=a.dim).astype(np.float32) * 0.5
    img = centre + rng.standard_normal((a.rows, a.dim), dtype=np.float32)
    txt = -centre + rng.standard_normal((a.rows, a.dim), dtype=np.float32)

    def fold() -> StatsState:
        state = StatsState("bench", new_moments(a.dim), 0)
        update_moments(state, img, txt)
        return state

    chunk = np.asarray(img[:FOLD_CHUNK], dtype=np.float64)

    def syrks() -> None:
        for _ in range(2):
            for i in range(0, a.rows, FOLD_CHUNK):
                b = chunk[:min(FOLD_CHUNK, a.rows - i)]
                b.T @ b

    shift = img[:FOLD_CHUNK].mean(axis=0, dtype=np.float64)

    def f32() -> np.ndarray:
        s1, s2 = np.zeros(a.dim), np.zeros((a.dim, a.dim))
        c32 = shift.astype(np.float32)
        for i in range(0, a.rows, FOLD_CHUNK):
            b = img[i:i + FOLD_CHUNK] - c32
            s1 += b.sum(axis=0, dtype=np.float64)
            s2 += b.T @ b
        m = s1 / a.rows
        return s2 / a.rows - np.outer(m, m)

    fold_s, syrk_s, f32_s = best_cpu(fold, a.repeats), best_cpu(syrks, a.repeats), best_cpu(f32, a.repeats)
    X = img.astype(np.float64)
    D = X - X.mean(axis=0)
    ref = D.T @ D / a.rows
    got = fold().moments[("image", "raw")].cov
    figures = {"machine": machine(), "rows": a.rows, "dim": a.dim, "fold_cpu_s": fold_s, "syrk_cpu_s": syrk_s,
               "gemm_share": syrk_s / fold_s,
               "fold_rel_err": float(np.abs(got - ref).max() / np.abs(ref).max()),
               "f32_cpu_s": 2 * f32_s,      # one modality timed, both folded
               "f32_rel_err": float(np.abs(f32() - ref).max() / np.abs(ref).max())}
    print(key_values({k: f"{v:.1e}" if k.endswith("_err") else v for k, v in figures.items() if k != "machine"}))
    write_json(a.json, figures)


if __name__ == "__main__":
    main()
