"""What the app keeps between requests: prepared connections per snapshot, and query results by column.

**Snapshots.** A request starts by reading the store's snapshot key (one short catalog read: the
committed table versions, fits, targets, models, and the versions of the derived tables that
`scores`/`semdedup` read) and takes a DuckDB connection prepared for exactly that key
(`queries.connect`: views, score functions, read-only settings), reusing an idle one when the key is
unchanged. A commit (an ingest, a tag) changes the key, so the next request sees it; a request in
flight keeps the snapshot it started on. Connections are never shared between requests at once
(DuckDB's registered Arrow/Lance objects are per connection).

**Results.** The grid's query over 10⁶ rows cannot run again for every scroll, brush and histogram:
its score columns are Python UDFs over the vectors. A `Result` holds the ids of the query's rows, in
its order, and materializes each column the first time a request needs it (`SELECT id, col FROM
(query)`: DuckDB computes only that column), aligned by id. Pages, filters, sorts and histograms then
run over these Arrow columns (a registered Arrow table in DuckDB for the conditions, numpy for the
histograms), and the row positions of the last few filters are kept, so scrolling is a slice.
Results are keyed by the query and the snapshot of what it reads (a tag commit does not invalidate
a query that does not read `tags`) and evicted least recently used beyond a memory budget
(CLIPSQL_SERVE_CACHE_MB, default 2048).
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from clipsql.errors import QueryError, env_number
from clipsql.lazy import duckdb
from clipsql.queries.sql.db import connect, quote_ident, samples_select_list
from clipsql.store import catalog as cat
from clipsql.store import tags as tagstore
from clipsql.store.store import Store
from clipsql.store.tables import samples_schema

DEFAULT_CACHE_MB = 2048
MAX_IDLE = 4
FILTERS_KEPT = 16


def _arrow(rel: Any) -> pa.Table:
    tbl = rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
    return tbl.read_all() if hasattr(tbl, "read_all") else tbl


def run(con: Any, sql: str, params: dict | None = None) -> pa.Table:
    """A query's result as an Arrow table; DuckDB's errors as one-line QueryErrors."""
    try:
        return _arrow(con.sql(sql, params=params or None))
    except duckdb.Error as e:
        raise QueryError((str(e).strip().splitlines() or [type(e).__name__])[0]) from None


# --------------------------------------------------------------------------- snapshots
class Snapshots:
    """Prepared connections over the store's last commit, reused while it is unchanged."""

    def __init__(self, st: Store, max_idle: int = MAX_IDLE):
        self.st = st
        self.max_idle = max_idle
        self._idle: list[tuple[tuple, Any]] = []
        self._lock = threading.Lock()

    def key(self) -> tuple:
        """What a reader sees, in one catalog read plus a listing of the derived tables' versions."""
        st = self.st
        with st.engine.connect() as conn:
            versions = tuple(sorted(conn.execute(sa.select(cat.table_versions.c.table_name,
                                                           cat.table_versions.c.version)).all()))
            fits = tuple(conn.execute(sa.select(sa.func.max(cat.fits.c.fit_id), sa.func.count())).one())
            stale = conn.execute(sa.select(sa.func.count()).select_from(cat.stale_fits)).scalar()
            targets = tuple(sorted(conn.execute(sa.select(cat.targets.c.name, cat.targets.c.table_name)).all()))
            models = tuple(r[0] for r in conn.execute(sa.select(cat.models.c.model_id)))
            default = conn.execute(sa.select(cat.settings.c.value).where(
                cat.settings.c.key == "default_model")).scalar()
        derived = []
        for name in st.table_names():
            if name.startswith(("scores_", "semdedup_")):
                try:
                    derived.append((name, os.stat(st.path / "lance" / f"{name}.lance" / "_versions").st_mtime_ns))
                except OSError:
                    derived.append((name, None))
        return versions, fits, stale, targets, models, default, tuple(derived)

    @staticmethod
    def without_tags(key: tuple) -> tuple:
        """The key with the tags table's version left out (for queries that do not read tags)."""
        return (tuple(v for v in key[0] if v[0] != "tags"),) + key[1:]

    @contextlib.contextmanager
    def connection(self) -> Iterator[tuple[Any, tuple]]:
        """(a prepared connection, its snapshot key) for one request."""
        key = self.key()
        con = retag = None
        with self._lock:
            for i, (k, c) in enumerate(self._idle):
                if k == key:
                    con = self._idle.pop(i)[1]
                    break
            if con is None:       # only the tags moved (a tag commit): keep the connection, move its `tags`
                for i, (k, c) in enumerate(self._idle):
                    if self.without_tags(k) == self.without_tags(key):
                        con, retag = self._idle.pop(i)[1], dict(key[0]).get(tagstore.TABLE)
                        break
            stale = [c for k, c in self._idle if self.without_tags(k) != self.without_tags(key)]
            self._idle = [(k, c) for k, c in self._idle if self.without_tags(k) == self.without_tags(key)]
        for c in stale:
            c.close()
        if retag is not None:
            con.register("_lance_tags", self.st.dataset(tagstore.TABLE, retag))
        if con is None:
            con = connect(self.st, progress_bar=False)    # the models of `text_embedding` load per connection
        ok = False
        try:
            yield con, key
            ok = True
        finally:
            keep = False
            if ok:
                with self._lock:
                    if len(self._idle) < self.max_idle:
                        self._idle.append((key, con))
                        keep = True
            if not keep:
                con.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for _, c in idle:
            c.close()


