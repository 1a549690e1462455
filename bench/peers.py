"""clipsql against its peers, one table from one run: every figure is clipsql ÷ the best peer (> 1 = clipsql faster).

    .venv/bin/python bench/peers.py [--rows 1000000] [--only ingest,scores,ig,search,index,dedup,startup]
                                    [--rounds 2] [--json peers.json] [--tmp DIR]

Rows (sizes all follow --rows; see bench/README.md, "bench/peers.py"):

* ingest  precomputed clip-retrieval ingest (`clipsql ingest`, the CLI in a child process, open_clip imported
          before the clock) vs a bare `lance.write_dataset` and a LanceDB `add` of the same Arrow data (the
          tables the ingest wrote, read back into RAM before the clock). Target CPU ≥ 0.6, wall ≥ 0.8.
* scores  `image_info_gain_approx` through DuckDB SQL vs numpy float32 over the same vectors in RAM
          (bench/scores.py, its figures `sql_numpy_ratio`, `sql_cpu_s`, `numpy_cpu_s`). Target ≥ 0.8.
* ig      the exact Information Gain over all N rows (`SELECT avg(text_info_gain(text_embedding)) FROM
          embeddings`, M = --reference-size) vs a float64 GEMM of the same shape (N × d · d × M). Target ≥ 0.8.
* search  exact top-10 (`nearest`'s exact path after its first call; bench/search.py) vs numpy GEMM top-k
          over unit rows in RAM (bench/search.py) and faiss IndexFlatIP (here, on the same table): one query
          (target ≥ 0.5) and --queries queries in one pass (target ≥ 0.9); CPU-second ratios.
* index   `clipsql index` (Lance --lance-kind) vs faiss IVF-Flat and HNSW (bench/search.py): build wall/CPU,
          peak RSS, and per query modality (image → image, text → image) queries per CPU-second at the
          smallest setting reaching recall@10 ≥ 0.95. Target: clipsql's recall ≥ 0.95 (the ratios are context).
* dedup   SemDeDup vs the faiss reference (spherical k-means, IndexFlatIP), K = round(√N), and k-means vs
          faiss.Kmeans (bench/dedup.py --peers). Target wall ≥ 1.0 at ≤ 0.5× peak memory; k-means ≥ 1.0.
* startup `clipsql query STORE "SELECT 1"` in a fresh process vs a fresh Python running the same query with
          DuckDB alone (best of --startup-runs). Target: clipsql's wall ≤ 0.5 s (the ratio is context).

Each side runs in a child process; CPU seconds are the measured region's process CPU (all threads) where
the child reports it, else the child's rusage. Peak RSS: the side's own process VmHWM where it has a
process of its own. A missing figure in a script's JSON fails that row with a message naming the key;
the other rows still run, and the exit status is 1.

This parent process imports neither numpy nor clipsql (child rusage then carries little of its own
memory); the children do.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, cli_stdout, key_values, machine, table, write_json

HERE = Path(__file__).resolve().parent
ROWS = ("ingest", "scores", "ig", "search", "index", "dedup", "startup")
MODEL = ["--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k"]   # bench/scale.py's, no forward pass


class RowError(Exception):
    """A row could not be measured: a child failed or a script's JSON lacks a figure."""


