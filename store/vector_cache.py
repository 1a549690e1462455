"""A per-process cache of a model table's vectors for exact search, memory-mapped from a local file.

    cache = vectors_for(ds, "image_embedding")      # built on first use, then shared by the process
    cache.search(Q, k)                              # [(ids, float64 cosines)], exact (kernels.topk)
    cache.search(Q, k, allowed=ids)                 # only those ids

An exact search used to read the whole column from Lance on every call and compute float64
row norms per chunk. The cache holds, for one table content and column, the valid rows (finite,
non-zero vectors; NULL rows are left out) in scan order:

* `vectors.f32`: (n, d) float32, each stored vector x times an exact power of two 2^-e, where
  ‖x‖ = m·2^e with m in [1/2, 1): the float32 GEMM cannot overflow, and the float64 re-score
  of a candidate from these rows equals the one from the stored vector bit for bit (scaling
  by a power of two is exact: every product, sum and square root scales exactly);
* `scale.f32`: (n,) float32 1/‖row‖, the GEMM's per-row factor;
* `ids.arrow`: the ids (an Arrow IPC file; only the candidates' ids become Python strings);
* `meta.json`: rows, dim, the table version it was built at, bytes (written last).

**Key and invalidation.** An entry is keyed by the table's URI, the column and a hash of the
version's fragment metadata (data file names, deletion files): a version that changes rows
(an ingest, a delete, a compaction) has another key, a version that changes none (an index
build) shares its predecessor's; a table dropped and created again has new data files.

**Where.** `$CLIPSQL_CACHE_DIR/vectors`, else `$XDG_CACHE_HOME/clipsql/vectors`, else
`~/.cache/clipsql/vectors` (never inside the store: a store may be read-only or on object
storage, and backups of it should not carry a cache). A table smaller than `DISK_MIN_BYTES` is
cached in memory only. An entry is built in a temporary directory and renamed into place (atomic:
several processes may build the same entry, one rename wins and the others use it); readers
open only complete entries. Bounded: `KEEP_PER_TABLE` entries per table and column (the most
recently used), and `CLIPSQL_VECTOR_CACHE_BYTES` (default 16 GiB) in all, least recently used
evicted first (renamed away, then deleted: a process that has an entry mapped keeps reading it).
Where the disk cannot hold it, the entry lives in memory up to `MEMORY_MAX_BYTES`; past that
`vectors_for` returns None and the caller scans Lance in chunks as before.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsql.kernels import topk as kernels
from clipsql.kernels.arrays import vectors

DISK_MIN_BYTES = 32 << 20            # smaller tables: memory only (a scan of them is quick)
MEMORY_MAX_BYTES = 2 << 30           # no disk: hold at most this much in memory, else stream
DEFAULT_CACHE_BYTES = 16 << 30
KEEP_PER_TABLE = 2
IN_PROCESS = 4                       # entries a process keeps open
SCAN_ROWS = 65536

_open: "OrderedDict[str, VectorCache]" = OrderedDict()
_lock = threading.Lock()
_building: dict[str, threading.Lock] = {}


@dataclass
class VectorCache:
    """The valid rows of one column of one table content (see the module doc)."""
    key: str
    X: np.ndarray            # (n, d) float32, each row scaled by a power of two
    scale: np.ndarray        # (n,) float32 1/‖row‖
    ids: pa.Array            # strings, n
    version: int
    path: str | None = None  # the entry's directory; None: in memory only

    @property
    def rows(self) -> int:
        return len(self.X)

    def positions(self, allowed: pa.Array) -> np.ndarray:
        """Sorted positions of the rows whose id is in `allowed`."""
        mask = pc.is_in(self.ids, value_set=allowed.cast(pa.string()))
        return np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)).astype(np.int64)

    def take_ids(self, pos: np.ndarray) -> np.ndarray:
        return self.ids.take(pa.array(pos, pa.int64())).to_numpy(zero_copy_only=False)

    def search(self, Q: np.ndarray, k: int, allowed: pa.Array | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        rows = None if allowed is None else self.positions(allowed)
        return kernels.cached_topk(Q, self.X, self.scale, int(k), self.take_ids, rows)


def cache_root() -> Path:
    base = os.environ.get("CLIPSQL_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "clipsql")
    return Path(base) / "vectors"


def cache_bytes() -> int:
    try:
        return int(os.environ.get("CLIPSQL_VECTOR_CACHE_BYTES") or DEFAULT_CACHE_BYTES)
    except ValueError:
        return DEFAULT_CACHE_BYTES


def content_key(ds: Any, column: str) -> tuple[str, str]:
    """(table key, entry key): the table URI and column; plus the version's fragments (module doc)."""
    table = hashlib.sha1(f"{ds.uri}\0{column}".encode()).hexdigest()[:20]
    h = hashlib.sha1(table.encode())
    for f in ds.get_fragments():
        h.update(json.dumps(f.metadata.to_json(), sort_keys=True, default=str).encode())
    return table, h.hexdigest()[:24]


