"""One ingest run, whichever engine runs its stages: the run lifecycle and its commit bookkeeping.

    run_ingest(store, source, …, stages=…):
      lock → plan (units the ledger lacks; everything that can fail for the whole run fails here)
      → nothing new: a no-op run is recorded, the model is not even loaded
      → register the model (loaded only when needed) → a run record → a `Writer`
      → stages(run): the engine reads, encodes and writes, handing rows (or data files other
        processes wrote, with their statistics partials) to the writer and calling
        `run.commit_if_due()`; the writer commits under the one commit policy
        (`CommitPolicy.due`: N rows or T seconds; one ledger transaction each)
      → the last commit → the run's summary and `finish_run` (also when the stages failed)
      → maintenance (compact / index / prune when thresholds are crossed).

The local engine's stages are ingest.pipeline's; the Ray engine's are engines.ingest's.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from clipsql.errors import DimensionMismatch, SourceError
from clipsql.ingest.dedup import IdChecker
from clipsql.ingest.encode import open_clip_encoder
from clipsql.ingest.planning import plan_units
from clipsql.ingest.registry import open_source
from clipsql.ingest.sources import DEFAULT_MAX_FILE_BYTES
from clipsql.ingest.update import Updater, require_ids
from clipsql.kernels.arrays import storage_dtype
from clipsql.models import loading as models
from clipsql.store.faults import fault
from clipsql.store.ledger import metadata_columns, recover
from clipsql.store.maintenance import OptimizeReport, maintain_after_ingest
from clipsql.store.runs import finish_run, start_run
from clipsql.store.stats import sync_stats
from clipsql.store.store import Store, check_storage
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
    # how the model's vectors are stored: float32, or float16 (half the bytes; every score within the
    # bounds README "Float16 storage" states). Chosen by the model's first ingest; None: float32 for a
    # new model, the model's own for one the store holds (asking it for the other is refused)
    storage: str | None = None
    # What loads and runs the model: (spec, device) -> an encoder (see encode.Encoder: `.loaded`, a
    # models.LoadedModel; called with (pixels, tokens) it gives (image, text) float32 vectors;
    # `.text(tokens)`). None: open_clip (encode.open_clip_encoder). Library callers (the tests) pass
    # their own; the local engine only.
    encoder_factory: Callable[[Any, str], Any] | None = None


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
    maintenance: OptimizeReport | None = None     # what the ingest's maintenance did (None: nothing due)
    id_column: str | None = None        # the source column the ids came from; None: content hashes (DataComp: uids)

    @property
    def rows_per_second(self) -> float:
        return self.added / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["maintenance"] = self.maintenance.as_dict() if self.maintenance else {}
        d["rows_per_second"] = round(self.rows_per_second, 2)
        return d


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
    stamps: dict = field(default_factory=dict)   # {unit_key: store.units.UnitStamp} of the units to do

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
                          "`model` (e.g. `model` ViT-B-32 `pretrained` laion2b_s34b_b79k); clipsql cannot "
                          "tell it from the vectors, and filing them under the demo model would be wrong")
    recover(store)
    t0 = time.perf_counter()
    known = {m.model_id: m for m in store.list_models()}.get(spec.model_id)
    if opts.storage is not None:
        storage_dtype(opts.storage)
        if known is not None:
            check_storage(known, opts.storage)
    units = plan_units(store, known, source)
    seconds["plan"] = time.perf_counter() - t0
    return Plan(spec, source, source_name, units.todo, units.done, known, seconds, t_start, units.stamps)


def finish_noop(store: Store, plan: Plan) -> IngestSummary | None:
    """When the ledger holds every unit: record a run that did nothing (no model load, no reads)."""
    if plan.known is None or plan.todo:
        return None
    run_id = start_run(store.engine, plan.known.model_id, plan.source_name, plan.source.kind)
    summary = IngestSummary(run_id, plan.known.model_id, plan.source_name, skipped=plan.already, status="done",
                            units_skipped=len(plan.done), id_column=getattr(plan.source, "id_column", None))
    summary.wall_seconds = time.perf_counter() - plan.t_start
    summary.seconds = {k: round(v, 4) for k, v in plan.seconds.items()}
    finish_run(store.engine, run_id, "done", plan.already, summary.to_dict())
    return summary


def register_model(store: Store, plan: Plan, device: str,
                   encoder_factory: Callable[[Any, str], Any] | None = None,
                   storage: str | None = None) -> tuple[Any, Any]:
    """(model record, encoder or None): the model is loaded (`encoder_factory`, open_clip by
    default) when images must be encoded (or its weights are local), and checked against a
    precomputed source's dimension (a new model is stored as `storage`, default float32). The
    encoder's `.loaded` is the models.LoadedModel."""
    t0 = time.perf_counter()
    spec, source = plan.spec, plan.source
    encoder = loaded = None
    if not source.precomputed and plan.known is not None:
        # the store holds the model: its record names it, and the weights load at the first row
        # that needs encoding (a run whose rows are all stored never loads them)
        sync_stats(store, plan.known)
        return plan.known, LazyEncoder(encoder_factory or open_clip_encoder, spec, device, plan.seconds)
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
    rec = store.register_model(**fields, storage=storage)
    sync_stats(store, rec)   # stores written before the commit ledger may lag
    return rec, encoder