# ----------------------------------------------------------------------------- child processes
def run(argv: list[str], timeout: float | None = None, env: dict[str, str] | None = None) -> dict:
    """Run argv; wall, rusage CPU seconds, ru_maxrss (MiB), stdout, the last stdout line as JSON if it is."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(argv, stdout=out, stderr=err, cwd=ROOT, text=True, env=env)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:              # without a timeout, block: the wall clock is then not a polling step
            pid, status, ru = os.wait4(p.pid, 0 if deadline is None else os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                p.kill()
                _, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    res = {"wall_s": time.perf_counter() - t0, "cpu_s": ru.ru_utime + ru.ru_stime,
           "maxrss_mib": ru.ru_maxrss / 1024, "stdout": stdout, "stderr": stderr}
    if p.returncode != 0:
        name = " ".join(Path(a).name if "/" in a else a for a in argv[1:4])
        raise RowError(f"`{name} …` exited with status {p.returncode}:\n{stderr[-2500:]}")
    lines = stdout.strip().splitlines()
    try:
        res["json"] = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        res["json"] = None
    return res


def own(step: str, *args: Any, timeout: float | None = None) -> dict:
    """One of this script's child steps (below); its JSON plus the child's rusage."""
    r = run([sys.executable, str(Path(__file__).resolve()), "--child", step, *map(str, args)], timeout)
    if not isinstance(r["json"], dict):
        raise RowError(f"child step {step} printed no JSON line:\n{r['stdout'][-1500:]}{r['stderr'][-1500:]}")
    r["json"]["rusage_cpu_s"] = r["cpu_s"]
    return r["json"]


def script(name: str, args: list[str], json_path: Path, timeout: float | None = None) -> dict:
    """bench/<name> with --json; (its JSON's figures, the child's rusage)."""
    r = run([sys.executable, str(HERE / name), *args, "--json", str(json_path)], timeout)
    try:
        payload = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RowError(f"bench/{name} wrote no readable JSON to {json_path}: {e}") from None
    if not isinstance(payload.get("figures"), dict):
        raise RowError(f"bench/{name}'s JSON has no key 'figures'")
    payload["_rusage"] = {"wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "maxrss_mib": r["maxrss_mib"]}
    return payload


def need(d: dict, key: str, where: str) -> Any:
    """d[key], or a RowError naming the key and where it was looked for."""
    if not isinstance(d, dict) or key not in d or d[key] is None:
        raise RowError(f"{where} has no key {key!r} (the script changed? peers.py reads it)")
    return d[key]


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t: tuple[float, float]) -> dict:
    return {"wall_s": time.perf_counter() - t[0], "cpu_s": time.process_time() - t[1]}


def child(step: str, args: list[str]) -> None:
    """This script's own child steps; each prints one JSON line."""
    out: dict = {}
    if step == "gen":                                    # a clip-retrieval pool (bench/scale.py's generator)
        import scale
        scale.generate(Path(args[0]), 0, int(args[1]), int(args[2]), seed=0)
    elif step == "ingest":                               # `clipsql ingest` of the pool, the CLI in this process
        import open_clip  # noqa: F401  (imported before the clock: the ingest resolves the model through it)
        from clipsql import cli  # noqa: F401  (imported before the clock too)
        t = _clock()
        text = cli_stdout(["ingest", args[0], args[1], *MODEL, "--id-column", "key", "--no-progress",
                           "--format", "json"])
        out.update(_since(t))
        s = json.loads(text)
        out["added"] = s["added"]
        out["summary_wall_s"] = s["wall_seconds"]
        out["fixed_s"] = sum(s["seconds"].get(k, 0) for k in ("resolve_model", "load_model"))
        out["maintain_s"] = s["seconds"].get("maintain", 0)
    elif step in ("bare", "lancedb"):                    # the same Arrow data, written by the peer
        import lance
        store, dest = Path(args[0]), Path(args[1])
        tables = {p.name: lance.dataset(str(p)).to_table() for p in sorted((store / "lance").glob("*.lance"))}
        out["rows"] = {k: v.num_rows for k, v in tables.items()}
        if step == "bare":
            t = _clock()
            for name, tab in tables.items():
                lance.write_dataset(tab, str(dest / name), mode="create")
            out.update(_since(t))
        else:
            import lancedb
            t = _clock()
            db = lancedb.connect(str(dest))
            for name, tab in tables.items():
                db.create_table(name.removesuffix(".lance"), schema=tab.schema).add(tab)
            out.update(_since(t))
    elif step == "ig":                                   # the exact score over every row, through SQL
        from clipsql import queries
        con = queries.connect(args[0])
        sql = "SELECT avg(text_info_gain(text_embedding)) FROM embeddings"
        with queries.one_blas_thread():                  # as `clipsql query` runs it
            con.execute(sql.replace("FROM embeddings", "FROM (SELECT * FROM embeddings LIMIT 64)")).fetchall()
            t = _clock()
            out["value"] = con.execute(sql).fetchall()[0][0]
            out.update(_since(t))
        out["rows"] = con.execute("SELECT count(*) FROM embeddings").fetchall()[0][0]
    elif step == "gemm64":                               # float64 GEMM of the exact score's shape, all cores
        import numpy as np
        n, m, d = int(args[0]), int(args[1]), int(args[2])
        rng = np.random.default_rng(0)
        A = [rng.standard_normal((2048, d)) for _ in range(8)]   # 8 distinct blocks cycled: 64 MB at d = 512
        B = rng.standard_normal((d, m))
        C = np.empty((2048, m))
        t = _clock()
        for j, i in enumerate(range(0, n, 2048)):
            k = min(2048, n - i)
            np.matmul(A[j % 8][:k], B, out=C[:k])
        out.update(_since(t))
        out["gflops"] = 2.0 * n * m * d / out["wall_s"] / 1e9
    elif step == "flat":                                 # faiss IndexFlatIP exact top-10 over unit rows in RAM
        import faiss
        import lance
        import numpy as np
        if int(args[3]):
            faiss.omp_set_num_threads(int(args[3]))
        col = "image_embedding"
        ds = lance.dataset(args[0])
        tab = ds.to_table(columns=[col])
        d = tab.schema.field(col).type.list_size
        X = np.array(tab.column(col).combine_chunks().values.to_numpy().reshape(-1, d), dtype=np.float32)
        del tab
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        index = faiss.IndexFlatIP(d)
        index.add(X)
        Q = X[np.random.default_rng(1).choice(len(X), int(args[1]), replace=False)].copy()
        rounds = int(args[2])
        for name, q in (("1", Q[:1]), ("b", Q)):
            walls, cpus = [], []
            for _ in range(rounds):
                t = _clock()
                index.search(q, 10)
                r = _since(t)
                walls.append(r["wall_s"])
                cpus.append(r["cpu_s"])
            out[f"faiss_{name}_wall_s"] = statistics.median(walls)
            out[f"faiss_{name}_cpu_s"] = statistics.median(cpus)
        out["threads"] = faiss.omp_get_max_threads()
    else:
        raise SystemExit(f"unknown child step {step}")
    out["peak_rss_mib"] = _vm_hwm_mib()
    print(json.dumps(out, default=str))


