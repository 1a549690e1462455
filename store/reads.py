"""Reads of a model's rows at the committed versions: embeddings, row counts, which ids are stored,
and the uri and caption of ids. The functions take the store (`st`, a store.store.Store, which
sits above this module) and read through its committed datasets."""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsql.kernels.arrays import widened_schema, widened_table
from clipsql.lazy import pyarrow_dataset
from clipsql.store.records import ModelRecord


def read_embeddings(st: Any, model: ModelRecord, *, min_seq: int | None = None,
                    ids: list[str] | None = None,
                    columns: tuple[str, ...] = ("id", "image_embedding", "text_embedding")) -> pa.Table:
    """`columns` of the model's committed rows (those after `min_seq`, or with the given `ids`)."""
    ds = st.embeddings_table(model)
    filt = None
    if min_seq is not None:
        filt = pc.field("seq") > int(min_seq)
    if ids is not None:
        f = pc.field("id").isin(pa.array(ids, pa.string()))
        filt = f if filt is None else filt & f
    return ds.to_table(columns=list(columns), filter=filt)


def count_rows(st: Any, model: ModelRecord) -> int:
    """The model's committed rows."""
    return st.embeddings_table(model).count_rows()


def stored_ids(st: Any, model: ModelRecord, ids: pa.Array,
               tables: tuple[Any, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each of `ids`: (already in `samples`, already in the model's table), looked up through
    the `id` index (plus a scan of fragments not yet indexed), never a set of every stored id.
    `tables`: the (samples, model) datasets to look in (default: the committed versions)."""
    samples, emb = tables or (st.samples_table(), st.embeddings_table(model))
    n = len(ids)

    def lookup(ds: Any, keys: pa.Array) -> np.ndarray:
        if ds is None or len(keys) == 0 or ds.count_rows() == 0:
            return np.zeros(len(keys), dtype=bool)
        found = ds.to_table(columns=["id"], filter=pc.field("id").isin(keys)).column("id")
        return pc.is_in(keys, value_set=found.combine_chunks()).to_numpy(zero_copy_only=False)

    in_emb = lookup(emb, ids)
    in_samples = np.zeros(n, dtype=bool)
    if samples is None:
        return in_samples, in_emb
    # a model row is committed with its sample, so hits are checked only because a lost samples
    # data file (kept embeddings, `doctor --repair`) breaks that; they are rare (a resumed or
    # repaired run re-reading rows it holds). Misses need a look only where `samples` holds
    # rows the model does not (equal counts with no orphan: the same ids)
    hit = np.flatnonzero(in_emb)
    if len(hit):
        in_samples[hit] = lookup(samples, ids if len(hit) == n else ids.take(pa.array(hit)))
    miss = np.flatnonzero(~in_emb)
    if len(miss) and samples.count_rows() != (emb.count_rows() if emb else 0):
        in_samples[miss] = lookup(samples, ids if len(miss) == n else ids.take(pa.array(miss)))
    return in_samples, in_emb


def sample_fields(st: Any, ids: pa.Array, samples: pa.Table | None = None) -> tuple[pa.Array, pa.Array]:
    """uri and caption of each id, from `samples` (the rows about to be written) or the store."""
    parts = [samples.select(["id", "uri", "caption"])] if samples is not None and samples.num_rows else []
    have = pa.concat_tables(parts).column("id") if parts else pa.array([], pa.string())
    missing = ids.filter(pc.invert(pc.is_in(ids, value_set=have.combine_chunks() if parts else have)))
    stored = st.samples_table()
    if len(missing) and stored is not None:
        parts.append(stored.to_table(columns=["id", "uri", "caption"], filter=pc.field("id").isin(missing)))
    if not parts:
        return pa.nulls(len(ids), pa.string()), pa.nulls(len(ids), pa.string())
    known = pa.concat_tables(parts)
    idx = pc.index_in(ids, value_set=known.column("id").combine_chunks())
    return known.column("uri").take(idx).combine_chunks(), known.column("caption").take(idx).combine_chunks()


def for_duckdb(ds: Any) -> Any:
    """A Lance dataset (or Arrow table) as DuckDB may scan it: as it is, or, where it holds float16
    vectors (a model stored as float16), with them widened to FLOAT[d] as batches are read (DuckDB
    has no half float); the projection and filters DuckDB pushes still go to Lance."""
    if isinstance(ds, pa.Table):
        return widened_table(ds)
    schema = widened_schema(ds.schema)
    return ds if schema.equals(ds.schema) else _widened_class()(ds, schema)


@functools.cache
def _widened_class() -> type:
    """_Widened as a pyarrow Dataset (DuckDB scans those), made at first use: pyarrow.dataset
    imports pandas, which a command that reads no float16 table never needs."""
    return type("WidenedDataset", (_Widened, pyarrow_dataset.Dataset), {})


class _Widened:
    """A Lance dataset whose HALF_FLOAT[d] columns read as FLOAT[d] (exact). DuckDB's Arrow scan uses
    `schema` and `scanner(columns=…, filter=…)`; the reads below delegate to Lance likewise."""

    def __init__(self, ds: Any, schema: pa.Schema):     # no pyarrow state: Lance holds it
        self._ds, self._schema = ds, schema

    @property
    def schema(self) -> pa.Schema:
        return self._schema

    def scanner(self, *args: Any, **kwargs: Any) -> "_WidenedScanner":
        return _WidenedScanner(self._ds.scanner(*args, **kwargs))

    def count_rows(self, *args: Any, **kwargs: Any) -> int:
        return self._ds.count_rows(*args, **kwargs)

    def to_table(self, *args: Any, **kwargs: Any) -> pa.Table:
        return widened_table(self._ds.to_table(*args, **kwargs))

    def to_batches(self, *args: Any, **kwargs: Any) -> Any:
        for b in self._ds.to_batches(*args, **kwargs):
            yield b.cast(widened_schema(b.schema))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ds, name)


class _WidenedScanner:
    def __init__(self, scanner: Any):
        self._scanner = scanner

    @property
    def projected_schema(self) -> pa.Schema:
        return widened_schema(self._scanner.projected_schema)

    def to_reader(self) -> pa.RecordBatchReader:
        reader = self._scanner.to_reader()
        schema = widened_schema(reader.schema)
        if schema.equals(reader.schema):
            return reader
        return pa.RecordBatchReader.from_batches(schema, (b.cast(schema) for b in reader))

    def to_table(self) -> pa.Table:
        return self.to_reader().read_all()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scanner, name)
