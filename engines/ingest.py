"""`clipsql ingest --engine ray`: the local run's plan and commit protocol, with the per-unit work on Ray.

    driver: lock, plan (units the ledger lacks), register the model
      → Ray Data over the units:
          precomputed: one task per unit (read + columnar checks + write data files + partial)
          images:      CPU tasks decode/preprocess a unit → an actor pool (one GPU per actor when the
                       cluster has GPUs) encodes, writes data files and folds the partial
      → driver, streaming: in-run duplicate check (a duplicate's unit is redone without it), then
        commits groups of units through `Store.commit` (one ledger transaction each: appends,
        merged statistics partials, units done, rejects).

A killed worker's task is retried by Ray; a killed driver leaves only unreferenced data files
(the ledger never names them; `clipsql optimize` deletes them) and a re-run redoes exactly the
units no commit recorded.
"""
from __future__ import annotations

import pickle
import time
from collections import Counter
from typing import Any

from clipsql.store.deletions import merge_days
from clipsql.engines.engine import gpu_count, ray_session, worker_count
from clipsql.engines.tasks import EncodeWriter, RunContext, UnitResult, decode_unit, precomputed_unit, read_ids
from clipsql.errors import SourceError
from clipsql.ingest.dedup import IdChecker
from clipsql.ingest.pipeline import (
    IngestOptions,
    IngestSummary,
    finish_noop,
    plan_run,
    register_model,
    renamed_metadata,
    unless_failing,
)
from clipsql.lazy import lance_fragment, ray_data
from clipsql.lazy import ray as _ray
from clipsql.store.faults import fault
from clipsql.store.maintenance import maintain_after_ingest
from clipsql.store.store import PendingCommit, Store, merge_sql_types, new_moments
from clipsql.store.tables import SAMPLES


def ingest_ray(store: Store, source_path: str, *, model: str | None = None, pretrained: str | None = None,
               checkpoint: str | None = None, options: IngestOptions | None = None,
               address: str | None = None, actors: int | None = None) -> IngestSummary:
    opts = options or IngestOptions()
    if opts.update:
        raise SourceError("`update` runs with the local `engine` (it rewrites rows in place, one commit at a time)",
                          param="update")
    if opts.encoder_factory is not None:
        raise ValueError("the Ray engine's actors load the model with open_clip; encoder_factory is for the "
                         "local engine")
    with store.lock():
        plan = plan_run(store, source_path, model, pretrained, checkpoint, opts)
        noop = finish_noop(store, plan)
        if noop is not None:
            return noop
        meta_before = set(store.metadata_columns())
        rec, encoder = register_model(store, plan, "cpu")
        loaded = encoder.loaded if encoder is not None else None
        store.ensure_samples_table()
        state = store.stats(rec)
        versions = store.committed_versions()
        ctx = RunContext(
            store_path=str(store.path), rec=rec, source=plan.source, versions=versions,
            shifts={k: (None if m.shift is None else m.shift.copy()) for k, m in state.moments.items()},
            seq=state.covered_seq + 1,
            storage_versions={n: store.dataset(n).data_storage_version for n in (SAMPLES, rec.table_name)},
            allow_missing_captions=opts.allow_missing_captions, device=opts.device, spec=plan.spec,
            batch_size=opts.batch_size,
            preprocess=loaded.preprocess if loaded is not None and not plan.source.precomputed else None,
            tokenizer=loaded.tokenizer if loaded is not None and not plan.source.precomputed else None)
        run_id = store.start_run(rec.model_id, plan.source_name, plan.source.kind)
        summary = IngestSummary(run_id, rec.model_id, plan.source_name, skipped=plan.already,
                                units_skipped=len(plan.done), device="ray",
                                id_column=getattr(plan.source, "id_column", None))
        driver = _Driver(store, rec, ctx, run_id, plan.source_name, opts, summary, plan.todo)
        ok = False
        try:
            with ray_session(address) as ray:
                summary.workers = worker_count(ray)
                for result in _results(ray, ctx, plan.todo, opts, actors):
                    driver.take(result)
            driver.commit()
            ok, summary.status = True, "done"
        except BaseException:
            summary.status = "failed"
            raise
        finally:
            summary.commits = driver.commits
            summary.rejected = dict(driver.rejected)
            summary.wall_seconds = time.perf_counter() - plan.t_start
            summary.seconds = {k: round(v, 4) for k, v in (plan.seconds + driver.seconds).items()}
            with unless_failing(summary):
                store.finish_run(run_id, summary.status, summary.skipped, summary.to_dict())
        if ok:
            summary.notes += renamed_metadata(store, meta_before)
            if opts.maintain:
                summary.maintenance = maintain_after_ingest(store, rec)
    return summary


