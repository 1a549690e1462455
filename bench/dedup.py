"""`clipsql dedup` (SemDeDup, docs/science.md §10) on a 1M-row store, d = 512, against bare numpy GEMMs.

    .venv/bin/python bench/dedup.py [--rows 1000000] [--dim 512] [--memory-gb 2] [--json dedup.json] [--tmp DIR]
    .venv/bin/python bench/dedup.py --assign 1000 4000 16000 --rows 200000   (flat vs two-level assignment)
    .venv/bin/python bench/dedup.py --engines --rows 200000 [--workers 2] [--rounds 1]   (local vs Ray engine)

Data: synthetic clustered image embeddings (2,000 true clusters of lognormal sizes, within-cluster
cosine ≈ 0.5, raw norms 5–15) with planted duplicates: 10 % of the rows are copies of another row
plus tiny noise (cosine > 0.999: removable at ε = 0.01) and 10 % near copies at cosine 0.97
(removable at ε = 0.05 only). Generated and written in chunks of 100k rows (each chunk's copies are
of its own base rows), so the bench holds one chunk at a time at any size; straight into a store
through `store.writer.write_batch` (one commit per chunk, text vectors NULL: dedup never reads them, and
the store is then ≈ 2 KiB per row). The dedup then runs with the defaults (K = round(√n) = 1,000
at 1M, sample 64·K, ≤ 20 iterations) and the given memory budget in a fresh process (peak RSS =
its VmHWM), then once more after 1 % more rows of the same clusters are appended (the
incremental re-run).

Printed per stage (pass 1 scan, sample read, sample k-means, pass 2 assign, within-cluster pass,
write): seconds, the float32 GEMM flops the stage's definition needs, and their ratio to a bare
numpy float32 GEMM of the same flop count (shapes like the stage's: rows × K for the k-means and
the assignment, 2048 × 2048 blocks for the pairs) measured in the same run; the share removed at
ε = 0.001, 0.01, 0.05 against the planted shares; the peak RSS against the memory budget, the
O(n) per-row arrays (≈ 90 bytes per row) and the raw float32 matrix (n × d × 4 bytes), which the
run never holds.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from _common import ROOT, key_values, machine, table, write_json  # noqa: E402

MODEL = "bench/semdedup-synthetic"
CHUNK = 100_000
TRUE_CLUSTERS = 2000


def generate(n: int, d: int, seed: int = 0, centre_seed: int = 0) -> Iterator[tuple[np.ndarray, dict]]:
    """n rows in chunks of CHUNK: per chunk 80 % clustered base rows, 10 % tiny-noise copies of them,
    10 % near copies (cos 0.97) of distinct ones. Yields (rows, planted counts of the chunk)."""
    crng = np.random.default_rng(centre_seed)
    centres = crng.standard_normal((TRUE_CLUSTERS, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sizes = crng.lognormal(0, 1, TRUE_CLUSTERS)
    p = sizes / sizes.sum()
    rng = np.random.default_rng(seed)
    for a in range(0, n, CHUNK):
        m = min(CHUNK, n - a)
        n_copy = n_near = m // 10
        n_base = m - n_copy - n_near
        Z = centres[rng.choice(TRUE_CLUSTERS, n_base, p=p)] + \
            rng.standard_normal((n_base, d), dtype=np.float32) / np.float32(math.sqrt(d))
        base = Z / np.linalg.norm(Z, axis=1, keepdims=True)
        src = rng.integers(0, n_base, n_copy)
        copies = base[src] + 1e-3 * rng.standard_normal((n_copy, d), dtype=np.float32) / np.float32(math.sqrt(d))
        x = base[rng.choice(n_base, n_near, replace=False)].astype(np.float64)
        z = rng.standard_normal((n_near, d))
        z -= (z * x).sum(1, keepdims=True) * x
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        X = np.concatenate([base, copies, (0.97 * x + math.sqrt(1 - 0.97 ** 2) * z).astype(np.float32)])
        X *= rng.uniform(5, 15, (m, 1)).astype(np.float32)
        yield X, {"base": n_base, "copies": n_copy, "near": n_near,
                  "copy_groups_distinct_sources": int(len(np.unique(src)))}


def build(path: Path, chunks: Iterator[tuple[np.ndarray, dict]], start: int = 0, init: bool = True) -> dict:
    """Write the chunks into the store (one commit each); the summed planted counts."""
    from clipsql.store.store import Store
    from clipsql.store.writer import write_batch
    from clipsql.store.runs import start_run
    st = Store.init(path) if init else Store.open(path)
    planted: dict = {}
    pos = start
    for X, counts in chunks:
        if init and not planted:
            st.register_model(model_id=MODEL, kind="clip", dim=X.shape[1], logit_scale=100.0, logit_bias=None,
                              context_length=77, spec={})
        rec = st.model(MODEL)
        run = start_run(st.engine, MODEL, "bench", "precomputed")
        ids = np.char.add("k", np.char.zfill(np.arange(pos, pos + len(X)).astype(str), 9)).tolist()
        write_batch(st, rec, samples=None, ids=ids, image=X, text=np.full_like(X, np.nan), run_id=run,
                       source="bench", rejects=[], meta_types={})
        pos += len(X)
        for k, v in counts.items():
            planted[k] = planted.get(k, 0) + v
    return planted


def step_dedup(store: str, memory_gb: str) -> None:
    """Child process: one `semdedup` run; its report plus peak RSS."""
    from _common import vm_rss_kib
    from clipsql.queries.curation.dedup import semdedup
    from clipsql.store.store import Store
    st = Store.open(store)
    before = (vm_rss_kib() or 0) / 1024                    # the interpreter, numpy, Lance, DuckDB
    res = semdedup(st, progress=False, memory_gb=float(memory_gb)).as_dict()
    res["rss_before_mib"] = before
    res["peak_rss_mib"] = _peak_rss_mib()
    print(json.dumps(res, default=str))


def _peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: after the exec it still carries the peak of
    the forking parent (the one that built the store), so both sides of a comparison read the parent's."""
    from _common import vm_hwm_kib
    return (vm_hwm_kib() or 0) / 1024


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def step_clipsql(store: str, memory_gb: str, clusters: str) -> None:
    """Child process: a full `semdedup` run (refit) with K = `clusters`; wall, CPU seconds, peak RSS."""
    from _common import vm_rss_kib
    from clipsql.queries.curation.dedup import semdedup
    from clipsql.store.store import Store
    st = Store.open(store)
    before = (vm_rss_kib() or 0) / 1024
    c0, t0 = _cpu(), time.perf_counter()
    res = semdedup(st, clusters=int(clusters), refit=True, memory_gb=float(memory_gb))
    out = {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu() - c0, "rss_before_mib": before,
           "peak_rss_mib": _peak_rss_mib(),
           "removable": res.removable, "timings": res.timings, "sample": res.sample,
           "iterations_run": res.fit.iterations_run if res.fit else None}
    print(json.dumps(out, default=str))


