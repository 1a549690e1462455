"""Score throughput: image_info_gain_approx through DuckDB SQL against bare numpy, the exact
Information Gain against the approximation, and the approximation's memory as M grows.

    python bench/scores.py                       # 200k x 512 synthetic store, M = 10k
    python bench/scores.py --rows 50000 --repeats 3 --json scores.json

Figures (see bench/README.md):

* ``fit_seconds``: `clipsql stats fit` (fit_stats) with M = --reference-size.
* ``sql_numpy_ratio`` = rows/s of ``SELECT sum(image_info_gain_approx(image_embedding))
  FROM embeddings`` (queries.connect, DuckDB's default threads) ÷ rows/s of the same
  quadratic form in bare numpy float32 over the same vectors already in memory
  (2048-row chunks, numpy's default BLAS threads).  Target ≥ 0.8.
* ``exact_gemm_ratio`` = thread CPU seconds of a bare float64 GEMM of the shape the exact score
  needs (--ig-rows unit rows @ Y_refᵀ, M = --reference-size) ÷ those of ``scores.info_gain`` on the
  same rows, one BLAS thread, in the same run.  Target ≥ 0.8.
* ``exact_speedup`` = rows/s of the approximation ÷ rows/s of the exact
  ``image_info_gain`` (M = --reference-size) on the same --exact-rows subsample, both
  through SQL.  Expect ≥ 10×.
* ``approx_peak_mib[M]``: peak RSS (VmHWM) added by one approximation query in a fresh
  subprocess, for M = 1k, 5k, 10k, 20k.  Should be flat in M.
* ``threads_speedup``: the SQL query with DuckDB threads = 2 ÷ threads = 1.

No model forward: the store holds synthetic CLIP-like raw vectors (an offset mean
of norm 7 per modality, a power-law covariance of trace 49 so ‖x‖ ≈ 10, images and
texts paired through a shared latent), written with store.writer.write_batch (one commit per 20k rows).  Every
comparison is interleaved and repeated; each side keeps its best repetition.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import _common as C

MODEL_ID = "bench-synthetic-clip"
APPROX_SQL = "SELECT sum(image_info_gain_approx(image_embedding)) FROM {src}"
EXACT_SQL = "SELECT sum(image_info_gain(image_embedding)) FROM {src}"


# --------------------------------------------------------------------------- the store
def synthetic_batches(rows: int, dim: int, seed: int, batch: int):
    """CLIP-like raw (image, text) pairs in batches: offset means, anisotropic shared basis."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    s = (1.0 + np.arange(dim)) ** -0.7
    s *= np.sqrt(49.0 / np.sum(s ** 2))            # tr C = 49
    m_img = rng.normal(size=dim)
    m_txt = m_img + 0.8 * rng.normal(size=dim)     # a modality gap
    m_img *= 7 / np.linalg.norm(m_img)
    m_txt *= 7 / np.linalg.norm(m_txt)
    A = (s[:, None] * Q.T)                         # z ↦ (z * s) @ Qᵀ
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        z = rng.normal(size=(n, dim))
        e = rng.normal(size=(n, dim))
        img = m_img + z @ A
        txt = m_txt + (0.7 * z + np.sqrt(1 - 0.49) * e) @ A
        yield start, img.astype(np.float32), txt.astype(np.float32)


def build_store(path: Path, rows: int, dim: int, seed: int, batch: int = 20000, storage: str | None = None) -> Any:
    import pyarrow as pa

    from clipsql.store.store import Store
    from clipsql.store.writer import write_batch
    from clipsql.ingest.captions import caption_features
    from clipsql.store.tables import samples_schema
    from clipsql.store.runs import finish_run, start_run
    st = Store.init(path)
    rec = st.register_model(model_id=MODEL_ID, kind="clip", dim=dim, logit_scale=100.0, logit_bias=None,
                            context_length=77, spec={"bench": "synthetic", "seed": seed}, storage=storage)
    run_id = start_run(st.engine, rec.model_id, "synthetic", "precomputed")
    seq = 0
    for seq, (start, img, txt) in enumerate(synthetic_batches(rows, dim, seed, batch), start=1):
        n = len(img)
        ids = [f"{i:09d}" for i in range(start, start + n)]
        captions = pa.array([f"synthetic caption {i}" for i in ids])
        samples = pa.table({
            "id": ids, "uri": [f"https://example.com/img/{i}.jpg" for i in ids],
            "caption": captions, "width": [None] * n, "height": [None] * n,
            **caption_features(captions),   # the columns an ingest derives from the caption
            "source": ["synthetic"] * n, "location": [f"synthetic:row {i}" for i in ids],
            "caption_truncated": [False] * n, "metadata": [None] * n}, schema=samples_schema())
        write_batch(st, rec, samples=samples, ids=ids, image=img, text=txt, seq=seq, run_id=run_id,
                       source="synthetic", rejects=[], meta_types={})
        # each write_batch is one commit, and a commit carries its statistics
    finish_run(st.engine, run_id, "done", 0, {"added": rows})
    return st


