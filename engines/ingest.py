"""`clipsql ingest --engine ray`: the run lifecycle and commits of ingest.run, with the per-unit work on Ray.

    driver: ingest.run's lifecycle (lock, plan: units the ledger lacks, register the model, …)
      → K shard actors (engines.shards) for the run's ids and statistics partials
      → Ray Data over the units (each task receives its own unit, never the list):
          precomputed: one task per unit (read + columnar checks + write data files + partial)
          images:      CPU tasks decode/preprocess a unit → an actor pool (one GPU per actor when the
                       cluster has GPUs) encodes, writes data files and folds the partial
        a worker sends the unit's written ids to the shards (by id hash) and its partial to the
        unit's shard; its result (data files' metadata, counts, rejects) is small
      → driver, streaming, in unit order: the shards check the unit's ids against the run's earlier
        ones (a duplicate's unit is redone without it), then the unit's data files go to the run's
        `Writer`, which commits under the local engine's policy (one ledger transaction each:
        appends, statistics partials — merged by the shards, one per commit —, units done, rejects).

The driver handles O(units) small messages: no id and no per-unit partial passes through it.
A killed worker's task is retried by Ray; a killed driver leaves only unreferenced data files
(the ledger never names them; `clipsql optimize` deletes them) and a re-run redoes exactly the
units no commit recorded. The shard actors run on the head node: a killed worker node does not
take the run's state with them (a shard that dies fails the run; its re-run is exact).
"""
from __future__ import annotations

import functools

import pickle
from typing import Any

from clipsql.engines.engine import gpu_count, ray_session, worker_count
from clipsql.engines.shards import Duplicates, RunShard, key_shard
from clipsql.engines.tasks import (
    EncodeWriter,
    RunContext,
    UnitResult,
    compact_task,
    decode_unit,
    precomputed_unit,
    shared_context,
    unit_payload,
    unit_task,
)
from clipsql.errors import SourceError, env_number
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
        with ray_session(address) as ray:
            run.summary.workers = worker_count(ray)
            shards = start_shards(ray, run) if run.plan.todo else []
            run.writer.compact_tasks = functools.partial(compact_on_workers, ray)
            try:
                driver = _Driver(run, _context(run), shards)
                for result in _results(ray, driver.ctx, shards, run.plan.todo, opts, actors):
                    driver.take(result)
                driver.gather()      # the last commit (run_ingest's) carries the last units' partials
            finally:
                for shard in shards:
                    _ray.kill(shard)

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


HEAD_NODE = "node:__internal_head__"     # Ray's resource of the head node


def compact_on_workers(ray: Any, uri: str, version: int, tasks: list) -> list:
    """A compaction plan's tasks (store.compaction), one Ray task each on the workers: the rewrite
    of a long run's small fragments is spread like the ingest, only its commit is the driver's."""
    remote = _ray.remote(num_cpus=1, max_retries=2)(compact_task)
    return ray.get([remote.remote(uri, version, t) for t in tasks])