# ----------------------------------------------------------------------------- rows
def ratio(peer: float | None, ours: float | None) -> float | None:
    """peer ÷ clipsql of a cost (seconds): > 1 = clipsql faster."""
    if peer is None or ours is None or not ours or (isinstance(ours, float) and math.isnan(ours)):
        return None
    return peer / ours


def line(row: str, ours: str, peer: str, theirs: str, wall: float | None, cpu: float | None,
         mem_ours: float | None, mem_peer: float | None, target: str, met: bool | None, **extra: Any) -> dict:
    """One comparison of the table: clipsql's figure, the peer and its figure, the ratios, peak RSS, target."""
    return {"row": row, "clipsql": ours, "peer": peer, "peer_figure": theirs,
            "wall_ratio": wall, "cpu_ratio": cpu, "clipsql_peak_mib": mem_ours, "peer_peak_mib": mem_peer,
            "target": target, "met": met, **extra}


def at_least(x: float | None, bound: float) -> bool | None:
    return None if x is None else x >= bound


def both(*xs: bool | None) -> bool | None:
    return None if any(x is None for x in xs) else all(xs)


class Ctx:
    def __init__(self, a: argparse.Namespace, tmp: Path):
        self.a, self.tmp = a, tmp
        self.store: Path | None = None          # a store of --rows ingested rows (the ingest row's, or the ig row's)
        self.raw: dict[str, Any] = {}           # every child's output, for --json


def make_pool(c: Ctx) -> Path:
    src = c.tmp / "pool"
    if not src.exists():
        own("gen", src, c.a.rows, c.a.dim)
    return src


def ingest_store(c: Ctx, src: Path, name: str) -> tuple[Path, dict]:
    store = c.tmp / name
    shutil.rmtree(store, ignore_errors=True)
    run([sys.executable, "-m", "clipsql", "init", str(store)])
    return store, own("ingest", store, src)


