"""`clipsql gallery`: one self-contained HTML page of thumbnails for any SQL result.

    write_gallery("store", "SELECT id, image_info_gain FROM scores", "g.html",
                  top_bottom=("image_info_gain", 24))

The SQL must return an ``id`` column; ``uri`` and ``caption`` are taken from the
result when present, else joined from ``samples`` by id. Every other column is
shown under its image. Thumbnails are read by ``uri`` (a local path, or
``/abs/shard.tar::member`` for webdataset samples), shrunk with PIL to ``thumb``
pixels and embedded as base64 data URIs (PNG when the thumbnail has ≤ 256
colours, else JPEG). Images of URL-based pools (DataComp, LAION: ``http(s)://``
uris) are never fetched here: the page shows them by URL, so the curator's own
browser loads them from their hosts when it opens the page (the page says so);
``remote_images=False`` (``--no-remote-images``) writes a page that contacts no
other host (its Content-Security-Policy allows only embedded images), with those
tiles marked. A missing or unreadable image becomes a labelled broken tile.
Every caption and value goes through ``html.escape``.

``top_bottom=(COLUMN, N)`` shows the N lowest and N highest rows by COLUMN side
by side (NULLs left out; ties broken by id). Pages with more than
``LAZY_AFTER`` images mark them ``loading="lazy"``; a plain CSS grid keeps a
few thousand tiles responsive.

An inline script writes, on window load, how many ``<img>`` decoded
(``naturalWidth > 0``) into ``<div id="image-check" data-decoded data-total
data-pending>`` (``data-pending``: lazy images not loaded yet), which the
headless-browser test reads.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.compute as pc

from clipsql.errors import QueryError
from clipsql.ingest.images import to_rgb
from clipsql.lazy import PIL_Image as Image, PIL_ImageOps as ImageOps, duckdb
from clipsql.queries.sql.db import connect
from clipsql.queries.sql.functions import blas_pinned, udf_error

LAZY_AFTER = 200
DEFAULT_LIMIT = 1000

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:16px;background:#fafafa;color:#222}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:8px 0}
.meta{color:#555;font-size:13px;margin-bottom:10px}
details{margin-bottom:10px;font-size:13px}pre{white-space:pre-wrap;background:#f0f0f0;padding:6px;margin:4px 0}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:16px;align-items:start}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(var(--tile),1fr));gap:8px}
.tile{background:#fff;border:1px solid #ddd;border-radius:4px;padding:4px;margin:0;overflow:hidden;
      font-size:11px;line-height:1.3}
.tile img{display:block;width:var(--thumb);height:var(--thumb);object-fit:contain;margin:0 auto;
          image-rendering:pixelated;background:#eee;outline:1px solid #bbb}
.broken .ph{width:var(--thumb);height:var(--thumb);margin:0 auto;display:flex;align-items:center;
            justify-content:center;text-align:center;
            background:repeating-linear-gradient(45deg,#fdd,#fdd 6px,#fee 6px,#fee 12px);
            color:#900;font-weight:600;font-size:11px;word-break:break-all;overflow:hidden}
.cap{margin:3px 0;word-break:break-word}
.note{background:#fff8e1;border:1px solid #f0d98a;padding:4px 8px;font-size:12px;margin-bottom:10px}
.rank{font-weight:700;color:#333}
table.kv{border-collapse:collapse;width:100%}table.kv td{padding:0 2px;vertical-align:top}
table.kv td.k{color:#777;word-break:break-all}table.kv td.v{text-align:right;white-space:nowrap}
#image-check{color:#777;font-size:12px;margin-top:12px}
"""

