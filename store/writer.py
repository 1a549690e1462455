"""The write path: data files as rows arrive, one ledger commit every N rows or T seconds.

    w = Writer(store, model, run_id=run, source="…")
    w.add(samples_tbl, ids, image, text)     # any number of small batches
    w.unit_done(key, rows, rejected)         # a source unit whose rows were all added
    if w.due(): w.commit()                   # the caller decides where a commit may fall
    w.close()                                # commits what is left

    w.add_written(fragments=…, moments=…, …)  # rows another process wrote (the Ray engine's workers)

    write_batch(store, model, samples=…, ids=…, image=…, text=…, …)   # one small batch, one commit

Buffers are streamed, in pieces of `fragment_bytes`, into one Lance data file per table and
commit (`lance.fragment.write_fragments`); nothing is visible until `commit()`, which hands the fragments, the
statistics partial of exactly those rows (folded on background threads, float64, with
the store's shift so the merge adds without rounding), the completed units and the
rejects to `ledger.commit` (see store.ledger for the protocol). Memory is bounded by the
buffer, not by the commit or the store.
"""
from __future__ import annotations

import contextlib
import queue
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from clipsql.errors import DimensionMismatch
from clipsql.kernels.arrays import as_stored, fixed_list
from clipsql.kernels.moments import fold_pair
from clipsql.lazy import lance_fragment
from clipsql.store.compaction import MAX_FRAGMENTS, MAX_TOTAL_FRAGMENTS, TaskRunner, bound_fragments
from clipsql.store import ledger
from clipsql.store.faults import fault
from clipsql.store.ledger import PendingCommit, merge_sql_types
from clipsql.store.reads import sample_fields
from clipsql.store.records import ModelRecord
from clipsql.store.stats import new_moments, saved_stats
from clipsql.store.store import Store
from clipsql.store.tables import SAMPLES, samples_schema


@dataclass(frozen=True)
class CommitPolicy:
    """When the writer commits and how large its data files are.

    Defaults measured with bench/scale.py (d = 512, 2 cores): a commit costs ~0.05 s plus
    one manifest per table that lists every fragment, so ≥ 100k rows a commit keeps
    versions ≤ 10 and manifests far below 1% of the data per 1M rows; 30 s bounds what a
    kill can lose. Rows reach the data file of their commit in pieces of `fragment_bytes` (what
    memory holds per table); a commit writes one data file per table (cut at 2 GiB).
    `max_fragments`: after a commit that leaves a table with more fragments, the writer compacts
    it back under the bound (store.compaction), so a commit's cost does not grow with the table;
    None: never during a run."""
    rows: int = 100_000
    seconds: float = 30.0
    fragment_bytes: int = 64 << 20
    max_fragments: int | None = MAX_FRAGMENTS

    def due(self, pending: PendingCommit, started: float, now: float | None = None) -> bool:
        """Whether `pending` (gathered since the monotonic time `started`) is to be committed now:
        it holds `rows` rows (embeddings or samples), or anything at all after `seconds`. The one
        commit rule: every engine's runs commit through `Writer.due`, which asks this."""
        if max(pending.rows, pending.sample_rows) >= self.rows:
            return True
        now = time.monotonic() if now is None else now
        return not pending.empty and now - started >= self.seconds


def conform_samples(samples: pa.Table, names: list[str]) -> pa.Table:
    """`samples` rows with only the columns `names` (those the store's samples table has)."""
    return samples if samples.column_names == names else samples.select(names)


