"""`clipsql gallery`: the HTML page, its thumbnails and broken tiles, and what a person sees
in a headless browser (every image decoded; blank and placeholder images at the low end)."""
from __future__ import annotations

import io
import re
import tarfile

import duckdb
import numpy as np
import pytest
from PIL import Image

from clipsql.queries.present.gallery import LAZY_AFTER, write_gallery
from clipsql.errors import QueryError

from _small_demo import small_demo_store
from browser import image_check, screenshot


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    return small_demo_store(tmp_path_factory)


def _png(path, color=(200, 30, 30), size=(20, 12), mode="RGB"):
    im = Image.new(mode, size, color if mode == "RGB" else color + (128,))
    im.save(path)
    return str(path)


@pytest.fixture()
def hand_con(tmp_path):
    """A DuckDB connection with a hand-made `samples` view: good, odd and broken images."""
    good = _png(tmp_path / "good.png")
    rgba = _png(tmp_path / "alpha.png", (0, 90, 200), mode="RGBA")
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)).save(photo)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tf:
        data = (tmp_path / "good.png").read_bytes()
        info = tarfile.TarInfo("000001.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    rows = [("a-good", good, "a red square"),
            ("b-alpha", rgba, "translucent <b>blue</b>"),
            ("c-photo", str(photo), "noise photo"),
            ("d-tar", f"{shard}::000001.png", "from a tar shard"),
            ("e-missing", str(tmp_path / "nope.png"), "missing"),
            ("f-corrupt", str(tmp_path / "corrupt.png"), "corrupt"),
            ("g-null", None, "<script>alert('x')</script> & co"),
            ("h-dir", str(tmp_path), "a directory"),
            ("i-tar-missing", f"{shard}::nope.png", None)]
    con = duckdb.connect()
    con.execute("CREATE TABLE samples (id VARCHAR, uri VARCHAR, caption VARCHAR)")
    con.executemany("INSERT INTO samples VALUES (?, ?, ?)", rows)
    scores = {"a-good": 0.5, "b-alpha": 0.1, "c-photo": 0.9, "d-tar": 0.1, "e-missing": None,
              "f-corrupt": float("nan"), "g-null": 0.3, "h-dir": 0.7, "i-tar-missing": 0.2}
    con.execute("CREATE TABLE t (id VARCHAR, score DOUBLE, note VARCHAR)")
    con.executemany("INSERT INTO t VALUES (?, ?, ?)", [(k, v, f"<i>{k}</i>") for k, v in scores.items()])
    yield con
    con.close()


def test_broken_tiles_escaping_and_join(hand_con, tmp_path):
    res = write_gallery(None, "SELECT id, score, note FROM t ORDER BY id", tmp_path / "g.html", con=hand_con,
                        thumb=32)
    page = (tmp_path / "g.html").read_text()
    assert res.shown == 9 and res.broken == 5
    assert page.count("<img ") == 4 and page.count('class="tile broken"') == 5
    for why in ("missing file", "cannot decode", "uri is NULL", "unreadable"):
        assert why in page
    # every caption and value escaped; uri/caption joined from samples
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in page
    assert "<i>a-good</i>" not in page and "&lt;i&gt;a-good&lt;/i&gt;" in page
    assert "translucent &lt;b&gt;blue&lt;/b&gt;" in page and "<i>no caption</i>" in page
    # self-contained: thumbnails are data URIs, small images as PNG, the photo as JPEG shrunk to 32 px
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert all(s.startswith("data:image/") for s in srcs)
    assert sum(s.startswith("data:image/jpeg") for s in srcs) == 1
    jpeg = Image.open(io.BytesIO(__import__("base64").b64decode(
        next(s for s in srcs if s.startswith("data:image/jpeg")).split(",", 1)[1])))
    assert max(jpeg.size) == 32
    assert "http://" not in page and "https://" not in page


def _web_con(tmp_path):
    con = duckdb.connect()
    con.execute("CREATE TABLE samples (id VARCHAR, uri VARCHAR, caption VARCHAR)")
    con.executemany("INSERT INTO samples VALUES (?, ?, ?)", [
        ("a-local", _png(tmp_path / "local.png"), "a local file"),
        ("b-web", "https://img.example.com/0/1.jpg", "a DataComp url"),
        ("c-web", 'http://img.example.com/q.jpg?a=1&b="2"', "a LAION url with a query"),
    ])
    return con