def step_engine(store: str, engine: str, memory_gb: str, clusters: str, workers: str) -> None:
    """Child process: a full `semdedup` run (refit, K = `clusters`, seed 0) on the local engine or the
    Ray engine (a local Ray of `workers` CPUs, started before the clock: `ray_start_s`); wall, CPU
    seconds of this process, stage timings, and a digest of the stored (id, cluster, max_sim)."""
    import hashlib
    from clipsql import engines
    from clipsql.queries.curation.dedup import semdedup
    from clipsql.store.store import Store
    from clipsql.store.tables import dedup_table_name
    st = Store.open(store)
    ray_start = 0.0
    if engine == "ray":
        import os
        import ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        t0 = time.perf_counter()
        ray.init(num_cpus=int(workers), include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 object_store_memory=256 << 20)          # what `--engine ray` starts by default
        ray_start = time.perf_counter() - t0
    c0, t0 = _cpu(), time.perf_counter()
    res = semdedup(st, clusters=int(clusters), seed=0, refit=True, memory_gb=float(memory_gb),
                   engine=engines.choose(engine))
    wall = time.perf_counter() - t0
    tbl = st.dataset(dedup_table_name(st.model(MODEL).table_name), latest=True).to_table().sort_by("id")
    h = hashlib.sha256()
    for c in ("id", "semdedup_cluster", "semdedup_max_sim"):
        h.update(str(tbl.column(c).to_pylist()).encode())
    print(json.dumps({"wall_s": wall, "driver_cpu_s": _cpu() - c0, "ray_start_s": ray_start, "timings": res.timings,
                      "pairs": res.pairs, "removable": res.removable, "digest": h.hexdigest()}))