class _Buffer:
    """Arrow tables for one Lance table, streamed into the data files of one commit on the writer's
    I/O thread (Lance's encoder releases the GIL), so reading, checking and the statistics fold of
    the next rows overlap with the write of these. Tables are handed over in pieces of ~`limit`
    bytes (at most two waiting: memory stays bounded) and all the pieces of one commit go into one
    data file of up to `file_bytes` (larger ones are cut by Lance): a commit adds one fragment per
    table, not one per piece, so tables hold fewer fragments and commits stay cheap."""

    def __init__(self, uri: str, schema: pa.Schema, storage_version: str, limit: int, io: ThreadPoolExecutor,
                 file_bytes: int = 2 << 30):
        self.uri, self.schema, self.storage_version, self.limit, self.io = uri, schema, storage_version, limit, io
        self.file_bytes = file_bytes
        self.tables: list[pa.Table] = []
        self.bytes = 0
        self.stream: tuple[queue.Queue, Future] | None = None   # the data file being written
        self.rows = 0               # rows handed to the stream + self.tables

    def add(self, tbl: pa.Table) -> None:
        if tbl.num_rows == 0:
            return
        self.tables.append(tbl)
        self.bytes += tbl.nbytes
        self.rows += tbl.num_rows
        if self.bytes >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.tables:
            return
        data = pa.concat_tables(self.tables) if len(self.tables) > 1 else self.tables[0]
        self.tables, self.bytes = [], 0
        if data.schema != self.schema:
            data = data.cast(self.schema)
        if self.stream is None:
            q: queue.Queue = queue.Queue(maxsize=2)
            self.stream = (q, self.io.submit(self._write, q))
        self._put(data)

    def _put(self, item: pa.Table | None) -> None:
        q, fut = self.stream
        while True:
            try:
                q.put(item, timeout=0.2)
                return
            except queue.Full:
                if fut.done():       # the write failed (a full disk): its error, not a hang
                    fut.result()
                    raise RuntimeError("the data file writer stopped")

    def _write(self, q: queue.Queue) -> list:
        fault("writer:data-file")

        def batches():
            while (tbl := q.get()) is not None:
                yield from tbl.to_batches()
        reader = pa.RecordBatchReader.from_batches(self.schema, batches())
        return lance_fragment.write_fragments(reader, self.uri, schema=self.schema, max_rows_per_file=1 << 30,
                                              max_bytes_per_file=self.file_bytes,
                                              data_storage_version=self.storage_version)

    def take(self) -> tuple[list, int]:
        self.flush()
        fragments = []
        if self.stream is not None:
            self._put(None)
            fragments = self.stream[1].result()
            self.stream = None
        out = fragments, self.rows
        self.rows = 0
        return out

    def abandon(self) -> None:
        """End a stream without committing it (its data file stays unreferenced)."""
        if self.stream is not None and not self.stream[1].done():
            with contextlib.suppress(Exception):     # a write that failed has nothing to end
                self._put(None)
        self.stream, self.tables, self.rows = None, [], 0


