"""Growth laws of what a DataComp-scale run does per row, measured at ≥ 3 sizes in one run.

    .venv/bin/python bench/growth.py [--sizes 1000000,2000000,4000000,8000000] [--batch 10000]
        [--fragments 250,1000,4000] [--units 100,300,1000] [--rows-per-unit 1000,8000,60000]
        [--only dedup,commit,plan,payload]

For each mechanism whose cost could grow faster than the data, it measures the total cost of a
run at each size, fits the growth exponent (least squares on log cost vs log rows; 1.0 = linear)
and extrapolates the per-run cost to DataComp medium (128M), large (1.28B) and xlarge (12.8B).

Measured so far:
* in-run id de-duplication (`clipsql.ingest.dedup`: string ids → 64-bit fingerprints → the
  fingerprint set, look-up then insert per batch of `--batch` rows, as an ingest does): seconds,
  and counted work (slots probed + keys moved), and bytes held per row.
* a commit's cost against the fragments already in the table (`--fragments`): a table is filled
  with that many fragments, then small commits go through the `Writer` as an ingest's do, with no
  bound (`max_fragments=None`: what every commit cost before the bound) and with the default bound
  (store.compaction; its one compaction is timed apart); and a reader's open + count(*).
* planning a re-run of a DataComp pool (`--units` shards, one unit each, all already ingested):
  from the ledger first (ingest.planning: one stat per file) against opening every shard to list
  its units and fingerprint them (what planning did before).
* the projection (`--only project`): precomputed DataComp ingests at `--ingest-rows` sizes give
  the CPU per row of reading, folding and writing (the work Ray workers share); the commit
  figures give a commit's cost per fragment in the table; a d = 512 compaction gives the rows/s
  a rewrite runs at, and a simulation of the fragment sizes (store.compaction's rule, and the
  size-tier rule it replaced) how many times a row is rewritten; a statistics merge is timed.
  Each law is extrapolated to DataComp medium / large / xlarge on `--workers` Ray workers, split
  into what spreads over the workers and what one process does serially.
* what a Ray ingest task receives (`--units` DataComp shards, one unit each): its own unit with a
  source describing only it plus the shared run context (engines.tasks), pickled bytes and the
  seconds to deserialise them, against the whole run context and unit list every task carried
  before; and the bytes the driver receives per unit (`--rows-per-unit`): the worker's result now
  (the ids and the statistics partial go to the shard actors, engines.shards) against the same
  result carrying the ids and the partial.

Measured (2 shared cores, d = 8 fragments of 4 rows; pool shards of 8 rows):
  fragments 500 / 2,000 / 8,000: a commit 35 / 67 / 178 ms unbounded (exponent 0.58 and rising:
  Lance rewrites a manifest listing every fragment), 24 / 9 / 32 ms under the bound of 256
  (exponent 0.10: noise; the one compaction down to 8 fragments 0.16 / 1.4 / 7.2 s);
  units 100 / 300 / 1,000: planning a re-run 98 / 117 / 88 µs a unit from the ledger (exponent
  0.95) against 0.96 / 2.0 / 1.6 ms a unit opening every shard (exponent 1.23).
  units 1,000 / 3,000 / 10,000 / 30,000 (2026-12-03, quiet, d = 512 pools): 14 / 14 / 14 / 17 µs a
  unit from the ledger (exponent 1.06; 1.22 before the cyclic collector was paused while planning)
  against 227 / 221 / 237 / 251 µs a unit opening every shard (exponent 1.03).
Measured (2 shared cores, d = 512, 32-character uids):
  units 100 / 300 / 1,000: a task receives 922 / 922 / 922 bytes and deserialises them in 17 / 18 / 11 µs
  (exponents 0.00 and -0.22 per task; 1.00 and 0.78 for the run's total), against 18,036 / 52,680 /
  174,498 bytes and 49 / 156 / 356 µs a task before (the run's total: exponent 1.85);
  rows a unit 1,000 / 8,000 / 60,000: the driver receives 1,257 / 1,259 / 1,263 bytes a unit
  (exponent 0.00) against 4.27 / 4.52 / 6.39 MB before (36 bytes an id + a 4.2 MB partial), and one
  4.2 MB partial per commit (the shards merge the commit's units).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from clipsql.engines.tasks import RunContext, precomputed_unit, shared_context, unit_payload, unit_task
from clipsql.ingest.dedup import fingerprints
from clipsql.ingest.pipeline import IngestOptions, ingest_pool
from clipsql.ingest.planning import plan_units
from clipsql.ingest.registry import open_source
from clipsql.kernels.idset import FingerprintSet
from clipsql.kernels.moments import RunningMoments
from clipsql.lazy import lance, lance_fragment
from clipsql.store.compaction import MAX_FRAGMENTS, MAX_TOTAL_FRAGMENTS, merge_target
from clipsql.store.ledger import PendingCommit, commit, committed_versions, done_units
from clipsql.store.location import rmtree
from clipsql.store.store import Store
from clipsql.store.tables import SAMPLES
from clipsql.store.writer import CommitPolicy, Writer

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


def _median(xs: list[float]) -> float:
    return float(np.median(np.asarray(xs)))


def commit_cost(fragments: int, commits: int = 7, d: int = 8, rows_per_fragment: int = 4) -> dict:
    """Seconds per small commit on a model table of `fragments` fragments, unbounded and bounded."""
    out: dict = {"fragments": fragments}
    for mode, bound in (("unbounded", None), ("bounded", MAX_FRAGMENTS)):
        st = Store.init(Path(tempfile.mkdtemp(prefix="clipsql-growth-")) / "s")
        rec = st.register_model(model_id=f"bench/d{d}", kind="clip", dim=d, logit_scale=100.0, logit_bias=None,
                                context_length=77, spec={})
        ds = st.dataset(rec.table_name)
        n = fragments * rows_per_fragment
        w = Writer(st, rec, run_id=None, source="bench", policy=CommitPolicy(max_fragments=bound))
        rng = np.random.default_rng(0)
        ids = pa.array([f"fill-{i}" for i in range(n)])
        vecs = rng.standard_normal((n, d)).astype(np.float32)
        tbl = pa.table({"id": ids, "uri": pa.nulls(n, pa.string()), "caption": pa.nulls(n, pa.string()),
                        "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), d),
                        "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), d),
                        "seq": pa.array(np.ones(n, np.int64))}).select(ds.schema.names).cast(ds.schema)
        frags = lance_fragment.write_fragments(tbl, st.table_uri(rec.table_name), schema=ds.schema,
                                               max_rows_per_file=rows_per_fragment,
                                               data_storage_version=ds.data_storage_version)
        commit(st, rec, PendingCommit(run_id=None, source="bench", seq=1, fragments=frags, rows=n))
        times = []
        for k in range(commits + 1):
            x = rng.standard_normal((10, d)).astype(np.float32)
            w.add(None, pa.array([f"new-{k}-{i}" for i in range(10)]), x, x)
            t0 = time.perf_counter()
            w.commit()
            times.append(time.perf_counter() - t0)
        w.close(commit=False)
        if bound is None:
            out["unbounded_s"] = _median(times[1:])
            t0 = time.perf_counter()
            st.dataset(rec.table_name).count_rows()
            out["open_count_s"] = time.perf_counter() - t0
        else:
            out["compaction_s"] = times[0]          # the first commit brings the table under the bound
            out["bounded_s"] = _median(times[1:])
            out["fragments_after"] = len(st.dataset(rec.table_name).get_fragments())
    return out


def write_pool(folder: Path, shards: int, rows: int = 8, d: int = 512) -> None:
    """A minimal DataComp pool (b32 features only): <stem>.parquet (uid, text) + <stem>.npz."""
    import pyarrow.parquet as pq
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for s in range(shards):
        uid = [f"{s:016x}{i:016x}" for i in range(rows)]
        pq.write_table(pa.table({"uid": uid, "text": [f"thing {s} {i}" for i in range(rows)]}),
                       folder / f"{s:08d}.parquet")
        x = rng.standard_normal((rows, d)).astype(np.float16)
        np.savez(folder / f"{s:08d}.npz", b32_img=x, b32_txt=x)


def planning_cost(units: int) -> dict:
    """Seconds to plan a re-run of a pool of `units` shards the store holds: ledger first vs opening."""
    root = Path(tempfile.mkdtemp(prefix="clipsql-growth-"))
    write_pool(root / "pool", units)
    st = Store.init(root / "s")
    (summary,) = ingest_pool(st, root / "pool", features="b32", options=IngestOptions(progress=False))
    rec = st.model(summary.model_id)
    reps = {"ledger_s": [], "opening_s": []}
    for _ in range(3):
        t0 = time.perf_counter()
        src = open_source(str(root / "pool"), datacomp_features="b32")
        plan = plan_units(st, rec, src)
        reps["ledger_s"].append(time.perf_counter() - t0)
        assert not plan.todo and plan.opened == 0, "a re-run must open nothing"
        t0 = time.perf_counter()
        src = open_source(str(root / "pool"), datacomp_features="b32")
        us = src.units()
        keys = [src.unit_key(u) for u in us]
        done = done_units(st, rec, keys)
        reps["opening_s"].append(time.perf_counter() - t0)
        assert len(done) == units
    return {"units": units, **{k: min(v) for k, v in reps.items()}}


def ingest_cost(rows: int, shard_rows: int = 10_000) -> dict:
    """A precomputed DataComp ingest of `rows` rows (shards of `shard_rows`, as DataComp ships them):
    wall and CPU seconds of the run (every thread), commits."""
    root = Path(tempfile.mkdtemp(prefix="clipsql-growth-"))
    write_pool(root / "pool", rows // shard_rows, rows=shard_rows)
    st = Store.init(root / "s")
    c0, t0 = time.process_time(), time.perf_counter()
    (summary,) = ingest_pool(st, root / "pool", features="b32", options=IngestOptions(progress=False))
    out = {"rows": rows, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
           "commits": summary.commits, "added": summary.added}
    rmtree(root)
    return out


def merge_cost(d: int = 512, reps: int = 20) -> float:
    """Seconds to merge one unit's statistics partial (raw + normalized moments, both modalities:
    four d × d float64 sums) into the run's: what the committing process does once per unit."""
    rng = np.random.default_rng(0)
    parts = []
    for _ in range(4):
        m = RunningMoments(d)
        m.update(rng.standard_normal((64, d)))
        parts.append(m)
    total = [RunningMoments(d) for _ in range(4)]
    t0 = time.perf_counter()
    for _ in range(reps):
        for a, b in zip(total, parts):
            a.merge(b)
    return (time.perf_counter() - t0) / reps


