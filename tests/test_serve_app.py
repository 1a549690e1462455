"""The curation app's HTTP API (serve/app.py) without a browser: the grid's rows against the SQL it shows,
histograms, checked user SQL, thumbnails and broken tiles, search, tags through the ledger, export
through `clipsql select`, auth, snapshots. The page itself: tests/test_serve_browser.py."""
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipsql import queries
from clipsql.serve.app import create_app
from clipsql.serve.thumbs import REMOTE_HIDDEN
from clipsql.store.store import Store

import serve_store
from conftest import cli

starlette_testclient = pytest.importorskip("starlette.testclient")


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model):
    return serve_store.build(tmp_path_factory.mktemp("app"), tiny_model)


@pytest.fixture(scope="module")
def client(store):
    with starlette_testclient.TestClient(create_app(store)) as c:
        yield c


def rows_of(client, state, limit=500):
    r = client.post("/api/page", json={"state": state, "offset": 0, "limit": limit})
    assert r.status_code == 200, r.text
    return r.json()


def sql_ids(store, sql, params=None):
    con = queries.connect(store)
    try:
        return [r[0] for r in con.execute(f"SELECT id FROM ({sql}) AS x", params or []).fetchall()]
    finally:
        con.close()


STATES = [
    {},
    {"brushes": {"clip_score": [-0.2, 0.1]}},
    {"filters": [{"column": "kind", "op": "=", "value": "photo"}], "brushes": {"image_raw_norm": [0, 400.5]}},
    {"where": "caption LIKE '%1%' AND rating >= 2"},
    {"where": "caption LIKE '%)%' OR caption LIKE '%(%'"},            # parentheses inside literals
    {"sort": {"column": "clip_score", "desc": True}},
    {"sort": {"column": "rating", "desc": False}, "filters": [{"column": "caption", "op": "contains", "value": "RED"}]},
    {"brushes": {"clip_score": [-0.1, 0.2]}, "where": "rating IN (1, 3)", "sort": {"column": "image_info_gain",
                                                                                    "desc": True}},
]


@pytest.mark.parametrize("state", STATES, ids=[json.dumps(s)[:40] for s in STATES])
def test_the_grid_shows_the_rows_of_the_sql_it_shows(client, store, state):
    page = rows_of(client, state)
    got = [r["id"] for r in page["rows"]]
    want = sql_ids(store, page["sql"])
    assert page["total"] == len(want) == len(got)
    if state.get("sort"):
        assert got == want                                  # ORDER BY col, id: the same order
    else:
        assert sorted(got) == sorted(want)
    # a virtual grid asks page by page: the pages concatenate to the whole
    parts = [r["id"] for off in range(0, len(got), 7) for r in
             client.post("/api/page", json={"state": state, "offset": off, "limit": 7}).json()["rows"]]
    assert parts == got


def test_histograms_count_the_sql_values(client, store):
    state = {"brushes": {"image_raw_norm": [0, 300.0], "clip_score": [0.0, 0.5]}}
    h = client.post("/api/histogram", json={"state": state, "column": "clip_score", "bins": 12}).json()
    con = queries.connect(store)
    model = Store.open(store, read_only=True).model().model_id
    x = np.array([r[0] for r in con.execute("SELECT clip_score FROM scores WHERE model = ?", [model]).fetchall()],
                 dtype=np.float64)
    sel = np.array([r[0] for r in con.execute(       # the other brushes apply, not the column's own
        "SELECT clip_score FROM scores WHERE model = ? AND image_raw_norm BETWEEN 0 AND 300", [model]).fetchall()],
        dtype=np.float64)
    lo, hi = x.min(), x.max()
    assert (h["lo"], h["hi"]) == (lo, hi) and h["rows"] == len(x)
    assert h["all"] == np.histogram(x, bins=12, range=(lo, hi))[0].tolist()
    assert h["selected"] == np.histogram(sel, bins=12, range=(lo, hi))[0].tolist()
    assert h["brush"] == [0.0, 0.5]
    sorted_state = dict(state, sort={"column": "clip_score", "desc": True})      # its own column sorts the grid
    h2 = client.post("/api/histogram", json={"state": sorted_state, "column": "clip_score", "bins": 12})
    assert h2.status_code == 200, h2.text
    assert h2.json()["selected"] == h["selected"]
    bad = client.post("/api/histogram", json={"state": {}, "column": "kind"})
    assert bad.status_code == 400 and "not a numeric column" in bad.json()["error"]


