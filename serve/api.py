"""What the curation app does, as plain functions over an `AppState` (serve/app.py puts them behind HTTP).

Each endpoint function takes the app's state and the request's JSON body, runs on a prepared
connection at the store's last commit (results.Snapshots) and returns JSON-able data; bad input
raises a ClipsqlError whose one line the HTTP layer returns with status 400 (409: the writer lock
is held). Reading is everything but `tag`, which commits through store.tags; `export` writes a
selection file into the app's temporary folder through `clipsql select` (queries.curation.selection).
"""
from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import sqlalchemy as sa

from clipsql.errors import QueryError
from clipsql.queries.curation.selection import OUTPUT_FORMATS, select
from clipsql.queries.sql.db import quote_ident
from clipsql.serve import viewsql
from clipsql.serve.results import Results, Snapshots, run, search_table
from clipsql.serve.thumbs import Thumbs, is_remote
from clipsql.store import catalog as cat
from clipsql.store import tags as tagstore
from clipsql.store.store import Store

PAGE_MAX = 500
BINS = 40
EXPORTS_KEPT = 20
EXPORT_EXT = {"parquet": ".parquet", "csv": ".csv", "txt": ".txt", "datacomp-uids": ".npy"}
PERCENTILE_AUTO_ROWS = 200_000      # pools up to this size get every score's percentile at once


class AppState:
    """What the app holds: the read-only store, prepared connections, cached results and thumbnails."""

    def __init__(self, store: str | os.PathLike | Store, *, remote_images: bool, thumb_cache_dir: Any,
                 cache_mb: float | None):
        st = store if isinstance(store, Store) else Store.open(store, read_only=True)
        self.path = st.path
        self.st = st if st.read_only else Store.open(st.path, read_only=True)
        self.snapshots = Snapshots(self.st)
        self.results = Results(cache_mb)
        self.thumbs = Thumbs(cache_dir=thumb_cache_dir)
        self.remote_images = remote_images
        self.uris: OrderedDict[str, str | None] = OrderedDict()     # id → uri (pages fill it; thumbs read it)
        self._uri_key: tuple | None = None
        self._lock = threading.Lock()
        self._writer: Store | None = None
        self._samples: tuple[int | None, Any] | None = None
        self.exports = Path(tempfile.mkdtemp(prefix="clipsql-app-exports-"))
        atexit.register(shutil.rmtree, self.exports, True)
        self.export_ids: list[str] = []

    def samples_dataset(self, version: int | None) -> Any:
        """The Lance `samples` dataset at `version`, opened once per version (None before the first ingest)."""
        with self._lock:
            if self._samples is not None and self._samples[0] == version:
                return self._samples[1]
        ds = self.st.samples_table(version) if version is not None else None
        with self._lock:
            self._samples = (version, ds)
        return ds

    def writer(self) -> Store:
        """The store opened for writing (tags only)."""
        with self._lock:
            if self._writer is None:
                self._writer = Store.open(self.path)
            return self._writer

    def data_key(self, con: Any, key: tuple, sql: str) -> tuple:
        """The part of the snapshot key a query's result depends on (a tag commit leaves other queries' results)."""
        try:
            reads_tags = "tags" in viewsql.table_names(con, sql)
        except viewsql.ViewError:
            reads_tags = True
        return key if reads_tags else Snapshots.without_tags(key)

    def remember_uris(self, key: tuple, ids: list, uris: list) -> None:
        with self._lock:
            if self._uri_key != Snapshots.without_tags(key):
                self.uris.clear()
                self._uri_key = Snapshots.without_tags(key)
            for i, u in zip(ids, uris):
                self.uris[i] = u
                self.uris.move_to_end(i)
            while len(self.uris) > 100_000:
                self.uris.popitem(last=False)

    def close(self) -> None:
        self.snapshots.close()
        self.thumbs.close()
        shutil.rmtree(self.exports, ignore_errors=True)


