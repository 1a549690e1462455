"""Growth curve of one store at DataComp-like sizes: 100k → 1M → 5M rows, d = 512.

    .venv/bin/python bench/scale.py [--max-rows 5000000] [--dim 512] [--json scale.json] [--tmp DIR]
    .venv/bin/python bench/scale.py --ingest-only --sizes 200000   # ingest vs bare write only

One store grows through the sizes; each step adds the rows up to the next size from a
freshly generated clip-retrieval pool (img_emb/*.npy, text_emb/*.npy, metadata/*.parquet;
synthetic, seeded, written in shards and deleted after the step so the disk holds one
increment at a time) and ingests it with the CLI's command (`clipsql ingest … --model
ViT-B-32 --pretrained laion2b_s34b_b79k --id-column key`, no forward pass). Every step
that has a peak memory runs in its own process (peak RSS = VmHWM of that process).

Per size it prints: ingest rows/s (without the run's fixed costs: resolving the model, and
the index/compaction maintenance it may trigger; both printed) and its ratio to a bare
`lance.write_dataset` of the same Arrow data (the samples and embedding tables, measured in the same run on the same rows),
in wall time and in CPU seconds per row (`ingest_cpu_ratio` = bare ÷ ingest CPU per row: every thread of each
process, the figure to trust on a shared machine; `--ingest-only` stops there),
Lance versions and manifest bytes, bytes on disk per row ÷ raw float32 bytes per row,
the no-op re-ingest's seconds and peak RSS, `clipsql query STORE "SELECT 1"` (a fresh
process: import + open + views), count and point-lookup latency, approximate-score rows/s
over the whole store, exact-score rows/s on a subsample with its FLOP efficiency against a
numpy float32 GEMM of the same shape, `stats fit` seconds, `select --recipe kl-guided` at `--select-at` rows with its FLOP
efficiency against the same GEMM bound, and the per-row cost ratio
largest ÷ smallest size for each figure that should stay flat (target ≤ 1.25).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import ROOT, cli_stdout, key_values, machine, table, vm_hwm_kib, write_json  # noqa: E402

MODEL = ["--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k"]
SHARD_ROWS = 250_000


# ----------------------------------------------------------------------------- data
def generate(folder: Path, start: int, stop: int, dim: int, seed: int) -> int:
    """Rows start..stop-1 of a CLIP-like pool in clip-retrieval layout (streamed in chunks)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=dim).astype(np.float32) * 0.5
    nbytes = 0
    for s, lo in enumerate(range(start, stop, SHARD_ROWS)):
        hi = min(lo + SHARD_ROWS, stop)
        n = hi - lo
        img = np.lib.format.open_memmap(folder / "img_emb" / f"img_emb_{s}.npy", "w+", np.float32, (n, dim))
        txt = np.lib.format.open_memmap(folder / "text_emb" / f"text_emb_{s}.npy", "w+", np.float32, (n, dim))
        for a in range(0, n, 50_000):
            b = min(a + 50_000, n)
            z = rng.standard_normal((b - a, dim), dtype=np.float32)
            img[a:b] = centre + z + 0.5 * rng.standard_normal((b - a, dim), dtype=np.float32)
            txt[a:b] = -centre + z + 0.5 * rng.standard_normal((b - a, dim), dtype=np.float32)
        img.flush()
        txt.flush()
        del img, txt
        keys = np.char.add("k", np.arange(lo, hi).astype(str))
        pq.write_table(pa.table({"key": keys, "url": np.char.add("http://example.com/", keys),
                                 "caption": np.char.add("a synthetic photo ", keys),
                                 "similarity": rng.random(n)}),
                       folder / "metadata" / f"metadata_{s}.parquet", row_group_size=1_000_000)
        nbytes += 2 * n * dim * 4
    return nbytes