def _reusable(path: Path, args: argparse.Namespace) -> Any:
    """The store a previous run left in --tmp, if it has the same rows, dim and seed."""
    from clipsql.store.store import Store
    from clipsql.store.reads import count_rows
    if not (path / "clipsql.json").exists():
        return None
    st = Store.open(path)
    try:
        rec = st.model(MODEL_ID)
    except Exception:  # noqa: BLE001
        return None
    if rec.dim == args.dim and rec.spec.get("seed") == args.seed and count_rows(st, rec) == args.rows:
        return st
    raise SystemExit(f"{path} holds a different store; remove it or pick another --tmp")


# --------------------------------------------------------------------------- experiments
def sql_runner(con: Any, sql: str) -> Callable[[], float]:
    """The query as `clipsql query` runs it: BLAS pinned to one thread around it on this thread."""
    from clipsql import queries

    def run() -> float:
        with queries.one_blas_thread():
            return con.execute(sql).fetchall()[0][0]
    return run

def numpy_runner(X: np.ndarray, fit: Any, chunk: int, blas_threads: int | None = None) -> Callable[[], float]:
    """The approximation in bare numpy float32 on the vectors in RAM (no clipsql code): per `chunk`
    rows x̂ = x/‖x‖, (x̂ − ū) @ L, ½a²·Σ z² — the rate the SQL function is held to."""
    u = np.ascontiguousarray(fit.mean_image, dtype=np.float32)
    L = np.ascontiguousarray(fit.factor_text, dtype=np.float32)
    half_a2 = 0.5 * fit.a ** 2

    def run() -> float:
        ctx = contextlib.nullcontext()
        if blas_threads:      # explicit: a parallel SQL query can leave the process at 1 BLAS thread
            from threadpoolctl import threadpool_limits
            ctx = threadpool_limits(blas_threads, user_api="blas")
        total = 0.0
        with ctx:
            for i in range(0, len(X), chunk):
                Q = X[i:i + chunk]
                Z = (Q / np.sqrt(np.einsum("ij,ij->i", Q, Q))[:, None] - u) @ L
                total += half_a2 * float(np.einsum("ij,ij->i", Z, Z).sum(dtype=np.float64))
        return total
    return run


def exact_vs_gemm(X: np.ndarray, fit: Any, repeats: int, chunk: int = 2048) -> dict:
    """Exact `scores.info_gain` (image → reference texts) on the rows of X in RAM against a bare float64
    GEMM of the same shape (unit rows @ Y_refᵀ, `chunk` rows at a time into one buffer), interleaved,
    one BLAS thread (as in the SQL functions); thread CPU seconds (robust to other jobs preempting
    this one) and wall seconds, best of `repeats`."""
    import time

    from threadpoolctl import threadpool_limits

    from clipsql.kernels import scores
    R = np.ascontiguousarray(fit.Y_ref, dtype=np.float64)
    Xd = X.astype(np.float64)
    Xh = Xd / np.linalg.norm(Xd, axis=1, keepdims=True)
    buf = np.empty((min(chunk, len(Xh)), len(R)))

    def gemm() -> None:
        for i in range(0, len(Xh), chunk):
            q = Xh[i:i + chunk]
            np.matmul(q, R.T, out=buf[:len(q)])

    def exact() -> None:
        scores.info_gain(X, fit, "image")

    best: dict[str, tuple[float, float]] = {}
    with threadpool_limits(1, user_api="blas"):
        for _ in range(max(1, repeats)):
            for name, fn in (("gemm", gemm), ("exact", exact)):
                t0, w0 = time.thread_time(), time.perf_counter()
                fn()
                cpu, wall = time.thread_time() - t0, time.perf_counter() - w0
                old = best.get(name, (float("inf"), float("inf")))
                best[name] = (min(old[0], cpu), min(old[1], wall))
    return {"rows": len(X), "reference_size": len(R), "gemm_cpu_s": best["gemm"][0], "exact_cpu_s": best["exact"][0],
            "gemm_wall_s": best["gemm"][1], "exact_wall_s": best["exact"][1],
            "exact_gemm_ratio": best["gemm"][0] / best["exact"][0],
            "exact_gemm_ratio_wall": best["gemm"][1] / best["exact"][1]}


