"""`clipsql index`: a Lance vector index (cosine) on a model table's vector column, with its recall.

    build_index(st, model=None, modality="image", kind="ivf_hnsw_sq", seed=0)

* partitions = round(√n), capped at n // 256 (Lance trains each IVF centroid on 256 sampled
  rows); a table with fewer than `MIN_PARTITIONS` × 256 valid vectors is refused: exact
  search is fast at that size.
* The index is a new Lance version of the model table that changes no row; the writer lock is
  held, and the catalog's `table_versions` moves to it in one transaction (a `commits` row of
  kind `index`), so readers see it from their next connection.
* Recall@10 against exact search is measured for queries of BOTH modalities: `sample` seeded
  stored image vectors and `sample` stored text vectors searched against the indexed column
  (on an image index: image → image and text → image, the common search; text queries sit
  away from the image clusters and need far more probes). nprobes doubles until the worse of
  the two reaches `target_recall` (or every partition is probed), then the refine factor
  (ivf_pq) or ef (ivf_hnsw_sq) doubles up to `MAX_WIDEN` times. `recall` is the worse one,
  `recall_by_query` holds each ({"image": …, "text": …}; a modality without valid stored vectors
  is left out, and `nearest` says so when searched). The figures are recorded as the JSON setting
  `index:<table>:<column>` and used at search time (store.vector_index reads them).
* The exact answers come from the process's vector cache (store.vector_cache), which the build
  leaves on disk for the exact searches that follow.
* The IVF centroids are a seeded k-means (`seed`) on a seeded sample, so the same build with the same
  seed gives the same ivf_hnsw_sq index; ivf_pq's quantizer is trained by Lance, unseeded.
* Rows ingested after the build are not in the index; Lance searches them flat and merges
  them in (`clipsql optimize` folds them into the index: store.maintenance refreshes vector indexes).
"""
from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from clipsql.errors import QueryError
from clipsql.kernels import topk as kernels
from clipsql.kernels.arrays import vectors
from clipsql.kernels.kmeans import lloyd
from clipsql.queries.sql.engine import LOCAL, Engine
from clipsql.store import catalog as cat
from clipsql.store import vector_cache as vcache
from clipsql.store.ledger import recover, set_committed_version
from clipsql.store.store import Store
from clipsql.store.vector_index import MODALITIES, column_for, index_search, scan_chunks, setting_key

KINDS = ("ivf_hnsw_sq", "ivf_pq")
DEFAULT_KIND = "ivf_hnsw_sq"         # measured (bench/search.py): see bench/README.md
MIN_PARTITIONS = 4
TRAIN_ROWS_PER_PARTITION = 256
MAX_TRAIN_ROWS = 65_536              # the seeded k-means of the IVF centroids trains on at most this many rows
MAX_WIDEN = 3                        # refine factor / ef doublings after every partition is probed


