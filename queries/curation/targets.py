"""`clipsql target add`: build a target set for NormSim (docs/science.md §6).

A target is a named set of image embeddings F_t of one model, from the `image_embedding`
column of a SQL query over the store or by encoding the images of a source. Its storage,
listing, removal and scoring are store.targets; building it is here:

* invalid rows (zero, NULL, non-finite) are dropped and counted; the rows are normalized
  (float64, stored as float32) and S = F_tᵀF_t is computed once;
* the rows go to a new Lance table of their own, marked for deletion until the one catalog
  transaction that switches the target to it (a kill leaves the old target whole);
* a target with more than `ANN_MIN_ROWS` rows (or `index="ann"`) also gets a LanceDB
  IVF_FLAT cosine index. Its recall@1 (share of sampled pool rows whose ANN score equals the
  exact one) is measured on a seeded sample of the model's stored images when the index is
  built, printed, and recorded in the target's options; nprobes is raised until the recall
  reaches `target_recall` or every partition is probed.
"""
from __future__ import annotations

import re
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import sqlalchemy as sa

from clipsql.errors import DimensionMismatch, QueryError, SourceError, TargetError
from clipsql.ingest.datacomp import FEATURES, DataCompSource, model_id
from clipsql.ingest.images import ItemRejected, check_vector, load_image
from clipsql.ingest.registry import open_source
from clipsql.ingest.sources import Reject
from clipsql.kernels import scores
from clipsql.kernels.arrays import matrix, to_numpy
from clipsql.lazy import duckdb, lancedb_index
from clipsql.models.prompts import encode_images, load_for_record
from clipsql.queries.sql.db import connect
from clipsql.queries.sql.functions import udf_error
from clipsql.store import catalog as cat
from clipsql.store.drops import mark_for_drop, sweep_dropped_tables, unmark_drop
from clipsql.store.faults import fault
from clipsql.store.ledger import recover
from clipsql.store.reads import count_rows
from clipsql.store.records import ModelRecord
from clipsql.store.store import Store
from clipsql.store.tables import target_table_name
from clipsql.store.targets import TARGET_CHUNK, ann_max_abs_cos, TargetSummary, get_target

ANN_MIN_ROWS = 200_000
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
INDEX_CHOICES = ("auto", "exact", "ann")


