"""`clipsql score --engine ray` and `clipsql stats refresh --engine ray`: one task per fragment.

Scores: each task reads one fragment of the model table (the committed version the job
started from), computes the score columns through the same SQL score functions the local
`clipsql score` uses (`queries.sql.materialize.score_relation`, with the fit the driver read
once and broadcast through the object store), and writes them as a data file of the model's
stored-scores table; the driver commits them in one Lance operation stamped (schema metadata)
with the fit and the columns. A re-run with the same fit and columns scores only the rows the
score table lacks (each task looks its fragment's ids up in it: an Append); another fit or
other columns rescore everything (an Overwrite). The score table is not the model table, so a
job never conflicts with an ingest appending meanwhile; rows committed after its snapshot are
reported as pending.

Statistics: `store.stats.refresh_stats` itself, with each fragment's partial (`fold_fragment`)
folded by a task; the store merges them in fragment order and saves them under the writer lock.
"""
from __future__ import annotations

import json
import pickle
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from clipsql.engines.engine import ray_session
from clipsql.errors import QueryError
from clipsql.lazy import lance, lance_fragment
from clipsql.queries.sql.db import connect
from clipsql.queries.sql.materialize import ScoreReport, check_columns, score_relation
from clipsql.queries.sql.specs import SCORE_COLUMNS
from clipsql.store.fit_rows import latest_fit
from clipsql.store.fits import load_fit
from clipsql.store.records import ModelRecord
from clipsql.store.stats import StatsState, fold_fragment, refresh_stats
from clipsql.store.store import Store
from clipsql.store.tables import stored_table_name
from clipsql.store.reads import for_duckdb

SCORED_KEY = "clipsql.scored"


def score_lock(st: Store):  # noqa: ANN201 - a context manager
    """One score job per store at a time (its own lock: an ingest may append meanwhile)."""
    return st.lock("score")


def _score_fragment(store_path: str, rec: ModelRecord, version: int, fragment_id: int, columns: list[str],
                    scored_version: int | None, fit_id: int | None, out_uri: str, schema: pa.Schema,
                    fit: Any = None) -> dict:
    """Worker: score the fragment's rows the score table (at `scored_version`) lacks; write them as
    a data file of the score table."""
    t0 = time.perf_counter()
    st = Store.open(store_path, read_only=True)
    frag = st.embeddings_table(rec, version).get_fragment(fragment_id)
    tbl = frag.to_table(columns=["id", "image_embedding", "text_embedding"])
    if scored_version is not None and tbl.num_rows:      # only rows not scored yet (an index lookup)
        done = lance.dataset(out_uri, version=scored_version).to_table(
            columns=["id"], filter=pc.field("id").isin(tbl.column("id"))).column("id")
        if len(done):
            tbl = tbl.filter(pc.invert(pc.is_in(tbl.column("id"), value_set=done.combine_chunks())))
    if tbl.num_rows == 0:
        return {"fragments": [], "rows": 0, "seconds": time.perf_counter() - t0}
    con = connect(st, fits={rec.model_id: fit} if fit is not None else None)
    try:
        con.register("_fragment", for_duckdb(tbl))
        scored = score_relation(con, rec, "_fragment", columns)
    finally:
        con.close()
    n = scored.num_rows
    if out_uri is None:         # `select --engine ray`: the values go back to the driver
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, scored.schema) as w:
            w.write_table(scored)
        return {"table": sink.getvalue().to_pybytes(), "rows": n, "seconds": time.perf_counter() - t0}
    scored = scored.append_column("fit_id", pa.array([fit_id] * n, pa.int64()))
    scored = scored.append_column("computed_at", pa.array([int(time.time() * 1e6)] * n, pa.timestamp("us", tz="UTC")))
    frags = lance_fragment.write_fragments(scored.cast(schema), out_uri, schema=schema, max_rows_per_file=1 << 30)
    return {"fragments": [json.dumps(f.to_json()) for f in frags], "rows": n, "seconds": time.perf_counter() - t0}