def _results(ray: Any, ctx: RunContext, todo: list, opts: IngestOptions, actors: int | None):
    """UnitResults as Ray Data produces them (streaming; any order)."""
    if not todo:
        return
    # results in unit order: the first occurrence of an id in source order is the one kept (as
    # locally), and commits group units in the same order on every run
    ray_data.DataContext.get_current().execution_options.preserve_order = True
    ctx_ref = ray.put(ctx)
    items = [{"i": i} for i in range(len(todo))]
    units = ray.put(todo)
    ds = ray_data.from_items(items, override_num_blocks=len(items))
    # Ray Data retries a task whose worker died, and restarts a dead actor, by default
    if ctx.source.precomputed:
        def one(row: dict, _ctx=ctx_ref, _units=units) -> dict:
            c, u = _ray.get(_ctx), _ray.get(_units)
            unit, key = u[row["i"]]
            return precomputed_unit(c, unit, key).to_row()
        out = ds.map(one)
    else:
        def decode(row: dict, _ctx=ctx_ref, _units=units) -> dict:
            c, u = _ray.get(_ctx), _ray.get(_units)
            unit, key = u[row["i"]]
            return decode_unit(c, unit, key)
        gpus, cpus = gpu_count(ray), worker_count(ray)
        size = actors or (gpus if gpus else max(1, cpus // 2))
        # on a cluster of one CPU an encoder actor holding a whole CPU would starve the decode tasks
        share = 1 if gpus or cpus >= 2 else 0.5
        out = ds.map(decode, num_cpus=share).map_batches(
            EncodeWriter, fn_constructor_args=(ctx,), batch_size=1, compute=ray_data.ActorPoolStrategy(size=size),
            num_gpus=1 if gpus else 0, num_cpus=share)
    for row in out.iter_rows():
        r = row["result"]
        yield pickle.loads(r) if isinstance(r, (bytes, bytearray)) else UnitResult.from_row(row)


class _Driver:
    """Collects unit results into pending commits (the same commit the local writer makes)."""

    def __init__(self, store: Store, rec: Any, ctx: RunContext, run_id: int, source: str, opts: IngestOptions,
                 summary: IngestSummary, todo: list):
        self.store, self.rec, self.ctx, self.run_id, self.source, self.opts = store, rec, ctx, run_id, source, opts
        self.summary = summary
        self.units = {key: unit for unit, key in todo}
        self.checker = IdChecker(store, rec)
        self.checker.lookup = False           # workers looked in the store; here only this run's duplicates
        self.rejected: Counter = Counter()
        self.seconds: Counter = Counter()
        self.commits = 0
        self._new()

    def _new(self) -> None:
        self.pending = PendingCommit(run_id=self.run_id, source=self.source, seq=self.ctx.seq)
        self.pending.moments = new_moments(self.rec.dim)
        self.started = time.monotonic()

    def take(self, r: UnitResult) -> None:
        if r.rows:
            ids = read_ids(r.ids)
            dup, _, _ = self.checker.check(ids)
            if dup.any():        # rare: ids an earlier unit of this run wrote; redo the unit without them
                r = self._redo(r, frozenset(ids.filter(dup).to_pylist()))
        for k, v in r.seconds.items():
            self.seconds[f"{k} (workers)"] += v
        p = self.pending
        p.fragments += _fragments(r.fragments)
        p.sample_fragments += _fragments(r.sample_fragments)
        p.rows += r.rows
        p.sample_rows += r.sample_rows
        if r.rows:
            for key, part in pickle.loads(r.moments).items():
                p.moments[key].merge(part)
        p.units.append((r.key, r.unit_rows, r.unit_rejected))
        p.rejects += r.rejects
        for k, v in r.meta_types.items():
            p.meta_types[k] = merge_sql_types(p.meta_types[k], v) if k in p.meta_types else v
        for _, reason, _ in r.rejects:
            self.rejected[reason] += 1
        self.summary.added += r.rows
        self.summary.skipped += r.skipped
        self.summary.samples_restored += r.samples_restored
        if r.deleted:
            self.summary.deleted += r.deleted
            self.summary.deleted_on = merge_days(self.summary.deleted_on, *r.deleted_on)
        if max(p.rows, p.sample_rows) >= self.opts.policy.rows or \
                time.monotonic() - self.started >= self.opts.policy.seconds:
            self.commit()

    def _redo(self, r: UnitResult, exclude: frozenset) -> UnitResult:
        """The unit again, here, without the ids an earlier unit of this run holds (they become
        duplicate_id rejects); its first data files stay unreferenced."""
        unit = self.units[r.key]
        if self.ctx.source.precomputed:
            return precomputed_unit(self.ctx, unit, r.key, exclude)
        p = pickle.loads(decode_unit(self.ctx, unit, r.key)["payload"])
        return EncodeWriter(self.ctx).encode(p, exclude)

    def commit(self) -> None:
        p = self.pending
        if not (p.rows or p.sample_rows or p.units or p.rejects):
            return
        t0 = time.perf_counter()
        fault("ray:before-commit")
        self.store.commit(self.rec, p)
        self.checker.committed()
        self.commits += 1
        self.seconds["commit"] += time.perf_counter() - t0
        self._new()


def _fragments(blobs: list[str]) -> list:
    return [lance_fragment.FragmentMetadata.from_json(b) for b in blobs]