def row_ingest(c: Ctx) -> list[dict]:
    src = make_pool(c)
    runs: dict[str, list[dict]] = {"clipsql": [], "lance": [], "lancedb": []}
    for r in range(c.a.rounds):                          # interleaved: one of each per round
        store, ing = ingest_store(c, src, f"store{r % 2}")
        ing["wall_s"] = need(ing, "summary_wall_s", "the ingest summary") - ing["fixed_s"]
        runs["clipsql"].append(ing)
        for peer, step in (("lance", "bare"), ("lancedb", "lancedb")):
            dest = c.tmp / f"peer-{peer}"
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            runs[peer].append(own(step, store, dest))
            shutil.rmtree(dest, ignore_errors=True)
        if c.store is not None and c.store != store:
            shutil.rmtree(c.store, ignore_errors=True)
        c.store = store
    c.raw["ingest"] = runs
    best = {k: min(v, key=lambda x: x["wall_s"]) for k, v in runs.items()}
    ours = best["clipsql"]
    n = ours["added"]
    out = []
    for peer, label in (("lance", "lance.write_dataset"), ("lancedb", "LanceDB add")):
        p = best[peer]
        w, cp = ratio(p["wall_s"], ours["wall_s"]), ratio(p["cpu_s"], ours["cpu_s"])
        out.append(line("ingest", f"{n / ours['wall_s']:,.0f} rows/s", label, f"{n / p['wall_s']:,.0f} rows/s",
                        w, cp, ours["peak_rss_mib"], p["peak_rss_mib"], "CPU ≥ 0.6, wall ≥ 0.8",
                        both(at_least(cp, 0.6), at_least(w, 0.8)), key=f"ingest_{peer}"))
    return out


def row_scores(c: Ctx) -> list[dict]:
    a = c.a
    args = ["--rows", str(a.rows), "--dim", str(a.dim), "--repeats", str(a.rounds),
            "--reference-size", str(min(a.reference_size, a.rows)), "--exact-rows", str(min(2000, a.rows)),
            "--sweep", "", "--no-experiments"]
    p = script("scores.py", args, c.tmp / "scores.json")
    c.raw["scores"] = p
    f, where = p["figures"], "bench/scores.py's figures"
    sql, np_ = need(f, "sql_rows_per_s", where), need(f, "numpy_rows_per_s", where)
    w = need(f, "sql_numpy_ratio", where)
    cpu_s, np_cpu = f.get("sql_cpu_s"), f.get("numpy_cpu_s")
    cp = ratio(np_cpu, cpu_s)
    return [line("scores", f"{sql:,.0f} rows/s", "numpy float32 in RAM", f"{np_:,.0f} rows/s", w, cp,
                 None, None, "≥ 0.8", at_least(w, 0.8), key="scores_numpy", median_ratio=f.get("sql_numpy_ratio_median"),
                 process_peak_mib=p["_rusage"]["maxrss_mib"])]


def row_ig(c: Ctx) -> list[dict]:
    a = c.a
    if c.store is None:
        c.store, _ = ingest_store(c, make_pool(c), "store0")
    m = min(a.reference_size, a.rows)
    run([sys.executable, "-m", "clipsql", "stats", "fit", str(c.store), "--reference-size", str(m)])
    ig = own("ig", c.store)
    n = need(ig, "rows", "the ig child")
    gemm = min((own("gemm64", n, m, a.dim) for _ in range(a.rounds)), key=lambda x: x["wall_s"])
    c.raw["ig"] = {"clipsql": ig, "gemm64": gemm, "reference_size": m}
    w, cp = ratio(gemm["wall_s"], ig["wall_s"]), ratio(gemm["cpu_s"], ig["cpu_s"])
    return [line("ig", f"{n / ig['wall_s']:,.0f} rows/s (M = {m:,})", "float64 GEMM N×d·d×M",
                 f"{n / gemm['wall_s']:,.0f} rows/s", w, cp, ig["peak_rss_mib"], gemm["peak_rss_mib"],
                 "≥ 0.8", at_least(w, 0.8), key="ig_gemm64")]


def run_search(c: Ctx) -> dict:
    """bench/search.py once for both rows (search and index), its table kept for the faiss flat child."""
    if "search" in c.raw:
        return c.raw["search"]
    a = c.a
    want = set(a.only)
    work = c.tmp / "search"
    args = ["--rows", str(a.rows), "--dim", str(a.dim), "--queries", str(a.queries), "--rounds", str(a.rounds),
            "--tmp", str(work),
            "--kinds", a.lance_kind if "index" in want else "", "--faiss", a.faiss_index if "index" in want else ""]
    if "search" not in want:
        args.append("--skip-exact")
    p = script("search.py", args, c.tmp / "search.json")
    c.raw["search"] = p
    return p