GALLERY_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img'), ok = 0, pending = 0;
  for (var i = 0; i < imgs.length; i++) {
    var im = imgs[i];
    if (im.complete && im.naturalWidth > 0) ok++;
    else if (im.loading === 'lazy' && !im.complete) pending++;
  }
  var el = document.getElementById('image-check');
  el.setAttribute('data-decoded', ok); el.setAttribute('data-total', imgs.length);
  el.setAttribute('data-pending', pending);
  el.textContent = ok + ' of ' + imgs.length + ' images decoded'
    + (pending ? ' (' + pending + ' lazy, not yet loaded)' : '');
});
"""


# --------------------------------------------------------------------------- images
class ImageReader:
    """Reads image bytes by uri: a local path or ``shard.tar::member`` (tar index cached)."""

    def __init__(self, max_open: int = 8):
        self._tars: dict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}
        self.max_open = max_open

    def read(self, uri: str) -> bytes:
        if "::" in uri:
            shard, member = uri.split("::", 1)
            tf, index = self._tar(shard)
            info = index.get(member)
            if info is None:
                raise FileNotFoundError(f"no member {member!r} in {shard}")
            f = tf.extractfile(info)
            if f is None:
                raise OSError(f"{member!r} in {shard} is not a file")
            return f.read()
        if uri.lower().startswith("file://"):
            uri = unquote(urlparse(uri).path)
        with open(uri, "rb") as f:
            return f.read()

    def _tar(self, shard: str) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
        if shard not in self._tars:
            if len(self._tars) >= self.max_open:
                old = next(iter(self._tars))
                self._tars.pop(old)[0].close()
            tf = tarfile.open(shard, "r:*")
            index: dict[str, tarfile.TarInfo] = {}
            try:
                for m in tf:          # a damaged shard still serves the members before the damage
                    if m.isfile():
                        index[m.name] = m
            except (tarfile.TarError, EOFError, OSError, zlib.error):
                pass
            self._tars[shard] = (tf, index)
        return self._tars[shard]

    def close(self) -> None:
        for tf, _ in self._tars.values():
            tf.close()
        self._tars.clear()


def thumbnail_bytes(data: bytes, thumb: int) -> tuple[bytes, str]:
    """(encoded thumbnail, MIME type): PIL-decoded, converted to RGB exactly as ingest converts it
    (ingest.images.to_rgb), shrunk to fit ``thumb``×``thumb`` (never
    enlarged: CSS scales small images up, pixelated), PNG if ≤ 256 colours, else JPEG quality 85."""
    with Image.open(io.BytesIO(data)) as im:
        im.seek(0)
        if im.format == "JPEG":
            im.draft("RGB", (thumb, thumb))  # decode at a reduced scale: fast for large photos
        im = ImageOps.exif_transpose(im)
        im = to_rgb(im)     # as ingest sees it: 16-bit and float images scaled, transparency on white
        if max(im.size) > thumb:
            im.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        if im.getcolors(256) is not None:
            im.save(buf, "PNG", optimize=True)
            mime = "image/png"
        else:
            im.save(buf, "JPEG", quality=85)
            mime = "image/jpeg"
    return buf.getvalue(), mime


def thumbnail_data_uri(data: bytes, thumb: int) -> str:
    """`thumbnail_bytes` as a ``data:`` URI."""
    body, mime = thumbnail_bytes(data, thumb)
    return f"data:{mime};base64," + base64.b64encode(body).decode("ascii")


def read_image(reader: ImageReader, uri: str | None) -> tuple[bytes | None, str | None]:
    """(the image's bytes, None) or (None, why the tile is broken)."""
    if uri is None or uri == "":
        return None, "no image (uri is NULL)"
    try:
        return reader.read(uri), None
    except FileNotFoundError:
        return None, "missing file"
    except OSError as e:
        return None, f"unreadable: {e.strerror or type(e).__name__}"
    except (tarfile.TarError, EOFError, zlib.error) as e:     # a truncated or damaged shard
        return None, f"unreadable shard: {type(e).__name__}"


def load_thumbnail(reader: ImageReader, uri: str | None, thumb: int) -> tuple[str | None, str | None]:
    """(data URI, None) or (None, why the tile is broken)."""
    data, why = read_image(reader, uri)
    if data is None:
        return None, why
    try:
        return thumbnail_data_uri(data, thumb), None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a broken tile, never a crash
        return None, f"cannot decode: {type(e).__name__}"


FOREIGN = "not an image of this store (--allow-external-access shows other files)"
OFFLINE = "web image not loaded (--no-remote-images)"
_WEB = ("http://", "https://")


def is_web_uri(uri: str | None) -> bool:
    """An image that lives on a web host (DataComp, LAION urls): shown by URL, never read here."""
    return bool(uri) and uri.lower().startswith(_WEB)


def _store_uris(con: Any, uris: list[str | None]) -> set[str]:
    """The given uris that some sample of the store holds (a parameterized query on `samples`)."""
    want = sorted({u for u in uris if u})
    if not want:
        return set()
    rows = con.execute("SELECT DISTINCT uri FROM samples WHERE list_contains(?, uri)", [want]).fetchall()
    return {r[0] for r in rows}


# --------------------------------------------------------------------------- data
def _fetch(con: Any, sql: str, limit: int | None) -> tuple[Any, bool]:
    """The SQL result as an Arrow table (at most ``limit`` rows) and whether rows were cut."""
    try:
        rel = con.sql(sql)
        if rel is None:
            raise QueryError("the gallery SQL must be a query returning rows (with an id column)")
        if limit is not None:
            rel = rel.limit(limit + 1)
        tbl = rel.arrow()
        if hasattr(tbl, "read_all"):
            tbl = tbl.read_all()
    except duckdb.Error as e:
        raise udf_error(e, con) or QueryError(str(e)) from None
    if "id" not in tbl.column_names:
        raise QueryError(f"the gallery SQL must return an `id` column (got {', '.join(tbl.column_names)}); "
                         "e.g. SELECT id, image_info_gain FROM scores")
    cut = limit is not None and tbl.num_rows > limit
    return (tbl.slice(0, limit) if cut else tbl), cut


def _with_samples(con: Any, tbl: Any) -> list[dict]:
    """Rows as dicts; ``uri``/``caption`` joined from ``samples`` when the SQL lacks them."""
    rows = tbl.to_pylist()
    need = [c for c in ("uri", "caption") if c not in tbl.column_names]
    if need and rows:
        con.register("_gallery_ids", pa.table({"id": tbl.column("id").cast(pa.string())}))
        try:
            found = con.sql(f"SELECT s.id, {', '.join('s.' + c for c in need)} FROM samples s "
                            "SEMI JOIN _gallery_ids g ON s.id = g.id").fetchall()
        except duckdb.Error as e:
            raise QueryError(f"cannot join {' and '.join(need)} from samples ({e}); "
                             "return them from the SQL instead") from None
        finally:
            con.unregister("_gallery_ids")
        lookup = {r[0]: r[1:] for r in found}
        for r in rows:
            extra = lookup.get(None if r["id"] is None else str(r["id"]), (None,) * len(need))
            for c, v in zip(need, extra):
                r[c] = v
    return rows


def _top_bottom(tbl: Any, column: str, n: int) -> tuple[Any, Any, int]:
    """(lowest n ascending, highest n descending, rows with NULL/NaN ``column``); ties by id."""
    col = tbl.column(column)
    keep = pc.is_valid(col)
    if pa.types.is_floating(col.type):
        keep = pc.and_(keep, pc.invert(pc.is_nan(col)))
    valid = tbl.filter(keep)
    key = pa.table({"v": valid.column(column), "id": valid.column("id").cast(pa.string())})
    low = pc.sort_indices(key, [("v", "ascending"), ("id", "ascending")])[:n]
    high = pc.sort_indices(key, [("v", "descending"), ("id", "ascending")])[:n]
    return valid.take(low), valid.take(high), tbl.num_rows - valid.num_rows


# --------------------------------------------------------------------------- html
def _fmt(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return "NaN" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        head = ", ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in v[:3])
        return f"[{head}{', …' if len(v) > 3 else ''}] ({len(v)})"
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    s = str(v)
    return s if len(s) <= 160 else s[:157] + "…"


NAME_CHARS = 14       # a column name longer than this is shortened in a tile (full name on hover)
VALUE_CHARS = 18      # a value longer than this is cut in a tile (full value on hover); values never wrap


def short_name(name: str, limit: int = NAME_CHARS) -> str:
    """`name` if it fits, else its head and tail around an ellipsis: clip_l14_similarity_score ->
    clip_l1…y_score (the tile's title attribute carries the full name)."""
    if len(name) <= limit:
        return name
    tail = (limit - 1) // 2
    return name[:limit - 1 - tail] + "…" + name[-tail:]


def _short_value(text: str, limit: int = VALUE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _tile(r: dict, columns: list[str], thumb_uri: str | None, why: str | None, lazy: bool,
          rank: str | None = None) -> str:
    e = html.escape
    cap = r.get("caption")
    uri = r.get("uri")
    title = e(f"id {r['id']}\n{uri}" if uri else f"id {r['id']}")
    if thumb_uri is not None:
        web = is_web_uri(thumb_uri)     # loaded by the viewer's browser from its host: no referrer sent
        img = (f'<img src="{e(thumb_uri)}" alt="{e(str(cap if cap is not None else r["id"]))}" '
               f'title="{title}"{" loading=lazy" if lazy or web else ""} decoding="async"'
               f'{" referrerpolicy=no-referrer" if web else ""}>')
        cls = "tile"
    else:
        img = f'<div class="ph" title="{title}">broken image<br>{e(why or "")}</div>'
        cls = "tile broken"
    kv = "".join(f'<tr><td class="k" title="{e(c)}">{e(short_name(c))}</td>'
                 f'<td class="v" title="{e(str(r.get(c)))}">{e(_short_value(_fmt(r.get(c))))}</td></tr>'
                 for c in columns)
    head = f'<span class="rank">{e(rank)}</span> ' if rank else ""
    cap_html = e(_fmt(cap)) if cap is not None else "<i>no caption</i>"
    return (f'<figure class="{cls}">{img}<figcaption><div class="cap">{head}{cap_html}</div>'
            f'<table class="kv">{kv}</table></figcaption></figure>')


def _grid(rows: list[dict], columns: list[str], thumbs: dict[int, tuple[str | None, str | None]],
          lazy: bool, rank_label: str | None = None) -> str:
    tiles = [_tile(r, columns, *thumbs[id(r)], lazy=lazy,
                   rank=f"{rank_label}{i + 1}" if rank_label else None) for i, r in enumerate(rows)]
    return '<div class="grid">' + "".join(tiles) + "</div>"


@dataclass
class GallerySummary:
    """What a gallery shows: `rows` the query returned, `shown` tiles, `broken` images that did not
    decode, `remote` web images the browser loads, `offline` web images left out, `cut` (the limit
    dropped rows), `nulls` (rows a top/bottom ranking left out), `lazy` (tiles load lazily); `path`
    and `bytes` once written."""
    rows: int
    shown: int
    broken: int
    remote: int
    offline: int
    cut: bool
    nulls: int
    lazy: bool
    path: str | None = None
    bytes: int | None = None


def gallery_html(store: Any, sql: str, *, limit: int | None = DEFAULT_LIMIT, thumb: int = 128,
                 top_bottom: tuple[str, int] | None = None, title: str | None = None,
                 con: Any = None, allow_external_access: bool = False,
                 remote_images: bool = True) -> tuple[str, GallerySummary]:
    """Build the page; returns (html, its summary).

    Only images the store's samples name are read (a query can put any path in a `uri` column);
    `allow_external_access` shows other files too. `remote_images`: show http(s) images by URL
    (the viewer's browser fetches them); off, the page makes no request to any other host."""
    if thumb < 8:
        raise QueryError("`thumb` must be at least 8 pixels", param="thumb")
    own = con is None
    if own:
        con = connect(store)
    try:
        # top/bottom needs every row to rank; otherwise only the first `limit`
        tbl, cut = _fetch(con, sql.strip().rstrip(";"), None if top_bottom else limit)
        if top_bottom and top_bottom[0] not in tbl.column_names:
            raise QueryError(f"`top_bottom` column {top_bottom[0]!r} is not in the SQL result "
                             f"(columns: {', '.join(tbl.column_names)})", param="top_bottom")
        total = tbl.num_rows
        columns = [c for c in tbl.column_names if c not in ("id", "uri", "caption")]
        nulls = 0
        if top_bottom:
            col, n = top_bottom[0], int(top_bottom[1])
            if n < 1:
                raise QueryError("`top_bottom` N must be at least 1", param="top_bottom")
            low_t, high_t, nulls = _top_bottom(tbl, col, n)
            low, high = _with_samples(con, low_t), _with_samples(con, high_t)
            shown = low + high
        else:
            shown = _with_samples(con, tbl)
        known = None if allow_external_access else _store_uris(con, [r.get("uri") for r in shown])
    finally:
        if own:
            con.close()
    reader = ImageReader()
    try:
        thumbs = {}
        for r in shown:
            uri = r.get("uri")
            if known is not None and uri and uri not in known:
                thumbs[id(r)] = (None, FOREIGN)
            elif is_web_uri(uri):
                thumbs[id(r)] = (uri, None) if remote_images else (None, OFFLINE)
            else:
                thumbs[id(r)] = load_thumbnail(reader, uri, thumb)
    finally:
        reader.close()
    lazy = len(shown) > LAZY_AFTER
    broken = sum(1 for t in thumbs.values() if t[0] is None)
    remote = sum(1 for t in thumbs.values() if is_web_uri(t[0]))
    offline = sum(1 for t in thumbs.values() if t[1] == OFFLINE)
    e = html.escape
    if top_bottom:
        body = (f'<div class="pair"><section><h2>Lowest {len(low)} by {e(col)}</h2>'
                f'{_grid(low, columns, thumbs, lazy, "#")}</section>'
                f'<section><h2>Highest {len(high)} by {e(col)}</h2>'
                f'{_grid(high, columns, thumbs, lazy, "#")}</section></div>')
        what = (f"{total} rows ranked by {col}" + (f", {nulls} with NULL {col} left out" if nulls else "")
                + f"; showing the {len(low)} lowest and {len(high)} highest")
    else:
        body = _grid(shown, columns, thumbs, lazy)
        what = f"{len(shown)} rows" + (f" (the first {limit}; raise --limit to see more)" if cut else "")
    if broken - offline:
        what += f"; {broken - offline} broken image{'s' if broken - offline != 1 else ''}"
    note = ""
    if remote:
        note = (f'<div class="note" id="remote-note">{remote} image{"s" if remote != 1 else ""} of this page '
                "load from their web hosts (the pool's URLs): your browser fetches them when it opens the "
                "page, so those hosts see your address, and an image that has moved or gone shows as "
                "broken. Write the page with <code>--no-remote-images</code> for one that contacts no "
                "other host.</div>")
    elif offline:
        note = (f'<div class="note" id="remote-note">{offline} web image{"s" if offline != 1 else ""} not '
                "shown: this page was written with <code>--no-remote-images</code> and contacts no other "
                "host.</div>")
    img_src = "data: http: https:" if remote else "data:"
    csp = (f"default-src 'none'; img-src {img_src}; style-src 'unsafe-inline'; script-src 'unsafe-inline'")
    head_title = title or "clipsql gallery"
    tile_px = max(thumb + 10, 170)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        f"<title>{e(head_title)}</title><style>:root{{--thumb:{thumb}px;--tile:{tile_px}px}}{_CSS}</style>"
        f"</head><body><h1>{e(head_title)}</h1><div class=\"meta\">{e(what)}</div>{note}"
        f"<details><summary>SQL</summary><pre>{e(sql)}</pre></details>{body}"
        f'<div id="image-check" data-decoded="-1" data-total="-1" data-pending="-1"></div>'
        f"<script>{GALLERY_SCRIPT}</script></body></html>\n")
    summary = GallerySummary(rows=total, shown=len(shown), broken=broken - offline, remote=remote,
                             offline=offline, cut=cut, nulls=nulls, lazy=lazy)
    return page, summary


@blas_pinned
def write_gallery(store: Any, sql: str, output: str | os.PathLike = "gallery.html", *,
                  limit: int | None = DEFAULT_LIMIT, thumb: int = 128,
                  top_bottom: tuple[str, int] | None = None, title: str | None = None,
                  con: Any = None, allow_external_access: bool = False,
                  remote_images: bool = True) -> GallerySummary:
    """Write the gallery page to ``output``; returns the summary with ``path`` (absolute)."""
    page, summary = gallery_html(store, sql, limit=limit, thumb=thumb, top_bottom=top_bottom,
                                 title=title, con=con, allow_external_access=allow_external_access,
                                 remote_images=remote_images)
    out = Path(output)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    summary.path = str(out.resolve())
    summary.bytes = out.stat().st_size
    return summary