BAD_WHERE = [
    "true; DROP TABLE samples",
    "1=1) UNION SELECT * FROM samples WHERE (1=1",
    "1=1) ORDER BY (1",
    "1=1 -- ",
    "id = ?",
    "id = $1",
    "1=1) GROUP BY (id",
    ") OR (1=1",
]
BAD_SQL = [
    "SELECT 1 AS id; SELECT 2 AS id",
    "COPY samples TO '{tmp}/leak.csv'",
    "CREATE TABLE t AS SELECT * FROM samples",
    "ATTACH '{tmp}/x.duckdb' AS x",
    "SELECT * FROM read_csv('{tmp}/secret.csv')",
    "SELECT id FROM samples WHERE id = ?",
    "INSTALL httpfs",
]


def test_user_sql_is_checked_and_refused_in_one_line(client, store, tmp_path):
    (tmp_path / "secret.csv").write_text("id\nsecret\n")
    for where in BAD_WHERE:
        r = client.post("/api/page", json={"state": {"where": where}})
        assert r.status_code == 400, (where, r.text)
        assert "\n" not in r.json()["error"] and "Traceback" not in r.text
    for sql in BAD_SQL:
        r = client.post("/api/page", json={"state": {"sql": sql.format(tmp=tmp_path)}})
        assert r.status_code == 400, (sql, r.text)
        assert "\n" not in r.json()["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.csv"]     # nothing written
    r = client.post("/api/page", json={"state": {"sql": "SELECT id, caption FROM samples WHERE rating = 3"}})
    assert r.status_code == 200 and r.json()["total"] == sum(1 for i in range(serve_store.N) if i % 5 == 3)
    r = client.post("/api/page", json={"state": {"sql": "SELECT 'x' AS id UNION ALL SELECT 'x'"}})
    assert r.status_code == 400 and "more than once" in r.json()["error"]
    r = client.post("/api/page", json={"state": {"brushes": {"kind": [0, 1]}}})
    assert r.status_code == 400 and "not a number" in r.json()["error"]
    r = client.post("/api/page", json={"state": {"filters": [{"column": "nope", "op": "=", "value": 1}]}})
    assert r.status_code == 400 and "not a column" in r.json()["error"]
    r = client.post("/api/page", content='{"state": {"brushes": {"clip_score": [0, 1e999]}}}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400


def thumb(client, row_id, **kw):
    return client.get("/api/thumb", params={"id": row_id, "size": 128, **kw}, follow_redirects=False)


def test_thumbnails_and_the_reason_of_each_broken_tile(client):
    from PIL import Image
    for i in (0, 57, 110, 114):                           # local files and tar members
        r = thumb(client, f"r{i:04d}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size == (24, 24)
    expect = {100: "missing file", 105: REMOTE_HIDDEN, 115: "cannot decode", 117: "no image (uri is NULL)"}
    for i, why in expect.items():
        r = thumb(client, f"r{i:04d}")
        assert r.status_code == 404 and r.json()["broken"].startswith(why), (i, r.text)
    assert thumb(client, "no-such-id").json()["broken"] == "not a sample of this store"
    page = rows_of(client, {"where": "id IN ('r0105', 'r0000')"})
    remote = next(r for r in page["rows"] if r["id"] == "r0105")
    assert remote["remote"] and remote["thumb"].startswith("/api/thumb")       # never the URL by default
    app = client.app.state.clipsql
    assert app.thumbs.hits >= 0 and thumb(client, "r0000").status_code == 200   # served from the cache


def test_remote_images_only_when_asked(store):
    with starlette_testclient.TestClient(create_app(store, remote_images=True)) as c:
        page = rows_of(c, {"where": "id IN ('r0105', 'r0001')"})
        remote = next(r for r in page["rows"] if r["id"] == "r0105")
        assert remote["thumb"] == "https://images.example.invalid/105.jpg"
        r = thumb(c, "r0105")
        assert r.status_code == 307 and r.headers["location"] == remote["thumb"]
        assert "https:" in c.get("/").headers["content-security-policy"]
    with starlette_testclient.TestClient(create_app(store)) as c:
        csp = c.get("/").headers["content-security-policy"]
        assert "https:" not in csp and "connect-src 'self'" in csp and "img-src 'self' data:" in csp


def test_search_by_text_and_by_image_is_nearest(client, store):
    page = rows_of(client, {"search": {"text": "a red shape"}}, limit=10)
    want = sql_ids(store, "SELECT id FROM nearest(text_embedding('a red shape'), 10)")
    assert [r["id"] for r in page["rows"]] == want
    assert "nearest(text_embedding('a red shape'" in page["sql"]
    like = rows_of(client, {"search": {"like": "r0003"}}, limit=5)
    want = sql_ids(store, "SELECT id FROM nearest((SELECT image_embedding FROM embeddings WHERE id = 'r0003'), 5)")
    assert [r["id"] for r in like["rows"]] == want and want[0] == "r0003"
    r = client.post("/api/page", json={"state": {"search": {"text": "it's a 'quoted'); DROP TABLE x; --"}}})
    assert r.status_code == 200 and r.json()["total"] == min(serve_store.N, 200)     # a prompt is a value


def tagged(store, tag):
    return sql_ids(store, "SELECT id FROM samples JOIN tags USING (id) WHERE tag = ? ORDER BY id", [tag])


def test_tags_commit_through_the_ledger_and_read_back_in_sql(client, store):
    r = client.post("/api/tags", json={"action": "add", "tag": "reject", "ids": ["r0003", "r0001", "r0002"]})
    assert r.status_code == 200 and r.json()["added"] == 3 and r.json()["commit_id"]
    assert tagged(store, "reject") == ["r0001", "r0002", "r0003"]
    page = rows_of(client, {"tag": "reject"})
    assert [x["id"] for x in page["rows"]] == ["r0001", "r0002", "r0003"]
    assert all(x["tags"] == ["reject"] for x in page["rows"])
    assert client.post("/api/tags", json={"action": "remove", "tag": "reject", "ids": ["r0002"]}).json()["removed"] == 1
    assert tagged(store, "reject") == ["r0001", "r0003"]
    state = {"filters": [{"column": "rating", "op": "=", "value": 4}], "brushes": {"clip_score": [-1, 1]}}
    total = rows_of(client, state)["total"]
    r = client.post("/api/tags", json={"action": "add", "tag": "rating4", "all": True, "state": state}).json()
    assert r["added"] == total == len(tagged(store, "rating4")) > 0
    assert {t["tag"]: t["n"] for t in client.get("/api/tags").json()["tags"]}["rating4"] == total
    for bad in ({"action": "add", "tag": "", "ids": ["r0001"]}, {"action": "add", "tag": "x", "ids": ["nope"]},
                {"action": "zap", "tag": "x", "ids": []}, {"action": "add", "tag": "x", "ids": "r0001"}):
        r = client.post("/api/tags", json=bad)
        assert r.status_code == 400 and "\n" not in r.json()["error"]
    st = Store.open(store)
    with st.lock():                                      # an ingest holds the writer lock
        r = client.post("/api/tags", json={"action": "add", "tag": "busy", "ids": ["r0001"]})
    assert r.status_code == 409 and "try again" in r.json()["error"]
    assert tagged(store, "busy") == []


def test_a_tag_commit_is_seen_by_the_next_request_and_keeps_other_results(client, store):
    app = client.app.state.clipsql
    rows_of(client, {})
    k0 = app.snapshots.key()
    res0 = list(app.results._items.values())
    client.post("/api/tags", json={"action": "add", "tag": "snap", "ids": ["r0010"]})
    assert app.snapshots.key() != k0
    assert [x["id"] for x in rows_of(client, {"tag": "snap"})["rows"]] == ["r0010"]
    default = [r for r in app.results._items.values() if r.sql.startswith("SELECT sc.id")]
    assert default and all(any(r is x for x in res0) for r in default)   # the default view's columns were kept


def test_export_is_clipsql_select(client, store, tmp_path):
    state = {"brushes": {"clip_score": [-0.2, 0.3]}, "sort": {"column": "image_info_gain", "desc": True}}
    for fmt, ext in (("parquet", ".parquet"), ("csv", ".csv"), ("txt", ".txt")):
        r = client.post("/api/export", json={"state": state, "format": fmt})
        assert r.status_code == 200, r.text
        e = r.json()
        got = client.get(e["links"][0]).content
        side = json.loads(client.get(e["links"][1]).content)
        out = tmp_path / f"cli{ext}"
        cli("select", str(store), "--sql", e["sql"], "-o", str(out))
        if fmt == "parquet":
            assert pq.read_table(io.BytesIO(got)).equals(pq.read_table(out))
        else:
            assert got == out.read_bytes()
        cside = json.loads(Path(str(out) + ".json").read_text())
        # per-run identity: each run has its own run id, which a parquet output also carries in its
        # metadata (so its bytes, and their sha256, differ run to run; a csv's or txt's do not)
        for k in ("created_at", "seconds", "output", "sidecar", "run_id") + (("sha256",) if fmt == "parquet" else ()):
            side.pop(k, None)
            cside.pop(k, None)
        assert side == cside
        if fmt == "parquet":                                 # the grid's rows, in its order
            assert pq.read_table(io.BytesIO(got)).column("id").to_pylist() == \
                [x["id"] for x in rows_of(client, state)["rows"]]
    r = client.post("/api/export", json={"state": {}, "format": "datacomp-uids"})
    assert r.status_code == 400 and "uid" in r.json()["error"].lower()
    assert client.get("/api/export/zzz/selection.parquet").status_code == 404
    assert client.get("/api/export/..%2F..%2Fetc/passwd").status_code == 404


def test_detail_scores_percentiles_and_neighbours(client, store):
    d = client.get("/api/detail", params={"id": "r0007"}).json()
    assert d["sample"]["kind"] == "photo" and d["caption"].endswith("number 7")
    con = queries.connect(store)
    want = dict(zip([c[0] for c in con.execute("DESCRIBE scores").fetchall()],
                    con.execute("SELECT * FROM scores WHERE id = 'r0007'").fetchall()[0]))
    got = {s["column"]: s["value"] for s in d["scores"]}
    assert got["clip_score"] == pytest.approx(want["clip_score"]) and got["image_raw_norm"] == pytest.approx(
        want["image_raw_norm"])
    nb = sql_ids(store, "SELECT id FROM nearest((SELECT image_embedding FROM embeddings WHERE id = 'r0007'), 13)")
    assert [n["id"] for n in d["neighbours"]] == [x for x in nb if x != "r0007"][:12]
    p = client.post("/api/percentiles", json={"id": "r0007"}).json()
    x = np.array([r[0] for r in con.execute("SELECT image_raw_norm FROM scores").fetchall()], dtype=np.float64)
    v = p["percentiles"]["image_raw_norm"]["value"]
    assert p["percentiles"]["image_raw_norm"]["percentile"] == pytest.approx(
        100 * ((x < v).sum() + 0.5 * (x == v).sum()) / len(x))
    assert client.get("/api/detail", params={"id": "nope"}).status_code == 400


def test_detail_dedup_group_and_targets(tmp_path_factory, tiny_model):
    store = serve_store.build(tmp_path_factory.mktemp("app-dedup"), tiny_model, n=60)
    cli("dedup", str(store), "--clusters", "4")
    cli("target", "add", str(store), "first10", "--query",
        "SELECT image_embedding FROM embeddings ORDER BY id LIMIT 10")
    with starlette_testclient.TestClient(create_app(store)) as c:
        assert c.get("/api/info").json()["dedup"] is True
        d = c.get("/api/detail", params={"id": "r0012"}).json()
        con = queries.connect(store)
        cluster = con.execute("SELECT semdedup_cluster FROM semdedup WHERE id = 'r0012'").fetchall()[0][0]
        same = {r[0] for r in con.execute("SELECT id FROM semdedup WHERE semdedup_cluster = ?", [cluster]).fetchall()}
        assert d["dedup"]["cluster"] == cluster and d["dedup"]["size"] == len(same)
        members = [m["id"] for m in d["dedup"]["members"]]
        assert members and set(members) <= same - {"r0012"}
        cos = [m["cosine"] for m in d["dedup"]["members"]]
        assert cos == sorted(cos, reverse=True)
        want = con.execute("SELECT norm_sim_inf(image_embedding, 'first10') FROM embeddings WHERE id = 'r0012'"
                           ).fetchall()[0][0]
        assert d["targets"] == [{"target": "first10", "norm_sim_inf": pytest.approx(want)}]


class CheckAuth:
    def check(self, token):
        return token == "a-long-secret-token"


class HeaderAuth:
    """The shape of serve.auth.Auth: authenticate(Authorization header) → (who, issued token) or raises."""
    allow_anonymous = False

    def authenticate(self, header):
        import base64
        if header == "Bearer a-long-secret-token" or header == "Bearer session-1":
            return object(), None
        if header and header.startswith("Basic ") and base64.b64decode(header[6:]) == b"ann:a-long-secret-token":
            return object(), "session-1"
        raise PermissionError("no")


@pytest.mark.parametrize("auth", [CheckAuth(), HeaderAuth()], ids=["check", "authenticate"])
def test_auth(store, auth):
    with starlette_testclient.TestClient(create_app(store, auth=auth)) as c:
        assert c.get("/api/info").status_code == 401
        r = c.get("/", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert c.get("/login").status_code == 200 and c.get("/static/app.js").status_code == 200
        assert c.get("/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer a-long-secret-token"}).status_code == 200
        r = c.get("/?token=a-long-secret-token", follow_redirects=False)     # a link with the token, once
        assert r.status_code == 303 and r.headers["location"] == "/" and "clipsql_token" in r.headers["set-cookie"]
        assert "httponly" in r.headers["set-cookie"].lower()
        assert c.get("/api/info").status_code == 200                        # the cookie from then on
        c.cookies.clear()
        assert c.post("/login", data={"secret": "nope"}).status_code == 401
        user = "ann" if isinstance(auth, HeaderAuth) else ""
        r = c.post("/login", data={"user": user, "secret": "a-long-secret-token"}, follow_redirects=False)
        assert r.status_code == 303
        assert c.get("/api/info").status_code == 200
        c.get("/logout")
        c.cookies.clear()
        assert c.get("/api/info").status_code == 401


def test_writes_from_another_sites_page_are_refused(client, store):
    """A page elsewhere cannot make the curator's browser tag or export: no JSON, or another Origin → refused."""
    body = json.dumps({"action": "add", "tag": "csrf", "ids": ["r0001"]})
    r = client.post("/api/tags", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = client.post("/api/tags", content=body, headers={"content-type": "application/json",
                                                         "origin": "https://evil.example"})
    assert r.status_code == 403
    assert tagged(store, "csrf") == []
    r = client.post("/api/tags", content=body, headers={"content-type": "application/json",
                                                         "origin": "http://testserver"})
    assert r.status_code == 200 and tagged(store, "csrf") == ["r0001"]


def test_static_files_name_no_other_host():
    static = Path(__file__).resolve().parents[1] / "serve" / "static"
    names = sorted(p.name for p in static.iterdir())
    assert names == ["app.css", "app.js", "index.html"]
    for p in static.iterdir():
        text = p.read_text()
        urls = re.findall(r"""(?:https?:)?//[A-Za-z0-9.-]+""", text)
        assert set(urls) <= {"http://www.w3.org"}, (p.name, urls)      # the SVG namespace name, never fetched
        assert "@import" not in text and "url(http" not in text