# --------------------------------------------------------------------------- adding
def add_target(st: Store, name: str, *, query: str | None = None, source: str | None = None,
               model: str | None = None, replace: bool = False, index: str = "auto", seed: int = 0,
               recall_sample: int = 1000, target_recall: float = 0.95, echo: Any = None,
               **source_options: Any) -> TargetSummary:
    """Create target `name` of `model` from the `image_embedding` column of `query` (SQL over the
    store), or by encoding the images of `source` (any ingest layout; captions are ignored;
    precomputed sources give their image embeddings). Invalid (zero, NULL, non-finite) rows are
    dropped and counted; a target with no valid row is an error."""
    if not NAME_RE.match(name or ""):
        raise TargetError(f"target name {name!r} must be 1-100 letters, digits, '_', '.', '-' "
                          "(starting with a letter or digit)")
    if (query is None) == (source is None):
        raise TargetError("give exactly one of `query` \"SQL returning image_embedding\" or a `source` "
                          "(with `model`)", param="query")
    if index not in INDEX_CHOICES:
        raise TargetError(f"`index` must be one of {', '.join(INDEX_CHOICES)}; got {index!r}", param="index")
    rec = st.model(model)
    if not replace:
        with st.engine.connect() as conn:
            if conn.execute(sa.select(cat.targets.c.name).where(cat.targets.c.name == name)).first():
                raise TargetError(f"target {name!r} already exists: pass `replace`, or "
                                  f"`clipsql target rm STORE {name}` first", param="replace")
    t0 = time.perf_counter()
    if query is not None:
        X, described, rejected = _from_query(st, rec, query), f"query: {query}", {}
    else:
        X, rejected = _from_source(rec, source, **source_options)
        described = f"source: {source}"
    Xh, valid = scores.normalize(X)
    rows = Xh[valid]
    if len(rows) == 0:
        raise TargetError(f"target {name!r} would be empty: the {'query' if query else 'source'} gave "
                          f"{len(X)} row(s) and none has a valid (non-zero, finite) image embedding")
    S = scores.second_moment(rows)
    use_ann = index == "ann" or (index == "auto" and len(rows) > ANN_MIN_ROWS)
    options: dict[str, Any] = {"dropped_rows": int((~valid).sum()), "rejected": rejected, "seed": seed}
    with st.lock():
        # The new rows go to a table of their own, marked for deletion until the one catalog
        # transaction that switches the target to it: a kill at any point leaves the old target
        # whole (and the half-made table is deleted by the next writer), never a mixed one.
        recover(st)
        tname = target_table_name(name, uuid.uuid4().hex[:8])
        with st.engine.begin() as conn:
            mark_for_drop(conn, tname, f"target {name} (being built)")
        vec = pa.FixedSizeListArray.from_arrays(pa.array(rows.astype(np.float32).reshape(-1)), rec.dim)
        data = pa.table({"row": pa.array(np.arange(len(rows), dtype=np.int64)), "vector": vec})
        st.db.create_table(tname, schema=data.schema).add(data)
        fault("target:after-table")
        if use_ann:
            options["index"] = _build_index(st, rec, tname, rows.astype(np.float32), seed=seed,
                                            sample=recall_sample, target_recall=target_recall)
            if echo:
                ix = options["index"]
                echo(f"target {name}: IVF_FLAT cosine index, {ix['num_partitions']} partitions, nprobes "
                     f"{ix['nprobes']}: recall@1 {ix['recall_at_1']:.4f} on {ix['sample']} sampled "
                     f"{ix['queries']} (mean |error| {ix['mean_abs_error']:.2e})")
        with st.engine.begin() as conn:
            old = conn.execute(sa.select(cat.targets.c.table_name).where(cat.targets.c.name == name)).scalar()
            conn.execute(sa.delete(cat.targets).where(cat.targets.c.name == name))
            conn.execute(cat.targets.insert().values(
                name=name, model_id=rec.model_id, dim=rec.dim, n=len(rows), table_name=tname,
                source=described[:2000], created_at=time.time(), options=cat.to_json(options),
                second_moment=cat.pack(S)))
            unmark_drop(conn, tname)
            if old is not None:
                mark_for_drop(conn, old, f"target {name} (replaced)")
        fault("target:after-switch")
        sweep_dropped_tables(st)
    return get_target(st, name).summary().with_seconds(round(time.perf_counter() - t0, 3))


def _from_query(st: Store, rec: ModelRecord, query: str) -> np.ndarray:
    con = connect(st)
    try:
        tbl = con.sql(query)
        if tbl is None or "image_embedding" not in tbl.columns:
            raise TargetError("the target `query` must return a column named image_embedding, e.g. "
                              "\"SELECT image_embedding FROM embeddings WHERE id IN (…)\"", param="query")
        arr = tbl.select("image_embedding").arrow()
        arr = arr.read_all() if hasattr(arr, "read_all") else arr
    except duckdb.Error as e:
        raise udf_error(e, con) or QueryError(f"target query failed: {e}") from None
    finally:
        con.close()
    col = arr.column("image_embedding").combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        col = col.cast(pa.list_(col.type.value_type))
    try:
        return matrix(col, rec.dim, "target image_embedding")
    except DimensionMismatch as e:   # the `embeddings` view holds every model's rows
        raise DimensionMismatch(f"{e} ({rec.model_id}): the query returned another model's embeddings (the "
                                f"embeddings view holds every model's rows); keep this model's with "
                                f"`AND model = '{rec.model_id}'` in its WHERE (or `WHERE model = …`), or set "
                                "`model` to the model that made them", param="query") from None