def register_probes(con: Any, st: Any, dim: int) -> None:
    """UDFs that do part of the work, to split the SQL cost (same registration style as functions.py)."""
    import pyarrow as pa

    from clipsql.queries.sql import functions as F

    def noop(emb: Any) -> Any:
        return pa.array(np.zeros(len(emb)))

    def to_matrix(emb: Any) -> Any:
        X = F.matrix(emb, dim)
        return pa.array(X[:, 0])

    con.create_function("_bench_noop", noop, ["FLOAT[]"], "DOUBLE", type="arrow", null_handling="special",
                        side_effects=False)
    con.create_function("_bench_noop_array", noop, [f"FLOAT[{dim}]"], "DOUBLE", type="arrow",
                        null_handling="special", side_effects=False)
    con.create_function("_bench_matrix", to_matrix, ["FLOAT[]"], "DOUBLE", type="arrow",
                        null_handling="special", side_effects=False)


def blas_threads() -> int | None:
    try:
        from threadpoolctl import ThreadpoolController
        libs = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
        return libs[0].get_num_threads() if libs else None
    except Exception:  # noqa: BLE001
        return None


# --------------------------------------------------------------------------- memory probe (subprocess)
def memprobe(store_path: str, rows: int, light: bool) -> dict:
    """Run in a fresh process: peak RSS before and after one approximation query."""
    from clipsql import queries
    from clipsql.store.store import Store
    st = Store.open(store_path)
    if light:
        _light_fit()
    con = queries.connect(st)
    con.execute(f"SELECT count(*) FROM (SELECT image_embedding FROM embeddings LIMIT {rows})").fetchall()
    base = C.vm_hwm_kib()
    base_rss = C.vm_rss_kib()
    con.execute(APPROX_SQL.format(src=f"(SELECT image_embedding FROM embeddings LIMIT {rows})")).fetchall()
    peak = C.vm_hwm_kib()
    return {"hwm_before_kib": base, "rss_before_kib": base_rss, "hwm_after_kib": peak,
            "added_mib": (peak - base) / 1024 if peak and base else None}


def _light_fit() -> None:
    """Candidate for ScoreContext.fit when only the approximation is asked for: unpack only the
    prior-weighted means and factors from the fit's npz blob, never X_ref/Y_ref."""
    import io

    import sqlalchemy as sa

    from clipsql.queries.sql import functions as F
    from clipsql.kernels import scores
    from clipsql.store import catalog as cat

    def fit(self: Any, rec: Any) -> Any:
        if rec.model_id not in self._fits:
            with self.st.engine.connect() as conn:
                row = conn.execute(sa.select(cat.fits.c.arrays, cat.fits.c.options).where(
                    cat.fits.c.model_id == rec.model_id).order_by(cat.fits.c.fit_id.desc()).limit(1)).first()
            opts = json.loads(row.options)
            keys = ("mean_image", "mean_text", "factor_image", "factor_text")
            with np.load(io.BytesIO(row.arrays), allow_pickle=False) as z:
                arr = {k: z[k] for k in keys}
            empty = np.empty((0, rec.dim))
            self._fits[rec.model_id] = scores.Fit(
                a=float(opts["a"]), b=float(opts["b"]), kind=opts["kind"], prior=opts["prior"],
                X_ref=empty, Y_ref=empty, log_prior_text=np.empty(0), log_prior_image=np.empty(0),
                cov_image=np.empty((0, 0)), cov_text=np.empty((0, 0)), **arr)
        return self._fits[rec.model_id]
    F.ScoreContext.fit = fit