def engines_bench(args: argparse.Namespace, store: Path) -> None:
    """Local vs Ray engine on the same store, `--rounds` interleaved rounds (best kept); the load of the
    machine before and after (`os.getloadavg`), since Ray's workers share its cores."""
    import os
    k = max(1, round(math.sqrt(args.rows)))
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    load = [os.getloadavg()]
    for _ in range(args.rounds):
        for eng in ("local", "ray"):
            runs[eng].append(child("engine", str(store), eng, str(args.memory_gb), str(k), str(args.workers)))
            print(f"{eng}: {runs[eng][-1]['wall_s']:.1f}s {runs[eng][-1]['timings']}", flush=True)
    load.append(os.getloadavg())
    best = {e: min(r, key=lambda x: x["wall_s"]) for e, r in runs.items()}
    same = len({r["digest"] for rs in runs.values() for r in rs}) == 1
    lo, ra = best["local"], best["ray"]
    out = {"rows": args.rows, "dim": args.dim, "clusters": k, "workers": args.workers, "cores": os.cpu_count(),
           "load_before": load[0], "load_after": load[1], "identical_results": same,
           "local": lo, "ray": ra,
           "ratio_total": lo["wall_s"] / ra["wall_s"],
           "ratio_assign": lo["timings"]["assign_s"] / ra["timings"]["assign_s"],
           "ratio_within": lo["timings"]["pairs_s"] / ra["timings"]["pairs_s"]}
    print(f"\n{args.rows} rows × d = {args.dim}, K = {k}; Ray: a local Ray of {args.workers} CPUs "
          f"(started in {ra['ray_start_s']:.1f}s, not counted); {os.cpu_count()} cores, load "
          f"{load[0][0]:.2f} before, {load[1][0]:.2f} after; stored results identical: {same}")
    for stage, key in (("assign", "assign_s"), ("within clusters", "pairs_s"), ("fit (driver)", "fit_s"),
                       ("pass 1 (driver)", "load_s")):
        print(f"  {stage:16s} local {lo['timings'][key]:7.1f}s  ray {ra['timings'][key]:7.1f}s  "
              f"local ÷ ray {lo['timings'][key] / ra['timings'][key]:.2f}")
    print(f"  {'total':16s} local {lo['wall_s']:7.1f}s  ray {ra['wall_s']:7.1f}s  local ÷ ray {out['ratio_total']:.2f}")
    if args.json:
        write_json(args.json, out)


def _read_all(ds, columns: list[str], limit: int | None = None):
    """(n × d float32 matrix, ids or None) filled batch by batch (one copy of the vectors in memory)."""
    import pyarrow as pa
    from clipsql.kernels.arrays import to_numpy
    n = min(ds.count_rows(), limit or 1 << 62)
    X, ids, a = None, [], 0
    for b in ds.to_batches(columns=columns, batch_size=16384):
        V = to_numpy(b.column("image_embedding"))[:n - a]
        if X is None:
            X = np.empty((n, V.shape[1]), dtype=np.float32)
        X[a:a + len(V)] = V
        if "id" in columns:
            ids.append(pa.concat_arrays([b.column("id").slice(0, len(V))]))
        a += len(V)
        if a >= n:
            break
    return X, (pa.chunked_array(ids).combine_chunks() if ids else None)


