"""Similarity search at scale: exact chunked BLAS vs each Lance vector index kind.

    .venv/bin/python bench/search.py [--rows 1000000] [--dim 512] [--queries 100] [--json search.json]

A plain Lance table in the model-table layout (id, image_embedding FLOAT[d]) of `--rows`
synthetic clustered vectors (seeded: 1000 centres of scale 0.5, unit noise: overlapping) is written to a temporary
directory. Figures, all from this one run:

* exact: `nearest`'s exact path (Lance scan in 32k-row chunks → float32 GEMM → running top-k,
  float64 re-score), one query per pass (what an interactive search costs) and `--queries`
  queries in one pass (what a batch of queries costs);
* baseline: a bare numpy float32 GEMM + argpartition top-k (kernels.gemm_topk) over the same
  rows already in memory, same query batch; `exact_vs_numpy` = baseline s ÷ exact s (≤ 1: the
  Lance read, the NULL handling and the exact re-score are the difference);
* each index kind (ivf_hnsw_sq, ivf_pq; partitions √n): build seconds, the nprobes sweep
  (recall@10 against exact on the sampled stored vectors, as `clipsql index` measures it)
  and single-query queries/s at the chosen nprobes.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (offline environment)
import numpy as np
import pyarrow as pa

from _common import key_values, machine, table, write_json


def write_table(path: str, rows: int, dim: int, seed: int, batch: int = 65536) -> None:
    import lance
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, dim)).astype(np.float32) * 0.5   # overlapping clusters
    schema = pa.schema([("id", pa.string()), ("image_embedding", pa.list_(pa.float32(), dim))])

    def batches():
        for start in range(0, rows, batch):
            n = min(batch, rows - start)
            X = centres[rng.integers(0, len(centres), n)] + rng.normal(size=(n, dim)).astype(np.float32)
            ids = pa.array([f"s{i:08d}" for i in range(start, start + n)], pa.string())
            yield pa.record_batch([ids, pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), dim)],
                                  schema=schema)
    lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), path, schema=schema,
                        max_rows_per_file=1 << 20, enable_stable_row_ids=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--single", type=int, default=3, help="single-query exact passes timed")
    ap.add_argument("--kinds", default="ivf_hnsw_sq,ivf_pq")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import lance
    from clipsql.queries.search import index as vindex
    from clipsql.kernels import topk as kernels
    tmp = Path(a.tmp or tempfile.mkdtemp(prefix="clipsql-bench-search-"))
    uri = str(tmp / "emb.lance")
    col = "image_embedding"
    fig: dict = {"rows": a.rows, "dim": a.dim}
    try:
        t, _ = time.perf_counter(), write_table(uri, a.rows, a.dim, a.seed)
        fig["write_s"] = round(time.perf_counter() - t, 1)
        ds = lance.dataset(uri)
        Q = vindex.sample_queries(ds, col, a.queries, a.seed + 1)
        # exact, batched: one chunked pass for all queries
        t0 = time.perf_counter()
        exact = kernels.exact_topk(Q, vindex.scan_chunks(ds, col), 10)
        exact_batch_s = time.perf_counter() - t0
        # exact, one query per pass
        singles = []
        for q in Q[:a.single]:
            t0 = time.perf_counter()
            kernels.exact_topk(q[None, :], vindex.scan_chunks(ds, col), 10)
            singles.append(time.perf_counter() - t0)
        exact_single_s = min(singles)
        # bare numpy over the rows in memory (same batch; then one query)
        X = vindex.vectors(ds.to_table(columns=[col]).column(col))
        t0 = time.perf_counter()
        base = kernels.gemm_topk(Q, X, 10)
        numpy_batch_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        kernels.gemm_topk(Q[:1], X, 10)
        numpy_single_s = time.perf_counter() - t0
        ids = ds.to_table(columns=["id"]).column("id").to_numpy(zero_copy_only=False)
        base_recall = np.mean([len(set(ids[b].tolist()) & set(e.tolist())) / 10 for b, (e, _) in zip(base, exact)])
        del X
        fig.update(exact_batch_qps=a.queries / exact_batch_s, exact_single_qps=1 / exact_single_s,
                   numpy_batch_qps=a.queries / numpy_batch_s, numpy_single_qps=1 / numpy_single_s,
                   exact_vs_numpy_batch=numpy_batch_s / exact_batch_s,
                   exact_vs_numpy_single=numpy_single_s / exact_single_s, numpy_recall=float(base_recall))
        rows = [["exact (chunked BLAS), batch", "-", f"{a.queries / exact_batch_s:.1f}", "1.000", "-"],
                ["exact (chunked BLAS), 1 query", "-", f"{1 / exact_single_s:.2f}", "1.000", "-"],
                ["numpy GEMM top-k in RAM, batch", "-", f"{a.queries / numpy_batch_s:.1f}",
                 f"{base_recall:.3f}", "-"],
                ["numpy GEMM top-k in RAM, 1 query", "-", f"{1 / numpy_single_s:.2f}", "-", "-"]]
        parts = vindex.partitions_for(a.rows)
        for kind in [k for k in a.kinds.split(",") if k]:
            ds = lance.dataset(uri)
            info = vindex.create_vector_index(ds, col, kind, a.dim, parts)
            ds = lance.dataset(uri)
            info.update(vindex.measure_recall(ds, col, info, seed=a.seed + 1, sample=a.queries, k=10,
                                              target_recall=0.95))
            t0 = time.perf_counter()
            for q in Q:
                vindex.index_search(ds, col, q, 10, info)
            qps = len(Q) / (time.perf_counter() - t0)
            fig.update({f"{kind}_build_s": info["build_seconds"], f"{kind}_recall10": info["recall"],
                        f"{kind}_nprobes": info["nprobes"], f"{kind}_qps": qps,
                        f"{kind}_vs_exact_single": qps * exact_single_s})
            for p in info["probes"]:
                rows.append([f"{kind} nprobes={p['nprobes']}", f"{info['build_seconds']:.1f}",
                             f"{1000 / p['ms_per_query']:.1f}", f"{p['recall']:.3f}", parts])
        print(table(rows, ["method", "build s", "queries/s", "recall@10", "partitions"]))
        print(key_values({k: (round(v, 4) if isinstance(v, float) else v) for k, v in fig.items()}))
        write_json(a.json, {"figures": fig, "machine": machine()})
    finally:
        if not a.tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