# --------------------------------------------------------------------------- helpers
def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (np.generic,)):
        return _jsonable(v.item())
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, (list, tuple)):
        return f"[{len(v)} values]" if len(v) > 8 else [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    try:
        return float(v)                 # Decimal
    except (TypeError, ValueError):
        return str(v)


def _thumb_url(row_id: str, size: int = 160) -> str:
    return f"/api/thumb?id={quote(row_id, safe='')}&size={size}"


def _int(v: Any, what: str, lo: int, hi: int, default: int) -> int:
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise viewsql.ViewError(f"{what} must be an integer")
    return max(lo, min(hi, int(v)))


def _view(app: AppState, con: Any, key: tuple, state: dict) -> tuple[viewsql.View, Any, dict]:
    """(the view, its Result, the base's parameters) of a view state."""
    cols = [r[0] for r in con.execute("DESCRIBE samples").fetchall()]
    default = viewsql.default_sql(app.st, cols)
    view, base = viewsql.build_view(con, app.st, state or {}, None, default)
    params: dict = {}
    sql = base.render(params)
    make = None
    search = (state or {}).get("search")
    if search:
        s = viewsql.search_of(app.st, search)
        vparams: dict = {}
        vector = s.vector.render(vparams)
        samples = app.samples_dataset(dict(key[0]).get("samples"))
        make = lambda: search_table(con, samples, app.st, vector, s.k, s.model, vparams)  # noqa: E731
    result = app.results.get(con, sql, params, app.data_key(con, key, sql), make)
    view, _ = viewsql.build_view(con, app.st, state or {}, result.schema, default)
    return view, result, params


def _default_result(app: AppState, con: Any, key: tuple) -> Any:
    return _view(app, con, key, {})[1]


# --------------------------------------------------------------------------- endpoints (sync, run in threads)
def info(app: AppState) -> dict:
    with app.snapshots.connection() as (con, key):
        cols = [r[0] for r in con.execute("DESCRIBE samples").fetchall()]
        models = app.st.list_models()
        default = app.st.model().model_id if models else None
        with app.st.engine.connect() as conn:
            targets = [r[0] for r in conn.execute(sa.select(cat.targets.c.name).where(
                cat.targets.c.model_id == default))] if default else []
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        return {"store": str(app.path), "models": [m.model_id for m in models], "default_model": default,
                "default_sql": viewsql.default_sql(app.st, cols), "remote_images": app.remote_images,
                "targets": targets, "dedup": "semdedup" in views, "tags": _tag_counts(con),
                "formats": list(OUTPUT_FORMATS), "search_k": viewsql.SEARCH_K}


def _tag_counts(con: Any) -> list[dict]:
    return [{"tag": t, "n": int(n)} for t, n in
            con.execute("SELECT tag, count(*) FROM tags GROUP BY tag ORDER BY tag").fetchall()]


def page(app: AppState, body: dict) -> dict:
    t0 = time.perf_counter()
    offset = _int(body.get("offset"), "offset", 0, 1 << 62, 0)
    limit = _int(body.get("limit"), "limit", 1, PAGE_MAX, 100)
    with app.snapshots.connection() as (con, key):
        view, result, _ = _view(app, con, key, body.get("state") or {})
        show = [c for c in (body.get("show") or []) if isinstance(c, str) and c in result.schema
                and viewsql.is_scalar(result.schema[c]) and c not in ("id", "uri", "caption")][:8]
        pos = result.select(con, view, filter_key=_filter_key(key, view))
        part = pos[offset:offset + limit]
        take = pa.array(part, pa.int64())
        ids = result.ids.take(take).to_pylist()
        cols = {c: result.column(con, c).take(take).to_pylist() for c in show}
        uri = result.column(con, "uri").take(take).to_pylist() if "uri" in result.schema else \
            _sample_field(con, ids, "uri")
        caption = result.column(con, "caption").take(take).to_pylist() if "caption" in result.schema else \
            _sample_field(con, ids, "caption")
        tags = _tags_of(con, ids)
        app.remember_uris(key, ids, uri)
        rows = []
        for i, rid in enumerate(ids):
            u = uri[i]
            remote = is_remote(u)
            rows.append({"id": rid, "caption": caption[i], "uri": u, "remote": remote,
                         "thumb": u if remote and app.remote_images else _thumb_url(rid),
                         "values": {c: _jsonable(cols[c][i]) for c in show}, "tags": tags.get(rid, [])})
        return {"total": int(len(pos)), "all_rows": result.n, "offset": offset, "rows": rows,
                "columns": [{"name": n, "type": t, "numeric": viewsql.is_numeric(t), "scalar": viewsql.is_scalar(t)}
                            for n, t in result.schema.items()],
                "sql": view.display_sql(), "search": bool((body.get("state") or {}).get("search")),
                "seconds": round(time.perf_counter() - t0, 4)}


def _filter_key(key: tuple, view: viewsql.View) -> tuple:
    """Cached filter positions depend on the snapshot when a condition reads other tables (tags, …)."""
    reads_tables = any(not c.brush and ("SELECT" in c.sql.render(None).upper()) for c in view.conds)
    return key if reads_tables else ()


def _sample_field(con: Any, ids: list, field: str) -> list:
    if not ids:
        return []
    got = dict(con.execute(f"SELECT id, {quote_ident(field)} FROM samples WHERE id IN "
                           f"({', '.join('$i%d' % i for i in range(len(ids)))})",
                           {f"i{i}": x for i, x in enumerate(ids)}).fetchall())
    return [got.get(i) for i in ids]


def _tags_of(con: Any, ids: list) -> dict[str, list[str]]:
    if not ids:
        return {}
    rows = con.execute("SELECT id, list(tag ORDER BY tag) FROM tags WHERE list_contains($ids, id) GROUP BY id",
                       {"ids": ids}).fetchall()
    return {r[0]: r[1] for r in rows}


def histogram(app: AppState, body: dict) -> dict:
    bins = _int(body.get("bins"), "bins", 2, 200, BINS)
    with app.snapshots.connection() as (con, key):
        view, result, _ = _view(app, con, key, body.get("state") or {})
        name = body.get("column")
        if not isinstance(name, str) or name not in result.schema or not viewsql.is_numeric(result.schema[name]):
            raise viewsql.ViewError(f"{name!r} is not a numeric column of the grid's rows")
        t0 = time.perf_counter()
        pos = result.select(con, view, skip_brush=name, ordered=False, filter_key=_filter_key(key, view))
        out = result.histogram(con, name, pos, bins)
        out["brush"] = list(view.brush_columns[name]) if name in view.brush_columns else None
        out["seconds"] = round(time.perf_counter() - t0, 4)
        return out


def values(app: AppState, body: dict) -> dict:
    with app.snapshots.connection() as (con, key):
        view, result, _ = _view(app, con, key, body.get("state") or {})
        name = body.get("column")
        if not isinstance(name, str) or name not in result.schema or not viewsql.is_scalar(result.schema[name]):
            raise viewsql.ViewError(f"{name!r} is not a column of the grid's rows")
        col = result.column(con, name)
        vc = pa.compute.value_counts(col)
        counts = vc.field("counts").to_numpy()
        order = np.argsort(-counts, kind="stable")[:50]
        vals = vc.field("values").take(pa.array(order)).to_pylist()
        return {"column": name, "distinct": len(vc),
                "values": [{"value": _jsonable(v), "n": int(counts[i])} for v, i in zip(vals, order)]}


def thumb(app: AppState, row_id: str, size: int) -> tuple[bytes | None, str, str | None]:
    """(body, MIME type, None), or (None, why, a remote URL to redirect to)."""
    size = app.thumbs.size(size)
    with app._lock:
        known = row_id in app.uris
        uri = app.uris.get(row_id)
    if not known:
        with app.snapshots.connection() as (con, key):
            got = con.execute("SELECT uri FROM samples WHERE id = $id", {"id": row_id}).fetchall()
            if not got:
                return None, "not a sample of this store", None
            uri = got[0][0]
            app.remember_uris(key, [row_id], [uri])
    if is_remote(uri) and app.remote_images:
        return None, "remote", uri
    body, mime = app.thumbs.get(uri, size)
    return body, mime, None


def detail(app: AppState, row_id: str) -> dict:
    """One sample: metadata, every score, tags, neighbours, its SemDeDup group, the target sets it is near."""
    with app.snapshots.connection() as (con, key):
        sample = run(con, "SELECT * EXCLUDE (metadata) FROM samples WHERE id = $id", {"id": row_id}).to_pylist()
        if not sample:
            raise QueryError(f"{row_id!r} is not a sample of this store")
        s = {k: _jsonable(v) for k, v in sample[0].items()}
        uri = s.get("uri")
        out: dict[str, Any] = {"id": row_id, "sample": s, "uri": uri, "caption": s.get("caption"),
                               "remote": is_remote(uri),
                               "thumb": uri if is_remote(uri) and app.remote_images else _thumb_url(row_id, 512),
                               "tags": _tags_of(con, [row_id]).get(row_id, []), "scores": [], "neighbours": [],
                               "dedup": None, "targets": []}
        if not app.st.list_models():
            return out
        rec = app.st.model()
        p = {"id": row_id, "m": rec.model_id}
        try:
            scores = run(con, "SELECT * EXCLUDE (id, uri, caption) FROM scores WHERE id = $id", {"id": row_id})
            for r in scores.to_pylist():
                model = r.pop("model")
                out["scores"] += [{"model": model, "column": k, "value": _jsonable(v),
                                   "default_model": model == rec.model_id} for k, v in r.items()]
        except QueryError as e:
            out["scores_error"] = str(e)
        try:
            nb = run(con, f"SELECT n.id, n.score, s.caption FROM nearest({_VECTOR}, 13, model := $m) n "
                          "JOIN samples s USING (id) ORDER BY n.score DESC, n.id", p).to_pylist()
            out["neighbours"] = [dict(r, score=_jsonable(r["score"]), thumb=_thumb_url(r["id"], 128))
                                 for r in nb if r["id"] != row_id][:12]
        except QueryError as e:
            out["neighbours_error"] = str(e)
        out["dedup"] = _dedup_group(con, p)
        out["targets"] = _targets_near(app, con, p)
        return out


_VECTOR = "(SELECT image_embedding FROM embeddings WHERE id = $id AND model = $m)"


def _dedup_group(con: Any, p: dict) -> dict | None:
    """The sample's SemDeDup cluster (`clipsql dedup`) and its members closest to it, or None."""
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    if "semdedup" not in views:
        return None
    d = con.execute("SELECT semdedup_cluster, semdedup_max_sim FROM semdedup WHERE id = $id",
                    {"id": p["id"]}).fetchall()
    if not d or d[0][0] is None:
        return None
    cluster = int(d[0][0])              # an integer from the store: `nearest`'s filter is SQL text
    members = run(con, f"SELECT n.id, n.score AS cosine, d.semdedup_max_sim FROM nearest({_VECTOR}, 13, model := $m, "
                       f"filter := 'id IN (SELECT id FROM semdedup WHERE semdedup_cluster = {cluster})') n "
                       "JOIN semdedup d USING (id) ORDER BY n.score DESC, n.id", p).to_pylist()
    size = con.execute("SELECT count(*) FROM semdedup WHERE semdedup_cluster = $c", {"c": cluster}).fetchall()[0][0]
    return {"cluster": cluster, "max_sim": _jsonable(d[0][1]), "size": int(size),
            "members": [{**{k: _jsonable(v) for k, v in r.items()}, "thumb": _thumb_url(r["id"], 128)}
                        for r in members if r["id"] != p["id"]][:12]}


def _targets_near(app: AppState, con: Any, p: dict) -> list[dict]:
    """NormSim∞ of the sample to each target set of the model, nearest first."""
    with app.st.engine.connect() as conn:
        names = [r[0] for r in conn.execute(sa.select(cat.targets.c.name).where(
            cat.targets.c.model_id == p["m"]).order_by(cat.targets.c.name))]
    out = []
    for t in names:
        v = con.execute("SELECT norm_sim_inf(image_embedding, $t) FROM embeddings WHERE id = $id AND model = $m",
                        {"t": t, **p}).fetchall()
        out.append({"target": t, "norm_sim_inf": _jsonable(v[0][0]) if v else None})
    return sorted(out, key=lambda r: -(r["norm_sim_inf"] if r["norm_sim_inf"] is not None else -2.0))


def percentiles(app: AppState, body: dict) -> dict:
    row_id = body.get("id")
    if not isinstance(row_id, str):
        raise viewsql.ViewError("percentiles need the sample's id")
    with app.snapshots.connection() as (con, key):
        result = _default_result(app, con, key)
        compute = bool(body.get("compute")) or result.n <= PERCENTILE_AUTO_ROWS
        idx = pa.compute.index(result.ids, row_id).as_py()
        pos = np.array([idx] if idx is not None and idx >= 0 else [], dtype=np.int64)
        out: dict[str, Any] = {"id": row_id, "pool_rows": result.n, "percentiles": {}, "pending": []}
        if not len(pos):
            return out
        take = pa.array(pos[:1], pa.int64())
        for name, t in result.schema.items():
            if not viewsql.is_numeric(t) or name in ("id",):
                continue
            if name not in result.columns and not compute:
                out["pending"].append(name)
                continue
            v = result.column(con, name).take(take).to_pylist()[0]
            v = float(v) if v is not None else None
            out["percentiles"][name] = {"value": _jsonable(v), "percentile": _jsonable(result.percentile(con, name, v))}
        return out


def tag(app: AppState, body: dict) -> dict:
    action = body.get("action")
    if action not in ("add", "remove"):
        raise viewsql.ViewError("action is add or remove")
    name = tagstore.check_tag(body.get("tag"))
    if body.get("all"):
        with app.snapshots.connection() as (con, key):
            view, result, _ = _view(app, con, key, body.get("state") or {})
            pos = result.select(con, view, filter_key=_filter_key(key, view))
            ids = result.ids.take(pa.array(pos, pa.int64()))
    else:
        raw = body.get("ids")
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw) or len(raw) > 1_000_000:
            raise viewsql.ViewError("ids must be a list of sample ids")
        ids = pa.array(raw, pa.string())
    t0 = time.perf_counter()
    w = app.writer()
    out = tagstore.add_tags(w, ids, name) if action == "add" else tagstore.remove_tags(w, ids, name)
    out["seconds"] = round(time.perf_counter() - t0, 4)
    out["ids"] = len(ids)
    return out


