"""Growth laws of what a DataComp-scale run does per row, measured at ≥ 3 sizes in one run.

    .venv/bin/python bench/growth.py [--sizes 1000000,2000000,4000000,8000000] [--batch 10000]

For each mechanism whose cost could grow faster than the data, it measures the total cost of a
run at each size, fits the growth exponent (least squares on log cost vs log rows; 1.0 = linear)
and extrapolates the per-run cost to DataComp medium (128M), large (1.28B) and xlarge (12.8B).

Measured so far:
* in-run id de-duplication (`clipsql.ingest.dedup`: string ids → 64-bit fingerprints → the
  fingerprint set, look-up then insert per batch of `--batch` rows, as an ingest does): seconds,
  and counted work (slots probed + keys moved), and bytes held per row.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pyarrow as pa

from clipsql.ingest.dedup import fingerprints
from clipsql.kernels.idset import FingerprintSet

TARGETS = {"DataComp medium": 128e6, "DataComp large": 1.28e9, "DataComp xlarge": 12.8e9}


def fit_exponent(sizes: list[int], costs: list[float]) -> tuple[float, float]:
    x, y = np.log(np.asarray(sizes, float)), np.log(np.asarray(costs, float))
    b, a = np.polyfit(x, y, 1)
    return float(b), float(a)


def dedup_run(n_rows: int, batch: int) -> dict:
    fs = FingerprintSet()
    t_hash = t_set = 0.0
    for start in range(0, n_rows, batch):
        ids = pa.array(np.char.add("uid-", np.arange(start, start + batch).astype(str)))
        t0 = time.perf_counter()
        h = fingerprints(ids)
        t1 = time.perf_counter()
        hit = fs.contains(h)
        fs.add(h[~hit])
        t2 = time.perf_counter()
        t_hash += t1 - t0
        t_set += t2 - t1
    return {"rows": n_rows, "hash_s": t_hash, "set_s": t_set, "work": fs.work, "bytes_per_row": fs.nbytes / n_rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000000,2000000,4000000,8000000")
    ap.add_argument("--batch", type=int, default=10_000)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = [dedup_run(n, args.batch) for n in sizes]
    print("in-run id de-duplication (fingerprint set), per run:")
    print(f"{'rows':>12} {'set s':>8} {'hash s':>8} {'work/row':>9} {'B/row':>6}")
    for r in runs:
        print(f"{r['rows']:>12,} {r['set_s']:>8.2f} {r['hash_s']:>8.2f} {r['work'] / r['rows']:>9.2f} "
              f"{r['bytes_per_row']:>6.1f}")
    for what in ("set_s", "work"):
        b, a = fit_exponent(sizes, [r[what] for r in runs])
        ext = ", ".join(f"{k} {math.exp(a) * n ** b / (3600 if what == 'set_s' else 1):.3g}"
                        f"{' h' if what == 'set_s' else ''}" for k, n in TARGETS.items())
        print(f"  {what}: growth exponent {b:.2f} (1.0 = linear); extrapolated per run: {ext}")


if __name__ == "__main__":
    main()