class Writer:
    """Appends one model's rows (and their new samples) to the store, in commits."""

    def __init__(self, store: Store, model: ModelRecord, *, run_id: int | None, source: str,
                 policy: CommitPolicy | None = None):
        self.store, self.model, self.run_id, self.source = store, model, run_id, source
        self.policy = policy or CommitPolicy()
        self.stamps: dict = {}           # {unit_key: store.units.UnitStamp}: recorded when the unit commits
        store.ensure_samples_table()
        state = saved_stats(store, model)
        self.seq = state.covered_seq
        self._shifts = {k: m.shift for k, m in state.moments.items()}
        # one fold thread per modality (each keeps its batches in order): with numpy's BLAS on one
        # thread, the two SYRKs use both cores when Lance's encoder leaves one free
        self._pools = {mo: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"clipsql-stats-{mo}")
                       for mo in ("image", "text")}
        # one thread per table: each streams the data file of the commit being gathered
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="clipsql-write")
        self._folds: list = []
        self._fold_s = {"image": 0.0, "text": 0.0}   # CPU seconds, each written by its own fold thread only
        self.fold_wait_seconds = 0.0     # main thread blocked on folds at a commit
        self.commit_seconds = 0.0
        self.commits = 0
        self.compactions: list[dict] = []   # what each compaction during the run did (store.compaction)
        # where a compaction during the run rewrites its fragments: None in this process; an engine
        # may set its workers (store.compaction.TaskRunner: the Ray engine does)
        self.compact_tasks: TaskRunner | None = None
        self.added = 0
        self._new_pending()

    def _new_pending(self, opened: dict | None = None) -> None:
        st, rec = self.store, self.model
        opened = opened or {}
        ds = opened.get(rec.table_name) or st.dataset(rec.table_name)
        version = ds.data_storage_version
        self._emb_schema = ds.schema     # tables from before uri/caption were copied lack them
        self._emb = _Buffer(st.table_uri(rec.table_name), self._emb_schema, version,
                            self.policy.fragment_bytes, self._io)
        samples = opened.get(SAMPLES) or st.dataset(SAMPLES)
        # a store from before the caption feature columns keeps its schema until `clipsql backfill`
        self._samples_names = [n for n in samples_schema().names if n in samples.schema.names]
        self._samples = _Buffer(st.table_uri(SAMPLES), samples_schema() if len(self._samples_names) ==
                                len(samples_schema()) else samples.schema, samples.data_storage_version,
                                self.policy.fragment_bytes, self._io)
        self.pending = PendingCommit(run_id=self.run_id, source=self.source, seq=self.seq + 1)
        self.pending.moments = new_moments(rec.dim, self._shifts)
        self._started = time.monotonic()

    # -- adding ---------------------------------------------------------------------------
    def add(self, samples: pa.Table | None, ids: pa.Array, image: np.ndarray, text: np.ndarray, *,
            uri: pa.Array | None = None, caption: pa.Array | None = None,
            meta_types: dict[str, str] | None = None) -> None:
        """Buffer new sample rows and the model's embedding rows (ids, their uri and caption,
        (n, d) float32 vectors each; a NaN text row is stored as a NULL text embedding)."""
        n = len(ids)
        if samples is not None and samples.num_rows:
            self._samples.add(conform_samples(samples, self._samples_names))
            self.pending.sample_rows += samples.num_rows
        self._meta_types(meta_types)
        if not n:
            return
        d, storage = self.model.dim, self.model.storage
        # the vectors as stored (float16 storage: rounded), which the statistics are folded from too
        image, text = as_stored(image, storage), as_stored(text, storage)
        cols = {"id": ids, "uri": uri if uri is not None else pa.nulls(n, pa.string()),
                "caption": caption if caption is not None else pa.nulls(n, pa.string()),
                "image_embedding": fixed_list(image, d, storage=storage),
                "text_embedding": fixed_list(text, d, nan_is_null=True, storage=storage),
                "seq": pa.array(np.full(n, self.pending.seq, dtype=np.int64))}
        self._emb.add(pa.table({k: cols[k] for k in self._emb_schema.names}, schema=self._emb_schema))
        self.pending.rows += n
        self.added += n
        for modality, X in (("image", image), ("text", text)):
            self._folds.append(self._pools[modality].submit(self._fold, self.pending.moments, modality, X))

    def add_written(self, *, fragments: list, sample_fragments: list, rows: int, sample_rows: int,
                    moments: dict | None, meta_types: dict[str, str] | None = None, seq: int) -> None:
        """Rows another process already wrote as data files (Lance `FragmentMetadata`), each row
        carrying write batch `seq` (≤ this writer's; the Ray engine's workers write before the commits
        are grouped): their fragments and statistics partial (`moments`, merged exactly; None: it
        comes through `add_moments` before the commit) join the pending commit, as the rows `add`
        buffers do."""
        if seq > self.pending.seq:
            raise ValueError(f"rows of write batch {seq} cannot join commit batch {self.pending.seq}")
        p = self.pending
        p.fragments += fragments
        p.sample_fragments += sample_fragments
        p.rows += rows
        p.sample_rows += sample_rows
        self._meta_types(meta_types)
        if rows and moments is not None:
            self.add_moments(moments)

    def add_moments(self, moments: dict) -> None:
        """A statistics partial of rows already added (`add_written` with `moments` None: the Ray
        engine merges its units' partials apart and hands one per commit), merged exactly."""
        for key, part in moments.items():
            self.pending.moments[key].merge(part)

    def _meta_types(self, meta_types: dict[str, str] | None) -> None:
        mt = self.pending.meta_types
        for k, v in (meta_types or {}).items():
            mt[k] = merge_sql_types(mt[k], v) if k in mt else v

    def _fold(self, moments: dict, modality: str, X: np.ndarray) -> None:
        t0 = time.thread_time()       # this thread's CPU: its wall time counts waits for a core too
        raw = moments[(modality, "raw")]
        fold_pair(raw, moments[(modality, "normalized")], X)
        if raw.shift is not None and self._shifts.get((modality, "raw")) is None:
            self._shifts[(modality, "raw")] = raw.shift
            self._shifts[(modality, "normalized")] = moments[(modality, "normalized")].shift
        self._fold_s[modality] += time.thread_time() - t0

    @property
    def fold_seconds(self) -> float:
        """CPU seconds the fold threads spent folding (summed over both). Not their wall time: the
        two threads run beside Lance's encoder on few cores, and summed wall time counted every
        wait for a core (on 2 busy cores it read ~3× the fold's CPU)."""
        return sum(self._fold_s.values())

    def shifts(self) -> dict:
        """{(modality, space): shift or None}: what the statistics partials of this writer's rows
        are centred on (a partial folded elsewhere with these merges without rounding)."""
        return {k: None if v is None else v.copy() for k, v in self._shifts.items()}

    def reject(self, rejects: list[tuple[str, str, str]]) -> None:
        self.pending.rejects.extend(rejects)

    def unit_done(self, unit_key: str, rows: int, rejected: int) -> None:
        self.pending.units.append((unit_key, rows, rejected))
        if unit_key in self.stamps:
            self.pending.stamps[unit_key] = self.stamps[unit_key]

    # -- committing -----------------------------------------------------------------------
    def due(self) -> bool:
        return self.policy.due(self.pending, self._started)

    def commit(self) -> int | None:
        t0 = time.perf_counter()
        for f in self._folds:
            f.result()
        self._folds = []
        self.fold_wait_seconds += time.perf_counter() - t0
        p = self.pending
        p.fragments += self._emb.take()[0]
        p.sample_fragments += self._samples.take()[0]
        commit_id = None
        if not p.empty:
            commit_id = ledger.commit(self.store, self.model, p)
            if p.rows:
                self.seq = p.seq
            self.commits += 1
        opened = {name: self.store.dataset(name) for name in (SAMPLES, self.model.table_name)}
        bound = self.policy.max_fragments
        if bound and commit_id is not None and \
                any(len(ds.get_fragments()) > min(bound, MAX_TOTAL_FRAGMENTS) for ds in opened.values()):
            for name, info in bound_fragments(self.store, list(opened), bound, self.compact_tasks).items():
                self.compactions.append({"table": name, **info})
            opened = {}
        self._new_pending(opened)
        self.commit_seconds += time.perf_counter() - t0
        return commit_id

    def close(self, commit: bool = True) -> None:
        """Commit what is pending (unless `commit=False`: an aborted run keeps only what it committed)."""
        try:
            if commit:
                self.commit()
        finally:
            for pool in self._pools.values():
                pool.shutdown(wait=True)
            for buf in (self._emb, self._samples):
                buf.abandon()
            self._io.shutdown(wait=True)


def write_batch(store: Store, model: ModelRecord, *, samples: pa.Table | None, ids: list[str],
                image: np.ndarray, text: np.ndarray, seq: int | None = None, run_id: int,
                source: str, rejects: list[tuple[str, str, str]], meta_types: dict[str, str]) -> None:
    """Write and commit one batch (a convenience over `Writer` for small writes)."""
    if image.shape != text.shape or image.ndim != 2 or image.shape[1] != model.dim:
        raise DimensionMismatch(f"model {model.model_id} has dim {model.dim}; got image {image.shape} "
                                f"and text {text.shape}")
    w = Writer(store, model, run_id=run_id, source=source)
    id_arr = pa.array(ids, pa.string())
    uri, caption = sample_fields(store, id_arr, samples)
    w.add(samples, id_arr, image, text, uri=uri, caption=caption, meta_types=meta_types)
    w.reject(rejects)
    w.commit()
    w.close()