def tag_list(app: AppState) -> dict:
    with app.snapshots.connection() as (con, key):
        return {"tags": _tag_counts(con)}


def export(app: AppState, body: dict) -> dict:
    fmt = body.get("format") or "parquet"
    if fmt not in EXPORT_EXT:
        raise viewsql.ViewError(f"format is one of {', '.join(EXPORT_EXT)}")
    with app.snapshots.connection() as (con, key):
        view, result, _ = _view(app, con, key, body.get("state") or {})
    sql = export_sql(view)
    eid = uuid.uuid4().hex[:16]
    folder = app.exports / eid
    folder.mkdir()
    out = folder / ("selection" + EXPORT_EXT[fmt])
    side = select(app.st, sql=sql, output=out)       # the suffix names the format, as on the command line
    with app._lock:
        app.export_ids.append(eid)
        while len(app.export_ids) > EXPORTS_KEPT:
            shutil.rmtree(app.exports / app.export_ids.pop(0), ignore_errors=True)
    return {"id": eid, "file": out.name, "sidecar": out.name + ".json", "sql": sql,
            "counts": side.counts, "warnings": side.warnings,
            "links": [f"/api/export/{eid}/{out.name}", f"/api/export/{eid}/{out.name}.json"]}


def export_sql(view: viewsql.View) -> str:
    """The SQL an export runs through `clipsql select --sql`: the grid's SQL, keeping id and the columns its
    sort and brushes use (select adds uri and caption), so score columns nobody looked at are not computed."""
    keep = ["id"] + [c for c in ([view.sort_column] if view.sort_column else []) + sorted(view.brush_columns)
                     if c and c != "id"]
    seen: list[str] = []
    for c in keep:
        if c not in seen:
            seen.append(c)
    return view.display_sql(select_list=", ".join(quote_ident(c) for c in seen))
