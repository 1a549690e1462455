"""Thumbnails for the app: read by a sample's uri (local files, `shard.tar::member`), shrunk, cached.

The app asks by sample id; the uri comes from the store's `samples` (never from the page), so only
images the store names are read. Reading and shrinking reuse the gallery's code
(queries.present.gallery: `ImageReader`, `read_image`, `thumbnail_bytes`). A thumbnail, or the
reason it cannot be made (missing file, damaged shard, undecodable bytes), is cached in memory
(least recently used, `memory_mb`) and, with `cache_dir`, on disk, keyed by the uri, the size and
the file's size and mtime (a rewritten file gets a new thumbnail).

Remote images (`http://`, `https://` uris: DataComp and LAION pools) are never fetched by the
server: with `remote_images` the page loads them from their hosts in the curator's own browser;
without it (the default, for offline use) they are broken tiles saying how to show them.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

from clipsql.queries.present.gallery import ImageReader, read_image, thumbnail_bytes

REMOTE_HIDDEN = "remote image (start with --remote-images to show)"
SIZES = (96, 128, 160, 256, 512)


def is_remote(uri: str | None) -> bool:
    return bool(uri) and uri.lower().startswith(("http://", "https://"))


class Thumbs:
    def __init__(self, *, memory_mb: float = 64, cache_dir: str | os.PathLike | None = None):
        self.budget = int(memory_mb * (1 << 20))
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._mem: OrderedDict[str, tuple[bytes | None, str]] = OrderedDict()   # key → (body, mime | why)
        self._bytes = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self.hits = self.misses = 0

    def _reader(self) -> ImageReader:
        r = getattr(self._local, "reader", None)
        if r is None:
            r = self._local.reader = ImageReader()
        return r

    @staticmethod
    def size(requested: int | None) -> int:
        """The nearest offered size at or above the request (few sizes: the cache stays small)."""
        want = int(requested or 160)
        return next((s for s in SIZES if s >= want), SIZES[-1])

    def get(self, uri: str | None, size: int) -> tuple[bytes | None, str]:
        """(thumbnail bytes, MIME type) or (None, why the tile is broken)."""
        if is_remote(uri):
            return None, REMOTE_HIDDEN
        key = _key(uri, size)
        with self._lock:
            hit = self._mem.get(key)
            if hit is not None:
                self._mem.move_to_end(key)
                self.hits += 1
                return hit
        self.misses += 1
        out = self._disk_get(key)
        if out is None:
            data, why = read_image(self._reader(), uri)
            if data is None:
                out = (None, why or "unreadable")
            else:
                try:
                    out = thumbnail_bytes(data, size)
                except Exception as e:  # noqa: BLE001 - any decoder failure is a broken tile, never a crash
                    out = (None, f"cannot decode: {type(e).__name__}")
            self._disk_put(key, out)
        with self._lock:
            if key not in self._mem:
                self._mem[key] = out
                self._bytes += len(out[0] or b"") + 64
            while self._bytes > self.budget and len(self._mem) > 1:
                _, (body, _) = self._mem.popitem(last=False)
                self._bytes -= len(body or b"") + 64
        return out

    def _disk_get(self, key: str) -> tuple[bytes | None, str] | None:
        if self.cache_dir is None:
            return None
        for ext, mime in ((".png", "image/png"), (".jpg", "image/jpeg")):
            p = self.cache_dir / (key + ext)
            if p.exists():
                try:
                    return p.read_bytes(), mime
                except OSError:
                    return None
        return None

    def _disk_put(self, key: str, out: tuple[bytes | None, str]) -> None:
        if self.cache_dir is None or out[0] is None:
            return
        p = self.cache_dir / (key + (".png" if out[1] == "image/png" else ".jpg"))
        tmp = p.with_suffix(p.suffix + f".tmp{os.getpid()}-{threading.get_ident()}")
        try:
            tmp.write_bytes(out[0])
            os.replace(tmp, p)
        except OSError:
            tmp.unlink(missing_ok=True)

    def close(self) -> None:
        r = getattr(self._local, "reader", None)
        if r is not None:
            r.close()


def _key(uri: str | None, size: int) -> str:
    """The cache key: uri, size and the file's size and mtime (of the shard for a tar member)."""
    stamp = ""
    if uri:
        path = uri.split("::", 1)[0]
        if path.lower().startswith("file://"):
            from urllib.parse import unquote, urlparse
            path = unquote(urlparse(path).path)
        try:
            s = os.stat(path)
            stamp = f"{s.st_size}:{s.st_mtime_ns}"
        except OSError:
            stamp = "missing"
    return hashlib.sha256(f"{uri}\0{size}\0{stamp}".encode("utf-8", "surrogateescape")).hexdigest()[:40]
