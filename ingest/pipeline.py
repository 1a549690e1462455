"""The ingest worker: read → decode/encode → write → stats, each stage timed.

Idempotent and resumable: source units the commit ledger holds for the model are
skipped unread; within new units a sample's id (a content hash, or the source's id
column) is checked against the store's id index, so a re-run adds nothing and a
killed run picks up after its last commit (see store.store for the write protocol).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from clipsql.errors import DimensionMismatch, SourceError
from clipsql.ingest.datacomp import FEATURES, DataCompSource, pick_features, pool_dir
from clipsql.ingest.dedup import IdChecker
from clipsql.ingest.encode import Prepared, open_clip_encoder, prepare_item
from clipsql.ingest.registry import open_source
from clipsql.ingest.rows import samples_columns, samples_table
from clipsql.ingest.sources import DEFAULT_MAX_FILE_BYTES, Reject
from clipsql.ingest.update import Updater, require_ids, row_arrays
from clipsql.lazy import threadpoolctl, torch, torch_data, tqdm
from clipsql.models import loading as models
from clipsql.store.deletions import merge_days
from clipsql.store.maintenance import maintain_after_ingest
from clipsql.store.store import Store
from clipsql.store.tables import metadata_aliases
from clipsql.store.writer import CommitPolicy, Writer


@dataclass
class IngestOptions:
    batch_size: int = 256
    workers: int | None = None          # None: default_workers(device)
    device: str = "auto"
    image_column: str = "image"
    caption_column: str = "caption"
    id_column: str | None = None
    image_embeddings: str | None = None
    text_embeddings: str | None = None
    source_kind: str | None = None
    datacomp_features: str | None = None   # DataComp pools: b32 | l14 (None: from the model)
    progress: bool = True
    policy: CommitPolicy = field(default_factory=CommitPolicy)   # when to commit (rows / seconds)
    maintain: bool = True               # compact / index / prune when thresholds are crossed
    update: bool = False                # rewrite stored rows whose caption / metadata changed (needs ids)
    allow_missing_captions: bool = False   # keep images without a caption (NULL caption and text embedding)
    model_given: bool = True            # False: the caller fell back to a default model (no --model)
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES   # larger image / caption files are rejected unread
    # What loads and runs the model: (spec, device) -> an encoder (see encode.Encoder: `.loaded`, a
    # models.LoadedModel; called with (pixels, tokens) it gives (image, text) float32 vectors;
    # `.text(tokens)`). None: open_clip (encode.open_clip_encoder). Library callers (the tests) pass
    # their own; the local engine only.
    encoder_factory: Callable[[Any, str], Any] | None = None


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


@dataclass
class IngestSummary:
    run_id: int
    model_id: str
    source: str
    added: int = 0
    skipped: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)   # per stage
    wall_seconds: float = 0.0
    status: str = "running"
    device: str = ""
    workers: int = 0
    commits: int = 0
    units_skipped: int = 0              # source units the ledger already held
    updated: int = 0                    # rows re-encoded with a changed caption (--update)
    updated_samples: int = 0            # samples whose caption or metadata was rewritten (--update)
    deleted: int = 0                    # rows skipped because `clipsql delete` recorded their ids
    samples_restored: int = 0           # samples written for stored embeddings (a repair lost them)
    deleted_on: list = field(default_factory=list)   # [first, last] day (UTC) those ids were deleted
    notes: list = field(default_factory=list)   # things the user should know (renamed metadata columns)
    maintenance: dict = field(default_factory=dict)
    id_column: str | None = None        # the source column the ids came from; None: content hashes (DataComp: uids)

    @property
    def rows_per_second(self) -> float:
        return self.added / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows_per_second"] = round(self.rows_per_second, 2)
        return d


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
                 allow_missing_captions: bool = False):
        self.source, self.units, self.preprocess, self.tokenizer = source, units, preprocess, tokenizer
        self.dim, self.batch_size, self.allow_missing_captions = dim, batch_size, allow_missing_captions

    def my_units(self) -> list:
        """The units this reader takes: all of them in the main process."""
        return self.units

    def __iter__(self) -> Iterator[Prepared]:
        mine = self.my_units()
        out = Prepared()
        for unit, key in mine:
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
                                 done_ids=frozenset(), dim=self.dim, out=out,
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


@dataclass
class Plan:
    """What a run will do, decided under the writer lock before anything is loaded or written."""
    spec: Any
    source: Any
    source_name: str
    todo: list                  # [(unit, unit_key)] not yet in the ledger for this model
    done: dict                  # {unit_key: (rows, rejected)} already ingested
    known: Any                  # the model's record if the store has it
    seconds: Counter
    t_start: float

    @property
    def already(self) -> int:
        return sum(r for r, _ in self.done.values())


def plan_run(store: Store, source_path: str, model: str | None, pretrained: str | None, checkpoint: str | None,
             opts: IngestOptions) -> Plan:
    """Resolve the model, open the source and find its units the ledger does not hold (the caller
    holds the lock). Everything that can fail for the whole run fails here, before any write."""
    t_start = time.perf_counter()
    seconds: Counter = Counter()
    spec = models.resolve_known(model, pretrained, checkpoint, [(m.model_id, m.spec) for m in store.list_models()]) \
        or models.resolve(model, pretrained, checkpoint)
    seconds["resolve_model"] = time.perf_counter() - t_start
    source = open_source(source_path, image_column=opts.image_column, caption_column=opts.caption_column,
                         id_column=opts.id_column, image_embeddings=opts.image_embeddings,
                         text_embeddings=opts.text_embeddings, kind=opts.source_kind,
                         datacomp_features=opts.datacomp_features)
    if source.kind == "datacomp":   # its features are one model's: refuse filing them under another
        source.bind_model(spec.model_id)
    source_name = source.canonical()
    source.max_file_bytes = int(opts.max_file_bytes)
    require_ids(opts.id_column, opts.update)
    if source.precomputed and not opts.model_given and spec.given in models.BUNDLED:
        raise SourceError(f"{source_name} holds precomputed embeddings: name the model that made them with "
                          "--model (e.g. --model ViT-B-32 --pretrained laion2b_s34b_b79k); clipsql cannot "
                          "tell it from the vectors, and filing them under the demo model would be wrong")
    store.recover()
    t0 = time.perf_counter()
    units = source.units()
    keys = [source.unit_key(u) for u in units]
    known = {m.model_id: m for m in store.list_models()}.get(spec.model_id)
    done = store.done_units(known, keys) if known is not None else {}
    todo = [(u, k) for u, k in zip(units, keys) if k not in done]
    seconds["plan"] = time.perf_counter() - t0
    return Plan(spec, source, source_name, todo, done, known, seconds, t_start)


def finish_noop(store: Store, plan: Plan) -> IngestSummary | None:
    """When the ledger holds every unit: record a run that did nothing (no model load, no reads)."""
    if plan.known is None or plan.todo:
        return None
    run_id = store.start_run(plan.known.model_id, plan.source_name, plan.source.kind)
    summary = IngestSummary(run_id, plan.known.model_id, plan.source_name, skipped=plan.already, status="done",
                            units_skipped=len(plan.done), id_column=getattr(plan.source, "id_column", None))
    summary.wall_seconds = time.perf_counter() - plan.t_start
    summary.seconds = {k: round(v, 4) for k, v in plan.seconds.items()}
    store.finish_run(run_id, "done", plan.already, summary.to_dict())
    return summary


def register_model(store: Store, plan: Plan, device: str,
                   encoder_factory: Callable[[Any, str], Any] | None = None) -> tuple[Any, Any]:
    """(model record, encoder or None): the model is loaded (`encoder_factory`, open_clip by
    default) when images must be encoded (or its weights are local), and checked against a
    precomputed source's dimension. The encoder's `.loaded` is the models.LoadedModel."""
    t0 = time.perf_counter()
    spec, source = plan.spec, plan.source
    encoder = loaded = None
    if not source.precomputed or spec.local:
        encoder = (encoder_factory or open_clip_encoder)(spec, device)
        loaded = encoder.loaded
    plan.seconds["load_model"] = time.perf_counter() - t0
    if source.precomputed:
        dim = source.dim()
        if loaded is not None and dim != loaded.dim:
            raise DimensionMismatch(f"{spec.model_id} produces {loaded.dim}-d embeddings but "
                                    f"{plan.source_name} holds {dim}-d vectors: name the model that made them")
        fields = loaded.record_fields() if loaded is not None else models.record_without_weights(spec, dim)
    else:
        fields = loaded.record_fields()
    rec = store.register_model(**fields)
    store.sync_stats(rec)   # stores written before the commit ledger may lag
    return rec, encoder


def ingest(store: Store, source_path: str, *, model: str | None = None, pretrained: str | None = None,
           checkpoint: str | None = None, options: IngestOptions | None = None,
           on_batch: Any = None) -> IngestSummary:
    """Ingest one source with one model into the store. Returns the run's summary.

    The writer lock is taken first (a second writer is refused at once); everything that
    can fail for the whole run (unknown model, unreadable source) fails before the first
    write; bad items become rejects. Source units the ledger already holds for this model
    are skipped without being read, and when nothing is new the model is not even loaded.
    """
    opts = options or IngestOptions()
    with store.lock():
        plan = plan_run(store, source_path, model, pretrained, checkpoint, opts)
        noop = finish_noop(store, plan)
        if noop is not None:
            return noop
        meta_before = set(store.metadata_columns())
        rec, encoder = register_model(store, plan, opts.device, opts.encoder_factory)
        source, source_name, todo, done, already = plan.source, plan.source_name, plan.todo, plan.done, plan.already
        seconds, t_start = plan.seconds, plan.t_start
        run_id = store.start_run(rec.model_id, source_name, source.kind)
        summary = IngestSummary(run_id, rec.model_id, source_name, skipped=already, units_skipped=len(done),
                                id_column=getattr(source, "id_column", None))
        rejected: Counter = Counter()
        writer = Writer(store, rec, run_id=run_id, source=source_name, policy=opts.policy)
        bar = _progress(opts.progress, rec.model_id)
        bar.update(already)
        r = _Run(source, todo, rec, encoder, opts, writer, IdChecker(store, rec), summary, rejected, seconds,
                 bar, on_batch, Updater(store, rec) if opts.update else None)
        ok = False
        try:
            with _blas_pin():
                (_ingest_columns if source.precomputed else _ingest_items)(r)
            t0 = time.perf_counter()
            r.commit()
            seconds["write"] += time.perf_counter() - t0
            ok = True
            summary.status = "done"
        except BaseException:
            summary.status = "failed"
            raise
        finally:
            bar.close()
            # after a failure (a full disk, say) the bookkeeping below may fail too; it must never
            # replace the error that stopped the run (the next writer marks the run aborted)
            with unless_failing(summary):
                writer.close(commit=False)
            seconds["stats"] = writer.fold_wait_seconds
            seconds["stats (background)"] = writer.fold_seconds
            summary.commits = writer.commits
            summary.rejected = dict(rejected)
            summary.wall_seconds = time.perf_counter() - t_start
            summary.seconds = {k: round(v, 4) for k, v in seconds.items()}
            with unless_failing(summary):
                store.finish_run(run_id, summary.status, summary.skipped, summary.to_dict())
        if ok:
            summary.notes += renamed_metadata(store, meta_before)
        if ok and opts.maintain:
            t0 = time.perf_counter()
            summary.maintenance = maintain_after_ingest(store, rec)
            summary.seconds["maintain"] = round(time.perf_counter() - t0, 4)
    return summary


class unless_failing:
    """Suppress errors of cleanup code while the run is already failing (keeps the first error)."""

    def __init__(self, summary: IngestSummary):
        self.summary = summary

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, value: Any, tb: Any) -> bool:
        return kind is not None and issubclass(kind, Exception) and self.summary.status == "failed"


def renamed_metadata(store: Store, before: set[str]) -> list[str]:
    """A note per metadata column this run added whose name in `samples` differs from the source's."""
    aliases = metadata_aliases(list(store.metadata_columns()))
    lower = {n.lower(): n for n in reversed(list(aliases))}     # the first key of each case-insensitive name
    return [f"metadata column {name!r} is {alias!r} in the samples view ("
            + (f"{name} is a samples column" if alias.startswith("meta_")
               else f"SQL names ignore case and {lower[name.lower()]!r} came first") + ")"
            for name, alias in sorted(aliases.items()) if name not in before and alias != name]


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


