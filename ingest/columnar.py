"""Columnar rows: a precomputed unit as Arrow columns and (n, d) arrays, never one object per row.

The precomputed reader (ingest.precomputed) hands the pipeline a `Columns` per unit. Every
check the per-item path makes (ingest.encode.prepare_item, ingest.images) is made here on
whole columns, with the same reject reasons and in the same order: the caption first
(`missing_caption`, `caption_not_utf8`, `empty_caption`), then the vectors
(`missing_vector`, `bad_vector`, `wrong_dim`, `non_finite_vector`, `zero_vector`).
Only captions that need cleaning and rows without an id go through Python one by one.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsql.ingest.images import ItemRejected, clean_caption, content_id
from clipsql.ingest.sources import scalar_value
from clipsql.lazy import duckdb

# A caption that is already clean: runs of characters that are neither control/format
# (\p{C}) nor separators (\p{Z}), joined by single spaces. Every character clean_caption
# deletes or treats as whitespace is in \p{C} ∪ \p{Z}, so such a caption is its own cleaning.
_CLEAN = r"^[^\p{C}\p{Z}]+( [^\p{C}\p{Z}]+)*$"


@dataclass
class Columns:
    """The rows of one unit that passed every check, plus the rejects of the others."""
    ids: pa.Array
    uri: pa.Array
    caption: pa.Array
    location: pa.Array
    metadata: pa.Array
    image: np.ndarray
    text: np.ndarray
    meta_types: dict = field(default_factory=dict)
    rejects: list = field(default_factory=list)      # (location, reason, detail)
    width: pa.Array | None = None                    # int32 image size from the source's columns (image_size)
    height: pa.Array | None = None
    caption_raw: pa.Array | None = None              # the captions before cleaning (caption_text)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx: np.ndarray) -> "Columns":
        t = pa.array(idx, pa.int64())
        return Columns(self.ids.take(t), self.uri.take(t), self.caption.take(t), self.location.take(t),
                       self.metadata.take(t), self.image[idx], self.text[idx], self.meta_types, self.rejects,
                       None if self.width is None else self.width.take(t),
                       None if self.height is None else self.height.take(t),
                       None if self.caption_raw is None else self.caption_raw.take(t))


# The source columns that give an undecoded image's size, first match wins (names compared in
# lower case): clip-retrieval / img2dataset metadata and LAION parquets have width / height
# (WIDTH / HEIGHT), DataComp pools original_width / original_height.
SIZE_COLUMNS = {"width": ("width", "original_width"), "height": ("height", "original_height")}
_INT32_MAX = 2 ** 31 - 1


def image_size(table: pa.Table) -> tuple[pa.Array | None, pa.Array | None]:
    """(width, height) as int32 arrays from the table's own size columns (see SIZE_COLUMNS), for
    rows whose image is never decoded; None where the table has no such column. A value that is
    not a positive whole number below 2**31 (or not numeric at all) is NULL; the source column
    itself stays in the row's metadata, so nothing is lost."""
    lower = {name.lower(): name for name in reversed(table.column_names)}      # the first of WIDTH, Width …
    lower.update({name: name for name in table.column_names if name == name.lower()})   # … unless width
    out = []
    for dim in ("width", "height"):
        name = next((lower[c] for c in SIZE_COLUMNS[dim] if c in lower), None)
        out.append(None if name is None else _size_values(table.column(name)))
    return out[0], out[1]


def _size_values(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    t = arr.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
            or pa.types.is_string(t) or pa.types.is_large_string(t)):
        return pa.nulls(len(arr), pa.int32())
    try:
        x = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)   # strings such as "256" parse
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.nulls(len(arr), pa.int32())
    x = np.where(np.isnan(x), 0.0, x)       # NULL reads as NaN
    ok = (x >= 1) & (x <= _INT32_MAX) & (x == np.floor(x))
    return pa.array(np.where(ok, x, 0).astype(np.int32), pa.int32(), mask=~ok)


def locations(name: str, first_row: int, n: int) -> pa.Array:
    """`name:row N` for N = first_row … first_row + n − 1 (rows count from 1)."""
    nums = pc.cast(pa.array(np.arange(first_row, first_row + n, dtype=np.int64)), pa.string())
    return pc.binary_join_element_wise(pa.scalar(f"{name}:row "), nums, "")


