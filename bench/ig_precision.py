"""Exact Information Gain: cost of the float64 logits (the default) against the float32 option,
and each one's error against a float64 brute force.

    python bench/ig_precision.py [--rows 4096] [--reference 10000] [--dim 512] [--repeats 3]

Synthetic CLIP-like float32 vectors (as stored). Prints rows/s of `scores.info_gain` with
logits="float64" and "float32" (best of --repeats, interleaved, BLAS pinned to one thread as in
the SQL functions) and their ratio, and the largest relative error of each against a brute
force (numpy float64, softmax then Σ π (log π − log p̄)) on the first 256 rows, at a = 1 and 10.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import numpy as np

from clipsql.kernels import scores


def data(rows: int, ref: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(ref + rows, dim))
    X = (shared + 0.8 * rng.normal(size=shared.shape) + 2.0).astype(np.float32)
    Y = (shared + 0.8 * rng.normal(size=shared.shape) - 1.0).astype(np.float32)
    return X[:ref], Y[:ref], X[ref:]


def brute(Q: np.ndarray, Yref: np.ndarray, lprior: np.ndarray, a: float) -> np.ndarray:
    unit = lambda V: V.astype(np.float64) / np.linalg.norm(V.astype(np.float64), axis=1, keepdims=True)  # noqa: E731
    z = a * unit(Q) @ unit(Yref).T
    lq = z - z.max(1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(1, keepdims=True))
    return (np.exp(lq) * (lq - lprior)).sum(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--reference", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits
    Xr, Yr, Q = data(args.rows, args.reference, args.dim)
    for a in (1.0, 10.0):
        f = scores.fit(Xr, Yr, a=a)
        want = brute(Q[:256], Yr, f.log_prior_text, a)
        best = {"float64": np.inf, "float32": np.inf}
        with threadpool_limits(limits=1, user_api="blas"):
            for _ in range(args.repeats):
                for logits in best:
                    t0 = time.perf_counter()
                    scores.info_gain(Q, f, "image", logits=logits)
                    best[logits] = min(best[logits], time.perf_counter() - t0)
        err = {k: float(np.max(np.abs(scores.info_gain(Q[:256], f, "image", logits=k) - want) / want))
               for k in best}
        rate = {k: args.rows / v for k, v in best.items()}
        print(f"a={a:g}: float64 {rate['float64']:,.0f} rows/s, float32 {rate['float32']:,.0f} rows/s, "
              f"float64 costs {best['float64'] / best['float32']:.2f}x; max rel error float64 "
              f"{err['float64']:.1e}, float32 {err['float32']:.1e}")


if __name__ == "__main__":
    main()
