"""The local engine's ingest: read → decode/encode → write → stats, each stage timed, in this process.

Idempotent and resumable: source units the commit ledger holds for the model are
skipped unread; within new units a sample's id (a content hash, or the source's id
column) is checked against the store's id index, so a re-run adds nothing and a
killed run picks up after its last commit (see store.ledger for the write protocol). The run's
lifecycle and its commits are ingest.run's (the Ray engine runs the same, with its own stages).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from clipsql.errors import SourceError
from clipsql.ingest.datacomp import FEATURES, DataCompSource, pick_features, pool_dir
from clipsql.ingest.dedup import IdChecker
from clipsql.ingest.encode import Prepared, caption_truncated, identify, prepare_item
from clipsql.ingest.rows import samples_columns, samples_table
from clipsql.ingest.run import IngestOptions, IngestRun, IngestSummary, run_ingest
from clipsql.ingest.sources import Reject
from clipsql.ingest.update import row_arrays
from clipsql.lazy import threadpoolctl, torch, torch_data, tqdm
from clipsql.store.deletions import merge_days
from clipsql.store.reads import stored_ids
from clipsql.store.store import Store

__all__ = ["IngestOptions", "IngestSummary", "default_workers", "ingest", "ingest_pool"]


def default_workers(device: str, cpus: int | None = None) -> int:
    """Decode workers when the user does not say: on CUDA the cores are free for decoding
    (all but one, up to 8); on CPU the forward already uses every core, and a decode worker
    takes cores from it — measured on 2 cores, workers=0 was faster for both a decode-bound
    model (0.39 vs 0.19 of the bare forward) and a ViT (0.94 vs 0.81) — so one worker per
    4 cores, up to 4 (none on 2 cores)."""
    cpus = cpus or os.cpu_count() or 1
    if str(device).startswith("cuda"):
        return min(8, max(1, cpus - 1))
    return min(4, cpus // 4)


def _prepared_stream(*args: Any) -> Any:
    """A `_PreparedStream` that is a torch IterableDataset, for DataLoader workers (torch is
    imported only then): each worker takes every n-th unit."""
    class _Stream(_PreparedStream, torch_data.IterableDataset):
        def my_units(self) -> list:
            info = torch_data.get_worker_info()
            if info is None:
                return self.units
            torch.set_num_threads(1)
            return self.units[info.id::info.num_workers]
    return _Stream(*args)


class _PreparedStream:
    """Prepared batches over source units (read, decode, preprocess, tokenize).

    A unit's last batch carries `unit_done = (key, rows, rejects)`: every row of the unit
    arrived in it or in that reader's earlier batches, so the writer may mark it done."""

    def __init__(self, source: Any, units: list, preprocess: Any, tokenizer: Any, dim: int, batch_size: int,
                 allow_missing_captions: bool = False, stored: dict | None = None):
        self.source, self.units, self.preprocess, self.tokenizer = source, units, preprocess, tokenizer
        self.dim, self.batch_size, self.allow_missing_captions = dim, batch_size, allow_missing_captions
        self.stored = stored or {}     # {unit key: ids stored before the run}: not decoded

    def my_units(self) -> list:
        """The units this reader takes: all of them in the main process."""
        return self.units

    def __iter__(self) -> Iterator[Prepared]:
        mine = self.my_units()
        out = Prepared()
        for unit, key in mine:
            done_ids = self.stored.get(key, frozenset())
            records = iter(self.source.read(unit))
            rows = rejects = 0
            while True:
                t0 = time.perf_counter()
                rec = next(records, None)
                out.read_seconds += time.perf_counter() - t0
                if rec is None:
                    break
                before = len(out.rejects)
                if isinstance(rec, Reject):
                    out.rejects.append((rec.location, rec.reason, rec.detail))
                else:
                    prepare_item(rec, preprocess=self.preprocess, tokenizer=self.tokenizer,
                                 done_ids=done_ids, dim=self.dim, out=out,
                                 allow_missing_captions=self.allow_missing_captions)
                if len(out.rejects) > before:
                    rejects += 1
                else:
                    rows += 1
                if len(out.rows) + len(out.rejects) >= self.batch_size:
                    yield out
                    out = Prepared()
            out.units_done.append((key, rows, rejects))
            yield out
            out = Prepared()


def _identity(x: Any) -> Any:
    return x


