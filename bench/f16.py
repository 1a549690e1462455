"""Float16 storage against float32 storage: bytes per row, and how far every score moves.

    python bench/f16.py                          # 100k x 512 synthetic rows, M = 10k
    python bench/f16.py --rows 200000 --json f16.json

Two stores hold the same synthetic CLIP-like raw vectors (bench/scores.py's generator: offset
modality means, ‖x‖ ≈ 10, paired through a shared latent), one stored as float32, one as float16
(`ingest --storage float16`: each value rounded once to the nearest float16). Both are fitted
alike (same reference rows, M = --reference-size, seed --seed) and every column of the `scores`
view is read from both. Figures (see bench/README.md):

* ``bytes_per_row[storage]``: the model table's Lance data files ÷ rows (and the whole store's).
* per score: ``max_abs`` |f16 − f32|, ``max_rel`` the same ÷ |f32| (rows with |f32| ≥ 1e-3 of
  the score's spread), ``abs_over_std`` max_abs ÷ the score's standard deviation, ``spearman``
  (rank correlation over the rows) and ``keep30`` (share of the rows in the top 30% by the float32
  score that are in the top 30% by the float16 score: DataComp's usual filter fraction).
  The fitted, costly scores (info gain, NegCLIPLoss) are read on the first --exact-rows rows.
* ``--scale model`` fits at the model's logit scale (100) instead of 1: posteriors as sharp as
  the model's own, which magnifies a cosine's rounding in the information gain a hundredfold.
* ``approx_speed_ratio``: rows/s of ``sum(image_info_gain_approx(image_embedding))`` over
  the float16 store ÷ over the float32 store (interleaved, best of --repeats).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

import _common as C
from scores import build_store

COSTLY = ("image_info_gain", "text_info_gain", "image_info_gain_reverse", "text_info_gain_reverse",
          "neg_clip_loss", "neg_siglip_loss")      # O(rows · M) each: read on --exact-rows rows


def data_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def read_scores(st: Any, rows: int | None) -> tuple[list, dict[str, np.ndarray]]:
    from clipsql import queries
    con = queries.connect(st)
    try:
        names = [d[0] for d in con.execute("SELECT * EXCLUDE (id, model, uri, caption) FROM scores LIMIT 0")
                 .description]
        cheap = [n for n in names if n not in COSTLY]
        costly = [n for n in names if n not in cheap]
        out = {}
        cur = con.execute(f"SELECT id, {', '.join(cheap)} FROM scores ORDER BY id")
        got = cur.fetchnumpy()
        ids = list(got["id"])
        out.update({n: floats(got[n]) for n in cheap})
        if costly:
            sql = f"SELECT {', '.join(costly)} FROM scores WHERE id <= ? ORDER BY id"
            got = con.execute(sql, [ids[min(rows, len(ids)) - 1]]).fetchnumpy()
            out.update({n: floats(got[n]) for n in costly})
    finally:
        con.close()
    return ids, out


def floats(v: Any) -> np.ndarray:
    """A fetched column as float64, NULL as NaN."""
    return np.ma.filled(np.ma.asarray(v).astype(np.float64), np.nan)


def ranks(v: np.ndarray) -> np.ndarray:
    r = np.empty(len(v))
    r[np.argsort(v, kind="stable")] = np.arange(len(v))
    return r


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    ok = ~(np.isnan(a) | np.isnan(b))
    if ok.sum() < 2:
        return {"rows": int(ok.sum())}
    a, b = a[ok], b[ok]
    d = np.abs(a - b)
    std = float(np.std(a))
    big = np.abs(a) >= 1e-3 * max(std, 1e-300)
    k = max(1, int(0.3 * len(a)))
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    return {"rows": int(len(a)), "max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "max_rel": float((d[big] / np.abs(a[big])).max()) if big.any() else float("nan"),
            "std": std, "abs_over_std": float(d.max() / std) if std > 0 else float("nan"),
            "spearman": float(np.corrcoef(ranks(a), ranks(b))[0, 1]),
            "keep30": len(top_a & top_b) / k}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--reference-size", type=int, default=10_000)
    p.add_argument("--exact-rows", type=int, default=20_000, help="rows scored by the costly scores (info gain, "
                   "NegCLIPLoss)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the speed comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", default="1", help="the fit's scale on cosines: 1 (the default fit) or model (its "
                   "logit scale, 100: what `select --recipe kl-guided` uses; sharper posteriors)")
    p.add_argument("--json", default=None)
    p.add_argument("--tmp", default=None, help="work directory (default: a temporary one, removed)")
    args = p.parse_args(argv)

    from clipsql import queries
    from clipsql.store.fits import fit_stats

    with C.work_dir(args.tmp) as tmp:
        print(f"clipsql float16 storage bench: {args.rows} x {args.dim} synthetic rows, M={args.reference_size}, "
              f"fit scale {args.scale}, "
              f"machine {C.machine()}")
        stores, figures = {}, {"rows": args.rows, "dim": args.dim, "reference_size": args.reference_size,
                               "scale": args.scale,
                               "exact_rows": args.exact_rows, "bytes_per_row": {}, "store_bytes_per_row": {},
                               "build_s": {}, "scores": {}}
        for storage in ("float32", "float16"):
            path = tmp / storage
            build_s, st = C.timed(lambda: build_store(path, args.rows, args.dim, args.seed, storage=storage))
            fit_stats(st, reference_size=args.reference_size, seed=args.seed, scale=args.scale)
            rec = st.model()
            assert rec.storage == storage
            figures["build_s"][storage] = round(build_s, 2)
            figures["bytes_per_row"][storage] = data_bytes(path / "lance" / f"{rec.table_name}.lance" / "data") \
                / args.rows
            figures["store_bytes_per_row"][storage] = data_bytes(path) / args.rows
            stores[storage] = st
            print(f"  {storage}: built in {build_s:.1f}s, {figures['bytes_per_row'][storage]:.0f} B/row "
                  f"(model table data), {figures['store_bytes_per_row'][storage]:.0f} B/row (store)")
        ids32, s32 = read_scores(stores["float32"], args.exact_rows)
        ids16, s16 = read_scores(stores["float16"], args.exact_rows)
        assert ids32 == ids16
        rows = []
        for name in s32:
            c = compare(s32[name], s16[name])
            figures["scores"][name] = c
            if "max_abs" in c:
                rows.append([name, c["rows"], f"{c['max_abs']:.2e}", f"{c['max_rel']:.2e}", f"{c['abs_over_std']:.2e}",
                             f"{1 - c['spearman']:.1e}", f"{c['keep30']:.5f}"])
        print(C.table(rows, ["score", "rows", "max |Δ|", "max rel", "max |Δ| / std", "1 − spearman", "keep30"]))

        sql = "SELECT sum(image_info_gain_approx(image_embedding)) FROM embeddings"
        cons = {s: queries.connect(st) for s, st in stores.items()}
        for con in cons.values():
            con.execute(sql.replace("embeddings", "(SELECT * FROM embeddings LIMIT 10)")).fetchall()

        def runner(con: Any) -> Any:
            def run() -> float:
                with queries.one_blas_thread():
                    return con.execute(sql).fetchall()[0][0]
            return run
        runs = C.interleaved({s: runner(con) for s, con in cons.items()}, args.repeats)
        best = {s: C.best(r)[0] for s, r in runs.items()}
        figures["approx_seconds"] = best
        figures["approx_speed_ratio"] = best["float32"] / best["float16"]
        b = figures["bytes_per_row"]
        figures["bytes_ratio"] = b["float16"] / b["float32"]
        print(C.key_values({"bytes_per_row_f32": round(b["float32"]), "bytes_per_row_f16": round(b["float16"]),
                            "bytes_ratio": round(figures["bytes_ratio"], 3),
                            "approx_speed_ratio": round(figures["approx_speed_ratio"], 3)}))
        C.write_json(args.json, figures)
        return figures


if __name__ == "__main__":
    main()
