"""The curation app: a page of thumbnails for any SQL over the store, filters, search, tags, export.

    app = create_app("my-store")                       # a Starlette app; `clipsql serve` runs it
    uvicorn.run(app, host="127.0.0.1", port=8000)

Everything the page needs is in this package (static/: index.html, app.js, app.css; no CDN, no
build step), so it works with no internet: the page only ever asks this server, and its Content
Security Policy forbids any other host — except, with `remote_images=True`, the images of
URL-based pools (DataComp, LAION), which the curator's own browser then loads from their hosts.

Reading: every request takes a prepared connection at the store's last commit (results.Snapshots)
and the rows of the grid's query come from results.Result (columns materialized once, filtered and
sorted over Arrow). Writing: only tags (store.tags, a ledger commit under the writer lock); the rest
of the server is read-only. Exports run `clipsql select --sql` (queries.curation.selection.select)
on the SQL the page shows.

API (JSON; a view `state` is described in serve.viewsql):

    GET  /api/info                          store, models, the default SQL, options
    POST /api/page       {state, offset, limit, show}     rows of the grid, the SQL it runs
    POST /api/histogram  {state, column, bins}            counts of a numeric column, all / filtered
    POST /api/values     {state, column}                  the most common values of a column
    GET  /api/thumb?id=…&size=…                           a thumbnail (404 + {"broken": why})
    GET  /api/detail?id=…                                 one sample: metadata, scores, tags, neighbours, …
    POST /api/percentiles {id, compute}                   its scores' percentiles in the pool
    GET  /api/tags | POST /api/tags {action, tag, ids | all + state}
    POST /api/export     {state, format}                  a selection file + sidecar (GET /api/export/ID/NAME)
"""
from __future__ import annotations

import atexit
import contextlib
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, quote

import numpy as np
import pyarrow as pa
import sqlalchemy as sa