def ingest(store: Store, source_path: str, *, model: str | None = None, pretrained: str | None = None,
           checkpoint: str | None = None, options: IngestOptions | None = None,
           on_batch: Any = None) -> IngestSummary:
    """Ingest one source with one model into the store, in this process. Returns the run's summary.

    The writer lock is taken first (a second writer is refused at once); everything that
    can fail for the whole run (unknown model, unreadable source) fails before the first
    write; bad items become rejects. Source units the ledger already holds for this model
    are skipped without being read, and when nothing is new the model is not even loaded
    (the lifecycle is ingest.run's, shared with the Ray engine).
    """
    opts = options or IngestOptions()

    def stages(run: IngestRun) -> None:
        bar = _progress(opts.progress, run.rec.model_id)
        bar.update(run.plan.already)
        try:
            with _blas_pin():
                (_ingest_columns if run.plan.source.precomputed else _ingest_items)(run, bar, on_batch)
        finally:
            bar.close()

    return run_ingest(store, source_path, model, pretrained, checkpoint, opts, stages=stages, device=opts.device,
                      encoder_factory=opts.encoder_factory)


def _blas_pin() -> Any:
    """numpy's BLAS on one thread while ingest runs (torch's own threads are OpenMP, untouched).
    The statistics fold (a SYRK per chunk, one thread per modality) runs beside Lance's encoder
    and, for images, the forward: with two BLAS threads the cores were oversubscribed — fold and
    write together took 18.5 s where one BLAS thread took 10.4 s (400k × 512, 2 cores), and a
    ViT-B-32 forward inside the pipeline ran 15 % slower than bare (OpenBLAS's spinning threads)."""
    try:
        threadpool_limits = threadpoolctl.threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _queue_updates(r: IngestRun, ids: pa.Array, new_sample: np.ndarray, new_emb: np.ndarray, dup: np.ndarray,
                   caption: pa.Array, metadata: pa.Array, truncated: pa.Array, meta_types: dict | None,
                   text: Any) -> None:
    """--update: queue rewrites of the batch's stored rows whose caption or metadata changed."""
    if r.updater is None:
        return
    n = r.updater.check(ids, caption, metadata, truncated, ~dup & ~new_sample, ~dup & ~new_emb, text, meta_types)
    r.summary.updated += n
    r.summary.skipped -= n
    r.updater.flush()