def row_search(c: Ctx) -> list[dict]:
    a = c.a
    f, where = run_search(c)["figures"], "bench/search.py's figures"
    flat = None
    if importlib.util.find_spec("faiss") is None:     # the driver imports no peer; the child would fail
        print("  search: faiss is not installed (pip install -e '.[bench]'): its lines are left out")
    else:
        flat = own("flat", c.tmp / "search" / "emb.lance", a.queries, max(3, a.rounds), a.faiss_threads)
    c.raw["search_flat"] = flat
    out = []
    for n, label, target in (("1", "1 query", 0.5), ("b", f"{a.queries} queries", 0.9)):
        kind = "single" if n == "1" else "batch"
        ours_cpu = need(f, f"cached_{n}_cpu_s", where)
        ours_wall = f.get(f"cached_{n}_wall_s")
        np_cpu = need(f, f"numpy_unit_{n}_cpu_s", where)
        cp = need(f, f"exact_vs_numpy_unit_{kind}_cpu", where)
        w = need(f, f"exact_vs_numpy_unit_{kind}_wall", where)
        out.append(line(f"search {label}", f"{ours_cpu * 1e3:.1f} CPU-ms", "numpy GEMM top-k, unit rows in RAM",
                        f"{np_cpu * 1e3:.1f} CPU-ms", w, cp, None, None, f"≥ {target} (CPU)", at_least(cp, target),
                        key=f"search_{kind}_numpy"))
        if flat is None:
            continue
        fc, fw = flat[f"faiss_{n}_cpu_s"], flat[f"faiss_{n}_wall_s"]
        cp = ratio(fc, ours_cpu)       # the target is on numpy's line; faiss's flat scan is context
        out.append(line(f"search {label}", f"{ours_cpu * 1e3:.1f} CPU-ms", f"faiss IndexFlatIP ({flat['threads']} thr)",
                        f"{fc * 1e3:.1f} CPU-ms", ratio(fw, ours_wall), cp, None, flat["peak_rss_mib"],
                        "(context)", None, key=f"search_{kind}_faiss"))
    return out


def row_index(c: Ctx) -> list[dict]:
    a = c.a
    f = run_search(c)["figures"]
    key = f"lance_{a.lance_kind}"
    ours = need(f, key, "bench/search.py's figures")
    if "error" in ours:
        raise RowError(f"bench/search.py: {key} failed: {ours['error']}")
    out = []
    for m in [f"faiss_{x}" for x in a.faiss_index.split(",") if x]:
        peer = f.get(m)
        if peer is None:
            out.append(line("index", key, m, "not run (faiss missing?)", None, None, None, None, "-", None))
            continue
        if "error" in peer:
            out.append(line("index", key, m, f"failed: {peer['error']}", None, None, None, None, "-", None))
            continue
        w = ratio(need(peer, "build_s", m), need(ours, "build_s", key))
        cp = ratio(need(peer, "build_cpu_s", m), need(ours, "build_cpu_s", key))
        out.append(line("index build", f"{ours['build_s']:.1f} s", m, f"{peer['build_s']:.1f} s", w, cp,
                        need(ours, "peak_rss_mib", key), need(peer, "peak_rss_mib", m), "(context)", None,
                        key=f"index_build_{m}"))
        for mod in ("image", "text"):
            q, pq = need(ours, "by_query", key)[mod], need(peer, "by_query", m)[mod]
            qr = ratio(pq["qps_cpu"] and 1 / pq["qps_cpu"], q["qps_cpu"] and 1 / q["qps_cpu"])
            out.append(line(f"index {mod}→image", f"{q['qps_cpu']:.0f} q/CPU-s, R@10 {q['recall']:.3f} ({q['param']})",
                            m, f"{pq['qps_cpu']:.0f} q/CPU-s, R@10 {pq['recall']:.3f}"
                               f"{'' if pq['recall'] >= 0.95 else ' < 0.95'} ({pq['param']})",
                            ratio(1 / pq["qps"], 1 / q["qps"]), qr, None, None,
                            "clipsql R@10 ≥ 0.95", at_least(q["recall"], 0.95),
                            key=f"index_{mod}_{m}", peer_reached=pq["recall"] >= 0.95))
    return out