def compaction_rate(rows: int = 200_000, pieces: int = 40, d: int = 512) -> float:
    """Rows per second a compaction rewrites on a d-dimensional embeddings table (`pieces`
    fragments merged into one), as the writer's compaction does during a run."""
    root = Path(tempfile.mkdtemp(prefix="clipsql-growth-"))
    rng = np.random.default_rng(0)
    per = rows // pieces
    x = rng.standard_normal((per, d)).astype(np.float32)
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), d)
    uri = str(root / "t.lance")
    for i in range(pieces):
        tbl = pa.table({"id": pa.array(np.char.add(f"r{i}-", np.arange(per).astype(str))),
                        "image_embedding": col, "text_embedding": col})
        lance.write_dataset(tbl, uri, mode="append" if i else "create")
    ds = lance.dataset(uri)
    t0 = time.perf_counter()
    ds.optimize.compact_files(target_rows_per_fragment=rows)
    rate = rows / (time.perf_counter() - t0)
    rmtree(root)
    return rate


def tiered_target(rows: list[int], max_fragments: int, base: int) -> int | None:
    """The compaction rule before this one, for the comparison: one bound (`max_fragments`, 256)
    on all fragments and no bound on small ones, i.e. merge_target's size tiers from the start
    (rows climb one tier after another as the table grows)."""
    return merge_target(rows, len(rows) + 1, base, max_total=max_fragments)


