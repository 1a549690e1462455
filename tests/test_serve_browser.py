"""The curation app in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright's Python
package), as a curator uses it: load the demo store, brush a histogram, sort, search by a prompt, tag tiles
with the mouse and the keyboard, open a tile's details, export — each checked against the SQL or the
command it stands for — and broken tiles with their reasons. Every request the page makes must go to the
server (unless remote images are switched on). Screenshots of each step go to $CLIPSQL_ARTIFACTS/serve-app
(or the test's tmp_path); the test prints where."""
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clipsql import queries
from clipsql.serve.app import create_app

import serve_store
from browser import INSTALL, chromium
from conftest import cli

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def playwright_chromium():
    """(sync_playwright, the Chromium executable), or a skip saying how to get them (a failure in CI)."""
    exe = chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        msg = "Playwright's Python package is missing: pip install -e '.[test]' (it drives the system Chromium; " \
              f"no `playwright install` needed; Chromium: {INSTALL})"
        if os.environ.get("CLIPSQL_REQUIRE_BROWSER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return sync_playwright, exe


@pytest.fixture
def artifacts(tmp_path):
    root = os.environ.get("CLIPSQL_ARTIFACTS")
    folder = Path(root) / "serve-app" if root else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots of the curation app: {folder}")
    return folder


class Server:
    """uvicorn serving create_app(store, …) on a free loopback port, in a thread."""

    def __init__(self, store, **kw):
        import uvicorn
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(store, **kw), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the app server did not start"
            time.sleep(0.02)
        self.base = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


class Page:
    """A Chromium page on the app that records every request and page error."""

    def __init__(self, browser, base):
        self.base = base
        self.page = browser.new_page(viewport={"width": 1500, "height": 950}, accept_downloads=True)
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(base + "/")
        self.page.wait_for_selector("body[data-ready='1']", timeout=120_000)

    def gen(self) -> int:
        return int(self.page.evaluate("Number(document.body.dataset.gen || 0)"))

    def after(self, action, timeout=120_000):
        """Run `action` (which changes the view) and wait until the grid shows the new state."""
        g = self.gen()
        action()
        self.page.wait_for_function("g => Number(document.body.dataset.gen || 0) > g", arg=g, timeout=timeout)
        self.images_loaded()

    def tile_ids(self) -> list[str]:
        return self.page.eval_on_selector_all(
            ".tile[data-id]", "els => els.sort((a, b) => a.dataset.index - b.dataset.index).map(e => e.dataset.id)")

    def total(self) -> int:
        return int(self.page.get_attribute("#total", "data-total"))

    def sql(self) -> str:
        return self.page.inner_text("#sql")

    def images_loaded(self):
        self.page.wait_for_function(
            "() => [...document.querySelectorAll('.tile[data-id] img')].every(i => i.complete)", timeout=60_000)

    def shot(self, folder, name):
        path = folder / name
        self.page.screenshot(path=str(path))
        return path

    def outside(self) -> list[str]:
        return [u for u in self.requests if not (u.startswith(self.base + "/") or u.startswith("data:"))]


def run_sql(store, sql, params=None):
    con = queries.connect(store)
    try:
        return [r[0] for r in con.execute(f"SELECT id FROM ({sql}) AS x", params or []).fetchall()]
    finally:
        con.close()


@pytest.fixture
def demo_copy(tmp_path_factory, tmp_path):
    from _small_demo import small_demo_store
    src = small_demo_store(tmp_path_factory)
    dst = tmp_path / "demo-store"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("sources", "*.html"))   # images stay where uris say
    return dst