from clipsql.errors import ClipsqlError, QueryError, StoreLocked
from clipsql.queries.curation.selection import OUTPUT_FORMATS, select
from clipsql.queries.sql.db import quote_ident
from clipsql.serve import viewsql
from clipsql.serve.results import Results, Snapshots, run, search_table
from clipsql.serve.thumbs import Thumbs, is_remote
from clipsql.store import catalog as cat
from clipsql.store import tags as tagstore
from clipsql.store.store import Store

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "clipsql_token"
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
    with app.snapshots.connection() as (con, key):
        sample = run(con, "SELECT * EXCLUDE (metadata) FROM samples WHERE id = $id", {"id": row_id}).to_pylist()
        if not sample:
            raise QueryError(f"{row_id!r} is not a sample of this store")
        s = {k: _jsonable(v) for k, v in sample[0].items()}
        out: dict[str, Any] = {"id": row_id, "sample": s, "uri": s.get("uri"), "caption": s.get("caption"),
                               "remote": is_remote(s.get("uri")),
                               "thumb": s.get("uri") if is_remote(s.get("uri")) and app.remote_images
                               else _thumb_url(row_id, 512),
                               "tags": _tags_of(con, [row_id]).get(row_id, []), "scores": [], "neighbours": [],
                               "dedup": None, "targets": []}
        if not app.st.list_models():
            return out
        rec = app.st.model()
        try:
            scores = run(con, "SELECT * EXCLUDE (id, uri, caption) FROM scores WHERE id = $id", {"id": row_id})
            for r in scores.to_pylist():
                model = r.pop("model")
                for k, v in r.items():
                    out["scores"].append({"model": model, "column": k, "value": _jsonable(v),
                                          "default_model": model == rec.model_id})
        except QueryError as e:
            out["scores_error"] = str(e)
        vec = "(SELECT image_embedding FROM embeddings WHERE id = $id AND model = $m)"
        p = {"id": row_id, "m": rec.model_id}
        try:
            nb = run(con, f"SELECT n.id, n.score, s.caption FROM nearest({vec}, 13, model := $m) n "
                          "JOIN samples s USING (id) ORDER BY n.score DESC, n.id", p).to_pylist()
            out["neighbours"] = [dict(r, score=_jsonable(r["score"]), thumb=_thumb_url(r["id"], 128))
                                 for r in nb if r["id"] != row_id][:12]
        except QueryError as e:
            out["neighbours_error"] = str(e)
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        if "semdedup" in views:
            d = con.execute("SELECT semdedup_cluster, semdedup_max_sim FROM semdedup WHERE id = $id",
                            {"id": row_id}).fetchall()
            if d and d[0][0] is not None:
                cluster = int(d[0][0])
                members = run(con, f"SELECT n.id, n.score AS cosine, d.semdedup_max_sim FROM nearest({vec}, 13, "
                                   f"model := $m, filter := 'id IN (SELECT id FROM semdedup WHERE semdedup_cluster "
                                   f"= {cluster})') n JOIN semdedup d USING (id) ORDER BY n.score DESC, n.id",
                              p).to_pylist()
                size = con.execute("SELECT count(*) FROM semdedup WHERE semdedup_cluster = $c",
                                   {"c": cluster}).fetchall()[0][0]
                out["dedup"] = {"cluster": cluster, "max_sim": _jsonable(d[0][1]), "size": int(size),
                                "members": [{k: _jsonable(v) for k, v in r.items()} | {"thumb": _thumb_url(r["id"], 128)}
                                            for r in members if r["id"] != row_id][:12]}
        with app.st.engine.connect() as conn:
            names = [r[0] for r in conn.execute(sa.select(cat.targets.c.name).where(
                cat.targets.c.model_id == rec.model_id).order_by(cat.targets.c.name))]
        for t in names:
            v = con.execute("SELECT norm_sim_inf(image_embedding, $t) FROM embeddings WHERE id = $id AND model = $m",
                            {"t": t, **p}).fetchall()
            out["targets"].append({"target": t, "norm_sim_inf": _jsonable(v[0][0]) if v else None})
        out["targets"].sort(key=lambda r: -(r["norm_sim_inf"] or -2))
        return out


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
            "counts": side.get("counts"), "warnings": side.get("warnings", []),
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


