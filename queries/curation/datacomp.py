"""Selections as DataComp subset files: the sorted uid array DataComp's resharder reads.

The format, from github.com/mlfoundations/datacomp:

* baselines/apply_filter.py builds every baseline's subset as
  ``np.array([(int(uid[:16], 16), int(uid[16:32], 16)) ...], np.dtype("u8,u8"))`` (the high
  and low 64 bits of the 128-bit hex uid), then ``uids.sort()`` and ``np.save(save_path, uids)``;
* resharder.py, ``u16 = np.dtype("u8,u8")`` and ``load_subset``: a file that starts with the
  NumPy magic ``b"\\x93NUMPY"`` is ``np.load(subset_file, mmap_mode="r")`` with
  ``assert subset.dtype == u16``, any other file a raw ``np.memmap(subset_file, u16)``; a
  sample's uid is looked up as ``divmod(int(uid, 16), 2**64)`` with ``np.searchsorted`` left
  and right (so the array must be sorted), and a uid listed k times is written k times.

`save_uids` writes that file (atomically) from a store's sample ids, which are the pool's
uids when the store was ingested from a DataComp pool (ingest.datacomp); `load_uids`
reads one back the way the resharder does, checking what its searchsorted assumes.
`require_datacomp_ids` refuses a selection holding rows whose ids are clipsql's content
hashes (no DataComp pool, no id column): 32 hex characters too, they would match nothing.
Conversions are vectorised (numpy on 32-byte records), never one Python int per uid.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import sqlalchemy as sa
import pyarrow.compute as pc

from clipsql.errors import SelectionError
from clipsql.files import AtomicFile
from clipsql.store import catalog as cat

U16 = np.dtype("u8,u8")      # resharder.py: u16 = np.dtype("u8,u8")
_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
_SHIFTS = np.arange(60, -1, -4, dtype=np.uint64)          # 16 nibbles, most significant first
_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)


def _records(ids: Any) -> np.ndarray:
    """(n, 32) uint8: the uids' characters; SelectionError naming the first id that is not 32 hex."""
    if isinstance(ids, (pa.Array, pa.ChunkedArray)):
        arr = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    else:
        try:
            arr = pa.array(ids if isinstance(ids, np.ndarray) and ids.dtype.kind in "US" else list(ids),
                           pa.string())
        except (pa.ArrowException, TypeError) as e:
            raise SelectionError(f"ids must be uid strings (32 hex characters): {e}") from None
    n = len(arr)
    if n == 0:
        return np.zeros((0, 32), dtype=np.uint8)
    if not pa.types.is_string(arr.type):
        arr = arr.cast(pa.string())
    ok = pc.fill_null(pc.match_substring_regex(arr, r"^[0-9a-fA-F]{32}$"), False).to_numpy(zero_copy_only=False)
    if not ok.all():
        bad = np.flatnonzero(~ok)
        raise SelectionError(
            f"{len(bad)} of {n} ids are not DataComp uids (32 hex characters), e.g. {arr[int(bad[0])].as_py()!r}: "
            "a DataComp uid file needs a store ingested from a DataComp pool (clipsql ingest STORE POOL_DIR)")
    fixed = arr.cast(pa.binary(32))
    data = np.frombuffer(fixed.buffers()[1], dtype=np.uint8)
    return data[fixed.offset * 32:(fixed.offset + n) * 32].reshape(n, 32)


def uid_array(ids: Any) -> np.ndarray:
    """The sorted ``np.dtype("u8,u8")`` array of `ids` (hex uids; duplicates kept, as the
    resharder would repeat them): (int(uid[:16], 16), int(uid[16:], 16)) per uid."""
    nib = _HEX[_records(ids)].astype(np.uint64)
    hi = (nib[:, :16] << _SHIFTS).sum(axis=1, dtype=np.uint64)   # disjoint bit fields: sum == or
    lo = (nib[:, 16:] << _SHIFTS).sum(axis=1, dtype=np.uint64)
    order = np.lexsort((lo, hi))
    out = np.empty(len(hi), dtype=U16)
    out["f0"], out["f1"] = hi[order], lo[order]
    return out