class LazyEncoder:
    """An encoder (encode.Encoder's interface: `.loaded`, a call, `.text`) whose model is loaded
    at first use; `is_loaded` says whether that happened. The load's seconds count as load_model."""

    def __init__(self, factory: Callable[[Any, str], Any], spec: Any, device: str, seconds: Counter):
        self.factory, self.spec, self.device, self.seconds = factory, spec, device, seconds
        self._encoder: Any = None

    @property
    def is_loaded(self) -> bool:
        return self._encoder is not None

    def _get(self) -> Any:
        if self._encoder is None:
            t0 = time.perf_counter()
            self._encoder = self.factory(self.spec, self.device)
            self.seconds["load_model"] += time.perf_counter() - t0
        return self._encoder

    @property
    def loaded(self) -> Any:
        return self._get().loaded

    def __call__(self, pixels: list[Any], tokens: list[Any]) -> Any:
        return self._get()(pixels, tokens)

    def text(self, tokens: list[Any]) -> Any:
        return self._get().text(tokens)


@dataclass
class IngestRun:
    """One run under way: what an engine's stages share with the lifecycle."""
    store: Store
    plan: Plan
    opts: IngestOptions
    rec: Any
    encoder: Any                        # None for precomputed vectors without local weights
    writer: Writer
    checker: IdChecker
    summary: IngestSummary
    rejected: Counter
    seconds: Counter
    updater: Updater | None = None
    commit_stage: str = "write"         # the stage whose seconds a commit counts in

    def reject(self, rejects: list[tuple[str, str, str]]) -> None:
        self.writer.reject(rejects)
        for _, reason, _ in rejects:
            self.rejected[reason] += 1

    def commit(self) -> None:
        """One commit of what the writer holds. It marks source units done, so the units' queued
        rewrites (--update) go first (a kill in between leaves the units to redo, never rewrites lost)."""
        t0 = time.perf_counter()
        if not self.writer.pending.empty:
            fault("ingest:before-commit")
        if self.updater is not None:
            self.updater.flush(force=True)
            self.summary.updated_samples = self.updater.updated_samples
        self.writer.commit()
        self.checker.committed()
        self.seconds[self.commit_stage] += time.perf_counter() - t0

    def commit_if_due(self) -> None:
        if self.writer.due():
            self.commit()


def run_ingest(store: Store, source_path: str, model: str | None, pretrained: str | None, checkpoint: str | None,
               opts: IngestOptions, *, stages: Callable[[IngestRun], None], device: str,
               encoder_factory: Callable[[Any, str], Any] | None = None, commit_stage: str = "write") -> IngestSummary:
    """The lifecycle of one run (the module docstring); `stages(run)` does the engine's work."""
    with store.lock():
        plan = plan_run(store, source_path, model, pretrained, checkpoint, opts)
        noop = finish_noop(store, plan)
        if noop is not None:
            return noop
        meta_before = set(metadata_columns(store))
        rec, encoder = register_model(store, plan, device, encoder_factory, opts.storage)
        run_id = start_run(store.engine, rec.model_id, plan.source_name, plan.source.kind)
        summary = IngestSummary(run_id, rec.model_id, plan.source_name, skipped=plan.already,
                                units_skipped=len(plan.done), id_column=getattr(plan.source, "id_column", None))
        writer = Writer(store, rec, run_id=run_id, source=plan.source_name, policy=opts.policy)
        writer.stamps = plan.stamps
        run = IngestRun(store, plan, opts, rec, encoder, writer, IdChecker(store, rec), summary, Counter(),
                        plan.seconds, Updater(store, rec) if opts.update else None, commit_stage)
        ok = False
        try:
            stages(run)
            run.commit()
            ok = True
            summary.status = "done"
        except BaseException:
            summary.status = "failed"
            raise
        finally:
            # after a failure (a full disk, say) the bookkeeping below may fail too; it must never
            # replace the error that stopped the run (the next writer marks the run aborted)
            with unless_failing(summary):
                writer.close(commit=False)
            run.seconds["stats"] = writer.fold_wait_seconds
            run.seconds["stats (background)"] = writer.fold_seconds
            summary.commits = writer.commits
            summary.rejected = dict(run.rejected)
            summary.wall_seconds = time.perf_counter() - plan.t_start
            summary.seconds = {k: round(v, 4) for k, v in run.seconds.items()}
            with unless_failing(summary):
                finish_run(store.engine, run_id, summary.status, summary.skipped, summary.to_dict())
        if ok:
            summary.notes += renamed_metadata(store, meta_before)
        if ok and opts.maintain:
            t0 = time.perf_counter()
            summary.maintenance = maintain_after_ingest(store, rec)
            summary.seconds["maintain"] = round(time.perf_counter() - t0, 4)
        if writer.compactions:          # compactions that kept the tables under the fragment bound
            summary.maintenance = summary.maintenance or OptimizeReport()
            summary.maintenance.during_run = writer.compactions
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
    aliases = metadata_aliases(list(metadata_columns(store)))
    return [f"metadata column {name!r} is {alias!r} in the samples view ({name} is a samples column)"
            for name, alias in sorted(aliases.items()) if name not in before and alias != name]


