"""What runs on the workers: one source unit in, Lance data files and a statistics partial out.

Pure functions of a `RunContext` (picklable: the source, the model record, the store's path and
the table versions the run started from) and a unit. They use the same code as the local path:
`Source.read_columns` / `Source.read` + `ingest.encode.prepare_item` for the checks, the
`Encoder` for the forward pass, `kernels.moments.fold_pair` (through `update_moments`) for the
statistics, with the store's shift so the merges add without rounding. Nothing here commits: a
result names written data files that only the driver's commit makes visible. Under Ray the
written ids and the statistics partial go to the run's shard actors (engines.shards), not back to
the driver: a result is small whatever the unit's rows.
"""
from __future__ import annotations

import dataclasses
import io
import json
import pickle
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from clipsql.ingest.encode import Encoder, Prepared, prepare_item
from clipsql.ingest.rows import samples_columns, samples_table
from clipsql.ingest.sources import Reject
from clipsql.kernels.arrays import as_stored, fixed_list
from clipsql.engines.shards import Duplicates, id_shards, key_shard
from clipsql.lazy import lance, lance_fragment, torch
from clipsql.lazy import ray as _ray
from clipsql.models import loading as models
from clipsql.store.reads import stored_ids
from clipsql.store.records import ModelRecord
from clipsql.store.stats import StatsState, new_moments, update_moments
from clipsql.store.store import Store
from clipsql.store.tables import SAMPLES
from clipsql.store.writer import conform_samples
from clipsql.store import deletions


@dataclass
class RunContext:
    store_path: str
    rec: ModelRecord
    source: Any
    versions: dict            # {table: version} the run started from (what "already stored" means)
    shifts: dict              # {(modality, space): shift or None}: the store's statistics shift
    seq: int                  # the write batch number every row of this run carries
    storage_versions: dict    # {table: Lance data storage version}
    allow_missing_captions: bool = False
    device: str = "auto"
    spec: Any = None          # the model spec (image sources: each encoder actor loads it)
    batch_size: int = 256
    preprocess: Any = None    # image sources: the model's transform and tokenizer (picklable)
    tokenizer: Any = None
    shards: list | None = None    # the run's shard actors (engines.shards): ids and partials go there


@dataclass
class UnitResult:
    key: str
    fragments: list = field(default_factory=list)          # FragmentMetadata JSON, model table
    sample_fragments: list = field(default_factory=list)   # FragmentMetadata JSON, samples
    rows: int = 0                                          # embedding rows written
    sample_rows: int = 0
    moments: bytes = b""                                   # pickled {(modality, space): RunningMoments}
    ids: bytes = b""                                       # Arrow IPC of the written embedding ids
    sharded: bool = False                                  # ids and partial went to the shards instead
    rejects: list = field(default_factory=list)            # (location, reason, detail)
    unit_rows: int = 0                                     # rows of the unit accepted (stored or skipped)
    unit_rejected: int = 0
    meta_types: dict = field(default_factory=dict)
    skipped: int = 0                                       # rows already in the store
    deleted: int = 0                                       # rows skipped: ids recorded as deleted
    samples_restored: int = 0                              # samples written for stored embeddings
    deleted_on: list = field(default_factory=list)         # [first, last] day those ids were deleted
    seconds: dict = field(default_factory=dict)

    def to_row(self) -> dict:
        return {"result": pickle.dumps(self, protocol=5)}

    @staticmethod
    def from_row(row: dict) -> "UnitResult":
        return pickle.loads(row["result"])


# --------------------------------------------------------------------------- what a task receives
def shared_context(ctx: RunContext, shards: list | None = None) -> RunContext:
    """The run context every task shares (put in the object store once), without the source: a source
    can list every unit's files, and each task would deserialise that list."""
    return dataclasses.replace(ctx, source=None, shards=shards if shards is not None else ctx.shards)


def unit_payload(source: Any, unit: Any, key: str) -> bytes:
    """One task's own work: its unit and key with a source describing only that unit
    (`Source.for_unit`), so its size does not grow with the number of units."""
    return pickle.dumps((*source.for_unit(unit), key), protocol=5)


def unit_task(shared: RunContext, payload: bytes) -> tuple[RunContext, Any, str]:
    """(the run context with the task's own source, the unit, its key) from `unit_payload`."""
    source, unit, key = pickle.loads(payload)
    return dataclasses.replace(shared, source=source), unit, key


def _store(ctx: RunContext) -> Store:
    st = getattr(_store, "cache", None)
    if st is None or str(st.path) != ctx.store_path:
        st = Store.open(ctx.store_path, read_only=True)
        _store.cache = st
    return st


