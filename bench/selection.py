"""Selection scores: per-row negCLIPLoss against the pool form, NormSim₂ against NormSim∞ on
a 50k-row target, and rows/s of each through DuckDB SQL.

    python bench/selection.py                     # 20k-row pool + 50k-row target, d = 512, M = 10k
    python bench/selection.py --rows 5000 --slow-rows 1000 --repeats 1 --json selection.json
    python bench/selection.py --ann               # also an IVF_FLAT index on the target (recall stated)

Figures:

* ``sql_rows_per_s[fn]``: rows/s of ``SELECT sum(fn(...)) FROM embeddings WHERE <pool rows>``
  (queries.connect, DuckDB's default threads), best of --repeats interleaved rounds.
  The O(d) / O(d²) functions run over the whole pool, the O(M·d) / O(N_t·d) ones over
  the first --slow-rows rows.
* ``negclip_row_vs_pool``: the per-row stable form (|B| = M+1: the whole reference,
  deterministic) through SQL against the pool form (``scores.neg_clip_loss_pool``, K
  partitions into batches of exactly --pool-batch-size) in numpy, as rows/s, plus the
  Spearman rank correlation of the two and the overlap of their top 30%.
* ``normsim_2_vs_inf``: NormSim₂ (O(d²) per row, the target's second moment) against
  NormSim∞ (O(N_t·d) per row, exact and chunked) on the same target: speedup, Spearman
  correlation, overlap of their top 20%. With --ann also the LanceDB index: build
  seconds, recall@1 measured on 1000 pool rows, rows/s.

Synthetic CLIP-like vectors (bench/scores.py's generator) written with store.writer.write_batch:
the first --rows rows are the pool, the next --target-rows the target set.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C  # noqa: E402

import numpy as np  # noqa: E402


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    ra, rb = np.argsort(np.argsort(a[ok])), np.argsort(np.argsort(b[ok]))
    return float(np.corrcoef(ra, rb)[0, 1])


def top_overlap(a: np.ndarray, b: np.ndarray, share: float) -> float:
    k = max(1, int(share * len(a)))
    ta, tb = set(np.argsort(-a)[:k]), set(np.argsort(-b)[:k])
    return len(ta & tb) / k


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20_000, help="pool rows")
    ap.add_argument("--target-rows", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--reference-size", type=int, default=10_000)
    ap.add_argument("--slow-rows", type=int, default=4_000, help="rows for the O(M·d) and O(N_t·d) functions")
    ap.add_argument("--pool-batch-size", type=int, default=8_192)
    ap.add_argument("--pool-k", type=int, default=2, help="partitions of the pool form (the paper: 10)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ann", action="store_true", help="also index the target (LanceDB IVF_FLAT, cosine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default=None, help="keep the store here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from clipsql import queries
    from scores import build_store
    from clipsql.kernels import scores
    from clipsql.store.fits import fit_stats
    from clipsql.queries.curation.targets import add_target
    from clipsql.kernels.arrays import to_numpy
    from clipsql.store.reads import read_embeddings

    tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="clipsql-bench-sel-"))
    figures: dict[str, Any] = {"machine": C.machine(), "args": vars(args)}
    try:
        t, st = C.timed(lambda: build_store(tmp / "store", args.rows + args.target_rows, args.dim, args.seed))
        figures["build_seconds"] = t
        cut = f"{args.rows:09d}"                                     # ids are zero-padded row numbers
        figures["fit_seconds"], _ = C.timed(lambda: fit_stats(st, reference_size=args.reference_size,
                                                              seed=args.seed))
        figures["target_seconds"], tgt = C.timed(lambda: add_target(
            st, "bench", query=f"SELECT image_embedding FROM embeddings WHERE id >= '{cut}'", index="exact"))
        if args.ann:
            figures["ann_target_seconds"], ann = C.timed(lambda: add_target(
                st, "bench-ann", query=f"SELECT image_embedding FROM embeddings WHERE id >= '{cut}'",
                index="ann", seed=args.seed, echo=print))
            from clipsql.store.targets import get_target
            figures["ann_index"] = get_target(st, "bench-ann").options["index"]
        slow = f"{args.slow_rows:09d}"
        con = queries.connect(st)
        exprs = {
            "clip_score": ("clip_score(image_embedding, text_embedding)", cut),
            "norm_sim_2": ("norm_sim_2(image_embedding, 'bench')", cut),
            "neg_clip_loss": ("neg_clip_loss(image_embedding, text_embedding)", slow),
            "norm_sim_inf": ("norm_sim_inf(image_embedding, 'bench')", slow),
        }
        if args.ann:
            exprs["norm_sim_inf_ann"] = ("norm_sim_inf(image_embedding, 'bench-ann')", slow)
        n_of = {k: (args.rows if lim == cut else min(args.slow_rows, args.rows)) for k, (_, lim) in exprs.items()}
        for _, (e, lim) in exprs.items():                            # warm caches (fit, target, index)
            con.execute(f"SELECT sum({e}) FROM embeddings WHERE id < '{min(lim, '000000010')}'").fetchall()
        runs = C.interleaved({k: (lambda e=e, lim=lim: con.execute(
            f"SELECT sum({e}) FROM embeddings WHERE id < '{lim}'").fetchall()[0][0])
            for k, (e, lim) in exprs.items()}, args.repeats)
        rps = {k: n_of[k] / C.best(v)[0] for k, v in runs.items()}
        figures["sql_rows_per_s"] = rps

        # per-row vs pool negCLIPLoss, NormSim₂ vs NormSim∞: values on the slow subset
        sub = con.execute(f"SELECT neg_clip_loss(image_embedding, text_embedding), "
                          f"norm_sim_2(image_embedding, 'bench'), norm_sim_inf(image_embedding, 'bench') "
                          f"FROM embeddings WHERE id < '{slow}' ORDER BY id").fetchall()
        row_form, ns2, nsinf = (np.array(c, dtype=np.float64) for c in zip(*sub))
        tbl = read_embeddings(st, st.model()).sort_by("id").slice(0, args.rows)
        X, Y = to_numpy(tbl.column("image_embedding")), to_numpy(tbl.column("text_embedding"))
        B = min(args.pool_batch_size, args.rows)
        t_pool, pool_form = C.timed(lambda: scores.neg_clip_loss_pool(X, Y, tau=0.01, batch_size=B,
                                                                      k=args.pool_k, seed=args.seed, chunk=512))
        m = len(row_form)
        figures["negclip_row_vs_pool"] = {
            "row_rows_per_s": rps["neg_clip_loss"], "row_batch": args.reference_size + 1,
            "pool_rows_per_s": args.rows / t_pool, "pool_seconds": t_pool, "pool_batch": B, "pool_k": args.pool_k,
            "pool_row_partitions_per_s": args.rows * args.pool_k / t_pool,
            "spearman": spearman(row_form, pool_form[:m]), "top30_overlap": top_overlap(row_form, pool_form[:m], 0.3),
            "pool_rows_never_batched": int(np.isnan(pool_form).sum())}
        figures["normsim_2_vs_inf"] = {
            "target_rows": tgt["n"], "norm_sim_2_rows_per_s": rps["norm_sim_2"],
            "norm_sim_inf_rows_per_s": rps["norm_sim_inf"], "speedup": rps["norm_sim_2"] / rps["norm_sim_inf"],
            "spearman": spearman(ns2, nsinf), "top20_overlap": top_overlap(ns2, nsinf, 0.2)}
        if args.ann:
            figures["normsim_2_vs_inf"]["ann_rows_per_s"] = rps["norm_sim_inf_ann"]
            figures["normsim_2_vs_inf"]["ann_recall_at_1"] = figures["ann_index"]["recall_at_1"]
        con.close()
    finally:
        if not args.tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    print(C.table([[k, float(n_of[k]), v] for k, v in figures["sql_rows_per_s"].items()],
                  ["SQL function", "rows", "rows/s"]))
    nc, ns = figures["negclip_row_vs_pool"], figures["normsim_2_vs_inf"]
    print(f"\nnegCLIPLoss per-row (|B|={nc['row_batch']}, SQL) {nc['row_rows_per_s']:.0f} rows/s vs pool form "
          f"(|B|={nc['pool_batch']}, K={nc['pool_k']}, numpy) {nc['pool_rows_per_s']:.0f} rows/s; "
          f"Spearman {nc['spearman']:.3f}, top-30% overlap {nc['top30_overlap']:.3f}")
    print(f"NormSim₂ {ns['norm_sim_2_rows_per_s']:.0f} rows/s vs NormSim∞ (exact, N_t={ns['target_rows']}) "
          f"{ns['norm_sim_inf_rows_per_s']:.0f} rows/s: {ns['speedup']:.0f}x; Spearman {ns['spearman']:.3f}, "
          f"top-20% overlap {ns['top20_overlap']:.3f}")
    if args.ann:
        print(f"NormSim∞ via IVF_FLAT: {ns['ann_rows_per_s']:.0f} rows/s, recall@1 {ns['ann_recall_at_1']:.4f}")
    flat = {"fit_s": figures["fit_seconds"], "target_s": figures["target_seconds"],
            **{f"sql_{k}": v for k, v in figures["sql_rows_per_s"].items()},
            "negclip_pool_rows_per_s": nc["pool_rows_per_s"], "negclip_spearman": nc["spearman"],
            "normsim_speedup": ns["speedup"], "normsim_spearman": ns["spearman"]}
    print(C.key_values(flat))
    C.write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.1f}s")