def row_dedup(c: Ctx) -> list[dict]:
    a = c.a
    k = a.clusters or max(2, round(math.sqrt(a.rows)))
    args = ["--peers", "--rows", str(a.rows), "--dim", str(a.dim), "--clusters", str(k), "--rounds", str(a.rounds),
            "--kmeans-rows", str(min(a.kmeans_rows, a.rows))]
    p = script("dedup.py", args, c.tmp / "dedup.json")
    c.raw["dedup"] = p
    f, where = p["figures"], "bench/dedup.py --peers' figures"
    out = []
    for key, what, peer in (("semdedup", f"SemDeDup, K = {k}", "faiss reference (spherical k-means, FlatIP)"),
                            ("kmeans", f"k-means, {min(a.kmeans_rows, a.rows):,} rows", "faiss.Kmeans")):
        w, cp = need(f, f"{key}_wall_ratio", where), need(f, f"{key}_cpu_ratio", where)
        mo, mp = need(f, f"{key}_clipsql_peak_mib", where), need(f, f"{key}_peer_peak_mib", where)
        ours, theirs = need(f, f"{key}_clipsql_cpu_s", where), need(f, f"{key}_peer_cpu_s", where)
        if key == "semdedup":
            mem = need(f, "semdedup_memory_ratio", where)
            target, met = "≥ 1.0 at ≤ 0.5× memory", both(at_least(w, 1.0), mem <= 0.5)
        else:
            target, met = "≥ 1.0", at_least(w, 1.0)
        out.append(line("dedup", f"{what}: {ours:.1f} CPU-s", peer, f"{theirs:.1f} CPU-s", w, cp, mo, mp,
                        target, met, key=f"dedup_{key}"))
    return out


STARTUP_SQL = "SELECT 1"
PEER_STARTUP = "import duckdb; duckdb.connect().execute('SELECT 1').fetchall()"


