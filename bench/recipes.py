"""The `select` recipes end to end on a synthetic store, each against the bare numpy work it does.

    python bench/recipes.py                        # 200k x 512, M = 10k, image-based K = pool / 128
    python bench/recipes.py --rows 1000000 --clusters 1000 --sample 100000 --json recipes.json

Figures (one run; each ratio compares two timings taken in this run):

* ``clip-score``: `select --recipe clip-score` (DuckDB scan + global sort + parquet write)
  against numpy computing the same cosines over the vectors already in memory.
* ``kl-guided (makes its fit)`` / ``kl-guided (reuses it)``: the first run makes the recipe's
  uniform-prior fit at the model's logit scale, the second reuses it; against numpy computing
  the same D_KL (`scores.info_gain`, same fit) over the in-memory text vectors.
* ``image-based``: k-means (Lloyd, 20 iterations) on --sample rows into --clusters clusters
  plus the assignment of the pool; against a bare float32 GEMM of the same shape
  (iterations × sample × K × d + pool × K × d multiply-adds).
* ``clip-score --where``: the same recipe on half the pool (`--where "id < …"`).

Peak RSS (VmHWM) of the process is printed at the end.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

import _common as C  # noqa: E402

import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--reference-size", type=int, default=10_000)
    ap.add_argument("--clusters", type=int, default=None, help="image-based K (default pool / 128)")
    ap.add_argument("--sample", type=int, default=None, help="image-based k-means rows (default the pool)")
    ap.add_argument("--target-rows", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from scores import build_store
    from clipsql.store.fits import fit_stats
    from clipsql.queries.curation.recipes import default_clusters
    from clipsql.queries.curation.selection import select
    from clipsql.queries.curation.targets import add_target
    from clipsql.kernels import scores
    from clipsql.kernels.arrays import to_numpy
    from clipsql.store.reads import read_embeddings

    tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="clipsql-bench-recipes-"))
    figures: dict[str, Any] = {"machine": C.machine(), "args": vars(args)}
    try:
        figures["build_seconds"], st = C.timed(lambda: build_store(tmp / "store", args.rows, args.dim, args.seed))
        figures["fit_seconds"], _ = C.timed(lambda: fit_stats(st, reference_size=args.reference_size, seed=args.seed))
        cut = f"{args.target_rows:09d}"
        add_target(st, "bench", query=f"SELECT image_embedding FROM embeddings WHERE id < '{cut}'", index="exact")
        emb = read_embeddings(st, st.model())
        X = to_numpy(emb.column("image_embedding"))
        Y = to_numpy(emb.column("text_embedding"))
        rows: list[list[Any]] = []

        def bare_clip() -> Any:          # float32 cosines of the in-memory vectors, one global sort
            dots = np.einsum("ij,ij->i", X, Y)
            norms = np.sqrt(np.einsum("ij,ij->i", X, X) * np.einsum("ij,ij->i", Y, Y))
            return np.argsort(-(dots / norms), kind="stable")

        t_sel, _ = C.timed(lambda: select(st, recipe="clip-score", output=tmp / "c.parquet"))
        t_bare, _ = C.timed(bare_clip)
        rows.append(["clip-score", t_sel, t_bare, t_bare / t_sel])
        half = f"{args.rows // 2:09d}"
        t_where, side = C.timed(lambda: select(st, recipe="clip-score", where=f"id < '{half}'",
                                               output=tmp / "w.parquet"))
        rows.append(["clip-score --where (half)", t_where, t_bare / 2, t_bare / 2 / t_where])

        t_make, side = C.timed(lambda: select(st, recipe="kl-guided", output=tmp / "k.parquet"))
        t_reuse, side = C.timed(lambda: select(st, recipe="kl-guided", output=tmp / "k2.parquet"))
        from clipsql.queries.curation.recipes import kl_guided_fit
        (fit, _), _ = kl_guided_fit(st, st.model(), make=False, seed=None, reference_size=None)
        t_bare_kl, _ = C.timed(lambda: np.argsort(-scores.info_gain(Y, fit, "text"), kind="stable"))
        rows.append(["kl-guided (makes its fit)", t_make, t_bare_kl, t_bare_kl / t_make])
        rows.append(["kl-guided (reuses it)", t_reuse, t_bare_kl, t_bare_kl / t_reuse])
        figures["kl_guided_fit"] = side.details["recipe_fit"]

        k = args.clusters or default_clusters(args.rows)
        t_ib, side = C.timed(lambda: select(st, recipe="image-based", target="bench", clusters=k,
                                            sample=args.sample, output=tmp / "i.parquet"))
        ib = side.details["image_based"]
        m = ib["sample"]
        A = np.ascontiguousarray(X[:m], dtype=np.float32)
        Ct = np.ascontiguousarray(X[:k].T, dtype=np.float32)

        def bare_gemm() -> None:
            for _ in range(ib["iterations"]):
                for s in range(0, m, 65536):
                    A[s:s + 65536] @ Ct
            for s in range(0, len(X), 65536):
                X[s:s + 65536] @ Ct
        t_gemm, _ = C.timed(bare_gemm)
        rows.append([f"image-based (K={k}, sample {m}, ≤{ib['iterations']} it)", t_ib, t_gemm, t_gemm / t_ib])
        figures["image_based"] = {"clusters": k, "sample": m, "kept": side["counts"]["selected"],
                                  "target_clusters": ib["target_clusters"]}
        figures["recipes"] = {r[0]: {"seconds": r[1], "bare_seconds": r[2], "bare_over_recipe": r[3]} for r in rows}
        figures["peak_rss_mib"] = (C.vm_hwm_kib() or 0) / 1024
        print(C.table([[r[0], f"{r[1]:.2f}", f"{r[2]:.2f}", f"{r[3]:.2f}"] for r in rows],
                      ["recipe", "seconds", "bare numpy s", "bare / recipe"]))
        print(f"rows={args.rows} dim={args.dim} M={args.reference_size} peak_rss_mib={figures['peak_rss_mib']:.0f}")
        C.write_json(args.json, figures)
        return figures
    finally:
        if not args.tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
