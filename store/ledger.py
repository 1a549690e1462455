"""The commit ledger: which Lance version of each table readers see, and the one writer's commits.

Write protocol (one writer, under the lock; store.writer does the buffering):
  1. rows arrive in small batches; their Lance data files are written as they come
     (`lance.fragment.write_fragments`), invisible to every reader;
  2. every N rows or T seconds, one *commit*: a Lance Append of the written fragments to
     `samples` and to the model table (two Lance versions), then ONE catalog transaction
     that inserts the `commits` ledger row, moves `table_versions` to the new versions,
     merges the commit's statistics partial into `running_stats`, marks the source units
     it completed in `ingested_units`, and records its rejects and run counters.
The catalog transaction is the commit point. Readers open each table at the version
`table_versions` names (`committed_versions`), so they see whole commits, `samples` and
embeddings from the same commit, and statistics that cover exactly the rows they see. A writer
that finds a Lance table ahead of its recorded version (a kill between 2's Lance commits and the
catalog transaction) restores the recorded version before it writes (`recover`); data files of a
killed commit are unreferenced and `clipsql optimize` deletes them.

The functions take the store (`st`, a store.store.Store, which sits above this module).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from clipsql.lazy import lance
from clipsql.store import catalog as cat
from clipsql.store import runs, stats, units
from clipsql.store.faults import fault
from clipsql.store.location import table_created, versions_desc
from clipsql.store.records import ModelRecord
from clipsql.store.tables import DELETIONS, SAMPLES, TAGS


@dataclass
class PendingCommit:
    """What one commit makes visible: written (unreferenced) fragments, their statistics
    partial, the source units it completes and the rejects seen since the last commit."""
    run_id: int | None
    source: str
    seq: int
    fragments: list = field(default_factory=list)          # model table
    sample_fragments: list = field(default_factory=list)   # samples table
    rows: int = 0
    sample_rows: int = 0
    moments: dict = field(default_factory=dict)            # (modality, space) → RunningMoments partial
    units: list = field(default_factory=list)              # (unit_key, rows, rejected)
    stamps: dict = field(default_factory=dict)             # {unit_key: store.units.UnitStamp} of those units
    rejects: list = field(default_factory=list)            # (location, reason, detail)
    meta_types: dict = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """Nothing to commit: no rows, no completed units, no rejects, no new metadata columns."""
        return not (self.rows or self.sample_rows or self.units or self.rejects or self.meta_types)


def committed_versions(st: Any) -> dict[str, int]:
    """{table: the Lance version the ledger's last commit names} (what readers open)."""
    with st.engine.connect() as conn:
        return dict(conn.execute(sa.select(cat.table_versions.c.table_name, cat.table_versions.c.version)).all())


def set_committed_version(conn: sa.Connection, name: str, version: int, commit_id: int | None) -> None:
    conn.execute(sa.delete(cat.table_versions).where(cat.table_versions.c.table_name == name))
    conn.execute(cat.table_versions.insert().values(table_name=name, version=int(version), commit_id=commit_id))


def commit_versions(st: Any, kind: str, versions: dict[str, int]) -> int:
    """A maintenance commit (`kind`: compact, optimize): Lance has already committed the tables'
    new `versions`; one catalog transaction records a `commits` row of that kind and moves the
    ledger to them (the commit point, as for an append). Returns the commit id."""
    with st.engine.begin() as conn:
        res = conn.execute(cat.commits.insert().values(
            model_id=None, run_id=None, kind=kind, rows=0, sample_rows=0,
            versions=cat.to_json(versions), created_at=time.time()))
        commit_id = int(res.inserted_primary_key[0])
        for name, v in versions.items():
            set_committed_version(conn, name, v, commit_id)
    return commit_id


def versioned_tables(st: Any) -> list[str]:
    """The Lance tables whose committed version the ledger names and that exist: `samples`, the
    deletions record (store.deletions), each model's table and `tags` (store.tags)."""
    names = [SAMPLES, DELETIONS] + [m.table_name for m in st.list_models()] + [TAGS]
    return [n for n in names if table_created(st.table_uri(n))]


def recover(st: Any) -> dict[str, int]:
    """Writers only (under the lock): roll every table whose Lance version is ahead of the ledger
    back to the committed version; adopt tables the ledger does not know yet (stores written
    before the ledger existed). Returns {table: rows rolled back}."""
    runs.abort_dead_runs(st.engine)
    recorded = committed_versions(st)
    rolled: dict[str, int] = {}
    for name in versioned_tables(st):
        uri = st.table_uri(name)
        listed = versions_desc(uri)       # a listing: an up-to-date store opens no table (nor imports Lance)
        if not listed:
            continue
        if name not in recorded:
            with st.engine.begin() as conn:
                set_committed_version(conn, name, listed[0], None)
            continue
        if listed[0] > recorded[name]:
            latest = lance.dataset(uri)
            good = lance.dataset(uri, version=recorded[name])
            rolled[name] = latest.count_rows() - good.count_rows()
            good.restore()
            with st.engine.begin() as conn:
                set_committed_version(conn, name, lance.dataset(uri).version, None)
    return rolled


def commit(st: Any, model: ModelRecord, c: PendingCommit) -> int | None:
    """Make one pending commit visible (the write protocol of the module docstring)."""
    if c.meta_types:   # before the Lance commits, so a kill cannot leave columns unregistered
        with st.engine.begin() as conn:
            record_meta_types(conn, c.meta_types)
    recorded = committed_versions(st)
    versions: dict[str, int] = {}
    for name, frags in ((SAMPLES, c.sample_fragments), (model.table_name, c.fragments)):
        if frags:
            ds = lance.LanceDataset.commit(st.table_uri(name), lance.LanceOperation.Append(frags),
                                           read_version=recorded[name])
            versions[name] = ds.version
            if name == SAMPLES:
                fault("commit:between-tables")
    fault("commit:after-lance")
    if not (versions or c.units or c.rejects):
        return None
    with st.engine.begin() as conn:
        commit_id = None
        if versions:
            res = conn.execute(cat.commits.insert().values(
                model_id=model.model_id, run_id=c.run_id, kind="append", rows=c.rows,
                sample_rows=c.sample_rows, versions=cat.to_json(versions), created_at=time.time()))
            commit_id = int(res.inserted_primary_key[0])
            for name, v in versions.items():
                set_committed_version(conn, name, v, commit_id)
        if c.rows:
            state = stats.load_stats_in(conn, model)
            for key, part in c.moments.items():
                state.moments[key].merge(part)
            state.covered_seq = max(state.covered_seq, c.seq)
            stats.save_stats_in(conn, state)
        for unit_key, rows, rejected in c.units:
            conn.execute(sa.delete(cat.ingested_units).where(
                cat.ingested_units.c.model_id == model.model_id, cat.ingested_units.c.unit_key == unit_key))
            conn.execute(cat.ingested_units.insert().values(
                model_id=model.model_id, unit_key=unit_key, source=c.source, commit_id=commit_id,
                rows=rows, rejected=rejected))
        units.record_in(conn, model.model_id, c.stamps)
        runs.record_rejects(conn, c.run_id, model.model_id, c.source, c.rejects)
        if c.run_id is not None:
            conn.execute(sa.update(cat.ingest_runs).where(cat.ingest_runs.c.run_id == c.run_id).values(
                added=cat.ingest_runs.c.added + c.rows,
                rejected=cat.ingest_runs.c.rejected + len(c.rejects)))
    return commit_id


def done_units(st: Any, model: ModelRecord, keys: list[str]) -> dict[str, tuple[int, int]]:
    """{unit_key: (rows, rejected)} for the given source units this model already holds."""
    out: dict[str, tuple[int, int]] = {}
    t = cat.ingested_units
    with st.engine.connect() as conn:
        for i in range(0, len(keys), 500):
            part = keys[i:i + 500]
            for k, rows, rej in conn.execute(sa.select(t.c.unit_key, t.c.rows, t.c.rejected).where(
                    t.c.model_id == model.model_id, t.c.unit_key.in_(part))):
                out[k] = (int(rows), int(rej))
    return out


def record_meta_types(conn: sa.Connection, meta_types: dict[str, str]) -> None:
    """Register metadata columns (and widen the SQL type of known ones) in the caller's transaction."""
    if not meta_types:
        return
    known = dict(conn.execute(sa.select(cat.metadata_columns.c.name, cat.metadata_columns.c.sql_type)).all())
    for name, sql_type in meta_types.items():
        if name not in known:
            conn.execute(cat.metadata_columns.insert().values(name=name, sql_type=sql_type))
        elif known[name] != sql_type:
            merged = merge_sql_types(known[name], sql_type)
            if merged != known[name]:
                conn.execute(sa.update(cat.metadata_columns).where(
                    cat.metadata_columns.c.name == name).values(sql_type=merged))


def metadata_columns(st: Any) -> dict[str, str]:
    """{metadata column: its SQL type}, by name."""
    with st.engine.connect() as conn:
        return dict(conn.execute(sa.select(cat.metadata_columns.c.name, cat.metadata_columns.c.sql_type)
                                 .order_by(cat.metadata_columns.c.name)).all())


def merge_sql_types(a: str, b: str) -> str:
    if a == b:
        return a
    if {a, b} == {"BIGINT", "DOUBLE"}:
        return "DOUBLE"
    return "VARCHAR"