def shard_count(ray: Any) -> int:
    """How many shard actors a run gets: CLIPSQL_RAY_SHARDS, else one per 8 CPUs of the cluster,
    2 … 32 (a shard checks ~1M ids a second; each holds 16–32 bytes per id of its share)."""
    return int(env_number("CLIPSQL_RAY_SHARDS", min(32, max(2, worker_count(ray) // 8)), above=True))


def start_shards(ray: Any, run: IngestRun) -> list:
    """The run's shard actors (engines.shards), on the head node (a killed worker node does not take
    the run's state with it; the cluster does not outlive its head), holding no CPU."""
    actor = _ray.remote(num_cpus=0, resources={HEAD_NODE: 0.001})(RunShard)
    shards = [actor.remote(str(run.store.path), run.rec) for _ in range(shard_count(ray))]
    _ray.get([s.counts.remote() for s in shards])      # started (a failure to start is the run's)
    return shards


def _results(ray: Any, ctx: RunContext, shards: list, todo: list, opts: IngestOptions, actors: int | None):
    """UnitResults as Ray Data produces them (streaming, in unit order)."""
    if not todo:
        return
    # results in unit order: the first occurrence of an id in source order is the one kept (as
    # locally), and commits group units in the same order on every run
    ray_data.DataContext.get_current().execution_options.preserve_order = True
    # each task receives its own unit (and a source describing only it), never the list of units
    shared = shared_context(ctx, shards)
    ctx_ref = ray.put(shared)
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
            EncodeWriter, fn_constructor_args=(shared,), batch_size=1, compute=ray_data.ActorPoolStrategy(size=size),
            num_gpus=1 if gpus else 0, num_cpus=share)
    for row in out.iter_rows():
        r = row["result"]
        yield pickle.loads(r) if isinstance(r, (bytes, bytearray)) else UnitResult.from_row(row)


class _Driver:
    """Hands each unit's written data files to the run's writer, which commits them under the same
    policy and in the same ledger transaction as the local engine's rows; here only this run's
    duplicate ids are looked for (the workers looked in the store), by the shards, and the units'
    statistics partials come merged from the shards, one per commit."""

    def __init__(self, run: IngestRun, ctx: RunContext, shards: list):
        self.run, self.ctx, self.shards = run, ctx, shards
        self.units = {key: unit for unit, key in run.plan.todo}
        self.partials: list[list[str]] = [[] for _ in shards]     # {shard: unit keys} of the pending commit
        self.dropped: list[list[str]] = [[] for _ in shards]      # partials of redone units, not to use
        self.received = 0          # bytes of partials the driver received (tests, benches)
        run.checker.lookup = False

    def take(self, r: UnitResult) -> None:
        run, summary = self.run, self.run.summary
        moments = None
        if r.rows and r.sharded:
            found = _ray.get([s.check.remote(r.key) for s in self.shards])
            dup = Duplicates(frozenset().union(*(d.earlier for d in found)),
                             frozenset().union(*(d.repeated for d in found)))
            k = key_shard(r.key, len(self.shards))
            if dup:              # rare: ids earlier rows of this run hold; redo the unit without those rows
                self.dropped[k].append(r.key)
                r = self._redo(r, dup)
                moments = pickle.loads(r.moments) if r.rows else None
            else:
                self.partials[k].append(r.key)
        elif r.rows:             # a task without shards (a unit redone here)
            moments = pickle.loads(r.moments)
        for k, v in r.seconds.items():
            run.seconds[f"{k} (workers)"] += v
        run.writer.add_written(fragments=_fragments(r.fragments), sample_fragments=_fragments(r.sample_fragments),
                               rows=r.rows, sample_rows=r.sample_rows, moments=moments, meta_types=r.meta_types,
                               seq=self.ctx.seq)
        run.reject(r.rejects)
        run.writer.unit_done(r.key, r.unit_rows, r.unit_rejected)
        summary.added += r.rows
        summary.skipped += r.skipped
        summary.samples_restored += r.samples_restored
        if r.deleted:
            summary.deleted += r.deleted
            summary.deleted_on = merge_days(summary.deleted_on, *r.deleted_on)
        if run.writer.due():
            self.gather()
            run.commit()
            _ray.get([s.committed.remote() for s in self.shards])

    def gather(self) -> None:
        """The pending commit's statistics partials, merged by the shards (each its units', then
        shard 0 theirs), into the writer: one partial reaches the driver per commit."""
        if not self.shards or not any(self.partials) and not any(self.dropped):
            return
        parts = [s.take.remote(keys, drop) for s, keys, drop in zip(self.shards, self.partials, self.dropped)]
        merged = _ray.get(self.shards[0].merge.remote(*parts))
        self.partials = [[] for _ in self.shards]
        self.dropped = [[] for _ in self.shards]
        if merged:
            self.received += len(pickle.dumps(merged, protocol=5))
            self.run.writer.add_moments(merged)

    def _redo(self, r: UnitResult, exclude: Duplicates) -> UnitResult:
        """The unit again, here, without the rows that repeat an earlier row of this run (they
        become duplicate_id rejects, as locally); its first data files stay unreferenced."""
        unit = self.units[r.key]
        if self.ctx.source.precomputed:
            return precomputed_unit(self.ctx, unit, r.key, exclude)
        p = pickle.loads(decode_unit(self.ctx, unit, r.key)["payload"])
        return EncodeWriter(self.ctx).encode(p, exclude)


def _fragments(blobs: list[str]) -> list:
    return [lance_fragment.FragmentMetadata.from_json(b) for b in blobs]