def step_faiss(store: str, clusters: str, sample: str, iterations: str) -> None:
    """Child process: the faiss reference of SemDeDup on the same table — all vectors read into RAM
    (one Lance scan), normalized in place (float32), spherical `faiss.Kmeans` (random init, same K,
    sample size and iteration cap) on a seeded sample, `IndexFlatIP` assignment, then per cluster
    (cos to the centroid ascending, ties by id) float32 Gram blocks of ≤ 4096 rows against the
    earlier members, the strict lower triangle's row maxima."""
    import faiss
    from _common import vm_rss_kib
    from clipsql.kernels.arrays import to_numpy
    from clipsql.store.store import Store
    import pyarrow.compute as pc
    st = Store.open(store)
    rec = st.model(MODEL)
    before = (vm_rss_kib() or 0) / 1024
    c0, t0 = _cpu(), time.perf_counter()
    X, ids = _read_all(st.embeddings_table(rec), ["id", "image_embedding"])
    rank = np.empty(len(X), dtype=np.int64)
    rank[pc.sort_indices(ids).to_numpy()] = np.arange(len(X))
    nrm = np.linalg.norm(X, axis=1)
    X /= nrm[:, None]
    k, m = int(clusters), int(sample)
    S = np.sort(np.random.default_rng(0).choice(len(X), m, replace=False))
    km = faiss.Kmeans(X.shape[1], k, niter=int(iterations), seed=0, spherical=True,
                      max_points_per_centroid=10 ** 9, verbose=False)
    km.train(X[S])
    index = faiss.IndexFlatIP(X.shape[1])
    index.add(km.centroids)
    D, I = index.search(X, 1)
    D, I = D[:, 0], I[:, 0]
    o = np.lexsort((rank, D, I))
    starts = np.flatnonzero(np.r_[True, I[o][1:] != I[o][:-1]])
    max_sim = np.zeros(len(X), dtype=np.float32)
    B = 4096
    for s, e in zip(starts, np.r_[starts[1:], len(o)]):
        mem = o[s:e]
        U = X[mem]
        best = np.zeros(len(mem), dtype=np.float32)
        for a in range(0, len(mem), B):
            b = min(a + B, len(mem))
            G = U[a:b] @ U[:b].T
            G[np.arange(b - a)[:, None] + a <= np.arange(b)[None, :]] = -np.inf
            best[a:b] = G.max(axis=1) if a or b > 1 else 0.0
        best[0] = 0.0
        max_sim[mem] = best
    out = {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu() - c0, "rss_before_mib": before,
           "peak_rss_mib": _peak_rss_mib(),
           "removable": {str(e): int((max_sim > 1 - e).sum()) for e in (0.001, 0.01, 0.05)},
           "threads": faiss.omp_get_max_threads()}
    print(json.dumps(out, default=str))


def step_kmeans(store: str, rows: str, clusters: str, iterations: str, which: str) -> None:
    """Child process: L2 Lloyd k-means of the first `rows` normalized image vectors, clipsql's
    `kernels.kmeans.lloyd` or `faiss.Kmeans` (same K, iterations, init: K distinct rows at random,
    no subsampling); the objective Σ min ‖x − c‖² in float64, computed the same way for both."""
    from clipsql.kernels import kmeans
    from clipsql.kernels.arrays import to_numpy
    from clipsql.store.store import Store
    st = Store.open(store)
    rec = st.model(MODEL)
    X, _ = _read_all(st.embeddings_table(rec), ["image_embedding"], int(rows))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    k, it = int(clusters), int(iterations)
    if which == "faiss":
        import faiss
    c0, t0 = _cpu(), time.perf_counter()
    if which == "faiss":
        km = faiss.Kmeans(X.shape[1], k, niter=it, seed=0, max_points_per_centroid=10 ** 9, verbose=False)
        km.train(X)
        C = km.centroids
    else:
        C = kmeans.lloyd(X, k, iterations=it, seed=0)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    lab = kmeans.assign(X, C)
    obj = 0.0
    for a in range(0, len(X), 65536):
        Z = X[a:a + 65536].astype(np.float64)
        Cd = C.astype(np.float64)
        sq = (Z * Z).sum(1)[:, None] - 2 * Z @ Cd.T + (Cd * Cd).sum(1)[None, :]
        obj += float(sq.min(axis=1).sum())
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "objective": obj, "clusters_used": int(len(np.unique(lab))),
                      "peak_rss_mib": _peak_rss_mib()}))