# ----------------------------------------------------------------------------- steps in a child process
def child(argv: list[str]) -> dict:
    """Run `bench/scale.py --step …` in a fresh process; its JSON result plus wall seconds."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--step", *argv], capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"step {argv[0]} failed:\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.perf_counter() - t0
    return out


def step(args: argparse.Namespace, rest: list[str]) -> None:
    name = rest[0]
    t0 = time.perf_counter()
    out: dict = {}
    if name == "ingest":
        from clipsql import cli  # noqa: F401  (imported before the clock)
        from clipsql.ingest import run as ingest_run
        store, src = rest[1], rest[2]
        # the process CPU when the source is opened: the run's fixed costs (resolving the model) lie before
        opened: list[float] = []
        open_source = ingest_run.open_source

        def timed_open(*a: object, **k: object) -> object:
            opened.append(time.process_time())
            return open_source(*a, **k)
        ingest_run.open_source = timed_open
        c0 = time.process_time()
        text = cli_stdout(["ingest", store, src, *MODEL, "--id-column", "key", "--no-progress", "--format", "json"])
        out["cpu_seconds"] = time.process_time() - c0     # every thread of the process (Lance's, BLAS's)
        out["fixed_cpu_seconds"] = opened[0] - c0 if opened else None
        out["summary"] = json.loads(text)
    elif name == "bare":
        out.update(bare_write(Path(rest[1]), Path(rest[2]), int(rest[3])))
    elif name == "select1":
        from clipsql import queries
        con = queries.connect(rest[1])
        con.sql("SELECT 1").fetchall()
    elif name == "queries":
        out.update(query_figures(rest[1], int(rest[2])))
    elif name == "select":
        from clipsql.queries.sql.functions import one_blas_thread  # noqa: F401 - select pins BLAS itself
        from clipsql.queries.curation.selection import select
        from clipsql.store.fit_rows import latest_fit
        from clipsql.store.reads import count_rows
        from clipsql.store.store import Store
        st = Store.open(rest[1])
        out["sidecar"] = select(st, recipe="kl-guided", output=rest[2]).to_json()
        n = count_rows(st, st.model())
        fit_rows = latest_fit(st, st.model(), with_arrays=False).reference_size
        out.update(gemm_rows_per_s(min(n, 50_000), fit_rows, st.model().dim))
    elif name == "fit":
        from clipsql.store.fits import fit_stats
        from clipsql.store.store import Store
        out["fit"] = fit_stats(Store.open(rest[1])).to_json()
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mib"] = (vm_hwm_kib() or 0) / 1024
    print(json.dumps(out, default=str))


def bare_write(src: Path, tmp: Path, rows: int) -> dict:
    """A bare lance.write_dataset of the samples and embedding tables the ingest writes, for `rows` rows."""
    import lance
    import pyarrow as pa
    import pyarrow.parquet as pq
    from clipsql.kernels.arrays import fixed_list
    from clipsql.ingest.captions import caption_features
    from clipsql.store.tables import embeddings_schema, samples_schema
    meta = pq.read_table(src / "metadata" / "metadata_0.parquet").slice(0, rows)
    img = np.load(src / "img_emb" / "img_emb_0.npy", mmap_mode="r")[:rows]
    txt = np.load(src / "text_emb" / "text_emb_0.npy", mmap_mode="r")[:rows]
    n, dim = img.shape
    # the caption features (language, counts) an ingest computes are given here, not computed:
    # the bare write writes the same columns and bytes, without the ingest's own work
    features = caption_features(meta["caption"])
    t0, c0 = time.perf_counter(), time.process_time()
    samples = pa.table({"id": meta["key"], "uri": meta["url"], "caption": meta["caption"],
                        "width": pa.nulls(n, pa.int32()), "height": pa.nulls(n, pa.int32()),
                        **features,
                        "source": pa.array([str(src)] * n), "location": pa.array([""] * n),
                        "caption_truncated": pa.array(np.zeros(n, bool)),
                        "metadata": pa.array(['{"similarity": 0.5}'] * n)}, schema=samples_schema())
    emb = pa.table({"id": meta["key"], "uri": meta["url"], "caption": meta["caption"],
                    "image_embedding": fixed_list(np.asarray(img), dim),
                    "text_embedding": fixed_list(np.asarray(txt), dim),
                    "seq": pa.array(np.ones(n, np.int64))}, schema=embeddings_schema(dim))
    lance.write_dataset(samples, str(tmp / "bare_samples.lance"), mode="overwrite")
    lance.write_dataset(emb, str(tmp / "bare_emb.lance"), mode="overwrite")
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    shutil.rmtree(tmp / "bare_samples.lance", ignore_errors=True)
    shutil.rmtree(tmp / "bare_emb.lance", ignore_errors=True)
    return {"bare_rows_per_s": n / secs, "bare_seconds": secs, "bare_cpu_seconds": cpu}


def query_figures(store: str, exact_rows: int) -> dict:
    from clipsql import queries
    from clipsql.queries.sql.functions import one_blas_thread
    from clipsql.store.store import Store
    from clipsql.store.fit_rows import latest_fit
    st = Store.open(store)
    con = queries.connect(st)
    out: dict = {}
    n = con.sql("SELECT count(*) FROM samples").fetchall()[0][0]
    out["rows"] = n

    def best_of(sql: str, k: int = 3) -> float:
        times = []
        for _ in range(k):
            t0 = time.perf_counter()
            con.sql(sql).fetchall()
            times.append(time.perf_counter() - t0)
        return min(times)

    out["count_s"] = best_of("SELECT count(*) FROM samples")
    key = f"k{n // 2}"
    out["point_lookup_s"] = best_of(f"SELECT id, caption FROM samples WHERE id = '{key}'")
    out["point_lookup_emb_s"] = best_of(f"SELECT id FROM embeddings WHERE id = '{key}'")
    with one_blas_thread():
        t0 = time.perf_counter()
        con.sql("SELECT avg(image_info_gain_approx) FROM scores").fetchall()
        secs = time.perf_counter() - t0
    out["approx_rows_per_s"] = n / secs
    # exact Information Gain on a subsample, and a numpy float32 GEMM of the same shape
    rec = st.model()
    fit_rows = latest_fit(st, rec, with_arrays=False).reference_size
    # the subsample: rows of the first commit (a `seq` filter Lance applies before reading vectors,
    # and DuckDB scans in parallel; LIMIT would run on one thread, a hash filter read every vector)
    first = int(con.sql("SELECT min(seq) FROM _lance_emb_0").fetchall()[0][0])
    where = f"FROM _lance_emb_0 WHERE seq = {first}"
    sub = con.sql(f"SELECT count(*) {where}").fetchall()[0][0]
    with one_blas_thread():
        t0 = time.perf_counter()
        con.sql(f"SELECT avg(text_info_gain(text_embedding)) {where}").fetchall()
        secs = time.perf_counter() - t0
    out["exact_rows_per_s"] = sub / secs
    out.update(gemm_rows_per_s(sub, fit_rows, rec.dim))
    out["exact_flop_efficiency"] = out["exact_rows_per_s"] / out["gemm_rows_per_s"]
    return out


def gemm_rows_per_s(rows: int, m: int, d: int) -> dict:
    """The bound: a bare numpy float32 GEMM of the same shape (rows × d times d × M), all cores."""
    A = np.random.default_rng(0).standard_normal((rows, d), dtype=np.float32)
    B = np.random.default_rng(1).standard_normal((m, d), dtype=np.float32)
    out = np.empty((2048, m), dtype=np.float32)
    t0 = time.perf_counter()
    for i in range(0, rows, 2048):
        np.matmul(A[i:i + 2048], B.T, out=out[:len(A[i:i + 2048])])
    secs = time.perf_counter() - t0
    return {"gemm_rows_per_s": rows / secs, "gemm_gflops": 2 * rows * m * d / secs / 1e9}


# ----------------------------------------------------------------------------- driver
def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-rows", type=int, default=5_000_000)
    ap.add_argument("--sizes", default="100000,1000000,5000000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--exact-rows", type=int, default=20_000)
    ap.add_argument("--bare-rows", type=int, default=200_000)
    ap.add_argument("--select-at", type=int, default=1_000_000,
                    help="size at which `select --recipe kl-guided` (exact text IG over every row) is timed")
    ap.add_argument("--ingest-only", action="store_true",
                    help="per size only the bare write and the ingest (wall and CPU ratios), nothing after")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--step", action="store_true", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.step:
        step(args, rest)
        return
    sizes = [s for s in (int(x) for x in args.sizes.split(",")) if s <= args.max_rows]
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="clipsql-scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    store = tmp / "store"
    subprocess.run([sys.executable, "-m", "clipsql", "init", str(store)], check=True, capture_output=True)
    results = []
    have = 0
    for i, size in enumerate(sizes):
        src = tmp / f"src{i}"
        raw = generate(src, have, size, args.dim, seed=i)
        rows = size - have
        bare = max((child(["bare", str(src), str(tmp), str(min(args.bare_rows, rows))]) for _ in range(3)),
                   key=lambda b: b["bare_rows_per_s"])          # the baseline at its best of three
        ing = child(["ingest", str(store), str(src)])
        s = ing["summary"]
        fixed = sum(s["seconds"].get(k, 0) for k in ("resolve_model", "load_model"))
        bare_rows = min(args.bare_rows, rows)
        # CPU seconds per row, bare ÷ ingest (every thread of each process; without the ingest's fixed
        # costs — resolving the model — measured up to the opening of the source)
        fixed_cpu = ing["fixed_cpu_seconds"]
        cpu = {"ingest_cpu_s": ing["cpu_seconds"], "ingest_fixed_cpu_s": fixed_cpu, "bare_cpu_s": bare["bare_cpu_seconds"],
               "ingest_cpu_ratio": (bare["bare_cpu_seconds"] / bare_rows) / (max(ing["cpu_seconds"] - (fixed_cpu or 0.0),
                                                                                  1e-9) / s["added"]),
               "ingest_wall_ratio": (s["added"] / (s["wall_seconds"] - fixed)) / bare["bare_rows_per_s"]}
        if args.ingest_only:
            shutil.rmtree(src)
            r = {"size": size, "added": s["added"], "ingest_wall_s": s["wall_seconds"], "ingest_fixed_s": fixed,
                 "bare_rows": bare_rows, "bare_wall_s": bare["bare_seconds"], **cpu, "stage_seconds": s["seconds"]}
            results.append(r)
            have = size
            print(table([[k, _f(v)] for k, v in r.items() if k != "stage_seconds"], ["figure", f"{size:,} rows"]))
            print("stages:", s["seconds"], flush=True)
            continue
        noop = child(["ingest", str(store), str(src)])
        shutil.rmtree(src)
        fit = child(["fit", str(store)])
        sel1 = child(["select1", str(store)])
        q = child(["queries", str(store), str(args.exact_rows)])
        sel = child(["select", str(store), str(tmp / "kl.parquet")]) if size == args.select_at else None
        lance_dir = store / "lance"
        manifests = dir_bytes(lance_dir, "*.manifest")
        data = dir_bytes(lance_dir)
        versions = {p.name.removesuffix(".lance"): len(list((p / "_versions").glob("*.manifest")))
                    for p in lance_dir.glob("*.lance")}
        # wall_seconds ends before the maintenance ingest may trigger (reported apart as maintain_s)
        ingest_s = s["wall_seconds"] - fixed
        r = {"size": size, "added": s["added"], "ingest_rows_per_s": s["added"] / ingest_s,
             "bare_rows_per_s": bare["bare_rows_per_s"],
             "ingest_ratio": (s["added"] / ingest_s) / bare["bare_rows_per_s"], **cpu,
             "maintain_s": s["seconds"].get("maintain", 0), "commits": s["commits"],
             "ingest_peak_rss_mib": ing["peak_rss_mib"],
             "versions_max": max(versions.values()), "manifest_bytes": manifests,
             "manifest_share": manifests / max(1, data), "disk_per_row_ratio": data / (size * 2 * args.dim * 4),
             "noop_s": noop["summary"]["wall_seconds"], "noop_process_s": noop["process_seconds"],
             "noop_share": noop["summary"]["wall_seconds"] / s["wall_seconds"],
             "noop_peak_rss_mib": noop["peak_rss_mib"],
             "select1_process_s": sel1["process_seconds"], "select1_s": sel1["seconds"],
             "fit_s": fit["fit"]["seconds"], "fit_peak_rss_mib": fit["peak_rss_mib"],
             "count_s": q["count_s"], "point_lookup_s": q["point_lookup_s"],
             "point_lookup_emb_s": q["point_lookup_emb_s"],
             "approx_rows_per_s": q["approx_rows_per_s"], "exact_rows_per_s": q["exact_rows_per_s"],
             "exact_flop_efficiency": q["exact_flop_efficiency"], "query_peak_rss_mib": q["peak_rss_mib"],
             "stage_seconds": s["seconds"], "source_bytes": raw,
             "ingest_wall_s": s["wall_seconds"], "ingest_fixed_s": fixed}
        if sel is not None:
            rate = size / sel["seconds"]
            r.update({"kl_guided_select_s": sel["seconds"], "kl_guided_rows_per_s": rate,
                      "kl_guided_flop_efficiency": rate / sel["gemm_rows_per_s"],
                      "kl_guided_peak_rss_mib": sel["peak_rss_mib"]})
        results.append(r)
        have = size
        print(table([[k, _f(v)] for k, v in r.items() if k != "stage_seconds"], ["figure", f"{size:,} rows"]))
        print("stages:", s["seconds"], flush=True)
    figures = {"machine": machine(), "steps": results}
    if len(results) > 1 and not args.ingest_only:
        a, b = results[0], results[-1]
        figures["per_row_cost_ratio"] = {
            "ingest": a["ingest_rows_per_s"] / b["ingest_rows_per_s"],
            "approx_score": a["approx_rows_per_s"] / b["approx_rows_per_s"],
            "exact_score": a["exact_rows_per_s"] / b["exact_rows_per_s"],
            "ingest_peak_rss": b["ingest_peak_rss_mib"] / a["ingest_peak_rss_mib"],
            "query_peak_rss": b["query_peak_rss_mib"] / a["query_peak_rss_mib"],
        }
        print("per-row cost, largest ÷ smallest size (target ≤ 1.25):", key_values(figures["per_row_cost_ratio"]))
    write_json(args.json, figures)
    if not args.tmp:
        shutil.rmtree(tmp, ignore_errors=True)


def _f(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


if __name__ == "__main__":
    main()