# --------------------------------------------------------------------------- the Starlette app
def create_app(store: str | os.PathLike | Store, *, auth: Any = None, remote_images: bool = False,
               thumb_cache_dir: str | os.PathLike | None = None, cache_mb: float | None = None) -> Any:
    """The curation app over `store` (a path or a Store). `auth`: None (open: loopback use), or an object
    with `authenticate(authorization_header)` (serve.auth.Auth) or `check(token) -> bool`;
    `remote_images`: let the page load http(s) images from their hosts (off: offline, broken tiles)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    state = AppState(store, remote_images=remote_images, thumb_cache_dir=thumb_cache_dir, cache_mb=cache_mb)
    img_src = "'self' data: http: https:" if remote_images else "'self' data:"
    csp = (f"default-src 'none'; script-src 'self'; style-src 'self'; img-src {img_src}; connect-src 'self'; "
           "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
    headers = {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
               "Cache-Control": "no-store"}

    def error(e: Exception) -> JSONResponse:
        if isinstance(e, StoreLocked):
            return JSONResponse({"error": f"{e} — another writer (an ingest?) holds the store; try again when it "
                                          "is done"}, status_code=409)
        return JSONResponse({"error": str(e).splitlines()[0] if str(e) else type(e).__name__}, status_code=400)

    def endpoint(fn: Callable, *, body: bool = True) -> Callable:
        async def handler(request: Request) -> Response:
            try:
                if request.method == "POST":
                    refused = _cross_site(request)
                    if refused is not None:
                        return refused
                if body:
                    try:
                        data = await request.json()
                    except (ValueError, UnicodeDecodeError):
                        return JSONResponse({"error": "the request body must be JSON"}, status_code=400)
                    if not isinstance(data, dict):
                        return JSONResponse({"error": "the request body must be a JSON object"}, status_code=400)
                    out = await run_in_threadpool(fn, state, data)
                else:
                    out = await run_in_threadpool(fn, state)
            except ClipsqlError as e:
                return error(e)
            return JSONResponse(out, headers={"Cache-Control": "no-store"})
        return handler

    def _cross_site(request: Request) -> Response | None:
        """A write from another site's page (a form posted at this server) is refused: API writes are
        JSON (which another origin cannot send without CORS, never granted here) from this origin."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return JSONResponse({"error": "send JSON (Content-Type: application/json)"}, status_code=415)
        origin = request.headers.get("origin")
        if origin and origin != "null" and origin.split("://", 1)[-1] != request.headers.get("host"):
            return JSONResponse({"error": "a request from another site's page is refused"}, status_code=403)
        return None

    async def index(request: Request) -> Response:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"), headers=headers)

    async def thumb_route(request: Request) -> Response:
        row_id = request.query_params.get("id")
        if not row_id:
            return JSONResponse({"broken": "no id"}, status_code=400)
        try:
            size = int(request.query_params.get("size") or 160)
        except ValueError:
            size = 160
        try:
            body, what, remote = await run_in_threadpool(thumb, state, row_id, size)
        except ClipsqlError as e:
            return error(e)
        if remote is not None:
            return RedirectResponse(remote, status_code=307)
        if body is None:
            return JSONResponse({"broken": what}, status_code=404, headers={"X-Clipsql-Broken": quote(what),
                                                                          "Cache-Control": "no-store"})
        return Response(body, media_type=what, headers={"Cache-Control": "private, max-age=3600"})

    async def detail_route(request: Request) -> Response:
        row_id = request.query_params.get("id") or ""
        try:
            return JSONResponse(await run_in_threadpool(detail, state, row_id), headers={"Cache-Control": "no-store"})
        except ClipsqlError as e:
            return error(e)

    async def export_file(request: Request) -> Response:
        eid, name = request.path_params["eid"], request.path_params["name"]
        if not eid.isalnum() or name not in {f"selection{x}" for x in EXPORT_EXT.values()} | \
                {f"selection{x}.json" for x in EXPORT_EXT.values()}:
            return JSONResponse({"error": "no such export"}, status_code=404)
        path = state.exports / eid / name
        if not path.is_file():
            return JSONResponse({"error": "no such export (exports are kept while the server runs, the last "
                                          f"{EXPORTS_KEPT})"}, status_code=404)
        return FileResponse(path, filename=name)

    async def tags_route(request: Request) -> Response:
        if request.method == "GET":
            return await endpoint(tag_list, body=False)(request)
        return await endpoint(tag)(request)

    # -- auth ---------------------------------------------------------------------------------------
    def authorized(request: Request) -> tuple[bool, str | None]:
        """(allowed, a session token to set as the cookie)."""
        if auth is None:
            return True, None
        header = request.headers.get("authorization")
        cookie = request.cookies.get(COOKIE)
        return _check(auth, header, cookie)

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return HTMLResponse(LOGIN_PAGE.replace("{message}", ""), headers=headers)
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        user = (form.get("user") or [""])[0]
        secret = (form.get("secret") or [""])[0]
        token = _login(auth, user, secret) if auth is not None else ""
        if token is None:
            return HTMLResponse(LOGIN_PAGE.replace("{message}", "<p class=err>Wrong name or secret.</p>"),
                                status_code=401, headers=headers)
        resp = RedirectResponse("/", status_code=303)
        if token:
            resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return resp

    async def logout(request: Request) -> Response:
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE)
        return resp

    class AuthMiddleware:
        def __init__(self, inner: Any):
            self.inner = inner

        async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or auth is None:
                return await self.inner(scope, receive, send)
            request = Request(scope)
            path = request.url.path
            if path in ("/login", "/logout") or path.startswith("/static/"):
                return await self.inner(scope, receive, send)
            url_token = request.query_params.get("token")
            if url_token and request.method == "GET":      # a link with the token, once: a cookie from then on
                ok, issued = _check(auth, "Bearer " + url_token, None)
                if ok:
                    resp = RedirectResponse(path, status_code=303)
                    resp.set_cookie(COOKIE, issued or url_token, httponly=True, samesite="strict",
                                    secure=request.url.scheme == "https")
                    return await resp(scope, receive, send)
            ok, issued = authorized(request)
            if not ok:
                if path.startswith("/api/"):
                    resp = JSONResponse({"error": "log in first (a token: Authorization: Bearer …, or /login)"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                else:
                    resp = RedirectResponse("/login", status_code=303)
                return await resp(scope, receive, send)
            if issued:
                async def send_with_cookie(message: dict) -> None:
                    if message["type"] == "http.response.start":
                        from http.cookies import SimpleCookie
                        c = SimpleCookie()
                        c[COOKIE] = issued
                        c[COOKIE]["httponly"] = True
                        c[COOKIE]["samesite"] = "Strict"
                        c[COOKIE]["path"] = "/"
                        message.setdefault("headers", []).append(
                            (b"set-cookie", c.output(header="").strip().encode("latin-1")))
                    await send(message)
                return await self.inner(scope, receive, send_with_cookie)
            return await self.inner(scope, receive, send)

    routes = [
        Route("/", index),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout),
        Route("/api/info", endpoint(info, body=False)),
        Route("/api/page", endpoint(page), methods=["POST"]),
        Route("/api/histogram", endpoint(histogram), methods=["POST"]),
        Route("/api/values", endpoint(values), methods=["POST"]),
        Route("/api/thumb", thumb_route),
        Route("/api/detail", detail_route),
        Route("/api/percentiles", endpoint(percentiles), methods=["POST"]),
        Route("/api/tags", tags_route, methods=["GET", "POST"]),
        Route("/api/export", endpoint(export), methods=["POST"]),
        Route("/api/export/{eid}/{name}", export_file),
        Mount("/static", app=StaticFiles(directory=str(STATIC)), name="static"),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        try:
            yield
        finally:
            state.close()

    app = Starlette(routes=routes, middleware=[Middleware(AuthMiddleware)], lifespan=lifespan)
    app.state.clipsql = state
    return app


def _check(auth: Any, header: str | None, cookie: str | None) -> tuple[bool, str | None]:
    """Ask `auth` (serve.auth.Auth's `authenticate`, or any object with `check(token) -> bool`)."""
    if hasattr(auth, "authenticate"):
        if not header and cookie:
            header = "Bearer " + cookie
        try:
            who, issued = auth.authenticate(header)
        except Exception:  # noqa: BLE001 - AuthError (or any refusal) → not allowed
            return False, None
        return not getattr(who, "anonymous", False) or getattr(auth, "allow_anonymous", False), issued
    token = None
    if header and header.lower().startswith("bearer "):
        token = header[7:].strip()
    token = token or cookie
    try:
        return bool(auth.check(token)), None
    except Exception:  # noqa: BLE001
        return False, None


def _login(auth: Any, user: str, secret: str) -> str | None:
    """The cookie's token after a login form (a name + password, or a token alone); None if refused."""
    import base64
    if hasattr(auth, "authenticate"):
        header = ("Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()) if user else "Bearer " + secret
        try:
            _, issued = auth.authenticate(header)
        except Exception:  # noqa: BLE001
            return None
        return issued or secret
    ok, _ = _check(auth, "Bearer " + secret, None)
    return secret if ok else None


LOGIN_PAGE = """<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>clipsql — log in</title>
<link rel="stylesheet" href="/static/app.css"></head><body class="login"><form method="post" action="/login">
<h1>clipsql</h1>{message}<label>Name (leave empty for a token) <input name="user" autocomplete="username"></label>
<label>Secret or token <input name="secret" type="password" autocomplete="current-password" required></label>
<button type="submit">Log in</button></form></body></html>"""