def vectors_for(ds: Any, column: str, *, build: bool = True) -> VectorCache | None:
    """The cache of `column` of Lance dataset `ds` (at its version): open in this process, else on
    disk, else built now (`build`); None when `build` is false and there is none, or when the
    table is too large to hold without a disk cache."""
    table, key = content_key(ds, column)
    with _lock:
        if key in _open:
            _open.move_to_end(key)
            return _open[key]
        gate = _building.setdefault(key, threading.Lock())
    with gate:                           # one build per entry in a process; other threads wait for it
        with _lock:
            if key in _open:
                return _open[key]
        entry = _load(cache_root() / table / key, key)
        if entry is None and build:
            entry = _build(ds, column, table, key)
        with _lock:
            _building.pop(key, None)
            if entry is not None:
                _open[key] = entry
                while len(_open) > IN_PROCESS:
                    _open.popitem(last=False)
        return entry


def forget() -> None:
    """Close every entry this process holds (tests; the files stay)."""
    with _lock:
        _open.clear()


def _load(path: Path, key: str) -> VectorCache | None:
    try:
        meta = json.loads((path / "meta.json").read_text())
        n, d = int(meta["rows"]), int(meta["dim"])
        X = np.asarray(np.memmap(path / "vectors.f32", dtype=np.float32, mode="r", shape=(n, d)))
        scale = np.asarray(np.memmap(path / "scale.f32", dtype=np.float32, mode="r", shape=(n,)))
        # one array (a take from a chunked array costs ~1 ms; the copy is n ids, not n vectors)
        ids = pa.ipc.open_file(pa.memory_map(str(path / "ids.arrow"))).read_all().column(0).combine_chunks()
        if len(ids) != n:
            return None
        os.utime(path / "meta.json")                  # least recently used goes first
    except (OSError, ValueError, KeyError, pa.ArrowException):
        return None                                   # absent, evicted meanwhile, or damaged: rebuild
    return VectorCache(key, X, scale, ids, int(meta.get("version", -1)), str(path))