def run_memprobe(store_path: Path, rows: int, light: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memprobe", str(store_path), "--mem-rows", str(rows)]
    if light:
        cmd.append("--_light")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"memory probe failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--reference-size", type=int, default=10_000)
    p.add_argument("--exact-rows", type=int, default=5000, help="subsample scored by the exact info gain")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best of each side is kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=2048, help="numpy baseline chunk (DuckDB's vector size)")
    p.add_argument("--ig-rows", type=int, default=20_000,
                   help="rows of the exact Information Gain vs float64 GEMM comparison (kernel, in RAM; 0: skip)")
    p.add_argument("--sweep", default="1000,5000,10000,20000", help="reference sizes M of the memory sweep")
    p.add_argument("--sweep-prior", default="uniform", choices=("uniform", "posterior-mean"),
                   help="prior of the sweep's fits (uniform skips the O(M²d) prior; query memory is the same)")
    p.add_argument("--mem-rows", type=int, default=20000, help="rows scored by each memory probe")
    p.add_argument("--experiments", action=argparse.BooleanOptionalAction, default=True,
                   help="also split the SQL cost with probe UDFs and time the untyped FLOAT[] path")
    p.add_argument("--json", default=None)
    p.add_argument("--tmp", default=None, help="work directory (default: a temporary one, removed)")
    p.add_argument("--_memprobe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_light", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._memprobe:
        print(json.dumps(memprobe(args._memprobe, args.mem_rows, args._light)))
        return {}

    from clipsql import queries
    from clipsql.store.fits import fit_stats, load_fit
    from clipsql.kernels.arrays import to_numpy
    from clipsql.store.reads import read_embeddings

    with C.work_dir(args.tmp) as tmp:
        print(f"clipsql scores bench: {args.rows} x {args.dim} synthetic store, M={args.reference_size}, "
              f"{args.repeats} interleaved rounds, machine {C.machine()}")
        st = _reusable(tmp / "store", args)
        if st is None:
            build_s, st = C.timed(lambda: build_store(tmp / "store", args.rows, args.dim, args.seed))
            print(f"  built the store in {build_s:.1f}s")
        else:
            build_s = float("nan")
            print(f"  reusing the store in {tmp / 'store'}")
        rec = st.model()
        fit_info = fit_stats(st, reference_size=args.reference_size, seed=args.seed)
        fit_s = fit_info.seconds
        print(f"  stats fit (M={fit_info.reference_size}, posterior-mean prior): {fit_s:.1f}s")

        blas0 = blas_threads() or (os.cpu_count() or 1)   # numpy's default, before any SQL query
        X = to_numpy(read_embeddings(st, rec, columns=("image_embedding",)).column("image_embedding"))
        fit = load_fit(st, rec)[0]
        cons = {t: queries.connect(st, threads=t) for t in (1, 2)}
        default_con = queries.connect(st)
        default_threads = default_con.execute("SELECT current_setting('threads')").fetchall()[0][0]
        for con in (*cons.values(), default_con):   # load the fit once per connection (not timed)
            con.execute(APPROX_SQL.format(src="(SELECT image_embedding FROM embeddings LIMIT 10)")).fetchall()
        register_probes(default_con, st, args.dim)
        full = APPROX_SQL.format(src="embeddings")
        # the untyped path: what the query cost before the FLOAT[d] overloads (an ARRAY → LIST cast)
        untyped = "SELECT sum(_clipsql_info_gain_approx(image_embedding::FLOAT[], 'image', NULL)) FROM embeddings"

        # ---------------------------------------------------------------- (a) SQL vs numpy
        variants: dict[str, Callable[[], Any]] = {
            "numpy (default BLAS threads)": numpy_runner(X, fit, args.chunk, blas_threads=blas0),
            f"SQL, DuckDB threads={default_threads} (default)": sql_runner(default_con, full),
            "numpy, BLAS 1 thread": numpy_runner(X, fit, args.chunk, blas_threads=1),
            "SQL, DuckDB threads=1": sql_runner(cons[1], full),
            "SQL, DuckDB threads=2": sql_runner(cons[2], full),
        }
        if args.experiments:
            variants.update({
                "probe: scan + cast + noop UDF": sql_runner(default_con,
                                                           "SELECT sum(_bench_noop(image_embedding)) FROM embeddings"),
                "probe: scan + noop UDF on FLOAT[d] (no cast)": sql_runner(
                    default_con, "SELECT sum(_bench_noop_array(image_embedding)) FROM embeddings"),
                "probe: ... + functions.matrix()": sql_runner(
                    default_con, "SELECT sum(_bench_matrix(image_embedding)) FROM embeddings"),
                "SQL via the FLOAT[] UDF (ARRAY → LIST cast)": sql_runner(default_con, untyped),
            })
        runs = C.interleaved(variants, args.repeats)
        best = {k: C.best(v) for k, v in runs.items()}
        rps = {k: args.rows / v[0] for k, v in best.items()}
        np_key, sql_key = "numpy (default BLAS threads)", f"SQL, DuckDB threads={default_threads} (default)"
        ref_sum = best[np_key][1]
        for k in variants:
            if not k.startswith("probe") and not np.isclose(best[k][1], ref_sum, rtol=1e-6):
                print(f"  ! {k}: sum {best[k][1]!r} differs from numpy's {ref_sum!r}")
        ratio = rps[sql_key] / rps[np_key]
        print()
        cpu = {k: C.cpu_of_best(k, runs[k]) for k in variants}
        med = {k: C.paired_median_ratio(runs[np_key], runs[k]) for k in variants}
        print(C.table([[k, best[k][0], rps[k], rps[k] / rps[np_key], med[k], cpu[k] / best[k][0]] for k in variants],
                      [f"image_info_gain_approx over {args.rows} rows (best of {args.repeats})", "s", "rows/s",
                       "÷numpy", "median", "cpu÷wall"]))
        print("  ÷numpy = best rows/s ÷ numpy's best; median = median over rounds of the same round's ratio;\n"
              "  cpu÷wall = process CPU seconds ÷ wall seconds: how many cores the run kept busy")

        probe_con = queries.connect(st)
        sql_runner(probe_con, full)()
        blas_after_full = blas_threads()
        probe_con.close()
        print(f"  process BLAS threads: {blas0} before any SQL query, {blas_after_full} after one more full query on "
              "a default connection (queries.one_blas_thread pins around the query on the calling thread and "
              "restores the count)")

        # ---------------------------------------------------------------- (b) exact vs approx
        sub = f"(SELECT image_embedding FROM embeddings LIMIT {args.exact_rows})"
        ex = C.interleaved({"approx": sql_runner(default_con, APPROX_SQL.format(src=sub)),
                            "exact": sql_runner(default_con, EXACT_SQL.format(src=sub))}, args.repeats)
        ex_best = {k: C.best(v)[0] for k, v in ex.items()}
        n_sub = min(args.exact_rows, args.rows)
        speedup_sub = ex_best["exact"] / ex_best["approx"]
        speedup = rps[sql_key] / (n_sub / ex_best["exact"])   # approx at steady state (full table)
        print()
        print(C.table([[f"image_info_gain_approx ({n_sub} rows)", ex_best["approx"], n_sub / ex_best["approx"]],
                       [f"image_info_gain exact, M={fit.size}", ex_best["exact"], n_sub / ex_best["exact"]]],
                      ["SQL, same subsample", "s", "rows/s"]))
        print(f"  approximation is {speedup:.1f}x faster than the exact score ({rps[sql_key]:,.0f} rows/s over the "
              f"full table); {speedup_sub:.1f}x on the same {n_sub}-row subsample, where the approximation's "
              f"query is mostly fixed cost")

        # ---------------------------------------------------------------- (b2) exact kernel vs GEMM
        ig = exact_vs_gemm(X[:args.ig_rows], fit, args.repeats) if args.ig_rows > 0 else None
        if ig:
            print()
            print(C.table([["float64 GEMM (unit rows @ Y_refᵀ)", ig["gemm_cpu_s"], ig["gemm_wall_s"], 1.0],
                           ["scores.info_gain (exact)", ig["exact_cpu_s"], ig["exact_wall_s"], ig["exact_gemm_ratio"]]],
                          [f"{ig['rows']} x {args.dim} vs M={ig['reference_size']}, 1 BLAS thread", "cpu s", "wall s",
                           "GEMM ÷"]))
            print("  GEMM ÷ = the GEMM's thread CPU seconds ÷ this one's: the exact score's rate as a share of the "
                  "product it cannot avoid (target ≥ 0.8)")

        # ---------------------------------------------------------------- (c) memory vs M
        for con in (*cons.values(), default_con):
            con.close()
        mem_rows = []
        sweep = [int(m) for m in args.sweep.split(",") if m.strip()]
        mem: dict[int, dict] = {}
        for M in sweep:
            if M > args.rows:
                print(f"  (M={M} skipped: only {args.rows} rows)")
                continue
            fi = fit_stats(st, reference_size=M, seed=args.seed, prior=args.sweep_prior)
            cur = run_memprobe(tmp / "store", args.mem_rows, light=False)
            light = run_memprobe(tmp / "store", args.mem_rows, light=True) if args.experiments else None
            mem[M] = {"fit_seconds": fi.seconds, "current": cur, "light": light}
            mem_rows.append([M, fi.seconds, cur["hwm_after_kib"] / 1024, cur["added_mib"],
                             light["added_mib"] if light else ""])
        print()
        print(C.table(mem_rows, ["M", f"fit s ({args.sweep_prior})", "peak RSS MiB", "query adds MiB",
                                 "light fit adds MiB"]))
        print(f"  each probe: a fresh process, connect, then one approximation query over {args.mem_rows} rows; "
              "'adds' = VmHWM after − before the query")

        figures: dict[str, Any] = {
            "rows": args.rows, "dim": args.dim, "reference_size": fit.size,
            "build_seconds": round(build_s, 2), "fit_seconds": round(fit_s, 2),
            "sql_rows_per_s": round(rps[sql_key]), "numpy_rows_per_s": round(rps[np_key]),
            "sql_numpy_ratio": round(ratio, 3), "sql_numpy_ratio_median": round(med[sql_key], 3),
            "sql_cpu_s": round(cpu[sql_key], 4), "numpy_cpu_s": round(cpu[np_key], 4),   # of each side's best run
            "sql_vs_best_numpy": round(rps[sql_key] / max(rps[np_key], rps["numpy, BLAS 1 thread"]), 3),
            "blas_threads_before_sql": blas0, "blas_threads_after_sql": blas_after_full,
            "threads_speedup": round(rps["SQL, DuckDB threads=2"] / rps["SQL, DuckDB threads=1"], 3),
            "cpu_per_wall_threads1": round(cpu["SQL, DuckDB threads=1"] / best["SQL, DuckDB threads=1"][0], 2),
            "cpu_per_wall_threads2": round(cpu["SQL, DuckDB threads=2"] / best["SQL, DuckDB threads=2"][0], 2),
            "exact_rows_per_s": round(n_sub / ex_best["exact"]), "approx_rows_per_s_sub": round(n_sub / ex_best["approx"]),
            "exact_speedup": round(speedup, 1), "exact_speedup_same_subsample": round(speedup_sub, 1),
        }
        if ig:
            figures.update({"exact_gemm_ratio": round(ig["exact_gemm_ratio"], 3),
                            "exact_gemm_ratio_wall": round(ig["exact_gemm_ratio_wall"], 3),
                            "exact_kernel_rows_per_s": round(ig["rows"] / ig["exact_cpu_s"])})
        for M, m in mem.items():
            figures[f"approx_peak_mib_M{M}"] = round(m["current"]["added_mib"], 1)
            if m["light"]:
                figures[f"approx_peak_mib_light_M{M}"] = round(m["light"]["added_mib"], 1)
        if args.experiments:
            slug = {"SQL via the FLOAT[] UDF (ARRAY → LIST cast)": "untyped_udf",
                    "probe: scan + cast + noop UDF": "noop_udf",
                    "probe: scan + noop UDF on FLOAT[d] (no cast)": "noop_udf_array", "probe: ... + functions.matrix()": "matrix_only"}
            for k, s in slug.items():
                figures[f"ratio_{s}"] = round(rps[k] / rps[np_key], 3)
                figures[f"ratio_{s}_median"] = round(med[k], 3)
        print()
        print(C.key_values(figures))
        C.write_json(args.json, {"figures": figures, "machine": C.machine(),
                                 "runs": {k: [r[0] for r in v] for k, v in runs.items()},
                                 "exact_runs": {k: [r[0] for r in v] for k, v in ex.items()},
                                 "memory": mem})
        st.engine.dispose()
        return figures


if __name__ == "__main__":
    main()