def score_ray(st: Store, columns: list[str], model: str | None = None, *,
              address: str | None = None) -> ScoreReport:
    if not columns:
        raise QueryError(f"name the scores to store: `columns` image_info_gain,… (from: {', '.join(SCORE_COLUMNS)})",
                         param="columns")
    unknown = [c for c in columns if c not in SCORE_COLUMNS]
    if unknown:
        raise QueryError(f"unknown score column(s) {', '.join(unknown)}; choose from: {', '.join(SCORE_COLUMNS)}")
    rec = st.model(model)
    check_columns(rec, columns)
    fit = latest_fit(st, rec, with_arrays=False)
    fit_id = fit.fit_id if fit else None
    t0 = time.perf_counter()
    with score_lock(st):
        ds = st.embeddings_table(rec)                 # the committed snapshot this job scores
        version = ds.version
        name = stored_table_name(rec.table_name)
        uri = st.table_uri(name)
        schema = pa.schema([("id", pa.string())] + [(c, pa.float64()) for c in columns] +
                           [("fit_id", pa.int64()), ("computed_at", pa.timestamp("us", tz="UTC"))])
        prev = _scored_meta(st, name)
        # the own-pair rule of the Information Gain (docs/science.md §1) is part of what was scored: a
        # table written under another rule (or before rows left their own pair out) is rescored
        own_pair = (fit.options.get("own_pair", "exclude") if fit else None)
        append = prev is not None and prev["fit_id"] == fit_id and prev["columns"] == list(columns) \
            and prev.get("own_pair") == own_pair
        scored_version = lance.dataset(uri).version if append else None
        schema = schema.with_metadata({SCORED_KEY: json.dumps({"fit_id": fit_id, "columns": list(columns),
                                                               "version": version, "own_pair": own_pair})})
        broadcast = None
        if fit is not None:
            broadcast = load_fit(st, rec)        # (scores.Fit, row): read once, shared by every task
        with ray_session(address) as ray:
            task = ray.remote(max_retries=3)(_score_fragment)
            fit_ref = ray.put(broadcast)
            refs = [task.remote(str(st.path), rec, version, f.fragment_id, list(columns), scored_version, fit_id, uri,
                                schema, fit_ref)
                    for f in ds.get_fragments()]
            outs = ray.get(refs)
        frags = [lance_fragment.FragmentMetadata.from_json(b) for o in outs for b in o["fragments"]]
        rows = sum(o["rows"] for o in outs)
        if append:
            if frags:
                _commit(uri, lance.LanceOperation.Append(frags), scored_version)
            _set_scored_meta(uri, schema.metadata)
        else:
            _commit(uri, lance.LanceOperation.Overwrite(schema, frags), None)
        out_ds = lance.dataset(uri)
        if out_ds.count_rows() >= 10_000:      # the next re-run's "already scored?" lookups use it
            out_ds.create_scalar_index("id", "BTREE", replace=True)
        pending = st.embeddings_table(rec).count_rows() - ds.count_rows()
    return ScoreReport(model=rec.model_id, rows=rows, columns=list(columns), fit_id=fit_id,
                       seconds=round(time.perf_counter() - t0, 3), mode="append" if append else "overwrite",
                       tasks=len(outs), pending=max(0, pending))


def score_columns_ray(st: Store, rec: ModelRecord, columns: list[str], *, address: str | None = None,
                      fit: Any = None) -> pa.Table:
    """id + `columns` for every row of the model's committed table, one Ray task per fragment,
    through the SQL score functions with the broadcast fit (what `select --engine ray` ranks):
    the default fit, or `fit` = (scores.Fit, row) (a recipe's own fit)."""
    ds = st.embeddings_table(rec)
    broadcast = fit if fit is not None else (
        load_fit(st, rec) if latest_fit(st, rec, with_arrays=False) is not None else None)
    with ray_session(address) as ray:
        task = ray.remote(max_retries=3)(_score_fragment)
        fit_ref = ray.put(broadcast)
        outs = ray.get([task.remote(str(st.path), rec, ds.version, f.fragment_id, list(columns), None, None, None,
                                    None, fit_ref) for f in ds.get_fragments()])
    tables = [pa.ipc.open_stream(o["table"]).read_all() for o in outs if o.get("table")]
    if not tables:
        return pa.table({"id": pa.array([], pa.string()), **{c: pa.array([], pa.float64()) for c in columns}})
    return pa.concat_tables(tables)


def _commit(uri: str, op: Any, read_version: int | None) -> None:
    lance.LanceDataset.commit(uri, op, read_version=read_version)


def _scored_meta(st: Store, name: str) -> dict | None:
    if name not in st.table_names():
        return None
    meta = (st.dataset(name, latest=True).schema.metadata or {}).get(SCORED_KEY.encode())
    return json.loads(meta) if meta else None


def _set_scored_meta(uri: str, metadata: dict) -> None:
    ds = lance.dataset(uri)
    ds.replace_schema_metadata({k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                                for k, v in metadata.items()})


# --------------------------------------------------------------------------- statistics
def _fold_fragment(store_path: str, rec: ModelRecord, version: int, fragment_id: int, shifts: dict) -> bytes:
    """Worker: the statistics partial of one fragment (store.stats.fold_fragment), pickled."""
    return pickle.dumps(fold_fragment(Store.open(store_path, read_only=True), rec, version, fragment_id, shifts),
                        protocol=5)


def refresh_stats_ray(st: Store, model: ModelRecord, *, address: str | None = None) -> StatsState:
    """Recompute a model's running statistics from every stored vector (store.stats.refresh_stats), each
    fragment's partial folded by a Ray task."""
    with st.lock(), ray_session(address) as ray:
        task = ray.remote(max_retries=3)(_fold_fragment)

        def fold_fragments(version: int, fragment_ids: list, shifts: dict) -> list:
            blobs = ray.get([task.remote(str(st.path), model, version, i, shifts) for i in fragment_ids])
            return [pickle.loads(b) for b in blobs]
        return refresh_stats(st, model, fold_fragments=fold_fragments)
