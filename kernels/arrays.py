"""Arrow ↔ numpy for embedding columns (FLOAT[d] / LIST<FLOAT>), pyarrow and numpy only.

Every layer converts vector columns through these: the store writes `fixed_list` and reads
`to_numpy`, the DuckDB UDFs read their batches with `matrix`, the vector search with `vectors`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsql.errors import DimensionMismatch, StorageError

# how a model's vectors are stored (`ModelRecord.storage`): numpy dtype of each
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}
FLOAT16_MAX = float(np.finfo(np.float16).max)     # 65504


def storage_dtype(storage: str) -> type:
    try:
        return STORAGE_DTYPES[storage]
    except KeyError:
        raise StorageError(f"unknown storage {storage!r}: use one of {', '.join(STORAGE_DTYPES)}",
                           param="storage") from None


def as_stored(X: np.ndarray, storage: str = "float32") -> np.ndarray:
    """(n, d) float32 vectors exactly as a column of `storage` holds them: float16 rounds each value
    to the nearest float16 (ties to even) and widens it back (exact), so statistics folded from the
    result equal those of the stored table. NaN stays NaN (a NULL row); a finite value beyond
    float16's range (±65504) is refused rather than stored as ±inf."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if storage_dtype(storage) is np.float32 or X.size == 0:
        return X
    with np.errstate(invalid="ignore"):
        big = np.abs(X) > FLOAT16_MAX
    if big.any() and np.isfinite(X[big]).any():
        worst = float(np.nanmax(np.where(np.isfinite(X), np.abs(X), 0)))
        raise StorageError(f"a vector holds {worst:.6g}, beyond float16's range (±65504): this model's "
                           "vectors cannot be stored as float16; store them as float32 (remove the model with "
                           "`clipsql models rm` and ingest again with `storage` float32)", param="storage")
    return X.astype(np.float16).astype(np.float32)


def fixed_list(X: np.ndarray, dim: int, nan_is_null: bool = False,
               storage: str = "float32") -> pa.FixedSizeListArray:
    """(n, d) → FLOAT[d] (HALF_FLOAT[d] with `storage` float16: pass values `as_stored` already
    rounded, which this narrows exactly); with `nan_is_null`, rows that are NaN (no vector: an image
    kept without a caption has no text embedding) become NULL."""
    dtype = storage_dtype(storage)
    X = np.ascontiguousarray(X, dtype=np.float32)
    if nan_is_null and len(X) and np.isnan(X[:, 0]).any():
        missing = np.isnan(X[:, 0])
        flat = pa.array(np.where(missing[:, None], np.float32(0), X).astype(dtype, copy=False).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(missing))
    return pa.FixedSizeListArray.from_arrays(pa.array(X.astype(dtype, copy=False).reshape(-1)), dim)


def widened_table(tbl: pa.Table) -> pa.Table:
    """`tbl` with each HALF_FLOAT[d] column as FLOAT[d] (what DuckDB reads: it has no half float)."""
    schema = widened_schema(tbl.schema)
    return tbl if schema.equals(tbl.schema) else tbl.cast(schema)


def widened_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_fixed_size_list(t) and pa.types.is_float16(t.value_type):
        return pa.list_(pa.float32(), t.list_size)
    return t


def widened_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_type(widened_type(f.type)) for f in schema], metadata=schema.metadata)


def _float32(values: pa.Array) -> pa.Array:
    """The values of a float16-stored column widened to float32 (exact; Arrow's cast is several
    times faster than numpy's); others as they are."""
    return values.cast(pa.float32()) if pa.types.is_float16(values.type) else values


def to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """FLOAT[d] column → (n, d) float32 array (zero-copy where possible); NULL rows are NaN rows."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    dim = arr.type.list_size
    out = _float32(arr.values).to_numpy(zero_copy_only=False).reshape(len(arr), dim)
    if arr.null_count:
        out = out.astype(np.float32, copy=True)
        out[~arr.is_valid().to_numpy(zero_copy_only=False)] = np.nan
    return out


def matrix(arr: Any, dim: int, what: str = "embedding", dtype: Any = np.float64) -> np.ndarray:
    """Arrow list array → (n, dim) `dtype` (float64, or float32: zero-copy from a FLOAT column when
    it has no NULL); NULL rows become NaN rows; a wrong length raises."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if n == 0:
        return np.empty((0, dim), dtype=dtype)
    if arr.null_count == 0:      # the common case: read the child values buffer directly
        if pa.types.is_fixed_size_list(arr.type) and arr.type.list_size == dim:
            start = arr.offset * dim
        elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            offsets = arr.offsets.to_numpy()
            start = int(offsets[0]) if (np.diff(offsets) == dim).all() else None
        else:
            start = None
        if start is not None:
            flat = arr.values.slice(start, n * dim).to_numpy(zero_copy_only=False)
            return flat.astype(dtype, copy=False).reshape(n, dim)
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    valid = ~np.isnan(lengths.astype(np.float64)) if arr.null_count else np.ones(n, bool)
    bad = valid & (lengths != dim)
    if bad.any():
        got = int(lengths[np.flatnonzero(bad)[0]])
        raise DimensionMismatch(f"{what} has {got} dimensions but the model has {dim}")
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    if valid.all():
        return flat.reshape(n, dim)
    out = np.full((n, dim), np.nan, dtype=dtype)
    out[valid] = flat.reshape(-1, dim)
    return out


def take_rows(arr: Any, idx: np.ndarray) -> Any:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.take(pa.array(idx))


def vectors(arr: Any) -> np.ndarray:
    """FLOAT[d] Arrow array (offset-aware) → (n, d) float32; NULL rows are NaN rows."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    d = arr.type.list_size
    flat = _float32(arr.values.slice(arr.offset * d, len(arr) * d)).to_numpy(zero_copy_only=False)
    X = flat.reshape(len(arr), d)
    if arr.null_count:
        X = X.astype(np.float32, copy=True)
        X[~arr.is_valid().to_numpy(zero_copy_only=False)] = np.nan
    return X