def child(*argv: str) -> dict:
    p = subprocess.run([sys.executable, __file__, "--step", *argv], capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"step failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def gemm_rate(m: int, k: int, n: int, repeats: int = 3) -> float:
    """Best float32 GEMM flop/s of (m×k)·(k×n) (numpy, every core)."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((m, k), dtype=np.float32)
    B = rng.standard_normal((k, n), dtype=np.float32)
    A @ B
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        A @ B
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best


def hierarchical(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Rows under a three-level hierarchy (64 topics → 64 sub-topics each → rows): sub-topics at
    angle ≈ 19° from their topic, rows at ≈ 7° from their sub-topic — tight clusters of clusters."""
    rng = np.random.default_rng(seed)
    top = rng.standard_normal((64, d))
    top /= np.linalg.norm(top, axis=1, keepdims=True)
    mid = top[np.repeat(np.arange(64), 64)] + 0.35 * rng.standard_normal((64 * 64, d)) / math.sqrt(d)
    mid /= np.linalg.norm(mid, axis=1, keepdims=True)
    X = mid[rng.integers(len(mid), size=n)] + 0.12 * rng.standard_normal((n, d)) / math.sqrt(d)
    return (X * rng.uniform(5, 15, (n, 1))).astype(np.float32)


def assign_bench(rows: int, dim: int, ks: list[int], json_path: str | None, data: str = "synthetic") -> None:
    """Flat against two-level assignment (kernels.semdedup_assign) on the synthetic rows, in memory:
    per K the dot products a row (work counters), the seconds, and whether the labels agree.
    Centroids: a 2-step spherical k-means (two-level steps) on a seeded sample of min(rows, 8·K)."""
    from clipsql.kernels import semdedup as K
    from clipsql.kernels import semdedup_assign as A
    X = np.concatenate([x for x, _ in generate(rows, dim)]) if data == "synthetic" else hierarchical(rows, dim)
    inv, valid = K.inverse_norms(X)
    out, table_rows = [], []
    for k in ks:
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(len(X), min(len(X), 8 * k), replace=False))
        t0 = time.perf_counter()
        C32, _ = A.fit_units(K.unit32(X, inv, sample), k, rng, 2, threshold=0)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        lab_flat, _ = K.assign(X, inv, valid, C32)
        flat_s = time.perf_counter() - t0
        work = A.Work()
        t0 = time.perf_counter()
        a = A.Assigner(C32, threshold=0, work=work)
        cells_s = time.perf_counter() - t0
        lab_two, _ = a.assign(X, inv, valid)
        two_s = time.perf_counter() - t0
        fig = {"k": k, "k1": len(a.cells.centres32), "rows": int(valid.sum()), "flat_dots_per_row": float(k),
               "flat_s": flat_s, "two_level_dots_per_row": work.per_row(),
               "coarse_per_row": work.coarse / work.rows, "fine_per_row": work.fine / work.rows,
               "cells_opened_per_row": work.cells_opened / work.rows, "flat_fallback_rows": work.flat_rows,
               "two_level_s": two_s, "cells_build_s": cells_s, "fit_s": fit_s,
               "labels_equal": bool(np.array_equal(lab_flat, lab_two))}
        out.append(fig)
        table_rows.append([k, fig["k1"], k, round(flat_s, 2), round(fig["two_level_dots_per_row"], 1),
                           round(fig["cells_opened_per_row"], 2), work.flat_rows, round(two_s, 2),
                           round(k / fig["two_level_dots_per_row"], 1), fig["labels_equal"]])
        print(key_values(fig), flush=True)
    print(table(table_rows, ["K", "K1", "flat dots/row", "flat s", "2-level dots/row", "cells/row",
                             "fallback rows", "2-level s", "dots ratio", "same labels"]))
    write_json(json_path, {"machine": machine(), "rows": rows, "dim": dim, "data": data, "assign": out})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--memory-gb", type=float, default=2.0)
    ap.add_argument("--json")
    ap.add_argument("--tmp")
    ap.add_argument("--step", nargs="+")
    ap.add_argument("--peers", action="store_true",
                    help="only the comparison with faiss: SemDeDup against the faiss reference and k-means "
                         "against faiss.Kmeans, interleaved rounds in fresh processes (needs faiss-cpu)")
    ap.add_argument("--clusters", type=int, default=450)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kmeans-rows", type=int, default=100_000)
    ap.add_argument("--assign", type=int, nargs="+", metavar="K",
                    help="only flat against two-level assignment at these K, in memory (--rows rows)")
    ap.add_argument("--engines", action="store_true",
                    help="only a full run on the local engine against the Ray engine (a local Ray of --workers "
                         "CPUs), interleaved --rounds, same store; checks the stored results are identical")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--assign-data", choices=("synthetic", "hierarchical"), default="synthetic",
                    help="--assign's rows: the store bench's synthetic ones, or a three-level hierarchy")
    args = ap.parse_args()
    if args.assign:
        assign_bench(args.rows, args.dim, args.assign, args.json, args.assign_data)
        return
    if args.step:
        steps = {"dedup": step_dedup, "clipsql": step_clipsql, "faiss": step_faiss, "kmeans": step_kmeans,
                 "engine": step_engine}
        steps[args.step[0]](*args.step[1:])
        return
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="clipsql-bench-dedup-"))
    store = tmp / "store"
    if args.peers or args.engines:
        try:
            if not store.exists():                       # --tmp DIR with a store/ from an earlier run: reused
                build(store, generate(args.rows, args.dim))
            (engines_bench if args.engines else peers)(args, store)
        finally:
            if not args.tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        return
    try:
        t0 = time.perf_counter()
        planted = build(store, generate(args.rows, args.dim))
        build_s = time.perf_counter() - t0
        mem = str(args.memory_gb)
        full = child("dedup", str(store), mem)
        print(f"full run: {full['seconds']:.1f}s, timings {full['timings']}, peak RSS "
              f"{full['peak_rss_mib']:.0f} MiB, removable {full['removable']} of {full['rows']}, "
              f"K={full['clusters']}, {full['groups']} groups, largest cluster {full['largest_cluster']}",
              flush=True)
        build(store, generate(args.rows // 100, args.dim, seed=1), start=args.rows, init=False)
        incr = child("dedup", str(store), mem)
        store_gib = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 2 ** 30
        report(args, full, incr, planted, build_s, store_gib)
    finally:
        if not args.tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(store, ignore_errors=True)


def peers(args: argparse.Namespace, store: Path) -> None:
    """Interleaved rounds: clipsql dedup vs the faiss reference, then clipsql k-means vs faiss.Kmeans."""
    k, mem = args.clusters, str(args.memory_gb)
    runs: dict[str, list[dict]] = {"clipsql": [], "faiss": [], "lloyd": [], "faiss.Kmeans": []}
    for r in range(args.rounds):
        runs["clipsql"].append(child("clipsql", str(store), mem, str(k)))
        sample = runs["clipsql"][-1]["sample"]
        runs["faiss"].append(child("faiss", str(store), str(k), str(sample), "20"))
        print(f"round {r}: clipsql {runs['clipsql'][-1]}\n         faiss {runs['faiss'][-1]}", flush=True)
    for r in range(args.rounds):
        for name, which in (("lloyd", "clipsql"), ("faiss.Kmeans", "faiss")):
            runs[name].append(child("kmeans", str(store), str(args.kmeans_rows), str(k), "20", which))
        print(f"round {r}: lloyd {runs['lloyd'][-1]}\n         faiss.Kmeans {runs['faiss.Kmeans'][-1]}", flush=True)

    def med(xs: list[float]) -> float:
        return float(np.median(xs))

    fig: dict = {"rows": args.rows, "dim": args.dim, "clusters": k, "memory_gb": args.memory_gb,
                 "rounds": args.rounds, "kmeans_rows": args.kmeans_rows}
    for a, b, key in (("clipsql", "faiss", "semdedup"), ("lloyd", "faiss.Kmeans", "kmeans")):
        fig[f"{key}_wall_ratio"] = round(med([y["wall_s"] / x["wall_s"] for x, y in zip(runs[a], runs[b])]), 3)
        fig[f"{key}_cpu_ratio"] = round(med([y["cpu_s"] / x["cpu_s"] for x, y in zip(runs[a], runs[b])]), 3)
        fig[f"{key}_clipsql_cpu_s"] = round(med([x["cpu_s"] for x in runs[a]]), 2)
        fig[f"{key}_peer_cpu_s"] = round(med([y["cpu_s"] for y in runs[b]]), 2)
        fig[f"{key}_clipsql_peak_mib"] = round(max(x["peak_rss_mib"] for x in runs[a]))
        fig[f"{key}_peer_peak_mib"] = round(max(y["peak_rss_mib"] for y in runs[b]))
        fig[f"{key}_memory_ratio"] = round(fig[f"{key}_clipsql_peak_mib"] / fig[f"{key}_peer_peak_mib"], 3)
    fig["semdedup_memory_ratio_above_start"] = round(
        max(x["peak_rss_mib"] - x["rss_before_mib"] for x in runs["clipsql"])
        / max(y["peak_rss_mib"] - y["rss_before_mib"] for y in runs["faiss"]), 3)
    fig["kmeans_objective_ratio"] = round(med([x["objective"] / y["objective"]
                                               for x, y in zip(runs["lloyd"], runs["faiss.Kmeans"])]), 5)
    fig["removable_clipsql"] = runs["clipsql"][-1]["removable"]
    fig["removable_faiss"] = runs["faiss"][-1]["removable"]
    fig["clipsql_stage_s"] = runs["clipsql"][-1]["timings"]
    print(key_values(fig))
    write_json(args.json, {"figures": fig, "runs": runs, "machine": machine()})


def report(args: argparse.Namespace, full: dict, incr: dict, planted: dict, build_s: float, store_gib: float
           ) -> None:
    n, d, k = full["rows"], args.dim, full["clusters"]
    N, it = full["sample"], full["fit"]["iterations_run"]
    t = full["timings"]
    flops = {"fit": 2.0 * N * k * d * (it + 1),            # Lloyd assignments + the k-means++ passes
             "assign": 2.0 * n * k * d,
             "pairs": 2.0 * full["pairs"] * d}              # Σ n_c(n_c − 1)/2 cosines
    rates = {"fit": gemm_rate(8192, d, k), "assign": gemm_rate(8192, d, k), "pairs": gemm_rate(2048, d, 2048)}
    rows = []
    figures: dict = {"rows": n, "dim": d, "clusters": k, "sample": N, "iterations_run": it,
                     "largest_cluster": full["largest_cluster"], "groups": full["groups"],
                     "big_clusters": full["big_clusters"], "group_rows": full["group_rows"]}
    rows.append(["pass 1: scan ids + norms", t["load_s"], 0.0, 0.0, 0.0, 0.0])
    rows.append(["sample read (take)", t["sample_read_s"], 0.0, 0.0, 0.0, 0.0])
    for stage, key in (("sample k-means", "fit"), ("pass 2: assign (scan)", "assign"),
                       ("within-cluster pass (take per group)", "pairs")):
        s = t[key + "_s"] - (t["sample_read_s"] if key == "fit" else 0.0)
        bare = flops[key] / rates[key]
        rows.append([stage, s, flops[key] / 1e9, rates[key] / 1e9, bare, bare / s])
        figures[f"{key}_s"] = round(s, 2)
        figures[f"{key}_gemm_ratio"] = round(bare / s, 3)
    rows.append(["write (one Lance commit)", t["write_s"], 0.0, 0.0, 0.0, 0.0])
    figures["load_s"] = round(t["load_s"], 2)
    figures["sample_read_s"] = round(t["sample_read_s"], 2)
    figures["write_s"] = round(t["write_s"], 2)
    total_bare = sum(flops[k_] / rates[k_] for k_ in flops)
    budget = full["memory_budget_mib"]
    per_row = n * 90 / 2 ** 20                             # ids, ranks, inv, labels, cos, max_sim, … (O(n))
    figures.update({"total_s": full["seconds"], "total_gemm_ratio": round(total_bare / full["seconds"], 3),
                    "memory_budget_mib": budget, "per_row_arrays_mib_est": round(per_row),
                    "peak_rss_mib": round(full["peak_rss_mib"]), "rss_before_mib": round(full["rss_before_mib"]),
                    "peak_rss_per_budget": round(full["peak_rss_mib"] / budget, 2),
                    "peak_rss_per_matrix": round(full["peak_rss_mib"] * 2 ** 20 / (n * d * 4), 2),
                    "store_gib": round(store_gib, 1)})
    for e, c in full["removable"].items():
        figures[f"removed_share_eps_{e}"] = round(c / n, 4)
    figures["planted_copy_share"] = planted["copies"] / n
    figures["planted_near_share"] = planted["near"] / n
    figures.update({"incremental_new_rows": incr["new_rows"], "incremental_clusters": incr["recomputed"],
                    "incremental_s": incr["seconds"], "incremental_peak_rss_mib": round(incr["peak_rss_mib"]),
                    "build_store_s": round(build_s, 1)})
    print(table(rows, ["stage", "seconds", "GFLOP", "GEMM GFLOP/s", "bare GEMM s", "bare ÷ stage"]))
    print(f"removed share at ε: {full['removable']} of {n} (planted: {planted})")
    print(f"peak RSS {full['peak_rss_mib']:.0f} MiB = {figures['peak_rss_per_budget']}× the {budget:.0f} MiB budget "
          f"(process before the run {full['rss_before_mib']:.0f} MiB, per-row arrays ≈ {per_row:.0f} MiB; "
          f"the float32 matrix would be {n * d * 4 / 2 ** 20:.0f} MiB)")
    print(f"incremental re-run (+{incr['new_rows']} rows): {incr['seconds']:.1f}s, {incr['recomputed']} clusters "
          f"recomputed, peak RSS {incr['peak_rss_mib']:.0f} MiB, timings {incr['timings']}")
    print(key_values(figures))
    write_json(args.json, {"figures": figures, "full": full, "incremental": incr, "machine": machine()})


if __name__ == "__main__":
    main()