def _classify(checker: IdChecker, ids: pa.Array, locations: list[str] | None, loc_col: pa.Array | None,
              summary: IngestSummary, rejects: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows whose sample is new, rows whose embedding is new, rows to leave alone: duplicates, which
    become rejects, and ids recorded as deleted, which are skipped and counted)."""
    dup, in_s, in_e = checker.check(ids)
    gone, first, last = checker.deleted(ids)
    gone &= ~dup
    if gone.any():
        summary.deleted += int(gone.sum())
        summary.deleted_on = merge_days(summary.deleted_on, first, last)
        in_s, in_e = in_s | gone, in_e | gone
    if dup.any():
        idx = np.flatnonzero(dup)
        locs = [locations[i] for i in idx] if locations is not None else loc_col.take(pa.array(idx)).to_pylist()
        dup_ids = ids.take(pa.array(idx)).to_pylist()
        rejects += [(loc, "duplicate_id", f"id {sid} occurs earlier in this source") for loc, sid in zip(locs, dup_ids)]
    summary.skipped += int((~dup & ~gone & in_s & in_e).sum())
    summary.samples_restored += int((~dup & ~in_s & in_e).sum())
    return ~dup & ~in_s, ~dup & ~in_e, dup | gone


def _stored_before(r: IngestRun) -> tuple[dict, bool]:
    """({unit key: ids of its image items the store held at the run's start, in `samples` and the
    model's table, or recorded as deleted}, whether any image item needs encoding), from the items'
    bytes and captions, nothing decoded. Only when the store held rows at the run's start: the
    units are read once more (files, not pixels), which costs far less than decoding and encoding
    rows that are stored already."""
    source, checker, rec = r.plan.source, r.checker, r.rec
    if not checker.lookup:
        return {}, True
    out: dict = {}
    need = False
    for unit, key in r.plan.todo:
        sids = [identify(x, r.opts.allow_missing_captions) for x in source.read(unit)
                if not isinstance(x, Reject) and x.image_bytes is not None]
        known = [x for x in sids if x is not None]
        if known:
            ids = pa.array(known, pa.string())
            in_s, in_e = stored_ids(r.store, rec, ids, checker.before)
            gone, _, _ = checker.deleted(ids)
            stored = (in_s & in_e) | gone
            if stored.any():
                out[key] = frozenset(ids.filter(pa.array(stored)).to_pylist())
            need = need or not stored.all()
    return out, need


def _ingest_items(r: IngestRun, bar: Any, on_batch: Any) -> None:
    """Images: decode/preprocess (DataLoader workers when asked) → forward → writer. Items whose
    ids the store held at the run's start are neither decoded nor encoded, and the model is loaded
    only when some item needs encoding (or --update finds a changed caption)."""
    source, todo, rec, encoder, opts, writer = r.plan.source, r.plan.todo, r.rec, r.encoder, r.opts, r.writer
    checker, summary, rejected, seconds = r.checker, r.summary, r.rejected, r.seconds
    t0 = time.perf_counter()
    stored, need_model = _stored_before(r)
    seconds["read+check stored"] += time.perf_counter() - t0
    loaded = encoder.loaded if need_model else None
    workers = 0 if loaded is None else default_workers(loaded.device) if opts.workers is None else max(0, opts.workers)
    summary.workers, summary.device = workers, str(loaded.device) if loaded is not None else ""
    args = (source, todo, getattr(loaded, "preprocess", None), getattr(loaded, "tokenizer", None), rec.dim,
            opts.batch_size, opts.allow_missing_captions, stored)
    if workers:
        # Workers are forked (fast start, no re-import of torch) and only read source files and
        # decode images; they never call into Lance, so its fork-safety warning does not apply.
        warnings.filterwarnings("ignore", message=".*fork.*", module="lance.*")
        warnings.filterwarnings("ignore", message="lancedb fork support")
        batches = iter(torch_data.DataLoader(_prepared_stream(*args), batch_size=None,
                                             num_workers=min(workers, max(1, len(todo))), collate_fn=_identity,
                                             prefetch_factor=4, persistent_workers=False))
    else:
        batches = iter(_PreparedStream(*args))
    while True:
        t0 = time.perf_counter()
        prepared = next(batches, None)
        seconds["read+decode (wait)"] += time.perf_counter() - t0
        if prepared is None:
            break
        seconds["read (workers)"] += prepared.read_seconds
        seconds["decode (workers)"] += prepared.decode_seconds
        rejects = list(prepared.rejects)
        rows = prepared.rows
        if rows:
            ids = pa.array([x["id"] for x in rows], pa.string())
            new_sample, new_emb, dup = _classify(checker, ids, [x["location"] for x in rows], None, summary,
                                                 rejects)
            if r.updater is not None:
                caption, metadata, truncated, meta_types = row_arrays(rows)
                if any(x.get("stored") for x in rows):      # not tokenized: done for changed captions only
                    truncated = _truncated_later(encoder, rows, truncated)
                _queue_updates(r, ids, new_sample, new_emb, dup, caption, metadata, truncated, meta_types,
                               lambda idx, p=prepared: encoder.text(_tokens(encoder, p, idx)))
            need = np.flatnonzero(new_emb)
            t0 = time.perf_counter()
            if len(need):
                img, txt = encoder([prepared.pixels[i] for i in need], [prepared.tokens[i] for i in need])
            else:
                img = txt = np.empty((0, rec.dim), dtype=np.float32)
            seconds["encode"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            new_rows = [rows[i] for i in np.flatnonzero(new_sample)]
            samples_tbl, meta_types = samples_table(new_rows, summary.source) if new_rows else (None, {})
            take = pa.array(need, pa.int64())
            uri = pa.array([x["uri"] for x in rows], pa.string()).take(take)
            caption = pa.array([x["caption"] for x in rows], pa.string()).take(take)
            writer.add(samples_tbl, ids.take(take), img, txt, uri=uri, caption=caption, meta_types=meta_types)
            summary.added += len(need)
            seconds["write"] += time.perf_counter() - t0
        r.reject(rejects)
        for key, n_rows, n_rej in prepared.units_done:
            writer.unit_done(key, n_rows, n_rej)
        r.commit_if_due()
        bar.update(len(prepared.rows) + len(prepared.rejects))
        bar.set_postfix(added=summary.added, skipped=summary.skipped, rejected=sum(rejected.values()))
        if on_batch is not None:
            on_batch(summary)


def _tokens(encoder: Any, prepared: Prepared, idx: Any) -> list:
    """Tokens of rows `idx` of a batch: a stored row (not decoded) is tokenized now (--update
    re-encodes its changed caption), which loads the model if nothing did yet."""
    rows, tokens = prepared.rows, prepared.tokens
    missing = [i for i in idx if tokens[i] is None and rows[i]["caption"] is not None]
    if missing:
        tokenizer = encoder.loaded.tokenizer
        for i in missing:
            tokens[i] = tokenizer([rows[i]["caption"]])[0]
    return [tokens[i] for i in idx]


def _truncated_later(encoder: Any, rows: list[dict], truncated: pa.Array) -> Any:
    """caption_truncated of a batch's rows as a function of row positions, computed for the
    stored rows (which were not tokenized) only when --update rewrites their caption."""
    def take(idx: Any) -> pa.Array:
        out = truncated.take(pa.array(idx, pa.int64())).to_pylist()
        for j, i in enumerate(idx):
            if rows[i].get("stored") and rows[i]["caption"] is not None:
                out[j] = caption_truncated(encoder.loaded.tokenizer, rows[i]["caption"])
        return pa.array(out, pa.bool_())
    return take


def _ingest_columns(r: IngestRun, bar: Any, on_batch: Any) -> None:
    """Precomputed vectors: whole units as Arrow columns, read one unit ahead on a thread."""
    source, todo, rec, writer = r.plan.source, r.plan.todo, r.rec, r.writer
    checker, summary, rejected, seconds = r.checker, r.summary, r.rejected, r.seconds

    def read(unit: Any) -> tuple[Any, float]:
        t0 = time.perf_counter()
        cols = source.read_columns(unit, rec.dim)
        return cols, time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipsql-read") as pool:
        ahead = pool.submit(read, todo[0][0]) if todo else None
        for i, (unit, key) in enumerate(todo):
            t0 = time.perf_counter()
            cols, read_s = ahead.result()
            seconds["read (wait)"] += time.perf_counter() - t0
            seconds["read+check (thread)"] += read_s
            ahead = pool.submit(read, todo[i + 1][0]) if i + 1 < len(todo) else None
            t0 = time.perf_counter()
            rejects = list(cols.rejects)
            new_sample, new_emb, dup = _classify(checker, cols.ids, None, cols.location, summary, rejects)
            _queue_updates(r, cols.ids, new_sample, new_emb, dup, cols.caption, cols.metadata,
                           pa.array(np.zeros(len(cols), dtype=bool)), cols.meta_types,
                           lambda idx, c=cols: c.text[idx])
            seconds["dedup"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            samples_tbl = None
            if new_sample.any():
                s = cols if new_sample.all() else cols.take(np.flatnonzero(new_sample))
                samples_tbl = samples_columns(s, summary.source)
            e = cols if new_emb.all() else cols.take(np.flatnonzero(new_emb))
            writer.add(samples_tbl, e.ids, e.image, e.text, uri=e.uri, caption=e.caption,
                       meta_types=cols.meta_types if samples_tbl else None)
            summary.added += len(e)
            r.reject(rejects)
            # a row of the unit is stored (or skipped) or rejected, never both: its in-run duplicates
            # are rejects (as the Ray engine counts them)
            writer.unit_done(key, len(cols) - (len(rejects) - len(cols.rejects)), len(rejects))
            seconds["write"] += time.perf_counter() - t0
            r.commit_if_due()
            bar.update(len(cols) + len(cols.rejects))
            bar.set_postfix(added=summary.added, skipped=summary.skipped, rejected=sum(rejected.values()))
            if on_batch is not None:
                on_batch(summary)


def _progress(enabled: bool, model_id: str) -> Any:
    return tqdm.tqdm(desc=f"ingest [{model_id}]", unit="rows", disable=not enabled, dynamic_ncols=True,
                mininterval=0.5)


def ingest_pool(store: Any, path: Any, *, features: str | None = "all", model: str | None = None,
                pretrained: str | None = None, checkpoint: Any = None, options: Any = None,
                run: Any = None) -> list:
    """Ingest a DataComp pool: one run per feature set, each filed under its open_clip model.
    `run` is the ingest function (default `ingest`; an engine's `ingest`, e.g. the Ray one,
    fits too). Returns the runs' summaries, in b32, l14 order."""
    if checkpoint is not None:
        raise SourceError("a DataComp pool's vectors are precomputed: `checkpoint` does not apply", param="checkpoint")
    keys = pick_features(features, model, pretrained)
    if pool_dir(path) is None:
        DataCompSource(path)     # raises the SourceError that says what is missing
    run = run or ingest
    opts = options or IngestOptions()
    out = []
    for k in keys:
        arch, tag, _ = FEATURES[k]
        o = dataclasses.replace(opts, source_kind="datacomp", datacomp_features=k, model_given=True)
        out.append(run(store, os.fspath(path), model=arch, pretrained=tag, options=o))
    return out