@dataclass
class _Run:
    """What the two ingest loops share for one run."""
    source: Any
    todo: list
    rec: Any
    encoder: Any                        # None for precomputed vectors without local weights
    opts: IngestOptions
    writer: Writer
    checker: IdChecker
    summary: IngestSummary
    rejected: Counter
    seconds: Counter
    bar: Any
    on_batch: Any
    updater: Updater | None

    def queue_updates(self, ids: pa.Array, new_sample: np.ndarray, new_emb: np.ndarray, dup: np.ndarray,
                      caption: pa.Array, metadata: pa.Array, truncated: pa.Array, meta_types: dict | None,
                      text: Any) -> None:
        """--update: queue rewrites of the batch's stored rows whose caption or metadata changed."""
        if self.updater is None:
            return
        n = self.updater.check(ids, caption, metadata, truncated, ~dup & ~new_sample, ~dup & ~new_emb, text,
                               meta_types)
        self.summary.updated += n
        self.summary.skipped -= n
        self.updater.flush()

    def commit(self) -> None:
        """A writer commit marks source units done, so the units' queued rewrites go first
        (a kill in between leaves the units to redo, never rewrites lost)."""
        if self.updater is not None:
            self.updater.flush(force=True)
            self.summary.updated_samples = self.updater.updated_samples
        self.writer.commit()


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