def test_curation_app_in_chromium(playwright_chromium, demo_copy, artifacts, tmp_path):
    sync_playwright, exe = playwright_chromium
    store = demo_copy
    with Server(store) as srv, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--disable-background-networking"])
        app = Page(browser, srv.base)
        pg = app.page
        pg.wait_for_selector('.hist[data-column="image_info_gain"] rect.all', timeout=120_000)
        pg.locator('.hist[data-column="clip_score"]').scroll_into_view_if_needed()    # histograms load when seen
        pg.wait_for_selector('.hist[data-column="clip_score"] rect.all', timeout=120_000)
        app.images_loaded()
        assert app.total() == 300
        decoded = pg.evaluate("[...document.querySelectorAll('.tile[data-id] img')].filter(i => i.naturalWidth > 0)"
                              ".length")
        assert decoded == len(app.tile_ids()) > 0                   # every visible thumbnail decoded
        app.shot(artifacts, "01-load.png")

        # brush the clip_score histogram: the grid narrows to the rows of the SQL it shows
        box = pg.locator('.hist[data-column="clip_score"] svg').bounding_box()
        y = box["y"] + box["height"] / 2
        app.after(lambda: (pg.mouse.move(box["x"] + 0.55 * box["width"], y), pg.mouse.down(),
                           pg.mouse.move(box["x"] + 0.75 * box["width"], y, steps=5),
                           pg.mouse.move(box["x"] + 0.95 * box["width"], y, steps=5), pg.mouse.up()))
        sql = app.sql()
        assert '"clip_score" BETWEEN' in sql
        want = run_sql(store, sql)
        assert 0 < app.total() == len(want) < 300
        assert set(app.tile_ids()) <= set(want)
        app.after(lambda: pg.select_option("#sort-column", "clip_score"))
        want = run_sql(store, app.sql())
        shown = app.tile_ids()
        assert "ORDER BY \"clip_score\" DESC" in app.sql() and shown == want[:len(shown)] and len(shown) >= 6
        pg.wait_for_selector('.hist[data-column="clip_score"] rect.brush')
        app.shot(artifacts, "02-brushed-sorted.png")

        # a text prompt: the first tiles are nearest's
        app.after(lambda: (pg.fill("#search", "a red circle"), pg.press("#search", "Enter")))
        want = run_sql(store, "SELECT id FROM nearest(text_embedding('a red circle'), 12)")
        assert app.tile_ids()[:12] == want
        app.shot(artifacts, "03-search.png")
        app.after(lambda: pg.click("#search-clear"))
        app.after(lambda: pg.click("#filters-clear"))
        assert app.total() == 300

        # tag three tiles: click, shift-click, then t → type → Enter
        ids = app.tile_ids()
        pg.click(f'.tile[data-id="{ids[0]}"]')
        pg.click(f'.tile[data-id="{ids[2]}"]', modifiers=["Shift"])
        assert pg.inner_text("#sel-info") == "3 selected"
        pg.keyboard.press("t")
        pg.keyboard.type("reject")
        app.after(lambda: pg.keyboard.press("Enter"))
        assert run_sql(store, "SELECT id FROM samples JOIN tags USING (id) WHERE tag = 'reject' ORDER BY id") == \
            sorted(ids[:3])
        pg.wait_for_selector(f'.tile[data-id="{ids[1]}"] .tags .chip')
        # the keyboard alone: arrows move, space selects, t tags
        pg.click(f'.tile[data-id="{ids[0]}"]')
        pg.click("#select-none")
        pg.focus("#grid")
        for _ in range(4):
            pg.keyboard.press("ArrowRight")
        pg.keyboard.press(" ")
        pg.keyboard.press("t")
        pg.fill("#tag-name", "keep")
        app.after(lambda: pg.keyboard.press("Enter"))
        assert run_sql(store, "SELECT id FROM tags WHERE tag = 'keep'") == [ids[4]]
        app.shot(artifacts, "04-tagged.png")

        # the details of a tile: scores with percentiles, neighbours
        pg.dblclick(f'.tile[data-id="{ids[1]}"]')
        pg.wait_for_function("() => { const c = document.querySelector('#detail-scores tr[data-col=\"clip_score\"] "
                             ".pct'); return !!c && c.textContent.endsWith('%'); }", timeout=60_000)
        pg.wait_for_function("() => [...document.querySelectorAll('#detail img')].every(i => i.complete)")
        nb = run_sql(store, "SELECT id FROM nearest((SELECT image_embedding FROM embeddings WHERE id = ?), 13)", [ids[1]])
        shown_nb = pg.eval_on_selector_all("#detail .strip .mini", "els => els.map(e => e.title.split('\\n')[0])")
        assert shown_nb == [x for x in nb if x != ids[1]][:12]
        app.shot(artifacts, "05-detail.png")
        pg.click("#detail-close")

        # export the tagged rows: the same file as `clipsql select --sql`
        app.after(lambda: pg.select_option("#tag-filter", "reject"))
        assert sorted(app.tile_ids()) == sorted(ids[:3])
        pg.select_option("#export-format", "parquet")
        with pg.expect_response(lambda r: r.url.endswith("/api/export")) as resp:
            pg.click("#export")
        export = resp.value.json()
        pg.wait_for_selector("#export-links a")
        with pg.expect_download() as dl:
            pg.click("#export-links a >> nth=0")
        got = tmp_path / "app.parquet"
        dl.value.save_as(got)
        out = tmp_path / "cli.parquet"
        cli("select", str(store), "--sql", export["sql"], "-o", str(out))
        assert pq.read_table(got).equals(pq.read_table(out))
        assert sorted(pq.read_table(got).column("id").to_pylist()) == sorted(ids[:3])
        app.shot(artifacts, "06-export.png")

        assert app.errors == []
        assert app.outside() == [], app.outside()          # nothing but the server, ever
        browser.close()


def test_broken_tiles_say_why_and_remote_images_are_opt_in(playwright_chromium, tmp_path_factory, tiny_model,
                                                           artifacts):
    sync_playwright, exe = playwright_chromium
    store = serve_store.build(tmp_path_factory.mktemp("browser-app"), tiny_model)
    state = "id >= 'r0098'"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--disable-background-networking"])
        with Server(store) as srv:
            app = Page(browser, srv.base)
            pg = app.page
            app.after(lambda: (pg.fill("#where", state), pg.click("#where-apply")))
            why = {"r0100": "missing file", "r0105": "remote image (start with --remote-images to show)",
                   "r0115": "cannot decode", "r0117": "no image (uri is NULL)"}
            for rid, reason in why.items():
                pg.wait_for_selector(f'.tile[data-id="{rid}"].broken .why', timeout=30_000)
                assert pg.inner_text(f'.tile[data-id="{rid}"] .why').startswith("broken image: " + reason)
            for rid in ("r0098", "r0110"):                             # a file and a tar member decode
                assert pg.evaluate(f"document.querySelector('.tile[data-id=\"{rid}\"] img').naturalWidth") > 0
            app.shot(artifacts, "07-broken-tiles.png")
            assert app.errors == [] and app.outside() == []
            pg.close()
        with Server(store, remote_images=True) as srv:
            app = Page(browser, srv.base)
            pg = app.page
            assert "loaded by your browser directly from their hosts" in pg.inner_text("#banner")
            app.after(lambda: (pg.fill("#where", "id = 'r0105'"), pg.click("#where-apply")))
            pg.wait_for_selector('.tile[data-id="r0105"].broken .why', timeout=30_000)    # offline: not reachable
            assert "your browser could not load it" in pg.inner_text('.tile[data-id="r0105"] .why')
            assert app.outside() == ["https://images.example.invalid/105.jpg"]          # asked of its own host
            pg.close()
        browser.close()
