"""Managing a store: the default model, removing a model, deleting rows, rewriting rows.

Every change follows the write protocol of store.ledger: Lance operations first (new
versions nobody reads yet), then ONE catalog transaction that moves `table_versions`,
records a `commits` row and corrects the running statistics, so a SIGKILL at any
point leaves either the old store or the new one (the next writer's `recover` rolls
back Lance versions the ledger does not name).

Statistics are corrected exactly, not recomputed: the moments of the removed (or
rewritten) rows are folded with the store's own shift and subtracted
(`RunningMoments.subtract`), so a delete costs O(deleted rows · d²), not a rescan.
Fits that covered a removed or rewritten row are recorded in `stale_fits`; scores keep
using them (their reference sample is fixed) but `stats show`, `query` and the `stats`
view say to re-run `clipsql stats fit`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from clipsql.store import deletions
from clipsql.kernels.arrays import to_numpy
from clipsql.kernels.moments import fold_pair
from clipsql.lazy import lance
from clipsql.store import catalog as cat
from clipsql.store.drops import mark_for_drop
from clipsql.store.faults import fault
from clipsql.store.ledger import record_meta_types, recover, set_committed_version
from clipsql.store.reads import count_rows
from clipsql.store.records import ModelRecord
from clipsql.store.stats import load_stats_in, new_moments, save_stats_in, saved_stats
from clipsql.store.store import Store
from clipsql.store.tables import SAMPLES, derived_tables, stored_table_name

SCAN_BATCH = 65536


def set_default_model(st: Store, name: str) -> ModelRecord:
    """Make `name` (a model id, or a unique part of one) the model commands use without --model."""
    rec = st.model(name)
    st.set_setting("default_model", rec.model_id)
    st.checkpoint()
    return rec


def remove_model(st: Store, name: str) -> dict[str, Any]:
    """Remove one model: its embedding table, statistics, fits and targets. Samples stay (other
    models, or a later ingest, use them). The catalog forgets the model in one transaction before
    any file is removed. Its tables (and the catalog rows of its fits) stay readable for the
    retention `optimize` uses, so a session opened before keeps answering; a writer after that
    deletes them (store.drops), as it does after a kill at any point here."""
    rec = st.model(name)        # an id or a unique part of one (an ambiguous part is refused, naming them)
    with st.lock():
        recover(st)
        with st.engine.connect() as conn:
            fit_ids = [r[0] for r in conn.execute(sa.select(cat.fits.c.fit_id).where(
                cat.fits.c.model_id == rec.model_id))]
            target_tables = dict(conn.execute(sa.select(cat.targets.c.name, cat.targets.c.table_name).where(
                cat.targets.c.model_id == rec.model_id)).all())
        rows = count_rows(st, rec)
        default = st.get_setting("default_model")
        with st.engine.begin() as conn:
            for table, col in ((cat.models, cat.models.c.model_id),
                               (cat.running_stats, cat.running_stats.c.model_id),
                               (cat.targets, cat.targets.c.model_id),
                               (cat.ingested_units, cat.ingested_units.c.model_id)):
                conn.execute(sa.delete(table).where(col == rec.model_id))
            conn.execute(sa.delete(cat.table_versions).where(
                cat.table_versions.c.table_name.in_([rec.table_name, *target_tables.values()])))
            conn.execute(cat.commits.insert().values(
                model_id=rec.model_id, run_id=None, kind="remove_model", rows=-rows, sample_rows=0,
                versions=cat.to_json({}), created_at=time.time()))
            if default == rec.model_id:
                rest = conn.execute(sa.select(cat.models.c.model_id).order_by(cat.models.c.created_at)).first()
                conn.execute(sa.delete(cat.settings).where(cat.settings.c.key == "default_model"))
                if rest is not None:
                    conn.execute(cat.settings.insert().values(key="default_model", value=rest[0]))
            for table in (rec.table_name, *target_tables.values(), *derived_tables(rec.table_name)):
                mark_for_drop(conn, table, rec.model_id, keep_for_readers=True,
                              fits=fit_ids if table == rec.table_name else ())
        fault("models-rm:after-catalog")
    return {"model": rec.model_id, "rows": rows, "fits": len(fit_ids), "targets": sorted(target_tables),
            "default_model": st.get_setting("default_model")}


@dataclass
class DeleteResult:
    """What `delete_ids` / `delete_where` deleted (or, with `dry_run`, would delete)."""
    samples: int = 0                                     # rows of `samples`
    rows: dict[str, int] = field(default_factory=dict)   # model id → embedding rows
    stale_fits: list[int] = field(default_factory=list)  # fits that covered a deleted row (now stale)
    recorded: int = 0                                    # ids added to the deletions record
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def delete_ids(st: Store, ids: pa.Array, *, progress: Callable[[int], None] | None = None,
               record: str | None = None) -> DeleteResult:
    """Delete the samples `ids` and their rows in every model's table, downdating each model's
    running statistics exactly. `record`: the delete's --where text; the ids are then added to the
    deletions record (store.deletions) in the same commit, so no later ingest brings them back.
    The caller holds the writer lock (and has run `recover`)."""
    ids = pc.unique(ids.cast(pa.string()).filter(pc.is_valid(ids)))
    out = DeleteResult()
    if len(ids) == 0:
        return out
    where = pc.field("id").isin(ids)
    models = st.list_models()
    removed: dict[str, tuple[dict, int, int]] = {}    # model_id → (moments, rows, lowest seq)
    for rec in models:
        parts = new_moments(rec.dim)
        state = saved_stats(st, rec)
        for key, m in parts.items():   # fold with the store's shift: the subtraction is then exact
            m.shift = state.moments[key].shift
        n, low = 0, None
        for batch in st.embeddings_table(rec).to_batches(
                columns=["image_embedding", "text_embedding", "seq"], filter=where, batch_size=SCAN_BATCH):
            if not batch.num_rows:
                continue
            _fold(parts, to_numpy(batch.column("image_embedding")), to_numpy(batch.column("text_embedding")))
            n += batch.num_rows
            s = int(pc.min(batch.column("seq")).as_py())
            low = s if low is None else min(low, s)
            if progress:
                progress(batch.num_rows)
        removed[rec.model_id] = (parts, n, low)
    samples = st.samples_table()
    n_samples = samples.count_rows(filter=where) if samples is not None else 0
    versions: dict[str, int] = {}
    if record is not None and (n_samples or any(v[1] for v in removed.values())):
        recorded = deletions.append(st, deletions.record_rows(st, ids, record))
        if recorded is not None:
            versions[deletions.TABLE] = recorded
            out.recorded = int(len(ids))
    for name, count in [(SAMPLES, n_samples)] + [(r.table_name, removed[r.model_id][1]) for r in models]:
        if count:
            st.dataset(name, latest=True).delete(where)
            versions[name] = lance.dataset(st.table_uri(name)).version
    fault("delete:after-lance")
    if not versions:
        return out
    with st.engine.begin() as conn:
        res = conn.execute(cat.commits.insert().values(
            model_id=None, run_id=None, kind="delete", rows=-sum(v[1] for v in removed.values()),
            sample_rows=-n_samples, versions=cat.to_json(versions), created_at=time.time()))
        commit_id = int(res.inserted_primary_key[0])
        for name, v in versions.items():
            set_committed_version(conn, name, v, commit_id)
        for rec in models:
            parts, n, low = removed[rec.model_id]
            if not n:
                continue
            state = load_stats_in(conn, rec, st.path)
            for key, part in parts.items():
                state.moments[key].subtract(part)
            save_stats_in(conn, state)
            out.rows[rec.model_id] = n
            out.stale_fits += mark_stale_fits(conn, rec, low, f"{n} of its rows were deleted")
    out.samples = n_samples
    _delete_from_stored_scores(st, models, where)
    return out


def apply_update(st: Store, rec: ModelRecord, sample_changes: pa.Table | None,
                 model_changes: pa.Table | None, meta_types: dict[str, str] | None = None) -> dict[str, int]:
    """Rewrite stored rows (`ingest --update`; the caller holds the lock).

    sample_changes: id + the `samples` columns to overwrite (caption, caption_truncated, metadata);
    model_changes: id, caption and the new text_embedding of rows in `rec`'s table. The text
    statistics lose the old vectors and gain the new ones; fits covering them become stale."""
    if meta_types:    # before the Lance commits, so a kill cannot leave columns unregistered
        with st.engine.begin() as conn:
            record_meta_types(conn, meta_types)
    versions: dict[str, int] = {}
    parts = None
    low = None
    n_model = model_changes.num_rows if model_changes is not None else 0
    if n_model:
        state = saved_stats(st, rec)
        old = st.embeddings_table(rec).to_table(columns=["id", "text_embedding", "seq"],
                                                filter=pc.field("id").isin(model_changes.column("id")))
        parts = {"old": new_moments(rec.dim), "new": new_moments(rec.dim)}
        for side in parts.values():
            for key, m in side.items():
                m.shift = state.moments[key].shift
        _fold_text(parts["old"], to_numpy(old.column("text_embedding")))
        _fold_text(parts["new"], to_numpy(model_changes.column("text_embedding")))
        low = int(pc.min(old.column("seq")).as_py()) if old.num_rows else None
    for name, changes in ((SAMPLES, sample_changes), (rec.table_name, model_changes)):
        if changes is not None and changes.num_rows:
            st.dataset(name, latest=True).merge_insert("id").when_matched_update_all().execute(changes)
            versions[name] = lance.dataset(st.table_uri(name)).version
    fault("update:after-lance")
    if not versions:
        return {"samples": 0, "rows": 0}
    with st.engine.begin() as conn:
        res = conn.execute(cat.commits.insert().values(
            model_id=rec.model_id, run_id=None, kind="update", rows=0, sample_rows=0,
            versions=cat.to_json(versions), created_at=time.time()))
        commit_id = int(res.inserted_primary_key[0])
        for name, v in versions.items():
            set_committed_version(conn, name, v, commit_id)
        if parts is not None:
            state = load_stats_in(conn, rec, st.path)
            for key in state.moments:
                if key[0] == "text":
                    state.moments[key].subtract(parts["old"][key])
                    state.moments[key].merge(parts["new"][key])
            save_stats_in(conn, state)
            mark_stale_fits(conn, rec, low, f"the captions of {n_model} of its rows were rewritten")
    return {"samples": sample_changes.num_rows if sample_changes is not None else 0, "rows": n_model}


def mark_stale_fits(conn: sa.Connection, rec: ModelRecord, lowest_seq: int | None, why: str) -> list[int]:
    """Record every fit of `rec` that covered a row of write batch ≥ `lowest_seq` as stale."""
    if lowest_seq is None:
        return []
    fits = [r[0] for r in conn.execute(sa.select(cat.fits.c.fit_id).where(
        cat.fits.c.model_id == rec.model_id, cat.fits.c.covered_seq >= lowest_seq))]
    known = {r[0] for r in conn.execute(sa.select(cat.stale_fits.c.fit_id).where(cat.stale_fits.c.fit_id.in_(fits)))}
    for fit_id in fits:
        if fit_id not in known:
            conn.execute(cat.stale_fits.insert().values(fit_id=fit_id, reason=why, created_at=time.time()))
    return [f for f in fits if f not in known]


def _fold(parts: dict, image: Any, text: Any) -> None:
    fold_pair(parts[("image", "raw")], parts[("image", "normalized")], image)
    fold_pair(parts[("text", "raw")], parts[("text", "normalized")], text)


def _fold_text(parts: dict, text: Any) -> None:
    fold_pair(parts[("text", "raw")], parts[("text", "normalized")], text)


def _delete_from_stored_scores(st: Store, models: list[ModelRecord], where: Any) -> None:
    """Materialized scores (`clipsql score --store`) are a derived copy: drop the deleted ids too."""
    for rec in models:
        name = stored_table_name(rec.table_name)
        if name in st.table_names():
            st.dataset(name, latest=True).delete(where)