def require_datacomp_ids(st: Any, con: Any, ids: Any) -> None:
    """SelectionError (one line) unless every id in `ids` is a pool uid: a sample ingested from a
    DataComp pool, or from a source whose run took the ids from a column of it (`--id-column uid`
    on the pool's own parquet, say). Any other sample's id is clipsql's content hash: 32 hex
    characters too, and it would match nothing in a pool. A sample's source is `samples.source`,
    what its runs did is in `ingest_runs`. `con`: a DuckDB connection with the store's views."""
    with st.engine.connect() as conn:
        runs = conn.execute(sa.select(cat.ingest_runs.c.source, cat.ingest_runs.c.source_kind,
                                      cat.ingest_runs.c.summary)).all()
    kinds: dict[str, set] = {}
    uid_sources = set()
    for source, kind, summary in runs:
        kinds.setdefault(source, set()).add(kind)
        if kind == "datacomp" or (summary and json.loads(summary).get("id_column")):
            uid_sources.add(source)
    arr = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else pa.array(ids)
    con.register("_clipsql_uid_ids", pa.table({"id": arr.cast(pa.string())}))
    con.register("_clipsql_uid_sources", pa.table({"source": pa.array(sorted(uid_sources), pa.string())}))
    try:
        other = con.execute(
            "SELECT m.source, count(*) FROM _clipsql_uid_ids i LEFT JOIN samples m ON m.id = i.id "
            "WHERE m.source IS NULL OR m.source NOT IN (SELECT source FROM _clipsql_uid_sources) "
            "GROUP BY m.source").fetchall()
    finally:
        con.unregister("_clipsql_uid_ids")
        con.unregister("_clipsql_uid_sources")
    bad = sum(n for _, n in other)
    if bad:
        what = ", ".join(sorted({k for s, _ in other for k in kinds.get(s, {"unrecorded"})}))
        raise SelectionError(
            f"{bad} of the {len(arr)} selected ids did not come from a DataComp pool (ingested from {what} "
            "source(s) without an id column, their ids are content hashes, which match nothing in DataComp's "
            "resharder); write `format` parquet, csv or txt instead, or narrow the selection to the pool's rows",
            param="format")


def write_uids(ids: Any, fh: Any) -> None:
    """Write `ids` as DataComp's subset file (``np.save`` of the sorted ``u8,u8`` array) to the open
    binary file `fh`; SelectionError when an id is not a uid."""
    np.save(fh, uid_array(ids), allow_pickle=False)


def save_uids(ids: Any, path: Any) -> str:
    """Write `ids` (an iterable / numpy / Arrow array of 32-hex uids) as DataComp's subset
    file at `path`: ``np.save`` of the sorted ``np.dtype("u8,u8")`` array, written to a temp
    file beside it (`.<name>.tmp-<host>-<pid>`), fsynced and renamed over `path`. Returns the
    file's sha256 (hex).

    Raises SelectionError (one line) when an id is not a uid (a store not ingested from a
    DataComp pool) or the file cannot be written."""
    arr = uid_array(ids)
    try:
        with AtomicFile(path) as f:
            with open(f.tmp, "wb") as fh:
                np.save(fh, arr, allow_pickle=False)
    except OSError as e:
        raise SelectionError(f"cannot write the uid file {os.fspath(path)}: {e.strerror or e}") from None
    return f.sha256 or ""


def load_subset(path: Any) -> np.ndarray:
    """resharder.py's load_subset: a .npy (by its magic) memory-mapped, whose dtype must be
    ``u8,u8``; else the raw file as a ``u8,u8`` memmap (read-only here; the resharder opens it
    r+). SelectionError for a dtype the resharder's assert would refuse."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic == b"\x93NUMPY":
            subset = np.load(path, mmap_mode="r")
            if subset.dtype != U16:
                raise SelectionError(f"{path} holds {subset.dtype}, not the u8,u8 uids DataComp's resharder asserts")
            return subset
        if os.path.getsize(path) % U16.itemsize:
            raise SelectionError(f"{path} is neither a .npy nor a whole number of 16-byte uids")
        return np.memmap(path, U16, mode="r") if os.path.getsize(path) else np.zeros(0, U16)
    except OSError as e:
        raise SelectionError(f"cannot read the uid file {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise SelectionError(f"{path} is not a readable .npy: {e}") from None


def load_uids(path: Any) -> np.ndarray:
    """The uids of a subset file as 32-character lower-case hex strings (numpy ``<U32``), in
    file order; SelectionError when the file is not sorted (the resharder's searchsorted
    would silently miss uids)."""
    subset = load_subset(path)
    hi = np.asarray(subset["f0"], dtype=np.uint64)
    lo = np.asarray(subset["f1"], dtype=np.uint64)
    if len(hi) > 1:
        later = (hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] >= lo[:-1]))
        if not later.all():
            i = int(np.flatnonzero(~later)[0])
            raise SelectionError(f"{os.fspath(path)} is not sorted (entry {i + 1} > entry {i + 2}): DataComp's "
                                 "resharder looks uids up with searchsorted; sort it (np.sort) first")
    return hex_uids(hi, lo)


def hex_uids(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """`f"{hi:016x}{lo:016x}"` for every pair, vectorised."""
    n = len(hi)
    nib = np.empty((n, 32), dtype=np.uint8)
    nib[:, :16] = (hi[:, None] >> _SHIFTS) & np.uint64(15)
    nib[:, 16:] = (lo[:, None] >> _SHIFTS) & np.uint64(15)
    return np.ascontiguousarray(_DIGITS[nib]).view("S32").ravel().astype("<U32")