# --------------------------------------------------------------------------- results
class Result:
    """One query's rows at one snapshot: ids in the query's order, columns materialized on demand."""

    def __init__(self, con: Any, sql: str, params: dict, key: tuple, table: pa.Table | None = None):
        """`table`: the query's whole result, already computed (a search); else its ids are read now."""
        self.sql, self.params, self.key = sql, dict(params), key
        rel = _describe(con, sql, params)
        self.schema: dict[str, str] = dict(rel)
        if "id" not in self.schema:
            raise QueryError(f"the grid's SQL must return an `id` column (it returns "
                             f"{', '.join(self.schema) or 'nothing'}); e.g. SELECT id, clip_score FROM scores")
        if table is not None:
            ids = table.column("id").combine_chunks().cast(pa.string())
        else:
            ids = run(con, f"SELECT id::VARCHAR AS id FROM (\n{sql}\n) AS q", params).column("id").combine_chunks()
        if ids.null_count:
            raise QueryError(f"the grid's SQL returned {ids.null_count} rows with a NULL id: every row needs one")
        if pc.count_distinct(ids).as_py() != len(ids):
            raise QueryError("the grid's SQL returns some id more than once: each tile is one sample (for the "
                             "scores view of a store with several models, add WHERE model = '…')")
        self.ids = ids
        self.n = len(ids)
        self.positions = pa.array(np.arange(self.n, dtype=np.int64))
        self.columns: dict[str, pa.Array] = {}
        self._col_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.filters: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.hist_edges: dict[str, tuple[float, float]] = {}
        self.last_used = time.monotonic()
        self.seconds: dict[str, float] = {}
        if table is not None:
            self.columns = {n: table.column(n).combine_chunks() for n in table.column_names if n != "id"}

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + sum(c.nbytes for c in self.columns.values()) + \
            sum(p.nbytes for p in self.filters.values())

    def column(self, con: Any, name: str) -> pa.Array:
        """Column `name` of every row, in the rows' order (computed once: `SELECT id, name FROM (query)`)."""
        if name == "id":
            return self.ids
        if name not in self.schema:
            raise QueryError(f"{name!r} is not a column of the grid's rows")
        with self._lock:
            lock = self._col_locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self.columns:
                t0 = time.perf_counter()
                tbl = run(con, f"SELECT id::VARCHAR AS id, {quote_ident(name)} AS v FROM (\n{self.sql}\n) AS q",
                          self.params)
                ids, values = tbl.column("id").combine_chunks(), tbl.column("v").combine_chunks()
                if len(ids) != self.n:
                    raise QueryError(f"the grid's SQL returned {len(ids)} rows computing {name}, {self.n} before: "
                                     "is it deterministic? (ORDER BY … LIMIT with ties, random())")
                if not ids.equals(self.ids):
                    idx = pc.index_in(self.ids, value_set=ids)
                    if idx.null_count:
                        raise QueryError(f"the grid's SQL returned other rows computing {name}: is it "
                                         "deterministic?")
                    values = values.take(idx)
                self.columns[name] = values
                self.seconds[name] = round(time.perf_counter() - t0, 3)
            return self.columns[name]

    def table(self, con: Any, names: set[str] | list[str]) -> pa.Table:
        """`_pos`, id and the named columns as one Arrow table (zero copy)."""
        cols = {"_pos": self.positions, "id": self.ids}
        for n in sorted(set(names) - {"id"}):
            cols[n] = self.column(con, n)
        return pa.table(cols)

    def select(self, con: Any, view: Any, *, skip_brush: str | None = None, ordered: bool = True,
               filter_key: tuple = ()) -> np.ndarray:
        """Positions of the rows the view's conditions keep (all but `skip_brush`'s brush), in the view's
        order (`ordered=False`: in any order, for counts); kept for reuse."""
        conds = [c for c in view.conds if skip_brush is None or c.brush != skip_brush]
        order_sql = view.order if ordered else None
        if not conds and order_sql is None:
            return np.arange(self.n, dtype=np.int64)
        params: dict = {}
        where = " AND ".join(c.render(params) for c in conds)
        order = order_sql.render(params) if order_sql is not None else "_pos"
        sql = f"SELECT _pos FROM _app_rows AS q{' WHERE ' + where if where else ''}"
        if order_sql is not None:
            sql += f" ORDER BY {order}"
        key = (sql, tuple(sorted((k, repr(v)) for k, v in params.items())), filter_key)
        with self._lock:
            hit = self.filters.get(key)
            if hit is not None:
                self.filters.move_to_end(key)
                return hit
        tbl = self.table(con, view.columns)
        con.register("_app_rows", tbl)
        try:
            pos = run(con, sql, params).column("_pos").to_numpy()
        finally:
            con.unregister("_app_rows")
        with self._lock:
            self.filters[key] = pos
            while len(self.filters) > FILTERS_KEPT:
                self.filters.popitem(last=False)
        return pos

    def histogram(self, con: Any, name: str, positions: np.ndarray, bins: int) -> dict:
        """Counts of column `name` in `bins` equal bins over its range: all rows and the given rows."""
        values = self.column(con, name)
        x = _floats(values)
        finite = np.isfinite(x)
        if name not in self.hist_edges:
            self.hist_edges[name] = (float(x[finite].min()), float(x[finite].max())) if finite.any() else (0.0, 0.0)
        lo, hi = self.hist_edges[name]
        if hi <= lo:
            hi = lo + 1.0
        all_counts = np.histogram(x[finite], bins=bins, range=(lo, hi))[0]
        sel = x[positions]
        sel_counts = np.histogram(sel[np.isfinite(sel)], bins=bins, range=(lo, hi))[0]
        return {"column": name, "lo": lo, "hi": hi, "bins": bins, "all": all_counts.tolist(),
                "selected": sel_counts.tolist(), "nulls": int((~finite).sum()), "rows": self.n,
                "selected_rows": int(len(positions))}

    def percentile(self, con: Any, name: str, value: float) -> float | None:
        """Share (in %) of the rows whose `name` is below `value` (ties count half)."""
        x = _floats(self.column(con, name))
        x = x[np.isfinite(x)]
        if not len(x) or value is None or not np.isfinite(value):
            return None
        s = self._sorted(name, x)
        below = np.searchsorted(s, value, "left")
        upto = np.searchsorted(s, value, "right")
        return float(100.0 * (below + 0.5 * (upto - below)) / len(s))

    def _sorted(self, name: str, x: np.ndarray) -> np.ndarray:
        key = ("__sorted__", name)
        with self._lock:
            hit = self.filters.get(key)
        if hit is None:
            hit = np.sort(x)
            with self._lock:
                self.filters[key] = hit
        return hit


