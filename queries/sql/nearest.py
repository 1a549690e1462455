"""The SQL table macro `nearest(query_vector, k [, model [, modality]] [, filter := SQL] [, exact := true])`.

    SELECT * FROM nearest(text_embedding('a red circle'), 10)                      -- text → image
    SELECT * FROM nearest((SELECT image_embedding FROM embeddings WHERE id = 'x'), 10)  -- image → image
    SELECT * FROM nearest(text_embedding('a dog'), 10, filter := 'width >= 256')

Rows (id VARCHAR, score DOUBLE): the k stored rows of `model` (default: the store's default
model) whose `modality` ('image' default, or 'text') embedding has the highest cosine with the
query, best first, ties by id ascending. Rows with a NULL, zero or non-finite vector never
appear; a NULL query gives no rows.

DuckDB has no Python table functions, so `nearest` is a table macro over the scalar Arrow UDF
`_clipsql_nearest(q FLOAT[], k DOUBLE, model VARCHAR, modality VARCHAR, allowed VARCHAR[],
exact BOOLEAN)` (k as DOUBLE, so any number binds and a bad one is refused in one line; a k
past the rows there are returns them all) → STRUCT(id VARCHAR, score DOUBLE)[], unnested and ordered (`allowed`: the
filter's ids; NULL = no filter). Positional `nearest(q, 10, 'model', 'text')` works too.

* **filter** is a SQL boolean expression over the `samples` view's columns; it is applied
  *before* the top-k: the macro runs it through DuckDB's `query()` on the same connection
  (`SELECT DISTINCT id FROM samples WHERE (filter)`, the caller's own SQL) and passes the
  allowed ids to the UDF, whose exact search reads only those rows from Lance. The vector
  index cannot apply a filter over `samples`, so filtered searches are always exact.
* **index**: when the model table (at the committed version) has a vector index on the column
  (built by `clipsql index`, read through store.vector_index) and neither a filter nor `exact := true` is given, the search goes
  through it (nprobes recorded at build time) and re-scores the returned vectors in float64; it
  falls back to exact when the index returns fewer than k valid rows.
* **exact** is blocked BLAS (kernels.topk) over the table's vectors held by the process
  (store.vector_cache: memory-mapped, built on first use, keyed by the table's content): a
  float32 GEMM and argpartition per block keep candidates, and only those are re-scored in
  float64, equal to the float64 top-k. A filtered search uses that cache once it exists, else
  reads the allowed rows from Lance in chunks (as does a table too large to cache).
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from clipsql.errors import DimensionMismatch, QueryError
from clipsql.kernels import topk as kernels
from clipsql.kernels.arrays import matrix
from clipsql.lazy import duckdb
from clipsql.queries.sql.condition import ConditionError, check_condition
from clipsql.store import vector_cache as vcache
from clipsql.store import vector_index as vindex
from clipsql.store.ledger import committed_versions
from clipsql.store.records import ModelRecord
from clipsql.store.store import Store

RESULT_TYPE = pa.list_(pa.struct([("id", pa.string()), ("score", pa.float64())]))


def allowed_ids(con: Any, where: str) -> pa.Array:
    """Ids of the `samples` rows satisfying `where`, the user's own SQL boolean expression (DuckDB),
    checked to be one condition first (queries.sql.condition)."""
    try:
        where = check_condition(con, where, example="width >= 256")
    except ConditionError as e:
        raise ConditionError(f"the search filter {where!r} failed: {e}", param="where") from None
    try:
        tbl = con.sql(f"SELECT DISTINCT id FROM samples WHERE ({where})").to_arrow_table()
        tbl = tbl.read_all() if hasattr(tbl, "read_all") else tbl
    except duckdb.Error as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise QueryError(f"the search filter {where!r} failed: {first} (it is a SQL boolean expression over "
                         "the samples view's columns, e.g. \"width >= 256\")") from None
    return tbl.column("id").combine_chunks().cast(pa.string())


class Searcher:
    """Per-connection state: the snapshot's table versions and lazily opened Lance datasets."""

    def __init__(self, st: Store, versions: dict[str, int] | None = None,
                 model: Callable[[str | None], ModelRecord] | None = None):
        self.st = st
        self.versions = versions if versions is not None else committed_versions(st)
        self.model = model or st.model      # a connection's: its snapshot's models
        self._ds: dict[str, Any] = {}
        self._info: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self.last: dict[str, Any] = {}          # how the latest search ran (method, reason, rows)

    def dataset(self, rec: ModelRecord) -> Any:
        with self._lock:
            if rec.table_name not in self._ds:
                self._ds[rec.table_name] = self.st.embeddings_table(rec, self.versions.get(rec.table_name))
            return self._ds[rec.table_name]

    def info(self, rec: ModelRecord, column: str) -> dict | None:
        key = (rec.table_name, column)
        if key not in self._info:
            self._info[key] = vindex.index_info(self.st, rec, column, self.dataset(rec))
        return self._info[key]

    def search(self, Q: np.ndarray, k: int, model: str | None = None, modality: str = "image",
               allowed: pa.Array | None = None, exact: bool = False,
               query_modality: str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-k per query row of Q (b, d): [(ids, float64 cosines)], best first, ties by id.
        `allowed`: only rows with these ids (a filter's result, `allowed_ids`); None: every row.
        `query_modality`: what Q holds (image / text) when known, for the index's recall note."""
        k = positive_k(k)
        column = vindex.column_for(modality or "image")
        rec = self.model(model)
        Q = np.asarray(Q, dtype=np.float64)
        if Q.ndim != 2 or Q.shape[1] != rec.dim:
            raise DimensionMismatch(f"the query vector has {Q.shape[-1]} dimensions; model {rec.model_id} "
                                    f"stores {rec.dim}-d embeddings")
        if not kernels.unit_queries(Q)[1].all():
            raise QueryError("the query vector is zero or not finite: it has no direction to search by")
        ds = self.dataset(rec)
        info = None if exact or allowed is not None else self.info(rec, column)
        self.last = {"model": rec.model_id, "column": column, "method": "exact", "reason": None}
        # no search returns more rows than there are: k past that would only size buffers (the
        # vector index allocates k rows up front: -k 10^12 asked it for terabytes)
        rows = ds.count_rows() if allowed is None else len(allowed)
        if k > rows:
            self.last["note"] = f"-k {k} is more than the {rows} rows there are to search: all of them are returned"
            k = max(rows, 1)
        if allowed is not None:
            self.last.update(allowed=len(allowed))
            if self.info(rec, column) is not None and not exact:
                self.last["reason"] = ("the vector index cannot apply a filter over samples: exact search over "
                                       f"the {len(allowed)} allowed rows")
            cached = vcache.vectors_for(ds, column, build=False)
            if cached is not None:
                return cached.search(Q, k, allowed)
            top = kernels.RunningTopK(Q, k)
            if len(allowed):
                for X, ids in vindex.scan_chunks(ds, column, ids=allowed):
                    top.update(X, ids)
            return top.result()
        if info is not None:
            out = [vindex.index_search(ds, column, q, k, info) for q in Q]
            if all(r is not None for r in out):
                by = vindex.recall_by_query(info, column)
                self.last.update(method=f"index {info['kind']}", nprobes=info["nprobes"],
                                 recall=by.get(query_modality) if query_modality else info.get("recall"),
                                 recall_by_query=by)
                unmeasured = vindex.unmeasured_note(info, column, query_modality)
                if unmeasured:
                    self.last["note"] = "; ".join(filter(None, [self.last.get("note"), unmeasured]))
                if info.get("unindexed"):
                    self.last["note"] = "; ".join(filter(None, [self.last.get("note"), f"the vector index covers {rows - info['unindexed']} of {rows} rows; "
                                         f"the {info['unindexed']} added since its build were searched exactly "
                                         "(`clipsql optimize` folds them into the index)"]))
                return out   # type: ignore[return-value]
            self.last["reason"] = "the index returned fewer than k valid rows: exact search"
        cached = vcache.vectors_for(ds, column)
        if cached is not None:
            return cached.search(Q, k)
        top = kernels.RunningTopK(Q, k)
        for X, ids in vindex.scan_chunks(ds, column):
            top.update(X, ids)
        return top.result()


def positive_k(k: Any) -> int:
    """`k` as an int, or QueryError (one line) unless it is a whole number >= 1 (an int, or a float
    such as the DOUBLE the `nearest` macro passes)."""
    try:
        ok = k is not None and not isinstance(k, bool) and float(k) == int(k) and int(k) >= 1
    except (TypeError, ValueError, OverflowError):      # nan, inf, text
        ok = False
    if not ok:
        shown = int(k) if isinstance(k, float) and k.is_integer() else k
        raise QueryError(f"k must be a positive integer; got {shown}")
    return int(k)


def nearest_udf(searcher: Searcher) -> Any:
    """Arrow UDF (q, k, model, modality, allowed ids, exact) → LIST(STRUCT(id, score)). Rows without a
    filter are grouped by their constant arguments (a batch of queries is one chunked pass); a row
    with an allowed-id list is searched alone (its list is read as an Arrow array, never as objects)."""

    def udf(q: Any, k: Any, model: Any, modality: Any, allowed: Any, exact: Any) -> pa.Array:
        n = len(q)
        q, allowed = (c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in (q, allowed))
        cols = [(c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c).to_pylist()
                for c in (k, model, modality, exact)]
        qok = q.is_valid().to_numpy(zero_copy_only=False)
        fok = allowed.is_valid().to_numpy(zero_copy_only=False)
        out: list[Any] = [[] for _ in range(n)]
        groups: dict[tuple, list[int]] = {}
        for i in range(n):
            if qok[i]:
                groups.setdefault(tuple(c[i] for c in cols) + ((i,) if fok[i] else (None,)), []).append(i)
        for (kk, mname, mod, ex, row), idx in groups.items():
            rec = searcher.model(mname)
            Q = matrix(q.take(pa.array(idx)), rec.dim, f"the query vector (model {rec.model_id})")
            ids = None if row is None else allowed[row].values.cast(pa.string())
            res = searcher.search(Q, kk, mname, mod or "image", ids, bool(ex))
            for i, (rid, s) in zip(idx, res):
                out[i] = [{"id": a, "score": b} for a, b in zip(rid.tolist(), s.tolist())]
        return pa.array(out, type=RESULT_TYPE)
    return udf


def register_nearest(con: Any, ctx: Any) -> Searcher:
    """Register `_clipsql_nearest` and the table macro `nearest` on `con` (called by functions.register).
    The filter is the caller's own SQL expression, run by DuckDB's `query()` on this connection."""
    searcher = Searcher(ctx.st, ctx.snap.versions, ctx.model)
    con.create_function("_clipsql_nearest", ctx.guard(nearest_udf(searcher)),
                        ["FLOAT[]", "DOUBLE", "VARCHAR", "VARCHAR", "VARCHAR[]", "BOOLEAN"],
                        "STRUCT(id VARCHAR, score DOUBLE)[]", type="arrow", null_handling="special",
                        side_effects=True)
    allowed = ("CASE WHEN filter IS NOT NULL THEN (SELECT coalesce(list(id), []::VARCHAR[]) FROM query("
               "CASE WHEN filter IS NULL THEN 'SELECT NULL::VARCHAR AS id LIMIT 0' "
               "ELSE 'SELECT DISTINCT id FROM samples WHERE (' || filter || ')' END)) END")
    con.execute("CREATE OR REPLACE MACRO nearest(q, k, model := NULL, modality := 'image', filter := NULL, "
                "exact := false) AS TABLE SELECT r.id AS id, r.score AS score FROM (SELECT unnest("
                f"_clipsql_nearest(q::FLOAT[], k::DOUBLE, model, modality, {allowed}, exact)) AS r) "
                "ORDER BY score DESC, id")
    return searcher