def _already(ctx: RunContext, ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(in samples, in the model table) as of the versions the run started from (index lookups)."""
    st = _store(ctx)
    samples = st.samples_table(ctx.versions.get(SAMPLES)) if SAMPLES in ctx.versions else None
    emb = st.embeddings_table(ctx.rec, ctx.versions.get(ctx.rec.table_name))
    return stored_ids(st, ctx.rec, ids, (samples, emb))


def _deleted(ctx: RunContext, ids: pa.Array) -> tuple[np.ndarray, Any, Any]:
    """Which ids the deletions record (as the run found it) holds, and when they were deleted."""
    st = _store(ctx)
    version = ctx.versions.get(deletions.TABLE)
    return deletions.lookup(deletions.table(st, version) if version is not None else None, ids)


def _write(uri: str, tbl: pa.Table, storage_version: str) -> list[str]:
    if tbl.num_rows == 0:
        return []
    frags = lance_fragment.write_fragments(tbl, uri, schema=tbl.schema, max_rows_per_file=1 << 30,
                                           data_storage_version=storage_version)
    return [json.dumps(f.to_json()) for f in frags]


def _ids_ipc(ids: pa.Array) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, pa.schema([("id", pa.string())])) as w:
        w.write_table(pa.table({"id": ids}))
    return sink.getvalue()


def read_ids(blob: bytes) -> pa.Array:
    return pa.ipc.open_stream(blob).read_all().column("id").combine_chunks()


def write_unit(ctx: RunContext, key: str, ids: pa.Array, samples: pa.Table | None, image: np.ndarray,
               text: np.ndarray, uri: pa.Array, caption: pa.Array, rejects: list, unit_rows: int,
               meta_types: dict, exclude: Duplicates = Duplicates()) -> UnitResult:
    """Write the unit's rows the store does not hold (and not `exclude`'s: rows that repeat an earlier
    row of this run, as the shards found them) as Lance data files; fold their statistics partial."""
    st = _store(ctx)
    t0 = time.perf_counter()
    in_s, in_e = _already(ctx, ids)
    gone, first, last = _deleted(ctx, ids)
    skipped = int((in_s & in_e & ~gone).sum())
    in_s, in_e = in_s | gone, in_e | gone
    if exclude:
        dup = exclude.rows(ids)
        locs = samples_locations(samples, ids, dup) if dup.any() else []
        rejects = rejects + [(loc, "duplicate_id", f"id {i} occurs earlier in this source") for loc, i in locs]
        in_s, in_e = in_s | dup, in_e | dup
        unit_rows -= int(dup.sum())
    new_e = np.flatnonzero(~in_e)
    new_s = np.flatnonzero(~in_s)
    restored = int((~in_s & in_e).sum())
    res = UnitResult(key, rejects=rejects, unit_rows=unit_rows, unit_rejected=len(rejects), meta_types=meta_types,
                     skipped=skipped, deleted=int(gone.sum()), deleted_on=deletions.merge_days([], first, last),
                     samples_restored=restored)
    if samples is not None and len(new_s):
        names = st.samples_table(ctx.versions.get(SAMPLES)).schema.names
        res.sample_fragments = _write(st.table_uri(SAMPLES), conform_samples(samples.take(pa.array(new_s)), [
            n for n in samples.column_names if n in names]), ctx.storage_versions[SAMPLES])
        res.sample_rows = len(new_s)
    if len(new_e):
        t = pa.array(new_e, pa.int64())
        e_ids = ids.take(t)
        storage = ctx.rec.storage      # the vectors as stored, which the statistics are folded from too
        X, Y = as_stored(image[new_e], storage), as_stored(text[new_e], storage)
        emb_schema = st.dataset(ctx.rec.table_name, ctx.versions.get(ctx.rec.table_name)).schema
        cols = {"id": e_ids, "uri": uri.take(t), "caption": caption.take(t),
                "image_embedding": fixed_list(X, ctx.rec.dim, storage=storage),
                "text_embedding": fixed_list(Y, ctx.rec.dim, True, storage=storage),
                "seq": pa.array(np.full(len(new_e), ctx.seq, dtype=np.int64))}
        tbl = pa.table({k: cols[k] for k in emb_schema.names}, schema=emb_schema)
        res.fragments = _write(st.table_uri(ctx.rec.table_name), tbl, ctx.storage_versions[ctx.rec.table_name])
        state = StatsState(ctx.rec.model_id, new_moments(ctx.rec.dim, ctx.shifts), 0)
        update_moments(state, X, Y)
        res.rows = len(new_e)
        if ctx.shards:
            publish(ctx.shards, key, e_ids, state.moments)
            res.sharded = True
        else:
            res.moments = pickle.dumps(state.moments, protocol=5)
            res.ids = _ids_ipc(e_ids)
    res.seconds["write"] = time.perf_counter() - t0
    return res


def publish(shards: list, key: str, ids: pa.Array, moments: dict) -> None:
    """Send each shard its share of the unit's written ids, and the unit's shard its statistics
    partial (engines.shards), and wait: the driver, once it has the unit's result, finds them there."""
    k = len(shards)
    part = id_shards(ids, k)
    calls = []
    for p in range(k):
        mine = part == p
        if mine.any():
            calls.append(shards[p].stage.remote(key, ids if mine.all() else ids.filter(pa.array(mine))))
    calls.append(shards[key_shard(key, k)].put.remote(key, moments))
    _ray.get(calls)