def test_web_images_show_by_url_and_local_files_stay_embedded(tmp_path):
    con = _web_con(tmp_path)
    res = write_gallery(None, "SELECT id FROM samples ORDER BY id", tmp_path / "w.html", con=con)
    page = (tmp_path / "w.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs[0].startswith("data:image/png;base64,")
    assert srcs[1:] == ["https://img.example.com/0/1.jpg", "http://img.example.com/q.jpg?a=1&amp;b=&quot;2&quot;"]
    assert res.broken == 0 and res.remote == 2 and res.offline == 0
    assert 'id="remote-note"' in page and "your browser fetches them" in page
    assert "img-src data: http: https:" in page and page.count("referrerpolicy=no-referrer") == 2
    # a uri the store's samples do not hold is never shown, web or not
    res = write_gallery(None, "SELECT id, 'https://evil.example/x.png' AS uri FROM samples", tmp_path / "f.html",
                        con=con)
    foreign = (tmp_path / "f.html").read_text()
    assert res.remote == 0 and not any("evil" in src for src in re.findall(r'src="([^"]+)"', foreign))
    assert "not an image of this store" in foreign


def test_no_remote_images_makes_a_page_that_contacts_no_other_host(tmp_path):
    con = _web_con(tmp_path)
    res = write_gallery(None, "SELECT id FROM samples ORDER BY id", tmp_path / "o.html", con=con,
                        remote_images=False)
    page = (tmp_path / "o.html").read_text()
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) == 1 and srcs[0].startswith("data:image/png")
    assert res.remote == 0 and res.offline == 2 and res.broken == 0
    assert page.count("web image not loaded (--no-remote-images)") == 2
    assert "img-src data:;" in page and "http: https:" not in page
    assert "contacts no other host" in page


def test_top_bottom_ranks_nulls_and_ties(hand_con, tmp_path):
    res = write_gallery(None, "SELECT id, score FROM t", tmp_path / "tb.html", con=hand_con,
                        top_bottom=("score", 3))
    page = (tmp_path / "tb.html").read_text()
    low, high = page.split("<h2>Highest")
    ids = lambda part: re.findall(r'title="id ([\w-]+)', part)  # noqa: E731
    # 0.1 tie broken by id; NULL and NaN left out
    assert ids(low) == ["b-alpha", "d-tar", "i-tar-missing"]
    assert ids(high) == ["c-photo", "h-dir", "a-good"]
    assert res.nulls == 2 and "2 with NULL score left out" in page
    with pytest.raises(QueryError, match="not in the SQL result"):
        write_gallery(None, "SELECT id FROM t", tmp_path / "x.html", con=hand_con, top_bottom=("score", 3))
    with pytest.raises(QueryError, match="`id` column"):
        write_gallery(None, "SELECT score FROM t", tmp_path / "x.html", con=hand_con)
    with pytest.raises(QueryError):
        write_gallery(None, "SELECT nope FROM t", tmp_path / "x.html", con=hand_con)


def test_limit_and_lazy_loading(tmp_path):
    con = duckdb.connect()
    _png(tmp_path / "one.png")
    con.execute(f"CREATE TABLE samples AS SELECT 'r' || lpad(i::VARCHAR, 4, '0') AS id, "
                f"'{tmp_path / 'one.png'}' AS uri, 'c ' || i AS caption FROM range({LAZY_AFTER + 50}) r(i)")
    res = write_gallery(None, "SELECT id, uri, caption FROM samples ORDER BY id", tmp_path / "l.html", con=con,
                        limit=10)
    assert res.shown == 10 and res.cut and "the first 10" in (tmp_path / "l.html").read_text()
    res = write_gallery(None, "SELECT id FROM samples ORDER BY id", tmp_path / "all.html", con=con)
    page = (tmp_path / "all.html").read_text()
    assert res.shown == LAZY_AFTER + 50 and res.lazy and page.count("loading=lazy") == LAZY_AFTER + 50