def caption_text(col: pa.Array) -> pa.Array | None:
    """The captions as the source gave them, as text (before clean_captions), for the caption
    features (ingest.captions); None where the column is not text or not all valid UTF-8."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.cast(pa.string())
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        try:
            text = pc.cast(col, pa.string())
        except pa.ArrowInvalid:
            return None
        return pc.replace_substring_regex(text, "^\ufeff", "")      # a UTF-8 byte-order mark is no text
    return None


def clean_captions(col: pa.Array) -> tuple[pa.Array, list[tuple[int, str, str]]]:
    """Cleaned captions (NULL where rejected) and [(row, reason, detail)] for the rejected rows."""
    n = len(col)
    text = None
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        try:
            text = pc.cast(col, pa.string())
        except pa.ArrowInvalid:     # some row is not UTF-8: clean_caption says which byte
            text = None
    elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        text = col.cast(pa.string())
    if text is None:
        values = col.to_pylist()
        clean = np.zeros(n, dtype=bool)
    else:
        ok = pc.match_substring_regex(text, _CLEAN)
        clean = pc.fill_null(ok, False).to_numpy(zero_copy_only=False)
        if clean.all():
            return text, []
        values = None
    out = text.to_pylist() if text is not None else [None] * n
    rejects = []
    for i in np.flatnonzero(~clean):
        raw = values[i] if values is not None else col[int(i)].as_py()
        if raw is not None and not isinstance(raw, (bytes, str)):
            raw = str(raw)
        try:
            out[i] = clean_caption(raw)
        except ItemRejected as e:
            out[i] = None
            rejects.append((int(i), e.reason, e.detail))
    return pa.array(out, pa.string()), rejects


def vector_matrix(col: pa.Array | np.ndarray | None, n: int, dim: int) -> tuple[np.ndarray, list[str | None]]:
    """(n, dim) float32 and per row None or the reject reason + detail ("reason\\tdetail").

    `col` is an (n, d) numpy array (npy rows) or an Arrow list column (parquet). The matrix is
    `col` itself when that already is native, aligned, C-ordered float32 (then it may be a
    read-only memory map: callers never write into it), else a fresh array."""
    reasons: list[str | None] = [None] * n
    out = np.zeros((n, dim), dtype=np.float32)
    if col is None:
        return out, ["missing_vector\trow has no image or text embedding"] * n
    if isinstance(col, np.ndarray):
        if col.dtype.kind not in "iuf" or col.ndim != 2:
            return out, [f"bad_vector\texpected real numbers, got dtype {col.dtype}"] * n
        if col.shape[1] != dim:
            return out, [f"wrong_dim\texpected {dim}, got {col.shape[1]}"] * n
        if col.dtype == np.float32 and col.dtype.isnative and col.flags.c_contiguous and col.flags.aligned:
            # already what is stored (an npy's rows, memory-mapped read-only): used as it is, so
            # its pages are read once and shared by the checks, the fold and the write, not copied
            out = col
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                # a fresh, aligned, C-ordered float32 array: `col` may be a memory map of an npz
                # member at an offset that is no multiple of 4 (Lance refuses unaligned buffers), in
                # Fortran order, big-endian, or float16 / float64 (float64 rounds to the stored float32)
                out = np.array(col, dtype=np.float32, order="C", copy=True)
        valid = np.ones(n, dtype=bool)
    else:
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if pa.types.is_fixed_size_list(arr.type):
            arr = arr.cast(pa.list_(arr.type.value_type))
        if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)) or \
                not (pa.types.is_integer(arr.type.value_type) or pa.types.is_floating(arr.type.value_type)):
            valid = arr.is_valid().to_numpy(zero_copy_only=False)
            return out, [f"bad_vector\tnot a numeric vector ({arr.type})" if v else
                         "missing_vector\trow has no image or text embedding" for v in valid]
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        lengths = pc.fill_null(pc.list_value_length(arr), -1).to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(~valid):
            reasons[i] = "missing_vector\trow has no image or text embedding"
        wrong = valid & (lengths != dim)
        for i in np.flatnonzero(wrong):
            reasons[i] = f"wrong_dim\texpected {dim}, got {int(lengths[i])}"
        good = valid & ~wrong
        if good.any():
            sub = arr.filter(pa.array(good))
            flat = sub.flatten().to_numpy(zero_copy_only=False)
            with np.errstate(over="ignore", invalid="ignore"):
                out[good] = flat.astype(np.float32).reshape(-1, dim)
            # NULL elements inside a list read as NaN: non-finite, as check_vector says
        valid = good
    finite = np.isfinite(out).all(axis=1)
    for i in np.flatnonzero(valid & ~finite):
        j = int(np.flatnonzero(~np.isfinite(out[i]))[0])
        reasons[i] = f"non_finite_vector\tvalue {out[i, j]} at index {j}"
    zero = valid & finite & ~out.any(axis=1)
    for i in np.flatnonzero(zero):
        reasons[i] = "zero_vector\tall components are zero"
    return out, reasons


_DUCK = threading.local()


def duck_connection():  # noqa: ANN202
    con = getattr(_DUCK, "con", None)
    if con is None:
        con = _DUCK.con = duckdb.connect(":memory:", config={"threads": 1})
    return con


def _sql_type(t: pa.DataType) -> str:
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_integer(t):
        return "BIGINT"
    if pa.types.is_floating(t):
        return "DOUBLE"
    return "VARCHAR"


def metadata_json(table: pa.Table) -> tuple[pa.Array, dict[str, str]]:
    """One JSON object per row of `table`'s columns (keys sorted; NULL when it has no columns)
    and each column's SQL type, built by DuckDB's to_json in one vectorised pass."""
    n = table.num_rows
    if table.num_columns == 0:
        return pa.nulls(n, pa.string()), {}
    types = {}
    cols = {}
    for name in sorted(table.column_names):
        col = table.column(name)
        t = col.type
        if pa.types.is_dictionary(t):
            col = col.cast(t.value_type)
            t = t.value_type
        if not (pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t)
                or pa.types.is_string(t) or pa.types.is_large_string(t)):
            # nested values become JSON text, dates ISO strings, bytes UTF-8 (as ingest.sources._scalar)
            col = pa.array([None if v is None else str(scalar_value(v)) for v in col.to_pylist()], pa.string())
            t = pa.string()
        types[str(name)] = _sql_type(t)
        cols[str(name)] = col
    # columns by position, keys as string literals: names that differ only in case (Kind, kind)
    # are two keys, where struct_pack (SQL names ignore case) refused them as one
    tbl = pa.table({f"c{i}": col for i, col in enumerate(cols.values())})
    keys = ", ".join(f"{quote_literal(k)}, t.c{i}" for i, k in enumerate(cols))
    con = duck_connection()
    con.register("_clipsql_meta", tbl)
    try:
        out = con.sql(f"SELECT json_object({keys})::VARCHAR AS m FROM _clipsql_meta t").to_arrow_table()
    finally:
        con.unregister("_clipsql_meta")
    col = out.column("m")
    return col.combine_chunks().cast(pa.string()), types


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def content_ids(captions: pa.Array, uris: pa.Array, given: pa.Array | None,
                image: np.ndarray | None = None) -> pa.Array:
    """The id column where the source has one, else a content hash per row: of caption + uri,
    or, for a row without a uri, of its image vector + caption (two different vectors that share
    a caption such as "a photo" are two samples, not a duplicate)."""
    if given is not None:
        ids = pc.cast(given, pa.string()) if not pa.types.is_string(given.type) else given
        if ids.null_count == 0:
            return ids
        out = ids.to_pylist()
    else:
        out = [None] * len(captions)
    caps, us = captions.to_pylist(), uris.to_pylist()
    for i, v in enumerate(out):
        if v is None:
            if us[i] is None and image is not None:
                out[i] = content_id(np.ascontiguousarray(image[i], dtype="<f4").tobytes(), caps[i] or "", "vector")
            else:
                out[i] = content_id(b"", caps[i] or "", us[i] or "")
    return pa.array(out, pa.string())