def row_startup(c: Ctx) -> list[dict]:
    """`clipsql query STORE "SELECT 1"` in a fresh process against a fresh Python doing the same
    query with DuckDB alone; best of --startup-runs each, interleaved, after one warm-up run of each
    (which writes the bytecode of an editable install, as a user's first command does: the child
    runs without PYTHONDONTWRITEBYTECODE). The store: the ingest row's, else a 100-row demo store."""
    store = c.store
    if store is None:
        store = c.tmp / "startup-store"
        if not store.exists():
            run([sys.executable, "-m", "clipsql", "demo", str(store), "--rows", "100", "--no-progress"])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    ours_argv = [sys.executable, "-m", "clipsql", "query", str(store), STARTUP_SQL]
    peer_argv = [sys.executable, "-c", PEER_STARTUP]
    runs: dict[str, list[dict]] = {"clipsql": [], "duckdb": []}
    for i in range(c.a.startup_runs + 1):
        for side, argv in (("clipsql", ours_argv), ("duckdb", peer_argv)):
            r = run(argv, env=env)
            if i:                                          # the first of each is the warm-up
                runs[side].append({"wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "peak_rss_mib": r["maxrss_mib"]})
    c.raw["startup"] = runs
    ours = min(runs["clipsql"], key=lambda x: x["wall_s"])
    peer = min(runs["duckdb"], key=lambda x: x["wall_s"])
    return [line("startup", f"{ours['wall_s']:.3f} s ({ours['cpu_s']:.2f} CPU-s)", "python + duckdb, SELECT 1",
                 f"{peer['wall_s']:.3f} s ({peer['cpu_s']:.2f} CPU-s)", ratio(peer["wall_s"], ours["wall_s"]),
                 ratio(peer["cpu_s"], ours["cpu_s"]), ours["peak_rss_mib"], peer["peak_rss_mib"], "wall ≤ 0.5 s",
                 ours["wall_s"] <= 0.5, key="startup_duckdb", clipsql_wall_s=round(ours["wall_s"], 3),
                 clipsql_cpu_s=round(ours["cpu_s"], 3))]


RUNNERS = {"ingest": row_ingest, "scores": row_scores, "ig": row_ig, "search": row_search, "index": row_index,
           "dedup": row_dedup, "startup": row_startup}


def _r(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"
    return str(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="N of every row (default 1,000,000)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--only", default=",".join(ROWS), help=f"rows to run, comma-separated: {','.join(ROWS)}")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each side keeps its best")
    ap.add_argument("--reference-size", type=int, default=10_000, help="M of the fits (scores, ig)")
    ap.add_argument("--queries", type=int, default=100, help="queries of the search and index rows")
    ap.add_argument("--lance-kind", default="ivf_hnsw_sq", help="`clipsql index` kind of the index row")
    ap.add_argument("--faiss-index", default="ivf_flat,hnsw", help="faiss peers of the index row")
    ap.add_argument("--faiss-threads", type=int, default=1,
                    help="OpenMP threads of the faiss IndexFlatIP peer (0: faiss's default). One by default: on a "
                         "shared machine its spinning threads burn CPU seconds (measured 7× at 2 threads, load 12)")
    ap.add_argument("--clusters", type=int, default=0, help="K of the dedup row (default round(√rows))")
    ap.add_argument("--kmeans-rows", type=int, default=100_000, help="rows of the k-means comparison")
    ap.add_argument("--startup-runs", type=int, default=7, help="fresh processes of each side of the startup row")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tmp", default=None, help="work directory (kept; default: a temporary one, removed)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1:])
        return
    a.only = [x.strip() for x in a.only.split(",") if x.strip()]
    unknown = [x for x in a.only if x not in ROWS]
    if unknown:
        ap.error(f"--only: unknown row(s) {', '.join(unknown)} (rows: {', '.join(ROWS)})")
    tmp = Path(a.tmp or tempfile.mkdtemp(prefix="clipsql-bench-peers-"))
    tmp.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(a, tmp)
    print(f"clipsql vs peers: {a.rows:,} rows × d = {a.dim}, rows {','.join(a.only)}, {a.rounds} rounds, "
          f"machine {machine()}", flush=True)
    lines: list[dict] = []
    failed: dict[str, str] = {}
    seconds: dict[str, float] = {}
    try:
        for name in ROWS:
            if name not in a.only:
                continue
            t0 = time.perf_counter()
            try:
                got = RUNNERS[name](ctx)
            except RowError as e:
                failed[name] = str(e)
                print(f"row {name} FAILED: {e}", file=sys.stderr, flush=True)
                continue
            finally:
                seconds[name] = round(time.perf_counter() - t0, 1)
            lines.extend(got)
            for ln in got:
                print(f"  {ln['row']}: {ln['clipsql']} vs {ln['peer']} {ln['peer_figure']}: wall {_r(ln['wall_ratio'])}, "
                      f"CPU {_r(ln['cpu_ratio'])}", flush=True)
    finally:
        if not a.tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(table([[ln["row"], ln["clipsql"], ln["peer"], ln["peer_figure"], _r(ln["wall_ratio"]), _r(ln["cpu_ratio"]),
                  _r(ln["clipsql_peak_mib"]), _r(ln["peer_peak_mib"]), ln["target"],
                  {True: "met", False: "MISSED", None: "-"}[ln["met"]]] for ln in lines],
                ["row", "clipsql", "peer", "peer figure", "wall ÷", "CPU ÷", "clipsql MiB", "peer MiB", "target",
                 ""]))
    print("  ÷ = peer seconds ÷ clipsql seconds (> 1 = clipsql faster); MiB = peak RSS of the side's own process")
    for name, msg in failed.items():
        print(f"  row {name} FAILED: {msg.splitlines()[0]}")
    kv: dict[str, Any] = {"rows": a.rows}
    for ln in lines:
        slug = ln.get("key")
        if not slug:
            continue
        for k in ("wall_ratio", "cpu_ratio"):
            if ln[k] is not None:
                kv[f"{slug}_{k}"] = round(ln[k], 3)
        if ln["met"] is not None:
            kv[f"{slug}_met"] = int(ln["met"])
    kv["failed"] = "+".join(failed) or "none"
    print(key_values(kv))
    write_json(a.json, {"lines": lines, "figures": kv, "failed": failed, "seconds": seconds, "args": vars(a),
                        "machine": machine(), "raw": ctx.raw})
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