def _scaled(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(valid mask, rows of X scaled by 2^-e with ‖row‖ in [1/2, 1), float32 1/‖row‖)."""
    sq = kernels.row_norms_sq(X)
    ok = np.isfinite(sq) & (sq > 0)
    Xv = X[ok]
    _, e = np.frexp(np.sqrt(sq[ok]))
    Xs = np.ldexp(Xv, -e[:, None].astype(np.int32)).astype(np.float32, copy=False)
    inv = (1.0 / np.sqrt(kernels.row_norms_sq(Xs))).astype(np.float32)
    return ok, Xs, inv


def _build(ds: Any, column: str, table: str, key: str) -> VectorCache | None:
    total = ds.count_rows()
    field = ds.schema.field(column).type
    d = int(field.list_size)
    need = total * (d + 1) * 4
    parent = cache_root() / table
    tmp: Path | None = None
    if need >= DISK_MIN_BYTES:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(parent).free > need + (1 << 30) and need <= cache_bytes():
                tmp = parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                tmp.mkdir()
        except OSError:
            tmp = None
    if tmp is None and need > MEMORY_MAX_BYTES:
        return None
    try:
        if tmp is not None and total:
            X = np.memmap(tmp / "vectors.f32", dtype=np.float32, mode="w+", shape=(total, d))
            scale = np.memmap(tmp / "scale.f32", dtype=np.float32, mode="w+", shape=(total,))
            writer = pa.ipc.new_file(str(tmp / "ids.arrow"), pa.schema([("id", pa.string())]))
        else:
            X, scale, writer = np.empty((total, d), np.float32), np.empty(total, np.float32), None
        id_parts = []
        n = 0
        for b in ds.to_batches(columns=["id", column], batch_size=SCAN_ROWS):
            if not b.num_rows:
                continue
            ok, Xs, inv = _scaled(vectors(b.column(column)))
            c = len(Xs)
            X[n:n + c], scale[n:n + c] = Xs, inv
            ids = b.column("id").filter(pa.array(ok)).cast(pa.string())
            if writer is not None:
                writer.write_batch(pa.record_batch([ids], names=["id"]))
            else:
                id_parts.append(ids)
            n += c
        if writer is None or n == 0:
            if writer is not None:
                writer.close()
                X, scale = np.zeros((0, d), np.float32), np.zeros(0, np.float32)
            ids = pa.chunked_array(id_parts, pa.string()).combine_chunks()
            return VectorCache(key, X[:n], scale[:n], ids, int(ds.version))
        writer.close()
        X.flush()
        scale.flush()
        del X, scale
        os.truncate(tmp / "vectors.f32", n * d * 4)
        os.truncate(tmp / "scale.f32", n * 4)
        (tmp / "meta.json").write_text(json.dumps({"rows": n, "dim": d, "version": int(ds.version),
                                                   "column": column, "uri": str(ds.uri), "created": time.time(),
                                                   "bytes": n * (d + 1) * 4}))
        final = parent / key
        for _ in range(2):
            try:
                os.rename(tmp, final)       # atomic; fails when another process got there first
                break
            except OSError:
                if _load(final, key) is not None:
                    break                   # theirs is complete: use it
                _drop(final)                # a damaged entry (no meta.json): replace it
        _evict(parent, keep=key)
        return _load(final, key)
    except OSError:
        return None if need > MEMORY_MAX_BYTES else _build_in_memory(ds, column, key)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _build_in_memory(ds: Any, column: str, key: str) -> VectorCache:
    Xs, invs, ids = [], [], []
    for b in ds.to_batches(columns=["id", column], batch_size=SCAN_ROWS):
        ok, X, inv = _scaled(vectors(b.column(column)))
        Xs.append(X)
        invs.append(inv)
        ids.append(b.column("id").filter(pa.array(ok)).cast(pa.string()))
    d = int(ds.schema.field(column).type.list_size)
    return VectorCache(key, np.concatenate(Xs) if Xs else np.zeros((0, d), np.float32),
                       np.concatenate(invs) if invs else np.zeros(0, np.float32),
                       pa.chunked_array(ids, pa.string()).combine_chunks(), int(ds.version))


def _entries(root: Path) -> list[tuple[float, int, Path]]:
    """(last use, bytes, path) of every complete entry under `root`; stale temporaries removed."""
    out = []
    for table in root.iterdir() if root.is_dir() else []:
        for e in table.iterdir() if table.is_dir() else []:
            try:
                if e.name.startswith("."):
                    if time.time() - e.stat().st_mtime > 3600:    # a build killed long ago
                        shutil.rmtree(e, ignore_errors=True)
                    continue
                st = (e / "meta.json").stat()
                out.append((st.st_mtime, int(json.loads((e / "meta.json").read_text()).get("bytes", 0)), e))
            except (OSError, ValueError):
                continue
    return out


def _drop(path: Path) -> None:
    trash = path.parent / f".trash-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _evict(parent: Path, keep: str) -> None:
    """Keep the `KEEP_PER_TABLE` most recently used entries of this table and column, and the
    whole cache under its byte bound (least recently used first); never the entry `keep`."""
    try:
        mine = sorted(_entries(parent.parent), reverse=True)
        same = [e for e in mine if e[2].parent == parent]
        for _, _, p in same[KEEP_PER_TABLE:]:
            if p.name != keep:
                _drop(p)
        alive = [e for e in mine if e[2].exists()]
        total, cap = sum(b for _, b, _ in alive), cache_bytes()
        for _, b, p in sorted(alive):
            if total <= cap:
                break
            if p.name != keep:
                _drop(p)
                total -= b
    except OSError:
        pass