def _commit_if_due(r: _Run) -> None:
    if r.writer.due():
        t0 = time.perf_counter()
        r.commit()
        r.checker.committed()
        r.seconds["write"] += time.perf_counter() - t0


def _ingest_items(r: _Run) -> None:
    """Images: decode/preprocess (DataLoader workers when asked) → forward → writer."""
    source, todo, rec, encoder, opts, writer = r.source, r.todo, r.rec, r.encoder, r.opts, r.writer
    checker, summary, rejected, seconds, bar, on_batch = r.checker, r.summary, r.rejected, r.seconds, r.bar, r.on_batch
    loaded = encoder.loaded
    workers = default_workers(loaded.device) if opts.workers is None else max(0, opts.workers)
    summary.workers, summary.device = workers, str(loaded.device)
    args = (source, todo, loaded.preprocess, loaded.tokenizer, rec.dim, opts.batch_size, opts.allow_missing_captions)
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
                tokens = prepared.tokens
                r.queue_updates(ids, new_sample, new_emb, dup, *row_arrays(rows),
                                lambda idx: encoder.text([tokens[i] for i in idx]))
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
        writer.reject(rejects)
        for key, n_rows, n_rej in prepared.units_done:
            writer.unit_done(key, n_rows, n_rej)
        for _, reason, _ in rejects:
            rejected[reason] += 1
        _commit_if_due(r)
        bar.update(len(prepared.rows) + len(prepared.rejects))
        bar.set_postfix(added=summary.added, skipped=summary.skipped, rejected=sum(rejected.values()))
        if on_batch is not None:
            on_batch(summary)


def _ingest_columns(r: _Run) -> None:
    """Precomputed vectors: whole units as Arrow columns, read one unit ahead on a thread."""
    source, todo, rec, writer = r.source, r.todo, r.rec, r.writer
    checker, summary, rejected, seconds, bar, on_batch = r.checker, r.summary, r.rejected, r.seconds, r.bar, r.on_batch

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
            r.queue_updates(cols.ids, new_sample, new_emb, dup, cols.caption, cols.metadata,
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
            writer.reject(rejects)
            writer.unit_done(key, len(cols), len(rejects))
            for _, reason, _ in rejects:
                rejected[reason] += 1
            seconds["write"] += time.perf_counter() - t0
            _commit_if_due(r)
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