@pytest.mark.browser
def test_demo_gallery_low_end_and_browser(demo_store, tmp_path):
    """The demo's gallery of lowest/highest image Information Gain: blank and placeholder
    images fill the low end; in Chromium every image decodes; a screenshot is saved."""
    from clipsql import queries
    sql = ("SELECT id, kind, round(image_info_gain, 5) AS image_info_gain "
           "FROM scores JOIN samples USING (id)")
    out = tmp_path / "demo-gallery.html"
    res = write_gallery(demo_store, sql, out, top_bottom=("image_info_gain", 12), thumb=96)
    assert res.shown == 24 and res.broken == 0
    page = out.read_text()
    low, high = page.split("<h2>Highest")
    low_kinds = re.findall(r'<td class="k"[^>]*>kind</td><td class="v" title="(\w+)"', low)
    high_kinds = re.findall(r'<td class="k"[^>]*>kind</td><td class="v" title="(\w+)"', high)
    assert len(low_kinds) == len(high_kinds) == 12
    assert sum(k in ("blank", "placeholder") for k in low_kinds) >= 10, low_kinds
    assert not any(k in ("blank", "placeholder") for k in high_kinds), high_kinds
    con = queries.connect(demo_store)
    want = [r[0] for r in con.sql("SELECT id FROM scores ORDER BY round(image_info_gain, 5), id LIMIT 12").fetchall()]
    con.close()
    assert re.findall(r'title="id (\w+)', low) == want

    check = image_check(out)
    assert check == {"decoded": 24, "total": 24, "pending": 0}
    shot = screenshot(out, tmp_path / "demo-gallery.png")
    with Image.open(shot) as im:
        assert im.size == (1400, 1000)
        # not a blank page: many distinct colours (thumbnails rendered)
        assert len(im.convert("RGB").getcolors(1 << 20) or []) > 50


@pytest.mark.browser
def test_broken_tiles_in_browser(hand_con, tmp_path):
    out = tmp_path / "broken.html"
    write_gallery(None, "SELECT id, score FROM t", out, con=hand_con)
    assert image_check(out) == {"decoded": 4, "total": 4, "pending": 0}


def test_tile_values_never_wrap_and_long_names_are_shortened_with_the_full_name_on_hover(tmp_path):
    con = duckdb.connect()
    con.execute("CREATE TABLE samples (id VARCHAR, uri VARCHAR, caption VARCHAR)")
    con.execute("INSERT INTO samples VALUES ('a', ?, 'a red square')", [_png(tmp_path / "a.png")])
    write_gallery(None, "SELECT id, 0.7748 AS clip_l14_similarity_score, 3 AS k FROM samples",
                  tmp_path / "t.html", con=con)
    page = (tmp_path / "t.html").read_text()
    assert '<td class="k" title="clip_l14_similarity_score">clip_l1…_score</td>' in page
    assert '<td class="k" title="k">k</td>' in page
    assert '<td class="v" title="0.7748">0.7748</td>' in page
    assert "<wbr>" not in page and "td.v{text-align:right;white-space:nowrap}" in page


def _encoded(im, fmt):
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("name,image,fmt", [
    ("16-bit grey", Image.fromarray(np.tile(np.linspace(0, 65535, 40), (30, 1)).astype(np.uint16)), "PNG"),
    ("16-bit mid grey", Image.fromarray(np.full((30, 40), 32896, np.uint16)), "PNG"),
    ("float in [0, 1]", Image.fromarray(np.tile(np.linspace(0, 1, 40, dtype=np.float32), (30, 1))), "TIFF"),
    ("float of any range", Image.fromarray(np.tile(np.linspace(-5, 900, 40, dtype=np.float32), (30, 1))), "TIFF"),
])
def test_high_depth_thumbnails_are_scaled_as_ingest_scales_them(name, image, fmt):
    from clipsql.ingest.images import load_image
    from clipsql.queries.present.gallery import thumbnail_bytes
    data = _encoded(image, fmt)
    body, mime = thumbnail_bytes(data, 64)
    thumb = np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(int)
    seen = np.asarray(load_image(data)).astype(int)       # what ingest encoded
    assert mime == "image/png" and thumb.shape == seen.shape     # small: not resized, ≤ 256 colours
    assert np.array_equal(thumb, seen), name
    assert thumb.max() - thumb.min() > 200 or 120 <= thumb.mean() <= 136      # neither blank nor black