def search_table(con: Any, samples: Any, st: Store, vector_sql: str, k: int, model: str, params: dict) -> pa.Table:
    """The rows of a search (`nearest` joined with `samples`), computed as two cheap steps: the top k, then
    their samples rows read from Lance by id at the snapshot's version (its id index answers; the `samples`
    view's columns put over them), not a join over every sample. `samples`: that Lance dataset (or None)."""
    near = run(con, f"SELECT id, score AS similarity FROM nearest({vector_sql}, {int(k)}, model := $_model)",
               {**params, "_model": model})
    ids = near.column("id").combine_chunks().cast(pa.string())
    raw = samples.to_table(filter=pc.field("id").isin(ids)) if samples is not None and len(ids) else \
        samples_schema().empty_table()
    con.register("_app_search_rows", raw)
    try:
        rows = run(con, f"SELECT * EXCLUDE (metadata) FROM (SELECT {samples_select_list(st, raw.schema.names)} "
                        "FROM _app_search_rows)")
    finally:
        con.unregister("_app_search_rows")
    rows = rows.take(pc.index_in(ids, value_set=rows.column("id").combine_chunks()))
    cols = {"id": ids, "similarity": near.column("similarity").combine_chunks()}
    for name in rows.column_names:
        if name != "id":
            cols[name] = rows.column(name).combine_chunks()
    return pa.table(cols)