def _from_source(rec: ModelRecord, source: str, batch: int = 256, **opts: Any) -> tuple[np.ndarray, dict]:
    src = open_source(source, **opts)
    if isinstance(src, DataCompSource):        # two feature sets: the target's model picks one
        try:
            src.bind_model(rec.model_id)
        except SourceError:
            raise TargetError(f"{source} is a DataComp pool: its image features belong to "
                              f"{' and '.join(model_id(f) for f in FEATURES)}, not {rec.model_id}; add the target "
                              f"with `model` set to one of them (ingest the pool to store them)",
                              param="model") from None
    rejected: dict[str, int] = {}
    out: list[np.ndarray] = []
    pending: list[Any] = []
    loaded = None

    def flush() -> None:
        nonlocal loaded
        if pending:
            loaded = loaded or load_for_record(rec)
            out.append(encode_images(loaded, pending))
            pending.clear()

    for unit in src.units():
        for item in src.read(unit):
            try:
                if isinstance(item, Reject):
                    raise ItemRejected(item.reason, item.detail)
                if item.image_bytes is None:
                    out.append(check_vector(item.image_embedding, rec.dim)[None, :])
                    continue
                pending.append(load_image(item.image_bytes))
            except ItemRejected as e:
                rejected[e.reason] = rejected.get(e.reason, 0) + 1
            if len(pending) >= batch:
                flush()
    flush()
    X = np.concatenate(out).astype(np.float64) if out else np.empty((0, rec.dim))
    return X, rejected


def _build_index(st: Store, rec: ModelRecord, tname: str, rows: np.ndarray, *, seed: int, sample: int,
                 target_recall: float) -> dict:
    """IVF_FLAT cosine index on the target table; nprobes raised until recall@1 ≥ target_recall."""
    table = st.db.open_table(tname)
    parts = int(max(1, min(len(rows) // 32, round(np.sqrt(len(rows))))))
    t0 = time.perf_counter()
    table.create_index("vector", config=lancedb_index.IvfFlat(distance_type="cosine", num_partitions=parts), replace=True)
    build_s = time.perf_counter() - t0
    Q, what = _recall_queries(st, rec, rows, seed, sample)
    exact = np.zeros(len(Q))
    for T in (rows[s] for s in scores._spans(len(rows), TARGET_CHUNK)):
        exact = np.fmax(exact, scores.norm_sim_inf(Q, T))
    nprobes, probes = max(1, parts // 16), []
    while True:
        got = ann_max_abs_cos(table, Q, nprobes)
        recall = float(np.mean(np.abs(got - exact) <= 1e-6))
        probes.append({"nprobes": nprobes, "recall_at_1": recall})
        if recall >= target_recall or nprobes >= parts:
            break
        nprobes = min(parts, nprobes * 2)
    return {"kind": "IVF_FLAT", "metric": "cosine", "num_partitions": parts, "nprobes": nprobes,
            "recall_at_1": recall, "mean_abs_error": float(np.mean(np.abs(got - exact))), "sample": len(Q),
            "queries": what, "seed": seed, "target_recall": target_recall, "probes": probes,
            "build_seconds": round(build_s, 3)}


def _recall_queries(st: Store, rec: ModelRecord, rows: np.ndarray, seed: int, sample: int) -> tuple[np.ndarray, str]:
    """A seeded sample of the model's stored images (what the target will score), else target rows."""
    rng = np.random.default_rng(seed)
    n = count_rows(st, rec)
    if n:
        ds = st.embeddings_table(rec)
        pick = np.sort(rng.choice(n, size=min(sample, n), replace=False))
        X = to_numpy(ds.take(pick.tolist(), columns=["image_embedding"]).column("image_embedding"))
        X = X[scores.normalize(X)[1]]
        if len(X):
            return X.astype(np.float64), "pool images"
    pick = rng.choice(len(rows), size=min(sample, len(rows)), replace=False)
    return rows[pick].astype(np.float64), "target rows"
