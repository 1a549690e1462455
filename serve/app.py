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

import contextlib
import os
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, quote

from clipsql.errors import ClipsqlError, StoreLocked
from clipsql.serve.api import (EXPORT_EXT, EXPORTS_KEPT, AppState, detail, export, histogram, info, page, percentiles,
                               tag, tag_list, thumb, values)
from clipsql.store.store import Store

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "clipsql_token"


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