def _target_name(n: float) -> str:
    return next(k for k, v in TARGETS.items() if v == n)


def rewrites_per_row(n_rows: float, commit_rows: int, base: int, max_fragments: int = MAX_FRAGMENTS,
                     policy: Any = None, fragment_rows: int | None = None) -> float:
    """How many times the writer's compaction (store.compaction.merge_target, or `policy`) rewrites
    a row over a run of `n_rows` committed `commit_rows` at a time, each commit adding fragments
    of `fragment_rows` (default: one fragment a commit, as the local writer writes; a Ray run adds
    one per unit): a simulation of the fragment sizes."""
    per = fragment_rows or commit_rows
    frags: list[int] = []
    rewritten = 0
    for _ in range(int(n_rows // commit_rows)):
        frags.extend([per] * max(1, commit_rows // per))
        target = (policy or merge_target)(frags, max_fragments, base)
        if target is None:
            continue
        small = sum(r for r in frags if r < target)
        rewritten += small
        frags = [r for r in frags if r >= target] + [target] * (small // target) + ([small % target] if small % target else [])
    return rewritten / n_rows


def project(ing: list[dict], dedup: list[dict] | None, commits: list[dict] | None, plans: list[dict] | None,
            workers: int, payloads: list[dict] | None = None, shard_rows: int = 10_000) -> list[list]:
    """Per-run hours at DataComp sizes on `workers` Ray workers: each mechanism's fitted law,
    split into the work that spreads over the workers, over the run's K shard actors
    (engines.shards: one per 8 workers, 2 … 32) and what one process does serially."""
    rows = []
    shards = min(32, max(2, workers // 8))

    def law(xs: list[float], ys: list[float]) -> tuple[float, float]:
        return fit_exponent(xs, ys)

    # a run's fixed costs (imports, opening the store, maintenance) are paid once per worker: the
    # projection uses the marginal CPU per row (the slope of an affine fit) and the growth
    # exponent of the part above the fixed cost (the intercept)
    n_ing, cpu = np.asarray([r["rows"] for r in ing], float), np.asarray([r["cpu_s"] for r in ing])
    per_row, fixed = np.polyfit(n_ing, cpu, 1)
    b, _ = law(list(n_ing), list(np.maximum(cpu - fixed, 1e-9)))
    rows.append([f"read, fold, write ({1 / per_row:,.0f} rows/CPU-s, spread over the workers)", b,
                 lambda n, c=per_row: c * n / workers])
    if dedup:
        # counted work has the exponent (seconds at these sizes are noisy); the largest run the scale
        b, _ = law([r["rows"] for r in dedup], [r["work"] for r in dedup])
        big = max(dedup, key=lambda r: r["rows"])
        per_row = (big["set_s"] + big["hash_s"]) / big["rows"]
        rows.append([f"id de-duplication (over {shards} shard actors)", b,
                     lambda n, p=per_row, b=b, m=big["rows"]: p * (n / shards) * (n / shards / m) ** (b - 1)])
    commit_rows = CommitPolicy().rows
    base = 1 << 16                       # a 256 MiB fragment of 512-d rows (store.compaction.base_rows)
    full_rows = max(base, shard_rows)    # rows of the full-size fragments a run leaves
    if commits:
        # a commit costs c0 + cf per fragment already in the table (affine fit of the unbounded
        # figures); the table gains commit_rows / full_rows full-size fragments a commit until the
        # bound on all fragments (store.compaction.MAX_TOTAL_FRAGMENTS) holds it there
        cf, c0 = np.polyfit([r["fragments"] for r in commits], [r["unbounded_s"] for r in commits], 1)
        c0, cf = max(float(c0), 0.0), max(float(cf), 0.0)
        b, _ = law([r["fragments"] for r in commits], [r["unbounded_s"] for r in commits])

        def commit_s(n: float, c0: float = c0, cf: float = cf) -> float:
            count, grow = n / commit_rows, commit_rows / full_rows
            knee = MAX_TOTAL_FRAGMENTS / grow         # the commit from which the table stays at the bound
            frag_s = cf * grow * min(count, knee) ** 2 / 2 + cf * MAX_TOTAL_FRAGMENTS * max(0.0, count - knee)
            return count * c0 + frag_s
        rows.append([f"commits ({commit_rows:,} rows each; {1e3 * c0:.0f} ms + {1e6 * cf:.0f} µs a fragment, "
                     f"≤ {MAX_TOTAL_FRAGMENTS:,} fragments; one process)", b, commit_s])
    rate = compaction_rate()
    # the Ray engine rewrites a compaction's tasks on the workers (engines.ingest.compact_on_workers);
    # before, one process rewrote every row once per size tier
    for label, policy, spread in (("compaction during the run", None, workers),
                                  ("(before: size tiers on all fragments)", tiered_target, 1)):
        factor = {k: rewrites_per_row(n, commit_rows, base, policy=policy, fragment_rows=shard_rows)
                  for k, n in TARGETS.items()}
        where = "spread over the workers" if spread > 1 else "one process"
        rows.append([f"{label} ({rate:,.0f} rows/s; rewrites/row " + "/".join(f"{f:.1f}" for f in factor.values())
                     + f", {where})", 1.0, lambda n, r=rate, f=factor, w=spread: f[_target_name(n)] * n / r / w])
    merge_s = merge_cost()
    rows.append([f"statistics partials merged (per unit over {shards} shards, per commit at the driver)", 1.0,
                 lambda n, m=merge_s: m * n / shard_rows / shards + m * n / CommitPolicy().rows])
    if payloads:
        b, _ = law([r["units"] for r in payloads], [r["task_s"] for r in payloads])
        per_task = float(np.median([r["task_s"] for r in payloads]))
        rows.append(["task payloads deserialised (spread over the workers)", b,
                     lambda n, t=per_task: t * n / shard_rows / workers])
    if plans:
        b, a = law([r["units"] for r in plans], [r["ledger_s"] for r in plans])
        rows.append(["planning a re-run from the ledger", b, lambda n, a=a, b=b: math.exp(a) * (n / shard_rows) ** b])
    table = []
    for name, b, f in rows:
        table.append([name, b, *[f(n) / 3600 for n in TARGETS.values()]])
    return table


def _ctx_for(st: Store, rec, src) -> RunContext:
    """A Ray ingest task's run context, as engines.ingest builds it (no shards: the bench runs the
    worker function in this process)."""
    st.ensure_samples_table()
    return RunContext(store_path=str(st.path), rec=rec, source=src, versions=committed_versions(st),
                      shifts={}, seq=1, storage_versions={n: st.dataset(n).data_storage_version
                                                          for n in (SAMPLES, rec.table_name)})


def payload_cost(units: int, reps: int = 3) -> dict:
    """What each Ray ingest task of a run of `units` DataComp shards receives and deserialises: its own
    unit (a source describing only it) plus the shared context, against the whole run context and
    unit list every task carried before."""
    root = Path(tempfile.mkdtemp(prefix="clipsql-growth-"))
    write_pool(root / "pool", units)
    st = Store.init(root / "s")
    rec = st.register_model(model_id="bench/payload", kind="clip", dim=512, logit_scale=100.0, logit_bias=None,
                            context_length=77, spec={})
    src = open_source(str(root / "pool"), datacomp_features="b32")
    todo = [(u, src.unit_key(u)) for u in src.units()]
    ctx = _ctx_for(st, rec, src)
    shared = pickle.dumps(shared_context(ctx), protocol=5)
    payloads = [unit_payload(src, unit, key) for unit, key in todo]
    whole = pickle.dumps((ctx, todo), protocol=5)           # before: every task got the context and the list
    best_now = best_whole = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        for blob in payloads:
            unit_task(pickle.loads(shared), blob)
        best_now = min(best_now, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(min(units, 100)):                    # a sample of tasks: each loads the same
            pickle.loads(whole)
        best_whole = min(best_whole, (time.perf_counter() - t0) / min(units, 100) * units)
    return {"units": units, "task_bytes": len(shared) + max(map(len, payloads)),
            "total_bytes": len(shared) * units + sum(map(len, payloads)), "task_s": best_now / units,
            "total_s": best_now, "whole_bytes": len(whole), "whole_task_s": best_whole / units,
            "whole_total_s": best_whole}


def driver_bytes(rows: int, d: int = 512) -> dict:
    """Bytes the driver receives for one unit of `rows` rows: the worker's result now (data files'
    metadata, counts: the ids and the statistics partial go to the shard actors), against the same
    result carrying the ids and the partial (before)."""
    root = Path(tempfile.mkdtemp(prefix="clipsql-growth-"))
    write_pool(root / "pool", 1, rows=rows, d=d)
    st = Store.init(root / "s")
    rec = st.register_model(model_id="bench/driver", kind="clip", dim=d, logit_scale=100.0, logit_bias=None,
                            context_length=77, spec={})
    src = open_source(str(root / "pool"), datacomp_features="b32")
    units = src.units()                                     # a shard's row groups
    assert len(units) == 1, units
    unit = units[0]
    before = precomputed_unit(_ctx_for(st, rec, src), unit, src.unit_key(unit))
    after = dataclasses.replace(before, ids=b"", moments=b"", sharded=True)   # what publish() leaves
    return {"rows": rows, "before": len(pickle.dumps(before, protocol=5)), "ids": len(before.ids),
            "moments": len(before.moments), "after": len(pickle.dumps(after, protocol=5))}


def _report(what: str, xs: list[int], runs: list[dict], cols: list[str], unit: str) -> None:
    for c in cols:
        b, a = fit_exponent(xs, [r[c] for r in runs])
        print(f"  {c}: growth exponent {b:.2f} in {unit} (0 = constant, 1 = linear)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000000,2000000,4000000,8000000")
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--fragments", default="250,1000,4000")
    ap.add_argument("--units", default="100,300,1000")
    ap.add_argument("--rows-per-unit", default="1000,8000,60000")
    ap.add_argument("--ingest-rows", default="100000,200000,400000",
                    help="sizes of the precomputed DataComp ingests the projection's per-row cost comes from")
    ap.add_argument("--workers", type=int, default=64, help="Ray workers the projection assumes")
    ap.add_argument("--only", default="dedup,commit,plan,payload,project")
    args = ap.parse_args()
    only = set(args.only.split(","))
    os.environ.setdefault("LANCE_LOG", "error")
    commits = plans = dedup = payloads = None
    if "commit" in only:
        xs = [int(s) for s in args.fragments.split(",")]
        commits = runs = [commit_cost(f) for f in xs]
        print(f"per commit, against the fragments in the table (bound {MAX_FRAGMENTS}):")
        print(f"{'fragments':>10} {'unbounded ms':>13} {'bounded ms':>11} {'compaction s':>13} "
              f"{'after':>6} {'open+count ms':>14}")
        for r in runs:
            print(f"{r['fragments']:>10,} {1e3 * r['unbounded_s']:>13.1f} {1e3 * r['bounded_s']:>11.1f} "
                  f"{r['compaction_s']:>13.2f} {r['fragments_after']:>6} {1e3 * r['open_count_s']:>14.1f}")
        _report("commit", xs, runs, ["unbounded_s", "bounded_s", "open_count_s"], "fragments")
    if "plan" in only:
        xs = [int(s) for s in args.units.split(",")]
        plans = runs = [planning_cost(u) for u in xs]
        print("planning a re-run whose units are all ingested (DataComp shards, one unit each):")
        print(f"{'units':>8} {'ledger ms':>10} {'µs/unit':>8} {'opening ms':>11} {'µs/unit':>8}")
        for r in runs:
            print(f"{r['units']:>8,} {1e3 * r['ledger_s']:>10.1f} {1e6 * r['ledger_s'] / r['units']:>8.0f} "
                  f"{1e3 * r['opening_s']:>11.1f} {1e6 * r['opening_s'] / r['units']:>8.0f}")
        _report("plan", xs, runs, ["ledger_s", "opening_s"], "units")
    if "payload" in only:
        xs = [int(s) for s in args.units.split(",")]
        payloads = runs = [payload_cost(u) for u in xs]
        print("what each Ray ingest task receives and deserialises (DataComp shards, one unit each):")
        print(f"{'units':>8} {'task B':>7} {'task µs':>8} {'run s':>7} {'before: task B':>15} {'task µs':>8} "
              f"{'run s':>7}")
        for r in runs:
            print(f"{r['units']:>8,} {r['task_bytes']:>7,} {1e6 * r['task_s']:>8.0f} {r['total_s']:>7.3f} "
                  f"{r['whole_bytes']:>15,} {1e6 * r['whole_task_s']:>8.0f} {r['whole_total_s']:>7.2f}")
        _report("payload", xs, runs, ["task_bytes", "task_s", "total_bytes", "total_s", "whole_bytes",
                                      "whole_total_s"], "units")
        sizes = [int(s) for s in args.rows_per_unit.split(",")]
        per = [driver_bytes(n) for n in sizes]
        print("bytes the driver receives per unit (d = 512):")
        print(f"{'rows/unit':>10} {'now':>7} {'before':>11} {'(ids':>10} {'partial)':>10}")
        for r in per:
            print(f"{r['rows']:>10,} {r['after']:>7,} {r['before']:>11,} {r['ids']:>10,} {r['moments']:>10,}")
        _report("driver", sizes, per, ["after", "before"], "rows per unit")
    if "dedup" in only:
        sizes = [int(s) for s in args.sizes.split(",")]
        dedup = runs = [dedup_run(n, args.batch) for n in sizes]
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
    if "project" in only:
        ing = [ingest_cost(int(n)) for n in args.ingest_rows.split(",")]
        print("precomputed DataComp ingest (b32 features, 10k-row shards), one process:")
        print(f"{'rows':>10} {'wall s':>8} {'CPU s':>8} {'rows/CPU-s':>11} {'commits':>8}")
        for r in ing:
            print(f"{r['rows']:>10,} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} {r['rows'] / r['cpu_s']:>11,.0f} "
                  f"{r['commits']:>8}")
        table = project(ing, dedup, commits, plans, args.workers, payloads)
        print(f"projected hours per run on {args.workers} Ray workers (each law fitted above, extrapolated):")
        print(f"{'what':<58} {'exponent':>8} " + " ".join(f"{k:>16}" for k in TARGETS))
        for name, b, *hours in table:
            print(f"{name:<58} {b:>8.2f} " + " ".join(f"{h:>16.3g}" for h in hours))
        totals = [sum(r[2 + i] for r in table if "re-run" not in r[0] and "before" not in r[0])
                  for i in range(len(TARGETS))]
        print(f"{'a first run, in all':<58} {'':>8} " + " ".join(f"{h:>16.3g}" for h in totals))


if __name__ == "__main__":
    main()
