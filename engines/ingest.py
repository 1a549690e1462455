"""`clipsql ingest --engine ray`: the run lifecycle and commits of ingest.run, with the per-unit work on Ray.

    driver: ingest.run's lifecycle (lock, plan: units the ledger lacks, register the model, …)
      → Ray Data over the units:
          precomputed: one task per unit (read + columnar checks + write data files + partial)
          images:      CPU tasks decode/preprocess a unit → an actor pool (one GPU per actor when the
                       cluster has GPUs) encodes, writes data files and folds the partial
      → driver, streaming: in-run duplicate check (a duplicate's unit is redone without it), then
        hands the unit's data files and statistics partial to the run's `Writer`, which commits
        under the local engine's policy (one ledger transaction each: appends, merged statistics
        partials, units done, rejects).

A killed worker's task is retried by Ray; a killed driver leaves only unreferenced data files
(the ledger never names them; `clipsql optimize` deletes them) and a re-run redoes exactly the
units no commit recorded.
"""
from __future__ import annotations

import pickle
from typing import Any

from clipsql.engines.engine import gpu_count, ray_session, worker_count
from clipsql.engines.tasks import (
    EncodeWriter,
    RunContext,
    UnitResult,
    decode_unit,
    precomputed_unit,
    read_ids,
    shared_context,
    unit_payload,
    unit_task,
)
from clipsql.errors import SourceError
from clipsql.ingest.run import IngestOptions, IngestRun, IngestSummary, run_ingest
from clipsql.lazy import lance_fragment, ray_data
from clipsql.lazy import ray as _ray
from clipsql.store.deletions import merge_days
from clipsql.store.ledger import committed_versions
from clipsql.store.store import Store
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

    def stages(run: IngestRun) -> None:
        run.summary.device = "ray"
        driver = _Driver(run, _context(run))
        with ray_session(address) as ray:
            run.summary.workers = worker_count(ray)
            for result in _results(ray, driver.ctx, run.plan.todo, opts, actors):
                driver.take(result)

    return run_ingest(store, source_path, model, pretrained, checkpoint, opts, stages=stages, device="cpu",
                      commit_stage="commit")


def _context(run: IngestRun) -> RunContext:
    """What every task of the run gets: the source, the model, the table versions the run started
    from, the writer's statistics shift and the write batch number its rows carry."""
    st, plan, rec, w = run.store, run.plan, run.rec, run.writer
    loaded = run.encoder.loaded if run.encoder is not None and not plan.source.precomputed else None
    return RunContext(
        store_path=str(st.path), rec=rec, source=plan.source, versions=committed_versions(st),
        shifts=w.shifts(), seq=w.pending.seq,
        storage_versions={n: st.dataset(n).data_storage_version for n in (SAMPLES, rec.table_name)},
        allow_missing_captions=run.opts.allow_missing_captions, device=run.opts.device, spec=plan.spec,
        batch_size=run.opts.batch_size,
        preprocess=loaded.preprocess if loaded is not None else None,
        tokenizer=loaded.tokenizer if loaded is not None else None)


def _results(ray: Any, ctx: RunContext, todo: list, opts: IngestOptions, actors: int | None):
    """UnitResults as Ray Data produces them (streaming; any order)."""
    if not todo:
        return
    # results in unit order: the first occurrence of an id in source order is the one kept (as
    # locally), and commits group units in the same order on every run
    ray_data.DataContext.get_current().execution_options.preserve_order = True
    # each task receives its own unit (and a source describing only it), never the list of units
    ctx_ref = ray.put(shared_context(ctx))
    items = [{"task": unit_payload(ctx.source, unit, key)} for unit, key in todo]
    ds = ray_data.from_items(items, override_num_blocks=len(items))
    # Ray Data retries a task whose worker died, and restarts a dead actor, by default
    if ctx.source.precomputed:
        def one(row: dict, _ctx=ctx_ref) -> dict:
            return precomputed_unit(*unit_task(_ray.get(_ctx), row["task"])).to_row()
        out = ds.map(one)
    else:
        def decode(row: dict, _ctx=ctx_ref) -> dict:
            return decode_unit(*unit_task(_ray.get(_ctx), row["task"]))
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
    """Hands each unit's written data files and statistics partial to the run's writer, which
    commits them under the same policy and in the same ledger transaction as the local engine's
    rows; here only this run's duplicate ids are looked for (the workers looked in the store)."""

    def __init__(self, run: IngestRun, ctx: RunContext):
        self.run, self.ctx = run, ctx
        self.units = {key: unit for unit, key in run.plan.todo}
        run.checker.lookup = False

    def take(self, r: UnitResult) -> None:
        run, summary = self.run, self.run.summary
        if r.rows:
            ids = read_ids(r.ids)
            dup, _, _ = run.checker.check(ids)
            if dup.any():        # rare: ids an earlier unit of this run wrote; redo the unit without them
                r = self._redo(r, frozenset(ids.filter(dup).to_pylist()))
        for k, v in r.seconds.items():
            run.seconds[f"{k} (workers)"] += v
        run.writer.add_written(fragments=_fragments(r.fragments), sample_fragments=_fragments(r.sample_fragments),
                               rows=r.rows, sample_rows=r.sample_rows,
                               moments=pickle.loads(r.moments) if r.rows else None, meta_types=r.meta_types,
                               seq=self.ctx.seq)
        run.reject(r.rejects)
        run.writer.unit_done(r.key, r.unit_rows, r.unit_rejected)
        summary.added += r.rows
        summary.skipped += r.skipped
        summary.samples_restored += r.samples_restored
        if r.deleted:
            summary.deleted += r.deleted
            summary.deleted_on = merge_days(summary.deleted_on, *r.deleted_on)
        run.commit_if_due()

    def _redo(self, r: UnitResult, exclude: frozenset) -> UnitResult:
        """The unit again, here, without the ids an earlier unit of this run holds (they become
        duplicate_id rejects); its first data files stay unreferenced."""
        unit = self.units[r.key]
        if self.ctx.source.precomputed:
            return precomputed_unit(self.ctx, unit, r.key, exclude)
        p = pickle.loads(decode_unit(self.ctx, unit, r.key)["payload"])
        return EncodeWriter(self.ctx).encode(p, exclude)


def _fragments(blobs: list[str]) -> list:
    return [lance_fragment.FragmentMetadata.from_json(b) for b in blobs]