def _floats(values: pa.Array) -> np.ndarray:
    if pa.types.is_decimal(values.type) or pa.types.is_integer(values.type) or pa.types.is_boolean(values.type):
        values = values.cast(pa.float64())
    return values.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def _describe(con: Any, sql: str, params: dict) -> list[tuple[str, str]]:
    try:
        rel = con.execute(f"DESCRIBE SELECT * FROM (\n{sql}\n) AS q", params).fetchall()
    except duckdb.Error as e:
        raise QueryError((str(e).strip().splitlines() or [type(e).__name__])[0]) from None
    return [(r[0], r[1]) for r in rel]


class Results:
    """Results by (query, parameters, snapshot), least recently used evicted past the memory budget."""

    def __init__(self, budget_mb: float | None = None):
        mb = budget_mb if budget_mb is not None else env_number("CLIPSQL_SERVE_CACHE_MB", DEFAULT_CACHE_MB)
        self.budget = int(mb * (1 << 20))
        self._items: OrderedDict[tuple, Result] = OrderedDict()
        self._making: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, con: Any, sql: str, params: dict, key: tuple, make: Any = None) -> Result:
        """The Result of `sql` at snapshot `key`; `make()` → its whole table, when cheaper than the ids first."""
        k = (sql, tuple(sorted((a, repr(b)) for a, b in params.items())), key)
        with self._lock:
            hit = self._items.get(k)
            if hit is not None:
                self._items.move_to_end(k)
                hit.last_used = time.monotonic()
                return hit
            making = self._making.setdefault(k, threading.Lock())
        with making:
            with self._lock:
                hit = self._items.get(k)
            if hit is None:
                hit = Result(con, sql, params, key, make() if make is not None else None)
                with self._lock:
                    self._items[k] = hit
                    self._making.pop(k, None)
            self.trim()
            return hit

    def trim(self) -> None:
        with self._lock:
            while len(self._items) > 1 and sum(r.nbytes for r in self._items.values()) > self.budget:
                self._items.popitem(last=False)