def partitions_for(n: int) -> int:
    return int(min(round(np.sqrt(n)), n // TRAIN_ROWS_PER_PARTITION))


def _sub_vectors(d: int) -> int:
    """PQ sub-vectors: the largest divisor of d that is at most d/8 (8-wide sub-vectors at d = 512)."""
    target = max(1, d // 8)
    return max(m for m in range(1, target + 1) if d % m == 0)


def build_index(st: Store, model: str | None = None, modality: str = "image", kind: str = DEFAULT_KIND, *,
                seed: int = 0, sample: int = 100, target_recall: float = 0.95, k: int = 10,
                echo: Any = None, engine: Engine = LOCAL) -> dict:
    """Build (or replace) the vector index; returns its recorded figures (see the module doc).
    `engine`: where the index is built (the Ray engine: one segment per group of fragments on its
    workers, from the same seeded centroids)."""
    if kind not in KINDS:
        raise QueryError(f"`kind` must be one of {', '.join(KINDS)}; got {kind!r}", param="kind")
    column = column_for(modality)
    rec = st.model(model)
    with st.lock():
        recover(st)
        ds = st.dataset(rec.table_name, latest=True)
        n = ds.count_rows(filter=f"{column} IS NOT NULL")
        parts = partitions_for(n)
        if parts < MIN_PARTITIONS:
            raise QueryError(f"model {rec.model_id} holds {n} {modality} embeddings: too few for a "
                             f"vector index (it needs at least {MIN_PARTITIONS * TRAIN_ROWS_PER_PARTITION}, "
                             f"{TRAIN_ROWS_PER_PARTITION} training rows for each of ≥ {MIN_PARTITIONS} "
                             "partitions); exact search is fast at this size — `clipsql search` needs no index")
        info = create_vector_index(ds, column, kind, rec.dim, parts, seed=seed, engine=engine)
        ds = st.dataset(rec.table_name, latest=True)
        info.update(rows=int(n), version=int(ds.version), seed=seed, k=k)
        info.update(measure_recall(ds, column, info, seed=seed, sample=sample, k=k, target_recall=target_recall))
        with st.engine.begin() as conn:
            res = conn.execute(cat.commits.insert().values(
                model_id=None, run_id=None, kind="index", rows=0, sample_rows=0,
                versions=cat.to_json({rec.table_name: int(ds.version)}), created_at=time.time()))
            set_committed_version(conn, rec.table_name, int(ds.version), int(res.inserted_primary_key[0]))
        st.set_setting(setting_key(rec, column), json.dumps(info, sort_keys=True))
    info["model"] = rec.model_id
    info["table"] = rec.table_name
    if echo:
        echo(describe(info))
    return info


def ivf_centroids(ds: Any, column: str, partitions: int, seed: int) -> np.ndarray:
    """(partitions, d) unit centroids of a seeded spherical k-means on a seeded sample of the valid
    vectors (at most `TRAIN_ROWS_PER_PARTITION` per partition and `MAX_TRAIN_ROWS` in all). Lance
    trains its own IVF centroids from an unseeded sample, so the same build gave a different index
    (and recall) each run; given these, an ivf_hnsw_sq build is the same for the same seed."""
    n = ds.count_rows()
    want = min(n, partitions * TRAIN_ROWS_PER_PARTITION, MAX_TRAIN_ROWS)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n, size=min(n, want + want // 4 + 32), replace=False))
    X = vectors(ds.take(pick.tolist(), columns=[column]).column(column)).astype(np.float64)
    X, ok = kernels.unit_queries(X)
    X = X[ok][:want]
    if len(X) < partitions:
        raise QueryError(f"only {len(X)} valid {column} vectors to train {partitions} index partitions on")
    C = lloyd(X.astype(np.float32), partitions, seed=seed).astype(np.float64)
    norms = np.linalg.norm(C, axis=1, keepdims=True)
    return (C / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def create_vector_index(ds: Any, column: str, kind: str, dim: int, partitions: int, *, seed: int = 0,
                        engine: Engine = LOCAL) -> dict:
    """Build the Lance index on `ds` (a new version) from seeded IVF centroids; returns its parameters
    and build seconds. ivf_hnsw_sq is then the same index for the same seed; ivf_pq's product
    quantizer is still trained by Lance from its own unseeded sample (its recall varies a little)."""
    opts: dict[str, Any] = {"index_type": kind.upper(), "metric": "cosine", "num_partitions": int(partitions),
                            "replace": True, "ivf_centroids": ivf_centroids(ds, column, int(partitions), seed)}
    if kind == "ivf_pq":
        opts["num_sub_vectors"] = _sub_vectors(dim)
    t0 = time.perf_counter()
    engine.build_vector_index(ds, column, opts)
    info: dict[str, Any] = {"kind": kind, "metric": "cosine", "column": column, "partitions": int(partitions),
                            "build_seconds": round(time.perf_counter() - t0, 3), "engine": engine.name}
    if kind == "ivf_pq":
        info.update(num_sub_vectors=opts["num_sub_vectors"], refine_factor=10)
    else:
        info["ef"] = 64
    return info


def describe(info: dict) -> str:
    by = info.get("recall_by_query") or {}
    col = info["column"].split("_")[0]
    each = ", ".join(f"{q}→{col} {r:.3f}" for q, r in sorted(by.items())) or f"{info['recall']:.3f}"
    widen = "".join(f", {name} {info[name]}" for name in ("refine_factor", "ef") if info.get(name))
    return (f"index {info['kind']} (cosine) on {info['column']} of {info.get('model', info.get('table'))}: "
            f"{info['rows']} rows, {info['partitions']} partitions, built in {info['build_seconds']:.2f}s; "
            f"nprobes {info['nprobes']}{widen}: recall@{info['k']} {each} against exact search on "
            f"{info['queries']} sampled stored vectors of each modality (seed {info['seed']})")


def sample_queries(ds: Any, column: str, sample: int, seed: int) -> np.ndarray:
    """`sample` seeded stored vectors of `column` (valid ones only) as float64 queries."""
    rng = np.random.default_rng(seed)
    n = ds.count_rows()
    pick = np.sort(rng.choice(n, size=min(n, max(sample * 2, sample + 32)), replace=False))
    X = vectors(ds.take(pick.tolist(), columns=[column]).column(column)).astype(np.float64)
    X = X[kernels.unit_queries(X)[1]]
    return X[rng.permutation(len(X))[:sample]]


def exact_answers(ds: Any, column: str, Q: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    cached = vcache.vectors_for(ds, column)
    if cached is not None:
        return cached.search(Q, k)
    return kernels.exact_topk(Q, scan_chunks(ds, column), k)


def measure_recall(ds: Any, column: str, info: dict, *, seed: int, sample: int, k: int,
                   target_recall: float) -> dict:
    """recall@k of the index against exact search for image and text queries (module doc): nprobes
    doubled, then the refine factor / ef, until the worse modality reaches `target_recall`."""
    queries: dict[str, tuple[np.ndarray, list]] = {}
    for mod in MODALITIES:
        qcol = column_for(mod)
        if qcol not in ds.schema.names:
            continue
        Q = sample_queries(ds, qcol, sample, seed)
        if len(Q):
            queries[mod] = (Q, exact_answers(ds, column, Q, k))
    if not queries:
        raise QueryError(f"no valid stored vectors to measure the recall of the index on {column} with")
    parts = int(info["partitions"])
    widen = "refine_factor" if info.get("refine_factor") else "ef" if info.get("ef") else None
    trial = dict(info)
    nprobes, probes, widened = max(1, min(parts, max(2, parts // 64))), [], 0
    while True:
        by: dict[str, float] = {}
        t0 = time.perf_counter()
        for mod, (Q, exact) in queries.items():
            hits = 0
            for q, (want, _) in zip(Q, exact):
                got = index_search(ds, column, q, k, trial, nprobes=nprobes)
                hits += len(set(want.tolist()) & set(got[0].tolist())) if got else 0
            by[mod] = round(hits / float(sum(len(w) for w, _ in exact)), 4)
        n_q = sum(len(Q) for Q, _ in queries.values())
        probe = {"nprobes": nprobes, "recall": min(by.values()), "recall_by_query": by,
                 "ms_per_query": round(1000 * (time.perf_counter() - t0) / n_q, 3)}
        if widen:
            probe[widen] = trial[widen]
        probes.append(probe)
        if min(by.values()) >= target_recall:
            break
        if nprobes < parts:
            nprobes = min(parts, nprobes * 2)
        elif widen and widened < MAX_WIDEN:
            trial[widen], widened = int(trial[widen]) * 2, widened + 1
        else:
            break
    out = {"nprobes": nprobes, "recall": min(by.values()), "recall_by_query": by,
           "queries": min(len(Q) for Q, _ in queries.values()), "target_recall": target_recall, "probes": probes}
    if widen:
        out[widen] = trial[widen]
    return out