def samples_locations(samples: pa.Table | None, ids: pa.Array, mask: np.ndarray) -> list[tuple[str, str]]:
    idx = pa.array(np.flatnonzero(mask), pa.int64())
    chosen = ids.take(idx).to_pylist()
    if samples is not None and "location" in samples.column_names and samples.num_rows == len(ids):
        return list(zip(samples.column("location").take(idx).to_pylist(), chosen))
    return [(f"id {i}", i) for i in chosen]


# --------------------------------------------------------------------------- precomputed
def precomputed_unit(ctx: RunContext, unit: Any, key: str, exclude: Duplicates = Duplicates()) -> UnitResult:
    """One unit of precomputed vectors: the columnar checks, then `write_unit`."""
    t0 = time.perf_counter()
    cols = ctx.source.read_columns(unit, ctx.rec.dim)
    read_s = time.perf_counter() - t0
    samples = samples_columns(cols, ctx.source.canonical()) if len(cols) else None
    res = write_unit(ctx, key, cols.ids, samples, cols.image, cols.text, cols.uri, cols.caption,
                     list(cols.rejects), len(cols), cols.meta_types, exclude)
    res.seconds["read+check"] = read_s
    return res


# --------------------------------------------------------------------------- images
def decode_unit(ctx: RunContext, unit: Any, key: str) -> dict:
    """CPU stage: read the unit, decode + preprocess its images and tokenize its captions."""
    out = Prepared()
    t0 = time.perf_counter()
    for item in ctx.source.read(unit):
        if isinstance(item, Reject):
            out.rejects.append((item.location, item.reason, item.detail))
            continue
        prepare_item(item, preprocess=ctx.preprocess, tokenizer=ctx.tokenizer, done_ids=frozenset(), dim=ctx.rec.dim,
                     out=out, allow_missing_captions=ctx.allow_missing_captions)
    payload = {"key": key, "source": ctx.source.canonical(), "rows": out.rows, "rejects": out.rejects,
               "pixels": np.stack([p.numpy() for p in out.pixels]) if out.pixels else None,
               "tokens": [None if t is None else t.numpy() for t in out.tokens],
               "seconds": {"read+decode": time.perf_counter() - t0}}
    return {"payload": pickle.dumps(payload, protocol=5)}


class EncodeWriter:
    """GPU (or CPU) stage, an actor: the model loaded once; each unit is encoded, written, folded.
    Its context is the shared one (`shared_context`: no source); a unit's payload names its source."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.loaded = models.load(ctx.spec, ctx.device)
        self.encoder = Encoder(self.loaded)

    def __call__(self, batch: dict) -> dict:
        out = []
        for blob in batch["payload"]:
            out.append(self.encode(pickle.loads(blob)).to_row()["result"])
        return {"result": out}

    def encode(self, p: dict, exclude: Duplicates = Duplicates()) -> UnitResult:
        ctx, rows = self.ctx, p["rows"]
        t0 = time.perf_counter()
        n = len(rows)
        if n:
            pixels = [torch.from_numpy(x) for x in p["pixels"]]
            tokens = [None if t is None else torch.from_numpy(t) for t in p["tokens"]]
            img, txt = [], []
            for i in range(0, n, ctx.batch_size):
                a, b = self.encoder(pixels[i:i + ctx.batch_size], tokens[i:i + ctx.batch_size])
                img.append(a)
                txt.append(b)
            image, text = np.concatenate(img), np.concatenate(txt)
        else:
            image = text = np.empty((0, ctx.rec.dim), dtype=np.float32)
        enc_s = time.perf_counter() - t0
        samples, meta_types = samples_table(rows, p["source"]) if n else (None, {})
        ids = pa.array([r["id"] for r in rows], pa.string())
        uri = pa.array([r["uri"] for r in rows], pa.string())
        caption = pa.array([r["caption"] for r in rows], pa.string())
        res = write_unit(ctx, p["key"], ids, samples, image, text, uri, caption, list(p["rejects"]), n, meta_types,
                         exclude)
        res.seconds.update(p["seconds"])
        res.seconds["encode"] = enc_s
        return res


def compact_task(uri: str, version: int, task: Any) -> Any:
    """One task of a compaction plan (store.compaction), run on a worker: rewrite its fragments of
    the table at `uri` as of `version` into new data files; the driver commits every task's result
    as one Lance version and then moves the ledger to it."""
    return task.execute(lance.dataset(uri, version=version))
